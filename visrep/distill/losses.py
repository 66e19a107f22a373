"""Knowledge-distillation losses."""
from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from visrep.checks import check
from visrep.distill.features import (at_loss, dist_loss, fitnets_hint_loss, rkd_angle_loss,
                                     rkd_distance_loss)


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
    """How the student learns from the teacher. THE ONE PLACE where the weights are defined.

    ``method=kd`` (default), the soft/hard-target objective of Hinton et al.; call it ``L_logit``::

        targets=soft:  L_logit = kd_weight * T**2 * KL(p_t^T || p_s^T) + (1 - kd_weight) * CE(s, labels)
        targets=hard:  L_logit = kd_weight * CE(s, argmax t)           + (1 - kd_weight) * CE(s, labels)
        label_free:    the (1 - kd_weight) term is dropped and the distillation term gets weight 1
                       (distil on images without labels).

    ``kd_weight`` = 0 is plain supervised training (L_logit = CE); 1 is pure distillation. The other
    methods (visrep.distill.features) add a term to ``L_logit`` or replace the KL term::

        fitnets:  L_logit + hint_weight * MSE( r(student stage hint_stage), teacher stage of the same reduction )
        at:       L_logit + at_beta / 2 * sum_j mean( (Q_s^j/||Q_s^j|| - Q_t^j/||Q_t^j||)^2 )   over at_stages
        rkd:      L_logit + rkd_distance_weight * L_RKD-D + rkd_angle_weight * L_RKD-A   (penultimate embeddings)
        dist:     CE(s, labels) + dist_beta * tau^2 L_inter + dist_gamma * tau^2 L_intra   (tau = dist_tau;
                  kd_weight and temperature are not used; label_free drops the CE)

    The papers' own objectives: FitNets (stage 2), AT and RKD train with CE plus their term -- set
    ``kd_weight`` 0 for that; with ``kd_weight`` > 0 the term is added to logit KD (the papers' "+KD" rows).
    DIST's objective is CE + its term (its alpha = 1).
    """

    temperature: float = 4.0
    kd_weight: float = 0.9
    targets: Literal["soft", "hard"] = "soft"
    label_free: bool = False
    allow_weaker_teacher: bool = False
    """distill recipe: distil even when the teacher's validation accuracy is below the student trained
    from scratch (by default the recipe stops before the KD stage and says so)."""
    method: Literal["kd", "fitnets", "at", "dist", "rkd"] = "kd"
    """kd: soft/hard targets only (Hinton et al. 2015); fitnets: + FitNets hint (Romero et al. 2015,
    arXiv:1412.6550); at: + attention transfer (Zagoruyko & Komodakis 2017, arXiv:1612.03928); dist: DIST's
    Pearson relations instead of the KL (Huang et al. 2022, arXiv:2205.10536); rkd: + relational KD,
    distance and angle (Park et al. 2019, arXiv:1904.05068). The total loss of each: the class docstring."""
    hint_stage: int = -2
    """fitnets: the student's guided stage, an index into its feature_info (negative: from the end; -2 is
    the middle group of a CIFAR ResNet, the paper's middle layer)."""
    hint_teacher_stage: Optional[int] = None
    """fitnets: the teacher's hint stage (index into its feature_info); None: the teacher's last stage of the
    same reduction as the guided stage."""
    hint_regressor: Literal["conv1x1_bn", "conv3x3"] = "conv1x1_bn"
    """fitnets: the trainable regressor from the student's channels to the teacher's."""
    hint_weight: float = 100.0
    """fitnets: weight of the hint loss (an element-averaged MSE; 100 as CRD's RepDistiller benchmark)."""
    at_stages: list[int] = dataclasses.field(default_factory=lambda: [-3, -2, -1])
    """at: the student's stages whose attention maps are matched (indices into its feature_info; the
    default, the last three, are the three groups of a CIFAR ResNet, as the paper's WRN)."""
    at_teacher_stages: Optional[list[int]] = None
    """at: the teacher's stage for each of at_stages; None: the same indices. A student map of another size
    is resized to the teacher's (bilinear) before normalisation."""
    at_beta: float = 1000.0
    """at: beta of the paper (10^3); the loss is beta/2 times the sum over the matched stages."""
    dist_tau: float = 1.0
    """dist: temperature tau of both softmaxes (the official defaults: tau = beta = gamma = 1)."""
    dist_beta: float = 1.0
    """dist: weight of the inter-class (per-sample) relation term."""
    dist_gamma: float = 1.0
    """dist: weight of the intra-class (per-class, over the batch) relation term."""
    rkd_distance_weight: float = 25.0
    """rkd: lambda_D of the paper (25)."""
    rkd_angle_weight: float = 50.0
    """rkd: lambda_A of the paper (50)."""

    def validate(self, prefix: str) -> None:
        check(self.temperature > 0, f"{prefix}temperature", self.temperature, "a positive number")
        check(0.0 <= self.kd_weight <= 1.0, f"{prefix}kd_weight", self.kd_weight, "a number in [0, 1]")
        check(self.method in ("kd", "fitnets", "at", "dist", "rkd"), f"{prefix}method", self.method,
              "one of kd, fitnets, at, dist, rkd")
        check(self.method != "dist" or self.targets == "soft", f"{prefix}targets", self.targets,
              "'soft' with kd.method dist (DIST relates the softened probabilities; hard targets have none)")
        for key in ("hint_weight", "at_beta", "dist_beta", "dist_gamma", "rkd_distance_weight", "rkd_angle_weight"):
            check(getattr(self, key) >= 0, f"{prefix}{key}", getattr(self, key), "a number >= 0")
        check(self.dist_tau > 0, f"{prefix}dist_tau", self.dist_tau, "a positive number")
        check(len(self.at_stages) > 0, f"{prefix}at_stages", self.at_stages, "at least one stage index")
        check(self.at_teacher_stages is None or len(self.at_teacher_stages) == len(self.at_stages),
              f"{prefix}at_teacher_stages", self.at_teacher_stages,
              f"one teacher stage per student stage ({len(self.at_stages)}, as kd.at_stages), or null")


