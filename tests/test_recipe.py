"""The full recipe (Mixup, CutMix, RandAugment, random erasing) replayed exactly from the cache (issue 11)."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch.utils.data import DataLoader

from conftest import STUDENT, TEACHER, make_image_folder
from kdcache.augment import sample_crop, view_rng
from kdcache.audit import verify_cache
from kdcache.cache import CacheReader
from kdcache.cli import main
from kdcache.config import CropRanges, DumpConfig, OptimOptions, Recipe, RunOptions, TrainConfig
from kdcache.data import open_dataset
from kdcache.errors import CacheError, ConfigError
from kdcache.loaders import EpochOrder, TrainViews, train_loader
from kdcache.losses import label_targets
from kdcache.models import create_model, save_checkpoint
from kdcache.recipe import augment_policy, op_argument, sample_view
from kdcache.replay import CacheReplay, ReplaySampler, replay_collate
from kdcache.targets import CachedViews, SeededViews, preprocess_of_cache
from kdcache.teacher import dump
from kdcache.train import fit

RECIPE = Recipe(mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1", reprob=0.25)
SEED, VIEWS, CLASSES = 5, 2, 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(make_image_folder(tmp_path_factory.mktemp("data"), classes=CLASSES, train=12, test=4))  # 48 images


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(create_model(TEACHER, num_classes=CLASSES, img_size=32), path, {"arch": TEACHER})
    return str(path)


def _run(folder: str, batch_size: int) -> RunOptions:
    return RunOptions(data=folder, img_size=32, batch_size=batch_size, workers=0, device="cpu", seed=SEED)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, folder: str, teacher: str) -> str:
    out = tmp_path_factory.mktemp("cache") / "recipe.h5"
    dump(DumpConfig(teacher=TEACHER, checkpoint=teacher, out=str(out), views=VIEWS, store="fp32", recipe=RECIPE,
                    run=_run(folder, 16)))
    return str(out)


# Options.

def test_default_recipe_draws_todays_crops_and_writes_nothing_more() -> None:
    for sample_id, view in [(0, 0), (7, 3), (123, 14)]:
        record = sample_view(view_rng(1, sample_id, view), 40, 48, CropRanges(), Recipe(), 10, 0, 32)
        box, flip = sample_crop(view_rng(1, sample_id, view), 40, 48, CropRanges())
        assert set(record) == {"crops", "flips"}
        assert np.array_equal(record["crops"], box) and bool(record["flips"]) == flip
    assert Recipe().to_json() == "" and Recipe.from_json("") == Recipe()
    assert Recipe.from_json(RECIPE.to_json()) == RECIPE


@pytest.mark.parametrize("option,value,message", [
    ("--mixup", "-1", "--mixup must be a number >= 0, got -1"),
    ("--reprob", "2", "--reprob must be in [0, 1], got 2"),
    ("--aa", "rand-m9-zz3", "--aa must be a timm RandAugment string"),
    ("--aa", "rand-m9-foo", "unknown section 'foo'"),
    ("--aa", "autoaugment", "--aa must be a timm RandAugment string"),
    ("--aa", "rand-m9-mstd0.5-inc1-n0", "applies no op (n0)"),
])
def test_bad_recipe_values_are_one_line_errors(tmp_path: Path, option: str, value: str, message: str) -> None:
    for command in (["dump-teacher", "--teacher", TEACHER, "--out", str(tmp_path / "c.h5")],
                    ["train-student", "--model", STUDENT, "--out", str(tmp_path / "s")]):
        result = CliRunner().invoke(main, [*command, option, value])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output, result.output
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError, match="--smoothing must be in"):
        TrainConfig(model=STUDENT, out="x", smoothing=1.0)


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "rand-m7-n3", "trivialaugment", "rand-m9-t3a"])
def test_op_arguments_are_timms_for_both_signs(aa: str) -> None:
    """Our sign-explicit level-to-argument mapping gives exactly the values timm's randomly negated one gives."""
    from timm.data.auto_augment import LEVEL_TO_ARG

    hparams = {"translate_const": int(32 * 0.45)}
    for name in augment_policy(aa).ops:
        for magnitude in (0.0, 3.3, 9.0, 10.0):
            ours = {op_argument(name, magnitude, sign, 32) for sign in (1, -1)}
            fn = LEVEL_TO_ARG[name]
            timms = set()
            for s in range(40):  # timm draws the sign from Python's random
                random.seed(s)
                timms.add(0.0 if fn is None else float(fn(magnitude, hparams)[0]))
            assert ours == timms, (name, magnitude, ours, timms)


def test_label_targets_are_timms_mixup_target() -> None:
    from timm.data.mixup import mixup_target

    y = torch.tensor([0, 3, 1, 2, 2])
    lam = 0.3
    ours = label_targets(y, CLASSES, 0.1, y.flip(0), torch.full((5,), lam))
    torch.testing.assert_close(ours, mixup_target(y, CLASSES, lam, 0.1), rtol=0, atol=1e-7)
    assert label_targets(y, CLASSES) is y  # no mixing, no smoothing: the paper's hard labels


# The cache.

