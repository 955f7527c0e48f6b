"""Cache writes in one background thread, so the teacher computes the next batch while the last one is stored.

The dump hands each batch to :class:`BackgroundWriter`, which passes it to
:meth:`CacheWriter.write` in a single thread, in order, through a bounded
queue. The promises of the writer hold unchanged: it stores a batch's data,
flushes, then marks the rows done and flushes again, all inside the thread,
so a row counts as done only once its data is in the file. The queue holds a
few batches, enough to absorb a slow write but not to pile up memory or lose
much teacher time when the process is killed.

Failure, either way round:

* the write fails (a full disk): the thread keeps the error, drops whatever
  is queued, and the next :meth:`~BackgroundWriter.put` or
  :meth:`~BackgroundWriter.close` raises that same error in the dump's
  thread; a put never waits on a queue that nobody empties;
* the dump fails (a NaN from the teacher, Ctrl-C):
  :meth:`~BackgroundWriter.abort` lets the thread store what is already
  queued, joins it, and leaves a partial that the same command resumes.
"""

from __future__ import annotations

import queue
import threading

import numpy as np

from .cache import CacheWriter

_STOP = object()  # the end of the batches
_POLL_SECONDS = 0.1  # how often a waiting put looks whether the thread has failed


class BackgroundWriter:
    """Feeds batches to one CacheWriter from a single thread; at most `depth` batches wait."""

    def __init__(self, writer: CacheWriter, depth: int = 3) -> None:
        self.writer = writer
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kdcache-cache-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # drain without writing, so the producer is never stuck on a full queue
            try:
                self.writer.write(*item[0], **item[1])
            except BaseException as e:  # handed to the dump's thread, which reports it
                self._error = e

    def put(self, rows: np.ndarray, crops: np.ndarray, flips: np.ndarray, logits: np.ndarray,
            params: dict[str, np.ndarray] | None = None, features: dict[str, np.ndarray] | None = None) -> None:
        """Queue all K views of `rows` (with the recipe's parameters and the teacher features, if any) for writing;
        raises the error of an earlier write that failed."""
        self._check()
        extra = {name: value for name, value in (("params", params), ("features", features)) if value}
        item = ((rows, crops, flips, logits), extra)  # parameters and features only where stored
        while True:
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                break
            except queue.Full:
                self._check()
        self._check()

    def close(self) -> None:
        """Write everything queued, stop the thread and raise the first write error, if any."""
        self._stop()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """After a failure of the dump itself: store what is queued, stop the thread, keep quiet about its errors."""
        self._stop()

    def _stop(self) -> None:
        if not self._thread.is_alive():
            return
        while True:
            try:
                self._queue.put(_STOP, timeout=_POLL_SECONDS)
                break
            except queue.Full:
                if not self._thread.is_alive():
                    return
        self._thread.join()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("put() after close() or abort()")
