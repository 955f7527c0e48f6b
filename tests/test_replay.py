"""The public replay API: the README's own loop runs and matches train-student; epochs, workers and ranks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import STUDENT, TEACHER, make_image_folder
from kdcache import CacheError, CacheReplay, ReplaySampler, replay_collate
from kdcache.augment import apply_crop
from kdcache.cache import CacheReader
from kdcache.config import DumpConfig, OptimOptions, RunOptions, TrainConfig
from kdcache.teacher import dump
from kdcache.train import fit

README = Path(__file__).resolve().parents[1] / "README.md"
SEED, BATCH, VIEWS = 5, 8, 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("replay") / "folder", classes=3, train=16, test=2)


@pytest.fixture(scope="module")
def cache(folder: Path) -> Path:
    """K = 2 views of 48 images, fp32, from a teacher with seeded random weights."""
    out = folder.parent / "cache.h5"
    dump(DumpConfig(teacher=TEACHER, out=str(out), views=VIEWS, store="fp32",
                    run=RunOptions(data=str(folder), img_size=32, batch_size=16, workers=0, device="cpu", seed=SEED)))
    return out


def readme_loop() -> str:
    """The one python block of the README's own-loop section."""
    text = README.read_text()
    section = text.split("## Use the cache in your own training loop", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"the section should hold one python block, found {len(blocks)}"
    return blocks[0]


def with_settings(code: str, **values: object) -> str:
    """`code` with the top-level assignments of the given names replaced by `values`."""
    for name, value in values.items():
        code, n = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, count=1, flags=re.M)
        assert n == 1, f"the README block no longer sets {name} on a line of its own"
    return code


@pytest.mark.slow
def test_readme_loop_runs_and_matches_train_student_per_step(tmp_path: Path, folder: Path, cache: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    code = with_settings(readme_loop(), CACHE=str(cache), DATA=str(folder), STUDENT=STUDENT)
    code, n = re.subn(r"^EPOCHS, BATCH, SEED = .*$", f"EPOCHS, BATCH, SEED = 2, {BATCH}, {SEED}", code, flags=re.M)
    assert n == 1, "the README block no longer sets EPOCHS, BATCH, SEED on one line"
    namespace: dict = {"__name__": "readme_loop"}
    exec(compile(code, str(README), "exec"), namespace)
    own = namespace["losses"]
    assert "epoch 1: mean loss" in capsys.readouterr().out

    # The same settings through train-student's library call (what the CLI runs).
    cli: list[float] = []
    run = RunOptions(data=str(folder), batch_size=BATCH, workers=0, device="cpu", seed=SEED)
    fit(TrainConfig(model=STUDENT, out=str(tmp_path / "cli"), run=run, epochs=2, cached=str(cache), alpha=0.5,
                    temperature=4.0, optim=OptimOptions(opt="adamw", lr=1e-3, weight_decay=0.05, decay_rate=1.0)),
        on_step=lambda s: cli.append(s.loss))
    assert len(own) == len(cli) == 2 * (48 // BATCH)
    np.testing.assert_allclose(own, cli, rtol=1e-5)
    assert abs(cli[-1] - cli[0]) > 1e-3  # the steps trained: equal losses are not one value repeated


def test_persistent_workers_serve_each_epochs_stored_view(folder: Path, cache: Path) -> None:
    replay = CacheReplay(cache, str(folder))
    sampler = ReplaySampler(replay, seed=SEED)
    loader = DataLoader(replay, batch_size=BATCH, sampler=sampler, collate_fn=replay_collate, num_workers=2,
                        persistent_workers=True)
    reader = CacheReader(cache)
    served: dict[int, dict[int, torch.Tensor]] = {}
    for epoch in range(3):
        sampler.set_epoch(epoch)
        view = epoch % VIEWS
        rows = []
        for batch in loader:
            assert batch["views"] == [view], f"epoch {epoch} served views {batch['views']}"
            r = batch["rows"].numpy()
            boxes, flips, logits = reader.read(r, view)
            expected = torch.stack([apply_crop(replay.images.load(int(row)), box, bool(flip), replay.prep)
                                    for row, box, flip in zip(r, boxes, flips)])
            assert torch.equal(batch["images"], expected), f"epoch {epoch}: not the stored crops of view {view}"
            assert torch.equal(batch["teacher_logits"], torch.from_numpy(logits))
            assert torch.equal(batch["labels"], torch.from_numpy(replay.images.labels[r]))
            served[epoch] = {**served.get(epoch, {}), **dict(zip(r.tolist(), batch["images"]))}
            rows += r.tolist()
        assert rows == sampler.permutation().tolist()
    changed = sum(not torch.equal(served[0][row], served[1][row]) for row in served[0])
    assert changed > len(served[0]) // 2, "epoch 1 should replay another view than epoch 0"
    assert all(torch.equal(served[0][row], served[2][row]) for row in served[0])  # K = 2: epoch 2 is view 0 again


@pytest.mark.parametrize("world_size,size", [(2, 48), (4, 48), (2, 52)])
def test_ranks_share_each_epoch_once(world_size: int, size: int) -> None:
    """Every row the one-process run trains on is served once per epoch, by one rank, at the same step."""
    data = range(size)  # the sampler needs only the dataset's length
    alone = ReplaySampler(data, seed=SEED, batch_size=BATCH, rank=0, world_size=1)
    for epoch in (0, 1):
        alone.set_epoch(epoch)
        single = [row for row, _ in alone][:size // BATCH * BATCH]
        per_rank = []
        for rank in range(world_size):
            sampler = ReplaySampler(data, seed=SEED, batch_size=BATCH, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            indices = list(sampler)
            assert {e for _, e in indices} == {epoch}
            per_rank.append([row for row, _ in indices])
        served = sorted(row for rows in per_rank for row in rows)
        assert served == sorted(single), f"world_size {world_size}: rows not served exactly once"
        local = BATCH // world_size
        for step in range(size // BATCH):
            step_rows = sorted(row for rows in per_rank for row in rows[step * local:(step + 1) * local])
            assert step_rows == sorted(single[step * BATCH:(step + 1) * BATCH]), f"step {step} differs"


def test_torchrun_environment_sets_the_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    sampler = ReplaySampler(range(20), seed=0, batch_size=8)
    assert (sampler.rank, sampler.world_size, sampler.per_process_batch) == (1, 2, 4)
    with pytest.raises(ValueError, match="multiple of world_size"):
        ReplaySampler(range(20), seed=0, batch_size=7)


def test_items_collate_to_the_batch_read_and_bad_uses_are_refused(tmp_path: Path, folder: Path,
                                                                  cache: Path) -> None:
    replay = CacheReplay(cache, str(folder), views_per_step=2)
    pairs = [(5, 1), (0, 1), (17, 1)]
    whole = replay.__getitems__(pairs)
    one_by_one = replay_collate([replay[p] for p in pairs])
    assert whole["views"] == one_by_one["views"] == [0, 1]  # epoch 1 with M = 2: views 2 and 3 mod K
    for key in ("images", "labels", "rows", "teacher_logits"):
        assert torch.equal(whole[key], one_by_one[key]), key
    assert whole["rows"].tolist() == [5, 5, 0, 0, 17, 17]  # image-major, in the order asked
    mixed = replay.__getitems__([(5, 0), (0, 1)])  # epochs mixed by a foreign sampler: each keeps its own
    assert torch.equal(mixed["images"][2:], replay[(0, 1)]["images"])
    with pytest.raises(TypeError, match=r"indexed by \(row, epoch\)"):
        replay[3]
    with pytest.raises(CacheError, match="another dataset"):
        CacheReplay(cache, "digits")
