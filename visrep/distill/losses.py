"""Knowledge-distillation losses."""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from visrep.checks import check


def soft_target_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                        temperature: float = 4.0) -> torch.Tensor:
    """Soft-target distillation loss of Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural
    Network" (2015, arXiv:1503.02531)::

        T**2 * KL( softmax(t / T) || softmax(s / T) ),  averaged over the batch ("batchmean")

    computed in fp32 whatever the autocast dtype. The T**2 factor keeps the gradient's magnitude
    roughly independent of T (the soft-target gradient scales as 1/T**2). The teacher logits are
    treated as constants (detached).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape; both models must predict the same classes.")
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


@dataclasses.dataclass
class KDConfig:
    """How the student learns from the teacher. THE ONE PLACE where the weights are defined::

        targets=soft:  loss = kd_weight * T**2 * KL(p_t^T || p_s^T) + (1 - kd_weight) * CE(s, labels)
        targets=hard:  loss = kd_weight * CE(s, argmax t)           + (1 - kd_weight) * CE(s, labels)
        label_free:    the (1 - kd_weight) term is dropped and the distillation term gets weight 1
                       (distil on images without labels).

    ``kd_weight`` = 0 is plain supervised training; 1 is pure distillation.
    """

    temperature: float = 4.0
    kd_weight: float = 0.9
    targets: Literal["soft", "hard"] = "soft"
    label_free: bool = False
    allow_weaker_teacher: bool = False
    """distill recipe: distil even when the teacher's validation accuracy is below the student trained
    from scratch (by default the recipe stops before the KD stage and says so)."""

    def validate(self, prefix: str) -> None:
        check(self.temperature > 0, f"{prefix}temperature", self.temperature, "a positive number")
        check(0.0 <= self.kd_weight <= 1.0, f"{prefix}kd_weight", self.kd_weight, "a number in [0, 1]")


class DistillationLoss(nn.Module):
    """The student's objective as defined by ``KDConfig``; returns the total and its parts."""

    def __init__(self, cfg: KDConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        c = self.cfg
        if c.targets == "soft":
            kd = soft_target_kd_loss(student_logits, teacher_logits, c.temperature)
        else:
            kd = F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(dim=-1))
        if c.label_free:
            return {"loss": kd, "kd": kd.detach()}
        if labels is None:
            raise ValueError("labels are required unless kd.label_free is true")
        ce = F.cross_entropy(student_logits.float(), labels)
        loss = c.kd_weight * kd + (1.0 - c.kd_weight) * ce
        return {"loss": loss, "kd": kd.detach(), "ce": ce.detach()}
