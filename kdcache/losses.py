"""Pure loss functions. No teacher lives here: cached and online KD call the same code."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
            alpha: float, temperature: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T)) + alpha * CE(y, s)``.

    The KL term is averaged over the batch; ``T^2`` keeps its gradient scale
    independent of the temperature (Hinton et al., 2015). Without teacher
    logits (plain training) the loss is the cross-entropy alone. Returns
    ``{"loss", "ce", "kd"}``; ``kd`` is zero in plain training.
    """
    ce = F.cross_entropy(student_logits.float(), labels)
    if teacher_logits is None:
        return {"loss": ce, "ce": ce, "kd": torch.zeros_like(ce)}
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                  reduction="batchmean", log_target=True)
    kd = kl * (t * t)
    return {"loss": (1.0 - alpha) * kd + alpha * ce, "ce": ce, "kd": kd}
