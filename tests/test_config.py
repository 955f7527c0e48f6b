"""Options are validated once, in the config dataclasses, with one line that names the CLI option."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from click.testing import CliRunner

from kdcache.cli import main
from kdcache.config import MAX_SEED, CropRanges, DumpConfig, OptimOptions, RunOptions, TrainConfig
from kdcache.errors import ConfigError, KdcacheError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("make,message", [
    (lambda: RunOptions(batch_size=0), "--batch-size must be at least 1, got 0"),
    (lambda: RunOptions(workers=-1), "--workers must be at least 0, got -1"),
    (lambda: RunOptions(seed=-1), "--seed must be in [0, 2**64 - 1], got -1"),
    (lambda: RunOptions(seed=2**64), f"--seed must be in [0, 2**64 - 1], got {2**64}"),
    (lambda: RunOptions(img_size=4), "--img-size must be in [8, 2048], got 4"),
    (lambda: RunOptions(data=""), "--data must name a dataset"),
    (lambda: OptimOptions(lr=0), "--lr must be above 0, got 0"),
    (lambda: OptimOptions(momentum=1.5), "--momentum must be in [0, 1], got 1.5"),
    (lambda: OptimOptions(weight_decay=-1e-4), "--weight-decay must be at least 0, got -0.0001"),
    (lambda: OptimOptions(decay_epochs=0), "--decay-epochs must be at least 1, got 0"),
    (lambda: OptimOptions(decay_rate=2), "--decay-rate must be in [0, 1], got 2"),
    (lambda: OptimOptions(warmup_epochs=-1), "--warmup-epochs must be at least 0, got -1"),
    (lambda: CropRanges(scale=(0.5, 0.2)), "--crop-scale must satisfy 0 < min <= max <= 1, got 0.5 0.2"),
    (lambda: CropRanges(ratio=(0.0, 1.0)), "--crop-ratio must satisfy 0 < min <= max, got 0 1"),
    (lambda: CropRanges(hflip=1.1), "--hflip must be in [0, 1], got 1.1"),
    (lambda: TrainConfig(model="m", out="o", alpha=2), "--alpha must be in [0, 1], got 2"),
    (lambda: TrainConfig(model="m", out="o", temperature=0), "--temperature must be above 0, got 0"),
    (lambda: TrainConfig(model="m", out="o", epochs=0), "--epochs must be at least 1, got 0"),
    (lambda: TrainConfig(model="m", out="o", views_per_step=0), "--views-per-step must be at least 1, got 0"),
    (lambda: TrainConfig(model="m", out="o", cached="c.h5", online_teacher="t"), "choose one"),
    (lambda: TrainConfig(model="m", out="o", teacher_checkpoint="t.pt"),
     "--teacher-checkpoint and --teacher-pretrained go with --online-teacher"),
    (lambda: TrainConfig(model="m", out="o", preload=True), "--preload and --no-preload go with --cached"),
    (lambda: TrainConfig(model="", out="o"), "--model must name a timm model"),
    (lambda: DumpConfig(teacher="t", out="c.h5", views=0), "--views must be at least 1, got 0"),
    (lambda: DumpConfig(teacher="t", out="c.h5", store="fp8"), "--store must be fp16, fp32 or topk:K"),
    (lambda: DumpConfig(teacher="t", out="c.h5", store="topk:0"), "--store must be fp16, fp32 or topk:K"),
])
def test_bad_values_are_refused_by_the_config(make, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        make()
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert isinstance(caught.value, KdcacheError) and isinstance(caught.value, ValueError)


def test_limits_are_accepted() -> None:
    RunOptions(seed=MAX_SEED, img_size=8, batch_size=1, workers=0)
    RunOptions(img_size=2048)
    TrainConfig(model="m", out="o", alpha=0.0, views_per_step=1, epochs=1, cached="c.h5", preload=False)
    TrainConfig(model="m", out="o", alpha=1.0, online_teacher="t", teacher_checkpoint="t.pt")
    DumpConfig(teacher="t", out="c.h5", store="topk:1", views=1)
    OptimOptions(momentum=0.0, weight_decay=0.0, decay_rate=1.0)


@pytest.mark.parametrize("args,message", [
    (["--seed", str(2**64)], f"--seed must be in [0, 2**64 - 1], got {2**64}"),
    (["--seed", "-3"], "--seed must be in [0, 2**64 - 1], got -3"),
    (["--alpha", "2"], "--alpha must be in [0, 1], got 2"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--crop-scale", "0.9", "0.1"], "--crop-scale must satisfy 0 < min <= max <= 1, got 0.9 0.1"),
    (["--teacher-checkpoint", "t.pt"], "--teacher-checkpoint and --teacher-pretrained go with --online-teacher"),
])
def test_the_cli_prints_the_configs_message_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(main, ["train-student", "--model", "test_vit", "--out", str(tmp_path / "s"), *args])
    assert result.exit_code == 2, result.output  # a usage error, like click's own
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert f"Error: {message}" in result.output
    assert not (tmp_path / "s").exists(), "nothing is written for a refused option"


def test_dump_options_are_checked_before_any_file(tmp_path: Path) -> None:
    out = tmp_path / "c.h5"
    for args, message in ((["--views", "0"], "--views must be at least 1"), (["--seed", str(2**70)], "--seed must"),
                          (["--store", "topk:x"], "--store must be fp16, fp32 or topk:K")):
        result = CliRunner().invoke(main, ["dump-teacher", "--teacher", "test_convnext", "--out", str(out), *args])
        assert result.exit_code == 2 and message in result.output, result.output
    assert list(tmp_path.iterdir()) == []


def test_the_click_layer_holds_no_ranges_of_its_own() -> None:
    """The config is the one source of truth; only `verify` (which has no config object) keeps click ranges."""
    trees = [ast.parse((ROOT / "kdcache" / name).read_text()) for name in ("cli.py", "cli_options.py")]
    for node in (n for tree in trees for n in ast.walk(tree)):
        if isinstance(node, ast.FunctionDef) and node.name != "verify":
            text = ast.unparse(node)
            assert "IntRange" not in text and "FloatRange" not in text, node.name


def test_only_the_cli_and_demo_import_the_training_loop() -> None:
    """Dependencies point one way: the dump, the audit and the targets use devices.py and targets.py."""
    importers = []
    for path in sorted((ROOT / "kdcache").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = {node.module} | {f"{node.module}.{a.name}" for a in node.names} if node.module else \
                    {a.name for a in node.names}
                if any(n in ("train", "kdcache.train") or n.endswith(".train") for n in names if n):
                    importers.append(path.relative_to(ROOT / "kdcache").as_posix())
    assert sorted(set(importers)) == ["__init__.py", "cli.py", "demo.py"]
