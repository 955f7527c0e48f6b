"""HDF5 access for the cache: opening files, reading chunks and the identity of an open file.

h5py reports damage as OSError, KeyError or ValueError from wherever HDF5
noticed it (opening, an attribute, a chunk's checksum). Everything here turns
those into one-line CacheErrors that name the file and the dataset or
attribute, so a damaged cache never ends a run in a traceback.
"""

from __future__ import annotations

import errno
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from ..errors import CacheError

H5_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError)
CHECKSUM_FAILED = "filter returned failure"  # how HDF5 reports a fletcher32 mismatch
DAMAGED = "the file is damaged; re-dump or restore it"


class DamagedChunk(CacheError):
    """Rows ``[lo, hi)`` of a dataset cannot be read: a checksum mismatch or another read failure."""

    def __init__(self, message: str, dataset: str, lo: int, hi: int, what: str) -> None:
        super().__init__(message)
        self.dataset, self.lo, self.hi, self.what = dataset, lo, hi, what


def detail(e: BaseException) -> str:
    """The short reason of an OS or HDF5 error, in words a user can act on."""
    code = getattr(e, "errno", None)
    text = str(e)
    codes = {errno.ENOSPC: "the disk is full (no space left on device)", errno.EROFS: "read-only file system",
             errno.EACCES: "permission denied", errno.EPERM: "permission denied"}
    for number, words in codes.items():
        if code == number or f"errno = {number}," in text:
            return words
    if code is not None and getattr(e, "strerror", None):
        return e.strerror
    inner = re.findall(r"\(([^()]*)\)", text)  # h5py: "Unable to ... (the reason)"
    return (inner[-1] if inner else text).strip() or type(e).__name__


def open_h5(path: Path, mode: str) -> h5py.File:
    """The HDF5 file at `path`; a missing or unreadable file is a one-line CacheError."""
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise CacheError(f"cache {path} does not exist") from None
    except H5_ERRORS as e:
        empty = " (the file is empty)" if path.exists() and path.stat().st_size == 0 else f" ({detail(e)})"
        raise CacheError(f"cannot open cache {path}: not a readable HDF5 file{empty}") from None


@contextmanager
def worded(path: Path, what: str) -> Iterator[None]:
    """Turn h5py's errors inside the block into one line naming `path` and `what` (an attribute, a dataset)."""
    try:
        yield
    except H5_ERRORS as e:
        raise CacheError(f"{path}: cannot read {what} ({detail(e)}); {DAMAGED}") from None


def read_rows(ds: h5py.Dataset, path: Path, rows: np.ndarray | slice, view: int | None = None) -> np.ndarray:
    """``ds[rows]`` (or ``ds[rows, view]``); a chunk that fails its checksum is a DamagedChunk naming its rows.

    `rows` is a slice or increasing row numbers.
    """
    where = rows if isinstance(rows, slice) else rows.tolist()
    try:
        return np.asarray(ds[where] if view is None else ds[where, view])
    except H5_ERRORS as e:
        raise _damage(ds, path, rows, e) from None


def _damage(ds: h5py.Dataset, path: Path, rows: np.ndarray | slice, e: BaseException) -> DamagedChunk:
    name = ds.name.lstrip("/")
    asked = np.arange(*rows.indices(ds.shape[0])) if isinstance(rows, slice) else np.asarray(rows)
    lo, hi = (int(asked.min()), int(asked.max()) + 1) if len(asked) else (0, 0)
    step = ds.chunks[0] if ds.chunks else max(hi - lo, 1)
    # Narrow the failure to the first chunk that fails on its own; only the error path pays for this.
    for start in np.unique(asked // step) * step:
        try:
            ds[int(start):int(start) + step]
        except H5_ERRORS:
            lo, hi = int(start), int(min(start + step, ds.shape[0]))
            break
    if CHECKSUM_FAILED in str(e):
        what = f"checksum mismatch in dataset '{name}'"
    else:
        what = f"dataset '{name}' cannot be read ({detail(e)})"
    return DamagedChunk(f"{path}: {what} (rows {lo}..{hi - 1}): {DAMAGED}", name, lo, hi, what)


@dataclass(frozen=True)
class FileIdentity:
    """Which file a path named when it was validated: device, inode, size and modification time."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, h5: h5py.File, path: Path) -> FileIdentity:
        """The identity of the file `h5` has open (of `path` where the driver gives no descriptor)."""
        try:
            st = os.fstat(h5.id.get_vfd_handle())
        except (OSError, TypeError, ValueError):
            st = os.stat(path)
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def changes(self, now: FileIdentity) -> str:
        """What differs between this identity and `now`, in words; '' when nothing does."""
        words = []
        if (self.device, self.inode) != (now.device, now.inode):
            words.append("another file under the same name")
        if self.size != now.size:
            words.append(f"{self.size} -> {now.size} bytes")
        if self.mtime_ns != now.mtime_ns:
            words.append("modified")
        return ", ".join(words)


@contextmanager
def quiet_release() -> Iterator[None]:
    """Silence h5py's reports of failed write-backs of handles released in the block (after a failed write)."""
    hook = sys.unraisablehook
    sys.unraisablehook = lambda _: None
    try:
        yield
    finally:
        sys.unraisablehook = hook
