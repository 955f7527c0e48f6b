"""Several teachers (an ensemble of caches on the same crops) and a student at another size than its teacher's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from conftest import STUDENT, TEACHER, make_image_folder
from kdcache.augment import Preprocess, apply_crop
from kdcache.cache import CacheReader
from kdcache.cli import main
from kdcache.config import RunOptions, TrainConfig
from kdcache.errors import CacheError, ConfigError
from kdcache.losses import ensemble_logits, kd_loss
from kdcache.report import Progress
from kdcache.targets import check_caches_agree


def test_the_ensemble_target_is_the_mean_of_the_teachers_probabilities() -> None:
    """softmax(e / T) = sum_i w_i softmax(t_i / T), and the KD term of kd_loss is the KL from exactly that p_T."""
    gen = torch.Generator().manual_seed(0)
    a, b, s = (torch.randn(6, 5, generator=gen) * 3 for _ in range(3))
    w, t = (0.7, 0.3), 4.0
    e = ensemble_logits([a, b], w, t)
    p = w[0] * F.softmax(a / t, dim=-1) + w[1] * F.softmax(b / t, dim=-1)
    torch.testing.assert_close(F.softmax(e / t, dim=-1), p, rtol=0, atol=1e-6)
    by_hand = t * t * (p * (p.log() - F.log_softmax(s / t, dim=-1))).sum(-1).mean()
    torch.testing.assert_close(kd_loss(s, e, torch.zeros(6, dtype=torch.long), 0.0, t)["kd"], by_hand)
    # Averaging logits instead would give another target; the test can tell the two apart.
    assert (F.softmax((0.7 * a + 0.3 * b) / t, dim=-1) - p).abs().max() > 1e-3
    # Confident teachers: the log of the mixed probabilities underflows, log-sum-exp does not.
    sharp = [torch.tensor([[0.0, 1e4, -1e4]]), torch.tensor([[1e4, 0.0, -1e4]])]
    assert torch.isinf((0.5 * F.softmax(sharp[0], -1) + 0.5 * F.softmax(sharp[1], -1)).log()).any()
    mixed = ensemble_logits(sharp, (0.5, 0.5), 1.0)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(F.softmax(mixed, -1), torch.tensor([[0.5, 0.5, 0.0]]))


def test_the_config_normalises_caches_and_weights() -> None:
    one = TrainConfig(model="m", out="o", cached="a.h5")
    assert one.cached == ("a.h5",) and one.teacher_weights == (1.0,)
    two = TrainConfig(model="m", out="o", cached=["a.h5", "b.h5"], teacher_weights=[3, 1])
    assert two.cached == ("a.h5", "b.h5") and two.teacher_weights == (0.75, 0.25)
    assert TrainConfig(model="m", out="o", cached=("a.h5", "b.h5")).teacher_weights == (0.5, 0.5)
    assert TrainConfig(model="m", out="o").cached == ()
    for kwargs, message in [
        ({"cached": ("a.h5", "b.h5"), "teacher_weights": (1.0,)}, "has 1 value for 2 --cached files"),
        ({"cached": ("a.h5", "b.h5"), "teacher_weights": (1.0, 0.0)}, "must be positive numbers, got 0"),
        ({"cached": ("a.h5", "b.h5"), "teacher_weights": (1.0, float("nan"))}, "must be positive numbers, got nan"),
        ({"teacher_weights": (1.0,)}, "--teacher-weights goes with --cached"),
        ({"cached": ("a.h5", "./a.h5")}, "--cached names ./a.h5 twice"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            TrainConfig(model="m", out="o", **kwargs)


def _run(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def _dump(data: Path, out: Path, teacher: str, views: int, *extra: object) -> CacheReader:
    _run("dump-teacher", "--data", data, "--teacher", teacher, "--views", views, "--img-size", 32,
         "--batch-size", 64, "--device", "cpu", "--workers", 0, "--out", out, *extra)
    return CacheReader(out)


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two teachers of other architectures on one image folder (3 classes x 8 images): 2 and 3 views."""
    root = tmp_path_factory.mktemp("teachers")
    data = make_image_folder(root / "data")
    return {"data": data, "root": root, "a": _dump(data, root / "a.h5", TEACHER, 2),
            "b": _dump(data, root / "b.h5", STUDENT, 3)}


