"""One contrastive training step, with gradient accumulation that keeps every negative.

Plain accumulation (a loss per micro-batch) would shrink the set of negatives to one micro-batch and
change the objective. Instead, with ``chunks > 1`` the step follows GradCache: Gao et al., "Scaling
Deep Contrastive Learning Batch Size under Memory Limited Setup" (2021, arXiv:2101.06983):

  1. embed every micro-batch without building a graph, and cache the features;
  2. compute the loss over the whole (gathered) batch from the cached features and backpropagate it
     to them only -- this yields d loss / d feature for every sample;
  3. re-run each micro-batch with a graph and backpropagate the cached feature gradients through the
     towers (DDP syncs once, on the last micro-batch).

The gradient equals that of one step on the whole batch (checked in tests), while activations are
held for one micro-batch at a time. Randomness (dropout, drop-path) is replayed from the RNG state
saved in step 1; buffers (BatchNorm running statistics) are restored after step 1 so each micro-batch
updates them once. BatchNorm normalises with micro-batch statistics, as with any accumulation.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from visrep.engine.distributed import require


class _RngState:
    def __init__(self, device: torch.device):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        self.device = device

    @contextlib.contextmanager
    def replay(self):
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def _outputs(o: dict, with_scale: bool) -> list:
    outs = [o["image_features"], o["text_features"]]
    if with_scale:
        outs.append(o["logit_scale"])
        if o.get("logit_bias") is not None:
            outs.append(o["logit_bias"])
    return outs


def contrastive_step(accelerator, model, loss_fn: Callable, images: torch.Tensor, tokens: torch.Tensor,
                     chunks: int = 1, teacher: Optional[Callable] = None) -> dict:
    """Forward and backward of one optimizer step's batch (this rank's ``images``, ``tokens``).
    ``loss_fn(out, teacher_out) -> {"loss", ...}``; ``teacher(images, tokens)`` gives the frozen
    teacher's outputs (distillation) or is None. Returns the detached loss terms and ``logit_scale``, the
    scale this step's forward used."""
    def run_teacher():
        if teacher is None:
            return None
        with torch.no_grad():
            parts = [teacher(x, t) for x, t in zip(images.chunk(chunks), tokens.chunk(chunks))]
        return {"image_features": torch.cat([p["image_features"] for p in parts]),
                "text_features": torch.cat([p["text_features"] for p in parts]),
                "logit_scale": parts[0]["logit_scale"]}

    if chunks <= 1:
        with accelerator.autocast():
            out = model(images, tokens)
        losses = loss_fn(out, run_teacher())
        accelerator.backward(losses["loss"])
        return _detached(losses, out)

    if images.shape[0] % chunks:
        raise ValueError(f"the batch of {images.shape[0]} does not split into {chunks} equal micro-batches")
    require(accelerator, "manual_backward", "run.grad_accum > 1 in the CLIP recipe (cached-feature steps)",
            "Under DeepSpeed use run.grad_accum 1 (a larger per-device batch), or DDP.")
    net = accelerator.unwrap_model(model)
    buffers = [b for b in net.buffers()]
    saved = [b.detach().clone() for b in buffers]
    xs, ts = images.chunk(chunks), tokens.chunk(chunks)

    # 1. features of every micro-batch, no graph
    rng, fi, ft = [], [], []
    with torch.no_grad():
        for x, t in zip(xs, ts):
            rng.append(_RngState(x.device))
            with accelerator.autocast():
                o = model(x, t)
            fi.append(o["image_features"])
            ft.append(o["text_features"])
    with torch.no_grad():
        for b, s in zip(buffers, saved):
            b.copy_(s)

    # 2. the loss over the whole batch, backpropagated to the cached features
    leaf = lambda v: None if v is None else v.detach().requires_grad_()  # noqa: E731
    cached = {"image_features": leaf(torch.cat(fi)), "text_features": leaf(torch.cat(ft)),
              "logit_scale": leaf(o["logit_scale"]), "logit_bias": leaf(o.get("logit_bias"))}
    losses = loss_fn(cached, run_teacher())
    accelerator.backward(losses["loss"])  # applies the fp16 loss scale, if any, to the cached gradients
    g_img = cached["image_features"].grad.split(xs[0].shape[0])
    g_txt = cached["text_features"].grad.split(xs[0].shape[0])
    g_scale = [cached["logit_scale"].grad]
    if cached["logit_bias"] is not None:
        g_scale.append(cached["logit_bias"].grad)

    # 3. recompute each micro-batch with a graph and push the cached gradients through it
    for k, (x, t) in enumerate(zip(xs, ts)):
        last = k == chunks - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync, rng[k].replay():
            with accelerator.autocast():
                o = model(x, t)
            grads = [g_img[k].to(o["image_features"].dtype), g_txt[k].to(o["text_features"].dtype)]
            if last:
                grads += g_scale
            torch.autograd.backward(_outputs(o, last), grads)
    return _detached(losses, o)


def _detached(losses: dict, out: dict) -> dict:
    """The loss terms and the logit scale this step's forward used, detached and on the device (logging
    them reads nothing on the host and, under ZeRO-3, gathers no parameter)."""
    res = {k: v.detach() for k, v in losses.items()}
    res["logit_scale"] = out["logit_scale"].detach().reshape(())
    return res
