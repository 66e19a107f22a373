"""Image-text contrastive losses, correct across ranks.

Every loss here takes L2-normalised image and text features of the *local* batch (``B`` rows on
this rank) and the logit scale ``s`` (already exponentiated, as ``ClipModel.forward`` returns it).

Across ranks: the texts of all ranks are gathered, and each rank computes the loss of its own ``B``
rows (images against all ``W * B`` texts) and its own ``B`` columns (texts against all images), the
positives sitting at ``rank * B + i``. For InfoNCE a rank only ever builds its *row block* of the
global logit matrix: the column log-sum-exps it needs are combined across ranks from per-column
partial statistics (:class:`_InfoNCERowBlock`). The other losses gather with
:func:`all_gather_with_grad` (an autograd-aware all-gather whose backward reduce-scatters the
incoming gradient, so a rank's features receive the gradient of *every* rank's loss terms). Each
rank's loss is a mean over its own rows; data-parallel gradient averaging (DDP divides the sum by
``W``) then yields exactly the gradient of the mean over all ``W * B`` rows: 2 ranks with local
batch ``B`` train like 1 rank with batch ``2B`` (``tests/test_clip_distributed.py`` checks it).
``accelerator.gather`` carries no gradient and would silently drop every cross-rank term of the
gradient; it must not be used here.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from visrep.distill import soft_target_kd_loss
from visrep.engine.distributed import (all_gather_no_grad, all_gather_with_grad, clamp_parameter_, dist_info, gather_rows,
                                       reduce_scatter_rows)

MAX_LOGIT_SCALE = math.log(100.0)
INIT_LOGIT_SCALE = math.log(1.0 / 0.07)


# ----------------------------------------------------------------------------------------------
# InfoNCE (CLIP)
# ----------------------------------------------------------------------------------------------
class _InfoNCERowBlock(torch.autograd.Function):
    """Symmetric InfoNCE across ranks from this rank's *row block* of the global logit matrix only.

    The global matrix is ``L = s * X Y^T`` (``N x N``, ``N = W B``). Rank ``r`` computes its rows
    ``L_r = s * X_r Y^T`` (``B x N``: local images against the gathered texts), which give the
    image->text terms of its rows directly. The text->image terms of its columns need, per column,
    a log-sum-exp over *all* rows: every rank reduces its block to a per-column (max, sum of exp)
    pair and two all-reduces of ``N`` numbers combine them. So only the texts are gathered, the
    forward is one ``B x N x D`` product and the backward two (against two and four when each rank
    builds both an image->text and a text->image block), and one ``B x N`` gradient matrix
    ``softmax_rows(L_r) + exp(L_r - lse_cols) - 2 * onehot`` is saved.

    The loss value is this rank's mean over its own ``B`` rows and ``B`` columns (open_clip's
    ``local_loss``); the gradients are scaled so that DDP's average over ranks is the gradient of
    the mean over all ``N`` rows and columns. Image gradients are complete locally; the gathered
    texts' gradient is summed over ranks and scattered back (reduce-scatter). On one rank (or with
    ``gather=False``: each rank's own batch only) the block is the whole ``B x B`` matrix."""

    @staticmethod
    def forward(ctx, img, txt, scale, gather: bool = True):
        rank, world = dist_info() if gather else (0, 1)
        b = img.shape[0]
        all_txt = gather_rows(txt) if world > 1 else txt
        logits = torch.mm(img, all_txt.t()).mul_(scale)  # B x N
        lse_r = torch.logsumexp(logits, dim=1)
        col_max = logits.amax(dim=0)
        if world > 1:
            dist.all_reduce(col_max, op=dist.ReduceOp.MAX)
        grad = logits - col_max  # becomes exp(L - lse_cols), then the whole gradient matrix
        grad.exp_()
        col_sum = grad.sum(dim=0)
        if world > 1:
            dist.all_reduce(col_sum)
        lse_c = col_max + col_sum.log()
        grad.div_(col_sum)
        row_soft = logits - lse_r[:, None]
        grad.add_(row_soft.exp_())
        del row_soft
        cols = torch.arange(b, device=img.device) + rank * b
        block = grad[:, rank * b:(rank + 1) * b]
        block.diagonal().sub_(2.0)
        pos = logits[torch.arange(b, device=img.device), cols]
        loss = 0.5 * ((lse_r - pos).mean() + (lse_c[cols] - pos).mean())
        dscale = torch.vdot(grad.view(-1), logits.view(-1)) / scale
        del logits
        ctx.world = world
        ctx.save_for_backward(img, all_txt, grad, dscale, scale)
        return loss

    @staticmethod
    def backward(ctx, g):
        img, all_txt, grad, dscale, scale = ctx.saved_tensors
        coef = g / (2 * img.shape[0])
        gm = grad * (coef * scale)
        g_txt = torch.mm(gm.t(), img)
        g_txt = reduce_scatter_rows(g_txt) if ctx.world > 1 else g_txt
        return torch.mm(gm, all_txt), g_txt, coef * dscale, None


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              gather: bool = True) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP: Radford et al., "Learning Transferable Visual Models From Natural
    Language Supervision" (2021, arXiv:2103.00020); the loss of van den Oord et al., "Representation
    Learning with Contrastive Predictive Coding" (2018, arXiv:1807.03748)::

        l_ij = s * <x_i, y_j>                      x, y: L2-normalised image / text features
        L    = 1/2 * [ mean_i -log softmax_j(l_ij)[i]  +  mean_i -log softmax_j(l_ji)[i] ]

    over this rank's ``B`` rows against the ``N = W * B`` features of all ranks (positive of local
    row ``i`` at column ``rank * B + i``; see the module docstring). Computed in fp32 with a fused
    backward that stores one ``B x N`` matrix (see :class:`_InfoNCERowBlock`).
    ``logit_scale`` is ``s`` itself (``exp`` of the learned log-scale), a tensor with a gradient.
    """
    if image_features.shape != text_features.shape or image_features.ndim != 2:
        raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                         f"{tuple(text_features.shape)} must both be (batch, dim).")
    img, txt = image_features.float(), text_features.float()
    scale = torch.as_tensor(logit_scale, device=img.device).float()
    if scale.numel() != 1:
        raise ValueError(f"logit_scale must hold one value, got shape {tuple(scale.shape)}")
    scale = scale.reshape(())
    return _InfoNCERowBlock.apply(img, txt, scale, gather)


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Pairwise sigmoid loss of SigLIP: Zhai et al., "Sigmoid Loss for Language Image Pre-Training"
    (2023, arXiv:2303.15343)::

        z_ij = +1 if (i, j) is a pair else -1
        L    = -1/B * sum_i sum_j log sigmoid( z_ij * (s * <x_i, y_j> + b) )

    ``B`` local rows against the texts of all ranks (gathered with gradient), so the global loss
    after gradient averaging is ``-1/(W B) * sum over all (W B)^2 pairs``, the same as one rank with
    the whole batch. The paper initialises ``log s = log 10`` and ``b = -10``.
    """
    img, txt = image_features.float(), text_features.float()
    rank, world = dist_info()
    all_txt = all_gather_with_grad(txt, same_size=True) if gather and world > 1 else txt
    b = img.shape[0]
    logits = torch.mm(img, all_txt.t()) * logit_scale.float() + logit_bias.float()
    sign = torch.full_like(logits, -1.0)
    off = rank * b if gather and world > 1 else 0
    idx = torch.arange(b, device=img.device)
    sign[idx, idx + off] = 1.0
    return -F.logsigmoid(sign * logits).sum() / b


