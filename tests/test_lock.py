"""One writer per output file (gap 5) and an --out where no file can be made (gap 9), with real processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TEACHER, rows_done
from kdcache.cli import main
from kdcache.errors import CacheError
from kdcache.lock import FileLock, lock_path
from kdcache.teacher import dump
from test_dump import clean_cache, config, folder, same_datasets  # noqa: F401  (folder is a fixture)


def test_an_out_where_no_file_can_be_made_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a regular file")
    result = CliRunner().invoke(main, ["dump-teacher", "--teacher", TEACHER, "--img-size", "32", "--views", "1",
                                       "--device", "cpu", "--workers", "0", "--out", str(blocker / "c.h5")])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert errors == [f"Error: cannot create {blocker / 'c.h5'}: {blocker} is a file, not a folder"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def _read_only_probe(folder: Path) -> bool:
    folder.chmod(0o555)
    try:
        (folder / "probe").touch()
    except PermissionError:
        return True
    (folder / "probe").unlink()
    return False


@pytest.mark.slow
def test_an_out_in_a_read_only_folder_is_one_line(tmp_path: Path) -> None:
    """As a user, a folder without write permission; as root, a read-only tmpfs in a private mount namespace."""
    folder = tmp_path / "ro"
    folder.mkdir()
    command = [sys.executable, "-m", "kdcache", "dump-teacher", "--teacher", TEACHER, "--img-size", "32",
               "--views", "1", "--device", "cpu", "--workers", "0", "--out", str(folder / "c.h5")]
    if _read_only_probe(folder):
        result = subprocess.run(command, capture_output=True, text=True)
        folder.chmod(0o755)
    else:
        folder.chmod(0o755)
        if shutil.which("unshare") is None or subprocess.run(
                ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o ro tmpfs {folder}"], capture_output=True).returncode:
            pytest.skip("neither an unwritable folder nor a read-only mount can be made here")
        script = f'mount -t tmpfs -o ro tmpfs {folder} && exec "$@"'
        result = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command], capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and f"cannot create the lock file {folder / 'c.h5.lock'}" in result.stderr
    assert "Read-only file system" in result.stderr or "Permission denied" in result.stderr
    assert list(folder.iterdir()) == []


def test_a_locked_out_is_refused_and_force_deletes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    out.write_bytes(b"someone else's finished cache")
    partial = out.with_name(out.name + ".partial")
    partial.write_bytes(b"someone else's rows")
    owner = f"pid {os.getpid()} on {socket.gethostname()}"
    with FileLock(out):
        assert lock_path(out).read_text().strip() == owner
        with pytest.raises(CacheError, match=f"another dump \\({owner}\\) is writing {out}; wait for it or stop it"):
            dump(config("digits", out, force=True))
    assert out.read_bytes() == b"someone else's finished cache" and partial.read_bytes() == b"someone else's rows"
    assert not lock_path(out).exists(), "the lock file goes with the lock"


def test_a_lock_file_replaced_before_flock_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The owner removes its lock file as it finishes; a taker that opened the old file must not lock that."""
    out = tmp_path / "c.h5"
    real_open = FileLock._open
    opened = []

    def open_then_replaced(self: FileLock) -> int:
        fd = real_open(self)
        if not opened:
            self.lock_file.unlink()  # what the finishing owner does
        opened.append(fd)
        return fd

    monkeypatch.setattr(FileLock, "_open", open_then_replaced)
    lock = FileLock(out).acquire()
    assert len(opened) == 2, "the taker retried on a new file"
    stat = lock_path(out).stat()
    assert (os.fstat(lock._fd).st_ino, os.fstat(lock._fd).st_dev) == (stat.st_ino, stat.st_dev)
    lock.release()


GATED_DUMP = """
import sys, time
from pathlib import Path
import kdcache.teacher as teacher
gate, outputs, calls = Path(sys.argv[1]), teacher.teacher_outputs, []
def gated(*args, **kwargs):
    calls.append(1)
    while len(calls) > 3 and not gate.exists():  # call 1 checks the input size; two batches pass
        time.sleep(0.02)
    return outputs(*args, **kwargs)
teacher.teacher_outputs = gated  # the dump and its input-size check both call it
from kdcache.cli import main
main(sys.argv[2:], prog_name="kdcache")
"""


@pytest.mark.slow
def test_two_dumps_to_one_out(tmp_path: Path, folder: Path) -> None:
    """Dump A holds the lock (paused after two batches); B and B --force are refused; A finishes intact."""
    out = tmp_path / "c.h5"
    partial = out.with_name(out.name + ".partial")
    gate = tmp_path / "go"
    script = tmp_path / "gated.py"
    script.write_text(GATED_DUMP)
    args = ["dump-teacher", "--data", str(folder), "--teacher", TEACHER, "--views", "2", "--store", "fp32",
            "--img-size", "32", "--device", "cpu", "--workers", "0", "--batch-size", "8", "--out", str(out)]
    a = subprocess.Popen([sys.executable, str(script), str(gate), *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while rows_done(partial) < 8 and a.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert rows_done(partial) == 8 and a.poll() is None, a.stderr.read() if a.poll() is not None else ""
        inode = partial.stat().st_ino
        b = [subprocess.Popen([sys.executable, "-m", "kdcache", *args, *force], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for force in ([], ["--force"])]
        message = f"Error: another dump (pid {a.pid} on {socket.gethostname()}) is writing {out}; wait for it or stop it"
        for proc in b:
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 1 and err.strip().splitlines()[-1] == message, err
            assert "Traceback" not in err
        assert partial.stat().st_ino == inode and rows_done(partial) == 8 and not out.exists()
        gate.touch()
        _, err = a.communicate(timeout=120)
    finally:
        gate.touch()
        if a.poll() is None:
            a.kill()
    assert a.returncode == 0, err
    assert not partial.exists() and not lock_path(out).exists()
    same_datasets(out, clean_cache(folder, tmp_path))
