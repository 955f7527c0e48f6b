"""Evaluation: a model's scores on the deterministic evaluation view, and its top-1 and mAP."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import metrics
from .augment import Preprocess
from .data import ImageSet
from .devices import model_input
from .loaders import EvalViews, eval_loader


@torch.inference_mode()
def predict(model: nn.Module, loader, prep: Preprocess, device: torch.device,
            amp: torch.dtype | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Scores (N,C) float32 and labels (N,) over an evaluation loader."""
    model.eval()
    scores, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out = model(model_input(x, prep, device))
        scores.append(out.float().cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(scores), np.concatenate(labels)


def evaluate(model: nn.Module, images: ImageSet, prep: Preprocess, device: torch.device, batch_size: int,
             workers: int, amp: torch.dtype | None = None) -> dict[str, float]:
    """Top-1 and mAP (percent) on the deterministic evaluation view of `images`."""
    scores, labels = predict(model, eval_loader(EvalViews(images, prep), batch_size, workers, device), prep, device, amp)
    return metrics.summarize(scores, labels)
