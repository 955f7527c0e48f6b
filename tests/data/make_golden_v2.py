"""Write the golden format-version-2 cache in this folder (run once; the file is committed).

    python tests/data/make_golden_v2.py

Written by the kdcache that introduced format version 2 (the recipe of issue
11: its ``recipe`` attribute and per-view parameter datasets) with its own
CacheWriter. Do not regenerate it with a later kdcache: tests/test_golden.py
must read a file that the code under test did not write.

The values are synthetic and tiny (the v1 files' 6 images, 2 views, 4 classes,
plus every recipe parameter), all a function of ``golden_values()``, which the
test repeats to know what to expect.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from make_golden_v1 import K, N, golden_info as golden_info_v1, golden_values as golden_values_v1, write_golden

HERE = Path(__file__).resolve().parent
NAME = "golden_v2_fp32_recipe.h5"
RECIPE = {"aa": "rand-m9-mstd0.5-inc1", "color_jitter": 0.0, "cutmix": 1.0, "mixup": 0.8, "mixup_prob": 1.0,
          "mixup_switch_prob": 0.5, "reprob": 0.25}
LAYERS, OPS = 2, 15  # the policy of RECIPE's --aa: 2 layers over timm's 15 increasing ops


def golden_values() -> dict[str, np.ndarray]:
    """The v1 values, and a value of every recipe parameter in its range."""
    rng = np.random.default_rng(20261130)
    partners = (np.arange(N)[:, None] + rng.integers(1, N, size=(N, K))) % N
    partners[0, 0] = -1  # one view is not mixed
    boxes = np.concatenate([rng.uniform(0, 0.4, (N, K, 2)), rng.uniform(0.1, 0.5, (N, K, 2))], -1)
    return {
        **golden_values_v1(),
        "ra_ops": rng.integers(-1, OPS, size=(N, K, LAYERS)).astype(np.int8),
        "ra_args": rng.uniform(0.0, 1.0, size=(N, K, LAYERS)).astype(np.float32),
        "erase_boxes": (boxes * (rng.random((N, K, 1)) < 0.5)).astype(np.float32),
        "erase_seeds": rng.integers(0, 2**62, size=(N, K)).astype(np.int64),
        "mix_partners": partners.astype(np.int64),
        "mix_lambdas": np.where(partners < 0, 1.0, rng.uniform(0, 1, (N, K))).astype(np.float32),
        "cutmix_boxes": (boxes[..., ::-1] * (partners[..., None] >= 0) * 0.5).astype(np.float32),
    }


def golden_info():
    import dataclasses

    return dataclasses.replace(golden_info_v1("fp32"), recipe=json.dumps(RECIPE, sort_keys=True))


def main() -> None:
    v = golden_values()
    params = {k: v[k] for k in ("ra_ops", "ra_args", "erase_boxes", "erase_seeds", "mix_partners",
                                "mix_lambdas", "cutmix_boxes")}
    write_golden(HERE / NAME, golden_info(), v, v["crops"], v["flips"], params)


if __name__ == "__main__":
    main()
