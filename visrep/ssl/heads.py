"""BYOL's projector and predictor, and the online / target pair built around a zoo backbone."""
from __future__ import annotations

import copy
import dataclasses
from typing import Iterator, Optional

import torch
from torch import nn
from visrep.checks import check


class ScaledBatchNorm1d(nn.Module):
    """BatchNorm1d with a learnt per-feature scale and no shift (TensorFlow's ``center=False``), the
    output norm of SimCLR's official projection head.

    A plain ``BatchNorm1d(affine=False)`` inside (``bn``) and the scale beside it (``weight``, ones at
    init), so that ``nn.SyncBatchNorm.convert_sync_batchnorm`` swaps the norm and keeps the scale."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, eps=eps, momentum=momentum, affine=False)
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) * self.weight


class MLPHead(nn.Sequential):
    """Linear -> BatchNorm1d -> ReLU -> Linear, no normalisation on the output unless ``last_bn``.

    The projector ``g`` and the predictor ``q`` of BYOL have this shape (hidden 4096, output 256 in
    the paper; smaller for CPU runs). The first linear layer has no bias when a BatchNorm follows it
    (the norm's shift replaces it). ``batch_norm=False`` drops the norm (an ablation, and a head whose
    output does not depend on how the batch is split across ranks). ``last_bn=True`` ends the head as
    SimCLR's official code does: the last linear layer without bias, then :class:`ScaledBatchNorm1d`;
    with ``last_bn_affine`` that norm is an affine ``BatchNorm1d`` (scale and shift), as in lightly's
    ``SimCLRProjectionHead``.

    Paper: Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
    2020, arXiv:2006.07733, Sec. 3.3 ("Architecture").
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, batch_norm: bool = True,
                 last_bn: bool = False, last_bn_affine: bool = False):
        layers: list[nn.Module] = [
            nn.Linear(in_dim, hidden_dim, bias=not batch_norm),
            nn.BatchNorm1d(hidden_dim) if batch_norm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim, bias=not last_bn),
        ]
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim) if last_bn_affine else ScaledBatchNorm1d(out_dim))
        super().__init__(*layers)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim


class BYOL(nn.Module):
    """Online network (backbone f, projector g, predictor q), target network (f', g': an EMA copy
    of f and g, never trained by gradients), and an online linear probe on detached features.

    The module holds both networks so that one ``accelerator.prepare`` call shards or replicates
    them alike (DDP replicates; ZeRO-3 partitions every parameter, the target's included, the same
    way, so ``visrep.ssl.EMAUpdater`` can update the shards elementwise), and so the target weights
    travel with the model in every checkpoint. Target parameters have ``requires_grad=False``: no
    optimizer group, no DDP all-reduce. The predictor exists only in the online network.

    ``forward(v1, v2, y=None)`` returns a dict: ``p`` (online predictions of both views), ``z``
    (online projections), ``z_target`` (target projections, computed under ``no_grad``), ``features``
    (pooled online features of view 1) and ``logits`` (the probe on the detached features). The loss
    is computed by the caller (the recipe), where it stays visible.
    """

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, num_classes: int = 0, batch_norm: bool = True):
        super().__init__()
        width = int(backbone.num_features)
        self.backbone = backbone
        self.projector = MLPHead(width, proj_hidden_dim, proj_dim, batch_norm)
        self.predictor = MLPHead(proj_dim, pred_hidden_dim, proj_dim, batch_norm)
        self.target_backbone = copy.deepcopy(backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_parameters():
            p.requires_grad_(False)
        self.probe: Optional[nn.Linear] = nn.Linear(width, num_classes) if num_classes > 0 else None
        self.num_features = width

    # -- parameter views -------------------------------------------------------------------------
    def online_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the target tracks, in the same order as ``target_parameters``."""
        yield from self.backbone.parameters()
        yield from self.projector.parameters()

    def target_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.target_backbone.parameters()
        yield from self.target_projector.parameters()

    def ema_pairs(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        online, target = list(self.online_parameters()), list(self.target_parameters())
        if len(online) != len(target):  # pragma: no cover - deepcopy keeps the structure
            raise RuntimeError("online and target networks differ in structure")
        return online, target

    # -- forward ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled online features (the representation that is evaluated and exported)."""
        return self.backbone(x)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> dict:
        # The views go through separately, so BatchNorm statistics are per view as in the paper.
        f1, f2 = self.backbone(v1), self.backbone(v2)
        z1, z2 = self.projector(f1), self.projector(f2)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            t1 = self.target_projector(self.target_backbone(v1))
            t2 = self.target_projector(self.target_backbone(v2))
        out = {"p": (p1, p2), "z": (z1, z2), "z_target": (t1, t2), "features": f1}
        if self.probe is not None:
            out["logits"] = self.probe(f1.detach())
        return out


@dataclasses.dataclass
class BYOLConfig:
    """BYOL's heads and target momentum (paper: 4096 -> 256 heads, tau_base 0.996)."""

    proj_hidden_dim: int = 4096
    proj_dim: int = 256
    pred_hidden_dim: int = 4096
    head_batch_norm: bool = True
    base_tau: float = 0.996
    """Target momentum at step 0; it follows a cosine to final_tau at the last optimizer step."""
    final_tau: float = 1.0
    sync_batchnorm: bool = False
    """Convert BatchNorm to SyncBatchNorm when training on several GPUs (global batch statistics)."""

    def validate(self, prefix: str) -> None:
        for key in ("proj_hidden_dim", "proj_dim", "pred_hidden_dim"):
            check(getattr(self, key) >= 1, f"{prefix}{key}", getattr(self, key), "an integer >= 1")
        check(0 <= self.base_tau <= self.final_tau <= 1, f"{prefix}base_tau", self.base_tau,
              "a number with 0 <= base_tau <= final_tau <= 1")