@pytest.mark.slow
def test_stored_parameters_equal_the_derived_ones(cache: str, folder: str) -> None:
    reader = CacheReader(cache)
    train = open_dataset(folder, "train")
    assert reader.attrs["format_version"] == 2 and reader.recipe == RECIPE
    assert {"torchvision", "Pillow"} <= set(json.loads(reader.attrs["library_versions"]))
    seen = {"mixed": 0, "cutmix": 0, "erased": 0, "ops": 0}
    for view in range(VIEWS):
        stored = reader.read_records(np.arange(len(train)), view)
        for row in range(len(train)):
            image = train.load(row)
            derived = sample_view(view_rng(SEED, int(train.ids[row]), view), image.shape[-2], image.shape[-1],
                                  CropRanges(), RECIPE, len(train), row, 32)
            assert set(derived) == set(stored) - {"teacher_logits", "features"}
            for name, value in derived.items():
                assert np.array_equal(np.asarray(value), stored[name][row]), (row, view, name)
            seen["mixed"] += int(derived["mix_partners"] >= 0)
            seen["cutmix"] += int(derived["cutmix_boxes"][2] > 0)
            seen["erased"] += int(derived["erase_boxes"][2] > 0)
            seen["ops"] += int((derived["ra_ops"] >= 0).any())
    assert min(seen.values()) > 0, seen  # every kind of parameter occurs, so the comparison means something
    reader.close()


@pytest.mark.slow
def test_cached_and_online_training_take_the_same_steps(tmp_path: Path, cache: str, folder: str,
                                                        teacher: str) -> None:
    def losses(name: str, **mode) -> list[float]:
        out: list[float] = []
        fit(TrainConfig(model=STUDENT, out=str(tmp_path / name), run=_run(folder, 4), epochs=VIEWS, recipe=RECIPE,
                        smoothing=0.1, optim=OptimOptions(opt="adamw", lr=1e-3, weight_decay=0.0, sched="cosine"),
                        **mode), on_step=lambda s: out.append(s.loss))
        return out

    cached = np.array(losses("cached", cached=cache))
    online = np.array(losses("online", online_teacher=TEACHER, teacher_checkpoint=teacher))
    assert len(cached) == len(online) >= 20
    relative = np.abs(cached - online) / np.abs(online)
    assert relative.max() < 1e-4, relative.max()
    plain = np.array(losses("plain"))
    assert np.abs(plain - online).max() > 1e-3  # the comparison can fail


def _hashes(batches, views_per_batch: int = 1) -> dict[tuple[int, int], str]:
    """sha256 of each (row, view)'s pixels and teacher target (pixels only when there is no target)."""
    out = {}
    for batch in batches:
        for i, row in enumerate(batch["rows"].tolist()):
            data = batch["images"][i].numpy().tobytes()
            if "teacher_logits" in batch:
                data += batch["teacher_logits"][i].numpy().tobytes()
            out[(row, batch["views"][i % len(batch["views"])])] = hashlib.sha256(data).hexdigest()
    return out


