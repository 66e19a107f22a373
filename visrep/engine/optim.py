"""Optimizers and learning-rate schedules, both counted in optimizer steps."""
from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from visrep.engine.config import OptimConfig, ScheduleConfig


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
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(params: nn.Module | Iterable, cfg: OptimConfig) -> torch.optim.Optimizer:
    """``params``: a module (weight decay split as above) or ready parameter groups. Each group keeps
    its peak rate in ``initial_lr`` so schedules can scale it (groups with their own ``lr`` keep it)."""
    groups = param_groups_weight_decay(params, cfg.weight_decay) if isinstance(params, nn.Module) else list(params)
    if cfg.name == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
                              weight_decay=cfg.weight_decay)
    elif cfg.name == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    else:  # pragma: no cover - the config type admits no other value
        raise ValueError(f"unknown optimizer {cfg.name!r}")
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    return opt


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine",
              min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak rate at optimizer step ``step`` (0-based): linear warm-up from
    1/warmup to 1, then cosine / linear decay to ``min_lr_ratio`` at ``total_steps``, or constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif schedule == "linear":
        shape = 1.0 - progress
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
        self.warmup_steps = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.cfg.schedule, self.cfg.min_lr_ratio)

    def apply(self, step: int) -> float:
        f = self.factor(step)
        for g in self.optimizer.param_groups:
            g["lr"] = g.get("initial_lr", g["lr"]) * f
        return self.optimizer.param_groups[0]["lr"]
