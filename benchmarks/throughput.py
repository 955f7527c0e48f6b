"""Training throughput of plain, cached and online KD, dump overhead, and the ten-run study's cost.

    python benchmarks/throughput.py --data DATA [--teacher convnext_nano] [--student pvt_v2_b0]
        [--img-size 32] [--batch-size 128] [--views 10] [--out benchmarks/results/throughput] [--dump-only]

What it measures, all on the same crops and batch order:

1. Student training images/s (data loading, target reading, forward, backward,
   optimizer step) in the three modes, over `--repeats` windows of
   `--window` steps after `--warmup` steps, in `--rounds` passes over the
   modes in alternating order; median, min and max of all windows.
2. ``dump-teacher`` records/s against bare teacher inference on the same
   batches of crops already in memory, so the dump's own overhead shows.
3. Parameters and forward FLOPs per image (torch.utils.flop_counter) of the
   teacher and the student.
4. The ten-run study (5 students x plain/KD): teacher forward passes and wall
   time for online KD against one dump plus cached KD, from the measured
   per-image costs of every student in --study-students, and a FLOPs-based
   projection for the paper's setting (Stanford 40, 224 px, ConvNeXt-S, 15
   epochs).

Without --teacher-checkpoint the teacher has random weights: throughput does
not depend on the weights. Results go to OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from kdcache.augment import Preprocess
from kdcache.config import CropRanges, DumpConfig, OptimOptions, Recipe, RunOptions, TrainConfig, default_workers
from kdcache.data import open_dataset
from kdcache.devices import resolve_device
from kdcache.loaders import DumpViews, dump_loader
from kdcache.models import create_model, save_checkpoint
from kdcache.teacher import dump, load_teacher, teacher_logits
from kdcache.train import prepare

# The paper's five student families, in small variants that accept a 32 px input.
STUDY_STUDENTS = ["pvt_v2_b0", "swinv2_cr_tiny_ns_224", "twins_svt_small", "mvitv2_tiny", "convit_tiny"]
# The paper's setting, for the FLOPs projection.
PAPER = {"teacher": "convnext_small", "students": ["swinv2_cr_tiny_ns_224", "twins_svt_small", "mvitv2_tiny",
                                                    "convit_small", "pvt_v2_b2_li"],
         "images": 4000, "epochs": 15, "views": 15, "img_size": 224, "classes": 40}


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import h5py
    import timm

    return {"cpu": cpu, "cores": torch.get_num_threads(), "gpu": torch.cuda.get_device_name(0)
            if torch.cuda.is_available() else None, "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "h5py": h5py.__version__, "numpy": np.__version__,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def flops_per_image(name: str, num_classes: int, img_size: int) -> tuple[float, float]:
    """(parameters in millions, forward GFLOPs per image) from torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    model = create_model(name, num_classes, img_size).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, img_size, img_size))
    return sum(p.numel() for p in model.parameters()) / 1e6, counter.get_total_flops() / 1e9


def spread(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "runs": rates}


def train_rate(config: TrainConfig, warmup: int, window: int, repeats: int) -> dict:
    """Images/s of the training loop over `repeats` windows of `window` steps after `warmup` steps."""
    run = prepare(config)
    loader = run.loader(0)
    steps = warmup + window * repeats
    if len(loader) < steps:
        raise SystemExit(f"{len(run.train)} training images give {len(loader)} batches; need {steps} "
                         "(lower --window/--repeats or --batch-size)")
    stamps: list[float] = []
    batch = config.run.batch_size
    run.train_epoch(0, islice(iter(loader), steps), on_step=lambda _: stamps.append(time.perf_counter()))
    rates = []
    for i in range(repeats):
        start, end = warmup - 1 + i * window, warmup - 1 + (i + 1) * window
        rates.append(window * batch / (stamps[end] - stamps[start]))
    return spread(rates)


