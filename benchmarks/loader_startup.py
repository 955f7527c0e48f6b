"""Per-epoch start-up of the training DataLoader: a new loader every epoch (the old way) or one persistent loader.

    python benchmarks/loader_startup.py [--data digits /tmp/kdcache-data/cifar10-2000] [--workers 4]
        [--epochs 6] [--rounds 2] [--batch-size 128] [--out benchmarks/results/loader_startup]

For each dataset the script dumps a small cache (timm's ``test_convnext`` with
random weights, one view per epoch, 32 px) and iterates the cached-mode
training DataLoader of ``kdcache.loaders.train_loader`` for ``--epochs``
epochs, both ways, in alternating order over ``--rounds`` rounds:

* old: a new DataLoader every epoch with ``persistent_workers=False``: the
  workers start again each epoch and reload the (preloaded) cache;
* new: one DataLoader for the run with ``persistent_workers=True``; the epoch
  reaches the workers with each batch (``EpochOrder.set_epoch``).

Start-up is the time from starting an epoch's iteration to its first batch;
the epoch time is the whole pass. Epoch 0 starts the workers both ways, so
the steady state is the median over the later epochs. Only data loading is
timed: no model runs.

A CIFAR-10 subset for ``--data`` (the ImageFolder case):

    mkdir -p /tmp/kdcache-data && tar xzf ../shared/data/cifar10-jpg.tar.gz -C /tmp/kdcache-data
    python benchmarks/make_subset.py /tmp/kdcache-data/cifar10-jpg /tmp/kdcache-data/cifar10-2000 \\
        --train-per-class 200 --test-per-class 20
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdcache.cache import CacheReader
from kdcache.config import DumpConfig, RunOptions
from kdcache.data import open_dataset
from kdcache.loaders import EpochOrder, TrainViews, train_loader
from kdcache.targets import CachedViews, preprocess_of_cache
from kdcache.teacher import dump


def epoch_times(loader, order: EpochOrder, epoch: int) -> tuple[float, float, int]:
    """(seconds to the first batch, seconds for the whole epoch, batches) of one epoch."""
    order.set_epoch(epoch)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter() - start
    count = 1 + sum(1 for _ in batches)
    return first, time.perf_counter() - start, count


def measure(data: str, workers: int, epochs: int, rounds: int, batch_size: int, scratch: Path) -> dict:
    cache = scratch / f"{Path(data).name}.h5"
    dump(DumpConfig(teacher="test_convnext", out=str(cache), views=epochs, force=True,
                    run=RunOptions(data=data, img_size=32, batch_size=256, workers=0, device="cpu")))
    reader = CacheReader(cache)
    train = open_dataset(data, "train")
    dataset = TrainViews(train, CachedViews(reader), preprocess_of_cache(reader))
    cpu = torch.device("cpu")
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for r in range(rounds):
        for way in (("old", "new") if r % 2 == 0 else ("new", "old")):
            order = EpochOrder(len(train), seed=0)
            persistent = train_loader(dataset, order, batch_size, workers, cpu) if way == "new" else None
            per_epoch = []
            for epoch in range(epochs):
                if persistent is not None:
                    loader = persistent
                else:
                    loader = train_loader(dataset, order, batch_size, workers, cpu, persistent=False)
                first, whole, batches = epoch_times(loader, order, epoch)
                per_epoch.append({"epoch": epoch, "startup_s": first, "epoch_s": whole, "batches": batches})
                del loader
            del persistent
            runs[way].append(per_epoch)
            print(f"{data} round {r} {way}: start-up " + " ".join(f"{e['startup_s']:.3f}" for e in per_epoch) + " s")
    out = {"data": data, "images": len(train), "batch_size": batch_size, "workers": workers, "epochs": epochs,
           "rounds": rounds, "cache_bytes": reader.file_size, "runs": runs}
    for way, rs in runs.items():
        later = [e for run in rs for e in run if e["epoch"] > 0]
        out[way] = {"startup_first_epoch_s": statistics.median(run[0]["startup_s"] for run in rs),
                    "startup_later_epochs_s": statistics.median(e["startup_s"] for e in later),
                    "epoch_later_epochs_s": statistics.median(e["epoch_s"] for e in later)}
    out["startup_saved_per_epoch_s"] = (out["old"]["startup_later_epochs_s"] - out["new"]["startup_later_epochs_s"])
    return out


def markdown(results: dict) -> str:
    lines = ["# Per-epoch start-up of the training DataLoader", "",
             f"`{results['command']}`, {results['date']}, {results['machine']}.", "",
             results["note"], "",
             "Start-up: seconds from starting an epoch's iteration to its first batch (cached mode, preloaded "
             "cache, no model). Medians over the epochs after the first, over all rounds; the first epoch "
             "starts the workers both ways.", "",
             "| data | images | workers | way | start-up, first epoch (s) | start-up, later epochs (s) "
             "| whole epoch, later (s) |", "|---|---:|---:|---|---:|---:|---:|"]
    for r in results["datasets"]:
        for way, label in (("old", "new DataLoader each epoch"), ("new", "one persistent DataLoader")):
            w = r[way]
            lines.append(f"| {r['data']} | {r['images']:,} | {r['workers']} | {label} | "
                         f"{w['startup_first_epoch_s']:.3f} | {w['startup_later_epochs_s']:.3f} | "
                         f"{w['epoch_later_epochs_s']:.3f} |")
    lines += ["", "Saved per epoch after the first: " + ", ".join(
        f"{r['data']} {r['startup_saved_per_epoch_s']:.3f} s" for r in results["datasets"]) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["digits", "/tmp/kdcache-data/cifar10-2000"])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/loader_startup")
    args = parser.parse_args()

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kdcache-startup-") as scratch:
        datasets = [measure(d, args.workers, args.epochs, args.rounds, args.batch_size, Path(scratch))
                    for d in args.data]
    load_after = os.getloadavg()
    results = {
        "command": "python benchmarks/loader_startup.py --data " + " ".join(args.data) +
                   f" --workers {args.workers} --epochs {args.epochs} --rounds {args.rounds}"
                   f" --batch-size {args.batch_size}",
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
        "note": (f"The machine was shared with other jobs while this ran (1-minute load average "
                 f"{load_before[0]:.1f} before, {load_after[0]:.1f} after, on {os.cpu_count()} cores), "
                 "so absolute times are inflated and noisy; the old/new comparison ran interleaved."),
        "datasets": datasets,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
