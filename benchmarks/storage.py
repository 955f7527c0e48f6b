"""Bytes per record and the top-k approximation error of every --store.

    python benchmarks/storage.py CACHE [--temperature 4]

CACHE is a dump with full logits (fp32 or fp16); its real teacher logits give
the C-class figures. A 1000-class head is measured on synthetic logits (no
1000-class teacher weights can be downloaded here): per record, Gaussian
logits with standard deviation 2 plus a margin of 10 on one class, which gives
a confident, ImageNet-like teacher; the script prints the resulting mean
confidence and entropy so the reader can judge the choice.

For each store, plain and ``--compact`` (no stored crop box or flip; top-k's
log-sum-exp as a float16 gap): bytes per (image, view) record, the mean KL
between the full and the reconstructed softened distribution KL(p_T || p~_T)
at the given temperature (and at T=1), and the projected cache size for a paper-scale
cache (4,000 images x 15 views x 40 classes) and an ImageNet-scale one (1.28 M
images x 100 views x 1000 classes), from the per-record size plus the
per-image rows (ids, labels, content hashes, done flags: 25 bytes).

TinyViT's record is the reference for ``topk:5``. Its save_logits.py
(microsoft/Cream, TinyViT/) writes, per (image, epoch), the int32 seed of that
record's augmentation, then the k indices as int16 and the k largest softmax
probabilities as float16: 4 + 2k + 2k = 24 bytes for k = 5. Its reader spreads
the rest of the probability evenly over the other classes, the same flat tail
as kdcache's top-k; its row below measures that reconstruction (float16
probabilities). kdcache needs no per-record seed: a crop derives from the
cache's one seed, the sample id and the view.

The float16 log-sum-exp of a compact top-k store is checked against the
float32 one on the real logits (its decode error, and the error a raw float16
log-sum-exp would have).

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
TINYVIT_K = 5
TINYVIT_BYTES = 4 + 2 * TINYVIT_K + 2 * TINYVIT_K  # int32 seed, int16 indices, float16 probabilities
PER_IMAGE_BYTES = 8 + 8 + 8 + 1
SCALES = {"paper (4,000 x 15 x 40)": (4000, 15, 40), "ImageNet (1.28 M x 100 x 1000)": (1_281_167, 100, 1000)}


def mean_kl(full: np.ndarray, approx: np.ndarray, t: float) -> float:
    return float(np.mean(kl_per_record(full, approx, t)))


def stores_for(num_classes: int) -> list[str]:
    """The STORES that fit `num_classes`: a top-k that keeps every class is no approximation, so it is left out."""
    kept = [store_codec(store).classes_kept for store in STORES]
    return [store for store, k in zip(STORES, kept) if k is None or k < num_classes]


def tinyvit_logits(logits: np.ndarray, k: int) -> np.ndarray:
    """Logits of TinyViT's reconstruction: the k largest probabilities as float16, the rest spread evenly."""
    p = softmax(logits.astype(np.float64))
    top = np.argsort(-p, axis=-1)[..., :k]
    kept = np.take_along_axis(p, top, -1).astype(np.float16).astype(np.float64)
    rest = np.clip(1.0 - kept.sum(-1, keepdims=True), 1e-12, None) / (p.shape[-1] - k)
    out = np.broadcast_to(rest, p.shape).copy()
    np.put_along_axis(out, top, kept, -1)
    return np.log(out)


def measure(logits: np.ndarray, info, temperature: float) -> list[dict]:
    c = logits.shape[-1]
    rows = []
    for store in stores_for(c):
        for compact in (False, True):
            codec = store_codec(store, c, compact=compact)
            approx = codec.decode(codec.encode(logits), c)
            rows.append({"store": store + (" --compact" if compact else ""),
                         "bytes_per_record": record_bytes(replace(info, store=store, num_classes=c, compact=compact)),
                         f"kl_T{temperature:g}": mean_kl(logits, approx, temperature),
                         "kl_T1": mean_kl(logits, approx, 1.0)})
    approx = tinyvit_logits(logits, TINYVIT_K)
    rows.append({"store": f"TinyViT top-{TINYVIT_K} (reference)", "bytes_per_record": TINYVIT_BYTES,
                 f"kl_T{temperature:g}": mean_kl(logits, approx, temperature), "kl_T1": mean_kl(logits, approx, 1.0)})
    return rows


