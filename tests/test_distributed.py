"""torchrun with 2 processes on gloo: the dump equals one process's, training takes the same steps.

Real processes, started the way a user starts them (``python -m torch.distributed.run``),
on the built-in digits with the tiny test models.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import STUDENT, TEACHER, recomputed, rows_done
from kdcache.cache import CacheReader
from kdcache.config import CropRanges, DumpConfig, OptimOptions, RunOptions, TrainConfig
from kdcache.data import open_dataset
from kdcache.loaders import EpochOrder, TrainViews
from kdcache.targets import CachedViews, SeededViews, preprocess_of_cache
from kdcache.teacher import dump
from kdcache.train import fit

ROOT = Path(__file__).resolve().parents[1]
VIEWS, DUMP_BATCH = 3, 48
TRAIN = ["--data", "digits", "--model", STUDENT, "--img-size", "32", "--device", "cpu", "--workers", "0",
         "--batch-size", "64", "--opt", "adamw", "--lr", "1e-3", "--sched", "cosine", "--epochs", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], logs: Path, **popen) -> subprocess.Popen:
    """`torchrun --nproc_per_node 2 -m kdcache ARGS`, each rank's output in LOGS/<run>/attempt_0/<rank>/."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "--log-dir", str(logs), "--redirects", "3",
               "-m", "kdcache", *[str(a) for a in args]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def run_ok(args: list[str], logs: Path) -> None:
    proc = torchrun(args, logs)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:] + "".join(p.read_text()[-2000:] for p in logs.rglob("*.log"))


def rank_output(logs: Path, rank: int) -> str:
    return "".join(p.read_text() for p in sorted(logs.rglob(f"attempt_0/{rank}/*.log")))


def dump_args(out: Path, checkpoint: str) -> list:
    return ["dump-teacher", "--teacher", TEACHER, "--checkpoint", checkpoint, "--views", VIEWS, "--store", "fp32",
            "--img-size", 32, "--device", "cpu", "--workers", 0, "--batch-size", DUMP_BATCH, "--out", out]


@pytest.fixture(scope="module")
def one_process_cache(tmp_path_factory: pytest.TempPathFactory, digits_teacher: str) -> Path:
    out = tmp_path_factory.mktemp("one") / "c.h5"
    dump(DumpConfig(teacher=TEACHER, checkpoint=digits_teacher, out=str(out), views=VIEWS, store="fp32",
                    run=RunOptions(data="digits", img_size=32, batch_size=DUMP_BATCH, workers=0, device="cpu")))
    return out


def assert_same_cache(a: Path, b: Path) -> float:
    """Equal datasets and settings; returns the largest logit difference relative to the largest |logit|."""
    with h5py.File(a) as x, h5py.File(b) as y:
        assert set(x) == set(y)
        for name in ("sample_ids", "labels", "content_hashes", "crops", "flips", "done"):
            assert x[name][:].tobytes() == y[name][:].tobytes(), name  # bit-equal
        skip = {"created"}
        assert {k for k in x.attrs if k not in skip} == {k for k in y.attrs if k not in skip}
        for k in x.attrs:
            if k not in skip:
                assert np.array_equal(x.attrs[k], y.attrs[k]), k
        la, lb = x["logits"][:], y["logits"][:]
    return float(np.abs(la - lb).max() / np.abs(la).max())


@pytest.mark.slow
def test_two_process_dump_equals_one_process_dump(tmp_path: Path, digits_teacher: str,
                                                  one_process_cache: Path) -> None:
    out = tmp_path / "c.h5"
    run_ok(dump_args(out, digits_teacher), tmp_path / "logs")
    assert out.exists() and not list(tmp_path.glob("c.h5.*rank*")), "the parts are merged and deleted"
    assert assert_same_cache(out, one_process_cache) < 1e-5
    assert "records_per_second" in rank_output(tmp_path / "logs", 0)
    assert rank_output(tmp_path / "logs", 1).strip() == "", "rank 1 prints nothing"


def _worker_pids(parent: int) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes, from their environment."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = dict(v.split("=", 1) for v in (entry / "environ").read_text().split("\0") if "=" in v)
        except (OSError, ValueError, IndexError):
            continue
        if "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


