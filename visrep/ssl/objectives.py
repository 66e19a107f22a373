"""Objectives of four more self-supervised methods, correct over the global batch: SimCLR's NT-Xent,
MoCo v3's contrastive loss and its query / momentum-key pair, DINO's head, self-distillation loss, centre
and teacher-temperature schedule, VICReg and Barlow Twins.

Across ranks. Every loss here takes the features of this rank's *local* batch and, when a process group
with more than one rank is running, is computed over the *global* batch (all ranks' rows, in rank order)
with the gathers of :mod:`visrep.engine.distributed`; in one process the gathers are the identity. One
convention holds for all of them, whatever the per-rank row counts: let ``L`` be the loss one process
computes on the concatenated global batch and ``W`` the world size; then

* the gradient reaching a rank's local inputs is ``W * dL/dx_local``, and DDP's average of the parameter
  gradients over ranks (the sum divided by ``W``) is exactly ``dL/dtheta``;
* the value returned on a rank is a share of ``L`` whose mean over ranks is ``L``.

How each loss meets it:

* :func:`nt_xent_loss` and :func:`mocov3_loss` are sums of per-row terms. Each rank builds only its row
  block (its ``B_r`` rows against all ``N`` global columns) and returns ``(W / N) * sum`` of its rows'
  terms (the local mean when every rank holds ``N / W`` rows). NT-Xent gathers its columns with
  :func:`all_gather_with_grad`, whose backward hands every rank the sum over ranks of the gradient of its
  rows (a reduce-scatter), so a rank's features receive every rank's terms; MoCo v3's keys come from the
  momentum encoder and are gathered without gradient.
* :func:`vicreg_loss` and :func:`barlow_twins_loss` are functions of global batch statistics (means,
  standard deviations, covariance / cross-correlation). Each rank gathers both views with gradient and
  computes ``L`` itself, the same value on every rank; the reduce-scatter sums the ``W`` identical
  gradients, hence the factor ``W``. Their one costly statistic, ``sum_ij`` of a squared ``D x D``
  covariance / cross-correlation, is taken (when cheaper, ``gram=None``) through the ``N x N`` Gram
  matrices instead: each rank computes its own rows' block and the partial sums are added by
  :func:`visrep.engine.distributed.all_reduce_with_grad`, whose backward sums the ranks' gradients, so
  the convention holds. Otherwise every rank repeats the ``N x D x D`` product.
* :class:`DINOLoss` has no cross-sample term: its value is this rank's mean, so the convention holds
  with equal per-rank batches (as for ``byol_loss``). Its centre is a statistic of the global teacher
  batch: per-rank sums and counts are gathered (no gradient) and added, so every rank holds the same
  centre, the one of one process on the global batch, with any per-rank row counts.

``same_size=True`` promises that every rank holds the same number of rows (loaders that drop the last
incomplete batch): no row count is exchanged and nothing is read on the host. Without it the counts are
exchanged first (one small all-gather and one host read). Inputs in fp16 / bf16 are computed in fp32;
fp32 and fp64 inputs keep their precision. VICReg and Barlow Twins turn autocast off around their statistics.
"""
from __future__ import annotations

import copy
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from visrep.engine.distributed import (all_gather_no_grad, all_gather_with_grad, all_reduce_with_grad, dist_info,
                                      row_counts)
from visrep.ssl.heads import BYOL, MLPHead

Crops = Union[torch.Tensor, Sequence[torch.Tensor]]


