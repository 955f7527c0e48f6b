"""The layout of a cache: every dataset with its shape and dtype, and the checks of stored records.

The schema itself (what each dataset means) is the docstring of
:mod:`kdcache.cache.format`, which re-exports these functions. They take a
:class:`~kdcache.cache.format.CacheInfo` and iterate over codecs: the store's
(:mod:`kdcache.cache.stores`), the recipe's parameters
(:mod:`kdcache.cache.params`) and the teacher features
(:mod:`kdcache.cache.features`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import h5py
import numpy as np

from ..errors import CacheError
from .features import FeatureCodec, feature_codecs
from .hdf5 import worded
from .params import ParamsCodec, params_codec
from .stores import Layout, StoreCodec, store_codec
from .witness import witness_layout

if TYPE_CHECKING:
    from .format import CacheInfo

BOX_SLACK = 1e-6  # float32 fractions of integer pixel boxes may overshoot 1 by rounding


def info_codec(info: CacheInfo) -> StoreCodec:
    """The codec of the teacher targets of a cache of `info` (its store, and compact or not)."""
    return store_codec(info.store, info.num_classes, compact=info.compact)


def info_codecs(info: CacheInfo) -> tuple[StoreCodec, tuple[FeatureCodec, ...]]:
    """The codecs of a cache's stored targets: its logit store and its features."""
    return info_codec(info), feature_codecs(info.features, info.store)


# The layout: every dataset of a cache with its full shape and dtype.

def record_layout(info: CacheInfo) -> Layout:
    """Per-record shape and dtype of the per-view datasets: crop and flip (unless compact), recipe, targets,
    features."""
    crops = {} if info.compact else {"crops": ((4,), np.dtype(np.float32)), "flips": ((), np.dtype(np.uint8))}
    features = {k: v for f in feature_codecs(info.features, info.store) for k, v in f.datasets().items()}
    return {**crops, **params_codec(info.recipe).datasets(), **info_codec(info).datasets(info.num_classes),
            **features}


def layout(info: CacheInfo) -> Layout:
    """Every dataset of a cache of `info`, with its shape and dtype."""
    n, k = info.num_samples, info.num_views
    per_view = {name: ((n, k) + shape, dtype) for name, (shape, dtype) in record_layout(info).items()}
    return {"sample_ids": ((n,), np.dtype(np.int64)),
            "labels": ((n,), np.dtype(np.int64)),
            "content_hashes": ((n,), np.dtype(np.uint64)),
            "done": ((n,), np.dtype(np.uint8)),
            **per_view,
            **(witness_layout(n) if info.compact else {})}


def record_bytes(info: CacheInfo) -> float:
    """Bytes stored per (image, view): the targets, parameters and features, and the crop box and flip unless the cache is compact."""
    return sum(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize for shape, dtype in record_layout(info).values())


def record_faults(arrays: Mapping[str, np.ndarray], codec: StoreCodec, num_classes: int,
                  params: ParamsCodec | None = None, features: Sequence[FeatureCodec] = ()
                  ) -> list[tuple[str, np.ndarray]]:
    """(what is wrong, mask over the records) for every check a stored record can fail.

    `arrays` hold records in their stored form with any leading shape (a batch
    (B,) of one view, or rows (R, K)); checks of datasets not in `arrays` are
    skipped. Vectorised and cheap: the reader runs it on every batch.
    """
    faults = []
    if "crops" in arrays:
        top, left, height, width = np.moveaxis(np.asarray(arrays["crops"], dtype=np.float64), -1, 0)
        inside = ((top >= 0) & (left >= 0) & (height > 0) & (width > 0)
                  & (top + height <= 1 + BOX_SLACK) & (left + width <= 1 + BOX_SLACK))
        faults.append(("the crop box is not a box inside the image", ~inside))  # NaN fails every comparison
    if "flips" in arrays:
        faults.append(("the flip flag is not 0 or 1", np.asarray(arrays["flips"]) > 1))
    if all(name in arrays for name in codec.datasets(num_classes)):
        faults += codec.faults(arrays, num_classes)
    if params is not None:
        faults += params.faults(dict(arrays))
    for feature in features:
        if feature.dataset in arrays:
            faults += feature.faults(arrays)
    return faults


def check_datasets(h5: h5py.File, info: CacheInfo, path: Path) -> None:
    """Every dataset of the layout of `info` exists in `h5` with its shape and dtype."""
    for name, (shape, dtype) in layout(info).items():
        with worded(path, f"dataset '{name}'"):
            if name not in h5:
                raise CacheError(f"{path}: dataset '{name}' is missing")
            ds = h5[name]
            found = (ds.shape, ds.dtype)
        if found != (shape, dtype):
            raise CacheError(f"{path}: dataset '{name}' is {found[0]} {found[1]}, expected {shape} {dtype}")
