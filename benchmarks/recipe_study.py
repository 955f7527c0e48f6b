"""Function matching offline (issue 11): today's crop-and-flip cached KD against the full recipe, cached and online.

    python benchmarks/recipe_study.py benchmarks/recipe_cifar.json
    python benchmarks/recipe_study.py benchmarks/recipe_smoke.json   # minutes on a CPU: checks the script
    python benchmarks/recipe_study.py benchmarks/recipe_stanford40.json   # the paper's setting, on a GPU

A config names a study config of benchmarks/study.py as its "base" (data,
teacher, input size, batch, optimizer, crop ranges, alpha and T come from
it, and its trained teacher is reused when it exists) and adds:

* "recipe": Recipe fields (e.g. mixup 0.8, cutmix 1.0, aa rand-m9-mstd0.5-inc1, reprob 0.25), "smoothing";
* "students", "seeds", "epochs" (long enough for strong augmentation to matter, e.g. 30), "views" (K);
* "sweep_student" and "views_sweep": K values, "epoch" meaning one view per epoch (K = epochs);
* optionally "modes": which of the modes below to run (default all; runs go mode by mode, every seed of one
  mode before the next, so a study cut short still has whole rows).

For every student and seed it trains: crop-and-flip cached KD (``cached``),
and under the recipe plain training (``fm-plain``), cached KD (``fm-cached``)
and online KD (``fm-online``); a seed is the whole run's (the dump's views,
the student's init and order). Each run's metrics.json is its record, so an
interrupted study resumes. Writes OUT/report.md and OUT/results.json (top-1,
mAP as mean ± sd over seeds, the cached-online gap, img/s per mode).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from kdcache.config import CropRanges, DumpConfig, Recipe, RunOptions, TrainConfig
from kdcache.report import RichProgress
from kdcache.teacher import dump
from kdcache.train import fit

sys.path.insert(0, str(Path(__file__).parent))
from study import metrics_of, optims, prepare_data  # noqa: E402

MODES = ("cached", "fm-plain", "fm-cached", "fm-online")


# What a recipe study takes from its base study config; the rest (students, epochs, views, the views sweep) is
# its own, so that a base's sweep does not leak in.
BASE_KEYS = ("data", "img_size", "batch_size", "teacher", "teacher_epochs", "alpha", "temperature", "crop_scale",
             "hflip", "optim", "teacher_optim", "workers", "device", "amp", "pretrained")


def load_config(path: str) -> dict:
    """The recipe config over the BASE_KEYS of its base study config (the recipe config's keys win)."""
    cfg = json.loads(Path(path).read_text())
    base = json.loads((Path(path).parent / cfg["base"]).read_text())
    return {**{k: base[k] for k in BASE_KEYS if k in base}, **cfg, "base_name": base["name"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "kdcache-data"))
    parser.add_argument("--report-only", action="store_true",
                        help="train and dump nothing: write the report from the runs that have finished")
    args = parser.parse_args()
    cfg = load_config(args.config)
    name = cfg["name"]
    out = Path(cfg.get("out", f"benchmarks/results/recipe-{name}"))
    runs = Path(cfg.get("runs", f"runs/recipe-{name}"))
    optim, teacher_optim = optims(cfg)
    data = prepare_data(cfg["data"], Path(args.cache_dir))
    progress = RichProgress()
    crops = CropRanges(scale=tuple(cfg["crop_scale"]), hflip=cfg.get("hflip", 0.5))
    recipe = Recipe(**cfg["recipe"])
    hardware = {k: cfg[k] for k in ("workers", "device", "amp") if k in cfg}
    base_run = RunOptions(data=data, img_size=cfg["img_size"], batch_size=cfg["batch_size"], seed=0, **hardware)
    epochs = cfg["epochs"]
    pretrained = bool(cfg.get("pretrained", False))  # timm's ImageNet weights for the teacher and the students
    records: dict[str, dict] = {}

    def run_of(seed: int) -> RunOptions:
        return RunOptions(**{**base_run.__dict__, "seed": seed})

    # The teacher: the base study's when it has one, else trained here once (plain, crop and flip).
    teacher_out = Path(cfg.get("teacher_run", f"runs/study-{cfg['base_name']}/teacher"))
    teacher = metrics_of(teacher_out)
    if teacher is None and args.report_only:
        sys.exit(f"{teacher_out} has no trained teacher: nothing to report")
    if teacher is None:
        teacher_out = runs / "teacher"
        teacher = metrics_of(teacher_out) or fit(TrainConfig(
            model=cfg["teacher"], out=str(teacher_out), run=base_run, optim=teacher_optim,
            epochs=cfg["teacher_epochs"], crops=crops, pretrained=pretrained), progress)
    checkpoint = teacher["checkpoint"]

    def cache(views: int, seed: int, with_recipe: bool) -> str:
        path = runs / f"teacher-K{views}-{'fm' if with_recipe else 'cropflip'}-seed{seed}.h5"
        if not path.exists() and not args.report_only:
            print(f"== dump {path.name}", file=sys.stderr)
            dump(DumpConfig(teacher=cfg["teacher"], checkpoint=checkpoint, out=str(path), views=views, crops=crops,
                            recipe=recipe if with_recipe else Recipe(), run=run_of(seed)), progress)
        return str(path)

    def train(key: str, model: str, seed: int, with_recipe: bool, **mode) -> None:
        target = runs / key
        done = metrics_of(target)
        if done is None and args.report_only:
            return
        if done is None:
            print(f"== {key}", file=sys.stderr)
            done = fit(TrainConfig(model=model, out=str(target), run=run_of(seed), optim=optim, epochs=epochs,
                                   crops=crops, alpha=cfg["alpha"], temperature=cfg["temperature"],
                                   recipe=recipe if with_recipe else Recipe(),
                                   smoothing=cfg.get("smoothing", 0.0) if with_recipe else 0.0,
                                   pretrained=pretrained, **mode), progress)
        records[key] = done

    online = {"online_teacher": cfg["teacher"], "teacher_checkpoint": checkpoint}
    k = cfg["views"]
    modes = cfg.get("modes", MODES)
    unknown = set(modes) - set(MODES)
    if unknown:
        sys.exit(f"{args.config}: unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    for student in cfg["students"]:
        for mode in modes:
            for seed in cfg["seeds"]:
                key = f"{student}-{mode}-seed{seed}"
                if mode == "cached":
                    train(key, student, seed, False, cached=cache(k, seed, False))
                elif mode == "fm-plain":
                    train(key, student, seed, True)
                elif mode == "fm-cached":
                    train(key, student, seed, True, cached=cache(k, seed, True))
                else:
                    train(key, student, seed, True, **online)
    sweep = cfg.get("sweep_student")
    for seed in cfg["seeds"] if sweep else []:
        for kv in cfg["views_sweep"]:
            kk = epochs if kv == "epoch" else int(kv)
            key = f"{sweep}-fm-cached-seed{seed}" if kk == k else f"{sweep}-fm-cached-K{kk}-seed{seed}"
            train(key, sweep, seed, True, cached=cache(kk, seed, True))
    write_report(cfg, out, teacher, records)


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def _cell(s: dict) -> str:
    return f"{s['mean']:.2f} ± {s['sd']:.2f}"


def write_report(cfg: dict, out: Path, teacher: dict, records: dict) -> None:
    """report.md and results.json: per student and mode, top-1 / mAP / img/s over the seeds; the views sweep."""
    seeds = cfg["seeds"]
    table = {}
    for student in cfg["students"]:
        for mode in MODES:
            runs = [records[f"{student}-{mode}-seed{s}"] for s in seeds if f"{student}-{mode}-seed{s}" in records]
            if runs:
                table[f"{student} {mode}"] = {m: _stats([r[m] for r in runs]) for m in
                                              ("top1", "mAP", "images_per_second")} | {"runs": len(runs)}
    sweep = {}
    if cfg.get("sweep_student"):
        for kv in cfg["views_sweep"]:
            kk = cfg["epochs"] if kv == "epoch" else int(kv)
            tag = "" if kk == cfg["views"] else f"-K{kk}"
            runs = [records[key] for s in seeds if (key := f"{cfg['sweep_student']}-fm-cached{tag}-seed{s}") in records]
            if runs:
                sweep[f"K={kk}" + (" (one view per epoch)" if kv == "epoch" else "")] = {
                    m: _stats([r[m] for r in runs]) for m in ("top1", "mAP")} | {"runs": len(runs)}
    gaps = {}  # fm-cached minus fm-online, seed by seed (the same pixels and init, so paired)
    for student in cfg["students"]:
        keys = [(f"{student}-fm-cached-seed{s}", f"{student}-fm-online-seed{s}") for s in seeds]
        pairs = [(records[c], records[o]) for c, o in keys if c in records and o in records]
        if pairs:
            gaps[student] = {m: _stats([a[m] - b[m] for a, b in pairs]) for m in ("top1", "mAP")}
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": cfg, "teacher": {k: teacher.get(k) for k in ("model", "top1", "mAP")}, "table": table,
               "cached_minus_online": gaps, "views_sweep": sweep}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Function matching offline: {cfg['name']}", "",
             f"Data: {cfg['data'].get('description', '')}. Teacher {teacher.get('model')} (top-1 "
             f"{teacher.get('top1', float('nan')):.2f} %). {cfg['epochs']} epochs, K = {cfg['views']}, seeds "
             f"{seeds}; recipe {json.dumps(cfg['recipe'])}, smoothing {cfg.get('smoothing', 0.0)}.", "",
             "| student / mode | top-1 % | mAP % | img/s | seeds |", "|---|---|---|---|---|"]
    lines += [f"| {key} | {_cell(v['top1'])} | {_cell(v['mAP'])} | {v['images_per_second']['mean']:.0f} "
              f"| {v['runs']} |" for key, v in table.items()]
    if gaps:
        lines += ["", "fm-cached minus fm-online, paired by seed (same init, order and pixels):", "",
                  "| student | top-1 points | mAP points | per seed (top-1) |", "|---|---|---|---|"]
        lines += [f"| {st} | {_cell(g['top1'])} | {_cell(g['mAP'])} | "
                  f"{', '.join(f'{v:+.2f}' for v in g['top1']['values'])} |" for st, g in gaps.items()]
    if sweep:
        lines += ["", f"Views sweep ({cfg['sweep_student']}, fm-cached)", "", "| K | top-1 % | mAP % | seeds |",
                  "|---|---|---|---|"]
        lines += [f"| {key} | {_cell(v['top1'])} | {_cell(v['mAP'])} | {v['runs']} |" for key, v in sweep.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
