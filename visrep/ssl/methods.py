"""Six self-supervised methods behind one interface, so that one recipe (``recipes/selfsup.py``) trains any of
them: SimCLR, MoCo v3, DINO, VICReg, Barlow Twins and BYOL.

Each method is one ``nn.Module`` holding everything that is trained or averaged -- the backbone, the
heads, the EMA target where there is one, DINO's loss with its centre (a buffer, so it travels in
``state_dict`` and in every checkpoint) -- so one ``accelerator.prepare`` replicates or shards all of it
alike, and an online linear probe on detached features. They answer alike:

* ``model(*views) -> dict``: ``views`` the augmented batches (two views; DINO: two global crops, then its
  local crops). The dict holds what the method's loss takes (below), ``features`` (pooled backbone
  features of view 1) and ``logits`` (the probe on those features, detached: no gradient reaches the
  backbone from the labels). The loss is computed by the caller, where it stays visible:

  =========  ====================  =====================================================================
  method     outputs               loss (``visrep.ssl``)
  =========  ====================  =====================================================================
  simclr     ``z`` (z1, z2)        ``nt_xent_loss(*z, temperature)``
  mocov3     ``q``, ``k``          ``mocov3_loss(*q, *k, temperature)``
  dino       student, teacher      ``model.criterion(student, teacher, teacher_temp)``
  vicreg     ``z`` (z1, z2)        ``vicreg_loss(*z, sim_coeff, std_coeff, cov_coeff)["loss"]``
  barlow     ``z`` (z1, z2)        ``barlow_twins_loss(*z, lambd)``
  byol       ``p``, ``z_target``   ``byol_loss(*p, *z_target)``
  =========  ====================  =====================================================================

* ``encode(x)``: the pooled backbone features (what is evaluated and exported);
* ``ema_pairs()``: ``(online, target)`` parameter lists for :class:`visrep.ssl.EMAUpdater` (MoCo v3's
  momentum encoder, DINO's teacher, BYOL's target), ``None`` for SimCLR, VICReg and Barlow Twins;
* ``project(x)``: the projection of a batch (DINO: the head's L2-normalised bottleneck code), for the
  collapse monitor.

What changes once per optimizer step and is checkpointed: the EMA momentum (:class:`visrep.ssl.EMAUpdater`,
a cosine in optimizer steps), DINO's teacher temperature (:class:`TeacherTemperature`, a linear warm-up
in optimizer steps) and DINO's centre (``model.criterion.center``, a buffer of the model).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from visrep.checks import check
from visrep.engine.config import BackboneConfig, to_dict
from visrep.engine.export import backbone_config, write_export
from visrep.ssl.export import export_backbone
from visrep.ssl.heads import BYOL, BYOLConfig, MLPHead
from visrep.ssl.objectives import DINOHead, DINOLoss, MoCoV3, MoCoV3MLP, teacher_temp_schedule
from visrep.zoo import create_backbone

METHODS = ("simclr", "mocov3", "dino", "vicreg", "barlow", "byol")


# ----------------------------------------------------------------------------------------------
# Configuration: one group per method (the paper's values as defaults; the digits preset is smaller)
# ----------------------------------------------------------------------------------------------
def _check_dims(cfg, prefix: str, *keys: str) -> None:
    for key in keys:
        check(getattr(cfg, key) >= 1, f"{prefix}{key}", getattr(cfg, key), "an integer >= 1")


LOSS_PATHS = {"auto": None, "gram": True, "matrix": False}  # loss_path -> the losses' ``gram`` argument


def _check_loss_path(cfg, prefix: str) -> None:
    check(cfg.loss_path in LOSS_PATHS, f"{prefix}loss_path", cfg.loss_path, "one of " + ", ".join(LOSS_PATHS))


def _check_tau(cfg, prefix: str) -> None:
    check(0 <= cfg.base_tau <= cfg.final_tau <= 1, f"{prefix}base_tau", cfg.base_tau,
          "a number with 0 <= base_tau <= final_tau <= 1")


@dataclasses.dataclass
class SimCLRConfig:
    """SimCLR (Chen et al. 2020, arXiv:2002.05709): projector Linear -> BN -> ReLU -> Linear (paper:
    2048 -> 128), with the official code's BN on the output, and the NT-Xent temperature (0.5 on CIFAR-10;
    0.1 on ImageNet at batch 4096)."""

    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    proj_last_bn: bool = True
    """BatchNorm on the projector's output with a learnt scale and no shift, as the official code has it
    (``google-research/simclr``, ``model_util.projection_head``: the last layer without bias, BN with
    ``center=False``); the paper's text writes ``W2 relu(W1 h)``."""
    last_bn_affine: bool = False
    """With ``proj_last_bn``: that BN with a scale and a shift, as lightly's ``SimCLRProjectionHead`` has it."""
    temperature: float = 0.5
    joint_batch: bool = True
    """Both views through backbone and head as one batch of 2N (BatchNorm statistics over both, as the
    official code concatenates them); false: one view at a time, as lightly's example does."""
    sync_batchnorm: bool = False
    """Convert BatchNorm to SyncBatchNorm on several processes (SimCLR's global BN)."""

    def validate(self, prefix: str) -> None:
        _check_dims(self, prefix, "proj_hidden_dim", "proj_dim")
        check(self.temperature > 0, f"{prefix}temperature", self.temperature, "a positive number")
        check(self.proj_last_bn or not self.last_bn_affine, f"{prefix}last_bn_affine", self.last_bn_affine,
              f"false while {prefix}proj_last_bn is false (it shapes the output BN that proj_last_bn adds)")


