"""Evaluation across ranks: each rank scores its shard; ``gather_for_metrics`` collects the results
and drops the samples Accelerate repeated to even out the last batch, so every sample counts once."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from visrep.engine.distributed import broadcast_buffers, release_gathered


@torch.no_grad()
def evaluate_sums(model: torch.nn.Module, loader, accelerator: Accelerator,
                  score: Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]],
                  forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Optional[list[torch.Tensor]]:
    """The scaffold of a split's metrics: rank 0's buffers on every rank (DeepSpeed), eval mode, for each
    ``(x, y)`` batch the autocast forward (``forward`` or ``model``), its logits in float32 and
    ``score(logits, y)`` -- tensors with one row per sample -- gathered from every rank (``gather_for_metrics``
    drops the repeated samples) and summed over the samples and the batches; then the model's mode back and
    the gathered parameters released. Returns the sums (on the device, one per tensor of ``score``), or None
    when the loader is empty: the caller divides."""
    broadcast_buffers(model, accelerator)
    was_training = model.training
    model.eval()
    forward = forward or model
    sums = None
    for x, y in loader:
        with accelerator.autocast():
            logits = forward(x)
        rows = accelerator.gather_for_metrics(tuple(score(logits.float(), y)))
        batch = [r.sum(0) for r in rows]
        sums = batch if sums is None else [a + b for a, b in zip(sums, batch)]
    model.train(was_training)
    release_gathered(model)
    return sums


def evaluate_classifier(model: torch.nn.Module, loader, accelerator: Accelerator,
                        forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> dict:
    """Top-1, top-5 accuracy (fractions) and mean cross-entropy over the whole split."""
    def score(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hit = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == y[:, None]
        return (hit[:, 0].double(), hit.any(dim=1).double(), F.cross_entropy(logits, y, reduction="none").double(),
                torch.ones_like(y, dtype=torch.float64))

    sums = evaluate_sums(model, loader, accelerator, score, forward)
    correct1, correct5, loss_sum, total = torch.stack(sums).tolist() if sums is not None else (0.0, 0.0, 0.0, 0.0)
    total = max(int(total), 1)
    return {"top1": correct1 / total, "top5": correct5 / total, "loss": loss_sum / total, "count": total}
