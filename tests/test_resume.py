"""A dump killed with SIGKILL resumes to the same cache; a full disk is a clear, resumable error."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import TEACHER


def dump_command(out: Path, checkpoint: str, seed: int = 0) -> list[str]:
    return [sys.executable, "-m", "kdcache", "dump-teacher", "--teacher", TEACHER, "--checkpoint", checkpoint,
            "--views", "4", "--store", "fp32", "--img-size", "32", "--device", "cpu", "--workers", "0",
            "--batch-size", "8", "--seed", str(seed), "--out", str(out)]


def rows_done(partial: Path) -> int:
    try:
        with h5py.File(partial, "r", locking=False) as h5:
            return int(h5["done"][:].sum())
    except (OSError, KeyError):  # not created yet, or caught mid-write
        return 0


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


def _limit_file_size() -> None:
    limit = 200 * 1024  # a "disk" that fills up during the dump
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_out_of_space_is_a_clear_error_and_resumable(tmp_path: Path, digits_teacher: str) -> None:
    out = tmp_path / "full.h5"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    full = subprocess.run(dump_command(out, digits_teacher), capture_output=True, text=True, env=env,
                          preexec_fn=_limit_file_size)
    assert full.returncode != 0
    assert "Traceback" not in full.stderr, full.stderr[-2000:]
    assert "full.h5.partial" in full.stderr
    resumed = subprocess.run(dump_command(out, digits_teacher), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    with h5py.File(out) as h5:
        assert h5["done"][:].all()
