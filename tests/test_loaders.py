"""The epoch reaches the DataLoader workers explicitly: one persistent loader serves every epoch's own views.

Had the epoch been the dataset's own state (set in the main process), the
persistent workers would keep serving the epoch they started with.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conftest import STUDENT, TEACHER
from kdcache.augment import Preprocess, apply_crop, sample_crop, view_rng
from kdcache.cache import CacheReader
from kdcache.config import CropRanges, DumpConfig, RunOptions, TrainConfig
from kdcache.data import open_dataset
from kdcache.loaders import EpochOrder, TrainViews, train_loader
from kdcache.targets import SeededViews
from kdcache.teacher import dump
from kdcache.train import prepare

SEED, BATCH, WORKERS = 11, 128, 2
RANGES = CropRanges(scale=(0.3, 1.0))
PREP = Preprocess(size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", crop_pct=0.875)


def expected_crops(train, rows: np.ndarray, view: int) -> torch.Tensor:
    """The crops of (SEED, sample id, view), made here without the loader."""
    crops = []
    for r in rows:
        image = train.load(int(r))
        box, flip = sample_crop(view_rng(SEED, int(train.ids[r]), view), image.shape[-2], image.shape[-1], RANGES)
        crops.append(apply_crop(image, box, flip, PREP))
    return torch.stack(crops)


def test_persistent_workers_serve_each_epochs_own_views_and_crops() -> None:
    train = open_dataset("digits", "train")
    order = EpochOrder(len(train), SEED)
    loader = train_loader(TrainViews(train, SeededViews(SEED, RANGES), PREP), order, BATCH, WORKERS,
                          torch.device("cpu"))
    assert loader.persistent_workers and loader.num_workers == WORKERS
    for epoch in range(3):
        order.set_epoch(epoch)
        perm = order.permutation()
        batches = list(loader)
        assert len(batches) == len(train) // BATCH
        for step, batch in enumerate(batches):
            assert batch["views"] == [epoch], f"epoch {epoch} step {step} served views {batch['views']}"
            rows = batch["rows"].numpy()
            assert rows.tolist() == perm[step * BATCH:(step + 1) * BATCH].tolist()
            some = slice(0, 3)  # the crops of a few images per batch are enough to see the view
            assert torch.equal(batch["images"][some], expected_crops(train, rows[some], epoch)), (epoch, step)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, digits_teacher: str) -> Path:
    out = tmp_path_factory.mktemp("loaders") / "c.h5"
    dump(DumpConfig(teacher=TEACHER, checkpoint=digits_teacher, out=str(out), views=2, store="fp32",
                    run=RunOptions(data="digits", img_size=32, batch_size=128, workers=0, device="cpu")))
    return out


class _CountingFile(h5py.File):
    """h5py.File that notes each opening of one file by a process other than the test's."""

    path: Path
    log: Path
    parent: int

    def __init__(self, name, *args, **kwargs) -> None:
        super().__init__(name, *args, **kwargs)
        if isinstance(name, (str, os.PathLike)) and Path(name) == self.path and os.getpid() != self.parent:
            with open(self.log, "a") as f:
                f.write(f"{os.getpid()}\n")


@pytest.mark.slow
def test_a_preloaded_cache_is_loaded_once_per_worker_per_run(tmp_path: Path, cache: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Three epochs, two workers: two loads of the cache in all, and each epoch's batches carry its view."""
    _CountingFile.path, _CountingFile.log, _CountingFile.parent = cache, tmp_path / "opens.log", os.getpid()
    monkeypatch.setattr(h5py, "File", _CountingFile)  # the forked workers inherit the patch
    run = RunOptions(data="digits", img_size=32, batch_size=BATCH, workers=WORKERS, device="cpu", seed=SEED)
    r = prepare(TrainConfig(model=STUDENT, out=str(tmp_path / "out"), run=run, epochs=3, cached=str(cache),
                            preload=True))
    reader = CacheReader(cache)
    for epoch in range(3):
        batches = list(r.loader(epoch))
        assert len(batches) == len(r.train) // BATCH
        for batch in batches:
            assert batch["views"] == [epoch % 2]
            rows = batch["rows"].numpy()
            assert torch.equal(batch["teacher_logits"], torch.from_numpy(reader.read(rows, epoch % 2)[2]))
    r.close()
    opens = (tmp_path / "opens.log").read_text().split()
    assert len(opens) == WORKERS and len(set(opens)) == WORKERS, f"cache opened and loaded by workers: {opens}"
