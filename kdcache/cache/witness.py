"""The crop witness of a compact cache: a few stored crops that prove the derivation still holds.

A ``--compact`` cache stores no crops or flips: a reader derives each one from
``(seed, sample id, view)`` and the image's size with
:func:`kdcache.augment.sample_crops`, the code seeded training uses. That is
exact only while this kdcache samples crops the way the kdcache that dumped
the cache did. So the dump stores a witness: up to ``WITNESS_RECORDS``
(image, view) records chosen from the seed, with their image sizes, boxes and
flips. Every open re-derives them from the stored sizes alone (no dataset
needed) and refuses the file when one differs by a single bit; where the
dataset is at hand, :func:`kdcache.compatibility.check_cache_fits` also checks that
the images still decode to the stored sizes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from ..augment import sample_crops
from ..config import CropRanges
from .stores import Layout

if TYPE_CHECKING:  # format.py imports this module for the layout
    from .format import CacheInfo

WITNESS_RECORDS = 64  # 64 x 25 bytes per file; re-deriving them costs about a millisecond per open
_PICK_SALT = 0x317E55  # keeps the witness draw apart from the crops' own (seed, sample id, view) streams


def witness_layout(num_samples: int) -> Layout:
    """The witness datasets of a compact cache of `num_samples` rows, with their full shapes."""
    w = min(WITNESS_RECORDS, num_samples)
    return {"witness_ids": ((w,), np.dtype(np.int64)), "witness_views": ((w,), np.dtype(np.int32)),
            "witness_sizes": ((w, 2), np.dtype(np.int32)), "witness_crops": ((w, 4), np.dtype(np.float32)),
            "witness_flips": ((w,), np.dtype(np.uint8))}


def witness_records(seed: int, num_samples: int, num_views: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows (increasing) and views of the witness records, drawn from the seed alone."""
    rng = np.random.default_rng([int(seed), _PICK_SALT])
    rows = np.sort(rng.choice(num_samples, min(WITNESS_RECORDS, num_samples), replace=False))
    return rows, rng.integers(0, num_views, len(rows))


def _ranges(info: CacheInfo) -> CropRanges:
    return CropRanges(scale=tuple(info.crop_scale), ratio=tuple(info.crop_ratio), hflip=info.hflip)


def _derive(info: CacheInfo, ids: np.ndarray, views: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Today's crops of the records (ids, views) of images of (height, width) `sizes`."""
    pairs = [sample_crops(info.seed, ids[i:i + 1], [tuple(sizes[i])], int(views[i]), _ranges(info))
             for i in range(len(ids))]
    boxes = np.concatenate([b for b, _ in pairs]) if pairs else np.zeros((0, 4), dtype=np.float32)
    flips = np.concatenate([f for _, f in pairs]) if pairs else np.zeros(0, dtype=bool)
    return boxes, flips


def make_witness(info: CacheInfo, sample_ids: np.ndarray,
                 size_of: Callable[[int], tuple[int, int]]) -> dict[str, np.ndarray]:
    """The witness of a compact cache of `info` over rows with `sample_ids`; `size_of(row)` gives (height, width)."""
    rows, views = witness_records(info.seed, info.num_samples, info.num_views)
    ids = np.asarray(sample_ids, dtype=np.int64)[rows]
    sizes = np.array([size_of(int(r)) for r in rows], dtype=np.int32).reshape(len(rows), 2)
    boxes, flips = _derive(info, ids, views, sizes)
    return {"witness_ids": ids, "witness_views": views.astype(np.int32), "witness_sizes": sizes,
            "witness_crops": boxes.astype(np.float32), "witness_flips": flips.astype(np.uint8)}


def witness_mismatch(info: CacheInfo, witness: dict[str, np.ndarray]) -> str:
    """How the stored witness differs from today's derivation, worded for its first record that does; '' if none."""
    shapes = {name: shape for name, (shape, _) in witness_layout(info.num_samples).items()}
    if {name: np.shape(value) for name, value in witness.items()} != shapes:
        return f"a compact cache of {info.num_samples} rows needs the witness datasets {shapes}"
    ids, views, sizes = witness["witness_ids"], witness["witness_views"], witness["witness_sizes"]
    if (sizes < 1).any():
        return "an image size in dataset 'witness_sizes' is not positive"
    boxes, flips = _derive(info, ids, views, sizes)
    stored_boxes = np.ascontiguousarray(witness["witness_crops"], dtype=np.float32)
    differ = (boxes.view(np.uint32) != stored_boxes.view(np.uint32)).any(axis=1)
    differ |= flips.astype(np.uint8) != witness["witness_flips"]
    if not differ.any():
        return ""
    i = int(np.flatnonzero(differ)[0])
    h, w = (int(x) for x in sizes[i])
    return (f"sample id {int(ids[i])} view {int(views[i])} of a {h}x{w} image: stored box "
            f"{stored_boxes[i].tolist()} flip {int(witness['witness_flips'][i])}, derived "
            f"{boxes[i].tolist()} flip {int(flips[i])}")