# ----------------------------------------------------------------------------------------------
# Shared pieces: checks, precision, the global batch
# ----------------------------------------------------------------------------------------------
def _check_same(**tensors: torch.Tensor) -> None:
    """All ``(batch, dim)`` and of one shape, else a ValueError naming every shape."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1 or any(len(s) != 2 for s in shapes.values()):
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{listed}: expected (batch, dim) tensors of one shape")


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 when it is in a lower precision; fp32 and fp64 as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _global_rows(x: torch.Tensor, grad: bool, same_size: bool) -> tuple[torch.Tensor, int, int]:
    """``(rows of every rank in rank order, index of this rank's first row there, world size)``; with
    ``grad`` the gather's backward reduce-scatters (see the module docstring)."""
    rank, world = dist_info()
    if world == 1:
        return x, 0, 1
    gather = all_gather_with_grad if grad else all_gather_no_grad
    if same_size:
        return gather(x, same_size=True), rank * x.shape[0], world
    sizes = row_counts(x)
    return gather(x, same_size=len(set(sizes)) == 1), sum(sizes[:rank]), world


def _global_views(z1: torch.Tensor, z2: torch.Tensor, same_size: bool,
                  too_few: str) -> tuple[torch.Tensor, torch.Tensor, slice, int]:
    """Both views' rows of every rank (gathered with gradient, in one gather), this rank's rows among them
    and the world size, for the losses built on global batch statistics; ``too_few`` (", got N" appended)
    when the global batch has fewer than 2 rows."""
    _check_same(z1=z1, z2=z2)
    b, d = z1.shape
    both, off, world = _global_rows(torch.cat([_wide(z1), _wide(z2)], dim=1), grad=True, same_size=same_size)
    if both.shape[0] < 2:
        raise ValueError(f"{too_few}, got {both.shape[0]}")
    return both[:, :d], both[:, d:], slice(off, off + b), world


def _off_diagonal_sq(c: torch.Tensor) -> torch.Tensor:
    """``sum_{i != j} c_ij^2`` of a square matrix."""
    return c.pow(2).sum() - c.diagonal().pow(2).sum()


def _use_gram(gram: bool | None, n: int, d: int, world: int, products: int) -> bool:
    """Whether ``sum_ij (X^T Y)_ij^2`` is taken through the ``N x N`` Gram matrices (:func:`_gram_sq_sum`)
    rather than the ``D x D`` product: ``gram`` when given, else whichever does fewer multiply-adds per
    rank -- ``products`` row blocks of ``ceil(N / W) x N x D`` against one ``N x D x D`` product. Decided
    from global sizes, so every rank decides alike."""
    if gram is not None:
        return gram
    return products * -(-n // world) < d


def _gram_sq_sum(x: torch.Tensor, y: torch.Tensor, rows: slice) -> torch.Tensor:
    """``sum_ij (X^T Y)_ij^2`` of the global ``N x D`` rows ``x, y`` without the ``D x D`` matrix:
    ``||X^T Y||_F^2 = trace(X^T Y Y^T X) = sum_nm (X X^T)_nm (Y Y^T)_nm``. Each rank computes its own
    ``rows`` of the two Gram matrices (``B x N x D`` multiply-adds each) and the ranks' partial sums are
    added with :func:`all_reduce_with_grad`: the same value on every rank, the work shared out."""
    part = ((x[rows] @ x.t()) * (y[rows] @ y.t())).sum() if y is not x else (x[rows] @ x.t()).pow(2).sum()
    return all_reduce_with_grad(part)


# ----------------------------------------------------------------------------------------------
# SimCLR
# ----------------------------------------------------------------------------------------------
def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
                 same_size: bool = False) -> torch.Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy) of SimCLR over the ``2N`` views of the
    global batch: ``u`` the L2-normalised projections of both views (``z1`` rows then ``z2`` rows),
    ``p(k)`` the other view of the image of row ``k``::

        l_k = -log( exp(u_k . u_p(k) / t) / sum_{j != k} exp(u_k . u_j / t) )
        L   = 1/(2N) * sum_{k=1..2N} l_k

    (the paper's ``1/(2N) sum_k [l(2k-1, 2k) + l(2k, 2k-1)]``). ``z1, z2``: ``(B, D)`` projections of the
    two views of this rank's ``B`` images. Across ranks each rank computes the terms of its own ``2B``
    rows against the ``2N`` gathered columns (gathered with gradient) and returns ``(W / N) * 1/2 *
    sum`` of them: the local mean with equal per-rank batches (see the module docstring).

    Paper: Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
    Representations", 2020, arXiv:2002.05709, Sec. 2.1 (Eq. 1 and Algorithm 1).
    """
    _check_same(z1=z1, z2=z2)
    _check_positive("temperature", temperature)
    b, d = z1.shape
    local = F.normalize(_wide(torch.cat([z1, z2])), dim=1)  # 2B x D: view-1 rows, then view-2 rows
    views, off, world = _global_rows(torch.cat([local[:b], local[b:]], dim=1), grad=True, same_size=same_size)
    n = views.shape[0]
    columns = torch.cat([views[:, :d], views[:, d:]])  # 2N x D: all view-1 rows, then all view-2 rows
    logits = local @ columns.t() / temperature
    i = torch.arange(b, device=local.device)
    rows = torch.arange(2 * b, device=local.device)
    itself = torch.cat([off + i, n + off + i])
    positive = torch.cat([n + off + i, off + i])
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[rows, itself] = True
    logits = logits.masked_fill(mask, float("-inf"))
    terms = torch.logsumexp(logits, dim=1) - logits[rows, positive]
    return terms.sum() * (world / (2 * n))


# ----------------------------------------------------------------------------------------------
# MoCo v3
# ----------------------------------------------------------------------------------------------
def mocov3_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                temperature: float = 0.2, same_size: bool = False) -> torch.Tensor:
    """Symmetrised contrastive loss of MoCo v3: queries ``q`` (the online network's predictions) against
    keys ``k`` (the momentum encoder's projections, constants), both L2-normalised::

        ctr(q, k) = 2t * 1/N * sum_i -log( exp(q_i . k_i / t) / sum_{j=1..N} exp(q_i . k_j / t) )
        L         = ctr(q1, k2) + ctr(q2, k1)

    over the ``N`` keys of the global batch; the positive of local query ``i`` is the key at ``offset
    + i``, ``offset`` the number of rows on lower ranks (``rank * B`` with equal batches). The ``2t``
    factor is the official code's (it makes the gradient's scale independent of ``t``). ``q1, q2, k1,
    k2``: ``(B, D)``, views 1 and 2. Keys are gathered without gradient (and detached); each rank returns
    ``(W / N) * sum`` of its queries' terms (the local mean with equal batches, see the module docstring).

    Paper: Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", 2021,
    arXiv:2104.02057, Sec. 3 (Algorithm 1).
    """
    _check_same(q1=q1, q2=q2, k1=k1, k2=k2)
    _check_positive("temperature", temperature)
    d = q1.shape[1]
    with torch.no_grad():
        keys = torch.cat([F.normalize(_wide(k1), dim=1), F.normalize(_wide(k2), dim=1)], dim=1)
        keys, off, world = _global_rows(keys, grad=False, same_size=same_size)
    n = keys.shape[0]

    def ctr(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(_wide(q), dim=1) @ k.t() / temperature
        labels = torch.arange(q.shape[0], device=q.device) + off
        return F.cross_entropy(logits, labels, reduction="sum") * (2 * temperature * world / n)

    return ctr(q1, keys[:, d:]) + ctr(q2, keys[:, :d])


class MoCoV3MLP(MLPHead):
    """MoCo v3's projector / predictor: ``num_layers`` linear layers without bias, each but the last
    followed by BatchNorm1d and ReLU, and with ``last_bn`` a BatchNorm1d without affine parameters on
    the output (SimCLR's design, with the scale removed too; ``last_bn_affine`` keeps a scale and a shift,
    as lightly's ``MoCoProjectionHead`` does).

    An :class:`MLPHead` (``in_dim``, ``hidden_dim``, ``out_dim``) of another depth: BYOL's head is the
    2-layer case with a bias on the output layer and no output norm. The paper uses a 3-layer projector
    and a 2-layer predictor with output BN for ViTs (a 2-layer projector and a predictor without output
    BN for ResNets), hidden 4096, output 256.

    Paper: Chen, Xie, He 2021, arXiv:2104.02057, Sec. 4 ("MLP heads").
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256, num_layers: int = 2,
                 last_bn: bool = True, last_bn_affine: bool = False):
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        for i in range(num_layers):
            last = i == num_layers - 1
            layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
            if not last:
                layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            elif last_bn:
                layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
        nn.Sequential.__init__(self, *layers)  # MLPHead's own __init__ builds BYOL's fixed shape
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        self.num_layers, self.last_bn = num_layers, last_bn


class MoCoV3(BYOL):
    """MoCo v3's query and momentum encoders: the :class:`BYOL` pair (online backbone, projector and
    predictor; a target backbone and projector that are an EMA copy, never trained by gradients; an
    optional probe on detached features) with MoCo v3's heads (:class:`MoCoV3MLP`: a ``proj_layers``
    projector with output BN, a ``pred_layers`` predictor, with output BN when ``pred_last_bn``).

    Everything BYOL's recipe relies on carries over: ``online_parameters`` / ``target_parameters`` /
    ``ema_pairs`` for :class:`visrep.ssl.EMAUpdater` (MoCo v3: momentum 0.99 rising to 1 on a cosine,
    ``EMAUpdater(total_steps, base_tau=0.99)``), the ``predictor.`` prefix for the optimizer groups.
    ``forward(v1, v2)`` returns BYOL's dict plus ``q`` (the queries, ``= p``) and ``k`` (the keys,
    ``= z_target``, computed under ``no_grad``): ``mocov3_loss(*out["q"], *out["k"])``.

    Paper: Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers", 2021,
    arXiv:2104.02057, Sec. 3 and 4.
    """

    def __init__(self, backbone: nn.Module, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, num_classes: int = 0, proj_layers: int = 3, pred_layers: int = 2,
                 pred_last_bn: bool = True, last_bn_affine: bool = False):
        super().__init__(backbone, 1, 1, 1, num_classes=num_classes)  # BYOL's heads, replaced here
        self.projector = MoCoV3MLP(self.num_features, proj_hidden_dim, proj_dim, proj_layers, last_bn=True,
                                   last_bn_affine=last_bn_affine)
        self.predictor = MoCoV3MLP(proj_dim, pred_hidden_dim, proj_dim, pred_layers, last_bn=pred_last_bn,
                                   last_bn_affine=last_bn_affine)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self.target_projector.parameters():
            p.requires_grad_(False)

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> dict:
        out = super().forward(v1, v2)
        out["q"], out["k"] = out["p"], out["z_target"]
        return out


# ----------------------------------------------------------------------------------------------
# DINO
# ----------------------------------------------------------------------------------------------
class _WeightNormLinear(nn.Module):
    """``y = x W^T`` with ``W = g * V / ||V||`` row-wise (weight normalisation, Salimans & Kingma 2016,
    arXiv:1602.07868), parameters named as ``torch.nn.utils.weight_norm`` names them (``weight_g``,
    ``weight_v``: official DINO checkpoints load as they are). Written out rather than parametrised so
    that it deep-copies (the teacher) and partitions (ZeRO-3) as plain parameters."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight_v = nn.Parameter(nn.Linear(in_dim, out_dim, bias=False).weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """DINO's projection head: an MLP of ``n_layers`` linear layers (GELU between them; BatchNorm1d
    too with ``use_bn``) down to a ``bottleneck_dim`` code, L2-normalised, then a weight-normalised
    linear layer without bias to ``out_dim`` logits::

        h = MLP(x);   y = W (h / ||h||),   W = g * V / ||V||  (row-wise)

    With ``norm_last_layer`` (the paper's default) ``g`` is fixed at 1 (not trained), so every row of
    ``W`` has unit norm. The paper: hidden 2048, bottleneck 256, ``out_dim`` 65536; hidden layers in
    truncated normal initialisation (std 0.02), biases zero. Small sizes suit CPU runs.

    Paper: Caron, Touvron, Misra, Jegou, Mairal, Bojanowski, Joulin, "Emerging Properties in
    Self-Supervised Vision Transformers", 2021, arXiv:2104.14294, Sec. 3.1 and Appendix.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 n_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < n_layers - 1:
                layers += ([nn.BatchNorm1d(dims[i + 1])] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = _WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad_(False)
        self.in_dim, self.out_dim, self.bottleneck_dim = in_dim, out_dim, bottleneck_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def teacher_temp_schedule(step: int, warmup_steps: int, warmup_teacher_temp: float = 0.04,
                          teacher_temp: float = 0.07) -> float:
    """DINO's teacher temperature at optimizer step ``step``: linear from ``warmup_teacher_temp`` at
    step 0 to ``teacher_temp`` at ``warmup_steps``, constant after::

        t_k = warmup + (final - warmup) * min(k, K) / K        (t_k = final when K = 0)

    A pure function of the optimizer-step count the stage keeps (and checkpoints), so accumulation and
    resumes do not change it. The paper warms 0.04 -> 0.07 over the first 30 epochs (the official
    code's defaults are 0.04 -> 0.04; its per-epoch table reaches ``final`` one epoch before ``K``).

    Paper: Caron et al. 2021, arXiv:2104.14294, Sec. 3.1 and Appendix.
    """
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"step and warmup_steps must be >= 0, got step={step}, warmup_steps={warmup_steps}")
    _check_positive("warmup_teacher_temp", warmup_teacher_temp)
    _check_positive("teacher_temp", teacher_temp)
    if warmup_steps == 0 or step >= warmup_steps:
        return float(teacher_temp)
    return float(warmup_teacher_temp + (teacher_temp - warmup_teacher_temp) * step / warmup_steps)


class DINOLoss(nn.Module):
    """DINO's self-distillation loss with a centred, sharpened teacher::

        P_t(x) = softmax((g_t(x) - c) / t_t),   log P_s(x) = log_softmax(g_s(x) / t_s)
        L = 1/|pairs| * sum_{(iq, v): v != iq} 1/B * sum_b  -P_t(x_iq)_b . log P_s(x_v)_b

    over the teacher's ``n_global_crops`` global crops ``iq`` and every student crop ``v`` (the global
    crops first, in the teacher's order, then the local crops) but the same view. The teacher's
    probabilities are constants (stop-gradient).

    ``forward(student_out, teacher_out, teacher_temp)``: ``student_out`` a list of per-crop ``(B, K)``
    logits or their ``(n_crops * B, K)`` concatenation (crop-major, as ``torch.cat`` of the list);
    ``teacher_out`` the same for the global crops only; ``teacher_temp`` from
    :func:`teacher_temp_schedule`. ``forward`` does not touch the centre: call
    :meth:`update_center` with the teacher's output after the loss, at every iteration as the paper does.

    ``center`` is a buffer (saved in ``state_dict``, so a resumed run continues it exactly). Across
    ranks: the loss is this rank's mean (DDP's average gives the global mean's gradient with equal
    per-rank batches); the centre is updated from the global teacher batch (see the module docstring).

    Paper: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", 2021,
    arXiv:2104.14294, Sec. 3.1 (Eq. 3-4, Algorithm 1): ``t_s = 0.1``, centre momentum 0.9.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9,
                 n_global_crops: int = 2):
        super().__init__()
        _check_positive("student_temp", student_temp)
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must lie in [0, 1], got {center_momentum!r}")
        if n_global_crops < 1:
            raise ValueError(f"n_global_crops must be >= 1, got {n_global_crops}")
        self.out_dim, self.student_temp = int(out_dim), float(student_temp)
        self.center_momentum, self.n_global_crops = float(center_momentum), int(n_global_crops)
        self.register_buffer("center", torch.zeros(1, self.out_dim))

    def _crops(self, out: Crops, name: str, batch: int | None = None) -> list[torch.Tensor]:
        """The per-crop ``(B, out_dim)`` logits of ``out`` (a list, or their concatenation): the teacher's
        ``n_global_crops`` crops (``batch`` None), or the student's crops of ``batch`` rows each."""
        if isinstance(out, torch.Tensor):
            rows = out.shape[0] if out.ndim == 2 else 0
            n = self.n_global_crops if batch is None else (rows // batch if batch and rows % batch == 0 else 0)
            if out.ndim != 2 or n < 1 or rows % n or out.shape[1] != self.out_dim:
                per_crop = f"{self.n_global_crops} crops" if batch is None else f"crops of {batch} rows"
                raise ValueError(f"{name} {tuple(out.shape)}: expected (n_crops * batch, {self.out_dim}) "
                                 f"logits, {per_crop}")
            out = out.chunk(n)
        crops = list(out)
        shapes = [tuple(c.shape) for c in crops]
        b = batch if batch is not None else (shapes[0][0] if shapes and shapes[0] else 0)
        if (not crops or b < 1 or any(s != (b, self.out_dim) for s in shapes)
                or (batch is None and len(crops) != self.n_global_crops)):
            count = self.n_global_crops if batch is None else "n_crops"
            raise ValueError(f"{name}: crops of shapes {shapes}; expected {count} crops of shape "
                             f"({b or 'batch'}, {self.out_dim})")
        return crops

    def forward(self, student_out: Crops, teacher_out: Crops, teacher_temp: float) -> torch.Tensor:
        _check_positive("teacher_temp", teacher_temp)
        teacher = self._crops(teacher_out, "teacher_out")
        student = self._crops(student_out, "student_out", batch=teacher[0].shape[0])
        if len(student) < max(len(teacher), 2):
            raise ValueError(f"student_out has {len(student)} crops: expected at least 2 and no fewer than the "
                             f"teacher's {len(teacher)} global crops (the student sees the global crops too)")
        center = self.center
        with torch.no_grad():
            targets = [F.softmax((_wide(t.detach()) - center) / teacher_temp, dim=-1) for t in teacher]
        log_probs = [F.log_softmax(_wide(s) / self.student_temp, dim=-1) for s in student]
        total, terms = 0.0, 0
        for iq, q in enumerate(targets):
            for v, log_p in enumerate(log_probs):
                if v != iq:
                    total = total + (-q * log_p).sum(dim=-1).mean()
                    terms += 1
        return total / terms

    @torch.no_grad()
    def update_center(self, teacher_out: Crops) -> None:
        """``c <- m c + (1 - m) mean(teacher_out)``, the mean over the rows of every rank (per-rank sums
        and row counts gathered and added; any per-rank row counts). A collective: call on every rank."""
        t = teacher_out if isinstance(teacher_out, torch.Tensor) else torch.cat(list(teacher_out))
        if t.ndim != 2 or t.shape[1] != self.out_dim:
            raise ValueError(f"teacher_out {tuple(t.shape)}: expected (rows, {self.out_dim})")
        t = t.detach().to(self.center.dtype)
        stats = torch.cat([t.sum(dim=0), t.new_full((1,), t.shape[0])])
        if dist_info()[1] > 1:
            stats = all_gather_no_grad(stats[None], same_size=True).sum(dim=0)
        mean = stats[:-1] / stats[-1]
        self.center.mul_(self.center_momentum).add_(mean[None], alpha=1.0 - self.center_momentum)


# ----------------------------------------------------------------------------------------------
# VICReg
# ----------------------------------------------------------------------------------------------
def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4, same_size: bool = False,
                gram: bool | None = None) -> dict:
    """VICReg: variance-invariance-covariance regularisation of the two views' embeddings ``Z, Z'``
    (``N x D`` over the global batch)::

        s(Z, Z') = 1/(N D) * sum_{n,j} (z_nj - z'_nj)^2                          invariance (MSE)
        v(Z)     = 1/D * sum_j max(0, 1 - sqrt(Var(z_j) + eps))                    variance hinge
        c(Z)     = 1/D * sum_{i != j} C(Z)_ij^2,  C(Z) = 1/(N-1) sum_n (z_n - zbar)(z_n - zbar)^T
        L        = sim_coeff * s  +  std_coeff * (v(Z) + v(Z')) / 2  +  cov_coeff * (c(Z) + c(Z'))

    ``Var`` is the unbiased variance over the batch. The variance term averages the two branches as the
    official code does (the paper's Eq. 6 sums them; with its coefficients 25 / 25 / 1 the code's form
    is the one trained). Both views are gathered with gradient and every rank computes ``L`` on the
    global batch (the same value everywhere; see the module docstring); ``N >= 2``.

    ``gram``: the covariance term's ``sum_{i,j} C_ij^2`` through the ``N x N`` Gram matrix of the centred
    rows (``||Zc^T Zc||_F = ||Zc Zc^T||_F``) minus the diagonal ``Var(z_j)^2``: ``ceil(N / W) x N x D``
    multiply-adds per rank, each rank its own rows, against ``N x D x D`` for ``C`` (the paper's ``D =
    8192`` with ``N = 2048`` over 8 ranks: 32x fewer), and no ``D x D`` matrix in memory. The same value to
    rounding. ``None`` (default): whichever does fewer multiply-adds.

    Returns ``{"loss": L, "invariance": s, "variance": (v(Z) + v(Z')) / 2, "covariance": c(Z) + c(Z')}``,
    the three terms unweighted and detached (for logging); ``loss`` carries the gradient.

    Paper: Bardes, Ponce, LeCun, "VICReg: Variance-Invariance-Covariance Regularization for
    Self-Supervised Learning", 2022 (ICLR), arXiv:2105.04906, Sec. 3.1-3.2.
    """
    x, y, rows, world = _global_views(z1, z2, same_size, "VICReg needs at least 2 rows in the global batch for a "
                                                          "variance")
    n, d = x.shape
    by_gram = _use_gram(gram, n, d, world, products=1)
    # fp32 statistics under a caller's autocast too: the Gram path subtracts the diagonal from the whole sum
    with torch.autocast(device_type=x.device.type, enabled=False):
        invariance = F.mse_loss(x, y)
        x, y = x - x.mean(dim=0), y - y.mean(dim=0)
        variance = covariance = 0.0
        for z in (x, y):
            var = z.pow(2).sum(dim=0) / (n - 1)
            variance = variance + F.relu(1.0 - torch.sqrt(var + eps)).mean() / 2
            if by_gram:
                covariance = covariance + (_gram_sq_sum(z, z, rows) / (n - 1) ** 2 - var.pow(2).sum()) / d
            else:
                covariance = covariance + _off_diagonal_sq(z.t() @ z / (n - 1)) / d
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    return {"loss": loss, "invariance": invariance.detach(), "variance": variance.detach(),
            "covariance": covariance.detach()}


# ----------------------------------------------------------------------------------------------
# Barlow Twins
# ----------------------------------------------------------------------------------------------
def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float = 5e-3, eps: float = 1e-5,
                      same_size: bool = False, gram: bool | None = None) -> torch.Tensor:
    """Barlow Twins: the cross-correlation of the two views' standardised embeddings is driven to the
    identity. Over the ``N`` rows of the global batch, per dimension ``i``::

        zn_i = (z_i - mean(z_i)) / sqrt(Var_b(z_i) + eps)        (BatchNorm without affine parameters)
        C_ij = 1/N * sum_n zn1_ni zn2_nj
        L    = sum_i (1 - C_ii)^2  +  lambd * sum_{i != j} C_ij^2

    ``Var_b`` is the biased variance (BatchNorm's, ``eps`` its default 1e-5), as the official code's
    ``BatchNorm1d(affine=False)`` -- with ``eps = 0``, ``C`` is the paper's cosine form (Eq. 2). Both
    views are gathered with gradient and every rank computes ``L`` on the global batch (the same value
    everywhere; see the module docstring). The paper's ``lambd``: 5e-3.

    ``gram``: ``sum_{i != j} C_ij^2`` as ``||C||_F^2 - sum_i C_ii^2`` with ``||zn1^T zn2||_F^2 = sum_nm
    (zn1 zn1^T)_nm (zn2 zn2^T)_nm`` (the ``N x N`` Gram matrices; each rank its own rows) and ``C_ii``
    from the rows directly: ``2 x ceil(N / W) x N x D`` multiply-adds per rank against ``N x D x D``, and no
    ``D x D`` matrix (the paper's ``D = 8192``, ``N = 2048`` over 8 ranks: 16x fewer). The same value to
    rounding. ``None`` (default): whichever does fewer multiply-adds.

    Paper: Zbontar, Jing, Misra, LeCun, Deny, "Barlow Twins: Self-Supervised Learning via Redundancy
    Reduction", 2021, arXiv:2103.03230, Sec. 2 (Eq. 1-2, Algorithm 1).
    """
    x, y, rows, world = _global_views(z1, z2, same_size, "Barlow Twins needs at least 2 rows in the global batch to "
                                                          "standardise")
    n, d = x.shape
    with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 statistics, as in vicreg_loss
        x, y = ((z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps) for z in (x, y))
        if _use_gram(gram, n, d, world, products=2):
            diag = (x * y).sum(dim=0) / n
            return (1.0 - diag).pow(2).sum() + lambd * (_gram_sq_sum(x, y, rows) / n ** 2 - diag.pow(2).sum())
        c = x.t() @ y / n
        return (1.0 - c.diagonal()).pow(2).sum() + lambd * _off_diagonal_sq(c)
