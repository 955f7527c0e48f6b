"""The CLI round trip (click's CliRunner) on digits, ImageFolder and Stanford 40, and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from conftest import STUDENT, TEACHER
from kdcache.cli import main

FAST = ["--img-size", "32", "--batch-size", "16", "--device", "cpu", "--opt", "adamw", "--lr", "1e-3"]


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result


def ok(*args: str) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def fails(*args: str, match: str) -> Result:
    result = invoke(*args)
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), f"a traceback escaped: {result.exception!r}"
    assert "Traceback" not in result.output
    assert match in result.output, result.output
    return result


def pipeline(data: str, tmp: Path, workers: int, views: int = 2, epochs: int = 2) -> dict[str, dict]:
    """train-teacher, dump-teacher, then train-student in all three modes; returns each run's metrics."""
    ok("train-teacher", "--data", data, "--model", TEACHER, "--epochs", 1, "--out", tmp / "teacher",
       "--workers", workers, *FAST)
    ckpt = json.loads((tmp / "teacher" / "metrics.json").read_text())["checkpoint"]
    ok("dump-teacher", "--data", data, "--teacher", TEACHER, "--checkpoint", ckpt, "--views", views, "--seed", 0,
       "--img-size", 32, "--device", "cpu", "--workers", workers, "--out", tmp / "cache.h5")
    runs = {}
    common = ["--data", data, "--model", STUDENT, "--epochs", epochs, "--workers", workers, *FAST]
    ok("train-student", *common, "--out", tmp / "plain")
    ok("train-student", *common, "--cached", tmp / "cache.h5", "--out", tmp / "cached")
    ok("train-student", *common, "--online-teacher", TEACHER, "--teacher-checkpoint", ckpt, "--out", tmp / "online")
    for mode in ("plain", "cached", "online"):
        runs[mode] = json.loads((tmp / mode / "metrics.json").read_text())
        assert runs[mode]["mode"] == mode
        for key in ("top1", "mAP", "epochs", "images_per_second", "wall_seconds", "checkpoint"):
            assert key in runs[mode]
        assert Path(runs[mode]["checkpoint"]).is_file()
        assert json.loads((tmp / mode / "config.json").read_text())["model"] == STUDENT
    return runs


def test_pipeline_on_digits(tmp_path: Path) -> None:
    runs = pipeline("digits", tmp_path, workers=0)
    assert runs["cached"]["cache_views"] == 2
    assert 0 <= runs["plain"]["top1"] <= 100


def test_pipeline_on_image_folder_with_workers(tmp_path: Path, image_folder: Path) -> None:
    pipeline(str(image_folder), tmp_path, workers=2, views=1, epochs=3)  # 3 epochs over 1 view: views reused


def test_pipeline_on_stanford40(tmp_path: Path, stanford40: Path) -> None:
    runs = pipeline(str(stanford40), tmp_path, workers=0)
    assert runs["cached"]["dataset"].startswith("stanford40")


def test_python_cli_shim_matches_entry_point() -> None:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "cli.py"), "train-student", "--help"], capture_output=True,
                         text=True, check=True, cwd=root).stdout
    assert "--cached" in out and "--online-teacher" in out and "Loss:" in out


def test_every_command_has_help() -> None:
    for command in ("train-teacher", "dump-teacher", "train-student", "demo"):
        assert "Usage:" in ok(command, "--help").output


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("c") / "c.h5"
    ok("dump-teacher", "--teacher", TEACHER, "--views", 1, "--img-size", 32, "--device", "cpu", "--workers", 0,
       "--out", path)
    return path


def test_bad_inputs_are_one_line_errors(tmp_path: Path, digits_cache: Path, digits_teacher: str) -> None:
    student = ["train-student", "--model", STUDENT, "--epochs", 1, "--out", tmp_path / "s", *FAST]
    fails(*student, "--data", tmp_path / "no-such-dir", match="does not exist")
    fails(*student, "--cached", tmp_path / "missing.h5", match="missing.h5 does not exist")
    fails(*student, "--cached", digits_cache, "--online-teacher", TEACHER, match="choose one")
    fails(*student, "--online-teacher", STUDENT, "--teacher-checkpoint", digits_teacher,
          match=f"does not fit model '{STUDENT}'")
    fails("dump-teacher", "--teacher", STUDENT, "--checkpoint", digits_teacher, "--img-size", 32, "--device", "cpu",
          "--out", tmp_path / "x.h5", match="does not fit model")
    fails(*student, "--model", "no_such_model_xyz", match="unknown timm model")
    fails("dump-teacher", "--teacher", TEACHER, "--out", digits_cache, "--img-size", 32, match="--force")
    fails("dump-teacher", "--teacher", TEACHER, "--store", "fp8", "--out", tmp_path / "y.h5", match="--store")
    fails("train-student", "--model", STUDENT, "--epochs", 1, "--out", tmp_path / "s", "--cached", digits_cache,
          "--img-size", 64, "--device", "cpu", match="dumped at 32 px")
    fails("train-teacher", "--model", TEACHER, "--out", tmp_path / "t", "--checkpoint", tmp_path / "none.pt",
          match="none.pt does not exist")


