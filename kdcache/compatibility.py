"""Cache compatibility: whether a cache belongs to a run's data, and whether several caches can train one student.

:func:`check_cache_fits` compares a cache with the training split it is
replayed on (fingerprint, ids, labels, content hashes, and the image sizes a
compact cache derives its crops from); :func:`check_caches_agree` proves that
the caches of an ensemble store the same crops. Both raise one-line
CacheErrors naming the file and what differs; :mod:`kdcache.targets` runs them
before it replays a cache.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .cache import CacheReader
from .data import ImageSet
from .errors import CacheError


def _dataset_side(reader: CacheReader, train: ImageSet) -> tuple[str, np.ndarray]:
    """The split's fingerprint and content hashes under the scheme the cache recorded."""
    scheme = reader.info.content_hash
    return train.fingerprint_for(scheme), train.content_hashes_for(scheme)


def check_cache_fits(reader: CacheReader, train: ImageSet) -> None:
    """Refuse a cache made for another dataset, split or class count, saying what differs.

    Any input size fits: crop boxes are fractions of the image. A compact
    cache derives its crops from the images' sizes, so the images of its
    witness records must still decode to the sizes the dump saw.
    """
    info, path = reader.info, reader.path
    fingerprint, hashes = _dataset_side(reader, train)
    if info.dataset_fingerprint != fingerprint:
        if len(reader.sample_ids) != len(train):
            why = f"it holds {len(reader.sample_ids)} images, the training split has {len(train)}"
        elif info.num_classes != train.num_classes:
            why = f"it has {info.num_classes} classes, the dataset has {train.num_classes}"
        elif not np.array_equal(reader.sample_ids, train.ids):
            n = int(np.sum(reader.sample_ids != train.ids))
            why = f"{n} sample ids differ (another dataset, split or file names)"
        elif not np.array_equal(reader.labels, train.labels):
            row = int(np.flatnonzero(reader.labels != train.labels)[0])
            why = f"labels differ, first at {train.describe(row)}"
        elif not np.array_equal(reader.content_hashes, hashes):
            rows = np.flatnonzero(reader.content_hashes != hashes)
            why = f"{len(rows)} images changed since the dump, first {train.describe(int(rows[0]))}"
        else:
            why = "the class names differ"
        raise CacheError(f"{path} was dumped from another dataset than {train.name} ({why})")
    witness = reader.witness
    for sid, (h, w) in zip(witness.get("witness_ids", ()), witness.get("witness_sizes", ())):
        row = int(np.flatnonzero(reader.sample_ids == sid)[0])
        now = train.image_size(row)  # load()'s size, from the file's header
        if now != (h, w):
            raise CacheError(f"{path}: {train.describe(row)} decodes to {now[0]}x{now[1]} pixels, {h}x{w} when the "
                             "compact cache was dumped, so its crops would differ; dump the teacher again")


# What several caches must share to train one student together: the same crops (seed and ranges; the stored
# boxes are compared too), the same classes, and the pixels' normalisation, which the student then trains with.
SHARED_SETTINGS = ("seed", "crop_scale", "crop_ratio", "hflip", "num_classes", "mean", "std", "interpolation",
                   "recipe")
CROP_BLOCK_BYTES = 64 * 1024**2  # rows of crops compared at once: bounded memory for a cache of any size


def check_caches_agree(readers: Sequence[CacheReader]) -> None:
    """Refuse caches that cannot train one student as an ensemble, naming both files and what differs.

    Besides the settings, the stored crops and flips of the views the
    ensemble replays (the first min K) are compared bit for bit, a block of
    rows at a time: crops derive from (seed, sample id, view), so equal
    settings should give equal crops, and this proves it for the files at hand.
    A compact cache's crops are derived (and its witness checked) at open, so
    equal settings prove them equal; its witness records are still compared
    with the other cache's (stored or witness) crops of the same records.
    """
    first = readers[0]
    for other in readers[1:]:
        a, b = first.info, other.info
        both = f"{first.path} and {other.path} cannot train one student"
        same_data = np.array_equal(first.sample_ids, other.sample_ids) and np.array_equal(first.labels, other.labels)
        if not same_data or (a.content_hash == b.content_hash and a.dataset_fingerprint != b.dataset_fingerprint):
            raise CacheError(f"{both}: their dataset_fingerprint differs (dumped from other data); dump both "
                             "from the same --data")
        for name in SHARED_SETTINGS:
            mine, theirs = getattr(a, name), getattr(b, name)
            if mine != theirs:
                raise CacheError(f"{both}: their {name} differs ({_worded(mine)} vs {_worded(theirs)}); dump both "
                                 "with the same --data, --seed and crop ranges, and teachers of the same "
                                 "normalisation")
        if first.stores_crops and other.stores_crops:
            _check_same_crops(first, other, both)
        else:
            _check_witnesses(first, other, both)


def _worded(value: object) -> str:
    return ", ".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def _bits(stored: np.ndarray) -> np.ndarray:
    """The bytes of each (row, view) record of a stored per-view array, as (rows, views, bytes)."""
    return np.ascontiguousarray(stored).view(np.uint8).reshape(stored.shape[0], stored.shape[1], -1)


def _check_same_crops(first: CacheReader, other: CacheReader, both: str) -> None:
    views = min(first.info.num_views, other.info.num_views)
    rows = max(1, CROP_BLOCK_BYTES // (first.info.num_views * 4 * 4))
    try:
        for lo in range(0, first.info.num_samples, rows):
            hi = min(first.info.num_samples, lo + rows)
            for name in ("crops", "flips"):
                # Bit for bit: the boxes must be the same float32 values, not merely close ones.
                differ = (_bits(first.stored(name, lo, hi)[:, :views])
                          != _bits(other.stored(name, lo, hi)[:, :views])).any(axis=2)
                if differ.any():
                    row, view = (int(i) for i in np.argwhere(differ)[0])
                    raise CacheError(f"{both}: their stored {name} differ, first at row {lo + row} (sample id "
                                     f"{int(first.sample_ids[lo + row])}) view {view}; dump both with the same "
                                     "--data, --seed and crop ranges")
    finally:  # the handles were opened in this process; DataLoader workers open their own
        first.close()
        other.close()


def _witness_crops(reader: CacheReader) -> dict[tuple[int, int], tuple[bytes, int]]:
    """{(sample id, view): (box bits, flip)} of a compact cache's witness records."""
    w = reader.witness
    return {(int(s), int(v)): (np.asarray(box, dtype=np.float32).tobytes(), int(f))
            for s, v, box, f in zip(w["witness_ids"], w["witness_views"], w["witness_crops"], w["witness_flips"])}


def _check_witnesses(first: CacheReader, other: CacheReader, both: str) -> None:
    """The crops of the records in either cache's witness agree bit for bit, for the views both hold."""
    views = min(first.info.num_views, other.info.num_views)
    known = {reader.path: _witness_crops(reader) for reader in (first, other) if not reader.stores_crops}
    for path, records in known.items():
        against = other if path == first.path else first
        for (sid, view), (box, flip) in records.items():
            if view >= views:
                continue
            if not against.stores_crops:
                theirs = known[against.path].get((sid, view))
            else:
                row = int(np.flatnonzero(against.sample_ids == sid)[0])
                theirs = (against.stored("crops", row, row + 1)[0, view].tobytes(),
                          int(against.stored("flips", row, row + 1)[0, view]))
            if theirs is not None and theirs != (box, flip):
                raise CacheError(f"{both}: their crops differ at sample id {sid} view {view}; dump both with the "
                                 "same --data, --seed and crop ranges")
    first.close()
    other.close()
