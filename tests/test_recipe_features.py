"""A recipe cache with teacher features (issues 11 and 12 together): the dump stores the recipe's parameters and
the features of the teacher on the recipe's pixels; verify and cached = online feature KD hold under the recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import STUDENT, TEACHER, make_image_folder
from kdcache.audit import verify_cache
from kdcache.cache import CacheReader
from kdcache.config import DumpConfig, OptimOptions, Recipe, RunOptions, TrainConfig
from kdcache.models import create_model, save_checkpoint
from kdcache.teacher import dump
from kdcache.train import fit

RECIPE = Recipe(mixup=0.8, cutmix=1.0, aa="rand-m9-mstd0.5-inc1", reprob=0.25)
SEED, VIEWS, CLASSES = 5, 2, 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    import torch

    tmp = tmp_path_factory.mktemp("recipe-features")
    folder = str(make_image_folder(tmp / "data", classes=CLASSES, train=6, test=2))  # 24 images
    torch.manual_seed(123)
    checkpoint = tmp / "teacher.pt"
    save_checkpoint(create_model(TEACHER, num_classes=CLASSES, img_size=32), checkpoint, {"arch": TEACHER})
    out = tmp / "cache.h5"
    dump(DumpConfig(teacher=TEACHER, checkpoint=str(checkpoint), out=str(out), views=VIEWS, store="fp32",
                    recipe=RECIPE, features="pooled,attention:2", run=_run(folder, 8)))
    return {"tmp": tmp, "data": folder, "checkpoint": str(checkpoint), "cache": str(out)}


def _run(folder: str, batch_size: int) -> RunOptions:
    return RunOptions(data=folder, img_size=32, batch_size=batch_size, workers=0, device="cpu", seed=SEED)


def test_the_cache_holds_the_recipe_parameters_and_the_features(setup: dict) -> None:
    reader = CacheReader(setup["cache"])
    assert reader.attrs["format_version"] == 2 and reader.info.features == ("pooled:64", "attention:2")
    records = reader.read_records(np.arange(reader.info.num_samples), 1)
    assert {"mix_partners", "mix_lambdas", "ra_ops", "erase_boxes"} <= set(records)
    assert records["features"]["pooled"].shape == (24, 64) and records["features"]["attention"].shape == (24, 2, 2)
    assert (records["mix_partners"] >= 0).any()  # some views are mixed, so the features are of mixed pixels
    reader.close()


def test_verify_recomputes_the_features_on_the_recipe_views(setup: dict) -> None:
    result = verify_cache(setup["cache"], setup["data"], TEACHER, setup["checkpoint"], samples=16)
    assert result["ok"] and result["crop_mismatches"] == 0
    assert min(result["min_feature_cosine"].values()) > 0.99999


@pytest.mark.slow
def test_cached_and_online_feature_kd_take_the_same_steps_under_the_recipe(setup: dict) -> None:
    def losses(name: str, **mode) -> list[float]:
        out: list[float] = []
        fit(TrainConfig(model=STUDENT, out=str(setup["tmp"] / name), run=_run(setup["data"], 4), epochs=VIEWS,
                        recipe=RECIPE, smoothing=0.1, feature_loss="mse", feature_weight=2.0,
                        optim=OptimOptions(opt="adamw", lr=1e-3, weight_decay=0.0, sched="cosine"), **mode),
            on_step=lambda s: out.append(s.loss))
        return out

    cached = np.array(losses("cached", cached=setup["cache"]))
    online = np.array(losses("online", online_teacher=TEACHER, teacher_checkpoint=setup["checkpoint"]))
    assert len(cached) == len(online) == 12
    assert (np.abs(cached - online) / np.abs(online)).max() < 1e-4