@pytest.mark.slow
def test_a_dead_rank_leaves_a_resumable_dump(tmp_path: Path, digits_teacher: str, one_process_cache: Path) -> None:
    out = tmp_path / "c.h5"
    args = dump_args(out, digits_teacher)
    args[args.index("--batch-size") + 1] = VIEWS  # one image per batch: a slower dump, easier to catch mid-way
    proc = torchrun(args, tmp_path / "logs1")
    part1 = tmp_path / "c.h5.rank1-of-2.partial"
    deadline = time.time() + 120
    while rows_done(part1) < 30 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    pids = _worker_pids(proc.pid)
    assert 1 in pids and proc.poll() is None, "rank 1 finished before it could be killed"
    os.kill(pids[1], signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode != 0 and not out.exists()
    assert 0 < rows_done(part1) < 674

    run_ok(dump_args(out, digits_teacher), tmp_path / "logs2")
    assert "resuming a 2-process dump" in rank_output(tmp_path / "logs2", 0)
    assert assert_same_cache(out, one_process_cache) < 1e-5


def test_epoch_order_shards_make_up_the_one_process_batches() -> None:
    for size, batch, world in [(1348, 64, 2), (100, 32, 2), (101, 30, 3), (20, 64, 2), (5, 8, 4)]:
        one = EpochOrder(size, seed=7)
        one.set_epoch(3)
        full = list(one)
        steps = size // batch if size > batch else 1
        shards = []
        for rank in range(world):
            order = EpochOrder(size, seed=7, rank=rank, world_size=world, batch_size=batch)
            order.set_epoch(3)
            shards.append(list(order))
        assert len({len(s) for s in shards}) == 1, "every rank has the same number of rows"
        local = batch // world
        for step in range(steps):
            together = sorted(i for s in shards for i in s[step * local:(step + 1) * local])
            if size > batch:
                assert together == sorted(full[step * batch:(step + 1) * batch])
            else:  # one padded batch: every row, some twice
                assert set(together) == set(full)
    with pytest.raises(ValueError, match="multiple"):
        EpochOrder(10, 0, rank=0, world_size=2, batch_size=5)


@pytest.mark.slow
def test_views_per_step_picks_the_views_and_decodes_once(one_process_cache: Path) -> None:
    reader = CacheReader(one_process_cache)
    train = open_dataset("digits", "train")
    cached = TrainViews(train, CachedViews(reader), preprocess_of_cache(reader), views_per_step=2)
    assert [cached.epoch_views(e) for e in range(3)] == [[0, 1], [2, 0], [1, 2]]  # (e*M + j) mod K, K = 3
    seeded = TrainViews(train, SeededViews(0, CropRanges()), preprocess_of_cache(reader), views_per_step=2)
    assert [seeded.epoch_views(e) for e in range(3)] == [[0, 1], [2, 3], [4, 5]]  # e*M + j

    loads = []
    load = train.load
    train.load = lambda i: loads.append(i) or load(i)
    rows = [5, 0, 9]
    batch = cached.batch(rows, epoch=1)
    assert sorted(loads) == sorted(rows), "each image is decoded once for its two views"
    assert batch["images"].shape == (6, 3, 32, 32) and batch["views"] == [2, 0]
    assert batch["rows"].tolist() == [5, 5, 0, 0, 9, 9]
    assert batch["labels"].tolist() == np.repeat(train.labels[rows], 2).tolist()
    for j, view in enumerate([2, 0]):
        np.testing.assert_array_equal(batch["teacher_logits"][j::2].numpy(), reader.read(np.array(rows), view)[2])


@pytest.mark.slow
def test_views_per_step_2_trains_in_cached_mode(tmp_path: Path, one_process_cache: Path) -> None:
    run = RunOptions(data="digits", img_size=32, batch_size=64, workers=0, device="cpu", seed=0)
    result = fit(TrainConfig(model=STUDENT, out=str(tmp_path / "m2"), run=run, epochs=2, views_per_step=2,
                             cached=str(one_process_cache), optim=OptimOptions(opt="adamw", lr=1e-3, sched="cosine")))
    history = json.loads((tmp_path / "m2" / "history.json").read_text())
    assert [h["views"] for h in history] == [[0, 1], [2, 0]]
    assert [h["steps"] for h in history] == [1348 // 64] * 2  # the same steps, each with twice the crops
    assert [h["images"] for h in history] == [1348 // 64 * 64 * 2] * 2
    assert result["views_per_step"] == 2 and np.isfinite(history[-1]["loss"])
    again = recomputed(result, "digits", preprocess_of_cache(CacheReader(one_process_cache)))
    assert (again["top1"], again["mAP"]) == pytest.approx((result["top1"], result["mAP"]))


@pytest.mark.slow
def test_two_process_training_takes_the_one_process_steps(tmp_path: Path, one_process_cache: Path) -> None:
    out = tmp_path / "two"
    run_ok(["train-student", *TRAIN, "--cached", one_process_cache, "--out", out], tmp_path / "logs")
    two = json.loads((out / "history.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "history.json", "metrics.json", "model.pt"]
    assert metrics["processes"] == 2 and metrics["train_images"] == 2 * (1348 // 64) * 64
    assert "metrics:" in rank_output(tmp_path / "logs", 0)
    assert rank_output(tmp_path / "logs", 1).strip() == "", "rank 1 prints and writes nothing"

    run = RunOptions(data="digits", img_size=32, batch_size=64, workers=0, device="cpu", seed=0)
    one_metrics = fit(TrainConfig(model=STUDENT, out=str(tmp_path / "one"), run=run, epochs=2,
                                  cached=str(one_process_cache),
                                  optim=OptimOptions(opt="adamw", lr=1e-3, sched="cosine")))
    one = json.loads((tmp_path / "one" / "history.json").read_text())
    assert [h["steps"] for h in two] == [h["steps"] for h in one] == [1348 // 64] * 2
    assert [h["view"] for h in two] == [h["view"] for h in one] == [0, 1]
    # The same batches and averaged gradients: the same training, up to float rounding.
    np.testing.assert_allclose([h["loss"] for h in two], [h["loss"] for h in one], rtol=1e-4)
    assert abs(metrics["top1"] - one_metrics["top1"]) <= 0.5


@pytest.mark.slow
def test_a_rank_error_is_named_in_torchruns_summary(tmp_path: Path) -> None:
    """torchrun prints its own traceback for any failed rank; the root cause it names is kdcache's one line."""
    args = ["train-student", *TRAIN, "--out", tmp_path / "s"]
    args[args.index("--batch-size") + 1] = "63"  # not a multiple of the 2 processes
    proc = torchrun(args, tmp_path / "logs")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode != 0
    root_cause = out[out.index("Root Cause"):]
    assert "--batch-size 63 is the global batch and is split evenly over the 2 processes" in root_cause, out[-3000:]
    assert "To enable traceback" not in root_cause
    for rank in (0, 1):
        assert "Traceback" not in rank_output(tmp_path / "logs", rank)
