"""Fine-tuning tools: stages of a backbone, freezing (with frozen BatchNorm), gradual unfreezing,
layer-wise learning-rate decay and L2-SP.

Stages come from the zoo contract: ``feature_info`` names the module that ends each stage (``stem``,
``stages.0`` ... for the backbones written here; ``act1``, ``layer1`` ... for timm ResNets;
``blocks.N`` for ViTs). Every parameter is assigned, in registration order, to the first stage whose
module it belongs to or precedes (``conv1``/``bn1`` join the stage ending at ``act1``; a ViT's
``patch_embed``/``pos_embed`` join block 0); parameters after the last stage other than the classifier
(a final norm, a pre-logits MLP) join the last stage; the classifier (``get_classifier()``) is the head.
Group ``i`` in ``0 .. S-1`` is stage ``i``; group ``S`` is the head.
"""
from __future__ import annotations

import dataclasses
import re
import types
from typing import Iterable, Literal, Optional, Sequence

import torch
from torch import nn
from visrep.checks import check

_BN = (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------
def head_param_names(model: nn.Module) -> list[str]:
    model = _unwrap(model)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if head is None:
        return []
    ids = {id(p) for p in head.parameters()}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def stage_names(model: nn.Module) -> list[str]:
    """The module name that ends each stage (from ``feature_info``), then ``'head'``."""
    model = _unwrap(model)
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(f"{type(model).__name__} has no feature_info; build it with visrep.zoo.create_backbone")
    return [i["module"] if isinstance(i, dict) else i for i in info] + ["head"]


def param_stage_ids(model: nn.Module, prefix: str = "") -> dict[str, int]:
    """Map every parameter name of ``model`` (with ``prefix``) to its group: 0..S-1 stages, S head."""
    model = _unwrap(model)
    mods = stage_names(model)[:-1]
    head = set(head_param_names(model))
    names = [n for n, _ in model.named_parameters()]
    n_stages = len(mods)

    # Positions in module registration order: a stage ends at the last submodule of its module.
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    ends = []
    for m in mods:
        if m not in order:
            raise ValueError(f"feature_info names module {m!r}, which {type(model).__name__} does not have")
        ends.append(max(i for name, i in order.items() if name == m or name.startswith(m + ".")))
    out: dict[str, int] = {}
    for n in names:
        if n in head:
            out[n] = n_stages
            continue
        pos = order[n.rsplit(".", 1)[0] if "." in n else ""]
        # after the last stage (final norm, pre-logits MLP): the top of the backbone
        out[n] = next((i for i, e in enumerate(ends) if pos <= e), n_stages - 1)
    return {prefix + k: v for k, v in out.items()}


def num_stages(model: nn.Module) -> int:
    return len(stage_names(model)) - 1


def resolve_stages(model: nn.Module, spec: Sequence[int | str]) -> list[int]:
    """Stage indices from names (``'stem'``, ``'stages.1'``, ``'head'``) or integers (negative from the end)."""
    names = stage_names(model)
    out = []
    for s in spec:
        if isinstance(s, int) or (isinstance(s, str) and re.fullmatch(r"-?\d+", s)):
            i = int(s)
            if not -len(names) <= i < len(names):
                raise ValueError(f"stage index {i} is out of range; the model has stages {names}")
            out.append(i % len(names))
        elif s in names:
            out.append(names.index(s))
        else:
            raise ValueError(f"unknown stage {s!r}; the model's stages are {names} (or their indices)")
    return sorted(set(out))


# ----------------------------------------------------------------------------------------------
# Freezing: requires_grad off, BatchNorm locked in eval mode
# ----------------------------------------------------------------------------------------------
def _eval_only_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def lock_batchnorm(bn: nn.Module) -> None:
    """Keep ``bn`` in eval mode (running statistics used, never updated) even under ``model.train()``."""
    if not isinstance(bn, _BN):
        raise TypeError(f"{type(bn).__name__} is not a BatchNorm layer")
    bn.train = types.MethodType(_eval_only_train, bn)
    nn.Module.train(bn, False)


def unlock_batchnorm(bn: nn.Module, mode: bool = True) -> None:
    if "train" in bn.__dict__:
        del bn.__dict__["train"]
    bn.train(mode)


def is_locked(bn: nn.Module) -> bool:
    return "train" in bn.__dict__


def set_trainable(model: nn.Module, groups: Iterable[int], trainable: bool, lock_bn: bool = True) -> list[str]:
    """Set ``requires_grad`` of the parameters in stage ``groups``; lock (or unlock) every BatchNorm whose
    parameters all lie in frozen groups. Returns the parameter names changed."""
    model = _unwrap(model)
    groups = set(groups)
    ids = param_stage_ids(model)
    changed = []
    for n, p in model.named_parameters():
        if ids[n] in groups:
            p.requires_grad_(trainable)
            changed.append(n)
    if lock_bn:
        sync_batchnorm_locks(model)
    return changed


def sync_batchnorm_locks(model: nn.Module, frozen: Optional[set[str]] = None) -> None:
    """Lock every BatchNorm whose parameters are all frozen (``requires_grad=False``, or named in
    ``frozen``), unlock the others (they then follow the model's mode)."""
    model = _unwrap(model)
    frozen = frozen or set()
    for mname, m in model.named_modules():
        if not isinstance(m, _BN):
            continue
        params = [(f"{mname}.{n}" if mname else n, p) for n, p in m.named_parameters()]
        locked = bool(params) and all((not p.requires_grad) or n in frozen for n, p in params)
        if not params:  # affine=False: frozen if its stage's other parameters are; keep it simple
            locked = is_locked(m)
        if locked and not is_locked(m):
            lock_batchnorm(m)
        elif not locked and is_locked(m):
            unlock_batchnorm(m, model.training)


@dataclasses.dataclass
class FreezeConfig:
    """What to freeze before training. Frozen parameters get ``requires_grad=False`` and their
    BatchNorm layers stay in eval mode (running statistics unchanged) even under ``model.train()``."""

    mode: Literal["none", "all_but_head", "first_n", "stages"] = "none"
    first_n: int = 0
    """mode=first_n: freeze stages 0..first_n-1 (stage 0 is the stem)."""
    stages: list[str] = dataclasses.field(default_factory=list)
    """mode=stages: stage names (e.g. stem, stages.0) or indices."""

    def validate(self, prefix: str) -> None:
        check(self.first_n >= 0, f"{prefix}first_n", self.first_n, "an integer >= 0")
        check(self.mode != "stages" or bool(self.stages), f"{prefix}stages", self.stages,
              "a non-empty list of stage names or indices when mode is 'stages'")


def frozen_groups(model: nn.Module, cfg: FreezeConfig) -> list[int]:
    n = num_stages(model)
    if cfg.mode == "none":
        return []
    if cfg.mode == "all_but_head":
        return list(range(n))
    if cfg.mode == "first_n":
        if cfg.first_n > n:
            raise ValueError(f"freeze.first_n={cfg.first_n} but the model has {n} stages {stage_names(model)[:-1]}")
        return list(range(cfg.first_n))
    return resolve_stages(model, cfg.stages)


def freeze(model: nn.Module, cfg: FreezeConfig | str = "all_but_head", **kw) -> list[int]:
    """Freeze per ``cfg`` (or ``freeze(model, "first_n", first_n=2)``). Returns the frozen groups."""
    if isinstance(cfg, str):
        cfg = FreezeConfig(mode=cfg, **kw)
    groups = frozen_groups(model, cfg)
    set_trainable(model, groups, False)
    return groups


# ----------------------------------------------------------------------------------------------
# Gradual unfreezing
# ----------------------------------------------------------------------------------------------
class GradualUnfreezer:
    """Top-down gradual unfreezing (Howard & Ruder 2018, "Universal Language Model Fine-tuning for
    Text Classification", arXiv:1801.06146): at first only the head trains; every ``every`` epochs
    one more stage below it is unfrozen, down to ``min_stage``.

    Under DDP the set of parameters a wrapper all-reduces is fixed when it is built, so the scheduled
    parameters keep ``requires_grad=True`` and a still-frozen one has its gradient dropped
    (``mask_grads()``, called after backward and before ``optimizer.step()``): the optimizer then
    skips it entirely (no update, no weight decay, no momentum), and its BatchNorm layers stay locked
    in eval mode until it unfreezes. The state is a function of the epoch, saved for checking.
    """

    def __init__(self, model: nn.Module, every: int = 1, min_stage: int = 0):
        if every < 1:
            raise ValueError("unfreeze every must be >= 1 epoch")
        self.model = _unwrap(model)
        self.every = every
        self.n = num_stages(self.model)
        self.min_stage = min_stage
        self.ids = param_stage_ids(self.model)
        self.epoch = 0
        self.set_epoch(0)

    def lowest_trainable(self, epoch: int) -> int:
        """Groups >= this index train at ``epoch`` (``n`` = the head only)."""
        return max(self.min_stage, self.n - epoch // self.every)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        low = self.lowest_trainable(epoch)
        self.frozen_names = {n for n, g in self.ids.items() if g < low}
        sync_batchnorm_locks(self.model, self.frozen_names)

    @torch.no_grad()
    def mask_grads(self) -> None:
        for n, p in self.model.named_parameters():
            if n in self.frozen_names:
                p.grad = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "every": self.every, "min_stage": self.min_stage}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]))


