"""Linear CKA's known properties, and `kdcache compare` on tiny runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import STUDENT, TEACHER, make_image_folder
from kdcache.cli import main
from kdcache.models import create_model, save_checkpoint
from kdcache.similarity import cosine_and_distance, hsic, kl_divergence, linear_cka

RNG = np.random.default_rng(0)
X = RNG.normal(size=(40, 12))
Y = X[:, :5] @ RNG.normal(size=(5, 7)) + 0.5 * RNG.normal(size=(40, 7))


def test_cka_of_a_representation_with_itself_is_one() -> None:
    assert linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling() -> None:
    q, _ = np.linalg.qr(RNG.normal(size=(12, 12)))
    base = linear_cka(X, Y)
    assert linear_cka(X @ q, Y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(3.7 * X, 0.01 * Y) == pytest.approx(base, abs=1e-12)
    assert linear_cka(X + 5.0, Y) == pytest.approx(base, abs=1e-12)  # centring removes offsets


def test_cka_equals_the_hsic_definition() -> None:
    k, l = X @ X.T, Y @ Y.T
    direct = hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))
    assert linear_cka(X, Y) == pytest.approx(direct, abs=1e-12)
    wide = RNG.normal(size=(10, 30))  # fewer inputs than features: the Gram-matrix path
    narrow = wide[:, :4]
    direct = hsic(wide @ wide.T, narrow @ narrow.T) / np.sqrt(hsic(wide @ wide.T, wide @ wide.T)
                                                              * hsic(narrow @ narrow.T, narrow @ narrow.T))
    assert linear_cka(wide, narrow) == pytest.approx(direct, abs=1e-12)


def test_cka_is_not_invariant_to_non_isotropic_scaling_and_sees_independence() -> None:
    stretched = X * np.arange(1, 13)
    assert abs(linear_cka(stretched, Y) - linear_cka(X, Y)) > 1e-3
    assert linear_cka(X, np.ones((40, 3))) == 0.0  # a constant representation carries nothing


def test_cosine_distance_and_kl() -> None:
    cos, dist = cosine_and_distance(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[2.0, 0.0], [1.0, 0.0]]))
    assert (cos, dist) == (pytest.approx(0.5), pytest.approx((1.0 + np.sqrt(5.0)) / 2))
    assert kl_divergence(np.array([[0.0, 0.0]]), np.array([[0.0, 0.0]])) == 0.0
    assert kl_divergence(np.array([[0.0, np.log(3.0)]]), np.array([[0.0, 0.0]])) == pytest.approx(
        0.25 * np.log(0.5) + 0.75 * np.log(1.5))


def _ok(*args: object) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.mark.slow
def test_compare_writes_json_markdown_and_png(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data")
    torch.manual_seed(5)
    teacher = tmp_path / "teacher.pt"
    save_checkpoint(create_model(TEACHER, 3, 32), teacher, {"arch": TEACHER, "num_classes": 3})
    fast = ["--data", data, "--img-size", 32, "--device", "cpu", "--workers", 0]
    _ok("dump-teacher", "--teacher", TEACHER, "--checkpoint", teacher, "--views", 1, "--features", "pooled",
        "--out", tmp_path / "cache.h5", *fast)
    train = ["train-student", "--model", STUDENT, "--epochs", 1, "--batch-size", 8, *fast]
    _ok(*train, "--out", tmp_path / "plain")
    _ok(*train, "--cached", tmp_path / "cache.h5", "--feature-loss", "cosine", "--out", tmp_path / "cosine")
    output = _ok("compare", tmp_path / "plain", tmp_path / "cosine", "--data", data, "--teacher", TEACHER,
                 "--teacher-checkpoint", teacher, "--samples", 10, "--device", "cpu", "--out", tmp_path / "cmp")
    assert f"report: {tmp_path / 'cmp' / 'compare.md'}" in output
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == ["compare.json", "compare.md", "compare.png"]
    report = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert report["images"] == 10 and [s["name"] for s in report["students"]] == ["plain", "cosine"]
    plain, cosine = report["students"]
    assert plain["mode"] == "plain" and plain["cosine"] is None  # no projector: no cosine
    assert cosine["feature_loss"] == "cosine" and -1.0 <= cosine["cosine"] <= 1.0
    assert np.array(cosine["cka_layers"]).shape == (4, 6)  # test_convnext's 4 stages x test_vit's 6 blocks
    assert 0.0 <= cosine["cka_final"] <= 1.0 + 1e-9
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| cosine | test_vit | cached | cosine |" in (tmp_path / "cmp" / "compare.md").read_text()


def test_compare_refuses_a_folder_without_a_run(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "empty"), "--teacher", TEACHER,
                                       "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.strip() == (f"Error: {tmp_path / 'empty'} has no metrics.json; compare takes train-student "
                                     "--out folders")
