"""The CLI round trip (click's CliRunner) on digits, ImageFolder and Stanford 40, and bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from conftest import STUDENT, TEACHER, recomputed
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


def pipeline(data: str, tmp: Path, workers: int, views: int = 2, epochs: int = 2,
             teacher_epochs: int = 1) -> dict[str, dict]:
    """train-teacher, dump-teacher, then train-student in all three modes; returns each run's metrics."""
    result = ok("train-teacher", "--data", data, "--model", TEACHER, "--epochs", teacher_epochs,
                "--out", tmp / "teacher", "--workers", workers, *FAST)
    runs = {"teacher": printed_metrics(result, tmp / "teacher")}
    ckpt = runs["teacher"]["checkpoint"]
    ok("dump-teacher", "--data", data, "--teacher", TEACHER, "--checkpoint", ckpt, "--views", views, "--seed", 0,
       "--img-size", 32, "--device", "cpu", "--workers", workers, "--out", tmp / "cache.h5")
    common = ["--data", data, "--model", STUDENT, "--epochs", epochs, "--workers", workers, *FAST]
    modes = {"plain": [], "cached": ["--cached", tmp / "cache.h5"],
             "online": ["--online-teacher", TEACHER, "--teacher-checkpoint", ckpt]}
    for mode, args in modes.items():
        runs[mode] = printed_metrics(ok("train-student", *common, *args, "--out", tmp / mode), tmp / mode)
        assert runs[mode]["mode"] == mode and runs[mode]["epochs"] == epochs
        assert json.loads((tmp / mode / "config.json").read_text())["model"] == STUDENT
        assert sorted(p.name for p in (tmp / mode).iterdir()) == ["config.json", "history.json", "metrics.json",
                                                                  "model.pt"]
    return runs


def printed_metrics(result: Result, out: Path) -> dict:
    """OUT/metrics.json, after checking that the printed table shows its values."""
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("top1", "mAP", "epochs", "views_per_step"):
        value = metrics[key]
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        assert shown in result.output, f"{key} {shown} not printed"
    assert Path(metrics["checkpoint"]) == out / "model.pt" and (out / "model.pt").is_file()
    return metrics


@pytest.mark.slow
def test_pipeline_on_digits(tmp_path: Path) -> None:
    from kdcache.cache import CacheReader
    from kdcache.targets import preprocess_of_cache

    runs = pipeline("digits", tmp_path, workers=0)
    assert runs["cached"]["cache_views"] == 2
    # One epoch of the tiny teacher on digits (61 % when written): well above the 10 % of chance.
    assert runs["teacher"]["top1"] > 40, runs["teacher"]["top1"]
    # The saved student is the evaluated one.
    again = recomputed(runs["cached"], "digits", preprocess_of_cache(CacheReader(tmp_path / "cache.h5")))
    assert again["top1"] == runs["cached"]["top1"] and again["mAP"] == pytest.approx(runs["cached"]["mAP"])
    # Cached and online KD train on the same crops with the same targets (up to fp16): the same student.
    assert abs(runs["cached"]["top1"] - runs["online"]["top1"]) <= 1.0
    assert runs["cached"]["top1"] != runs["plain"]["top1"] or runs["cached"]["mAP"] != runs["plain"]["mAP"]


@pytest.mark.slow
def test_pipeline_on_image_folder_with_workers(tmp_path: Path, image_folder: Path) -> None:
    runs = pipeline(str(image_folder), tmp_path, workers=2, views=1, epochs=3)  # 3 epochs over 1 view: views reused
    assert [h["view"] for h in json.loads((tmp_path / "cached" / "history.json").read_text())] == [0, 0, 0]
    assert [h["view"] for h in json.loads((tmp_path / "online" / "history.json").read_text())] == [0, 1, 2]
    assert runs["cached"]["train_images"] == 3 * 16  # 24 images, one full batch of 16 per epoch


@pytest.mark.slow
def test_pipeline_on_stanford40(tmp_path: Path, stanford40: Path) -> None:
    runs = pipeline(str(stanford40), tmp_path, workers=0)
    assert runs["cached"]["dataset"].startswith("stanford40")
    assert runs["cached"]["train_images"] == 2 * 16 and runs["cached"]["cache_views"] == 2


@pytest.mark.slow
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


@pytest.mark.slow
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
    fails("dump-teacher", "--teacher", TEACHER, "--views", 1, "--out", digits_cache, "--img-size", 32, match="--force")
    fails("dump-teacher", "--teacher", TEACHER, "--store", "fp8", "--out", tmp_path / "y.h5", match="--store")
    fails("train-teacher", "--model", TEACHER, "--out", tmp_path / "t", "--checkpoint", tmp_path / "none.pt",
          match="none.pt does not exist")


def test_under_torchrun_the_error_line_is_torchruns_root_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gap 7: torchrun prints its own traceback for any failed rank; its summary's root cause carries our line."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    fails("dump-teacher", "--teacher", TEACHER, "--views", 0, "--out", tmp_path / "x.h5", match="--views")
    assert json.loads(error_file.read_text())["message"]["message"] == "--views must be at least 1, got 0"


@pytest.mark.parametrize("models", [["--model", TEACHER], ["--model", STUDENT, "--online-teacher", TEACHER]])
def test_an_input_size_the_model_cannot_take_is_refused_before_any_output(tmp_path: Path, models: list[str]) -> None:
    """test_convnext's stem and downsampling leave a 1x1 map at 16 px, smaller than the next kernel."""
    out = tmp_path / "s"
    fails("train-student", *models, "--img-size", 16, "--epochs", 1, "--out", out, "--device", "cpu",
          "--workers", 0, match=f"model {TEACHER} cannot take --img-size 16 inputs: Calculated padded input size")
    assert not out.exists()


