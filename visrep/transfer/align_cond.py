"""Alignment that looks at the classifier: CDAN (conditional adversarial, with entropy conditioning),
MCC (minimum class confusion) and MDD (margin disparity discrepancy).

Across ranks. CDAN's and MDD's losses are per-sample means, so per-rank means averaged by DDP equal the
global mean (equal per-rank batches, as ``paired_loader`` gives), like DANN's. Two pieces are batch
statistics and follow ``sync`` as MMD and CORAL do (see :mod:`visrep.transfer.align`):
CDAN+E's entropy weights are normalised to mean 1 over the batch -- with ``sync="gather"`` over the
batch of all ranks (the weights carry no gradient, so an all-gather of the unnormalised weights is
enough and the DDP-averaged gradient is exactly the single-process one); and MCC's class-confusion
matrix, which with ``sync="gather"`` is computed on the target logits gathered with gradient
(``all_gather_with_grad``) -- the same value on every rank, whose DDP-averaged gradient equals the
single-process gradient on the global batch. ``sync="local"``: per rank, averaged by DDP.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from visrep.engine.distributed import all_gather_no_grad, all_gather_with_grad
from visrep.transfer.align import _resolve_sync

RANDOMIZE_ABOVE = 4096
"""CDAN uses the randomized multilinear map when ``d_f * C`` exceeds this (Long et al. 2018, Sec. 3.1)."""


# ----------------------------------------------------------------------------------------------
# CDAN
# ----------------------------------------------------------------------------------------------
class MultiLinearMap(nn.Module):
    """CDAN's multilinear map ``T(f, g) = g (x) f``, the flattened outer product (``N x (C * d)``, row
    ``c * d + k`` = ``g_c f_k``) (Long et al. 2018, "Conditional Adversarial Domain Adaptation",
    arXiv:1705.10667, Sec. 3.1)."""

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.bmm(g.unsqueeze(2), f.unsqueeze(1)).flatten(1)


class RandomizedMultiLinearMap(nn.Module):
    """CDAN's randomized multilinear map ``T(f, g) = (R_f f) * (R_g g) / sqrt(d)`` (element-wise product),
    ``R_f`` and ``R_g`` drawn once from N(0, 1) and fixed, ``d`` the output dimension; its inner products
    approximate the multilinear map's in expectation (Long et al. 2018, arXiv:1705.10667, Sec. 3.1).
    The matrices are buffers: saved in checkpoints and exports, broadcast by DDP."""

    def __init__(self, features_dim: int, num_classes: int, output_dim: int = 1024,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        self.output_dim = output_dim
        self.register_buffer("Rf", torch.randn(features_dim, output_dim, generator=generator))
        self.register_buffer("Rg", torch.randn(num_classes, output_dim, generator=generator))

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return (f @ self.Rf.to(f.dtype)) * (g @ self.Rg.to(g.dtype)) / math.sqrt(self.output_dim)


def conditioning_map(features_dim: int, num_classes: int, kind: Literal["auto", "full", "randomized"] = "auto",
                     randomized_dim: int = 1024) -> tuple[nn.Module, int]:
    """(the map, its output width): ``full`` = :class:`MultiLinearMap`, ``randomized`` =
    :class:`RandomizedMultiLinearMap`, ``auto`` = randomized when ``features_dim * num_classes`` exceeds
    ``RANDOMIZE_ABOVE`` (4096), as the paper does."""
    if kind not in ("auto", "full", "randomized"):
        raise ValueError(f"kind must be 'auto', 'full' or 'randomized', got {kind!r}")
    if kind == "randomized" or (kind == "auto" and features_dim * num_classes > RANDOMIZE_ABOVE):
        return RandomizedMultiLinearMap(features_dim, num_classes, randomized_dim), randomized_dim
    return MultiLinearMap(), features_dim * num_classes


def prediction_entropy(p: torch.Tensor) -> torch.Tensor:
    """``H(p) = -sum_c p_c log p_c`` per row (``0 log 0 = 0``), in the dtype of ``p`` (fp32 or wider)."""
    return torch.special.entr(p.to(torch.promote_types(p.dtype, torch.float32))).sum(dim=1)


def entropy_weights(logits_s: torch.Tensor, logits_t: torch.Tensor, sync: Literal["gather", "local"] = "gather",
                    same_size: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """CDAN+E's example weights ``w_i = N (1 + exp(-H(g_i))) / sum_j (1 + exp(-H(g_j)))`` with ``g =
    softmax(logits)`` over the source and target rows together (``N`` of them), no gradient -- confident
    examples count more (Long et al. 2018, arXiv:1705.10667, Sec. 3.2, normalised to mean 1 as in
    Transfer-Learning-Library's ``ConditionalDomainAdversarialLoss``). With ``sync="gather"`` the sum
    and ``N`` are over all ranks' rows. Returns (source weights, target weights)."""
    with torch.no_grad():
        e = 1.0 + torch.exp(-prediction_entropy(F.softmax(torch.cat([logits_s, logits_t]).float(), dim=1)))
        pooled = all_gather_no_grad(e, same_size) if _resolve_sync(sync) else e
        w = e * (pooled.numel() / pooled.sum())
    return w[:logits_s.shape[0]], w[logits_s.shape[0]:]


# ----------------------------------------------------------------------------------------------
# MCC
# ----------------------------------------------------------------------------------------------
def mcc_loss(logits_t: torch.Tensor, temperature: float = 2.5) -> torch.Tensor:
    """Minimum class confusion on target logits ``Z`` (B x C) (Jin et al. 2020, "Minimum Class Confusion
    for Versatile Domain Adaptation", arXiv:1912.03699, Sec. 3):

        Y = softmax(Z / T);   H_i = -sum_j Y_ij log Y_ij;   W = diag(B (1 + exp(-H_i)) / sum_k (1 + exp(-H_k)))
        C = Y^T W Y;   C~_jj' = C_jj' / sum_j'' C_jj'';   L = (1/C) sum_j sum_{j' != j} C~_jj'

    The weights carry no gradient (as in the authors' code). Computed in fp32 or wider, autocast off."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    b, c = logits_t.shape
    dtype = torch.promote_types(logits_t.dtype, torch.float32)
    with torch.autocast(device_type=logits_t.device.type, enabled=False):
        y = F.softmax(logits_t.to(dtype) / temperature, dim=1)
        w = 1.0 + torch.exp(-prediction_entropy(y.detach()))
        w = b * w / w.sum()
        conf = (y * w[:, None]).T @ y
        conf = conf / conf.sum(dim=1, keepdim=True)
        return (conf.sum() - conf.trace()) / c


class MinimumClassConfusionLoss(nn.Module):
    """:func:`mcc_loss` as a module; ``sync='gather'`` computes it on the target logits gathered from all
    ranks (see the module docstring), ``'local'`` per rank; ``same_size`` as for
    :class:`~visrep.transfer.align.MultiKernelMMDLoss`."""

    def __init__(self, temperature: float = 2.5, sync: Literal["gather", "local"] = "gather",
                 same_size: bool = False):
        super().__init__()
        self.temperature, self.sync, self.same_size = temperature, sync, same_size

    def forward(self, logits_t: torch.Tensor) -> torch.Tensor:
        if _resolve_sync(self.sync):
            logits_t = all_gather_with_grad(logits_t, self.same_size)
        return mcc_loss(logits_t, self.temperature)


# ----------------------------------------------------------------------------------------------
# MDD
# ----------------------------------------------------------------------------------------------
def mdd_loss(y_s: torch.Tensor, y_s_adv: torch.Tensor, y_t: torch.Tensor, y_t_adv: torch.Tensor,
             margin: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """Minus the margin disparity discrepancy of the main head ``h`` (logits ``y``) and the adversarial
    head ``h'`` (logits ``y_adv``) (Zhang et al. 2019, "Bridging Theory and Algorithm for Domain
    Adaptation", arXiv:1904.05801, Sec. 5):

        D_gamma = gamma E_s[log sigma_{h(x)}(h'(x))] + E_t[log(1 - sigma_{h(x)}(h'(x)))],
        returned: -D_gamma = gamma E_s[CE(y_adv, argmax y)] - E_t[log(1 - softmax(y_adv)_{argmax y})]

    ``sigma`` the softmax, ``gamma`` the margin factor (``exp(rho)`` of the margin ``rho``). ``h'`` minimises
    this (maximises D); the features, behind a gradient reversal layer, maximise it; ``h`` gets no gradient
    from it (argmax). The log on the target is ``log(min(1, x + eps))`` as Transfer-Learning-Library's
    ``ClassificationMarginDisparityDiscrepancy`` (``shift_log``), finite when ``h'`` is certain. fp32 or wider."""
    dtype = torch.promote_types(y_s_adv.dtype, torch.float32)
    with torch.autocast(device_type=y_s_adv.device.type, enabled=False):
        source = F.cross_entropy(y_s_adv.to(dtype), y_s.argmax(dim=1))
        p_t = F.softmax(y_t_adv.to(dtype), dim=1).gather(1, y_t.argmax(dim=1, keepdim=True)).squeeze(1)
        target = torch.log(torch.clamp(1.0 - p_t + eps, max=1.0)).mean()
        return margin * source - target