@dataclasses.dataclass
class MoCoV3Config:
    """MoCo v3 (Chen, Xie, He 2021, arXiv:2104.02057) with its ResNet heads: a 2-layer projector with
    output BN, a 2-layer predictor without (4096 -> 256), temperature 1.0 (0.2 for ViTs), momentum 0.99
    rising to 1 on a cosine over the optimizer steps."""

    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    proj_layers: int = 2
    pred_layers: int = 2
    pred_last_bn: bool = False
    last_bn_affine: bool = False
    """A scale and a shift in the heads' output BNs (lightly's ``MoCoProjectionHead``); the official code
    has neither (``BatchNorm1d(affine=False)``)."""
    temperature: float = 1.0
    base_tau: float = 0.99
    """Momentum of the key encoder at step 0; a cosine to final_tau at the last optimizer step."""
    final_tau: float = 1.0
    sync_batchnorm: bool = False

    def validate(self, prefix: str) -> None:
        _check_dims(self, prefix, "proj_hidden_dim", "proj_dim", "pred_hidden_dim", "proj_layers", "pred_layers")
        check(self.temperature > 0, f"{prefix}temperature", self.temperature, "a positive number")
        _check_tau(self, prefix)


@dataclasses.dataclass
class DINOConfig:
    """DINO (Caron et al. 2021, arXiv:2104.14294): head (MLP -> L2-normalised bottleneck ->
    weight-normalised layer to ``out_dim``), student / teacher temperatures with the teacher's linear
    warm-up, the centre's momentum, the teacher's EMA momentum, and multi-crop: two global crops at
    ``data.image_size`` (scale ``augment.crop_scale``; DINO's is 0.4 - 1) seen by teacher and student,
    and ``n_local`` local crops of ``local_size`` pixels (scale ``local_crop_scale``) seen by the
    student only."""

    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    head_batch_norm: bool = False
    norm_last_layer: bool = True
    """Fix the norm of the last layer's rows at 1 (the paper's default; more stable)."""
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    """Teacher temperature after the warm-up (the paper: 0.04 -> 0.07 over 30 epochs)."""
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30.0
    """Epochs of the linear warm-up (counted in optimizer steps); at most schedule.epochs."""
    center_momentum: float = 0.9
    base_tau: float = 0.996
    """Teacher EMA momentum at step 0; a cosine to final_tau at the last optimizer step."""
    final_tau: float = 1.0
    n_local: int = 8
    """Local crops per image (0: two global crops only)."""
    local_size: int = 96
    """Side of the local crops in pixels (224 -> 96 in the paper); at most data.image_size."""
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    freeze_last_layer: float = 0.0
    """Epochs (counted in optimizer steps) during which the head's last layer gets no update: its gradients
    are dropped before the optimizer step, so it is neither moved nor decayed (the official code's
    ``freeze_last_layer``, 1 by default there; 0 here, as it cannot run under DeepSpeed: see
    ``recipes/selfsup.py``). At most schedule.epochs."""
    weight_decay_end: Optional[float] = None
    """Weight decay at the end: a cosine over the optimizer steps from optim.weight_decay to this value, on
    the groups that decay (the paper's ViTs: 0.04 -> 0.4); null: constant optim.weight_decay."""
    joint_batch: bool = True
    """The two global crops through backbone and head as one batch (BatchNorm statistics over both, as the
    official code groups crops by resolution; the local crops as another); false: one crop at a time, as
    lightly's example does."""
    sync_batchnorm: bool = False

    def validate(self, prefix: str) -> None:
        _check_dims(self, prefix, "out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "local_size")
        check(self.freeze_last_layer >= 0, f"{prefix}freeze_last_layer", self.freeze_last_layer,
              "a number of epochs >= 0 (0: the last layer trains from the start)")
        check(self.weight_decay_end is None or self.weight_decay_end >= 0, f"{prefix}weight_decay_end",
              self.weight_decay_end, "null (constant optim.weight_decay) or a number >= 0")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            check(getattr(self, key) > 0, f"{prefix}{key}", getattr(self, key), "a positive number")
        check(self.warmup_teacher_temp_epochs >= 0, f"{prefix}warmup_teacher_temp_epochs",
              self.warmup_teacher_temp_epochs, "a number >= 0")
        check(0 <= self.center_momentum <= 1, f"{prefix}center_momentum", self.center_momentum,
              "a number in [0, 1]")
        _check_tau(self, prefix)
        check(self.n_local >= 0, f"{prefix}n_local", self.n_local, "an integer >= 0 (local crops per image)")
        lo, hi = self.local_crop_scale
        check(0 < lo <= hi <= 1, f"{prefix}local_crop_scale", self.local_crop_scale, "0 < min <= max <= 1")


@dataclasses.dataclass
class VICRegConfig:
    """VICReg (Bardes, Ponce, LeCun 2022, arXiv:2105.04906): expander of ``proj_layers`` linear layers
    (BN and ReLU between them; paper: 8192-8192-8192) and the loss coefficients 25 / 25 / 1."""

    proj_hidden_dim: int = 8192
    proj_dim: int = 8192
    proj_layers: int = 3
    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0
    sync_batchnorm: bool = False
    loss_path: str = "auto"
    """How the covariance term's squared D x D matrix is summed: ``gram`` (through the N x N Gram matrices of
    the rows, each rank its own block), ``matrix`` (the D x D covariance, as the official code), ``auto``
    (whichever does fewer multiply-adds). The same loss to rounding; ``vicreg_loss(gram=...)``."""

    def validate(self, prefix: str) -> None:
        _check_dims(self, prefix, "proj_hidden_dim", "proj_dim", "proj_layers")
        for key in ("sim_coeff", "std_coeff", "cov_coeff"):
            check(getattr(self, key) >= 0, f"{prefix}{key}", getattr(self, key), "a number >= 0")
        _check_loss_path(self, prefix)


@dataclasses.dataclass
class BarlowConfig:
    """Barlow Twins (Zbontar et al. 2021, arXiv:2103.03230): projector of ``proj_layers`` linear layers
    (BN and ReLU between them; paper: 8192-8192-8192) and the off-diagonal weight ``lambd`` (5e-3)."""

    proj_hidden_dim: int = 8192
    proj_dim: int = 8192
    proj_layers: int = 3
    lambd: float = 5e-3
    sync_batchnorm: bool = False
    loss_path: str = "auto"
    """How the squared cross-correlation is summed: ``gram``, ``matrix`` or ``auto``, as
    ``VICRegConfig.loss_path``; ``barlow_twins_loss(gram=...)``."""

    def validate(self, prefix: str) -> None:
        _check_dims(self, prefix, "proj_hidden_dim", "proj_dim", "proj_layers")
        check(self.lambd >= 0, f"{prefix}lambd", self.lambd, "a number >= 0")
        _check_loss_path(self, prefix)


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
class _Siamese(nn.Module):
    """Backbone f and projector g shared by both views (no target network), and a probe on detached
    features. ``joint_batch``: both views go through f and g as one batch (BatchNorm statistics over the
    2N views, SimCLR's global BN); else one view at a time (VICReg's and Barlow Twins' code)."""

    joint_batch = False

    def __init__(self, backbone: nn.Module, projector: nn.Module, num_classes: int = 0):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.num_features = width = int(backbone.num_features)
        self.probe: Optional[nn.Linear] = nn.Linear(width, num_classes) if num_classes > 0 else None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def ema_pairs(self) -> None:
        return None

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> dict:
        if self.joint_batch:
            f = self.backbone(torch.cat([v1, v2]))
            z1, z2 = self.projector(f).chunk(2)
            f1 = f[: v1.shape[0]]
        else:
            f1, f2 = self.backbone(v1), self.backbone(v2)
            z1, z2 = self.projector(f1), self.projector(f2)
        out = {"z": (z1, z2), "features": f1}
        if self.probe is not None:
            out["logits"] = self.probe(f1.detach())
        return out


class SimCLR(_Siamese):
    """SimCLR's encoder f and projection head g (Linear -> BN -> ReLU -> Linear, and with ``last_bn``
    the official code's output BN: the last Linear without bias, then BN with a learnt scale and no
    shift, :class:`visrep.ssl.heads.ScaledBatchNorm1d`; with ``last_bn_affine`` an affine BN, lightly's
    head), both views in one batch (``joint_batch=False``: one at a time);
    ``nt_xent_loss(*out["z"], temperature)``.

    Paper: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
    Representations", 2020, arXiv:2002.05709, Sec. 2.1 and Appendix B.
    """

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 2048, proj_dim: int = 128, num_classes: int = 0,
                 last_bn: bool = True, last_bn_affine: bool = False, joint_batch: bool = True):
        head = MLPHead(int(backbone.num_features), proj_hidden_dim, proj_dim, last_bn=last_bn,
                       last_bn_affine=last_bn_affine)
        super().__init__(backbone, head, num_classes)
        self.joint_batch = joint_batch


