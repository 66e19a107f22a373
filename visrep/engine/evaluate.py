"""Evaluation across ranks: each rank scores its shard; ``gather_for_metrics`` collects the results
and drops the samples Accelerate repeated to even out the last batch, so every sample counts once."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from visrep.engine.distributed import broadcast_buffers, release_gathered


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, loader, accelerator: Accelerator,
                        forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """Top-1, top-5 accuracy (fractions) and mean cross-entropy over the whole split."""
    broadcast_buffers(model, accelerator)
    was_training = model.training
    model.eval()
    forward = forward or model
    sums = None  # top-1 hits, top-5 hits, summed cross-entropy, count: on the device until the end
    for x, y in loader:
        with accelerator.autocast():
            logits = forward(x)
        logits = logits.float()
        k = min(5, logits.shape[-1])
        topk = logits.topk(k, dim=-1).indices
        nll = F.cross_entropy(logits, y, reduction="none")
        topk, y, nll = accelerator.gather_for_metrics((topk, y, nll))
        hit = topk == y[:, None]
        batch = torch.stack([hit[:, 0].sum().double(), hit.any(dim=1).sum().double(), nll.double().sum(),
                             torch.tensor(y.numel(), dtype=torch.float64, device=nll.device)])
        sums = batch if sums is None else sums + batch
    model.train(was_training)
    release_gathered(model)
    correct1, correct5, loss_sum, total = sums.tolist() if sums is not None else (0.0, 0.0, 0.0, 0.0)
    total = max(int(total), 1)
    return {"top1": correct1 / total, "top5": correct5 / total, "loss": loss_sum / total, "count": total}