def lse_error(logits: np.ndarray) -> dict:
    """How far the compact top-k's float16 numbers are from float32, in nats, on `logits`.

    The tail's log-sum-exp (what it stores), the log-sum-exp of all classes
    that its decoded logits give, and, for scale, a raw float16 log-sum-exp.
    """
    c, k = logits.shape[-1], TINYVIT_K
    codec = store_codec(f"topk:{k}", c, compact=True)
    arrays = codec.encode(logits)
    x = logits.astype(np.float64)
    lse = np.logaddexp.reduce(x, axis=-1)
    tail = x.copy()
    np.put_along_axis(tail, np.argsort(-x, axis=-1)[..., :k], -np.inf, axis=-1)
    stored_tail = arrays["topk_values"][..., 0].astype(np.float64) + arrays["tail_logsumexp_gap"].astype(np.float64)
    errors = {"tail_fp16": np.abs(stored_tail - np.logaddexp.reduce(tail, axis=-1)),
              "decoded_fp16": np.abs(codec.logsumexp(arrays, c).astype(np.float64) - lse),
              "raw_fp16": np.abs(lse.astype(np.float16).astype(np.float64) - lse)}
    return {**{f"{name}_{stat}": float(getattr(e, stat)()) for name, e in errors.items() for stat in ("mean", "max")},
            "lse_mean": float(lse.mean()), "lse_max": float(lse.max())}


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
    lse = lse_error(logits)

    synthetic_logits = rng.normal(0, 2.0, size=(20_000, 1000)).astype(np.float32)
    synthetic_logits[np.arange(20_000), rng.integers(0, 1000, 20_000)] += 10.0
    p = softmax(synthetic_logits.astype(np.float64))
    synthetic = measure(synthetic_logits, info, args.temperature)
    synthetic_stats = {"confidence": float(p.max(-1).mean()),
                       "entropy": float(-(p * np.log(np.clip(p, 1e-300, None))).sum(-1).mean())}

    projections = []
    for name, (n, k, c) in SCALES.items():
        for store in stores_for(c):
            for compact in (False, True):
                per = record_bytes(replace(info, store=store, num_classes=c, compact=compact))
                projections.append({"scale": name, "store": store + (" --compact" if compact else ""),
                                    "bytes": n * k * per + n * PER_IMAGE_BYTES})

    result = {"command": f"python benchmarks/storage.py {args.cache} --temperature {args.temperature:g}",
              "cache": {"path": args.cache, "teacher": info.teacher, "dataset": info.dataset_name,
                        "records_measured": int(len(logits)), "num_classes": info.num_classes},
              "real": real, "logsumexp_error": lse, "synthetic_1000": synthetic,
              "synthetic_1000_teacher": synthetic_stats,
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
    lines += [f"\n`--compact` top-k stores the log-sum-exp of the classes it does not keep, in float16 (as the gap "
              f"to the largest kept logit): it is within {lse['tail_fp16_mean']:.1e} nats of float32 on average "
              f"(at most {lse['tail_fp16_max']:.1e}); the log-sum-exp of all classes of its decoded logits is within "
              f"{lse['decoded_fp16_mean']:.1e} (at most {lse['decoded_fp16_max']:.1e}) of the teacher's, where a raw "
              f"float16 log-sum-exp of these logits (mean {lse['lse_mean']:.1f}, up to {lse['lse_max']:.1f}) would "
              f"be off by {lse['raw_fp16_mean']:.1e} (at most {lse['raw_fp16_max']:.1e})."]
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
