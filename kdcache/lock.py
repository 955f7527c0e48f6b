"""One writer per output file: an exclusive lock held for a whole dump.

A dump of ``OUT`` holds ``fcntl.flock`` on ``OUT.lock`` from before it touches
any file of OUT (the partial, an old cache that ``--force`` replaces) until it
is done; under torchrun each rank locks its own part file the same way, and
rank 0 also locks OUT for the whole job. A second dump of the same file is
refused at once, naming the owner's process id and host, which the owner
writes into the lock file.

The kernel drops the lock when its process dies, however it dies, so a dump
killed with SIGKILL leaves no stale lock: at most a stale *file*, which the
next dump simply locks again.

The lock file is removed when the lock is released. Removing a lock file is
racy on its own: a process that opened the file just before it was removed
would lock an orphaned inode while a third process creates and locks a new
file. So a lock counts as taken only when, after ``flock`` returns, the path
still names the very inode that was locked; otherwise the taker retries on
the new file. The owner removes the file while it still holds the lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from .errors import CacheError

# Errors of flock on a file system without locks (some network and FUSE mounts).
_NO_LOCKS = {errno.ENOLCK, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}


def lock_path(path: str | Path) -> Path:
    """The lock file of `path`: ``PATH.lock``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


class FileLock:
    """An exclusive lock on the writing of `path`; use it as a context manager or call acquire/release.

    `unsupported` is True after :meth:`acquire` when the file system cannot
    lock: the dump then runs unlocked, as before locks existed, and the caller
    says so.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock_file = lock_path(self.path)
        self._fd: int | None = None
        self.unsupported = False

    def acquire(self) -> FileLock:
        """Take the lock or raise a one-line CacheError (another dump holds it, or the folder is not writable)."""
        _make_folder(self.path)
        for _ in range(100):  # retried only when the file was replaced between open and flock
            fd = self._open()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _owner(fd)
                os.close(fd)
                raise CacheError(f"another dump ({owner}) is writing {self.path}; wait for it or stop it") from None
            except OSError as e:
                if e.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise CacheError(f"cannot lock {self.lock_file}: {_reason(e)}") from None
                self.unsupported = True
            if self.unsupported or _same_file(fd, self.lock_file):
                break
            os.close(fd)  # the owner removed this file after we opened it: lock the new one
        else:
            raise CacheError(f"cannot lock {self.lock_file}: it keeps being replaced; is another dump starting?")
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:
            pass  # the owner's name is for messages only
        return self

    def _open(self) -> int:
        try:
            return os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise CacheError(f"cannot create the lock file {self.lock_file}: {_reason(e)}; choose an --out in a "
                             "folder you can write") from None

    def release(self) -> None:
        """Remove the lock file and drop the lock (in that order, see the module docstring)."""
        if self._fd is None:
            return
        try:
            if not self.unsupported and _same_file(self._fd, self.lock_file):
                self.lock_file.unlink(missing_ok=True)
        except OSError:
            pass  # a lock file left behind is harmless: the next dump locks it again
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _make_folder(path: Path) -> None:
    """The folder `path` goes in, created if missing."""
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (folder, *folder.parents) if p.exists()), folder)
        if not blocker.is_dir():
            raise CacheError(f"cannot create {path}: {blocker} is a file, not a folder") from None
        raise CacheError(f"cannot create the folder {folder} for {path}: {_reason(e)}") from None


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _owner(fd: int) -> str:
    """What the lock's owner wrote about itself; it writes right after locking, so wait a moment for it."""
    for _ in range(20):
        text = os.pread(fd, 200, 0).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.01)
    return "owner unknown"


def _reason(e: OSError) -> str:
    return e.strerror or str(e)