class DistillationLoss(nn.Module):
    """The student's objective as defined by ``KDConfig``; returns the total and its parts (detached).

    ``forward(student_logits, teacher_logits, labels, **inputs)``: for the feature methods ``inputs`` are
    what :class:`~visrep.distill.features.FeatureDistiller` returns beside the logits
    (``student_features``/``teacher_features`` or ``student_embedding``/``teacher_embedding``)."""

    def __init__(self, cfg: KDConfig, ce: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None):
        super().__init__()
        self.cfg = cfg
        # the label term: fp32 cross-entropy against integer labels or soft (MixUp / CutMix) targets; a recipe
        # passes its supervised objective's (label smoothing)
        self.ce = ce or (lambda logits, target: F.cross_entropy(logits.float(), target))

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                labels: Optional[torch.Tensor] = None, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        c = self.cfg
        if not c.label_free and labels is None:
            raise ValueError("labels are required unless kd.label_free is true")
        if c.method == "dist":
            d = dist_loss(student_logits, teacher_logits, c.dist_tau, c.dist_beta, c.dist_gamma)
            out = {"loss": d["loss"], "dist_inter": d["inter"], "dist_intra": d["intra"]}
            if not c.label_free:
                ce = self.ce(student_logits, labels)
                out["loss"] = out["loss"] + ce
                out["ce"] = ce.detach()
            return out
        if c.targets == "soft":
            kd = soft_target_kd_loss(student_logits, teacher_logits, c.temperature)
        else:
            kd = F.cross_entropy(student_logits.float(), teacher_logits.detach().argmax(dim=-1))
        if c.label_free:
            out = {"loss": kd, "kd": kd.detach()}
        else:
            ce = self.ce(student_logits, labels)
            out = {"loss": c.kd_weight * kd + (1.0 - c.kd_weight) * ce, "kd": kd.detach(), "ce": ce.detach()}
        if c.method == "kd":
            return out
        missing = [k for k in _INPUTS[c.method] if k not in inputs]
        if missing:
            raise ValueError(f"kd.method {c.method} needs {missing}: the outputs of visrep.distill.FeatureDistiller")
        if c.method == "fitnets":
            term = fitnets_hint_loss(inputs["student_features"][0], inputs["teacher_features"][0])
            out["loss"] = out["loss"] + c.hint_weight * term
            out["hint"] = term.detach()
        elif c.method == "at":
            term = at_loss(inputs["student_features"], inputs["teacher_features"], c.at_beta)
            out["loss"] = out["loss"] + term
            out["at"] = term.detach()
        else:  # rkd
            s, t = inputs["student_embedding"], inputs["teacher_embedding"]
            dist, angle = rkd_distance_loss(s, t), rkd_angle_loss(s, t)
            out["loss"] = out["loss"] + c.rkd_distance_weight * dist + c.rkd_angle_weight * angle
            out["rkd_distance"], out["rkd_angle"] = dist.detach(), angle.detach()
        return out


_INPUTS = {"fitnets": ("student_features", "teacher_features"), "at": ("student_features", "teacher_features"),
           "rkd": ("student_embedding", "teacher_embedding")}
