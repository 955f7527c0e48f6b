"""benchmarks/study.py end to end on a generated Stanford 40 layout with timm's test models:
every part runs, the report holds every table, and a second invocation resumes instead of retraining."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import STUDENT, TEACHER, make_stanford40

ROOT = Path(__file__).resolve().parents[1]


def run_study(config: Path, *extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study.py"), str(config), *extra],
                            check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_study_runs_every_part_and_resumes(tmp_path: Path) -> None:
    data = make_stanford40(tmp_path / "s40", train=8, test=4)
    out, runs = tmp_path / "report", tmp_path / "runs"
    config = tmp_path / "study.json"
    config.write_text(json.dumps({
        "name": "tiny", "out": str(out), "runs": str(runs),
        "data": {"path": str(data), "description": "generated Stanford 40 layout"},
        "img_size": 32, "batch_size": 8, "workers": 0, "device": "cpu",
        "teacher": TEACHER, "teacher_epochs": 1, "students": [STUDENT],
        "epochs": 2, "views": 2, "alpha": 0.5, "temperature": 4.0, "crop_scale": [0.35, 1.0],
        "optim": {"opt": "adamw", "lr": 0.001, "weight_decay": 0.05, "sched": "cosine"},
        "parity_students": [STUDENT], "noise_student": STUDENT, "noise_seeds": [1, 2],
        "sweep_student": STUDENT, "views_sweep": [1, 2], "sweep_seeds": [1], "stores": ["topk:1"],
    }))

    run_study(config, "--only", "table")
    report = (out / "report.md").read_text()
    assert "**Partial.** Not run yet: parity, noise, views sweep, compression." in report
    assert "## Table I" in report

    first = run_study(config)
    assert f"== {STUDENT}-plain\n" not in first.stderr  # Table I's runs were kept
    assert f"== {STUDENT}-online-seed2" in first.stderr
    report = (out / "report.md").read_text()
    assert "Partial" not in report
    for section in ("## Table I", "## Parity", "## Run-to-run noise", "## How many cached views?", "## Compression",
                    "## Every run"):
        assert section in report
    assert "two standard deviations of the run-to-run noise" in report
    # Each seed's cached run read its own dump, so its crops are online KD's crops of that seed.
    for seed in (1, 2):
        record = json.loads((out / "records" / f"{STUDENT}-cached-seed{seed}.json").read_text())
        assert record["cache"].endswith(f"-seed{seed}.h5")
    results = json.loads((out / "results.json").read_text())
    assert [r["views"] for r in results["views_sweep"]] == [1, 2]
    assert [r["runs"] for r in results["views_sweep"]] == [2, 2]  # seeds 0 and 1; K = 2 reuses the noise runs
    assert results["views_sweep_online"]["runs"] == 2
    assert [r["store"] for r in results["stores"]] == ["fp16", "topk:1"]
    assert len(results["noise"]["cached_minus_online"]["top1"]) == 3
    assert (out / "accuracy_per_student.png").stat().st_size > 0
    assert (out / "accuracy_vs_views.png").stat().st_size > 0
    assert len(list((out / "records").glob("*.json"))) == 13  # teacher + 12 student runs

    again = run_study(config)
    assert "== " not in again.stderr  # nothing retrained, nothing re-dumped
    assert (out / "report.md").read_text() == report
