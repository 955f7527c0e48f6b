"""The core promise: cached KD trains exactly like online KD on the same crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import STUDENT, TEACHER
from kdcache.augment import apply_crop, normalize
from kdcache.cache import CacheReader
from kdcache.config import DumpConfig, OptimOptions, RunOptions, TrainConfig
from kdcache.data import open_dataset
from kdcache.models import build
from kdcache.targets import preprocess_of_cache
from kdcache.teacher import dump
from kdcache.train import fit

RUN = RunOptions(data="digits", img_size=32, batch_size=32, workers=0, device="cpu", seed=3)
OPTIM = OptimOptions(opt="adamw", lr=1e-3, weight_decay=0.0, sched="cosine")


def _dump(path: Path, checkpoint: str, store: str, views: int = 2) -> str:
    dump(DumpConfig(teacher=TEACHER, checkpoint=checkpoint, out=str(path), views=views, store=store,
                    run=RunOptions(**{**RUN.__dict__, "batch_size": 64})))
    return str(path)


def _losses(tmp: Path, name: str, **mode) -> list[float]:
    losses: list[float] = []
    fit(TrainConfig(model=STUDENT, out=str(tmp / name), run=RUN, optim=OPTIM, epochs=2, **mode),
        on_step=lambda s: losses.append(s.loss))
    return losses


@pytest.fixture(scope="module")
def online_losses(tmp_path_factory: pytest.TempPathFactory, digits_teacher: str) -> list[float]:
    return _losses(tmp_path_factory.mktemp("online"), "online", online_teacher=TEACHER,
                   teacher_checkpoint=digits_teacher)


@pytest.mark.parametrize("store,tolerance", [("fp32", 1e-4), ("fp16", 1e-2)])
def test_cached_equals_online_per_step(tmp_path: Path, digits_teacher: str, online_losses: list[float],
                                       store: str, tolerance: float) -> None:
    cache = _dump(tmp_path / f"{store}.h5", digits_teacher, store)
    cached = _losses(tmp_path, "cached", cached=cache)
    assert len(cached) == len(online_losses) >= 20
    relative = np.abs(np.array(cached) - np.array(online_losses)) / np.abs(np.array(online_losses))
    assert relative.max() < tolerance, f"largest relative loss difference {relative.max():.2e} (store {store})"


def test_plain_differs_from_kd(tmp_path: Path, online_losses: list[float]) -> None:
    """A sanity check that the comparison above can fail: plain training has other losses."""
    plain = _losses(tmp_path, "plain")
    assert len(plain) == len(online_losses)
    assert np.abs(np.array(plain) - np.array(online_losses)).max() > 1e-3


def test_cached_logits_equal_teacher_on_replayed_crop(tmp_path: Path, digits_teacher: str) -> None:
    cache = _dump(tmp_path / "c.h5", digits_teacher, "fp32", views=3)
    reader = CacheReader(cache)
    prep = preprocess_of_cache(reader)
    train = open_dataset("digits", "train")
    teacher = build(TEACHER, 10, 32, checkpoint=digits_teacher).eval()
    rows = np.array([0, 5, 77, len(train) - 1])
    for view in range(3):
        boxes, flips, logits = reader.read(rows, view)
        crops = torch.stack([apply_crop(train.load(int(r)), b, bool(f), prep) for r, b, f in zip(rows, boxes, flips)])
        with torch.no_grad():
            live = teacher(normalize(crops, prep)).numpy()
        np.testing.assert_allclose(logits, live, rtol=1e-4, atol=1e-5)
    assert reader.info.teacher_checkpoint_sha256  # the checkpoint is identified
