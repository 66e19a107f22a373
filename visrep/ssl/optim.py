"""LARS, and the optimizer set-up of BYOL: scaled learning rate, excluded parameters, probe group."""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import torch
from torch import nn
from visrep.checks import check


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


@dataclasses.dataclass
class SSLOptimConfig:
    """Optimizer of the online network. The peak rate is ``base_lr * global_batch / 256`` with
    ``global_batch = run.batch_size x processes x run.grad_accum`` (the linear scaling rule of BYOL /
    SimCLR); it is warmed up and decayed by ``schedule``."""

    name: Literal["lars", "sgd", "adamw"] = "lars"
    base_lr: float = 0.2
    """Learning rate per 256 images (BYOL: 0.2 with LARS at batch 4096)."""
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    eta: float = 0.001
    """LARS trust coefficient."""
    exclude_bias_and_norm: bool = True
    """Biases and normalisation parameters get no LARS adaptation and no weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    probe_lr: float = 0.1
    """Learning rate of the online linear probe (per 256 images, no weight decay, no LARS)."""
    predictor_lr_mult: float = 1.0
    """Rate of the predictor relative to the rest (> 1 lets the predictor track its optimum; Tian et al.,
    "Understanding Self-Supervised Learning Dynamics without Contrastive Pairs", 2021, arXiv:2102.06810)."""
    grad_clip: Optional[float] = None

    def validate(self, prefix: str) -> None:
        check(self.base_lr > 0, f"{prefix}base_lr", self.base_lr, "a positive number")
        check(self.probe_lr > 0, f"{prefix}probe_lr", self.probe_lr, "a positive number")
        check(self.weight_decay >= 0, f"{prefix}weight_decay", self.weight_decay, "a number >= 0")
        check(self.eta > 0, f"{prefix}eta", self.eta, "a positive number")
        check(self.grad_clip is None or self.grad_clip > 0, f"{prefix}grad_clip", self.grad_clip,
              "null or a positive number")


def scaled_lr(base_lr: float, batch_size: int, num_processes: int = 1, grad_accum: int = 1) -> float:
    """``base_lr * global_batch / 256`` with ``global_batch = batch_size * num_processes * grad_accum``."""
    return base_lr * batch_size * num_processes * grad_accum / 256.0


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
    """LARS / SGD / AdamW over ``ssl_param_groups`` at the scaled peak rates (``predictor_prefix``:
    the parameter-name prefix of the predictor, for ``predictor_lr_mult``, when the model is not
    ``visrep.ssl.BYOL``)."""
    lr, probe_lr = scaled_lr(cfg.base_lr, global_batch), scaled_lr(cfg.probe_lr, global_batch)
    groups = ssl_param_groups(model, cfg, lr, probe_lr, predictor_prefix=predictor_prefix)
    if cfg.name == "lars":
        opt = LARS(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, eta=cfg.eta)
    else:
        for g in groups:
            g.pop("lars_exclude", None)
        if cfg.name == "sgd":
            opt = torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return opt