class VICReg(_Siamese):
    """VICReg's encoder and expander (``proj_layers`` linear layers, BN + ReLU between them, none on the
    output), one view at a time; ``vicreg_loss(*out["z"], sim_coeff, std_coeff, cov_coeff)``.

    Paper: Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning", 2022, arXiv:2105.04906, Sec. 4.1 ("Architecture").
    """

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 8192, proj_dim: int = 8192, proj_layers: int = 3,
                 num_classes: int = 0):
        head = MoCoV3MLP(int(backbone.num_features), proj_hidden_dim, proj_dim, proj_layers, last_bn=False)
        super().__init__(backbone, head, num_classes)


class BarlowTwins(_Siamese):
    """Barlow Twins' encoder and projector (``proj_layers`` linear layers without bias, BN + ReLU between
    them; the loss standardises the output), one view at a time; ``barlow_twins_loss(*out["z"], lambd)``.

    Paper: Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", 2021, arXiv:2103.03230, Sec. 3 ("Implementation details").
    """

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 8192, proj_dim: int = 8192, proj_layers: int = 3,
                 num_classes: int = 0):
        head = MoCoV3MLP(int(backbone.num_features), proj_hidden_dim, proj_dim, proj_layers, last_bn=False)
        super().__init__(backbone, head, num_classes)