def test_cache_from_another_dataset_is_refused(tmp_path: Path, digits_cache: Path, image_folder: Path) -> None:
    fails("train-student", "--data", image_folder, "--model", STUDENT, "--epochs", 1, "--out", tmp_path / "s",
          "--cached", digits_cache, *FAST, match="another dataset")


def test_unreadable_image_in_a_worker_is_one_line(tmp_path: Path, image_folder: Path) -> None:
    (image_folder / "train" / "class1" / "002.jpg").write_bytes(b"garbage")
    result = fails("train-teacher", "--data", image_folder, "--model", TEACHER, "--epochs", 1, "--out", tmp_path / "t",
                   "--workers", 2, *FAST, match="cannot decode image")
    assert "class1/002.jpg" in result.output


def test_inspect_and_verify_good_and_tampered(tmp_path: Path, digits_teacher: str) -> None:
    import h5py
    import shutil

    cache = tmp_path / "c.h5"
    ok("dump-teacher", "--teacher", TEACHER, "--checkpoint", digits_teacher, "--views", 2, "--img-size", 32,
       "--device", "cpu", "--workers", 0, "--store", "fp16", "--out", cache)
    summary = json.loads(ok("inspect", cache, "--json").output)
    assert (summary["num_samples"], summary["num_views"], summary["num_classes"]) == (1348, 2, 10)
    assert summary["store"] == "fp16" and summary["bytes_per_record"] == 10 * 2 + 17
    assert len(summary["per_view"]) == 2 and 0 <= summary["teacher_top1_mean"] <= 100
    assert "per view" in ok("inspect", cache).output

    verify = ["verify", "--teacher", TEACHER, "--checkpoint", digits_teacher, "--samples", 64, "--device", "cpu"]
    assert "ok: the cache matches" in ok(*verify, cache).output

    logits_edit = tmp_path / "logits.h5"
    shutil.copy(cache, logits_edit)
    with h5py.File(logits_edit, "r+") as h5:
        h5["logits"][:, 1] = h5["logits"][:, 1] + 0.5
    fails(*verify, logits_edit, match="verify failed: logits differ")

    crop_edit = tmp_path / "crops.h5"
    shutil.copy(cache, crop_edit)
    with h5py.File(crop_edit, "r+") as h5:
        h5["crops"][:, 0, 0] = 0.0
    fails(*verify, crop_edit, match="stored crops differ from their seeds")


def test_fine_tune_from_local_checkpoint_with_another_head(tmp_path: Path) -> None:
    """--checkpoint with 1000-class weights (as an ImageNet checkpoint would be), as .pt and .safetensors."""
    import torch
    from safetensors.torch import save_file

    from kdcache.models import create_model, save_checkpoint

    torch.manual_seed(0)
    imagenet_like = create_model(TEACHER, num_classes=1000, img_size=32)
    pt, st = tmp_path / "in1k.pt", tmp_path / "in1k.safetensors"
    save_checkpoint(imagenet_like, pt, {"arch": TEACHER})
    save_file({k: v.contiguous() for k, v in imagenet_like.state_dict().items()}, str(st))
    for ckpt in (pt, st):
        out = tmp_path / ckpt.suffix[1:]
        ok("train-teacher", "--model", TEACHER, "--checkpoint", ckpt, "--epochs", 1, "--out", out, "--workers", 0, *FAST)
        tuned = torch.load(out / "model.pt", weights_only=True)["model"]
        stem = next(k for k in tuned if k.startswith("stem") and k.endswith("weight"))
        assert not torch.equal(tuned[stem], imagenet_like.state_dict()[stem])  # it trained from there
        assert tuned["head.fc.weight"].shape[0] == 10


def test_pretrained_without_network_is_a_clear_error(tmp_path: Path) -> None:
    import os

    # A fresh process, so huggingface_hub reads HF_HUB_OFFLINE at import and fails at once.
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "kdcache", "train-teacher", "--model", TEACHER, "--pretrained",
                             "--epochs", "1", "--out", str(tmp_path / "t"), *FAST], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "could not load timm's pretrained weights" in result.stderr


def test_unsafe_pickle_checkpoint_is_refused(tmp_path: Path) -> None:
    import torch

    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": object()}, evil)  # not loadable with weights_only
    fails("train-teacher", "--model", TEACHER, "--checkpoint", evil, "--epochs", 1, "--out", tmp_path / "t", *FAST,
          match="cannot read checkpoint")


def test_nan_from_the_teacher_names_the_sample(tmp_path: Path) -> None:
    import torch

    from kdcache.models import create_model, save_checkpoint

    model = create_model(TEACHER, num_classes=10, img_size=32)
    with torch.no_grad():
        model.get_classifier().bias[3] = float("nan")
    ckpt = tmp_path / "nan.pt"
    save_checkpoint(model, ckpt, {})
    fails("dump-teacher", "--teacher", TEACHER, "--checkpoint", ckpt, "--views", 1, "--img-size", 32, "--device",
          "cpu", "--workers", 0, "--out", tmp_path / "nan.h5", match="NaN or Inf for digits image 0 view 0")