def gathered_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale,
                    gather: bool = True, grad: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits_per_image, logits_per_text)``: this rank's rows against all ranks' features
    (``B x W B``), the form the distillation loss compares."""
    rank, world = dist_info()
    img, txt = image_features.float(), text_features.float()
    if gather and world > 1:
        g = all_gather_with_grad if grad else all_gather_no_grad
        all_img, all_txt = g(img, same_size=True), g(txt, same_size=True)
    else:
        all_img, all_txt = img, txt
    s = torch.as_tensor(logit_scale, device=img.device).float()
    return s * img @ all_txt.t(), s * txt @ all_img.t()


def clip_distill_loss(student: tuple, teacher: tuple, temperature: float = 1.0, gather: bool = True) -> torch.Tensor:
    """CLIP-to-CLIP distillation: the student's image->text and text->image similarity logits
    match the teacher's, each row a distribution over the (gathered) batch, with Hinton et al.'s
    soft-target loss (``visrep.distill.soft_target_kd_loss``, arXiv:1503.02531)::

        L_kd = 1/2 * [ T^2 KL(softmax(t_i2t / T) || softmax(s_i2t / T))
                     + T^2 KL(softmax(t_t2i / T) || softmax(s_t2i / T)) ]

    ``student`` and ``teacher`` are ``(image_features, text_features, logit_scale)``; each model
    uses its own learned scale, the teacher is constant."""
    s_i, s_t = gathered_logits(*student, gather=gather, grad=True)
    with torch.no_grad():
        t_i, t_t = gathered_logits(*teacher, gather=gather, grad=False)
    return 0.5 * (soft_target_kd_loss(s_i, t_i, temperature) + soft_target_kd_loss(s_t, t_t, temperature))


class ContrastiveLoss(nn.Module):
    """The training objective: ``kind`` ``infonce`` (CLIP) or ``sigmoid`` (SigLIP), plus an optional
    distillation term: ``(1 - kd_weight) * L_contrastive + kd_weight * L_kd`` when teacher features
    are given. Returns ``{"loss", "contrastive"[, "kd"]}``."""

    def __init__(self, kind: str = "infonce", kd_weight: float = 0.0, kd_temperature: float = 1.0,
                 gather: bool = True):
        super().__init__()
        if kind not in ("infonce", "sigmoid"):
            raise ValueError(f"unknown contrastive loss {kind!r}; expected 'infonce' or 'sigmoid'")
        self.kind, self.kd_weight, self.kd_temperature, self.gather = kind, kd_weight, kd_temperature, gather

    def forward(self, out: dict, teacher: Optional[dict] = None) -> dict:
        img, txt, s = out["image_features"], out["text_features"], out["logit_scale"]
        if self.kind == "infonce":
            con = clip_loss(img, txt, s, gather=self.gather)
        else:
            if out.get("logit_bias") is None:
                raise ValueError("the sigmoid loss needs a model with a learnable logit bias "
                                 "(model.init_logit_bias set)")
            con = sigmoid_loss(img, txt, s, out["logit_bias"], gather=self.gather)
        res = {"contrastive": con.detach()}
        if teacher is not None and self.kd_weight > 0:
            kd = clip_distill_loss((img, txt, s), (teacher["image_features"], teacher["text_features"],
                                                   teacher["logit_scale"]), self.kd_temperature, self.gather)
            res["kd"] = kd.detach()
            res["loss"] = (1.0 - self.kd_weight) * con + self.kd_weight * kd
        else:
            res["loss"] = con
        return res


@torch.no_grad()
def clamp_logit_scale(model: nn.Module, max_value: float = MAX_LOGIT_SCALE) -> None:
    """Clamp the learned log-scale to ``[0, max_value]`` in place, on the real parameter (under DeepSpeed
    the optimizer's fp32 master copy too). Call once per optimizer step, after it."""
    clamp_parameter_(getattr(model, "module", model).logit_scale, 0.0, max_value)
