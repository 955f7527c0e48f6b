"""Write the golden format-version-1 caches in this folder (run once; the files are committed).

    python tests/data/make_golden_v1.py

They were written by kdcache 0.1.0 (git commit e9d8e85, format version 1) with
its own CacheWriter, so tests/test_golden.py reads a file that today's code did
not write. Do not regenerate them with a later kdcache: a golden file made by
the code under test would guard nothing. Add a new golden_v2_* file when the
format version changes instead.

The values are synthetic and tiny (6 images, 2 views, 4 classes) and are all a
function of ``golden_values()``, which the test repeats to know what to expect.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
N, K, C = 6, 2, 4
STORES = {"fp16": "golden_v1_fp16.h5", "fp32": "golden_v1_fp32.h5", "topk:2": "golden_v1_topk2.h5"}


def golden_values() -> dict[str, np.ndarray]:
    """The ids, labels, hashes, crops, flips and float32 logits every golden file stores."""
    rng = np.random.default_rng(20261122)
    top = rng.uniform(0.0, 0.4, size=(N, K, 2))
    size = rng.uniform(0.3, 0.6, size=(N, K, 2))
    return {
        "sample_ids": np.arange(100, 100 + N, dtype=np.int64) * 7919,
        "labels": np.arange(N, dtype=np.int64) % C,
        "content_hashes": rng.integers(0, 2**63, size=N, dtype=np.uint64),
        "crops": np.concatenate([top, size], axis=-1).astype(np.float32),
        "flips": rng.integers(0, 2, size=(N, K)).astype(np.uint8),
        "logits": rng.normal(0.0, 3.0, size=(N, K, C)).astype(np.float32),
    }


def golden_info(store: str):
    from kdcache.cache import CacheInfo

    return CacheInfo(
        num_samples=N, num_views=K, num_classes=C, seed=7, store=store, teacher="test_convnext",
        teacher_checkpoint="teacher.pt", teacher_checkpoint_sha256="ab" * 32, teacher_pretrained=False,
        input_size=32, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic",
        crop_pct=0.875, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3), hflip=0.5, dataset_name="golden",
        dataset_split="train", dataset_fingerprint="cd" * 32, class_names=("ant", "bee", "cat", "dog"),
    )


def write_golden(path: Path, info, v: dict, crops, flips, params: dict | None = None,
                 witness: dict | None = None) -> None:
    """Write the golden values `v` as one cache with today's CacheWriter (all the golden generators use this)."""
    from kdcache.cache import CacheWriter

    writer = CacheWriter(path, info, v["sample_ids"], v["labels"], v["content_hashes"], force=True, witness=witness)
    try:
        writer.write(np.arange(len(v["sample_ids"])), crops, flips, v["logits"], params)
        writer.finish()
    finally:
        writer.close()
    print(f"wrote {path} ({path.stat().st_size} bytes)")


def main() -> None:
    v = golden_values()
    for store, name in STORES.items():
        write_golden(HERE / name, golden_info(store), v, v["crops"], v["flips"])


if __name__ == "__main__":
    main()
