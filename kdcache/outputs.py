"""A run's output files: room checked before the work, each file written whole or not at all.

A file is written to ``NAME.tmp`` beside it, flushed to the disk (fsync) and
renamed over ``NAME``, so a crash or a full disk never leaves a truncated file
under the real name, and the temporary file is removed when the write fails.
Failures are :class:`~kdcache.errors.OutputError` with one line that names the
file and says why ("the disk is full" for ENOSPC).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import OutputError

# Room kept free beyond a file's own size: metrics, history and the file system's own blocks.
MARGIN_BYTES = 16 * 1024**2


def reason(e: BaseException) -> str:
    """Why a write failed, in a few words."""
    code = getattr(e, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (no space left on device)"
    if code == errno.EROFS:
        return "the file system is read-only"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


def make_folder(folder: str | Path) -> Path:
    """Create `folder` (and its parents) if needed."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot create the output folder {folder}: a file of that name is in the way") from None
    except NotADirectoryError:
        raise OutputError(f"cannot create the output folder {folder}: a part of its path is a file") from None
    except OSError as e:
        raise OutputError(f"cannot create the output folder {folder}: {reason(e)}") from None
    return folder


def _nearest_existing(folder: Path) -> Path:
    path = folder.absolute()
    while not path.exists():  # also False for a path through a regular file
        path = path.parent
    return path


def check_writable(folder: str | Path) -> Path:
    """Refuse now when files cannot be written into `folder`; returns the folder, or the ancestor it will be made in.

    Nothing is created: the folder appears with the first file written into it.
    """
    folder = Path(folder)
    base = _nearest_existing(folder)
    verb = "write into" if base == folder.absolute() else "create"
    if not base.is_dir():
        why = "a file of that name is in the way" if base == folder.absolute() else "a part of its path is a file"
        raise OutputError(f"cannot create the output folder {folder}: {why}")
    if not os.access(base, os.W_OK | os.X_OK):
        why = "the file system is read-only" if _read_only(base) else "permission denied"
        raise OutputError(f"cannot {verb} the output folder {folder}: {why}")
    return base


def check_room(folder: str | Path, need_bytes: int, what: str) -> None:
    """Refuse now, before the work, when `folder` is not writable or has less than `need_bytes` (and a margin) free."""
    free = shutil.disk_usage(check_writable(folder)).free
    need = need_bytes + MARGIN_BYTES
    if free < need:
        raise OutputError(f"the output folder {folder} has {_mib(free)} free, but {what} needs about {_mib(need)}; "
                          "free some space or choose another --out")


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _mib(n: int) -> str:
    return f"{n / 1024**2:,.1f} MiB"


class _RecordingFile:
    """A binary file that remembers the OSError of a failed write.

    torch.save reports a failed write to a file object as an opaque
    RuntimeError; the recorded OSError says what happened (e.g. ENOSPC).
    """

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(file)`` on ``PATH.tmp``, flush it to the disk, then rename it to `path`."""
    path = Path(path)
    make_folder(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    recording = None
    try:
        with open(tmp, "wb") as f:
            recording = _RecordingFile(f)
            write(recording)  # type: ignore[arg-type]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        cause = recording.error if recording is not None and recording.error is not None else e
        if isinstance(cause, OSError):
            raise OutputError(f"cannot write {path}: {reason(cause)}") from None
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically."""
    data = text.encode()
    return write_atomic(path, lambda f: f.write(data))