def bare_inference_rate(teacher: str, checkpoint: str, data: str, img_size: int, views: int, batch: int,
                        seed: int, ranges: CropRanges, batches: int, repeats: int, device: torch.device) -> dict:
    """Teacher records/s on batches of crops that are already decoded, cropped and in memory."""
    train = open_dataset(data, "train")
    model = load_teacher(teacher, train.num_classes, img_size, device, checkpoint)
    prep = Preprocess.for_model(model, img_size)
    loader = dump_loader(DumpViews(train, seed, ranges, views, prep), np.arange(len(train)),
                         max(1, batch // views), 0, device)
    inputs = [b["images"].flatten(0, 1) for b in islice(iter(loader), batches)]
    teacher_logits(model, inputs[0], prep, device)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for x in inputs:
            teacher_logits(model, x, prep, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(sum(len(x) for x in inputs) / (time.perf_counter() - start))
    return spread(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--teacher", default="convnext_nano")
    parser.add_argument("--teacher-checkpoint", default=None)
    parser.add_argument("--student", default="pvt_v2_b0")
    parser.add_argument("--study-students", default=",".join(STUDY_STUDENTS),
                        help="comma-separated students for the ten-run cost table ('' to skip)")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--views", type=int, default=10, help="views of the benchmark's cache")
    parser.add_argument("--epochs", type=int, default=15, help="student epochs in the ten-run cost table")
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--dump-batch-size", type=int, default=256, help="crops per teacher forward pass")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=4, help="timed windows per mode and round")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the three modes, in alternating order")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-paper-flops", action="store_true")
    parser.add_argument("--dump-only", action="store_true",
                        help="measure only the dump against bare inference; print JSON, write no result files")
    parser.add_argument("--out", default="benchmarks/results/throughput")
    parser.add_argument("--recipe", default="",
                        help="a recipe as JSON of kdcache.config.Recipe's fields, e.g. "
                             "'{\"mixup\": 0.8, \"cutmix\": 1.0, \"aa\": \"rand-m9-mstd0.5-inc1\", \"reprob\": 0.25}': "
                             "every mode (dump, plain, cached, online) runs with it; give another --out")
    args = parser.parse_args()
    recipe = Recipe.from_json(args.recipe)

    device = resolve_device(args.device)
    train = open_dataset(args.data, "train")
    crops = CropRanges(scale=(0.35, 1.0))
    run = RunOptions(data=args.data, img_size=args.img_size, batch_size=args.batch_size, workers=args.workers,
                     device=str(device), amp=device.type == "cuda", seed=0)
    optim = OptimOptions(opt="adamw", lr=1e-3, weight_decay=0.05, sched="cosine")
    tmp = Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    checkpoint = args.teacher_checkpoint
    if checkpoint is None:
        torch.manual_seed(0)
        checkpoint = str(tmp / "teacher.pt")
        save_checkpoint(create_model(args.teacher, train.num_classes, args.img_size), checkpoint, {})

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # The dump (timed; its cache is the one the students read), then bare inference on the same crops.
    log("dump ...")
    cache = str(tmp / "cache.h5")
    dumped = dump(DumpConfig(teacher=args.teacher, checkpoint=checkpoint, crops=crops, recipe=recipe, force=True,
                             out=cache,
                             views=args.views, run=RunOptions(**{**run.__dict__, "batch_size": args.dump_batch_size})))
    bare = bare_inference_rate(args.teacher, checkpoint, args.data, args.img_size, args.views, args.dump_batch_size, 0, crops,
                               batches=16, repeats=args.repeats, device=device)
    if args.dump_only:
        print(json.dumps({"dump_records_per_second": dumped["records_per_second"],
                          "bare_inference_records_per_second": bare,
                          "dump_over_bare_inference": dumped["records_per_second"] / bare["median"]}))
        shutil.rmtree(tmp, ignore_errors=True)
        return

    def config(student: str, **mode) -> TrainConfig:
        return TrainConfig(model=student, out=str(tmp / "unused"), run=run, optim=optim, epochs=args.epochs,
                           crops=crops, recipe=recipe, **mode)

    modes = {"plain": {}, "cached": {"cached": cache},
             "online": {"online_teacher": args.teacher, "teacher_checkpoint": checkpoint}}
    # Rounds alternate the order of the modes, so a slow spell of a shared machine hits every mode.
    pooled: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_ in range(args.rounds):
        for mode in (list(modes) if round_ % 2 == 0 else list(modes)[::-1]):
            log(f"train {args.student} {mode} (round {round_ + 1}) ...")
            pooled[mode] += train_rate(config(args.student, **modes[mode]), args.warmup, args.window,
                                       args.repeats)["runs"]
    rates = {mode: spread(values) for mode, values in pooled.items()}
    t_params, t_gflops = flops_per_image(args.teacher, train.num_classes, args.img_size)
    s_params, s_gflops = flops_per_image(args.student, train.num_classes, args.img_size)

    # Ten runs: per-image seconds of each student (plain and cached measured), teacher forward from bare inference.
    study = []
    names = [s for s in args.study_students.split(",") if s]
    teacher_s = 1.0 / bare["median"]
    for student in names:
        log(f"study cost: {student} ...")
        plain = rates["plain"] if student == args.student else train_rate(config(student), 2, 4, 3)
        cached = rates["cached"] if student == args.student else train_rate(config(student, cached=cache), 2, 4, 3)
        study.append({"student": student, "plain_img_s": plain["median"], "cached_img_s": cached["median"]})
    n, e, k = len(train), args.epochs, args.views
    cost = None
    if study:
        plain_s = sum(n * e / r["plain_img_s"] for r in study)
        cached_s = sum(n * e / r["cached_img_s"] for r in study)
        online_s = sum(n * e * (1 / r["cached_img_s"] + teacher_s) for r in study)
        dump_s = n * k / dumped["records_per_second"]
        cost = {"images": n, "epochs": e, "views": k, "students": len(study),
                "online": {"teacher_forwards": len(study) * e * n, "seconds": online_s + plain_s,
                           "kd_seconds": online_s},
                "kdcache": {"teacher_forwards": k * n, "seconds": dump_s + cached_s + plain_s,
                            "kd_seconds": dump_s + cached_s},
                "plain_runs_seconds": plain_s}
        cost["speedup"] = cost["online"]["seconds"] / cost["kdcache"]["seconds"]
        cost["kd_speedup"] = online_s / (dump_s + cached_s)

    paper = None
    if not args.skip_paper_flops:
        log("paper FLOPs ...")
        _, ft = flops_per_image(PAPER["teacher"], PAPER["classes"], PAPER["img_size"])
        fs = {s: flops_per_image(s, PAPER["classes"], PAPER["img_size"]) for s in PAPER["students"]}
        n, e, k = PAPER["images"], PAPER["epochs"], PAPER["views"]
        train_gf = sum(3 * f for _, f in fs.values()) * n * e  # forward + backward is about 3 forwards
        online = 2 * train_gf + len(fs) * n * e * ft
        kdc = 2 * train_gf + n * k * ft
        paper = {**PAPER, "teacher_gflops": ft, "students_gflops": {s: f for s, (_, f) in fs.items()},
                 "students_params_m": {s: p for s, (p, _) in fs.items()},
                 "online_tflops": online / 1e3, "kdcache_tflops": kdc / 1e3, "speedup": online / kdc,
                 "kd_speedup": (online - train_gf) / (kdc - train_gf),
                 "teacher_forwards_online": len(fs) * n * e, "teacher_forwards_kdcache": n * k}

    result = {
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "device": str(device), "data": args.data, "train_images": len(train),
        "teacher": {"name": args.teacher, "params_m": t_params, "gflops": t_gflops,
                    "weights": "given" if args.teacher_checkpoint else "random"},
        "student": {"name": args.student, "params_m": s_params, "gflops": s_gflops},
        "img_size": args.img_size, "batch_size": args.batch_size, "workers": args.workers,
        "train_images_per_second": rates,
        "ratios": {"cached_over_plain": rates["cached"]["median"] / rates["plain"]["median"],
                   "online_over_cached": rates["online"]["median"] / rates["cached"]["median"],
                   "dump_over_bare_inference": dumped["records_per_second"] / bare["median"]},
        "dump_records_per_second": dumped["records_per_second"], "bare_inference_records_per_second": bare,
        "study": study, "ten_run_cost": cost, "paper_projection": paper,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, out.with_suffix(".md"))
    plot(result, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    shutil.rmtree(tmp, ignore_errors=True)


def write_markdown(r: dict, path: Path) -> None:
    m, rates, ratios = r["machine"], r["train_images_per_second"], r["ratios"]
    t, s = r["teacher"], r["student"]
    lines = [
        "# Throughput: plain vs cached vs online KD", "",
        f"Command: `{r['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} threads, GPU: {m['gpu'] or 'none'}; torch {m['torch']}, timm {m['timm']}, "
        f"h5py {m['h5py']}; {m['date']}", "",
        f"Teacher {t['name']} ({t['params_m']:.1f} M params, {t['gflops']:.3f} GFLOPs/img), student {s['name']} "
        f"({s['params_m']:.1f} M, {s['gflops']:.3f} GFLOPs/img), {r['img_size']} px, batch {r['batch_size']}, "
        f"{r['workers']} workers, {r['train_images']:,} training images.", "",
        "| mode | train img/s (median) | min | max |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['median']:,.1f} | {v['min']:,.1f} | {v['max']:,.1f} |" for k, v in rates.items()]
    bare = r["bare_inference_records_per_second"]
    lines += ["", "| ratio | value |", "|---|---:|",
              f"| cached / plain | {ratios['cached_over_plain']:.3f} |",
              f"| online / cached | {ratios['online_over_cached']:.3f} |",
              f"| dump / bare teacher inference | {ratios['dump_over_bare_inference']:.3f} "
              f"({r['dump_records_per_second']:,.0f} vs {bare['median']:,.0f} records/s) |"]
    c = r["ten_run_cost"]
    if c:
        lines += ["", f"## The {2 * c['students']}-run study here ({c['students']} student(s) x plain/KD, "
                      f"{c['images']:,} images, {c['epochs']} epochs, K = {c['views']} views)", "",
                  "| student | plain img/s | cached img/s |", "|---|---:|---:|"]
        lines += [f"| {x['student']} | {x['plain_img_s']:,.1f} | {x['cached_img_s']:,.1f} |" for x in r["study"]]
        n = c["students"]
        lines += ["", "| | teacher forward passes | wall time |", "|---|---:|---:|",
                  f"| online KD ({n} KD runs run the teacher every epoch) + {n} plain | "
                  f"{c['online']['teacher_forwards']:,} "
                  f"| {c['online']['seconds'] / 60:,.1f} min |",
                  f"| kdcache (one dump + {n} cached KD) + {n} plain | {c['kdcache']['teacher_forwards']:,} "
                  f"| {c['kdcache']['seconds'] / 60:,.1f} min |",
                  "", f"Speed-up of kdcache over online KD: **{c['kd_speedup']:.2f}x** for the {n} KD runs "
                  f"(dump included), **{c['speedup']:.2f}x** for the whole study with its {n} plain runs. "
                  "Online cost per image is the measured cached cost plus one teacher forward pass (bare "
                  "inference), which matches the directly measured online rate above."]
    p = r["paper_projection"]
    if p:
        lines += ["", "## Projection for the paper's setting (from FLOPs; no GPU was available for a measurement)"
                  if not r["machine"]["gpu"] else "## Projection for the paper's setting (from FLOPs)", "",
                  f"Stanford 40 ({p['images']:,} training images, {p['img_size']} px), teacher {p['teacher']} "
                  f"({p['teacher_gflops']:.2f} GFLOPs/img), {p['epochs']} epochs, K = {p['views']} views; "
                  "training counted as 3 forward passes.", "",
                  "| student | params (M) | GFLOPs/img |", "|---|---:|---:|"]
        lines += [f"| {k} | {p['students_params_m'][k]:.1f} | {v:.2f} |" for k, v in p["students_gflops"].items()]
        lines += ["", "| | teacher forwards | total TFLOPs |", "|---|---:|---:|",
                  f"| online KD + plain | {p['teacher_forwards_online']:,} | {p['online_tflops']:,.0f} |",
                  f"| kdcache + plain | {p['teacher_forwards_kdcache']:,} | {p['kdcache_tflops']:,.0f} |",
                  "", f"Projected speed-up: **{p['kd_speedup']:.2f}x** for the five KD runs, **{p['speedup']:.2f}x** "
                  "for the whole study. FLOPs count a multiply-add as two."]
    path.write_text("\n".join(lines) + "\n")


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = r["train_images_per_second"]
    names = list(rates)
    med = [rates[k]["median"] for k in names]
    err = [[rates[k]["median"] - rates[k]["min"] for k in names], [rates[k]["max"] - rates[k]["median"] for k in names]]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    ax.bar(names, med, yerr=err, capsize=4, color=["#888888", "#2a7ab9", "#d9822b"])
    ax.set_ylabel("student training images/s")
    ax.set_title(f"{r['student']['name']} <- {r['teacher']['name']}, {r['img_size']} px, {r['device']}")
    for i, v in enumerate(med):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom")
    fig.tight_layout()
    fig.savefig(path)


if __name__ == "__main__":
    main()
