"""Feature targets: stored with the logits, equal to the live teacher's, and distilled alike cached and online."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import STUDENT, TEACHER, make_image_folder
from kdcache.augment import apply_crop
from kdcache.audit import inspect_cache, require_ok, verify_cache
from kdcache.cache import CacheReader
from kdcache.cli import main
from kdcache.config import DumpConfig, OptimOptions, RunOptions, TrainConfig
from kdcache.data import open_dataset
from kdcache.errors import CacheError, ConfigError
from kdcache.features import FeatureSpec, attention_map
from kdcache.losses import feature_loss
from kdcache.models import build, create_model, load_projector, read_state_dict, save_checkpoint
from kdcache.targets import preprocess_of_cache
from kdcache.teacher import dump, teacher_outputs
from kdcache.train import fit

RUN = dict(img_size=32, workers=0, device="cpu", seed=3)
OPTIM = OptimOptions(opt="adamw", lr=1e-3, weight_decay=0.0, sched="cosine")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """24 training images of 3 classes, a teacher checkpoint and an fp32 cache with both features."""
    tmp = tmp_path_factory.mktemp("features")
    data = str(make_image_folder(tmp / "data"))
    torch.manual_seed(7)
    checkpoint = tmp / "teacher.pt"
    save_checkpoint(create_model(TEACHER, 3, 32), checkpoint, {"arch": TEACHER, "num_classes": 3})
    cache = tmp / "fp32.h5"
    dump(DumpConfig(teacher=TEACHER, checkpoint=str(checkpoint), out=str(cache), views=2, store="fp32",
                    features="pooled,attention:2", run=RunOptions(data=data, batch_size=16, **RUN)))
    return {"tmp": tmp, "data": data, "checkpoint": str(checkpoint), "cache": str(cache)}


def test_feature_spec_parses_the_option() -> None:
    assert FeatureSpec.parse("pooled,attention:7") == FeatureSpec(pooled=True, attention=7)
    assert FeatureSpec.parse("attention:3").names() == ["attention:3"]
    for bad in ("pooled,pooled", "attention:0", "attention", "logits", ""):
        with pytest.raises(ValueError):
            FeatureSpec.parse(bad)
    with pytest.raises(ConfigError, match="--features must be pooled, attention:S or both"):
        DumpConfig(teacher=TEACHER, out="x.h5", features="pooled,attention")


def test_attention_map_is_the_channel_mean_of_squares_pooled() -> None:
    fm = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    expected = (fm ** 2).mean(1).view(2, 2, 2, 2, 2).mean((2, 4))  # 2x2 blocks of the 4x4 energy
    torch.testing.assert_close(attention_map(fm, 2), expected, rtol=0, atol=0)


def test_cache_records_its_features(setup: dict) -> None:
    reader = CacheReader(setup["cache"])
    assert reader.info.features == ("pooled:64", "attention:2")
    assert reader.attrs["format_version"] == 1  # optional datasets: an older reader reads the logits as before
    with h5py.File(setup["cache"], "r") as h5:
        assert h5["features_pooled"].shape == (24, 2, 64) and h5["features_pooled"].dtype == np.float32
        assert h5["features_attention"].shape == (24, 2, 2, 2)
    summary = inspect_cache(setup["cache"])
    assert summary["features"] == ["pooled:64", "attention:2"]
    assert summary["feature_bytes"] == {"pooled:64": 24 * 2 * 64 * 4, "attention:2": 24 * 2 * 4 * 4}


def test_stored_features_equal_the_live_teacher_on_the_replayed_view(setup: dict) -> None:
    reader = CacheReader(setup["cache"])
    train = open_dataset(setup["data"], "train")
    prep = preprocess_of_cache(reader)
    teacher = build(TEACHER, 3, 32, checkpoint=setup["checkpoint"]).eval()
    rows = np.arange(len(train))
    for view in range(2):
        records = reader.read_records(rows, view)
        boxes, flips, logits, stored = (records[k] for k in ("crops", "flips", "teacher_logits", "features"))
        crops = torch.stack([apply_crop(train.load(int(r)), boxes[i], bool(flips[i]), prep) for i, r in enumerate(rows)])
        live_logits, live = teacher_outputs(teacher, crops, prep, torch.device("cpu"),
                                            spec=FeatureSpec(pooled=True, attention=2))
        np.testing.assert_allclose(logits, live_logits.numpy(), rtol=1e-5, atol=1e-6)
        for kind in ("pooled", "attention"):
            np.testing.assert_allclose(stored[kind], live[kind].numpy(), rtol=1e-5, atol=1e-6)
    result = verify_cache(setup["cache"], setup["data"], TEACHER, setup["checkpoint"], samples=16)
    assert result["ok"] and result["min_feature_cosine"]["pooled:64"] > 0.99999


def test_verify_catches_a_changed_feature(setup: dict, tmp_path: Path) -> None:
    copy = tmp_path / "changed.h5"
    copy.write_bytes(Path(setup["cache"]).read_bytes())
    with h5py.File(copy, "r+") as h5:
        h5["features_pooled"][:, :] = -h5["features_pooled"][:, :]  # rewritten chunks keep valid checksums
    result = verify_cache(str(copy), setup["data"], TEACHER, setup["checkpoint"], samples=8)
    assert not result["ok"] and result["min_feature_cosine"]["pooled:64"] == pytest.approx(-1.0)
    with pytest.raises(CacheError, match="stored pooled:64 features have cosine -1.000000 with the live"):
        require_ok(result)


def _losses(setup: dict, name: str, **mode) -> tuple[list[float], dict]:
    losses: list[float] = []
    run = RunOptions(data=setup["data"], batch_size=2, **RUN)
    metrics = fit(TrainConfig(model=STUDENT, out=str(setup["tmp"] / name), run=run, optim=OPTIM, epochs=2, **mode),
                  on_step=lambda s: losses.append(s.loss))
    return losses, metrics


@pytest.fixture(scope="module")
def logits_only(setup: dict) -> list[float]:
    return _losses(setup, "logits-only", cached=setup["cache"])[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mse", "cosine", "attention"])
def test_cached_feature_kd_equals_online_per_step(setup: dict, logits_only: list[float], kind: str) -> None:
    cached, metrics = _losses(setup, f"cached-{kind}", cached=setup["cache"], feature_loss=kind, feature_weight=2.0)
    online, _ = _losses(setup, f"online-{kind}", online_teacher=TEACHER, teacher_checkpoint=setup["checkpoint"],
                        feature_loss=kind, feature_weight=2.0, attention_size=2 if kind == "attention" else None)
    assert len(cached) == len(online) == 24
    assert np.abs(np.array(cached) - np.array(online)).max() <= 1e-6 * np.abs(np.array(online)).max()
    assert np.abs(np.array(cached) - np.array(logits_only)).max() > 1e-3  # the feature term is really there
    assert metrics["feature_loss"] == kind
    assert metrics["feature_sizes"] == ({"attention": 2} if kind == "attention" else {"pooled": 64})
    out = setup["tmp"] / f"cached-{kind}"
    assert read_state_dict(out / "model.pt").keys() == build(STUDENT, 3, 32).state_dict().keys()
    if kind == "attention":
        assert not (out / "projector.safetensors").exists()
    else:
        projector = load_projector(out / "projector.safetensors")
        assert (projector.in_features, projector.out_features) == (64, 64)
        assert metrics["projector"] == str(out / "projector.safetensors")


def test_feature_loss_values() -> None:
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    t = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert feature_loss("mse", s, t).item() == pytest.approx(2.0)  # (0 + 0 + 4 + 4) / 4
    assert feature_loss("cosine", s, t).item() == pytest.approx(0.5)  # cos 1 and 0
    maps_s, maps_t = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]]), torch.tensor([[[0.0, 0.0], [0.0, 1.0]]])
    assert feature_loss("attention", maps_s, maps_t).item() == pytest.approx(0.6 ** 2 + 0.2 ** 2)


def test_feature_loss_needs_the_features_in_the_cache(setup: dict, tmp_path: Path) -> None:
    plain = tmp_path / "plain.h5"
    dump(DumpConfig(teacher=TEACHER, checkpoint=setup["checkpoint"], out=str(plain), views=1,
                    run=RunOptions(data=setup["data"], batch_size=16, **RUN)))
    assert "features" not in CacheReader(plain).attrs  # a cache without features is written as before
    result = CliRunner().invoke(main, ["train-student", "--data", setup["data"], "--model", STUDENT, "--epochs", "1",
                                       "--cached", str(plain), "--feature-loss", "attention", "--img-size", "32",
                                       "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    line = result.output.strip()
    assert "\n" not in line and line.endswith("dump it again with dump-teacher --features attention:S")
    assert f"{plain} stores no attention features" in line


@pytest.mark.parametrize("mode,message", [
    ({}, "--feature-loss mse needs a teacher: add --cached CACHE or --online-teacher NAME"),
    ({"cached": ("a.h5", "b.h5")}, "--feature-loss takes one --cached file"),
    ({"online_teacher": TEACHER, "feature_loss": "attention"}, "--feature-loss attention with --online-teacher "
                                                               "needs --attention-size S"),
    ({"cached": "a.h5", "feature_weight": -1.0}, "--feature-weight must be a number >= 0, got -1"),
])
def test_feature_loss_options_are_checked(mode: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        TrainConfig(model=STUDENT, out="x", **{"feature_loss": "mse", **mode})


def test_attention_size_must_match_the_cache(setup: dict, tmp_path: Path) -> None:
    run = RunOptions(data=setup["data"], batch_size=4, **RUN)
    with pytest.raises(CacheError, match=r"stores 2x2 attention maps, not --attention-size 3; leave"):
        fit(TrainConfig(model=STUDENT, out=str(tmp_path / "run"), run=run, cached=setup["cache"],
                        feature_loss="attention", attention_size=3))


@pytest.mark.slow
def test_feature_kd_with_several_views_per_step(setup: dict) -> None:
    """Each of the M views of an image brings its own stored features, in the batch's image-major order.

    Epoch 0 replays views 0 and 1 of the 2-view cache, the views online KD samples in epoch 0 (epoch 1 then
    reuses them cached, while online samples views 2 and 3), so the first 12 steps must agree.
    """
    cached, _ = _losses(setup, "views2-cached", cached=setup["cache"], feature_loss="cosine", views_per_step=2)
    online, _ = _losses(setup, "views2-online", online_teacher=TEACHER, teacher_checkpoint=setup["checkpoint"],
                        feature_loss="cosine", views_per_step=2)
    assert len(cached) == 24
    first = slice(0, 12)
    assert np.abs(np.array(cached[first]) - np.array(online[first])).max() <= 1e-6 * np.abs(np.array(online)).max()
