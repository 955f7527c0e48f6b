"""Scaling out: dump and cached-training throughput for 1 vs N processes, and --views-per-step 1 vs 2.

    python benchmarks/scaling.py --data DATA [--teacher convnext_atto] [--student pvt_v2_b0]
        [--img-size 32] [--processes 1 2] [--views-per-step 1 2] [--epochs 3] [--repeats 2]
        [--out benchmarks/results/scaling]

Every measurement runs the library under torchrun, exactly as the CLI would
(``python -m torch.distributed.run --nproc_per_node N benchmarks/scaling.py
worker ...``; one process needs no process group, so N=1 is the plain run).
torchrun gives each of N > 1 processes one thread (OMP_NUM_THREADS=1); one
process uses torch's default, all the cores. So each row uses the whole machine.

* dump: records/s of ``dump()`` (teacher over K views of every image), the
  global rate (all records over the slowest rank's seconds); then the N-process
  cache is compared with the 1-process cache (crops and flips bit-equal, the
  largest logit difference);
* train: cached-KD student images/s of the training loop (decode, replayed
  crop, cached targets, forward, backward, step), summed over the processes,
  from the epochs after the first (warm-up); ``--views-per-step`` M counts the
  B*M crops the student trains on, and ``decoded_per_s`` the images decoded.

Without --teacher-checkpoint the teacher has random weights: throughput does
not depend on the weights. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, threads: int | None, args: list[str]) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "worker", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)


def worker(argv: list[str]) -> None:
    """Inside torchrun: one dump or one training run; rank 0 writes its summary to --result."""
    from kdcache.config import DumpConfig, OptimOptions, RunOptions, TrainConfig
    from kdcache.distributed import Dist
    from kdcache.teacher import dump
    from kdcache.train import fit

    p = argparse.ArgumentParser()
    p.add_argument("task", choices=["dump", "train"])
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--img-size", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--views-per-step", type=int, default=1)
    p.add_argument("--cache", required=True)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    run = RunOptions(data=a.data, img_size=a.img_size, batch_size=a.batch_size, workers=0, device="cpu", seed=0)
    if a.task == "dump":
        result = dump(DumpConfig(teacher=a.model, out=a.cache, checkpoint=a.checkpoint, views=a.views, run=run,
                                 store="fp32", force=True))
    else:
        result = fit(TrainConfig(model=a.model, out=a.out, run=run, epochs=a.epochs, cached=a.cache, preload=False,
                                 views_per_step=a.views_per_step, optim=OptimOptions(opt="adamw", sched="cosine")))
        if Dist.from_env().is_main():
            later = json.loads((Path(a.out) / "history.json").read_text())[1:]  # the first epoch warms up
            result["steady_images_per_second"] = sum(h["images"] for h in later) / sum(h["seconds"] for h in later)
    if Dist.from_env().is_main():
        Path(a.result).write_text(json.dumps(result, indent=2))


def data_path_rates(data: str, cache: str, batch: int, per_step: list[int], repeats: int) -> list[dict]:
    """Crops/s of the training data path alone (decode, replayed crops, cached targets), no model.

    This is where ``--views-per-step`` saves: decoding is paid once per M crops.
    """
    import time

    import numpy as np

    from kdcache.cache import CacheReader
    from kdcache.data import open_dataset
    from kdcache.loaders import EpochOrder, TrainViews
    from kdcache.targets import CachedViews, preprocess_of_cache

    reader = CacheReader(cache, preload=False)
    train = open_dataset(data, "train")
    rows = [int(i) for i in EpochOrder(len(train), 0)]
    out = []
    for m in per_step:
        views = TrainViews(train, CachedViews(reader), preprocess_of_cache(reader), views_per_step=m)
        rates = []
        for _ in range(repeats):
            start, crops = time.perf_counter(), 0
            for i in range(0, len(rows) - batch + 1, batch):
                crops += len(views.batch(rows[i:i + batch], 0)["images"])
            rates.append(crops / (time.perf_counter() - start))
        decode = []
        for _ in range(repeats):
            start = time.perf_counter()
            for i in rows:
                train.load(i)
            decode.append(len(rows) / (time.perf_counter() - start))
        out.append({"views_per_step": m, "batch_size": batch, "crops_per_s": statistics.median(rates),
                    "decoded_per_s": statistics.median(rates) / m, "runs": rates,
                    "decode_only_images_per_s": float(np.median(decode))})
    return out


def compare_caches(a: str, b: str) -> dict:
    import h5py
    import numpy as np

    with h5py.File(a) as x, h5py.File(b) as y:
        same = {name: x[name][:].tobytes() == y[name][:].tobytes()
                for name in ("sample_ids", "labels", "crops", "flips", "done")}
        la, lb = x["logits"][:], y["logits"][:]
    diff = np.abs(la - lb)
    return {"bit_equal": same, "logits_bit_equal": bool(la.tobytes() == lb.tobytes()),
            "logits_equal_fraction": float((la == lb).mean()), "max_abs_logit_diff": float(diff.max()),
            "max_rel_logit_diff": float(diff.max() / np.abs(la).max())}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--teacher", default="convnext_atto")
    parser.add_argument("--teacher-checkpoint", default=None)
    parser.add_argument("--student", default="pvt_v2_b0")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dump-batch-size", type=int, default=256)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (at least 2; the first is warm-up)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--views-per-step", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=2, help="runs per setting; the median is reported")
    parser.add_argument("--single-thread-baseline", action="store_true",
                        help="also run 1 process with 1 thread (as each of N > 1 processes has)")
    parser.add_argument("--control-batch", action="store_true",
                        help="also train with --views-per-step 1 at batch-size x max(M): as many crops per step as "
                             "M views, each from its own image, to separate decode savings from a bigger step")
    parser.add_argument("--note", default="", help="a line about the conditions, written into OUT.md")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scaling"))
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from throughput import machine

    common = ["--data", args.data, "--img-size", str(args.img_size)]
    # (processes, threads per process): None is torch's default (all cores) for one process, and torchrun's 1 for more.
    settings = [(n, None) for n in args.processes]
    if args.single_thread_baseline and 1 in args.processes:
        settings.insert(args.processes.index(1) + 1, (1, 1))
    results: dict = {"machine": machine(), "settings": vars(args), "dump": [], "train": []}

    def label(n: int, threads: int | None) -> str:
        return f"{n}" + (f" ({threads} thread)" if threads else "")

    with tempfile.TemporaryDirectory(prefix="kdcache-scaling-") as tmp:
        tmp = Path(tmp)
        caches = {}
        for n, threads in settings:
            runs = []
            for rep in range(args.repeats):
                cache, res = tmp / f"dump{n}-{threads}.h5", tmp / f"dump{n}-{threads}-{rep}.json"
                _launch(n, threads, ["dump", *common, "--model", args.teacher, "--batch-size",
                                     str(args.dump_batch_size), "--views", str(args.views), "--cache", str(cache),
                                     "--out", str(tmp), "--result", str(res)]
                        + (["--checkpoint", args.teacher_checkpoint] if args.teacher_checkpoint else []))
                runs.append(json.loads(res.read_text())["records_per_second"])
            caches[(n, threads)] = str(cache)
            results["dump"].append({"processes": n, "threads": threads, "records_per_s": statistics.median(runs),
                                    "runs": runs})
            print(f"dump {label(n, threads)}: {statistics.median(runs):,.0f} records/s", flush=True)
        base = caches[settings[0]]
        for key in settings[1:]:
            results[f"dump_{label(*key)}_vs_{label(*settings[0])}"] = compare_caches(caches[key], base)
        results["data_path"] = data_path_rates(args.data, base, args.batch_size, args.views_per_step, args.repeats)
        for row in results["data_path"]:
            print(f"data path, --views-per-step {row['views_per_step']}: {row['crops_per_s']:,.0f} crops/s "
                  f"(decoding alone: {row['decode_only_images_per_s']:,.0f} images/s)", flush=True)
        trains = [(m, args.batch_size) for m in args.views_per_step]
        if args.control_batch:
            trains.append((1, args.batch_size * max(args.views_per_step)))
        for n, threads in settings:
            for m, batch in trains:
                runs, decoded = [], []
                for rep in range(args.repeats):
                    res = tmp / f"train{n}-{threads}-{m}-{batch}-{rep}.json"
                    _launch(n, threads, ["train", *common, "--model", args.student, "--batch-size", str(batch),
                                         "--epochs", str(args.epochs), "--views-per-step", str(m), "--cache", base,
                                         "--out", str(tmp / f"run{n}-{m}"), "--result", str(res)])
                    rate = json.loads(res.read_text())["steady_images_per_second"]
                    runs.append(rate)
                    decoded.append(rate / m)
                row = {"processes": n, "threads": threads, "views_per_step": m, "batch_size": batch,
                       "images_per_s": statistics.median(runs), "decoded_per_s": statistics.median(decoded),
                       "runs": runs}
                results["train"].append(row)
                print(f"train {label(n, threads)}, batch {batch}, --views-per-step {m}: {row['images_per_s']:,.0f} "
                      f"crops/s, {row['decoded_per_s']:,.0f} decoded images/s", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# Scaling on {results['machine']['cpu']} ({results['machine']['cores']} threads)", "",
             f"Data {args.data}, {args.img_size} px; teacher {args.teacher} ({args.views} views, fp32), "
             f"student {args.student}, global batch {args.batch_size}; median of {args.repeats} runs.",
             *([args.note] if args.note else []), "",
             "| phase | processes | batch (images) | views/step | crops/s | decoded images/s |",
             "|---|---|---|---|---|---|"]
    lines += [f"| dump | {label(d['processes'], d['threads'])} | {args.dump_batch_size // args.views} | "
              f"{args.views} | {d['records_per_s']:,.0f} | {d['records_per_s'] / args.views:,.0f} |"
              for d in results["dump"]]
    lines += [f"| train (cached) | {label(t['processes'], t['threads'])} | {t['batch_size']} | "
              f"{t['views_per_step']} | {t['images_per_s']:,.0f} | {t['decoded_per_s']:,.0f} |"
              for t in results["train"]]
    lines += ["", "Data path alone (decode, replayed crops, cached targets read from the file; no model), 1 process:",
              "", "| views/step | crops/s | decoded images/s | decoding alone, images/s |", "|---|---|---|---|"]
    lines += [f"| {r['views_per_step']} | {r['crops_per_s']:,.0f} | {r['decoded_per_s']:,.0f} | "
              f"{r['decode_only_images_per_s']:,.0f} |" for r in results["data_path"]]
    for key in (k for k in results if k.startswith("dump_") and "_vs_" in k):
        c = results[key]
        lines += ["", f"{key}: crops/flips/ids bit-equal {all(c['bit_equal'].values())}; logits bit-equal "
                      f"{c['logits_bit_equal']} ({100 * c['logits_equal_fraction']:.1f}% of values), largest "
                      f"difference {c['max_abs_logit_diff']:.2e} ({c['max_rel_logit_diff']:.2e} of the largest |logit|)"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
