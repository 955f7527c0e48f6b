"""Write the golden format-version-2 compact cache in this folder (run once; the file is committed).

    python tests/data/make_golden_v2_compact.py

Written by the kdcache that introduced compact records (branch ``compact``,
format version 2) with its own CacheWriter, so tests/test_golden.py reads a
file that later code did not write. Do not regenerate it with a later kdcache:
a golden file made by the code under test would guard nothing.

The values are those of make_golden_v1.py (6 images, 2 views, 4 classes) in a
``topk:2 --compact`` cache: no crops or flips (they derive from the seed, the
sample id, the view and the image sizes below), the top-2 logits with the
float16 log-sum-exp of the other classes, and the crop witness.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path


HERE = Path(__file__).resolve().parent
NAME = "golden_v2_compact_topk2.h5"
_spec = importlib.util.spec_from_file_location("make_golden_v1", HERE / "make_golden_v1.py")
v1 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(v1)


def image_size(row: int) -> tuple[int, int]:
    """The (height, width) the golden images had: a different size per row, so sizes matter."""
    return 40 + 3 * row, 48 - 2 * row


def golden_info():
    return dataclasses.replace(v1.golden_info("topk:2"), compact=True)


def main() -> None:
    from kdcache.cache import make_witness

    v, info = v1.golden_values(), golden_info()
    v1.write_golden(HERE / NAME, info, v, None, None, witness=make_witness(info, v["sample_ids"], image_size))


if __name__ == "__main__":
    main()
