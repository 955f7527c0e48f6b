"""Classification metrics, in percent: top-1, mAP, agreement with a teacher."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score


def top1(scores: np.ndarray, labels: np.ndarray) -> float:
    """Percent of rows whose highest score is the label."""
    return float(100.0 * np.mean(scores.argmax(axis=1) == labels))


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over classes of one-vs-rest average precision (scikit-learn), in percent.

    Classes with no positive example in `labels` have no defined AP and are
    left out of the mean.
    """
    aps = [average_precision_score(labels == c, scores[:, c]) for c in range(scores.shape[1]) if np.any(labels == c)]
    return float(100.0 * np.mean(aps))


def agreement(student_scores: np.ndarray, teacher_scores: np.ndarray) -> float:
    """Percent of rows on which student and teacher predict the same class."""
    return float(100.0 * np.mean(student_scores.argmax(axis=1) == teacher_scores.argmax(axis=1)))


def summarize(scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{"top1", "mAP"}`` for one set of predictions."""
    return {"top1": top1(scores, labels), "mAP": mean_average_precision(scores, labels)}
