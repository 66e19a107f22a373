"""Evaluation across ranks: each rank scores its shard; ``gather_for_metrics`` collects the results
and drops the samples Accelerate repeated to even out the last batch, so every sample counts once."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, loader, accelerator: Accelerator,
                        forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """Top-1, top-5 accuracy (fractions) and mean cross-entropy over the whole split."""
    was_training = model.training
    model.eval()
    forward = forward or model
    correct1 = correct5 = 0
    total = 0
    loss_sum = 0.0
    for x, y in loader:
        with accelerator.autocast():
            logits = forward(x)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        nll = F.cross_entropy(logits, y, reduction="none")
        topk, y, nll = accelerator.gather_for_metrics((topk, y, nll))
        hit = topk == y[:, None]
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        loss_sum += nll.sum().item()
        total += y.numel()
    model.train(was_training)
    total = max(total, 1)
    return {"top1": correct1 / total, "top5": correct5 / total, "loss": loss_sum / total, "count": total}


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameter count; under DeepSpeed ZeRO-3 the full size of partitioned parameters (``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)
