"""Bytes per record and the top-k approximation error of every --store.

    python benchmarks/storage.py CACHE [--temperature 4]

CACHE is a dump with full logits (fp32 or fp16); its real teacher logits give
the C-class figures. A 1000-class head is measured on synthetic logits (no
1000-class teacher weights can be downloaded here): per record, Gaussian
logits with standard deviation 2 plus a margin of 10 on one class, which gives
a confident, ImageNet-like teacher; the script prints the resulting mean
confidence and entropy so the reader can judge the choice.

For each store: bytes per (image, view) record, the mean KL between the full
and the reconstructed softened distribution KL(p_T || p~_T) at the given
temperature (and at T=1), and the projected cache size for a paper-scale
cache (4,000 images x 15 views x 40 classes) and an ImageNet-scale one (1.28 M
images x 100 views x 1000 classes), from the per-record size plus the
per-image rows (ids, labels, content hashes, done flags: 25 bytes).

Writes benchmarks/results/storage.json and storage.md (or --out-prefix).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from kdcache.audit import kl_per_record, softmax
from kdcache.cache import CacheReader, record_bytes, store_codec

STORES = ["fp32", "fp16", "topk:10", "topk:5", "topk:2", "topk:1"]
PER_IMAGE_BYTES = 8 + 8 + 8 + 1
SCALES = {"paper (4,000 x 15 x 40)": (4000, 15, 40), "ImageNet (1.28 M x 100 x 1000)": (1_281_167, 100, 1000)}


def mean_kl(full: np.ndarray, approx: np.ndarray, t: float) -> float:
    return float(np.mean(kl_per_record(full, approx, t)))


def stores_for(num_classes: int) -> list[str]:
    """The STORES that fit `num_classes`: a top-k that keeps every class is no approximation, so it is left out."""
    kept = [store_codec(store).classes_kept for store in STORES]
    return [store for store, k in zip(STORES, kept) if k is None or k < num_classes]


def measure(logits: np.ndarray, info, temperature: float) -> list[dict]:
    c = logits.shape[-1]
    rows = []
    for store in stores_for(c):
        codec = store_codec(store, c)
        approx = codec.decode(codec.encode(logits), c)
        rows.append({"store": store, "bytes_per_record": record_bytes(replace(info, store=store, num_classes=c)),
                     f"kl_T{temperature:g}": mean_kl(logits, approx, temperature), "kl_T1": mean_kl(logits, approx, 1.0)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--records", type=int, default=100_000, help="records of the cache to measure (a sample)")
    parser.add_argument("--out-prefix", default="benchmarks/results/storage")
    args = parser.parse_args()

    reader = CacheReader(args.cache)
    info = reader.info
    if reader.codec.classes_kept is not None:
        raise SystemExit(f"{args.cache} stores top-k logits; measure from an fp32 or fp16 dump")
    rng = np.random.default_rng(0)
    logits = np.concatenate([reader.read_all_logits(v) for v in range(info.num_views)])
    if len(logits) > args.records:
        logits = logits[np.sort(rng.choice(len(logits), args.records, replace=False))]
    real = measure(logits, info, args.temperature)

    synthetic_logits = rng.normal(0, 2.0, size=(20_000, 1000)).astype(np.float32)
    synthetic_logits[np.arange(20_000), rng.integers(0, 1000, 20_000)] += 10.0
    p = softmax(synthetic_logits.astype(np.float64))
    synthetic = measure(synthetic_logits, info, args.temperature)
    synthetic_stats = {"confidence": float(p.max(-1).mean()),
                       "entropy": float(-(p * np.log(np.clip(p, 1e-300, None))).sum(-1).mean())}

    projections = []
    for name, (n, k, c) in SCALES.items():
        for store in stores_for(c):
            per = record_bytes(replace(info, store=store, num_classes=c))
            projections.append({"scale": name, "store": store, "bytes": n * k * per + n * PER_IMAGE_BYTES})

    result = {"command": f"python benchmarks/storage.py {args.cache} --temperature {args.temperature:g}",
              "cache": {"path": args.cache, "teacher": info.teacher, "dataset": info.dataset_name,
                        "records_measured": int(len(logits)), "num_classes": info.num_classes},
              "real": real, "synthetic_1000": synthetic, "synthetic_1000_teacher": synthetic_stats,
              "projections": projections}
    out = Path(args.out_prefix)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")

    t = f"kl_T{args.temperature:g}"
    lines = [f"# Cache storage per record\n\nCommand: `{result['command']}`\n",
             f"## {info.dataset_name}, {info.num_classes} classes (real teacher logits: {info.teacher}, "
             f"{len(logits):,} records)\n", f"| store | bytes/record | mean KL at T={args.temperature:g} | mean KL at T=1 |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['store']} | {r['bytes_per_record']} | {r[t]:.2e} | {r['kl_T1']:.2e} |" for r in real]
    lines += [f"\n## 1000 classes (synthetic logits; mean confidence {synthetic_stats['confidence']:.2f}, "
              f"entropy {synthetic_stats['entropy']:.2f} nats)\n",
              f"| store | bytes/record | mean KL at T={args.temperature:g} | mean KL at T=1 |", "|---|---:|---:|---:|"]
    lines += [f"| {r['store']} | {r['bytes_per_record']} | {r[t]:.2e} | {r['kl_T1']:.2e} |" for r in synthetic]
    lines += ["\n## Projected file sizes\n", "| scale | store | size |", "|---|---|---:|"]
    lines += [f"| {p['scale']} | {p['store']} | {p['bytes'] / 2**20:,.1f} MiB |" for p in projections]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
