"""Output files are written whole or not at all; a full or read-only disk is one line, and a trained model is kept."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import STUDENT, make_image_folder
from kdcache import outputs
from kdcache.config import RunOptions, TrainConfig, save_json
from kdcache.errors import OutputError
from kdcache.models import read_state_dict, save_checkpoint
from tmpfs import can_mount_tmpfs

ROOT = Path(__file__).resolve().parents[1]


def _disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("name", ["config.json", "model.pt"])
def test_a_failed_write_leaves_the_old_file_and_no_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"the previous file")
    monkeypatch.setattr(outputs.os, "fsync", _disk_full)
    with pytest.raises(OutputError) as caught:
        if name == "config.json":
            save_json(RunOptions(), path)
        else:
            save_checkpoint(torch.nn.Linear(3, 2), path, {"arch": "linear"})
    assert str(caught.value) == f"cannot write {path}: the disk is full (no space left on device)"
    assert path.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_out_under_a_regular_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="a part of its path is a file"):
        outputs.check_writable(tmp_path / "file" / "run")
    with pytest.raises(OutputError, match="a file of that name is in the way"):
        outputs.check_writable(tmp_path / "file")


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_kept_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kdcache import train

    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    real_save = train.save_checkpoint

    def save(model, path, meta):  # the disk is full for the run's folder only
        if Path(path).parent == out:
            raise OutputError(f"cannot write {path}: {outputs.reason(OSError(errno.ENOSPC, 'full'))}")
        return real_save(model, path, meta)

    monkeypatch.setattr(train, "save_checkpoint", save)
    run = RunOptions(data=str(data), img_size=32, batch_size=8, workers=0, device="cpu")
    with pytest.raises(OutputError) as caught:
        train.fit(TrainConfig(model=STUDENT, out=str(out), run=run, epochs=1))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot write {out / 'model.pt'}: the disk is full")
    kept = Path(message.split("saved to ")[1].split(" instead")[0])
    assert message.endswith(f"metrics.json and history.json written to {out}")
    assert json.loads((out / "metrics.json").read_text())["checkpoint"] == str(kept)
    assert read_state_dict(kept).keys() == train.build(STUDENT, 3, 32).state_dict().keys()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "history.json", "metrics.json"]
    shutil.rmtree(kept.parent)


# Real file systems: a tmpfs in a private mount namespace (needs unshare and user namespaces).
SCENARIOS = r'''
import json, shutil, sys
from pathlib import Path
from kdcache.config import RunOptions, TrainConfig, save_json
from kdcache.errors import KdcacheError
from kdcache.train import fit

disk, data, report = Path(sys.argv[1]), sys.argv[2], {}
run = RunOptions(data=data, img_size=32, batch_size=8, workers=0, device="cpu")

def attempt(name, call):
    try:
        call()
        report[name] = {"error": None}
    except KdcacheError as e:
        report[name] = {"error": str(e)}
    report[name]["files"] = sorted(str(p.relative_to(disk)) for p in disk.rglob("*") if p.is_file())

def fill(leave):
    free = shutil.disk_usage(disk).free
    with open(disk / "filler", "ab") as f:
        f.write(b"\0" * max(0, free - leave))

def scenario():
    which = sys.argv[3]
    if which == "full":  # config.json on a full disk
        fill(0)
        attempt("config", lambda: save_json(run, disk / "run" / "config.json"))
    elif which == "small":  # no room for the checkpoint: refused before training
        attempt("small", lambda: fit(TrainConfig(model="test_vit", out=str(disk / "run"), run=run, epochs=1)))
    elif which == "late":  # the disk fills during training
        filled = []
        def on_step(_):
            if not filled:
                fill(64 * 1024)
                filled.append(1)
        attempt("late", lambda: fit(TrainConfig(model="test_vit", out=str(disk / "run"), run=run, epochs=1),
                                    on_step=on_step))
    elif which == "readonly":
        attempt("readonly", lambda: fit(TrainConfig(model="test_vit", out=str(disk / "run"), run=run, epochs=1)))
    print(json.dumps(report))

scenario()
'''


def on_tmpfs(tmp: Path, data: Path, scenario: str, size: str, read_only: bool = False) -> dict:
    disk = tmp / scenario
    disk.mkdir()
    script = tmp / "scenarios.py"
    script.write_text(SCENARIOS)
    remount = f"mount -o remount,ro {disk} && " if read_only else ""
    command = (f"mount -t tmpfs -o size={size} tmpfs {disk} && {remount}"
               f"{sys.executable} {script} {disk} {data} {scenario}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])[scenario if scenario != "full" else "config"]


@pytest.mark.slow
def test_full_and_read_only_disks_for_real(tmp_path: Path) -> None:
    if not can_mount_tmpfs(tmp_path):
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    data = make_image_folder(tmp_path / "data")
    disk = tmp_path

    full = on_tmpfs(tmp_path, data, "full", "256k")
    config = disk / "full" / "run" / "config.json"
    assert full["error"] == f"cannot write {config}: the disk is full (no space left on device)"
    assert full["files"] == ["filler"], "no 0-byte config.json, no config.json.tmp"

    small = on_tmpfs(tmp_path, data, "small", "4m")
    assert small["error"].startswith(f"the output folder {disk / 'small' / 'run'} has ")
    assert "but the checkpoint of test_vit needs about" in small["error"] and small["files"] == []

    late = on_tmpfs(tmp_path, data, "late", "40m")
    message = late["error"]
    assert message.startswith(f"cannot write {disk / 'late' / 'run' / 'model.pt'}: the disk is full")
    assert "the trained model was saved to /" in message and message.endswith(
        f"metrics.json and history.json written to {disk / 'late' / 'run'}")
    kept = Path(message.split("saved to ")[1].split(" instead")[0])
    assert read_state_dict(kept)  # a whole checkpoint, outside the full disk
    shutil.rmtree(kept.parent)
    assert late["files"] == ["filler", "run/config.json", "run/history.json", "run/metrics.json"]

    read_only = on_tmpfs(tmp_path, data, "readonly", "4m", read_only=True)
    assert read_only["error"] == (f"cannot create the output folder {disk / 'readonly' / 'run'}: "
                                  "the file system is read-only")