class DINO(nn.Module):
    """DINO's student (backbone + :class:`DINOHead`), teacher (an EMA copy of both, never trained by
    gradients), the loss with its centre (:class:`DINOLoss`, ``criterion``: the centre is a buffer of
    this module) and a probe on detached features.

    ``forward(g1, g2, *local_crops)``: the two global crops go through the student as one batch and
    through the teacher (under ``no_grad``), the local crops (one size) through the student as another
    batch, as the official multi-crop forward groups crops by resolution (``joint_batch=False``: every
    crop on its own, lightly's way). Returns ``student``
    (``(n_crops * B, out_dim)``, global crops first), ``teacher`` (``(2B, out_dim)``), ``features``
    and ``logits``: ``model.criterion(out["student"], out["teacher"], teacher_temp)``, then, once per
    optimizer step, ``model.criterion.update_center(teacher outputs of the step)``.

    Paper: Caron, Touvron, Misra, Jegou, Mairal, Bojanowski, Joulin, "Emerging Properties in
    Self-Supervised Vision Transformers", 2021, arXiv:2104.14294, Sec. 3.1 (Algorithm 1) and Appendix.
    """

    def __init__(self, backbone: nn.Module, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 head_layers: int = 3, head_batch_norm: bool = False, norm_last_layer: bool = True,
                 student_temp: float = 0.1, center_momentum: float = 0.9, num_classes: int = 0,
                 joint_batch: bool = True):
        super().__init__()
        self.joint_batch = joint_batch
        self.num_features = width = int(backbone.num_features)
        self.backbone = backbone
        self.head = DINOHead(width, out_dim, hidden_dim, bottleneck_dim, head_layers, head_batch_norm, norm_last_layer)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head = copy.deepcopy(self.head)
        for p in self.target_parameters():
            p.requires_grad_(False)
        self.criterion = DINOLoss(out_dim, student_temp, center_momentum, n_global_crops=2)
        self.probe: Optional[nn.Linear] = nn.Linear(width, num_classes) if num_classes > 0 else None

    def online_parameters(self):
        yield from self.backbone.parameters()
        yield from self.head.parameters()

    def target_parameters(self):
        yield from self.teacher_backbone.parameters()
        yield from self.teacher_head.parameters()

    def ema_pairs(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        return list(self.online_parameters()), list(self.target_parameters())

    def cancel_last_layer_gradients(self) -> None:
        """Drop the gradients of the student head's last layer (after the backward, before the optimizer
        step): the optimizer skips it -- no update, no weight decay, no momentum -- as the official code's
        ``cancel_gradients_last_layer`` does during the first ``freeze_last_layer`` epochs."""
        for p in self.head.last_layer.parameters():
            p.grad = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.head.mlp(self.backbone(x)), dim=-1)

    def forward(self, g1: torch.Tensor, g2: torch.Tensor, *local_crops: torch.Tensor) -> dict:
        if not self.joint_batch:  # one crop at a time: BatchNorm statistics per crop
            feats = [self.backbone(c) for c in (g1, g2, *local_crops)]
            student = torch.cat([self.head(f) for f in feats])
            with torch.no_grad():
                teacher = torch.cat([self.teacher_head(self.teacher_backbone(g)) for g in (g1, g2)])
            f1 = feats[0]
        else:
            globals_ = torch.cat([g1, g2])
            f = self.backbone(globals_)
            feats = [f] + ([self.backbone(torch.cat(local_crops))] if local_crops else [])
            student = self.head(torch.cat(feats))
            with torch.no_grad():
                teacher = self.teacher_head(self.teacher_backbone(globals_))
            f1 = f[: g1.shape[0]]
        out = {"student": student, "teacher": teacher, "features": f1}
        if self.probe is not None:
            out["logits"] = self.probe(f1.detach())
        return out


