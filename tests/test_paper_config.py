"""benchmarks/study_stanford40.json is the paper's configuration: Table I's models (by their
parameter counts with a 40-class head), its schedules and its loss weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import timm
import torch

from kdcache.config import OptimOptions
from kdcache.models import create_model

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from study import optims  # noqa: E402 - benchmarks/ is not a package

CONFIG = json.loads((ROOT / "benchmarks" / "study_stanford40.json").read_text())

# The paper's Table I (M parameters): the ConvNeXt-S teacher, then the students in the config's order
# (Swin-v2, Twins, MViT-v2, ConViT, PVT-v2). Its counts are truncated to two decimals.
TABLE_I_PARAMS_M = [49.48, 27.59, 23.56, 23.43, 27.36, 22.06]
SGD = {"opt": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-5, "sched": "step", "warmup_epochs": 0}


def test_models_have_the_parameter_counts_of_table_i() -> None:
    names = [CONFIG["teacher"], *CONFIG["students"]]
    assert len(names) == len(TABLE_I_PARAMS_M)
    measured = {}
    for name in names:
        # On the meta device the tensors have shapes but no memory and no initialisation: a second, not six.
        with torch.device("meta"):
            model = create_model(name, 40, CONFIG["img_size"])
        measured[name] = sum(p.numel() for p in model.parameters()) / 1e6
    off = {name: (round(measured[name], 4), paper) for name, paper in zip(names, TABLE_I_PARAMS_M)
           if abs(measured[name] - paper) > 0.02}
    assert not off, f"model: (params M, Table I) {off}"


def test_every_model_has_imagenet_weights_in_timm() -> None:
    """The config fine-tunes from timm's weights (`pretrained`), so each name must have some:
    swinv2_cr_tiny_224 fits Table I's 27.59 M as well, but has none."""
    assert CONFIG["pretrained"] is True
    for name in [CONFIG["teacher"], *CONFIG["students"]]:
        assert timm.list_pretrained(f"{name}.*"), f"{name} has no pretrained weights in timm {timm.__version__}"


def test_schedules_and_loss_weights_are_the_papers() -> None:
    students, teacher = optims(CONFIG)
    assert students == OptimOptions(**SGD, decay_epochs=5, decay_rate=0.3)
    assert teacher == OptimOptions(**SGD, decay_epochs=10, decay_rate=0.1)
    assert (CONFIG["teacher_epochs"], CONFIG["epochs"], CONFIG["views"], CONFIG["img_size"]) == (50, 15, 15, 224)
    # The paper's "T and alpha values were set to 0.45 and 11", read so that alpha is a weight in [0, 1].
    assert (CONFIG["alpha"], CONFIG["temperature"]) == (0.45, 11)
    studied = {CONFIG["noise_student"], CONFIG["sweep_student"], *CONFIG["parity_students"]}
    assert studied <= set(CONFIG["students"])


@pytest.mark.parametrize(("options", "epochs", "expected"), [
    ("students", 15, [1e-3] * 5 + [3e-4] * 5 + [9e-5] * 5),
    ("teacher", 50, [1e-3 * 0.1 ** (e // 10) for e in range(50)]),
])
def test_timm_step_schedule_decays_as_the_paper_says(options: str, epochs: int, expected: list[float]) -> None:
    """The config's decay_epochs/decay_rate, through timm's step scheduler as kdcache.train builds it,
    give the paper's learning rate in every epoch."""
    from timm.scheduler import create_scheduler_v2

    optim = dict(zip(("students", "teacher"), optims(CONFIG)))[options]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=optim.lr)
    scheduler, _ = create_scheduler_v2(optimizer, sched=optim.sched, num_epochs=epochs,
                                       decay_epochs=optim.decay_epochs, decay_rate=optim.decay_rate,
                                       warmup_epochs=optim.warmup_epochs)
    rates = []
    for epoch in range(epochs):
        scheduler.step(epoch)
        rates.append(optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("name", ["study_cifar.json", "study_imagenette.json", "study_smoke.json"])
def test_configs_without_teacher_optim_train_the_teacher_as_before(name: str) -> None:
    cfg = json.loads((ROOT / "benchmarks" / name).read_text())
    assert "teacher_optim" not in cfg
    students, teacher = optims(cfg)
    assert teacher == students == OptimOptions(**cfg["optim"])


def test_the_function_matching_study_runs_in_the_papers_setting() -> None:
    """benchmarks/recipe_stanford40.json takes the paper's data, teacher, size and optimizer from the study config."""
    from kdcache.config import Recipe
    from recipe_study import load_config

    cfg = load_config(str(ROOT / "benchmarks" / "recipe_stanford40.json"))
    for key in ("data", "img_size", "teacher", "teacher_epochs", "alpha", "temperature", "optim", "teacher_optim",
                "pretrained", "amp", "workers"):
        assert cfg[key] == CONFIG[key], key
    assert cfg["pretrained"] is True and cfg["img_size"] == 224
    assert set(cfg["students"]) <= set(CONFIG["students"]) and cfg["sweep_student"] in cfg["students"]
    assert not Recipe(**cfg["recipe"]).is_default
    assert all(k == "epoch" or 1 <= k <= cfg["epochs"] for k in cfg["views_sweep"])
