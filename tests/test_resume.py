"""A dump killed with SIGKILL resumes to the same cache; a full disk is a clear, resumable error."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import TEACHER, rows_done
from tmpfs import can_mount_tmpfs


def dump_command(out: Path, checkpoint: str, seed: int = 0) -> list[str]:
    return [sys.executable, "-m", "kdcache", "dump-teacher", "--teacher", TEACHER, "--checkpoint", checkpoint,
            "--views", "4", "--store", "fp32", "--img-size", "32", "--device", "cpu", "--workers", "0",
            "--batch-size", "8", "--seed", str(seed), "--out", str(out)]


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, digits_teacher: str) -> None:
    out = tmp_path / "killed.h5"
    partial = out.with_name(out.name + ".partial")
    proc = subprocess.Popen(dump_command(out, digits_teacher), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while rows_done(partial) < 50 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the dump finished before it could be killed; the test needs a slower dump"
    done = rows_done(partial)
    assert 0 < done < 1348

    refused = subprocess.run(dump_command(out, digits_teacher, seed=1), capture_output=True, text=True)
    assert refused.returncode != 0 and "different settings" in refused.stderr and "Traceback" not in refused.stderr

    resumed = subprocess.run(dump_command(out, digits_teacher), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and out.exists() and not partial.exists()

    clean = tmp_path / "clean.h5"
    subprocess.run(dump_command(clean, digits_teacher), check=True, capture_output=True)
    with h5py.File(out) as a, h5py.File(clean) as b:
        for name in ("logits", "crops", "flips", "labels", "sample_ids", "done"):
            assert np.array_equal(a[name][:], b[name][:]), name
        assert a["logits"][:].tobytes() == b["logits"][:].tobytes()


def test_disk_full_is_a_clear_error_at_the_start(tmp_path: Path, digits_teacher: str) -> None:
    """A real full file system: a 256 KiB tmpfs in a private mount namespace, grown after the failure.

    The dump reserves the whole file's space when it creates it, so a disk that is too small
    fails at once, before any teacher time is spent, and the same command succeeds once there
    is room.
    """
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "c.h5"
    command = shlex.join(dump_command(out, digits_teacher))
    script = f"""
        mount -t tmpfs -o size=256k tmpfs {disk}
        {command} > /dev/null 2> {tmp_path}/full.err; echo $? > {tmp_path}/full.rc
        ls {disk} > {tmp_path}/after_failure.ls
        mount -o remount,size=4m {disk}
        {command} > /dev/null 2> {tmp_path}/retry.err; echo $? > {tmp_path}/retry.rc
        cp {out} {tmp_path}/final.h5
    """
    subprocess.run(["unshare", "-rm", "sh", "-c", script], check=True, timeout=300)
    err = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "1", err[-2000:]
    assert "Traceback" not in err and "c.h5.partial" in err and "disk is full" in err, err[-2000:]
    assert (tmp_path / "after_failure.ls").read_text().strip() == ""  # nothing half-made is left behind
    retry_err = (tmp_path / "retry.err").read_text()
    assert (tmp_path / "retry.rc").read_text().strip() == "0", retry_err[-2000:]
    clean = tmp_path / "clean.h5"
    subprocess.run(dump_command(clean, digits_teacher), check=True, capture_output=True)
    with h5py.File(tmp_path / "final.h5") as a, h5py.File(clean) as b:
        assert a["logits"][:].tobytes() == b["logits"][:].tobytes()
