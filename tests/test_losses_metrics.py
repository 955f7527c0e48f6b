"""Golden values for the KD loss and a hand-computed mAP."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache.losses import kd_loss
from kdcache.metrics import agreement, mean_average_precision, top1

S = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
T = torch.tensor([[3.0, 2.0, 1.0], [0.0, 0.0, 1.0]])
Y = torch.tensor([0, 2])


def test_kd_loss_golden_values() -> None:
    # Computed independently with scipy.special.softmax / log_softmax, T=2, alpha=0.3.
    parts = kd_loss(S, T, Y, alpha=0.3, temperature=2.0)
    assert parts["kd"].item() == pytest.approx(0.7926828321879388, rel=1e-6)
    assert parts["ce"].item() == pytest.approx(1.3244586305507688, rel=1e-6)
    assert parts["loss"].item() == pytest.approx(0.9522155716967877, rel=1e-6)


def test_kd_loss_limits() -> None:
    assert kd_loss(S, T, Y, alpha=1.0, temperature=4.0)["loss"].item() == pytest.approx(
        torch.nn.functional.cross_entropy(S, Y).item())
    same = kd_loss(S, S, Y, alpha=0.0, temperature=3.0)
    assert same["loss"].item() == pytest.approx(0.0, abs=1e-6)
    plain = kd_loss(S, None, Y, alpha=0.5, temperature=4.0)
    assert plain["loss"].item() == pytest.approx(plain["ce"].item()) and plain["kd"].item() == 0.0


def test_kd_loss_gradient_reaches_student_only() -> None:
    s = S.clone().requires_grad_(True)
    kd_loss(s, T, Y, alpha=0.5, temperature=4.0)["loss"].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_map_by_hand() -> None:
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    scores = np.stack([1 - p1, p1], axis=1)
    # Class 1 ranked: 0.8 (+), 0.4 (-), 0.35 (+), 0.1 (-): AP = (1/1 + 2/3) / 2.
    # Class 0 ranked: 0.9 (+), 0.65 (-), 0.6 (+), 0.2 (-): AP = (1/1 + 2/3) / 2.
    assert mean_average_precision(scores, labels) == pytest.approx(100 * (1 + 2 / 3) / 2)


def test_map_skips_classes_without_positives_and_top1() -> None:
    labels = np.array([0, 1, 1])
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.3, 0.1]])
    # Class 0: 0.9 (+), 0.6 (-), 0.2 (-) -> AP 1. Class 1: 0.8 (+), 0.3 (+), 0.1 (-) -> AP 1. Class 2: no positives.
    assert mean_average_precision(scores, labels) == pytest.approx(100.0)
    assert top1(scores, labels) == pytest.approx(200 / 3)
    assert agreement(scores, scores[:, [1, 0, 2]]) == pytest.approx(0.0)
