"""Reading a cache: validated once on open, then crops and teacher logits per batch, lazily per process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import h5py
import numpy as np

from .. import __version__
from ..augment import sample_crops
from ..config import CropRanges
from ..errors import CacheError
from ..report import Progress
from .format import FORMAT_VERSION, READ_VERSIONS, CacheInfo, attr_error, check_datasets, info_codecs, \
    info_from_attrs, plain_attr, record_bytes, record_faults, record_layout
from .hdf5 import DAMAGED, DamagedChunk, FileIdentity, open_h5, read_rows, worded
from .params import params_codec
from .witness import witness_layout, witness_mismatch

# A cache smaller than this is read into memory by default; reads then cost nothing.
PRELOAD_LIMIT_BYTES = 2 * 1024**3
SCAN_BLOCK_BYTES = 64 * 1024**2  # rows a scan reads at once: bounded memory for a cache of any size
EXAMPLES = 5  # bad records a scan names


@dataclass
class RecordScan:
    """What a check of every stored record found."""

    records: int = 0
    bad_records: int = 0
    first_bad: list[str] = field(default_factory=list)  # the first few, worded: where and what

    @property
    def ok(self) -> bool:
        return self.bad_records == 0

    def add(self, count: int, examples: list[str]) -> None:
        self.bad_records += count
        self.first_bad += examples[:EXAMPLES - len(self.first_bad)]


class CacheReader:
    """Reads crops and teacher targets; opens the file lazily, once per process.

    Validation happens in the constructor (in the parent process), so a bad
    file fails before any worker starts: every attribute's type and range,
    the datasets' shapes and dtypes, the labels and that the dump is complete.
    The HDF5 handle itself is opened on first read, which in a DataLoader
    worker is after the fork; a file that is not the one validated (replaced
    or modified since) is refused then. Every batch read checks its records'
    values (finite logits, boxes inside the image, ...), and HDF5 checks each
    chunk's checksum in files that have them.

    A compact cache (format version 2) stores no crops: :meth:`read` derives
    them from ``(seed, sample id, view)`` and the image sizes it is given, and
    the constructor re-derives the file's witness records and refuses the
    file when this kdcache would derive other crops than the dump did.
    """

    def __init__(self, path: str | Path, preload: bool | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = f"; {partial} exists: the dump did not finish, re-run it to resume" if partial.exists() else ""
            raise CacheError(f"cache {self.path} does not exist{hint}")
        h5 = open_h5(self.path, "r")
        try:
            self.identity = FileIdentity.of(h5, self.path)
            self.info = self._validate(h5)
            self.sample_ids = read_rows(self._dataset(h5, "sample_ids"), self.path, slice(None))
            self.labels = read_rows(self._dataset(h5, "labels"), self.path, slice(None))
            self.content_hashes = read_rows(self._dataset(h5, "content_hashes"), self.path, slice(None))
            # A compact cache's witness: a few crops as the dump derived them (empty when crops are stored).
            self.witness = {name: read_rows(self._dataset(h5, name), self.path, slice(None))
                            for name in (witness_layout(self.info.num_samples) if self.info.compact else {})}
            with worded(self.path, "the root attributes"):
                self.attrs = {k: plain_attr(v) for k, v in h5.attrs.items()}
        finally:
            h5.close()
        self.codec, self.features = info_codecs(self.info)
        self.store_names = tuple(self.codec.datasets(self.info.num_classes))  # the logit store's datasets
        # Every stored target: the store's, then the features' (copied, checked and scanned alike).
        self.target_names = self.store_names + tuple(f.dataset for f in self.features)
        # The per-view datasets: crops and flips (unless compact), then the targets.
        self.record_names = tuple(record_layout(self.info))
        self.params = params_codec(self.info.recipe)  # the recipe's per-view parameters, part of record_names
        self.recipe = self.params.recipe
        self.ranges = CropRanges(scale=self.info.crop_scale, ratio=self.info.crop_ratio, hflip=self.info.hflip)
        differ = witness_mismatch(self.info, self.witness) if self.info.compact else ""
        if differ:
            written = self.attrs.get("kdcache_version", "an unknown version")
            hint = f"read it with kdcache {written}, which wrote it, or dump it again" if written != __version__ else \
                f"kdcache {written} wrote it, so its witness is damaged; dump it again"
            raise CacheError(f"{self.path}: this kdcache derives other crops than the dump of this compact cache did "
                             f"({differ}); {hint}")
        outside = np.flatnonzero((self.labels < 0) | (self.labels >= self.info.num_classes))
        if len(outside):
            raise CacheError(f"{self.path}: dataset 'labels' holds class {int(self.labels[outside[0]])} at row "
                             f"{int(outside[0])}, outside [0, {self.info.num_classes}); {DAMAGED}")
        self.preload = self.identity.size <= PRELOAD_LIMIT_BYTES if preload is None else preload
        self._h5: h5py.File | None = None
        self._pid: int | None = None
        self._memory: dict[str, np.ndarray] | None = None
        self._handles: dict[str, h5py.Dataset] = {}

    def _validate(self, h5: h5py.File) -> CacheInfo:
        with worded(self.path, "the root attributes"):
            names = list(h5.attrs)
        attrs = {}
        for name in names:
            with worded(self.path, f"attribute '{name}'"):
                attrs[name] = h5.attrs[name]
        version = attrs.get("format_version")
        if version is None:
            raise CacheError(f"{self.path}: no 'format_version' attribute; this is not a kdcache cache")
        if isinstance(version, (bool, np.bool_)) or not isinstance(version, (int, np.integer)):
            raise CacheError(f"{self.path}: {attr_error('format_version', version, 'an integer')}; the file is "
                             "damaged or was not written by kdcache")
        if int(version) not in READ_VERSIONS:
            known = " and ".join(str(v) for v in READ_VERSIONS)
            hint = "upgrade kdcache to read it" if int(version) > FORMAT_VERSION else "re-dump the teacher"
            raise CacheError(f"{self.path}: cache format version {int(version)}, but this kdcache reads versions "
                             f"{known}; {hint}")
        try:
            info = info_from_attrs(attrs)
        except ValueError as e:
            raise CacheError(f"{self.path}: {e}; the file is damaged or was not written by kdcache") from None
        check_datasets(h5, info, self.path)
        complete = attrs.get("complete", False)
        if not isinstance(complete, (bool, np.bool_)):
            raise CacheError(f"{self.path}: {attr_error('complete', complete, 'a boolean')}; {DAMAGED}")
        if not complete or not read_rows(self._dataset(h5, "done"), self.path, slice(None)).all():
            raise CacheError(f"{self.path}: the cache is incomplete; re-run dump-teacher to finish it")
        return info

    @property
    def file_size(self) -> int:
        return os.path.getsize(self.path)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_h5"] = None  # never carry an open HDF5 handle across a fork or pickle
        state["_pid"] = None
        state["_handles"] = {}
        return state

    def _file(self) -> h5py.File:
        if self._h5 is None or self._pid != os.getpid():
            h5 = open_h5(self.path, "r")
            change = self.identity.changes(FileIdentity.of(h5, self.path))
            if change:  # e.g. a worker of the next epoch, after the cache was re-dumped under the same name
                h5.close()
                raise CacheError(f"{self.path} changed on disk since the run started ({change}); restart the run")
            self._h5, self._pid, self._handles = h5, os.getpid(), {}
        return self._h5

    def _dataset(self, h5: h5py.File, name: str) -> h5py.Dataset:
        with worded(self.path, f"dataset '{name}'"):
            return h5[name]

    @property
    def stores_crops(self) -> bool:
        """False for a compact cache: its crops are derived from (seed, sample id, view) and the image size."""
        return not self.info.compact

    def _arrays(self) -> dict[str, h5py.Dataset | np.ndarray]:
        names = self.record_names
        h5 = self._file() if self._memory is None else None
        if not self.preload:
            if set(names) - self._handles.keys():  # opened once per process: h5py's lookup costs more than a read's checks
                self._handles = {name: self._dataset(h5, name) for name in names}
            return self._handles
        if self._memory is None:
            memory = {name: read_rows(self._dataset(h5, name), self.path, slice(None)) for name in names}
            # Checked once here, so reads from memory need no checks.
            rows = max(1, SCAN_BLOCK_BYTES // max(1, int(record_bytes(self.info)) * self.info.num_views))
            for lo in range(0, self.info.num_samples, rows):
                block = {name: a[lo:lo + rows] for name, a in memory.items()}
                self._refuse_faults(block, np.arange(lo, lo + len(block[names[0]])))
            self._memory = memory
        return self._memory

    def _record(self, row: int, view: int) -> str:
        return f"row {row} (sample id {int(self.sample_ids[row])}) view {view}"

    def _faults(self, arrays: dict[str, np.ndarray], rows: np.ndarray,
                view: int | None) -> tuple[np.ndarray, list[str]]:
        """The mask of invalid records in `arrays` (records of `rows`, one view or all) and the first few, worded."""
        bad = None
        examples = []
        for what, mask in record_faults(arrays, self.codec, self.info.num_classes, self.params, self.features):
            bad = mask if bad is None else bad | mask
            for hit in np.argwhere(mask)[:EXAMPLES - len(examples)]:
                examples.append(f"{self._record(int(rows[hit[0]]), view if view is not None else int(hit[1]))}: {what}")
        return bad, examples

    def _refuse_faults(self, arrays: dict[str, np.ndarray], rows: np.ndarray, view: int | None = None) -> None:
        bad, examples = self._faults(arrays, rows, view)
        if examples:
            raise CacheError(f"{self.path}: {examples[0]}; {DAMAGED}")

    def read(self, rows: np.ndarray, view: int,
             sizes: Sequence[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Crops (B,4), flips (B,) and full float32 logits (B,C) of view `view` for `rows` (see :meth:`read_records`)."""
        records = self.read_records(rows, view, sizes)
        return records["crops"], records["flips"], records["teacher_logits"]

    def read_records(self, rows: np.ndarray, view: int,
                     sizes: Sequence[tuple[int, int]] | None = None) -> dict:
        """The records of view `view` for `rows`: ``crops`` (B,4), ``flips`` (B,) bool, the recipe's
        parameters (B, ...) as stored, ``teacher_logits``, full float32 (B,C), and ``features``, the stored
        teacher features as float32 by kind: ``{'pooled': (B,D), 'attention': (B,S,S)}`` ({} when none).

        Rows are read in sorted order (as HDF5 requires) and returned in the
        order asked. An invalid record (non-finite logits, a box outside the
        image, ...) or a chunk that fails its checksum is a CacheError naming it.
        A compact cache derives the crops from `sizes`, the (height, width) of
        each row's image, which it then needs (a cache that stores crops ignores them).
        """
        rows = np.asarray(rows, dtype=np.int64)
        records = self._read_records(rows, view)
        if not self.stores_crops:
            if sizes is None or len(sizes) != len(rows):
                raise ValueError(f"{self.path} is a compact cache: read() needs the (height, width) of each row's "
                                 "image to derive its crops")
            boxes, flips = sample_crops(self.info.seed, self.sample_ids[rows], list(sizes), view, self.ranges)
            records.update(crops=boxes, flips=flips)
        return records

    def read_logits(self, rows: np.ndarray, view: int) -> np.ndarray:
        """Full float32 logits (B,C) of view `view` for `rows` (in the order asked), without their crops."""
        return self._read_records(np.asarray(rows, dtype=np.int64), view)["teacher_logits"]

    def _read_records(self, rows: np.ndarray, view: int) -> dict:
        """The stored records of `rows` (no crops and flips in a compact cache), with the decoded logits and
        features."""
        order = np.argsort(rows, kind="stable")
        unique, inverse = np.unique(rows[order], return_inverse=True)
        arrays = self._arrays()
        if self.preload:
            picked = {name: a[unique, view] for name, a in arrays.items()}
        else:
            picked = {name: read_rows(ds, self.path, unique, view) for name, ds in arrays.items()}
            self._refuse_faults(picked, unique, view)
        undo = np.empty_like(order)
        undo[order] = np.arange(len(order))
        picked = {name: value[inverse][undo] for name, value in picked.items()}
        logits = self.codec.decode({k: picked[k] for k in self.store_names}, self.info.num_classes)
        records = {name: picked[name] for name in self.params.names}
        if self.stores_crops:
            records.update(crops=picked["crops"], flips=picked["flips"].astype(bool))
        return {**records, "teacher_logits": logits, "features": {f.kind: f.decode(picked) for f in self.features}}

    def stored(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` of dataset `name` exactly as stored (to copy a cache bit for bit)."""
        return read_rows(self._dataset(self._file(), name), self.path, slice(start, stop))

    def read_all_logits(self, view: int) -> np.ndarray:
        """Full float32 logits (N,C) of one view (for inspection and verification)."""
        return self.read_logits(np.arange(self.info.num_samples), view)

    def scan(self, visit: Callable[[int, dict[str, np.ndarray], np.ndarray], None] | None = None,
             progress: Progress | None = None) -> RecordScan:
        """Check every stored record, a block of rows at a time; never raises for a bad record.

        Counts records with invalid values and rows in chunks that cannot be
        read (a checksum mismatch). `visit(first_row, arrays, valid)` sees each
        block's stored per-view arrays (rows, K, ...) and the mask (rows, K) of
        its valid records.
        """
        progress = progress or Progress()
        names = self.record_names
        h5 = self._file()
        step = min((chunks[0] for chunks in (self._dataset(h5, name).chunks for name in names) if chunks), default=1)
        per_row = max(1, int(record_bytes(self.info)) * self.info.num_views)
        block = max(step, SCAN_BLOCK_BYTES // per_row // step * step)
        result = RecordScan(records=self.info.num_samples * self.info.num_views)
        progress.start("check records", self.info.num_samples)
        for lo in range(0, self.info.num_samples, block):
            hi = min(self.info.num_samples, lo + block)
            self._scan_rows(lo, hi, step, names, result, visit)
            progress.update(hi - lo)
        progress.stop()
        return result

    def _scan_rows(self, lo: int, hi: int, step: int, names: tuple[str, ...], result: RecordScan,
                   visit: Callable | None) -> None:
        try:
            arrays = {name: self.stored(name, lo, hi) for name in names}
        except DamagedChunk as e:
            if hi - lo > step:  # find the damaged chunks; the others still count
                for sub in range(lo, hi, step):
                    self._scan_rows(sub, min(hi, sub + step), step, names, result, visit)
            else:
                result.add((hi - lo) * self.info.num_views, [f"rows {lo}..{hi - 1}: {e.what}"])
            return
        bad, examples = self._faults(arrays, np.arange(lo, hi), None)
        result.add(int(bad.sum()), examples)
        if visit is not None:
            visit(lo, arrays, ~bad)

    def close(self) -> None:
        self._handles = {}
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