def test_a_one_class_dataset_is_noted(tmp_path: Path) -> None:
    from conftest import make_image_folder
    from kdcache.config import RunOptions, TrainConfig
    from kdcache.report import Progress
    from kdcache.train import prepare

    class Notes(Progress):
        def __init__(self) -> None:
            self.notes: list[str] = []

        def note(self, message: str) -> None:
            self.notes.append(message)

    data = make_image_folder(tmp_path / "one", classes=1)
    progress = Notes()
    run = RunOptions(data=str(data), img_size=32, workers=0, device="cpu")
    prepare(TrainConfig(model=STUDENT, out=str(tmp_path / "s"), run=run, epochs=1), progress).close()
    assert any("has one class (class0): every prediction is that class, so top-1 is 100 %" in n
               for n in progress.notes), progress.notes


def test_unknown_optimizer_and_scheduler_are_one_line(tmp_path: Path) -> None:
    student = ["train-student", "--model", STUDENT, "--epochs", 1, "--out", tmp_path / "s", "--img-size", 32,
               "--device", "cpu", "--workers", 0]
    fails(*student, "--opt", "nosuchopt", match="--opt nosuchopt: Optimizer nosuchopt not found")
    fails(*student, "--sched", "nosuchsched", match="--sched nosuchsched: Unknown scheduler")


@pytest.mark.slow
def test_cache_from_another_dataset_is_refused(tmp_path: Path, digits_cache: Path, image_folder: Path) -> None:
    fails("train-student", "--data", image_folder, "--model", STUDENT, "--epochs", 1, "--out", tmp_path / "s",
          "--cached", digits_cache, *FAST, match="another dataset")


def test_unreadable_image_in_a_worker_is_one_line(tmp_path: Path, image_folder: Path) -> None:
    (image_folder / "train" / "class1" / "002.jpg").write_bytes(b"garbage")
    result = fails("train-teacher", "--data", image_folder, "--model", TEACHER, "--epochs", 1, "--out", tmp_path / "t",
                   "--workers", 2, *FAST, match="cannot decode image")
    assert "class1/002.jpg" in result.output


@pytest.mark.slow
def test_inspect_and_verify_good_and_tampered(tmp_path: Path, digits_teacher: str) -> None:
    import h5py
    import shutil

    cache = tmp_path / "c.h5"
    ok("dump-teacher", "--teacher", TEACHER, "--checkpoint", digits_teacher, "--views", 2, "--img-size", 32,
       "--device", "cpu", "--workers", 0, "--store", "fp16", "--out", cache)
    summary = json.loads(ok("inspect", cache, "--json").output)
    assert (summary["num_samples"], summary["num_views"], summary["num_classes"]) == (1348, 2, 10)
    assert summary["store"] == "fp16" and summary["bytes_per_record"] == 10 * 2 + 17
    from kdcache.cache import CacheReader

    reader = CacheReader(cache)
    per_view = [100 * float(np.mean(reader.read(np.arange(1348), v)[2].argmax(1) == reader.labels)) for v in (0, 1)]
    assert [v["top1"] for v in summary["per_view"]] == pytest.approx(per_view)
    assert summary["teacher_top1_mean"] == pytest.approx(np.mean(per_view))
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


@pytest.mark.slow
def test_fine_tune_from_local_checkpoint_with_another_head(tmp_path: Path, image_folder: Path) -> None:
    """--checkpoint with 1000-class weights (as an ImageNet checkpoint would be), as .pt and .safetensors."""
    from safetensors.torch import save_file

    from kdcache.models import create_model, save_checkpoint

    torch.manual_seed(0)
    imagenet_like = create_model(TEACHER, num_classes=1000, img_size=32)
    pt, st = tmp_path / "in1k.pt", tmp_path / "in1k.safetensors"
    save_checkpoint(imagenet_like, pt, {"arch": TEACHER})
    save_file({k: v.contiguous() for k, v in imagenet_like.state_dict().items()}, str(st))
    for ckpt in (pt, st):
        out = tmp_path / ckpt.suffix[1:]
        ok("train-teacher", "--data", image_folder, "--model", TEACHER, "--checkpoint", ckpt, "--epochs", 1,
           "--out", out, "--workers", 0, *FAST)
        tuned = torch.load(out / "model.pt", weights_only=True)["model"]
        stem = next(k for k in tuned if k.startswith("stem") and k.endswith("weight"))
        assert not torch.equal(tuned[stem], imagenet_like.state_dict()[stem])  # it trained from there
        assert tuned["head.fc.weight"].shape[0] == 3  # the image folder's classes
        for k in tuned:  # every tensor but the head's started from the checkpoint: same shapes
            if not k.startswith("head.fc"):
                assert tuned[k].shape == imagenet_like.state_dict()[k].shape, k


@pytest.mark.slow
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

    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": object()}, evil)  # not loadable with weights_only
    fails("train-teacher", "--model", TEACHER, "--checkpoint", evil, "--epochs", 1, "--out", tmp_path / "t", *FAST,
          match="cannot read checkpoint")


def test_nan_from_the_teacher_names_the_sample(tmp_path: Path) -> None:

    from kdcache.models import create_model, save_checkpoint

    model = create_model(TEACHER, num_classes=10, img_size=32)
    with torch.no_grad():
        model.get_classifier().bias[3] = float("nan")
    ckpt = tmp_path / "nan.pt"
    save_checkpoint(model, ckpt, {})
    fails("dump-teacher", "--teacher", TEACHER, "--checkpoint", ckpt, "--views", 1, "--img-size", 32, "--device",
          "cpu", "--workers", 0, "--out", tmp_path / "nan.h5", match="NaN or Inf for digits image 0 view 0")