class Notes(Progress):
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, message: str) -> None:
        self.notes.append(message)


def _config(data: Path, out: Path, cached, img_size: int | None = 32, **kwargs) -> TrainConfig:
    run = RunOptions(data=str(data), img_size=img_size, batch_size=8, workers=0, device="cpu")
    return TrainConfig(model=STUDENT, out=str(out), run=run, epochs=1, cached=cached, **kwargs)


@pytest.mark.slow
def test_two_caches_train_one_student(caches: dict, tmp_path: Path) -> None:
    from kdcache.train import prepare

    a, b, data = caches["a"], caches["b"], caches["data"]
    # The batch: a's crops, and the weighted ensemble of both teachers' logits on them; views repeat after min K.
    notes = Notes()
    r = prepare(_config(data, tmp_path / "p", (str(a.path), str(b.path)), teacher_weights=(0.7, 0.3),
                        temperature=2.0), notes)
    assert any("views 0..1 of each" in n for n in notes.notes), notes.notes
    rows = [5, 0, 17]
    for epoch, view in ((1, 1), (2, 0)):
        batch = r.dataset.batch(rows, epoch)
        assert batch["views"] == [view]
        boxes, flips, logits_a = a.read(np.array(rows), view)
        logits_b = b.read(np.array(rows), view)[2]
        want = ensemble_logits([torch.from_numpy(logits_a), torch.from_numpy(logits_b)], (0.7, 0.3), 2.0)
        assert torch.equal(batch["teacher_logits"], want)
        crops = [apply_crop(r.train.load(row), box, bool(flip), r.prep) for row, box, flip in zip(rows, boxes, flips)]
        assert torch.equal(batch["images"], torch.stack(crops))
    # One cache replays its logits exactly as stored, as before.
    single = prepare(_config(data, tmp_path / "q", str(a.path)))
    assert torch.equal(single.dataset.batch(rows, 1)["teacher_logits"], torch.from_numpy(a.read(np.array(rows), 1)[2]))

    # The command line records every cache and the normalised weights.
    out = tmp_path / "ens"
    _run("train-student", "--data", data, "--model", STUDENT, "--epochs", 1, "--img-size", 32,
         "--batch-size", 8, "--device", "cpu", "--workers", 0, "--cached", a.path, "--cached", b.path,
         "--teacher-weights", "3,1", "--out", out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "cached" and metrics["caches"] == [str(a.path), str(b.path)]
    assert metrics["teachers"] == [TEACHER, STUDENT] and metrics["teacher_weights"] == [0.75, 0.25]
    assert metrics["cache_views"] == 2 and np.isfinite(metrics["top1"])
    config = json.loads((out / "config.json").read_text())
    assert config["cached"] == [str(a.path), str(b.path)] and config["teacher_weights"] == [0.75, 0.25]


def _edited_copy(reader: CacheReader, out: Path, edit) -> CacheReader:
    shutil.copyfile(reader.path, out)
    with h5py.File(out, "r+") as h5:
        edit(h5)
    return CacheReader(out)


@pytest.mark.slow
def test_caches_of_other_crops_are_refused_naming_both_files(caches: dict, tmp_path: Path) -> None:
    a, data = caches["a"], caches["data"]

    def refused(other: CacheReader) -> str:
        with pytest.raises(CacheError) as caught:
            check_caches_agree([a, other])
        message = str(caught.value)
        assert "\n" not in message and str(a.path) in message and str(other.path) in message
        return message

    seed = _dump(data, tmp_path / "seed1.h5", TEACHER, 1, "--seed", 1)
    assert "their seed differs (0 vs 1)" in refused(seed)
    scale = _dump(data, tmp_path / "scale.h5", TEACHER, 1, "--crop-scale", 0.5, 1.0)
    assert "their crop_scale differs (0.08, 1 vs 0.5, 1)" in refused(scale)

    def shrink_box(h5: h5py.File) -> None:  # a valid box, 1e-3 of the height smaller than the derived one
        crops = h5["crops"][...]
        crops[3, 1, 2] -= 1e-3
        h5["crops"][...] = crops

    assert "their stored crops differ, first at row 3 (sample id" in refused(_edited_copy(a, tmp_path / "box.h5",
                                                                                      shrink_box))

    def flip(h5: h5py.File) -> None:
        flips = h5["flips"][...]
        flips[7, 0] ^= 1
        h5["flips"][...] = flips

    assert ") view 0;" in refused(_edited_copy(a, tmp_path / "flip.h5", flip))
    # The same crops with a view more than a stores: only the shared views are compared.
    check_caches_agree([a, caches["b"]])

    # The command line says it in one line.
    result = CliRunner().invoke(main, ["train-student", "--data", str(data), "--model", STUDENT, "--epochs", "1",
                                       "--device", "cpu", "--workers", "0", "--cached", str(a.path), "--cached",
                                       str(seed.path), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1 and "their seed differs (0 vs 1)" in result.output and "Traceback" not in result.output


@pytest.mark.slow
def test_a_student_trains_at_another_size_than_the_teacher(caches: dict, tmp_path: Path) -> None:
    from kdcache.train import prepare

    a, data = caches["a"], caches["data"]
    # The pixels at 48 px are the stored box resized to 48 px, normalised as the teacher's were.
    notes = Notes()
    r = prepare(_config(data, tmp_path / "p", str(a.path), img_size=48), notes)
    assert f"{a.path} was dumped at 32 px; the student trains at 48 px on the same crop boxes, resized to 48 px" \
        in notes.notes
    info = a.info
    prep = Preprocess(size=48, mean=tuple(info.mean), std=tuple(info.std), interpolation=info.interpolation,
                      crop_pct=info.crop_pct)
    assert r.prep == prep
    rows = [2, 11]
    boxes, flips, logits = a.read(np.array(rows), 1)
    batch = r.dataset.batch(rows, 1)
    assert batch["images"].shape == (2, 3, 48, 48)
    assert torch.equal(batch["images"], torch.stack([apply_crop(r.train.load(row), box, bool(flip), prep)
                                                     for row, box, flip in zip(rows, boxes, flips)]))
    assert torch.equal(batch["teacher_logits"], torch.from_numpy(logits))
    # Without --img-size a cached student takes the cache's size, without a note.
    quiet = Notes()
    assert prepare(_config(data, tmp_path / "q", str(a.path), img_size=None), quiet).img_size == 32
    assert not any("dumped at" in n for n in quiet.notes)

    out = tmp_path / "s48"
    log = _run("train-student", "--data", data, "--model", STUDENT, "--epochs", 1, "--img-size", 48,
               "--batch-size", 8, "--device", "cpu", "--workers", 0, "--cached", a.path, "--out", out)
    assert "was dumped at 32 px; the student trains at 48 px" in " ".join(log.split())
    for name in ("metrics.json", "config.json"):
        saved = json.loads((out / name).read_text())
        assert (saved["img_size"], saved["teacher_img_sizes"]) == (48, [32]), name
    # Another dataset is still refused, with the same message as before.
    other = make_image_folder(tmp_path / "four", classes=4, train=6)
    result = CliRunner().invoke(main, ["train-student", "--data", str(other), "--model", STUDENT, "--epochs", "1",
                                       "--img-size", "48", "--device", "cpu", "--workers", "0", "--cached",
                                       str(a.path), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "(it has 3 classes, the dataset has 4)" in result.output
