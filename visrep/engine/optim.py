"""Optimizers and learning-rate schedules, both counted in optimizer steps."""
from __future__ import annotations

import functools
import math
from typing import Iterable, Optional

import torch
from torch import nn

from visrep.checks import ConfigError
from visrep.engine.config import OptimConfig, ScheduleConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio.

    For each parameter ``w`` with gradient ``g`` in a group that is not ``lars_exclude``::

        g <- g + wd * w
        g <- g * eta * ||w|| / ||g||     (when both norms are > 0; else unchanged)
        m <- momentum * m + g
        w <- w - lr * m

    Groups with ``lars_exclude=True`` (biases, normalisation parameters, the linear probe) skip the
    trust ratio; give them ``weight_decay=0`` to exclude them from decay too (``ssl_param_groups``
    does). Norms are computed with fused multi-tensor ops.

    Paper: You, Gitman, Ginsburg, "Large Batch Training of Convolutional Networks", 2017,
    arXiv:1708.03888; used by BYOL (Grill et al. 2020, arXiv:2006.07733, Appendix C).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001, lars_exclude: bool = False):
        if lr < 0 or momentum < 0 or weight_decay < 0 or eta <= 0:
            raise ValueError(f"invalid LARS hyper-parameters lr={lr} momentum={momentum} wd={weight_decay} eta={eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=lars_exclude))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            wd, lr, mom = group["weight_decay"], group["lr"], group["momentum"]
            if wd:
                grads = torch._foreach_add(grads, params, alpha=wd)
            if not group["lars_exclude"]:
                w_norms = torch._foreach_norm(params)
                g_norms = torch._foreach_norm(grads)
                ratios = [torch.where((w > 0) & (g > 0), group["eta"] * w / g, torch.ones_like(w))
                          for w, g in zip(w_norms, g_norms)]
                grads = torch._foreach_mul(grads, ratios)
            bufs = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                bufs.append(state["momentum_buffer"])
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(params, bufs, alpha=-lr)
        return loss


def param_groups_weight_decay(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights get ``weight_decay``; biases, norm and other 1-d parameters (and anything
    a module lists in ``no_weight_decay()``) get none."""
    skip = set()
    if hasattr(model, "no_weight_decay"):
        skip = set(model.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip or name.endswith(".bias") else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lars_exclude": False})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups


def build_optimizer(params: nn.Module | Iterable, cfg: OptimConfig,
                    global_batch: Optional[int] = None) -> torch.optim.Optimizer:
    """The one optimizer builder. ``params``: a module (weight decay split as above) or ready parameter
    groups. The peak rate is ``cfg.peak_lr(global_batch)`` (scaled with the batch when
    ``cfg.lr_scaling`` is linear). Each group keeps its peak rate in ``initial_lr`` so schedules can scale
    it (groups with their own ``lr`` keep it). LARS skips the trust ratio of groups marked
    ``lars_exclude`` (biases and norms, unless ``cfg.exclude_bias_and_norm`` is off)."""
    lr = cfg.peak_lr(global_batch)
    if isinstance(params, nn.Module):
        groups = param_groups_weight_decay(params, cfg.weight_decay)
        for g in groups:
            g["lars_exclude"] = g["lars_exclude"] and cfg.exclude_bias_and_norm
    else:
        groups = list(params)
    for g in groups:
        if cfg.name != "lars":
            g.pop("lars_exclude", None)
    if cfg.name in ("sgd", "adamw"):
        opt = _torch_optimizer(cfg, groups, lr)
    elif cfg.name == "lars":
        opt = LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.eta)
    else:  # pragma: no cover - the config type admits no other value
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    return opt


def _torch_optimizer(cfg: OptimConfig, groups: list, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW in ``cfg.implementation`` (auto: fused, or foreach where torch refuses fused for
    these parameters: a device without the kernel, or a torch without the argument; torch: torch's
    default)."""
    if cfg.name == "sgd":
        make = functools.partial(torch.optim.SGD, groups, lr=lr, momentum=cfg.momentum,
                                 nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
    else:
        make = functools.partial(torch.optim.AdamW, groups, lr=lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay)
    impl = cfg.implementation
    if impl == "torch":
        return make()
    if impl in ("auto", "fused"):
        try:
            return make(fused=True)
        except (RuntimeError, TypeError, ValueError) as e:
            if impl == "fused":
                raise ConfigError(f"optim.implementation 'fused' is not available here ({e}); use 'auto' (fused "
                                  f"where it can be, else foreach) or 'foreach'.") from None
    return make(foreach=impl != "loop")


def half_cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """``start`` at step 0 to ``end`` at ``total_steps`` (and held after) on a half cosine:
    ``end + (start - end) * (1 + cos(pi * k / K)) / 2`` -- the shape of the learning-rate decay, BYOL's EMA
    momentum, DINO's weight decay and the linear probe's rate. ``total_steps <= 0``: ``end``."""
    if total_steps <= 0:
        return float(end)
    progress = min(max(step, 0), total_steps) / total_steps
    return float(end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak rate at optimizer step ``step`` (0-based): linear warm-up from
    1/warmup to 1, then cosine / linear decay to ``min_lr_ratio`` at ``total_steps``, or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    if schedule == "cosine":
        shape = half_cosine(step - warmup_steps, total_steps - warmup_steps, 1.0, 0.0)
    elif schedule == "linear":
        shape = 1.0 - min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected cosine, linear or constant")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class StepSchedule:
    """Sets ``lr = initial_lr * lr_factor(step)`` on every parameter group. Stateless: the rate is a
    function of the optimizer step alone, so a resumed run continues the schedule exactly."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int):
        self.optimizer = optimizer
        self.cfg = cfg
        self.total_steps = max(1, cfg.epochs * steps_per_epoch)
        if cfg.warmup_steps is not None:  # in steps: capped at half the stage
            self.warmup_steps = min(cfg.warmup_steps, self.total_steps // 2)
        else:
            self.warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.cfg.schedule, self.cfg.min_lr_ratio)

    def apply(self, step: int) -> float:
        f = self.factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = g.get("initial_lr", g["lr"]) * f
        return self.optimizer.param_groups[0]["lr"]