def _epoch_hashes(dataset: TrainViews, size: int, batch: int, workers: int, world: int, epoch: int) -> dict:
    found = {}
    for rank in range(world):  # the ranks of torchrun, each with its share of every global batch
        order = EpochOrder(size, SEED, rank, world, batch)
        loader = train_loader(dataset, order, batch // world, workers, torch.device("cpu"), persistent=False)
        order.set_epoch(epoch)
        found.update(_hashes(loader))
    return found


@pytest.mark.slow
def test_each_views_pixels_and_target_are_the_same_for_any_batch_size_workers_and_processes(
        cache: str, folder: str) -> None:
    reader = CacheReader(cache)
    train = open_dataset(folder, "train")
    prep = preprocess_of_cache(reader)
    cached = TrainViews(train, CachedViews(reader), prep)
    for epoch in range(VIEWS):
        reference = _epoch_hashes(cached, len(train), 16, 0, 1, epoch)
        assert len(reference) == len(train)
        for batch, workers, world in [(64, 0, 1), (16, 2, 1), (16, 0, 2), (6, 0, 2), (5, 0, 1)]:
            found = _epoch_hashes(cached, len(train), batch, workers, world, epoch)
            assert len(found) >= len(train) - batch and all(reference[k] == v for k, v in found.items()), \
                (batch, workers, world)
        # The online pixels (parameters derived from the seed) are the cached ones, bit for bit.
        seeded = TrainViews(train, SeededViews(SEED, CropRanges(), RECIPE, len(train)), prep)
        every = list(range(len(train)))
        assert _hashes([seeded.batch(every, epoch)]) == _hashes([_without_targets(cached.batch(every, epoch))])
    # A user's own loop (CacheReplay) sees the same pixels and targets.
    replay = CacheReplay(cache, data=folder)
    sampler = ReplaySampler(replay, seed=SEED, batch_size=7)
    loader = DataLoader(replay, batch_size=7, sampler=sampler, collate_fn=replay_collate)
    assert all(_epoch_hashes(cached, len(train), 16, 0, 1, 0)[k] == v for k, v in _hashes(loader).items())
    reader.close()


def _without_targets(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "teacher_logits"}


@pytest.mark.slow
def test_verify_fails_on_a_tampered_parameter(tmp_path: Path, cache: str, folder: str, teacher: str) -> None:
    # One record through the teacher: the parameters of every record are checked whatever `samples` is.
    args = dict(data=folder, teacher=TEACHER, checkpoint=teacher, samples=1, device="cpu")
    assert verify_cache(cache, **args)["ok"]
    for name in ("mix_lambdas", "mix_partners", "cutmix_boxes", "erase_boxes", "ra_args"):
        edited = tmp_path / f"{name}.h5"
        shutil.copy(cache, edited)
        with h5py.File(edited, "r+") as f:
            values = f[name][...]
            used = values >= 0 if name == "mix_partners" else \
                values.reshape(values.shape[0], values.shape[1], -1).any(axis=-1)
            r, v = (int(i) for i in np.argwhere(used)[0])
            if name == "mix_partners":  # another partner, never the row itself
                values[r, v] = next(p for p in range(values.shape[0]) if p not in (r, values[r, v]))
            else:
                values[r, v] = values[r, v] * np.float32(0.5)
            f[name][...] = values
        result = verify_cache(str(edited), **args)
        assert not result["ok"] and result["crop_mismatches"] == 1, (name, result)


@pytest.mark.slow
def test_a_two_process_torchrun_dump_stores_the_one_process_parameters(tmp_path: Path, cache: str, folder: str,
                                                                       teacher: str) -> None:
    """torchrun's ranks dump their shares into part files with the recipe's parameters; the merge keeps them."""
    from test_distributed import run_ok

    out = tmp_path / "two.h5"
    run_ok(["dump-teacher", "--data", folder, "--teacher", TEACHER, "--checkpoint", teacher, "--views", VIEWS,
            "--store", "fp32", "--img-size", 32, "--device", "cpu", "--workers", 0, "--batch-size", 16,
            "--seed", SEED, "--out", out, "--mixup", 0.8, "--cutmix", 1.0, "--aa", RECIPE.aa, "--reprob", 0.25],
           tmp_path / "logs")
    with h5py.File(out) as two, h5py.File(cache) as one:
        assert two.attrs["format_version"] == 2 and two.attrs["recipe"] == one.attrs["recipe"]
        for name in ("crops", "flips", "ra_ops", "ra_args", "erase_boxes", "erase_seeds", "mix_partners",
                     "mix_lambdas", "cutmix_boxes"):
            assert two[name][:].tobytes() == one[name][:].tobytes(), name
        np.testing.assert_allclose(two["logits"][:], one["logits"][:], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_grown_recipe_cache_equals_one_dumped_in_one_go(tmp_path: Path, cache: str, folder: str,
                                                          teacher: str) -> None:
    out = tmp_path / "grown.h5"
    for views in (1, VIEWS):  # the second dump keeps view 0 and adds view 1
        dump(DumpConfig(teacher=TEACHER, checkpoint=teacher, out=str(out), views=views, store="fp32", recipe=RECIPE,
                        run=_run(folder, 16)))
    with h5py.File(out) as grown, h5py.File(cache) as one:
        assert grown.attrs["grown_from_views"] == 1 and grown.attrs["recipe"] == one.attrs["recipe"]
        for name in ("crops", "flips", "ra_ops", "ra_args", "erase_boxes", "erase_seeds", "mix_partners",
                     "mix_lambdas", "cutmix_boxes"):
            assert grown[name][:].tobytes() == one[name][:].tobytes(), name
        np.testing.assert_allclose(grown["logits"][:], one["logits"][:], rtol=1e-5, atol=1e-5)
    # A recipe is a setting: a dump with another one does not grow the cache, it is refused.
    with pytest.raises(CacheError, match="recipe"):
        dump(DumpConfig(teacher=TEACHER, checkpoint=teacher, out=str(out), views=VIEWS + 1, store="fp32",
                        recipe=Recipe(mixup=0.2), run=_run(folder, 16)))


@pytest.mark.slow
def test_training_notes_other_pixel_libraries_and_unused_recipe_options(tmp_path: Path, cache: str, folder: str,
                                                                        teacher: str) -> None:
    from kdcache.report import Progress

    class Notes(Progress):
        def __init__(self) -> None:
            self.notes: list[str] = []

        def note(self, message: str) -> None:
            self.notes.append(message)

    edited = tmp_path / "older.h5"
    shutil.copy(cache, edited)
    with h5py.File(edited, "r+") as f:
        versions = json.loads(f.attrs["library_versions"])
        f.attrs["library_versions"] = json.dumps({**versions, "Pillow": "9.0.0"})
    notes = Notes()
    fit(TrainConfig(model=STUDENT, out=str(tmp_path / "s"), run=_run(folder, 16), epochs=1, cached=str(edited),
                    recipe=Recipe(mixup=0.2)), notes)
    assert any("was dumped with Pillow 9.0.0" in n for n in notes.notes), notes.notes
    assert any("replays the recipe it was dumped with" in n for n in notes.notes), notes.notes