class _Projecting:
    """``project(x)`` for the BYOL-shaped pairs (online projector on the backbone's features)."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))


class BYOLMethod(_Projecting, BYOL):
    """:class:`visrep.ssl.BYOL` with ``project``: ``byol_loss(*out["p"], *out["z_target"])``."""


class MoCoV3Method(_Projecting, MoCoV3):
    """:class:`visrep.ssl.MoCoV3` with ``project``: ``mocov3_loss(*out["q"], *out["k"], temperature)``."""


def build_backbone(bb: BackboneConfig) -> nn.Module:
    """The zoo backbone of a recipe's ``model`` group, without a classifier (``num_features`` pooled)."""
    return create_backbone(bb.name, pretrained=bb.pretrained, num_classes=0, checkpoint=bb.checkpoint,
                           small_input=bb.small_input, **bb.kwargs, grad_checkpointing=bb.grad_checkpointing)


def build_method(name: str, cfg, backbone: nn.Module, num_classes: int = 0) -> nn.Module:
    """The model of method ``name`` (one of :data:`METHODS`) around ``backbone``, from its config group
    ``cfg`` (:class:`SimCLRConfig`, :class:`MoCoV3Config`, ...; BYOL: :class:`visrep.ssl.BYOLConfig`), with a
    probe of ``num_classes`` outputs (0: none)."""
    if name == "simclr":
        return SimCLR(backbone, cfg.proj_hidden_dim, cfg.proj_dim, num_classes, last_bn=cfg.proj_last_bn,
                      last_bn_affine=cfg.last_bn_affine, joint_batch=cfg.joint_batch)
    if name == "mocov3":
        return MoCoV3Method(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.pred_hidden_dim, num_classes,
                            cfg.proj_layers, cfg.pred_layers, cfg.pred_last_bn, cfg.last_bn_affine)
    if name == "dino":
        return DINO(backbone, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.head_batch_norm,
                    cfg.norm_last_layer, cfg.student_temp, cfg.center_momentum, num_classes, cfg.joint_batch)
    if name == "vicreg":
        return VICReg(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, num_classes)
    if name == "barlow":
        return BarlowTwins(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.proj_layers, num_classes)
    if name == "byol":
        return BYOLMethod(backbone, cfg.proj_hidden_dim, cfg.proj_dim, cfg.pred_hidden_dim, num_classes,
                          cfg.head_batch_norm)
    raise ValueError(f"unknown self-supervised method {name!r}; expected one of {', '.join(METHODS)}")


