"""Writing a cache: checked before any file exists, resumable, crash-safe and renamed into place when complete."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import glob
import json
import os
import socket
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from ..report import Progress
from .features import encode_features
from .format import CHUNK_BYTES, CacheInfo, check_datasets, file_version, info_attrs, info_codecs, info_from_attrs, \
    layout, library_versions, plain_attr, record_bytes, record_faults, settings_mismatch
from .hdf5 import CHECKSUM_FAILED, H5_ERRORS, detail, quiet_release, worded
from .reader import CacheReader
from .params import params_codec
from .witness import witness_mismatch

_FLETCHER32_SKIPPED = 1  # a chunk's filter mask with the pipeline's first (and only) filter, fletcher32, not applied
_COPY_BLOCK_BYTES = 64 * 1024**2  # rows a growth copies per pass: bounded memory for a cache of any size


def temporary_name(partial: Path) -> Path:
    """Where this process builds `partial` before renaming it: ``OUT.partial.tmp-{host}-{pid}``."""
    return partial.with_name(f"{partial.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(partial: Path) -> None:
    """Delete temporaries of `partial` left by dead processes of this host (they may hold reserved space)."""
    prefix = f"{partial.name}.tmp-"
    host = socket.gethostname()
    for path in partial.parent.glob(glob.escape(prefix) + "*"):
        owner, _, pid = path.name[len(prefix):].rpartition("-")
        if owner == host and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
            path.unlink(missing_ok=True)


def growth_mismatch(source: CacheReader, info: CacheInfo, sample_ids: np.ndarray) -> str:
    """How the cache `source` differs from the dump `info` in anything but the view count, worded; '' if in nothing.

    A cache that differs only in having fewer views is the first views of the
    dump `info`: views derive from (seed, sample id, view), so it can grow.
    """
    found = dataclasses.replace(source.info, num_views=info.num_views).settings()
    differ = settings_mismatch(found, info.settings())
    if not differ and not np.array_equal(source.sample_ids, sample_ids):
        differ = "the sample ids differ"
    return differ


def _make_folder(partial: Path) -> None:
    folder = partial.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTDIR):
            blocker = next((p for p in reversed([folder, *folder.parents]) if p.exists() and not p.is_dir()), folder)
            raise CacheError(f"cannot create {partial}: {blocker} is not a folder") from None
        raise CacheError(f"cannot create {partial}: {detail(e)}") from None


class CacheWriter:
    """Writes a cache to ``OUT.partial``, resumably, and renames it to ``OUT`` when complete.

    Everything that can be checked without the disk (the store, every
    setting, the row counts) is checked before any file is made, so a refused
    dump leaves nothing behind. ``OUT.partial`` appears only with complete
    metadata (it is built under a temporary name), and a partial file left by
    an interrupted dump is resumed when its recorded settings equal this
    dump's; rows already marked done are skipped.

    With `grow_from`, a complete cache of the same settings but fewer views
    (K of ``info.num_views``), the new file starts as that cache's K views,
    copied bit for bit before ``OUT.partial`` appears, and the writes fill
    views K and up only. The partial records ``grown_from_views`` = K, so a
    growth killed at any instant resumes, and `grow_from`'s own file (which
    may be OUT itself) is replaced only by the complete grown cache.
    A compact cache (no crops or flips) needs its `witness` (see :mod:`~kdcache.cache.witness`).
    """

    def __init__(self, path: str | Path, info: CacheInfo, sample_ids: np.ndarray, labels: np.ndarray,
                 content_hashes: np.ndarray, force: bool = False, extra_attrs: dict | None = None,
                 grow_from: CacheReader | None = None, progress: Progress | None = None,
                 witness: dict[str, np.ndarray] | None = None) -> None:
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.info = info
        try:
            self.codec, self.features = info_codecs(info)
            info_from_attrs(info_attrs(info))
        except ValueError as e:
            raise CacheError(f"cannot create {self.partial}: {e}") from None
        self.params = params_codec(info.recipe)
        self.witness = dict(witness or {}) if info.compact else {}
        differ = witness_mismatch(info, self.witness) if info.compact else ""
        if differ:
            raise CacheError(f"cannot create {self.partial}: the crop witness of a compact cache is wrong ({differ})")
        for name, values in (("sample ids", sample_ids), ("labels", labels), ("content hashes", content_hashes)):
            if len(values) != info.num_samples:
                raise CacheError(f"cannot create {self.partial}: {len(values)} {name} for {info.num_samples} samples")
        self.layout = layout(info)
        self.extra_attrs = dict(extra_attrs or {})  # e.g. a part file's rank; checked on resume like the settings
        self.grow_from, self.progress = grow_from, progress or Progress()
        self.first_view = 0  # the views before it are copied from `grow_from`, never written
        if grow_from is not None:
            self.first_view = grow_from.info.num_views
            differ = growth_mismatch(grow_from, info, sample_ids)
            if not differ and self.first_view >= info.num_views:
                differ = f"num_views: {self.first_view} in the file, {info.num_views} now; a cache only grows"
            if differ:
                raise CacheError(f"cannot grow {grow_from.path} into {self.path} ({differ})")
            self.extra_attrs["grown_from_views"] = self.first_view
        replaced = grow_from is not None and grow_from.path.resolve() == self.path.resolve()
        if self.path.exists() and not force and not replaced:
            raise CacheError(f"{self.path} already exists; pass --force to overwrite it")
        _make_folder(self.partial)
        remove_stale_temporaries(self.partial)
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
        self._datasets = {name: self.h5[name] for name in self.layout}
        try:
            self._done = self._read_done()
        except CacheError:
            self.close()
            raise

    def _create(self, sample_ids: np.ndarray, labels: np.ndarray, content_hashes: np.ndarray) -> h5py.File:
        temporary = temporary_name(self.partial)
        h5 = None
        try:
            os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666))  # errno words, not HDF5's
            h5 = h5py.File(temporary, "w")
            for key, value in info_attrs(self.info).items():
                h5.attrs[key] = value
            versions = library_versions()
            h5.attrs["format_version"] = file_version(self.info)
            h5.attrs["kdcache_version"] = json.loads(versions)["kdcache"]
            h5.attrs["library_versions"] = versions
            h5.attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            h5.attrs["complete"] = False
            for key, value in self.extra_attrs.items():
                h5.attrs[key] = value
            for name, (shape, dtype) in self.layout.items():
                per_row = max(1, int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
                rows = max(1, min(shape[0], CHUNK_BYTES // per_row))
                dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
                dcpl.set_chunk((rows,) + shape[1:])
                dcpl.set_fletcher32()  # a checksum per chunk, checked by HDF5 on every read
                dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
                dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
                space = h5py.h5s.create_simple(shape)
                h5py.h5d.create(h5.id, name.encode(), h5py.h5t.py_create(dtype), space, dcpl=dcpl)
            h5["sample_ids"][:] = sample_ids
            h5["labels"][:] = labels
            h5["content_hashes"][:] = content_hashes
            for name, value in self.witness.items():
                h5[name][:] = value
            h5["done"][:] = 0
            h5.flush()
            # Reserve the disk space of the whole cache now: a full disk then fails here, at the
            # start, rather than after hours of teacher time.
            with open(temporary, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, h5.id.get_filesize())
            if self.grow_from is not None:
                self._copy_first_views(h5)
            # Only now is there an OUT.partial, and it has everything a resume needs: a dump killed
            # earlier leaves at most a temporary, which the next run deletes.
            os.replace(temporary, self.partial)
        except (OSError, ValueError, RuntimeError, CacheError) as e:  # h5py words some I/O failures as ValueError
            # A CacheError names the damaged cache being grown in its own line.
            message = str(e) if isinstance(e, CacheError) else f"cannot create {self.partial}: {detail(e)}"
            with quiet_release():
                if h5 is not None:
                    try:
                        h5.close()
                    except H5_ERRORS:
                        pass
                h5 = e = None  # released here, where a failing write-back is not news
            temporary.unlink(missing_ok=True)  # it holds no teacher output yet: nothing to resume
            raise CacheError(message) from None
        return h5

    def _copy_first_views(self, h5: h5py.File) -> None:
        """Copy every stored record of `grow_from` into views ``[0, K)``, bit for bit, checked as a reader would."""
        source, k, n = self.grow_from, self.first_view, self.info.num_samples
        names = source.record_names
        datasets = {name: h5[name] for name in names}  # kept open until flushed: see __init__
        rows = max(1, _COPY_BLOCK_BYTES // max(1, int(record_bytes(self.info)) * self.info.num_views))
        self.progress.start(f"copy the {k} views of {source.path.name}", n)
        for lo in range(0, n, rows):
            hi = min(n, lo + rows)
            block = {name: source.stored(name, lo, hi) for name in names}
            for what, mask in record_faults(block, self.codec, self.info.num_classes, self.params, self.features):
                if mask.any():
                    r, v = np.argwhere(mask)[0][:2]
                    raise CacheError(f"{source.path}: row {lo + int(r)} view {int(v)}: {what}; the cache is "
                                     "damaged, so it cannot grow: dump it again with --force")
            for name, value in block.items():
                datasets[name][lo:hi, :k] = value
            self.progress.update(hi - lo)
        h5.flush()
        self.progress.stop()

    def _resume(self) -> h5py.File:
        try:
            if self.partial.stat().st_size == 0:
                raise OSError("the file is empty")  # HDF5 would open it as a new file
            h5 = h5py.File(self.partial, "r+")
        except H5_ERRORS as e:
            why = str(e) if self.partial.stat().st_size == 0 else detail(e)
            raise CacheError(f"{self.partial} is not a readable partial dump ({why}); delete it (or pass --force) to "
                             "start over") from None
        try:
            with worded(self.partial, "the root attributes"):
                attrs = {k: h5.attrs[k] for k in h5.attrs}
            found = info_from_attrs(attrs).settings()
        except (CacheError, ValueError) as e:
            h5.close()
            raise CacheError(f"{self.partial} is not a resumable kdcache dump ({str(e).split('; ')[0]}); delete it "
                             "(or pass --force) to start over") from None
        wanted = self.info.settings()
        found.update({k: plain_attr(attrs.get(k)) for k in self.extra_attrs})
        wanted.update(self.extra_attrs)
        differ = settings_mismatch(found, wanted)
        if differ:
            h5.close()
            raise CacheError(f"{self.partial} was started with different settings ({differ}); "
                             "re-run the original command to resume it, or pass --force to start over")
        try:
            check_datasets(h5, self.info, self.partial)
        except CacheError:
            h5.close()
            raise
        return h5

    def _read_done(self) -> np.ndarray:
        for attempt in range(2):
            try:
                done = self._datasets["done"][:]
                break
            except H5_ERRORS as e:
                why = detail(e)
                torn = CHECKSUM_FAILED in str(e)
            # Mended outside the except clause: its traceback holds the old handle, which must close first.
            if not torn or attempt or not self._mend_torn_chunks("done", 0, self.info.num_samples):
                raise CacheError(f"{self.partial}: cannot read dataset 'done' ({why}); delete it (or pass --force) "
                                 "to start over")
        if (done > 1).any():
            raise CacheError(f"{self.partial}: dataset 'done' holds values other than 0 and 1; delete it (or pass "
                             "--force) to start over")
        return done.astype(bool)

    def _mend_torn_chunks(self, name: str, lo: int, hi: int) -> bool:
        """Drop the stale checksum of chunks of rows ``[lo, hi)`` of `name` that fail it; True if there were any.

        kill -9 can interrupt the write of a chunk part-way, which leaves its
        bytes a mix of the old and the new version under the old checksum. The
        rows marked done in it are equal in both versions (each write repeats
        them) and the others are written again by the resume, so the bytes are
        kept as they are; the chunk's next write adds a fresh checksum.
        """
        self.h5.flush()
        ds = self._datasets.pop(name)
        mended = False
        if ds.fletcher32 and ds.id.get_create_plist().get_nfilters() == 1:
            step = ds.chunks[0]
            for start in range(lo // step * step, hi, step):
                try:
                    ds[start:start + 1]
                except OSError as e:
                    if CHECKSUM_FAILED not in str(e):
                        raise
                    offset = (start,) + (0,) * (ds.ndim - 1)
                    mask, raw = ds.id.read_direct_chunk(offset)
                    if mask & _FLETCHER32_SKIPPED:
                        raise
                    ds.id.write_direct_chunk(offset, raw[:-4], filter_mask=mask | _FLETCHER32_SKIPPED)
                    mended = True
        del ds
        self._datasets[name] = self.h5[name]  # a fresh handle: the old one remembers the chunks' old places
        return mended

    @property
    def resumed_rows(self) -> int:
        return int(self._done.sum())

    def pending_rows(self) -> np.ndarray:
        """Rows still to compute, in order."""
        return np.flatnonzero(~self._done)

    def write(self, rows: np.ndarray, crops: np.ndarray, flips: np.ndarray, logits: np.ndarray,
              params: dict[str, np.ndarray] | None = None, features: dict[str, np.ndarray] | None = None) -> None:
        """Store the views of `rows` (increasing) that this writer fills, then mark the rows done and flush.

        Those are all K views, or in a growth the views from :attr:`first_view` on (not `crops`, `flips` if compact).
        `params` holds the recipe's parameters, `features` the float32 teacher features by kind ('pooled',
        'attention'): one for each the cache stores.
        """
        stored = {} if self.info.compact else {"crops": crops.astype(np.float32), "flips": flips.astype(np.uint8)}
        stored.update({name: np.asarray(params[name]).astype(self.layout[name][1]) for name in self.params.names})
        self.write_stored(rows, {**stored, **self.codec.encode(logits),
                                 **encode_features(self.features, features or {}, self.partial)})

    def write_stored(self, rows: np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        """Store `rows` (increasing) from arrays already in the stored form (crops, flips, targets); mark them done.

        Copying a part file into the merged cache goes through here, so its
        stored values (fp16, top-k) are copied bit for bit, never re-encoded.
        Records that a reader would refuse (non-finite logits, a box outside
        the image, ...) are refused here, before anything is written.
        """
        rows = np.asarray(rows)
        for what, mask in record_faults(arrays, self.codec, self.info.num_classes, self.params, self.features):
            if mask.any():
                r, v = np.argwhere(mask)[0][:2]
                raise CacheError(f"refusing to write row {int(rows[r])} view {self.first_view + int(v)} to "
                                 f"{self.partial}: {what}")
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        where = slice(lo, hi) if hi - lo == len(rows) else rows
        for attempt in range(2):
            try:
                self._put(where, arrays)
                break
            except (OSError, RuntimeError) as e:  # h5py reports a failed flush as RuntimeError
                why = detail(e)
                torn = CHECKSUM_FAILED in str(e)
            # Mended outside the except clause: its traceback holds the old handles, which must close first.
            if not torn or attempt or not any([self._mend_torn_chunks(name, lo, hi) for name in [*arrays, "done"]]):
                raise CacheError(f"writing {self.partial} failed: {why}; fix that and re-run the same command to "
                                 "resume")
        self._done[rows] = True

    def _put(self, where: slice | np.ndarray, arrays: dict[str, np.ndarray]) -> None:
        views = (where, slice(self.first_view, None)) if self.first_view else where
        for name, value in arrays.items():
            self._datasets[name][views] = value
        self.h5.flush()  # the data reaches the file before the rows count as done
        self._datasets["done"][where] = 1
        self.h5.flush()

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
            raise CacheError(f"finishing {self.partial} failed: {detail(e)}; fix that and re-run "
                             "the same command") from None
        os.replace(self.partial, self.path)
        return self.path

    def close(self) -> None:
        """Close the file; after a failed write, closing may fail too, and that is not news."""
        with quiet_release():
            try:
                self._datasets.clear()
                if self.h5.id.valid:
                    self.h5.close()
            except (OSError, RuntimeError):
                pass
