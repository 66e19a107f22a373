"""The optimizer set-up of BYOL on the engine's one optimizer builder: scaled learning rate, excluded
parameters, the probe and predictor groups."""
from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from visrep.checks import check
from visrep.engine.config import OptimConfig
from visrep.engine.optim import build_optimizer, half_cosine


@dataclasses.dataclass
class SSLOptimConfig(OptimConfig):
    """:class:`visrep.engine.OptimConfig` with BYOL's defaults -- LARS, ``lr`` per 256 images scaled
    linearly with the global batch (``lr * global_batch / 256``), no decay of biases and norms -- plus the
    online probe's rate and the predictor's multiplier. Warmed up and decayed by ``schedule``."""

    name: Literal["sgd", "adamw", "lars"] = "lars"
    lr: float = 0.2
    """Learning rate per 256 images (BYOL: 0.2 with LARS at batch 4096)."""
    lr_scaling: Literal["none", "linear"] = "linear"
    weight_decay: float = 1.5e-6
    nesterov: bool = False
    probe_lr: float = 0.1
    """Learning rate of the online linear probe (per 256 images, no weight decay, no LARS)."""
    predictor_lr_mult: float = 1.0
    """Rate of the predictor relative to the rest (> 1 lets the predictor track its optimum; Tian et al.,
    "Understanding Self-Supervised Learning Dynamics without Contrastive Pairs", 2021, arXiv:2102.06810)."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check(self.probe_lr > 0, f"{prefix}probe_lr", self.probe_lr, "a positive number")


def scaled_lr(lr: float, batch_size: int, num_processes: int = 1, grad_accum: int = 1, base_batch: int = 256) -> float:
    """``lr * global_batch / base_batch`` with ``global_batch = batch_size * num_processes * grad_accum``."""
    return lr * batch_size * num_processes * grad_accum / base_batch


def _is_excluded(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.endswith(".bias")


def ssl_param_groups(model: nn.Module, cfg: SSLOptimConfig, lr: float, probe_lr: float,
                     probe_prefix: str = "probe.", predictor_prefix: str = "predictor.") -> list[dict]:
    """Parameter groups of the trainable (online) parameters: weights (decay, LARS-adapted), biases
    and norms (no decay, not adapted, when ``exclude_bias_and_norm``), the probe (own rate, no decay,
    not adapted). Frozen parameters (the target network) are left out. Each group carries its peak
    rate in ``initial_lr`` for ``visrep.engine.StepSchedule``."""
    mult = cfg.predictor_lr_mult
    weights, excluded, probe, pred_w, pred_x = [], [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        split = mult != 1.0 and name.startswith(predictor_prefix)
        if name.startswith(probe_prefix):
            probe.append(p)
        elif cfg.exclude_bias_and_norm and _is_excluded(name, p):
            (pred_x if split else excluded).append(p)
        else:
            (pred_w if split else weights).append(p)
    groups = [{"name": "weights", "params": weights, "lr": lr, "weight_decay": cfg.weight_decay,
               "lars_exclude": False}]
    if excluded:
        groups.append({"name": "bias_and_norm", "params": excluded, "lr": lr, "weight_decay": 0.0,
                       "lars_exclude": True})
    if pred_w:
        groups.append({"name": "predictor", "params": pred_w, "lr": lr * mult, "weight_decay": cfg.weight_decay,
                       "lars_exclude": False})
    if pred_x:
        groups.append({"name": "predictor_bias_and_norm", "params": pred_x, "lr": lr * mult, "weight_decay": 0.0,
                       "lars_exclude": True})
    if probe:
        groups.append({"name": "probe", "params": probe, "lr": probe_lr, "weight_decay": 0.0, "lars_exclude": True})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def build_ssl_optimizer(model: nn.Module, cfg: SSLOptimConfig, global_batch: int,
                        predictor_prefix: str = "predictor.") -> torch.optim.Optimizer:
    """``visrep.engine.build_optimizer`` over ``ssl_param_groups`` at the peak rates for ``global_batch``
    (``predictor_prefix``: the parameter-name prefix of the predictor, for ``predictor_lr_mult``, when the
    model is not ``visrep.ssl.BYOL``)."""
    scale = cfg.peak_lr(global_batch) / cfg.lr
    groups = ssl_param_groups(model, cfg, cfg.lr * scale, cfg.probe_lr * scale, predictor_prefix=predictor_prefix)
    return build_optimizer(groups, cfg, global_batch)


def cosine_weight_decay(step: int, total_steps: int, start: float, end: float) -> float:
    """Weight decay at optimizer step ``step`` (0-based) of ``total_steps``: a half cosine from ``start``
    to ``end``, as DINO's official ``cosine_scheduler`` (``wd_k -> end`` as ``k -> K``; ``wd_0 = start``)::

        wd_k = end + (start - end) * (1 + cos(pi * k / K)) / 2

    Paper: Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", 2021,
    arXiv:2104.14294, Appendix (ViT: 0.04 -> 0.4; facebookresearch/dino ``weight_decay_end``)."""
    if step < 0 or total_steps < 1:
        raise ValueError(f"step must be >= 0 and total_steps >= 1, got step={step}, total_steps={total_steps}")
    return half_cosine(step, total_steps, start, end)


class WeightDecaySchedule:
    """A learning-rate schedule (``apply(step)``, e.g. :class:`visrep.engine.StepSchedule`) that also sets
    :func:`cosine_weight_decay` on the parameter groups that decay (``weight_decay > 0`` when built: the
    groups without decay -- biases, norms, the probe -- keep none). Stateless, as the rate: a function of
    the optimizer step, so a resumed run continues it exactly; groups are matched by position, which an
    optimizer's ``load_state_dict`` keeps. ``Stage`` calls ``apply`` before each optimizer step."""

    def __init__(self, lr_schedule, total_steps: int, start: float, end: float):
        self.lr_schedule, self.optimizer = lr_schedule, lr_schedule.optimizer
        self.total_steps, self.start, self.end = int(total_steps), float(start), float(end)
        self.decays = [g["weight_decay"] > 0 for g in self.optimizer.param_groups]

    def apply(self, step: int) -> float:
        wd = cosine_weight_decay(step, self.total_steps, self.start, self.end)
        for g, decays in zip(self.optimizer.param_groups, self.decays):
            if decays:
                g["weight_decay"] = wd
        return self.lr_schedule.apply(step)


def refuse_lars_under_deepspeed(optim: SSLOptimConfig, accelerator) -> None:
    """LARS needs each layer's whole weight for its trust ratio, which DeepSpeed's flattened shards do not
    give: one clear error before any training (the engine decides what DeepSpeed can do)."""
    from visrep.engine.distributed import require

    if optim.name == "lars":
        require(accelerator, "per_layer_optimizer", "optim.name 'lars' (a trust ratio per layer)",
                "Under DeepSpeed use --optim.name sgd or adamw; or train with LARS under DDP (without --use_deepspeed).")
