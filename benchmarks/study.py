"""The paper's ten-run protocol on real data, cached-vs-online parity, views and compression sweeps.

    python benchmarks/study.py benchmarks/study_cifar.json
    python benchmarks/study.py benchmarks/study_imagenette.json

One JSON config describes a whole study (see the two shipped configs). The
script prepares the data (extracts ../shared/data archives to a cache folder
and links a class-balanced subset), trains the teacher, dumps the cache once,
then trains every student plain and with cached KD under the same seeds and
schedule, and runs the parity, noise, views and compression experiments. Each
run's ``metrics.json`` is its record: a run that has one is skipped, so an
interrupted study resumes where it stopped.

Writes OUT/report.md, OUT/results.json and PNG plots (OUT is the config's
"out", default benchmarks/results/study-NAME).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tarfile
import time
from pathlib import Path

from kdcache.config import CropRanges, DumpConfig, OptimOptions, RunOptions, TrainConfig
from kdcache.data import open_dataset
from kdcache.errors import KdcacheError
from kdcache.report import RichProgress
from kdcache.teacher import dump
from kdcache.train import fit

sys.path.insert(0, str(Path(__file__).parent))
from make_subset import link_split
from throughput import flops_per_image


def prepare_data(cfg: dict, cache_dir: Path) -> str:
    """The dataset folder: the config's "path" as is, or its "archive" extracted once
    with the class-balanced subset the config asks for linked beside it."""
    if "path" in cfg:
        return str(Path(cfg["path"]).expanduser())
    archive = Path(cfg["archive"]).expanduser()
    if not archive.is_absolute():
        archive = (Path(__file__).resolve().parents[1] / archive).resolve()
    root = cache_dir / cfg["extracted"]
    if not root.exists():
        print(f"extracting {archive} to {cache_dir} ...", file=sys.stderr)
        with tarfile.open(archive) as tar:
            tar.extractall(cache_dir, filter="data")
    subset = cache_dir / f"{cfg['extracted']}-{cfg['train_per_class']}-{cfg.get('test_per_class') or 'all'}"
    if not (subset / "test").exists():
        test_name = "test" if (root / "test").is_dir() else "val"
        link_split(root / "train", subset / "train", cfg["train_per_class"])
        link_split(root / test_name, subset / "test", cfg.get("test_per_class"))
    return str(subset)


def metrics_of(out: Path) -> dict | None:
    path = out / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def train_once(runs_dir: Path, key: str, progress: RichProgress, base_run: RunOptions, seed: int = 0,
               **config) -> dict:
    """Run `key`'s metrics: read from ``runs_dir/key/metrics.json`` when it has one (a resumed study), else trained
    now with ``TrainConfig(**config)`` on `base_run` with `seed`."""
    target = runs_dir / key
    done = metrics_of(target)
    if done is None:
        print(f"== {key}", file=sys.stderr)
        done = fit(TrainConfig(out=str(target), run=RunOptions(**{**base_run.__dict__, "seed": seed}), **config),
                   progress)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "kdcache-data"))
    parser.add_argument("--only", choices=["table", "parity", "noise", "views", "stores"], nargs="*",
                        help="run only these parts (default: all)")
    args = parser.parse_args()
    try:
        cfg = json.loads(Path(args.config).read_text())
    except (OSError, json.JSONDecodeError) as e:
        parser.error(f"cannot read the config {args.config}: {e}")
    cfg["config_path"] = args.config
    name = cfg["name"]
    out = Path(cfg.get("out", f"benchmarks/results/study-{name}"))
    runs_dir = Path(cfg.get("runs", f"runs/study-{name}"))
    parts = set(args.only or ["table", "parity", "noise", "views", "stores"])
    try:
        optim, teacher_optim = optims(cfg)
    except TypeError as e:  # a key OptimOptions does not have
        parser.error(f"{args.config}: \"optim\" or \"teacher_optim\": {e}")
    data = prepare_data(cfg["data"], Path(args.cache_dir))
    progress = RichProgress()
    crops = CropRanges(scale=tuple(cfg["crop_scale"]), hflip=cfg.get("hflip", 0.5))
    # A CPU study keeps the library defaults; a GPU one (study_stanford40.json) sets these.
    hardware = {k: cfg[k] for k in ("workers", "device", "amp") if k in cfg}
    base_run = RunOptions(data=data, img_size=cfg["img_size"], batch_size=cfg["batch_size"], seed=0, **hardware)
    pretrained = bool(cfg.get("pretrained", False))
    records: dict[str, dict] = {}

    def train(key: str, model: str, seed: int = 0, **mode) -> dict:
        records[key] = train_once(runs_dir, key, progress, base_run, seed, model=model, optim=optim,
                                  epochs=cfg["epochs"], crops=crops, alpha=cfg["alpha"], temperature=cfg["temperature"],
                                  pretrained=pretrained, **mode)
        return records[key]

    def cache(views: int, store: str = "fp16", seed: int = 0) -> str:
        path = cache_path(runs_dir, views, store, seed)
        if not path.exists():
            print(f"== dump K={views} {store} seed {seed}", file=sys.stderr)
            result = dump(DumpConfig(teacher=cfg["teacher"], checkpoint=str(teacher_ckpt), out=str(path),
                                     views=views, store=store, crops=crops,
                                     run=RunOptions(**{**base_run.__dict__, "seed": seed})), progress)
            (path.with_suffix(".dump.json")).write_text(json.dumps(result, indent=2) + "\n")
        return str(path)

    # The teacher, trained once (plain), then the study's main cache.
    teacher_out = runs_dir / "teacher"
    teacher = metrics_of(teacher_out)
    if teacher is None:
        print("== teacher", file=sys.stderr)
        teacher = fit(TrainConfig(model=cfg["teacher"], out=str(teacher_out), run=base_run, optim=teacher_optim,
                                  epochs=cfg["teacher_epochs"], crops=crops, pretrained=pretrained), progress)
    teacher_ckpt = teacher["checkpoint"]
    views = cfg["views"]
    main_cache = cache(views)
    online = {"online_teacher": cfg["teacher"], "teacher_checkpoint": teacher_ckpt}

    if "table" in parts:
        for s in cfg["students"]:
            train(f"{s}-plain", s)
            train(f"{s}-cached", s, cached=main_cache)
    if "parity" in parts:
        for s in cfg["parity_students"]:
            train(f"{s}-cached", s, cached=main_cache)
            train(f"{s}-online", s, **online)
    if "noise" in parts:
        s = cfg["noise_student"]
        for seed in [0, *cfg["noise_seeds"]]:
            train(run_key(s, "plain", seed), s, seed=seed)
            # A seed is the whole run's: the dump's crops as well as the student's
            # init and batch order, so cached and online KD see the same crops.
            train(run_key(s, "cached", seed), s, seed=seed, cached=cache(views, seed=seed))
            train(run_key(s, "online", seed), s, seed=seed, **online)
    if "views" in parts:
        s = cfg["sweep_student"]
        for seed in [0, *cfg.get("sweep_seeds", [])]:
            for k in cfg["views_sweep"]:
                train(sweep_key(s, k, seed, views), s, seed=seed, cached=cache(k, seed=seed))
            train(run_key(s, "online", seed), s, seed=seed, **online)
    if "stores" in parts:
        s = cfg["sweep_student"]
        for store in cfg["stores"]:
            train(store_key(s, store), s, cached=cache(views, store))

    classes = open_dataset(data, "train").num_classes
    write_report(cfg, out, teacher, records, runs_dir, classes)


def optims(cfg: dict) -> tuple[OptimOptions, OptimOptions]:
    """The students' optimizer and schedule ("optim") and the teacher's: "optim" with the
    fields of the optional "teacher_optim" replaced. The paper decays the teacher's rate
    tenfold every 10 of its 50 epochs but the students' by 0.3 every 5 of 15."""
    return OptimOptions(**cfg["optim"]), OptimOptions(**{**cfg["optim"], **cfg.get("teacher_optim", {})})