# ----------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay
# ----------------------------------------------------------------------------------------------
def layer_decay_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0,
                             head_lr_scale: float = 1.0, prefix_groups: Optional[dict[str, float]] = None
                             ) -> list[dict]:
    """Parameter groups with a real per-group ``lr`` (and ``initial_lr``, which
    ``visrep.engine.StepSchedule`` scales): group ``g`` of ``S`` stages gets
    ``lr * layer_decay ** (S - g)``, the head ``lr * head_lr_scale`` (Clark et al. 2020, ELECTRA,
    arXiv:2003.10555; Bao et al. 2021, BEiT, arXiv:2106.08254). Weights get ``weight_decay``; biases
    and 1-d parameters none. Frozen parameters are left out. Plain dicts, so any torch optimizer (and
    Accelerate / DeepSpeed, which keep the groups) uses them as they are."""
    model = _unwrap(model)
    ids = param_stage_ids(model)
    n = num_stages(model)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = ids[name]
        scale = head_lr_scale if g == n else layer_decay ** (n - g)
        no_wd = p.ndim <= 1 or name.endswith(".bias") or name in skip
        key = (g, no_wd)
        if key not in groups:
            glr = lr * scale
            groups[key] = {"params": [], "param_names": [], "lr": glr, "initial_lr": glr,
                           "weight_decay": 0.0 if no_wd else weight_decay, "stage": g,
                           "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]


# ----------------------------------------------------------------------------------------------
# L2-SP
# ----------------------------------------------------------------------------------------------
class L2SP(nn.Module):
    """L2-SP regularizer toward the starting point (Li, Grandvalet & Davoine 2018, "Explicit Inductive
    Bias for Transfer Learning with Convolutional Networks", arXiv:1802.01483):

        Omega(w) = alpha/2 * ||w_S - w_S^0||_2^2 + beta/2 * ||w_new||_2^2

    ``w_S`` are the transferred (backbone) weights with their starting values ``w_S^0``, ``w_new`` the
    new head. Use with ``optim.weight_decay = 0`` for the paper's setting (plain L2 on ``w_S`` would
    pull toward 0, not toward ``w_S^0``). Computed on the (replicated) parameters, so every rank
    holds the same value and DDP's gradient average leaves its gradient unchanged.
    """

    def __init__(self, model: nn.Module, alpha: float = 0.01, beta: float = 0.01):
        super().__init__()
        model = _unwrap(model)
        head = set(head_param_names(model))
        self.alpha, self.beta = alpha, beta
        self.source_names = [n for n, p in model.named_parameters() if n not in head]
        self.head_names = sorted(head)
        self.start = {n: p.detach().clone() for n, p in model.named_parameters() if n not in head}

    def forward(self, model: nn.Module) -> torch.Tensor:
        model = _unwrap(model)
        params = dict(model.named_parameters())
        for n in self.source_names:  # move the reference once, not every step
            if self.start[n].device != params[n].device:
                self.start[n] = self.start[n].to(params[n].device)
        sp = sum(((params[n] - self.start[n]) ** 2).sum()
                 for n in self.source_names if params[n].requires_grad)
        new = sum((params[n] ** 2).sum() for n in self.head_names if params[n].requires_grad)
        return 0.5 * self.alpha * torch.as_tensor(sp) + 0.5 * self.beta * torch.as_tensor(new)

    def state_dict(self, *args, **kwargs) -> dict:  # the starting point must survive a resume
        return {"start": {n: t.cpu() for n, t in self.start.items()}, "alpha": self.alpha, "beta": self.beta}

    def load_state_dict(self, state: dict, strict: bool = True):
        self.start = {n: t.clone() for n, t in state["start"].items()}
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])
