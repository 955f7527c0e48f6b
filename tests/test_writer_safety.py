"""Writes that must leave nothing half-made: a killed creation, an impossible --out, refused settings or records.

The gaps named are the reliability gaps of issue 10.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from kdcache.cache import CacheReader, CacheWriter
from kdcache.errors import CacheError
from test_cache import C, K, N, fake_records, info, write_cache
from test_damaged import flip_byte, one_line


# Gaps 1 and 3: the writer refuses what a reader would refuse, before it is written.

def test_writer_refuses_records_a_reader_would_refuse(tmp_path: Path) -> None:
    crops, flips, logits = fake_records()
    w = CacheWriter(tmp_path / "c.h5", info(), np.arange(N), np.arange(N) % C, np.arange(N, dtype=np.uint64))
    logits[2, 1, 4] = np.nan
    with pytest.raises(CacheError, match="refusing to write row 2 view 1 .*NaN or Inf"):
        w.write(np.arange(5), crops[:5], flips[:5], logits[:5])
    crops[1, 0] = [-5, 7, 100, 0]
    with pytest.raises(CacheError, match="refusing to write row 1 view 0 .*crop box"):
        w.write(np.arange(2), crops[:2], flips[:2], fake_records()[2][:2])
    assert w.resumed_rows == 0 and len(w.pending_rows()) == N
    w.close()


def test_fp16_overflow_is_refused_not_stored_as_inf(tmp_path: Path) -> None:
    crops, flips, logits = fake_records()
    logits[0, 0, 0] = 1e6
    w = CacheWriter(tmp_path / "c.h5", info("fp16"), np.arange(N), np.arange(N) % C, np.arange(N, dtype=np.uint64))
    with pytest.raises(CacheError, match="does not fit --store fp16; use --store fp32"):
        w.write(np.arange(N), crops, flips, logits)
    w.close()


# Gap 7: OUT.partial appears only with complete metadata; leftovers of a killed creation do not block a rerun.

def test_partial_appears_only_when_its_metadata_is_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "c.h5"
    partial = tmp_path / "c.h5.partial"
    seen = []
    reserve = os.posix_fallocate

    def killed_while_reserving(fd: int, offset: int, length: int) -> None:
        seen.append((partial.exists(), sorted(p.name for p in tmp_path.iterdir())))
        reserve(fd, offset, length)
        raise KeyboardInterrupt  # stands for kill -9: no cleanup runs

    monkeypatch.setattr(os, "posix_fallocate", killed_while_reserving)
    with pytest.raises(KeyboardInterrupt):
        CacheWriter(out, info(), np.arange(N) * 7, np.arange(N) % C, np.arange(N, dtype=np.uint64))
    monkeypatch.setattr(os, "posix_fallocate", reserve)
    temporary = f"c.h5.partial.tmp-{socket.gethostname()}-{os.getpid()}"
    assert seen == [(False, [temporary])] and not partial.exists()
    write_cache(out)  # the rerun starts cleanly and removes the leftover
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]
    np.testing.assert_array_equal(CacheReader(out).read(np.arange(N), 2)[2], fake_records()[2][:, 2])


def test_leftover_temporary_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"c.h5.partial.tmp-{socket.gethostname()}-{int(dead.stdout)}"
    stale.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(88))  # 96 bytes: killed just after HDF5 created it
    elsewhere = tmp_path / "c.h5.partial.tmp-otherhost-1"  # another host's: it may still be working
    elsewhere.write_bytes(b"")
    write_cache(tmp_path / "c.h5")
    assert not stale.exists() and elsewhere.exists()


@pytest.mark.parametrize("content, why", [(b"", "the file is empty"),
                                          (b"\x89HDF\r\n\x1a\n" + bytes(88), "bad byte number")])
def test_unreadable_partial_is_refused_precisely_and_force_starts_over(tmp_path: Path, content: bytes,
                                                                       why: str) -> None:
    """An OUT.partial is complete when it gets its name, so an unreadable one was damaged later: say so, keep it."""
    partial = tmp_path / "c.h5.partial"
    partial.write_bytes(content)
    with pytest.raises(CacheError, match=f"c.h5.partial is not a readable partial dump .*{why}.*delete it "
                                         r"\(or pass --force\) to start over") as e:
        CacheWriter(tmp_path / "c.h5", info(), np.arange(N) * 7, np.arange(N) % C, np.arange(N, dtype=np.uint64))
    one_line(e)
    assert partial.read_bytes() == content
    w = CacheWriter(tmp_path / "c.h5", info(), np.arange(N) * 7, np.arange(N) % C, np.arange(N, dtype=np.uint64),
                    force=True)
    assert w.resumed_rows == 0
    w.close()


def test_resume_mends_a_chunk_that_kill_9_tore(tmp_path: Path) -> None:
    """A write interrupted part-way leaves a chunk under its old checksum; the resume must still finish it."""
    out = tmp_path / "c.h5"
    write_cache(out, rows=slice(0, 10), finish=False)
    partial = tmp_path / "c.h5.partial"
    for name in ("logits", "done"):
        with h5py.File(partial, "r") as h5:
            size = h5[name].id.get_chunk_info(0).size
        flip_byte(partial, name, at=size - 1)  # the checksum is the chunk's last 4 bytes: leave it stale
    w = CacheWriter(out, info(), np.arange(N) * 7, np.arange(N) % C, np.arange(N, dtype=np.uint64))
    assert w.resumed_rows == 10
    w.close()
    write_cache(out)
    reader = CacheReader(out)
    for view in range(K):
        np.testing.assert_array_equal(reader.read(np.arange(N), view)[2], fake_records()[2][:, view])
    assert reader.scan().ok


# Gaps 9 and 10: nothing is created when the output cannot be, or when the settings are refused.

def test_out_under_a_regular_file_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for out in (blocker / "c.h5", blocker / "sub" / "c.h5"):
        with pytest.raises(CacheError) as e:
            CacheWriter(out, info(), np.arange(N), np.arange(N) % C, np.arange(N, dtype=np.uint64))
        assert one_line(e) == f"cannot create {out}.partial: {blocker} is not a folder"


@pytest.mark.parametrize("where", ["folder", "file"])
def test_read_only_file_system_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """chmod cannot make a folder read-only for root, so the OS's answer is simulated at each step it can come."""
    real_open, real_mkdir = os.open, os.mkdir

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(args[0]))

    if where == "file":
        monkeypatch.setattr(os, "open", lambda p, *a, **k: read_only(p) if ".tmp-" in str(p) else real_open(p, *a, **k))
        out = tmp_path / "c.h5"
    else:
        monkeypatch.setattr(os, "mkdir", read_only)
        out = tmp_path / "new" / "c.h5"
    with pytest.raises(CacheError) as e:
        CacheWriter(out, info(), np.arange(N), np.arange(N) % C, np.arange(N, dtype=np.uint64))
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.setattr(os, "mkdir", real_mkdir)
    assert one_line(e) == f"cannot create {out}.partial: read-only file system"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("store, over, match", [
    ("topk:100000", {}, "--store topk:100000 keeps more classes than the teacher has \\(10\\)"),
    ("topk:0", {}, "--store must be fp16, fp32 or topk:K"),
    ("fp32", {"input_size": 0}, "attribute 'input_size' is 0"),
    ("fp32", {"class_names": ("a",)}, "'class_names' holds 1 names for 10 classes"),
])
def test_refused_settings_leave_no_file(tmp_path: Path, store: str, over: dict, match: str) -> None:
    out = tmp_path / "new" / "c.h5"
    with pytest.raises(CacheError, match=match) as e:
        CacheWriter(out, info(store, **over), np.arange(N), np.arange(N) % C, np.arange(N, dtype=np.uint64))
    one_line(e)
    assert list(tmp_path.iterdir()) == []
