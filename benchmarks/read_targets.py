"""How fast cached targets come out of the training data path.

    python benchmarks/read_targets.py CACHE --data DATA [--batch-size 128] [--workers 0 2 4]

Two measurements per worker count, each the median of --repeats passes over
the training split in the real epoch order:

* ``targets``: records/s of the reader alone (crops and logits of one view,
  read batch-wise as the training DataLoader does), from memory (preload) and
  from the file;
* ``data path``: images/s of the full training data path (decode, replayed
  crop, targets) against the same path with seeded crops and no targets, so
  the cost of reading targets shows as the difference.

Writes JSON to benchmarks/results/read_targets.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from kdcache.cache import CacheReader
from kdcache.data import open_dataset
from kdcache.loaders import EpochOrder, TrainViews, train_loader
from kdcache.targets import CachedViews, SeededViews, preprocess_of_cache, ranges_of_cache


class TargetsOnly(Dataset):
    """The cached half of TrainViews.__getitems__: one batched read per batch."""

    def __init__(self, views: CachedViews, ids: np.ndarray) -> None:
        self.views, self.ids = views, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitems__(self, indices: list[int]) -> dict:
        rows = np.asarray(indices)
        return self.views.fetch(rows, self.ids[rows], [], 0)


def _first(batch: dict) -> dict:
    return batch


def timed_pass(loader: DataLoader) -> tuple[int, float]:
    start = time.perf_counter()
    count = 0
    for batch in loader:
        count += len(batch["boxes"] if "boxes" in batch else batch["labels"])
    return count, time.perf_counter() - start


def median_rate(make_loader, repeats: int) -> dict:
    rates = []
    for _ in range(repeats):
        n, seconds = timed_pass(make_loader())
        rates.append(n / seconds)
    return {"median": statistics.median(rates), "min": min(rates), "max": max(rates), "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/read_targets.json")
    args = parser.parse_args()

    torch.set_num_threads(1)
    train = open_dataset(args.data, "train")
    results = {"command": "python benchmarks/read_targets.py " + " ".join(
                   [args.cache, "--data", args.data, "--batch-size", str(args.batch_size), "--workers",
                    *map(str, args.workers), "--repeats", str(args.repeats)]),
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads()},
               "batch_size": args.batch_size, "targets": [], "data_path": []}
    cpu = torch.device("cpu")
    for preload in (True, False):
        reader = CacheReader(args.cache, preload=preload)
        for workers in args.workers:
            def make() -> DataLoader:
                return DataLoader(TargetsOnly(CachedViews(reader), train.ids), batch_size=args.batch_size,
                                  sampler=EpochOrder(len(train), 0), collate_fn=_first, num_workers=workers)
            rate = median_rate(make, args.repeats)
            results["targets"].append({"preload": preload, "workers": workers, "records_per_second": rate})
            print(f"targets  preload={preload!s:5} workers={workers}: {rate['median']:>12,.0f} records/s")
    reader = CacheReader(args.cache)
    prep = preprocess_of_cache(reader)
    for workers in args.workers:
        row = {"workers": workers}
        for name, views in (("cached", CachedViews(reader)), ("seeded_no_targets", SeededViews(0, ranges_of_cache(reader)))):
            dataset = TrainViews(train, views, prep)
            rate = median_rate(lambda: train_loader(dataset, EpochOrder(len(train), 0), args.batch_size, workers, cpu),
                               args.repeats)
            row[name] = rate
        results["data_path"].append(row)
        print(f"data path workers={workers}: cached {row['cached']['median']:,.0f} img/s, "
              f"no targets {row['seeded_no_targets']['median']:,.0f} img/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
