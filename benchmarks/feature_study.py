"""Feature distillation on top of a study (issue 12, part 5): does KD make students teacher-like, and does
feature KD add to logit KD?

    python benchmarks/feature_study.py benchmarks/study_cifar.json
    python benchmarks/feature_study.py benchmarks/study_imagenette.json

Run it after ``benchmarks/study.py`` on the same config: it reuses that study's
teacher, data subset and runs folder (runs that have a ``metrics.json`` are not
trained again), and adds, under the same schedule and seeds:

1. one cache per seed dumped with ``--features pooled,attention:S`` (S: the
   config's ``features.attention_size``, default 4), and the bytes each option
   adds (from ``kdcache inspect``);
2. for ``features.student`` (default the sweep student, PVT-v2) and each seed:
   logit KD alone and logit KD plus each feature loss, in cached mode, and one
   online run of ``features.online_loss`` (seed 0) for parity;
3. ``kdcache compare`` of every student family's plain and cached-KD run
   against the teacher, and of the feature-KD runs (seed 0).

Writes OUT/features.md and OUT/features.json (OUT: the study's results folder)
and one compare folder per comparison. ``--epochs``, ``--seeds``, ``--students``,
``--runs`` and ``--out`` shrink it to a smoke run (e.g. ``--epochs 2 --seeds 0
--students pvt_v2_b0 --runs /tmp/fs --out /tmp/fs/results``; with the
study's one warm-up epoch a 1-epoch run trains at a learning rate near 0, so its
variants all come out equal).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from kdcache.audit import inspect_cache
from kdcache.compare import compare
from kdcache.config import CompareConfig, CropRanges, DumpConfig, RunOptions
from kdcache.report import RichProgress
from kdcache.teacher import dump

sys.path.insert(0, str(Path(__file__).parent))
from study import metrics_of, optims, prepare_data, run_key, train_once  # noqa: E402

DEFAULTS = {"attention_size": 4, "losses": ["mse", "cosine", "attention"], "weight": 1.0, "online_loss": "mse",
            "compare_samples": 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "kdcache-data"))
    parser.add_argument("--epochs", type=int, default=None, help="override the study's student epochs")
    parser.add_argument("--seeds", type=int, nargs="*", default=None, help="override [0, *noise_seeds]")
    parser.add_argument("--students", nargs="*", default=None, help="override the families compared")
    parser.add_argument("--runs", default=None, help="runs folder (default: the study's)")
    parser.add_argument("--out", default=None, help="results folder (default: the study's)")
    parser.add_argument("--report-only", action="store_true", help="rewrite features.md from features.json")
    args = parser.parse_args()
    cfg = json.loads(Path(args.config).read_text())
    feat = {**DEFAULTS, "student": cfg["sweep_student"], **cfg.get("features", {})}
    name = cfg["name"]
    runs_dir = Path(args.runs or cfg.get("runs", f"runs/study-{name}"))
    out = Path(args.out or cfg.get("out", f"benchmarks/results/study-{name}"))
    if args.report_only:
        result = json.loads((out / "features.json").read_text())
        (out / "features.md").write_text(report(result, result["records"], result["student"], result["seeds"],
                                                result["features"]))
        return
    epochs = args.epochs or cfg["epochs"]
    seeds = args.seeds if args.seeds is not None else [0, *cfg["noise_seeds"]]
    students = args.students or cfg["students"]
    optim, _ = optims(cfg)
    data = prepare_data(cfg["data"], Path(args.cache_dir))
    progress = RichProgress()
    crops = CropRanges(scale=tuple(cfg["crop_scale"]), hflip=cfg.get("hflip", 0.5))
    hardware = {k: cfg[k] for k in ("workers", "device", "amp") if k in cfg}
    base_run = RunOptions(data=data, img_size=cfg["img_size"], batch_size=cfg["batch_size"], seed=0, **hardware)
    teacher = metrics_of(runs_dir / "teacher")
    if teacher is None:
        sys.exit(f"{runs_dir / 'teacher'} has no trained teacher: run benchmarks/study.py {args.config} first")
    teacher_ckpt = teacher["checkpoint"]
    records: dict[str, dict] = {}

    def train(key: str, model: str, seed: int = 0, **mode) -> dict:
        records[key] = train_once(runs_dir, key, progress, base_run, seed, model=model, optim=optim, epochs=epochs,
                                  crops=crops, alpha=cfg["alpha"], temperature=cfg["temperature"], **mode)
        return records[key]

    def cache(seed: int, features: str = "") -> Path:
        tag = "-features" if features else ""
        path = runs_dir / f"teacher-K{cfg['views']}-fp16{tag}{'' if seed == 0 else f'-seed{seed}'}.h5"
        if not path.exists():
            print(f"== dump {path.name}", file=sys.stderr)
            dump(DumpConfig(teacher=cfg["teacher"], checkpoint=teacher_ckpt, out=str(path), views=cfg["views"],
                            crops=crops, features=features, run=RunOptions(**{**base_run.__dict__, "seed": seed})),
                 progress)
        return path

    spec = f"pooled,attention:{feat['attention_size']}"
    s = feat["student"]
    for seed in seeds:
        features_cache = str(cache(seed, spec))
        train(run_key(s, "cached", seed), s, seed=seed, cached=str(cache(seed)))  # logit KD alone
        for loss in feat["losses"]:
            train(run_key(s, "cached", seed, f"feat-{loss}"), s, seed=seed, cached=features_cache, feature_loss=loss,
                  feature_weight=feat["weight"])
    online_loss = feat["online_loss"]
    size = feat["attention_size"] if online_loss == "attention" else None
    train(run_key(s, "online", 0, f"feat-{online_loss}"), s, online_teacher=cfg["teacher"],
          teacher_checkpoint=teacher_ckpt, feature_loss=online_loss, feature_weight=feat["weight"],
          attention_size=size)
    for student in students:
        train(run_key(student, "plain"), student)
        train(run_key(student, "cached"), student, cached=str(cache(0)))

    def compared(folder: str, keys: list[str]) -> dict:
        config = CompareConfig(teacher=cfg["teacher"], runs=tuple(str(runs_dir / k) for k in keys),
                               out=str(out / folder), teacher_checkpoint=teacher_ckpt,
                               samples=feat["compare_samples"],
                               run=RunOptions(**{**base_run.__dict__, "workers": 0}))
        return compare(config, progress)

    families = compared("compare-families", [run_key(x, m) for x in students for m in ("plain", "cached")])
    feature_runs = compared("compare-features", [run_key(s, "cached")] +
                            [run_key(s, "cached", 0, f"feat-{loss}") for loss in feat["losses"]] +
                            [run_key(s, "online", 0, f"feat-{online_loss}")])
    plain_cache, features_cache = inspect_cache(str(cache(0))), inspect_cache(str(cache(0, spec)))
    sizes = {"logits_only_bytes": plain_cache["file_bytes"], "with_features_bytes": features_cache["file_bytes"],
             "feature_bytes": features_cache["feature_bytes"]}
    result = {"config": args.config, "epochs": epochs, "seeds": seeds, "student": s, "features": feat,
              "records": records, "families": families, "feature_runs": feature_runs, "cache_sizes": sizes}
    out.mkdir(parents=True, exist_ok=True)
    (out / "features.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "features.md").write_text(report(result, records, s, seeds, feat))
    print(f"wrote {out / 'features.md'}", file=sys.stderr)


def _mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}" if values else "–"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def report(result: dict, records: dict, s: str, seeds: list[int], feat: dict) -> str:
    """features.md: top-1 per variant over seeds, similarity per family and per feature loss, cache sizes."""
    lines = [f"# Feature distillation: {s}, {result['epochs']} epoch(s), seeds {seeds}", "",
             "| variant | top-1 % (mean ± sd over seeds) | mAP % | per seed (top-1) |", "|---|---:|---:|---|"]
    variants = [("logit KD (cached)", "")] + [(f"logit + {loss} (cached)", f"feat-{loss}") for loss in feat["losses"]]
    for label, tag in variants:
        runs = [records[run_key(s, "cached", seed, tag)] for seed in seeds]
        per_seed = ", ".join(f"{r['top1']:.2f}" for r in runs)
        lines.append(f"| {label} | {_mean_sd([r['top1'] for r in runs])} | {_mean_sd([r['mAP'] for r in runs])} | "
                     f"{per_seed} |")
    loss = feat["online_loss"]
    online, cached = records[run_key(s, "online", 0, f"feat-{loss}")], records[run_key(s, "cached", 0, f"feat-{loss}")]
    lines += [f"| logit + {loss} (online, seed 0) | {online['top1']:.2f} | {online['mAP']:.2f} | "
              f"cached seed 0: {cached['top1']:.2f} |", ""]
    for title, comparison in (("Every family: plain vs cached logit KD", result["families"]),
                              (f"{s}: logit KD vs feature KD (seed 0)", result["feature_runs"])):
        lines += [f"## {title} against {comparison['teacher']} ({comparison['images']} test images)", "",
                  "| run | top-1 % | agreement % | KL(t‖s) | CKA final | cosine (projected) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for x in comparison["students"]:
            cos = "–" if x["cosine"] is None else f"{x['cosine']:.3f}"
            lines.append(f"| {x['name']} | {x['top1']:.2f} | {x['agreement']:.2f} | {x['kl_teacher_student']:.3f} | "
                         f"{x['cka_final']:.3f} | {cos} |")
        lines.append("")
    sizes = result["cache_sizes"]
    lines += ["## Cache size", "", f"Logits only: {sizes['logits_only_bytes']:,} bytes; with "
              f"pooled,attention:{feat['attention_size']}: {sizes['with_features_bytes']:,} bytes.", ""]
    lines += [f"- {spec}: {n:,} bytes" for spec, n in sizes["feature_bytes"].items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