def _seed_tag(seed: int) -> str:
    return "" if seed == 0 else f"-seed{seed}"


def run_key(student: str, mode: str, seed: int = 0, tag: str = "") -> str:
    """A run's folder under the runs folder, and its key in the report: STUDENT-MODE[-TAG][-seedN]."""
    return f"{student}-{mode}{f'-{tag}' if tag else ''}{_seed_tag(seed)}"


def sweep_key(student: str, k: int, seed: int, views: int) -> str:
    """The run of the views sweep with K = k and `seed`; at the study's own K it is the
    Table I run (seed 0) or the noise run (other seeds), so those are not trained twice."""
    return run_key(student, "cached", seed, "" if k == views else f"K{k}")


def store_key(student: str, store: str) -> str:
    """The cached run of the compression sweep from a `store` cache (fp16: the Table I run)."""
    return run_key(student, "cached", tag="" if store == "fp16" else store.replace(":", ""))


def cache_path(runs_dir: Path, views: int, store: str = "fp16", seed: int = 0) -> Path:
    """The study's cache of K = `views`, `store` and dump `seed`."""
    return runs_dir / f"teacher-K{views}-{store.replace(':', '')}{_seed_tag(seed)}.h5"


def _flops(name: str, classes: int, size: int) -> tuple[float, float]:
    try:
        return flops_per_image(name, classes, size)
    except Exception:  # noqa: BLE001 - a model the FLOP counter cannot trace: leave it blank
        return float("nan"), float("nan")


