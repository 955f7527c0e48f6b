"""Feature targets: what ``--features`` asks for, and how a model's features are computed from one forward pass.

* ``pooled``: the pooled pre-logits embedding (timm's ``forward_head(..., pre_logits=True)``), (B, D).
* ``attention:S``: the spatial attention map of the last feature map (channel mean of the squared
  activations, average-pooled to S x S: Zagoruyko & Komodakis's attention-transfer definition), (B, S, S).

The last feature map is the last stage of timm's ``forward_intermediates`` in NCHW, so a transformer's token
grid gives a map exactly like a CNN's. The dump, ``verify``, the online teacher and the student all call
:func:`model_outputs`, so stored and live features are the same computation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FEATURE_LOSSES = ("mse", "cosine", "attention")  # --feature-loss choices; mse and cosine use the pooled target


@dataclass(frozen=True)
class FeatureSpec:
    """Which features a forward pass returns: the pooled embedding and/or an S x S attention map (0: none)."""

    pooled: bool = False
    attention: int = 0

    @classmethod
    def parse(cls, text: str) -> "FeatureSpec":
        """``pooled``, ``attention:S`` or both, comma-separated; ValueError with the reason otherwise."""
        pooled, attention = False, 0
        for part in (p.strip() for p in text.split(",") if p.strip()):
            if part == "pooled" and not pooled:
                pooled = True
            elif part.startswith("attention:") and part[10:].isdigit() and int(part[10:]) >= 1 and not attention:
                attention = int(part[10:])
            else:
                raise ValueError(f"'{part}' is not pooled or attention:S (S >= 1), or is given twice")
        if not (pooled or attention):
            raise ValueError("names no feature")
        return cls(pooled, attention)

    @classmethod
    def for_loss(cls, kind: str | None, attention_size: int = 0) -> "FeatureSpec":
        """The features a ``--feature-loss`` needs (attention at the cache's size)."""
        if kind is None:
            return cls()
        return cls(attention=attention_size) if kind == "attention" else cls(pooled=True)

    @property
    def empty(self) -> bool:
        return not (self.pooled or self.attention)

    def names(self) -> list[str]:
        """The option's parts, e.g. ['pooled', 'attention:7']."""
        return (["pooled"] if self.pooled else []) + ([f"attention:{self.attention}"] if self.attention else [])


def target_kind(loss: str) -> str:
    """The teacher feature a ``--feature-loss`` compares with: 'attention' or 'pooled'."""
    return "attention" if loss == "attention" else "pooled"


def attention_map(feature_map: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, S) float32: channel mean of the squared (B, C, H, W) map, average-pooled to S x S."""
    energy = feature_map.float().pow(2).mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(energy, size)[:, 0]


def model_outputs(model: nn.Module, x: torch.Tensor, spec: FeatureSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits (B, C) and the features of `spec` ({'pooled': (B, D), 'attention': (B, S, S)}) from one forward.

    Without features this is ``model(x)``; with them, the logits are the same
    ``forward_head`` of the same final features, so they equal ``model(x)``.
    """
    if spec.empty:
        return model(x), {}
    if spec.attention:
        final, maps = model.forward_intermediates(x, indices=1, output_fmt="NCHW", intermediates_only=False)
    else:
        final, maps = model.forward_features(x), []
    features = {}
    if spec.pooled:
        features["pooled"] = model.forward_head(final, pre_logits=True)
    if spec.attention:
        features["attention"] = attention_map(maps[-1], spec.attention)
    return model.forward_head(final), features


def _blank_forward(model: nn.Module, img_size: int, fn) -> object:
    """`fn(model, x)` on one blank image, in eval mode and without grad; the model's mode is kept."""
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = fn(model, torch.zeros(1, 3, img_size, img_size, device=param.device))
    model.train(was_training)
    return out


def pooled_width(model: nn.Module, img_size: int) -> int:
    """D of the model's pooled embedding, from one blank forward."""
    _, features = _blank_forward(model, img_size, lambda m, x: model_outputs(m, x, FeatureSpec(pooled=True)))
    return int(features["pooled"].shape[-1])


def last_map_size(model: nn.Module, img_size: int) -> tuple[int, int]:
    """(H, W) of the model's last feature map at `img_size` (an S x S attention map finer than it is upsampled)."""
    maps = _blank_forward(model, img_size, lambda m, x: m.forward_intermediates(x, indices=1, output_fmt="NCHW",
                                                                               intermediates_only=True))
    return int(maps[-1].shape[-2]), int(maps[-1].shape[-1])


def layer_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Logits (B, C), the pooled embedding (B, D) and every stage's globally averaged output [(B, C_i)], in order.

    The stages are timm's ``forward_intermediates`` (its ``feature_info``: a CNN's
    stages, a ViT's blocks), each averaged over its spatial grid to one vector.
    """
    stages = len(getattr(model, "feature_info", ())) or 1
    final, maps = model.forward_intermediates(x, indices=stages, output_fmt="NCHW", intermediates_only=False)
    vectors = [m.float().mean(dim=tuple(range(2, m.ndim))) if m.ndim == 4 else m.float().mean(dim=1) for m in maps]
    return model.forward_head(final), model.forward_head(final, pre_logits=True), vectors


class FeatureStudent(nn.Module):
    """A student that returns (logits, its feature for the loss); the pooled projector trains with it.

    One module, so DistributedDataParallel and the optimizer see the student and
    its projector together; the student's own weights stay in ``self.model``.
    """

    def __init__(self, model: nn.Module, kind: str, teacher_width: int = 0, attention_size: int = 0,
                 img_size: int = 32) -> None:
        super().__init__()
        self.model, self.kind = model, kind
        self.spec = FeatureSpec.for_loss(kind, attention_size)
        self.projector = nn.Linear(pooled_width(model, img_size), teacher_width) if self.spec.pooled else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = model_outputs(self.model, x, self.spec)
        if self.projector is not None:
            return logits, self.projector(features["pooled"].float())
        return logits, features["attention"]
