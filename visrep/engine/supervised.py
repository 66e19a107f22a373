"""The supervised objective of the classification recipes: cross-entropy with label smoothing, MixUp / CutMix
targets drawn per micro-batch from a seed, and the auxiliary classifiers a backbone recorded in its forward.

    objective = SupervisedObjective(cfg.supervised, num_classes, seed=cfg.seed)
    for x, y in stage.batches():
        x, target = objective.mix(x, y, stage)          # the batch the model sees, and its (soft) targets
        logits = model(x)
        losses = objective(model, logits, target)       # {"loss", "ce"} (+ "aux")
        accelerator.backward(losses["loss"])
        stage.optimizer_step(**losses)

* **Label smoothing** (Szegedy et al., "Rethinking the Inception Architecture", 2015, arXiv:1512.00567):
  target ``(1 - eps) * t + eps / K``.
* **MixUp** (Zhang et al. 2017, arXiv:1710.09412): ``x = lam * x_i + (1 - lam) * x_j``, target mixed alike,
  ``lam ~ Beta(alpha, alpha)``. **CutMix** (Yun et al. 2019, arXiv:1905.04899): a box of ``x_j`` pasted into
  ``x_i``, ``lam`` the kept area. One ``lam`` per batch, ``j`` the previous sample of the batch (torchvision's
  ``v2.MixUp`` / ``v2.CutMix``, which this module calls). With both on, CutMix is chosen with probability
  ``switch_prob``; a batch is mixed with probability ``prob`` (timm's ``Mixup`` defaults).
* **Auxiliary classifiers** (GoogLeNet, Szegedy et al. 2014, arXiv:1409.4842): a backbone that records
  ``aux_logits`` in its training forward adds ``aux_weight * sum(CE(aux_i, target))`` (0.3 in the paper).
  Without it the auxiliary heads would run and never learn, and under DDP their parameters would take no
  gradient.

The draws use the process's CPU generator seeded with (seed, stage epoch, micro-batch, rank), so a resumed
run mixes its batches exactly as the uninterrupted one did, and ranks mix their shards independently.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
import torch.nn.functional as F

from visrep.checks import check


@dataclasses.dataclass
class SupervisedConfig:
    """Cross-entropy targets (all off by default: plain cross-entropy on the labels)."""

    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    """MixUp's Beta(alpha, alpha); 0: off (timm's recipes: 0.8)."""
    cutmix_alpha: float = 0.0
    """CutMix's Beta(alpha, alpha); 0: off (timm's recipes: 1.0)."""
    mix_prob: float = 1.0
    """Probability that a batch is mixed (when mixup_alpha or cutmix_alpha > 0)."""
    switch_prob: float = 0.5
    """With both on: probability of CutMix rather than MixUp for a batch."""
    aux_weight: float = 0.3
    """Weight of each auxiliary classifier's loss (backbones that record aux_logits, e.g. googlenet)."""

    def validate(self, prefix: str) -> None:
        check(0.0 <= self.label_smoothing < 1.0, f"{prefix}label_smoothing", self.label_smoothing, "a number in [0, 1)")
        for k in ("mixup_alpha", "cutmix_alpha", "aux_weight"):
            check(getattr(self, k) >= 0, prefix + k, getattr(self, k), "a number >= 0")
        for k in ("mix_prob", "switch_prob"):
            check(0.0 <= getattr(self, k) <= 1.0, prefix + k, getattr(self, k), "a probability in [0, 1]")

    @property
    def mixing(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0


def _seed(*parts: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint32)[0])


def recorded_aux_logits(model: torch.nn.Module) -> tuple:
    """The auxiliary logits the (unwrapped) model recorded in its last training forward, or ()."""
    net = model
    while True:  # through DDP / DeepSpeed engines (.module), compiled modules (._orig_mod) and a distillation
        # wrapper holding the student (.student, visrep.distill.FeatureDistiller), in any order
        inner = next((m for m in (getattr(net, a, None) for a in ("module", "_orig_mod", "student"))
                      if isinstance(m, torch.nn.Module)), None)
        if inner is None:
            break
        net = inner
    aux = getattr(net, "aux_logits", None)
    return tuple(a for a in aux if a is not None) if isinstance(aux, (tuple, list)) and net.training else ()


class SupervisedObjective:
    """Targets (:meth:`mix`) and loss (``__call__``) as configured by :class:`SupervisedConfig`."""

    def __init__(self, cfg: SupervisedConfig, num_classes: int, seed: int = 0, rank: int = 0):
        self.cfg, self.num_classes, self.seed, self.rank = cfg, num_classes, seed, rank
        self._mixers = None
        if cfg.mixing:
            from torchvision.transforms import v2

            self._mixers = {"mixup": v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes) if cfg.mixup_alpha else None,
                            "cutmix": v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes) if cfg.cutmix_alpha else None}

    def mix(self, x: torch.Tensor, y: torch.Tensor, stage: Any = None,
            draw: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, targets)`` for this micro-batch: as given (integer labels) without mixing; else the mixed
        images and soft targets ``(B, K)``. The draw is seeded by (seed, ``stage.epoch``,
        ``stage.batch_in_epoch``, rank), or by ``draw`` when given."""
        if self._mixers is None:
            return x, y
        key = draw if draw is not None else (stage.epoch * 1_000_003 + stage.batch_in_epoch if stage is not None else 0)
        gen = torch.Generator().manual_seed(_seed(self.seed, key, self.rank, 0x31C))
        if torch.rand((), generator=gen).item() >= self.cfg.mix_prob:
            return x, F.one_hot(y, self.num_classes).to(torch.float32)
        m = self._mixers
        use_cutmix = m["mixup"] is None or (m["cutmix"] is not None and
                                             torch.rand((), generator=gen).item() < self.cfg.switch_prob)
        mixer = m["cutmix"] if use_cutmix else m["mixup"]
        state = torch.get_rng_state()  # torchvision draws lam (and the box) from the global CPU generator
        torch.default_generator.manual_seed(int(torch.randint(0, 2**62, (), generator=gen)))
        try:
            xm, t = mixer(x, y)
        finally:
            torch.set_rng_state(state)
        return xm, t.to(torch.float32)

    def ce(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy in fp32 against integer labels or soft targets, with the configured smoothing."""
        return F.cross_entropy(logits.float(), target, label_smoothing=self.cfg.label_smoothing)

    def __call__(self, model: torch.nn.Module, logits: torch.Tensor, target: torch.Tensor) -> dict:
        ce = self.ce(logits, target)
        return self.with_aux(model, {"loss": ce, "ce": ce.detach()}, target)

    def with_aux(self, model: torch.nn.Module, losses: dict, target: Optional[torch.Tensor]) -> dict:
        """``losses`` (a dict with the total under ``"loss"``, e.g. a distillation objective) plus the
        auxiliary classifiers' cross-entropy against ``target`` (nothing without a target or aux heads)."""
        aux = recorded_aux_logits(model) if target is not None else ()
        if not aux:
            return losses
        aux_loss = sum(self.ce(a, target) for a in aux)
        return dict(losses, loss=losses["loss"] + self.cfg.aux_weight * aux_loss, aux=aux_loss.detach())
