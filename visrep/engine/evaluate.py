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
    broadcast_buffers_under_deepspeed(model, accelerator)
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
    release_zero3_parameters(model)
    correct1, correct5, loss_sum, total = sums.tolist() if sums is not None else (0.0, 0.0, 0.0, 0.0)
    total = max(int(total), 1)
    return {"top1": correct1 / total, "top5": correct5 / total, "loss": loss_sum / total, "count": total}


def broadcast_buffers_under_deepspeed(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Under DeepSpeed, give every rank rank 0's buffers (BatchNorm running statistics) before it scores
    its shard. DDP broadcasts them from rank 0 at every forward; DeepSpeed never does, so each rank's
    statistics follow its own batches only, and a split scored across ranks would not be scored with
    the model that is exported (rank 0's). Nothing under DDP or in one process."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED or accelerator.num_processes < 2:
        return
    for buf in accelerator.unwrap_model(model).buffers():
        torch.distributed.broadcast(buf.data, src=0)


def release_zero3_parameters(model: torch.nn.Module) -> None:
    """After forwards outside training, under DeepSpeed ZeRO-3 (``model`` the engine): wait for the
    parameters still being fetched -- prefetched along the module order recorded in training, which an
    evaluation forward need not follow -- and release them all, so that code gathering parameters next
    (best-epoch copies, exports) finds none in flight. Nothing otherwise."""
    partitioned = getattr(model, "zero_optimization_partition_weights", None)
    if callable(partitioned) and partitioned():
        model.empty_partition_cache()


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameter count; under DeepSpeed ZeRO-3 the full size of partitioned parameters (``ds_numel``)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad or not trainable_only)