def _teacher_optim_note(cfg: dict) -> str:
    """What the teacher's optimizer changes from the students', for the report ("" when nothing)."""
    changed = cfg.get("teacher_optim", {})
    return f"; optimizer {cfg['optim']} with {changed}" if changed else ""


def write_report(cfg: dict, out: Path, teacher: dict, records: dict, runs_dir: Path, classes: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Study: {cfg['name']}", "",
             f"Command: `python benchmarks/study.py {cfg['config_path']}`", "",
             (f"Data: {cfg['data']['description']}; {cfg['img_size']} px; {cfg['epochs']} student epochs; "
             f"K = {cfg['views']} cached views; optimizer {cfg['optim']}; alpha {cfg['alpha']}, T {cfg['temperature']}; "
             f"crop scale {cfg['crop_scale']}."), "",
             (f"Teacher {cfg['teacher']}: top-1 {teacher['top1']:.2f} %, mAP {teacher['mAP']:.2f} % "
             f"({cfg['teacher_epochs']} epochs{_teacher_optim_note(cfg)})."), ""]
    for note in cfg.get("notes", []):
        lines += [note, ""]
    table = []
    if all(f"{s}-plain" in records and f"{s}-cached" in records for s in cfg["students"]):
        lines += ["## Table I: plain vs cached KD", "",
                  "| network | params (M) | GFLOPs | top-1 plain | top-1 KD | gain | mAP plain | mAP KD | gain |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in cfg["students"]:
            p, k = records[f"{s}-plain"], records[f"{s}-cached"]
            params, gflops = _flops(s, classes, cfg["img_size"])
            table.append({"network": s, "params_m": params, "gflops": gflops, "plain": p, "kd": k})
            lines.append(f"| {s} | {params:.1f} | {gflops:.3f} | {p['top1']:.2f} | {k['top1']:.2f} | "
                         f"{k['top1'] - p['top1']:+.2f} | {p['mAP']:.2f} | {k['mAP']:.2f} | {k['mAP'] - p['mAP']:+.2f} |")
    s = cfg["noise_student"]
    seeds = [0, *cfg["noise_seeds"]]
    noise = {}
    noise_lines = []
    keys = {(m, sd): run_key(s, m, sd) for m in ("plain", "cached", "online") for sd in seeds}
    if all(k in records for k in keys.values()):
        noise_lines += ["", f"## Run-to-run noise ({s}, seeds {seeds})", "",
                        ("A seed sets the crops (the cached runs read a cache dumped with that seed), the student's "
                        "initialisation and the batch order; cached and online KD of one seed see the same crops."), "",
                        "| mode | top-1 per seed | mean | std | mAP per seed | mean | std |",
                        "|---|---|---:|---:|---|---:|---:|"]
        for m in ("plain", "cached", "online"):
            rs = [records[keys[m, sd]] for sd in seeds]
            t1, ap = [r["top1"] for r in rs], [r["mAP"] for r in rs]
            noise[m] = {"top1": t1, "mAP": ap}
            noise_lines.append(f"| {m} | {', '.join(f'{v:.2f}' for v in t1)} | {statistics.mean(t1):.2f} | "
                               f"{statistics.stdev(t1):.2f} | {', '.join(f'{v:.2f}' for v in ap)} | "
                               f"{statistics.mean(ap):.2f} | {statistics.stdev(ap):.2f} |")
        diffs = {metric: [records[keys["cached", sd]][metric] - records[keys["online", sd]][metric] for sd in seeds]
                 for metric in ("top1", "mAP")}
        noise["cached_minus_online"] = diffs
        def listed(values: list[float]) -> str:
            return f"{', '.join(f'{v:+.2f}' for v in values)} (mean {statistics.mean(values):+.2f})"

        def gain(mode: str) -> float:
            return statistics.mean(noise[mode]["top1"]) - statistics.mean(noise["plain"]["top1"])

        noise_lines += ["", (f"Cached minus online, seed by seed: top-1 {listed(diffs['top1'])}; "
                             f"mAP {listed(diffs['mAP'])}. KD over plain, mean over seeds: "
                             f"cached {gain('cached'):+.2f} top-1, online {gain('online'):+.2f}.")]
    parity = [s for s in cfg["parity_students"] if f"{s}-online" in records]
    if parity:
        lines += ["", "## Parity: cached vs online KD (same seeds, crops and batches)", "",
                  "| student | top-1 cached | top-1 online | diff | mAP cached | mAP online | diff | img/s cached | img/s online |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in parity:
            c, o = records[f"{s}-cached"], records[f"{s}-online"]
            lines.append(f"| {s} | {c['top1']:.2f} | {o['top1']:.2f} | {c['top1'] - o['top1']:+.2f} | {c['mAP']:.2f} | "
                         f"{o['mAP']:.2f} | {c['mAP'] - o['mAP']:+.2f} | {c['images_per_second']:.0f} | "
                         f"{o['images_per_second']:.0f} |")
        if noise:
            # The yardstick: how far two runs that differ only in the seed land apart.
            spread = max(statistics.stdev(noise[m]["top1"]) for m in ("plain", "cached", "online"))
            gaps = [abs(records[f"{p}-cached"]["top1"] - records[f"{p}-online"]["top1"]) for p in parity]
            verdict = "within" if max(gaps) <= 2 * spread else "outside"
            lines += ["", (f"Largest cached-online top-1 gap: {max(gaps):.2f} points; largest seed-to-seed std of top-1 "
                      f"(next section): {spread:.2f} points. The gap is {verdict} two standard deviations of the "
                      "run-to-run noise.")]
    lines += noise_lines
    s = cfg["sweep_student"]
    sweep = []
    sweep_seeds = [0, *cfg.get("sweep_seeds", [])]

    def over_seeds(keys: list[str]) -> dict:
        rs = [records[k] for k in keys if k in records]
        t1, ap = [r["top1"] for r in rs], [r["mAP"] for r in rs]
        return {"runs": len(rs), "top1_per_seed": t1, "mAP_per_seed": ap, "top1": statistics.mean(t1),
                "mAP": statistics.mean(ap), "top1_std": statistics.stdev(t1) if len(t1) > 1 else float("nan")}

    def sweep_row(label: str, r: dict, size: str) -> str:
        std = "" if r["runs"] < 2 else f"{r['top1_std']:.2f}"
        return (f"| {label} | {', '.join(f'{v:.2f}' for v in r['top1_per_seed'])} | {r['top1']:.2f} | {std} | "
                f"{r['mAP']:.2f} | {size} |")

    for k in cfg["views_sweep"]:
        keys = [sweep_key(s, k, sd, cfg["views"]) for sd in sweep_seeds]
        if any(key in records for key in keys):
            path = cache_path(runs_dir, k)
            sweep.append({"views": k, **over_seeds(keys),
                          "file_mib": path.stat().st_size / 2**20 if path.exists() else float("nan")})
    online_keys = [run_key(s, "online", sd) for sd in sweep_seeds]
    sweep_online = over_seeds(online_keys) if any(k in records for k in online_keys) else None
    if sweep:
        lines += ["", (f"## How many cached views? ({s}, {cfg['epochs']} epochs; epoch e uses view e mod K; "
                  f"seeds {sweep_seeds})"), "",
                  "Each seed's runs read caches dumped with that seed.", "",
                  "| K | top-1 per seed | mean | std | mAP mean | cache size (fp16) |", "|---:|---|---:|---:|---:|---:|"]
        lines += [sweep_row(str(r["views"]), r, f"{r['file_mib']:.2f} MiB") for r in sweep]
        if sweep_online:
            lines.append(sweep_row("online (fresh crops every epoch)", sweep_online, "none"))
    stores = []
    for store in ["fp16", *cfg["stores"]]:
        key, path = store_key(s, store), cache_path(runs_dir, cfg["views"], store)
        if key in records and path.exists():
            stores.append({"store": store, "top1": records[key]["top1"], "mAP": records[key]["mAP"],
                           "file_mib": path.stat().st_size / 2**20})
    if stores:
        lines += ["", f"## Compression ({s}, K = {cfg['views']})", "", "| store | top-1 | mAP | cache size |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {r['store']} | {r['top1']:.2f} | {r['mAP']:.2f} | {r['file_mib']:.2f} MiB |" for r in stores]
    lines += ["", "## Every run", "", "Each run's `metrics.json` is copied to `records/KEY.json` beside this report.", "",
              "| run | mode | top-1 | mAP | train img/s | wall s |", "|---|---|---:|---:|---:|---:|"]
    runs_out = out / "records"
    runs_out.mkdir(exist_ok=True)
    for key, r in [("teacher", teacher), *sorted(records.items())]:
        (runs_out / f"{key}.json").write_text(json.dumps(r, indent=2) + "\n")
        lines.append(f"| {key} | {r['mode']} | {r['top1']:.2f} | {r['mAP']:.2f} | {r['images_per_second']:.0f} | "
                     f"{r['wall_seconds']:.0f} |")
    dumps = sorted(runs_dir.glob("teacher-*.dump.json"))
    if dumps:
        lines += ["", "## Dumps (the teacher's only forward passes in cached mode)", "",
                  "| cache | records this run | s | records/s | teacher top-1 over views | file |",
                  "|---|---:|---:|---:|---:|---:|"]
        for path in dumps:
            d = json.loads(path.read_text())
            lines.append(f"| {path.name.removesuffix('.dump.json')} | {d['records_dumped']:,} | {d['seconds']:.1f} | "
                         f"{d['records_per_second']:.0f} | {d['teacher_view_top1']:.2f} | "
                         f"{d['file_bytes'] / 2**20:.2f} MiB |")
    missing = [name for name, done in (("Table I", bool(table)), ("parity", bool(parity)), ("noise", bool(noise)),
                                       ("views sweep", len(sweep) == len(cfg["views_sweep"])
                                        and all(r["runs"] == len(sweep_seeds) for r in sweep)),
                                       ("compression", len(stores) == 1 + len(cfg["stores"]))) if not done]
    if missing:
        lines[1:1] = ["", f"**Partial.** Not run yet: {', '.join(missing)}."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    results = {"config": cfg, "teacher": teacher, "table": table, "noise": noise, "views_sweep": sweep,
               "views_sweep_online": sweep_online, "stores": stores, "runs": records}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(cfg, out, table, sweep, records, sweep_online)
    print((out / "report.md").read_text())


def plot(cfg: dict, out: Path, table: list, sweep: list, records: dict, online: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if table:
        fig, ax = plt.subplots(figsize=(7, 3.4), dpi=120)
        xs = range(len(table))
        bars = [("plain", "plain", "#888888"), ("cached", "cached KD", "#2a7ab9"), ("online", "online KD", "#d9822b")]
        width = 0.27
        for i, (mode, label, color) in enumerate(bars):
            points = [(x, records[f"{r['network']}-{mode}"]["top1"]) for x, r in zip(xs, table)
                      if f"{r['network']}-{mode}" in records]
            if points:
                ax.bar([x + (i - 1) * width for x, _ in points], [v for _, v in points], width, label=label, color=color)
        ax.set_xticks(list(xs), [r["network"] for r in table], rotation=15, fontsize=8)
        ax.set_ylabel("top-1 %")
        ax.set_title(f"{cfg['name']}: plain vs KD (online KD for the parity students)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "accuracy_per_student.png")
    if sweep:
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
        ax.errorbar([r["views"] for r in sweep], [r["top1"] for r in sweep],
                    yerr=[0 if r["runs"] < 2 else r["top1_std"] for r in sweep], fmt="o-", capsize=3,
                    label="cached KD (mean ± std over seeds)" if cfg.get("sweep_seeds") else "cached KD")
        if online:
            ax.axhline(online["top1"], color="#d9822b", ls="--", label="online KD")
            if online["runs"] > 1:
                ax.axhspan(online["top1"] - online["top1_std"], online["top1"] + online["top1_std"],
                           color="#d9822b", alpha=0.15, label="online KD ± 1 std over seeds")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cached views per image (K)")
        ax.set_ylabel("top-1 %")
        ax.set_title(f"{cfg['sweep_student']}, {cfg['epochs']} epochs")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_views.png")


if __name__ == "__main__":
    t0 = time.time()
    try:
        main()
    except KdcacheError as exc:  # bad data, cache or checkpoint: the message names it
        sys.exit(f"study: {exc}")
    print(f"study took {time.time() - t0:.0f} s", file=sys.stderr)
