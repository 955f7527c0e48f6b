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
    ``{"loss", "ce", "kd"}``; ``kd`` is zero in plain training. `labels` are
    class indices (B,) or soft targets (B,C), as :func:`label_targets` makes
    them for mixed views and label smoothing; ``alpha=0`` is pure function matching.
    """
    ce = F.cross_entropy(student_logits.float(), labels.float() if labels.is_floating_point() else labels)
    if teacher_logits is None:
        return {"loss": ce, "ce": ce, "kd": torch.zeros_like(ce)}
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                  reduction="batchmean", log_target=True)
    kd = kl * (t * t)
    return {"loss": (1.0 - alpha) * kd + alpha * ce, "ce": ce, "kd": kd}


def feature_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The feature term of ``--feature-loss kind`` between a student's and a teacher's features (batch mean).

    * ``mse``: mean squared error of the projected student embedding (B,D) and the teacher's (B,D).
    * ``cosine``: ``1 - cos`` of the two (B,D) embeddings, averaged over the batch.
    * ``attention``: attention transfer (Zagoruyko & Komodakis, 2017): ``||a_s/|a_s| - a_t/|a_t|||^2`` of the
      flattened (B,S,S) maps, summed over the map and averaged over the batch (in [0, 4] at any S).
    """
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return F.mse_loss(s, t)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "attention":
        return (F.normalize(s.flatten(1), dim=1) - F.normalize(t.flatten(1), dim=1)).pow(2).sum(1).mean()
    raise ValueError(f"unknown feature loss '{kind}'")


def with_feature_term(parts: dict[str, torch.Tensor], feature: torch.Tensor, weight: float) -> dict[str, torch.Tensor]:
    """`parts` of :func:`kd_loss` with ``weight * feature`` added to the loss and ``feature`` among the parts."""
    return {**parts, "loss": parts["loss"] + weight * feature, "feature": feature}


def ensemble_logits(teacher_logits: list[torch.Tensor], weights: list[float] | tuple[float, ...],
                    temperature: float) -> torch.Tensor:
    """Logits whose softmax at `temperature` is the weighted mean of the teachers' softmax at it.

    ``T * log(sum_i w_i * softmax(t_i / T))``, computed with log-sum-exp so a
    confident teacher cannot overflow. Handed to :func:`kd_loss` at the same
    T, the KD term then sees exactly the ensemble's probabilities
    ``p_T = sum_i w_i softmax(t_i / T)``: averaging probabilities, not logits,
    keeps each teacher's calibration at the distillation temperature.
    `weights` (one per teacher, positive) must sum to 1.
    """
    t = temperature
    log_p = torch.stack([F.log_softmax(x.float() / t, dim=-1) for x in teacher_logits])  # (teachers, ..., C)
    log_w = torch.log(torch.as_tensor(weights, dtype=torch.float32, device=log_p.device))
    return t * torch.logsumexp(log_p + log_w.view(-1, *([1] * (log_p.dim() - 1))), dim=0)


def label_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0,
                  partner_labels: torch.Tensor | None = None, lambdas: torch.Tensor | None = None) -> torch.Tensor:
    """The CE term's targets: the class indices themselves, or soft targets (B,C) as timm's ``mixup_target``.

    With `smoothing` each one-hot target keeps ``1 - smoothing + smoothing/C``
    and gives every other class ``smoothing/C``; a mixed view's target is
    ``lambda * y + (1 - lambda) * y_partner`` (`lambdas` per view, 1 where not
    mixed). Without either, the indices pass through, so the paper's loss is unchanged.
    """
    if smoothing == 0.0 and partner_labels is None:
        return labels
    off = smoothing / num_classes
    on = 1.0 - smoothing + off

    def smoothed(y: torch.Tensor) -> torch.Tensor:
        return F.one_hot(y, num_classes).float() * (on - off) + off

    target = smoothed(labels)
    if partner_labels is not None:
        lam = lambdas.float().view(-1, 1)
        target = target * lam + smoothed(partner_labels) * (1.0 - lam)
    return target
