"""The pieces an adaptation run is built from: a classifier with a bottleneck (and an optional domain
discriminator) behind one ``forward``, paired source/target batches, and model selection that never
looks at target labels."""
from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
from torch import nn

from visrep.data.images import EpochIndex, EpochSampler, collate, epoch_of, loader_options, sample_seed
from visrep.engine.distributed import gathered
from visrep.engine.export import rebuild_with_backbone, register_kind
from visrep.transfer.align import DomainDiscriminator, grad_reverse
from visrep.transfer.align_cond import conditioning_map


class AdaptationModel(nn.Module):
    """``backbone -> pooled features -> bottleneck (Linear, BN, ReLU) -> classifier``, plus the method's
    adversarial pieces, each behind a gradient reversal layer:

    - ``discriminator_hidden``: a domain discriminator on the bottleneck features (DANN), or, with
      ``condition`` ``"full"``/``"randomized"``, on CDAN's (randomized) multilinear map of the features
      and the detached softmax predictions (``condition="auto"``: randomized above 4096 dimensions);
    - ``adversarial_head``: MDD's auxiliary classifier ``h'`` (a copy of the classifier's layout, so it
      lies in the same hypothesis class) on the bottleneck features.

    Everything goes through ``forward`` so that a DDP wrapper sees each call:
    ``model(x)`` -> class logits (evaluation); ``model(x_s, x_t, grl_coeff=...)`` -> a dict with
    ``logits_s``, ``logits_t``, ``features_s``, ``features_t`` and, with ``grl_coeff`` given,
    ``domain_s``/``domain_t`` (a discriminator) and ``adv_logits_s``/``adv_logits_t`` (``h'``). Source
    and target run as one concatenated batch, so BatchNorm sees both domains (as in DANN/DAN
    implementations).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, bottleneck_dim: int = 128,
                 discriminator_hidden: Optional[int] = None, condition: Optional[str] = None,
                 randomized_dim: int = 1024, adversarial_head: bool = False):
        super().__init__()
        self.backbone = backbone
        width = backbone.num_features
        if bottleneck_dim > 0:
            self.bottleneck = nn.Sequential(nn.Linear(width, bottleneck_dim), nn.BatchNorm1d(bottleneck_dim),
                                            nn.ReLU(inplace=True))
            width = bottleneck_dim
        else:
            self.bottleneck = nn.Identity()
        self.num_features = width
        self.head = nn.Linear(width, num_classes)
        self.condition = None
        disc_in = width
        if condition is not None:
            self.condition, disc_in = conditioning_map(width, num_classes, condition, randomized_dim)
        self.discriminator = DomainDiscriminator(disc_in, discriminator_hidden) if discriminator_hidden else None
        self.adversarial_head = nn.Linear(width, num_classes) if adversarial_head else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.bottleneck(f)

    def forward(self, x: torch.Tensor, x_t: Optional[torch.Tensor] = None, grl_coeff: Optional[float] = None):
        if x_t is None:
            return self.head(self.features(x))
        m = x.shape[0]
        f = self.features(torch.cat([x, x_t]))
        out = {"logits_s": self.head(f[:m]), "logits_t": self.head(f[m:]), "features_s": f[:m],
               "features_t": f[m:]}
        if grl_coeff is None:
            return out
        if self.discriminator is not None:
            h = f
            if self.condition is not None:
                g = torch.cat([out["logits_s"], out["logits_t"]]).softmax(dim=1).detach()
                h = self.condition(f, g)
            d = self.discriminator(grad_reverse(h, grl_coeff))
            out["domain_s"], out["domain_t"] = d[:m], d[m:]
        if self.adversarial_head is not None:
            y = self.adversarial_head(grad_reverse(f, grl_coeff))
            out["adv_logits_s"], out["adv_logits_t"] = y[:m], y[m:]
        return out


class PairedDataset(torch.utils.data.Dataset):
    """Item ``i``: ((source image i, target image j), source label i), with ``j`` the ``i``-th entry of a
    permutation of the target set that is a function of (seed, epoch) (cycled when the target set is
    smaller). Target labels are never returned. One sampler over the source indices then drives both
    domains, so checkpoints, exact resume and sharding work as for one dataset."""

    def __init__(self, source, target, seed: int):
        self.source, self.target, self.seed = source, target, seed
        self.epoch = 0
        self._perm, self._perm_epoch = self._permutation(0), 0

    def _permutation(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng(sample_seed(self.seed, epoch, 0xFFFFFFFE))
        reps = -(-len(self.source) // len(self.target))
        return np.concatenate([rng.permutation(len(self.target)) for _ in range(reps)])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for ds in (self.source, self.target):
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        epoch = epoch_of(i, self.epoch)  # the index's own epoch in a persistent worker
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = self._permutation(epoch), epoch
        xs, ys = self.source[i]
        xt, _ = self.target[EpochIndex(int(self._perm[i]), epoch)]
        return (xs, xt), ys


def paired_loader(source, target, seed: int, batch_size: int, num_workers: int):
    """The training loader of domain adaptation: :class:`PairedDataset` batches ((source, target) images,
    source labels) in a (seed, epoch) order, the last incomplete batch dropped (so every rank holds as
    many rows: the alignment losses gather without exchanging sizes). Returns (loader, epoch setters)."""
    paired = PairedDataset(source, target, seed)
    sampler = EpochSampler(len(paired), seed)
    loader = torch.utils.data.DataLoader(paired, batch_size=batch_size, sampler=sampler, drop_last=True,
                                         **loader_options(num_workers, collate))
    return loader, (sampler, paired)


class BestOnValidation:
    """Keeps the weights of the epoch with the best accuracy on the validation split the recipe scores:
    for adaptation the *source* validation split -- the honest rule: the target's labels are never
    consulted; for fine-tuning the target's own validation split (never its test split). Saved with every
    checkpoint so a resumed run selects the same model."""

    def __init__(self):
        self.best_acc = -1.0
        self.best_epoch = -1
        self.weights: Optional[dict] = None

    def update(self, model: nn.Module, acc: float, epoch: int) -> bool:
        """Call on every rank with the same ``acc`` (under ZeRO-3 the copy gathers the shards)."""
        if acc > self.best_acc:
            self.best_acc, self.best_epoch = float(acc), int(epoch)
            with gathered(model.parameters()):
                self.weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            return True
        return False

    def restore(self, model: nn.Module) -> None:
        """Call on every rank. Writes the module's parameters (under ZeRO-3: gathered, written, re-sharded);
        an optimizer's own master copy is not touched, so restore once training is over."""
        if self.weights is not None:
            with gathered(model.parameters(), modifier_rank=0):
                model.load_state_dict(copy.deepcopy(self.weights))

    def state_dict(self) -> dict:
        return {"best_acc": self.best_acc, "best_epoch": self.best_epoch, "weights": self.weights or {}}

    def load_state_dict(self, state: dict) -> None:
        self.best_acc, self.best_epoch = float(state["best_acc"]), int(state["best_epoch"])
        self.weights = dict(state["weights"]) or None


def load_adaptation_model(path) -> tuple[AdaptationModel, dict]:
    """Rebuild an ``AdaptationModel`` exported by ``recipes/adapt.py`` (``RUN_DIR/models/adapt``, kind
    ``adaptation``)."""
    return rebuild_with_backbone(path, "adaptation", "an adaptation model", lambda backbone, cfg: AdaptationModel(
        backbone, cfg["num_classes"], cfg["bottleneck_dim"], cfg.get("discriminator_hidden"), cfg.get("condition"),
        cfg.get("randomized_dim", 1024), cfg.get("adversarial_head", False)))


register_kind("adaptation", load_adaptation_model)
