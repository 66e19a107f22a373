"""Domain alignment: DANN (gradient reversal + domain discriminator), multi-kernel MMD, Deep CORAL.
CDAN, MCC and MDD, which also look at the classifier, are in :mod:`visrep.transfer.align_cond`.

Across ranks. MMD and CORAL are statistics of the whole batch, so a per-rank value is a different
(noisier) estimator than the single-process one. With ``sync="gather"`` (the default when torch
distributed is initialised) each rank all-gathers the source and the target features with an
autograd-aware gather (``visrep.engine.distributed.all_gather_with_grad``: all-gather forward,
reduce-scatter backward),
computes the loss on the global batch -- the same value on every rank -- and DDP's gradient average
then yields exactly the gradient of the single-process loss on the concatenated global batch (each
rank's local features receive the sum over ranks of the identical per-rank gradients, i.e. ``world``
times theirs, and DDP divides by ``world``). ``sync="local"`` computes the loss per rank on the local
batch and relies on DDP's average (the mean of per-rank estimates). DANN's domain loss is a per-sample
mean, so per-rank means averaged by DDP already equal the global mean (equal per-rank batches); its
discriminator's BatchNorm uses per-rank statistics.
"""
from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from visrep.engine.distributed import all_gather_with_grad, is_distributed


def _resolve_sync(sync: str) -> bool:
    if sync not in ("gather", "local"):
        raise ValueError(f"sync must be 'gather' or 'local', got {sync!r}")
    return sync == "gather" and is_distributed()


def _synced(source: torch.Tensor, target: torch.Tensor, sync: str, same_size: bool):
    """Both domains' features, gathered from every rank with ``sync='gather'`` (see the module docstring)."""
    if _resolve_sync(sync):
        return all_gather_with_grad(source, same_size), all_gather_with_grad(target, same_size)
    return source, target


# ----------------------------------------------------------------------------------------------
# DANN
# ----------------------------------------------------------------------------------------------
class _GradientReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coeff: float) -> torch.Tensor:
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.neg() * ctx.coeff, None


