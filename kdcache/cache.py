"""The teacher cache: one HDF5 file, a versioned contract.

Format version 1. ``N`` images of the training split, ``K`` views each, ``C``
classes. Row ``i`` of every per-sample dataset is the ``i``-th image of the
split in the dataset's stable order (see :mod:`kdcache.data`).

Datasets
--------
``sample_ids``      (N,)     int64    stable sample id of each row
``labels``          (N,)     int64    class index of each row
``content_hashes``  (N,)     uint64   per-image content hash (for fingerprint diffs)
``crops``           (N,K,4)  float32  RandomResizedCrop box as fractions of the
                                      image: top, left, height, width
``flips``           (N,K)    uint8    1 where the view is mirrored
``done``            (N,)     uint8    1 once every view of the row is written
                                      (a resumed dump skips these rows)

Teacher targets, by ``store``:

``fp16`` / ``fp32``  ``logits`` (N,K,C) float16 / float32: the raw teacher logits.
``topk:k``           ``topk_values`` (N,K,k) float16: the k largest logits,
                     ``topk_indices`` (N,K,k) int16 (int32 when C > 32767): their
                     classes, ``logsumexp`` (N,K) float32: log-sum-exp of all C
                     logits. The reader rebuilds C logits: the k kept ones, and
                     for every other class the logit that spreads the rest of the
                     probability mass (at T=1) evenly over them. Softening by a
                     temperature T then keeps that tail flat, so the
                     approximation is exact for the top k classes' order and
                     loses only the shape of the tail.

Every dataset is chunked along N only (whole images, all views), with chunks
of about 64 KiB, and allocated when the file is created, so later writes touch
raw data only and a killed dump leaves readable metadata.

Root attributes
---------------
``format_version`` (int), ``kdcache_version``, ``created`` (ISO 8601 UTC),
``complete`` (bool), ``num_samples``, ``num_views``, ``num_classes``, ``seed``,
``store``, ``teacher`` (timm name), ``teacher_checkpoint`` (path as given),
``teacher_checkpoint_sha256`` ('' when none), ``teacher_pretrained`` (bool),
``input_size``, ``mean`` (3,), ``std`` (3,), ``interpolation``, ``crop_pct``,
``crop_scale`` (2,), ``crop_ratio`` (2,), ``hflip``, ``dataset_name``,
``dataset_split``, ``dataset_fingerprint`` (SHA-256 hex, see kdcache.data),
``class_names`` (JSON list), ``library_versions`` (JSON object).

A dump writes ``OUT.partial`` and renames it to ``OUT`` when complete. The file
holds no pickled objects.

Part files (a dump by several processes under torchrun)
-------------------------------------------------------
Rank ``r`` of ``W`` processes dumps the rows ``row % W == r`` into its own part
file ``OUT.rank{r}-of-{W}`` (written as ``OUT.rank{r}-of-{W}.partial``,
resumable exactly like ``OUT.partial``). A part is a cache of this format over
those rows, in order: ``num_samples`` is its row count, every other attribute
is the whole dump's (``dataset_fingerprint`` included), and two root
attributes are added: ``part_rank`` (int, r) and ``part_world_size`` (int, W).
When all W parts are complete, rank 0 copies their stored values, bit for bit
and in row order, into ``OUT.partial`` (an ordinary resumable cache over all N
rows, without the part attributes), renames it to ``OUT`` and then deletes the
parts. ``OUT`` is therefore the same file a single process writes: equal ids,
labels, crops and flips, and logits equal up to the float rounding of a
different batch composition (see :mod:`kdcache.parts`).
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import h5py
import numpy as np

from .errors import CacheError

FORMAT_VERSION = 1
_CHUNK_BYTES = 64 * 1024
# A cache smaller than this is read into memory by default; reads then cost nothing.
PRELOAD_LIMIT_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class CacheInfo:
    """Everything a cache records about how it was made (the root attributes)."""

    num_samples: int
    num_views: int
    num_classes: int
    seed: int
    store: str
    teacher: str
    teacher_checkpoint: str
    teacher_checkpoint_sha256: str
    teacher_pretrained: bool
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip: float
    dataset_name: str
    dataset_split: str
    dataset_fingerprint: str
    class_names: tuple[str, ...]

    def settings(self) -> dict:
        """The fields a resumed dump must agree on (all but the checkpoint path)."""
        d = asdict(self)
        d.pop("teacher_checkpoint")
        return d


def parse_store(store: str) -> tuple[str, int]:
    """('fp16', 0), ('fp32', 0) or ('topk', k) from a --store value."""
    if store in ("fp16", "fp32"):
        return store, 0
    if store.startswith("topk:"):
        try:
            k = int(store[5:])
        except ValueError:
            k = 0
        if k >= 1:
            return "topk", k
    raise CacheError(f"--store must be fp16, fp32 or topk:K with K >= 1, got '{store}'")


def _library_versions() -> str:
    import timm
    import torch

    from . import __version__

    return json.dumps({"kdcache": __version__, "torch": torch.__version__, "timm": timm.__version__,
                       "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version, "numpy": np.__version__})


def _target_layout(info: CacheInfo) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    n, k, c = info.num_samples, info.num_views, info.num_classes
    kind, top = parse_store(info.store)
    if kind == "topk":
        if top > c:
            raise CacheError(f"--store topk:{top} keeps more classes than the teacher has ({c})")
        index_dtype = np.dtype(np.int16) if c <= 32767 else np.dtype(np.int32)
        return {"topk_values": ((n, k, top), np.dtype(np.float16)),
                "topk_indices": ((n, k, top), index_dtype),
                "logsumexp": ((n, k), np.dtype(np.float32))}
    return {"logits": ((n, k, c), np.dtype(np.float16 if kind == "fp16" else np.float32))}


def _layout(info: CacheInfo) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    n, k = info.num_samples, info.num_views
    return {"sample_ids": ((n,), np.dtype(np.int64)),
            "labels": ((n,), np.dtype(np.int64)),
            "content_hashes": ((n,), np.dtype(np.uint64)),
            "crops": ((n, k, 4), np.dtype(np.float32)),
            "flips": ((n, k), np.dtype(np.uint8)),
            "done": ((n,), np.dtype(np.uint8)),
            **_target_layout(info)}


def record_bytes(info: CacheInfo) -> float:
    """Bytes stored per (image, view): targets, crop box and flip."""
    total = 0
    for name, (shape, dtype) in _target_layout(info).items():
        total += int(np.prod(shape[2:], dtype=np.int64)) * dtype.itemsize
    return total + 4 * 4 + 1


def compress_logits(logits: np.ndarray, store: str) -> dict[str, np.ndarray]:
    """Teacher logits (..., C) in float32 as the arrays of `store`."""
    kind, top = parse_store(store)
    if kind == "fp16":
        return {"logits": logits.astype(np.float16)}
    if kind == "fp32":
        return {"logits": logits.astype(np.float32)}
    order = np.argsort(-logits, axis=-1, kind="stable")[..., :top]
    values = np.take_along_axis(logits, order, axis=-1)
    peak = logits.max(axis=-1, keepdims=True)
    lse = (peak + np.log(np.exp(logits - peak).sum(axis=-1, keepdims=True)))[..., 0]
    index_dtype = np.int16 if logits.shape[-1] <= 32767 else np.int32
    return {"topk_values": values.astype(np.float16), "topk_indices": order.astype(index_dtype),
            "logsumexp": lse.astype(np.float32)}


def expand_logits(arrays: dict[str, np.ndarray], num_classes: int) -> np.ndarray:
    """Full float32 logits (..., C) from the arrays of any store."""
    if "logits" in arrays:
        return arrays["logits"].astype(np.float32)
    values = arrays["topk_values"].astype(np.float32)
    index = arrays["topk_indices"].astype(np.int64)
    lse = arrays["logsumexp"].astype(np.float32)[..., None]
    top = values.shape[-1]
    if top >= num_classes:
        out = np.empty(values.shape[:-1] + (num_classes,), dtype=np.float32)
        np.put_along_axis(out, index, values, axis=-1)
        return out
    kept = np.exp(values - lse).sum(axis=-1, keepdims=True)
    rest = np.clip(1.0 - kept, 1e-12, None) / (num_classes - top)
    out = np.broadcast_to(lse + np.log(rest), values.shape[:-1] + (num_classes,)).copy()
    np.put_along_axis(out, index, values, axis=-1)
    return out


def plain_attr(value: object) -> object:
    """An HDF5 attribute value as a plain Python value."""
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, (np.ndarray, np.generic)):
        return value.tolist()
    return value


def settings_mismatch(found: dict, wanted: dict) -> str:
    """The first three settings of `wanted` that `found` differs in, worded; '' when none does."""
    diff = [k for k in wanted if found.get(k) != wanted[k]]
    return ", ".join(f"{k}: {found.get(k)!r} in the file, {wanted[k]!r} now" for k in diff[:3])


def _info_from_attrs(attrs: h5py.AttributeManager, path: Path) -> CacheInfo:
    values = {}
    for f in fields(CacheInfo):
        if f.name not in attrs:
            raise CacheError(f"{path}: attribute '{f.name}' is missing; the file is not a complete kdcache cache")
        v = attrs[f.name]
        if f.name == "class_names":
            v = tuple(json.loads(v))
        elif isinstance(v, np.ndarray):
            v = tuple(float(x) for x in v)
        elif isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, (np.integer, np.bool_, np.floating)):
            v = v.item()
        values[f.name] = v
    return CacheInfo(**values)


def _check_layout(h5: h5py.File, info: CacheInfo, path: Path) -> None:
    for name, (shape, dtype) in _layout(info).items():
        if name not in h5:
            raise CacheError(f"{path}: dataset '{name}' is missing")
        ds = h5[name]
        if ds.shape != shape or ds.dtype != dtype:
            raise CacheError(f"{path}: dataset '{name}' is {ds.shape} {ds.dtype}, expected {shape} {dtype}")


def _io_reason(e: BaseException) -> str:
    """A short reason for a failed write; 'the disk is full' when it is."""
    text = str(e)
    if getattr(e, "errno", None) == errno.ENOSPC or "errno = 28" in text or "No space left" in text:
        return "the disk is full (no space left on device)"
    return text.split(" (")[0]


def _open_h5(path: Path, mode: str) -> h5py.File:
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise CacheError(f"cache {path} does not exist") from None
    except OSError as e:
        raise CacheError(f"cannot open cache {path}: not a readable HDF5 file ({str(e).split('(')[0].strip()})") from None


class CacheWriter:
    """Writes a cache to ``OUT.partial``, resumably, and renames it to ``OUT`` when complete.

    A partial file left by an interrupted dump is resumed when its recorded
    settings equal this dump's; rows already marked done are skipped.
    """

    def __init__(self, path: str | Path, info: CacheInfo, sample_ids: np.ndarray, labels: np.ndarray,
                 content_hashes: np.ndarray, force: bool = False, extra_attrs: dict | None = None) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.info = info
        self.extra_attrs = dict(extra_attrs or {})  # e.g. a part file's rank; checked on resume like the settings
        if self.path.exists() and not force:
            raise CacheError(f"{self.path} already exists; pass --force to overwrite it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.h5 = None
        if self.partial.exists():
            try:
                self.h5 = self._resume()
            except CacheError:
                if not force:
                    raise
                self.partial.unlink()  # --force: a partial dump of other settings is discarded
        if self.h5 is None:
            self.h5 = self._create(sample_ids, labels, content_hashes)
        # Dataset handles stay open for the whole dump: h5py writes chunks back when a handle is
        # released and ignores errors there, so a temporary handle per write could lose data on a
        # full disk without a word. With open handles, the flush below reports every failure.
        self._datasets = {name: self.h5[name] for name in _layout(self.info)}
        self._done = self._datasets["done"][:].astype(bool)

    def _create(self, sample_ids: np.ndarray, labels: np.ndarray, content_hashes: np.ndarray) -> h5py.File:
        h5 = _open_h5(self.partial, "w")
        try:
            for key, value in asdict(self.info).items():
                h5.attrs[key] = json.dumps(list(value)) if key == "class_names" else value
            h5.attrs["format_version"] = FORMAT_VERSION
            h5.attrs["kdcache_version"] = json.loads(_library_versions())["kdcache"]
            h5.attrs["library_versions"] = _library_versions()
            h5.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            h5.attrs["complete"] = False
            for key, value in self.extra_attrs.items():
                h5.attrs[key] = value
            for name, (shape, dtype) in _layout(self.info).items():
                per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
                rows = max(1, min(shape[0], _CHUNK_BYTES // per_row))
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_chunk((rows,) + shape[1:])
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                space = h5py.h5s.create_simple(shape)
                h5py.h5d.create(h5.id, name.encode(), h5py.h5t.py_create(dtype), space, dcpl=dcpl)
            h5["sample_ids"][:] = sample_ids
            h5["labels"][:] = labels
            h5["content_hashes"][:] = content_hashes
            h5["done"][:] = 0
            h5.flush()
            # Reserve the disk space of the whole cache now: a full disk then fails here, at the
            # start, rather than after hours of teacher time.
            with open(self.partial, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, h5.id.get_filesize())
        except (OSError, RuntimeError) as e:
            try:
                h5.close()
            except (OSError, RuntimeError):
                pass
            self.partial.unlink(missing_ok=True)  # it holds no teacher output yet: nothing to resume
            raise CacheError(f"cannot create {self.partial}: {_io_reason(e)}") from None
        return h5

    def _resume(self) -> h5py.File:
        try:
            h5 = _open_h5(self.partial, "r+")
        except CacheError:
            raise CacheError(f"{self.partial} is not a readable partial dump; delete it (or pass --force) to start "
                             "over") from None
        try:
            found = _info_from_attrs(h5.attrs, self.partial).settings()
        except CacheError:
            h5.close()
            raise CacheError(f"{self.partial} is not a resumable kdcache dump; delete it (or pass --force) to start "
                             "over") from None
        wanted = self.info.settings()
        found.update({k: plain_attr(h5.attrs.get(k)) for k in self.extra_attrs})
        wanted.update(self.extra_attrs)
        detail = settings_mismatch(found, wanted)
        if detail:
            h5.close()
            raise CacheError(f"{self.partial} was started with different settings ({detail}); "
                             "re-run the original command to resume it, or pass --force to start over")
        _check_layout(h5, self.info, self.partial)
        return h5

    @property
    def resumed_rows(self) -> int:
        return int(self._done.sum())

    def pending_rows(self) -> np.ndarray:
        """Rows still to compute, in order."""
        return np.flatnonzero(~self._done)

    def write(self, rows: np.ndarray, crops: np.ndarray, flips: np.ndarray, logits: np.ndarray) -> None:
        """Store all K views of `rows` (increasing), then mark them done and flush."""
        self.write_stored(rows, {"crops": crops.astype(np.float32), "flips": flips.astype(np.uint8),
                                 **compress_logits(logits, self.info.store)})

    def write_stored(self, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Store `rows` (increasing) from arrays already in the stored form (crops, flips, targets); mark them done.

        Copying a part file into the merged cache goes through here, so its
        stored values (fp16, top-k) are copied bit for bit, never re-encoded.
        """
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        contiguous = hi - lo == len(rows)
        where = slice(lo, hi) if contiguous else rows
        try:
            for name, value in arrays.items():
                self._datasets[name][where] = value
            self.h5.flush()  # the data reaches the file before the rows count as done
            self._datasets["done"][where] = 1
            self.h5.flush()
        except (OSError, RuntimeError) as e:  # h5py reports a failed flush as RuntimeError
            raise CacheError(f"writing {self.partial} failed: {_io_reason(e)}; fix that and re-run the same "
                             "command to resume") from None
        self._done[rows] = True

    def finish(self) -> Path:
        """Mark the cache complete and move it to its final name."""
        if not self._done.all():
            raise CacheError(f"{self.partial}: {int((~self._done).sum())} rows are not written yet")
        try:
            self.h5.attrs["complete"] = True
            self.h5.flush()
            self._datasets.clear()
            self.h5.close()
        except (OSError, RuntimeError) as e:
            raise CacheError(f"finishing {self.partial} failed: {_io_reason(e)}; fix that and re-run "
                             "the same command") from None
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close the file; after a failed write, closing may fail too, and that is not news."""
        hook = sys.unraisablehook
        sys.unraisablehook = lambda _: None  # h5py reports failed write-backs of released handles here
        try:
            self._datasets.clear()
            if self.h5.id.valid:
                self.h5.close()
        except (OSError, RuntimeError):
            pass
        finally:
            sys.unraisablehook = hook


class CacheReader:
    """Reads crops and teacher targets; opens the file lazily, once per process.

    Validation happens in the constructor (in the parent process), so a bad
    file fails before any worker starts. The HDF5 handle itself is opened on
    first read, which in a DataLoader worker is after the fork.
    """

    def __init__(self, path: str | Path, preload: bool | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = f"; {partial} exists: the dump did not finish, re-run it to resume" if partial.exists() else ""
            raise CacheError(f"cache {self.path} does not exist{hint}")
        with _open_h5(self.path, "r") as h5:
            self.info = self._validate(h5)
            self.sample_ids = h5["sample_ids"][:]
            self.labels = h5["labels"][:]
            self.content_hashes = h5["content_hashes"][:]
            self.attrs = {k: plain_attr(v) for k, v in h5.attrs.items()}
        self.target_names = tuple(_target_layout(self.info))
        size = os.path.getsize(self.path)
        self.preload = size <= PRELOAD_LIMIT_BYTES if preload is None else preload
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        self._memory: dict[str, np.ndarray] | None = None

    def _validate(self, h5: h5py.File) -> CacheInfo:
        version = h5.attrs.get("format_version")
        if version is None:
            raise CacheError(f"{self.path}: no 'format_version' attribute; this is not a kdcache cache")
        if int(version) != FORMAT_VERSION:
            raise CacheError(f"{self.path}: cache format version {int(version)}, but this kdcache reads version "
                             f"{FORMAT_VERSION}; re-dump the teacher with this version")
        info = _info_from_attrs(h5.attrs, self.path)
        _check_layout(h5, info, self.path)
        if not bool(h5.attrs.get("complete", False)) or not h5["done"][:].all():
            raise CacheError(f"{self.path}: the cache is incomplete; re-run dump-teacher to finish it")
        return info

    @property
    def file_size(self) -> int:
        return os.path.getsize(self.path)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"] = None  # never carry an open HDF5 handle across a fork or pickle
        state["_pid"] = None
        return state

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            self._h5 = _open_h5(self.path, "r")
            self._pid = os.getpid()
        return self._h5

    def _arrays(self) -> dict[str, h5py.Dataset | np.ndarray]:
        names = ("crops", "flips") + self.target_names
        if self.preload:
            if self._memory is None:
                h5 = self._file()
                self._memory = {name: h5[name][:] for name in names}
            return self._memory
        h5 = self._file()
        return {name: h5[name] for name in names}

    def read(self, rows: np.ndarray, view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Crops (B,4), flips (B,) and full float32 logits (B,C) of view `view` for `rows`.

        Rows are read in sorted order (as HDF5 requires) and returned in the
        order asked.
        """
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows, kind="stable")
        sorted_rows = rows[order]
        unique, inverse = np.unique(sorted_rows, return_inverse=True)
        arrays = self._arrays()
        picked = {name: np.asarray(ds[unique, view] if self.preload else ds[unique.tolist(), view])
                  for name, ds in arrays.items()}
        undo = np.empty_like(order)
        undo[order] = np.arange(len(order))
        picked = {name: value[inverse][undo] for name, value in picked.items()}
        logits = expand_logits({k: picked[k] for k in self.target_names}, self.info.num_classes)
        return picked["crops"], picked["flips"].astype(bool), logits

    def stored(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of dataset `name` exactly as stored (to copy a cache bit for bit)."""
        return self._file()[name][start:stop]

    def read_all_logits(self, view: int) -> np.ndarray:
        """Full float32 logits (N,C) of one view (for inspection and verification)."""
        return self.read(np.arange(self.info.num_samples), view)[2]

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None