# ----------------------------------------------------------------------------------------------
# Schedules counted in optimizer steps
# ----------------------------------------------------------------------------------------------
class TeacherTemperature:
    """DINO's teacher temperature, one value per optimizer step (:func:`teacher_temp_schedule`: linear
    from ``warmup_temp`` to ``final_temp`` over ``warmup_steps``, then constant). ``value`` is the
    temperature of the coming step; :meth:`tick` after each optimizer step. Its step count is saved with
    every checkpoint (``state_dict``), so a resumed run continues the warm-up exactly."""

    def __init__(self, warmup_steps: int, warmup_temp: float = 0.04, final_temp: float = 0.07):
        self.warmup_steps, self.warmup_temp, self.final_temp = int(warmup_steps), float(warmup_temp), float(final_temp)
        self.step = 0
        self.last = self.value

    @property
    def value(self) -> float:
        return teacher_temp_schedule(self.step, self.warmup_steps, self.warmup_temp, self.final_temp)

    def tick(self) -> None:
        self.last = self.value
        self.step += 1

    def state_dict(self) -> dict:
        return {"step": self.step, "last": self.last, "warmup_steps": self.warmup_steps,
                "warmup_temp": self.warmup_temp, "final_temp": self.final_temp}

    def load_state_dict(self, state: dict) -> None:
        for key in ("warmup_steps", "warmup_temp", "final_temp"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"teacher temperature state from the checkpoint has {key}={state[key]} but this "
                                 f"run has {getattr(self, key)}; resume with the same schedule and processes.")
        self.step, self.last = int(state["step"]), float(state["last"])


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------
def export_method(accelerator, model: nn.Module, out_dir, method: str, backbone, data_config: dict,
                  hyperparameters: Optional[dict] = None) -> None:
    """A finished pre-training stage: ``out_dir`` holds the whole module (kind ``ssl``, with ``method``:
    what ``--resume`` reloads) and ``out_dir/backbone/`` the encoder alone (kind ``backbone``, loadable with
    ``visrep.engine.export.load_model``). Call on every rank."""
    extra = {"method": method, "pretraining": method, "hyperparameters": to_dict(hyperparameters or {})}
    state = write_export(accelerator, model, out_dir, "ssl", {**backbone_config(backbone, 0, data_config), **extra})
    export_backbone(accelerator, model, Path(out_dir) / "backbone", backbone, data_config,
                    extra={"pretraining": method}, state=state)


__all__ = ["METHODS", "SimCLRConfig", "MoCoV3Config", "DINOConfig", "VICRegConfig", "BarlowConfig", "BYOLConfig",
           "SimCLR", "VICReg", "BarlowTwins", "DINO", "BYOLMethod", "MoCoV3Method", "build_backbone", "build_method",
           "TeacherTemperature", "export_method"]