def grad_reverse(x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by ``-coeff``."""
    return _GradientReverse.apply(x, float(coeff))


class GradientReverseLayer(nn.Module):
    """Gradient reversal layer (Ganin & Lempitsky 2015, "Unsupervised Domain Adaptation by
    Backpropagation", arXiv:1409.7495): ``R(x) = x`` forward, ``dR/dx = -lambda I`` backward, so the
    feature extractor is trained to *maximise* the domain classifier's loss that the classifier
    itself minimises."""

    def forward(self, x: torch.Tensor, coeff: float = 1.0) -> torch.Tensor:
        return grad_reverse(x, coeff)


def dann_lambda(progress: float, gamma: float = 10.0, max_value: float = 1.0) -> float:
    """``lambda_p = max_value * (2 / (1 + exp(-gamma p)) - 1)`` for training progress ``p`` in [0, 1]
    (Ganin & Lempitsky 2015, Sec. 5.2.2, arXiv:1409.7495): 0 at the start, -> 1 at the end, which
    keeps the noisy early discriminator from disturbing the features."""
    p = min(max(float(progress), 0.0), 1.0)
    return max_value * (2.0 / (1.0 + math.exp(-gamma * p)) - 1.0)


class GRLSchedule:
    """The GRL coefficient as a function of progress ``p = step / total_steps``, counted in OPTIMIZER
    steps (call ``step()`` once per optimizer step, not per micro-batch). ``state_dict`` /
    ``load_state_dict`` carry the count through checkpoints (``Stage(extra_state=...)``)."""

    def __init__(self, total_steps: int, gamma: float = 10.0, max_value: float = 1.0):
        self.total_steps = max(1, int(total_steps))
        self.gamma, self.max_value = gamma, max_value
        self.num_steps = 0

    @property
    def progress(self) -> float:
        return min(1.0, self.num_steps / self.total_steps)

    @property
    def value(self) -> float:
        return dann_lambda(self.progress, self.gamma, self.max_value)

    def step(self) -> None:
        self.num_steps += 1

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        if int(state["total_steps"]) != self.total_steps:
            raise ValueError(f"GRL schedule in the checkpoint spans {state['total_steps']} optimizer steps, this "
                             f"run {self.total_steps}; resume with the same epochs, batch size and processes.")
        self.num_steps = int(state["num_steps"])


class DomainDiscriminator(nn.Sequential):
    """Domain classifier of DANN: ``in -> hidden -> hidden -> 1`` with BatchNorm and ReLU, one logit
    (source = 1, target = 0). The layout of Transfer-Learning-Library's ``DomainDiscriminator``."""

    def __init__(self, in_features: int, hidden: int = 256, batch_norm: bool = True):
        def block(i, o):
            return [nn.Linear(i, o), nn.BatchNorm1d(o) if batch_norm else nn.Identity(), nn.ReLU(inplace=True)]

        super().__init__(*block(in_features, hidden), *block(hidden, hidden), nn.Linear(hidden, 1))


def domain_adversarial_loss(domain_logits_s: torch.Tensor, domain_logits_t: torch.Tensor,
                            weights: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """DANN's domain loss ``0.5 * (BCE(d_s, 1) + BCE(d_t, 0))`` (Ganin & Lempitsky 2015,
    arXiv:1409.7495), each a per-sample mean, computed in fp32; and the discriminator's accuracy.
    The logits must come through the gradient reversal layer. With ``weights = (w_s, w_t)`` each
    sample's BCE is multiplied by its weight before the means -- CDAN+E's entropy conditioning
    (``visrep.transfer.align_cond.entropy_weights``); with equal batch sizes this is the weighted mean
    over both domains of Transfer-Learning-Library's ``ConditionalDomainAdversarialLoss``."""
    ds, dt = domain_logits_s.float().reshape(-1), domain_logits_t.float().reshape(-1)
    ws, wt = (None, None) if weights is None else (w.float().reshape(-1) for w in weights)
    loss = 0.5 * (F.binary_cross_entropy_with_logits(ds, torch.ones_like(ds), weight=ws)
                  + F.binary_cross_entropy_with_logits(dt, torch.zeros_like(dt), weight=wt))
    with torch.no_grad():
        acc = torch.cat([(ds > 0).float(), (dt <= 0).float()]).mean()
    return loss, acc


# ----------------------------------------------------------------------------------------------
# MMD
# ----------------------------------------------------------------------------------------------
def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return m.flatten()[1:].view(n - 1, n + 1)[:, :-1].flatten()


@torch.no_grad()
def bandwidth_heuristic(sq_dists: torch.Tensor, kind: Literal["median", "mean"] = "median") -> torch.Tensor:
    """Median (or mean) of the off-diagonal squared pairwise distances of the pooled sample, with no
    gradient (Gretton et al. 2012, arXiv:0805.2368, Sec. 8)."""
    off = _off_diagonal(sq_dists.detach())
    h = off.median() if kind == "median" else off.mean()
    return h.clamp_min(torch.finfo(off.dtype).eps)


def mk_mmd(source: torch.Tensor, target: torch.Tensor, multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
           heuristic: Literal["median", "mean"] = "median", return_bandwidth: bool = False):
    """Unbiased multi-kernel MMD^2 between samples ``source`` (m, d) and ``target`` (n, d), m != n allowed:

        MMD_u^2 = 1/(m(m-1)) sum_{i!=j} k(s_i, s_j) + 1/(n(n-1)) sum_{i!=j} k(t_i, t_j)
                  - 2/(mn) sum_{i,j} k(s_i, t_j)

    with ``k = (1/K) sum_u exp(-||a - b||^2 / (c_u h))``, ``c_u`` in ``multipliers`` and ``h`` the
    median (or mean) squared distance of the pooled sample, computed without gradient. The unbiased
    estimator of Gretton et al. 2012 ("A Kernel Two-Sample Test", arXiv:0805.2368, eq. 3) with the
    equally weighted Gaussian family of DAN (Long et al. 2015, "Learning Transferable Features with
    Deep Adaptation Networks", arXiv:1502.02791). Distances with ``torch.cdist``; fp32 or wider.
    Its expectation is 0 when the two distributions are equal; single draws can be slightly negative."""
    m, n = source.shape[0], target.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"the unbiased MMD needs at least 2 samples per domain, got {m} and {n}")
    dtype = torch.promote_types(source.dtype, torch.float32)
    with torch.autocast(device_type=source.device.type, enabled=False):
        z = torch.cat([source.to(dtype), target.to(dtype)]).flatten(1)
        d2 = torch.cdist(z, z, compute_mode="donot_use_mm_for_euclid_dist").pow(2)
        h = bandwidth_heuristic(d2, heuristic)
        k = sum(torch.exp(-d2 / (c * h)) for c in multipliers) / len(multipliers)
        kss, ktt, kst = k[:m, :m], k[m:, m:], k[:m, m:]
        mmd = ((kss.sum() - kss.diagonal().sum()) / (m * (m - 1))
               + (ktt.sum() - ktt.diagonal().sum()) / (n * (n - 1))
               - 2.0 * kst.sum() / (m * n))
    return (mmd, h) if return_bandwidth else mmd


class MultiKernelMMDLoss(nn.Module):
    """``mk_mmd`` as a module; ``sync='gather'`` computes it on the batch gathered from all ranks
    (see the module docstring), ``'local'`` per rank. ``same_size``: every rank holds as many source
    (and as many target) rows -- loaders that drop the last incomplete batch -- so no row count is
    exchanged and nothing is read on the host; otherwise the counts are exchanged per call."""

    def __init__(self, multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
                 heuristic: Literal["median", "mean"] = "median", sync: Literal["gather", "local"] = "gather",
                 same_size: bool = False):
        super().__init__()
        self.multipliers, self.heuristic, self.sync = tuple(multipliers), heuristic, sync
        self.same_size = same_size

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return mk_mmd(*_synced(source, target, self.sync, self.same_size), self.multipliers, self.heuristic)


# ----------------------------------------------------------------------------------------------
# CORAL
# ----------------------------------------------------------------------------------------------
def covariance(x: torch.Tensor) -> torch.Tensor:
    """Centred (unbiased, ``n - 1``) covariance of the rows of ``x`` (n, d)."""
    xc = x - x.mean(dim=0, keepdim=True)
    return xc.T @ xc / (x.shape[0] - 1)


def coral(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Deep CORAL loss ``||C_s - C_t||_F^2 / (4 d^2)`` with ``C`` the centred feature covariances,
    computed in fp32 (or wider) with autocast off (Sun & Saenko 2016, "Deep CORAL: Correlation
    Alignment for Deep Domain Adaptation", arXiv:1607.01719, eq. 1-3). Batch sizes may differ."""
    if source.shape[0] < 2 or target.shape[0] < 2:
        raise ValueError("CORAL needs at least 2 samples per domain")
    d = source.shape[1]
    dtype = torch.promote_types(source.dtype, torch.float32)
    with torch.autocast(device_type=source.device.type, enabled=False):
        diff = covariance(source.to(dtype)) - covariance(target.to(dtype))
        return (diff * diff).sum() / (4.0 * d * d)


class CoralLoss(nn.Module):
    """``coral`` as a module; ``sync`` as for ``MultiKernelMMDLoss``."""

    def __init__(self, sync: Literal["gather", "local"] = "gather", same_size: bool = False):
        super().__init__()
        self.sync, self.same_size = sync, same_size

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return coral(*_synced(source, target, self.sync, self.same_size))
