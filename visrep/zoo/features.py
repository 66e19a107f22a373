"""``features_only``: the pyramid of feature maps named by a model's ``feature_info``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class _Stop(Exception):
    pass


def _tokens_to_map(t: torch.Tensor, info: dict, x: torch.Tensor) -> torch.Tensor:
    """NHWC (Swin-style) -> NCHW; other shapes unchanged."""
    if t.ndim == 4 and t.shape[1] != info["num_chs"] and t.shape[-1] == info["num_chs"]:
        return t.permute(0, 3, 1, 2).contiguous()
    return t


def collect_features(model: nn.Module, x: torch.Tensor, indices) -> list[torch.Tensor]:
    """Feature maps (NCHW) of ``model.feature_info[i]`` for ``i`` in ``indices``.

    Uses timm's ``forward_intermediates`` where the model has one, else forward hooks on the
    named modules while ``forward_features`` runs (stopping after the last one).
    """
    indices = list(indices)
    if hasattr(model, "forward_intermediates") and getattr(model, "_zoo_source", "") == "timm":
        return list(model.forward_intermediates(x, indices=indices, intermediates_only=True))
    infos = [model.feature_info[i] for i in indices]
    names = [f["module"] for f in infos]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise KeyError(f"feature_info names modules that do not exist: {missing}")
    outs: dict[str, torch.Tensor] = {}
    last = names[-1] if names else None
    order = {n: i for i, n in enumerate(names)}

    def hook(name):
        def fn(_m, _inp, out):
            outs[name] = out
            if len(outs) == len(order) and name == last:
                raise _Stop
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in dict.fromkeys(names)]
    try:
        model.forward_features(x)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return [_tokens_to_map(outs[n], f, x) for n, f in zip(names, infos)]


class FeatureExtractor(nn.Module):
    """Wraps a backbone; ``forward(x)`` returns the list of feature maps for ``out_indices``.

    ``feature_info`` lists the selected entries (``num_chs``, ``reduction``, ``module``);
    ``data_config`` is the backbone's. The backbone's head is pruned so that no parameter is
    left unused (DDP-friendly).
    """

    def __init__(self, model: nn.Module, out_indices=None):
        super().__init__()
        n = len(model.feature_info)
        if out_indices is None:
            out_indices = range(n)
        elif isinstance(out_indices, int):
            out_indices = range(n - out_indices, n)
        bad = [i for i in out_indices if not -n <= int(i) < n]
        if bad:
            raise IndexError(f"out_indices {bad} out of range for {n} feature levels")
        self.out_indices = tuple(int(i) % n for i in out_indices)
        self.feature_info = [dict(model.feature_info[i]) for i in self.out_indices]
        self.data_config = dict(getattr(model, "data_config", {}))
        self._prune(model)
        self.model = model

    def _prune(self, model):
        if getattr(model, "_zoo_source", "") == "timm" and hasattr(model, "prune_intermediate_layers"):
            try:
                model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
            except Exception:  # pruning is an optimisation only
                pass
        elif hasattr(model, "prune_for_features"):
            model.prune_for_features([f["module"] for f in self.feature_info])

    def forward(self, x):
        return collect_features(self.model, x, self.out_indices)


def nominal_reduction(r: float) -> int:
    """Nearest power of two: unpadded convs give e.g. 224 / 55 = 4.07 for a stride-4 stage."""
    return int(2 ** round(math.log2(max(r, 1.0))))


@torch.no_grad()
def measure_feature_info(model: nn.Module, input_size=(3, 64, 64)) -> list[dict]:
    """Re-derive ``num_chs`` and ``reduction`` of every ``feature_info`` entry from a probe forward."""
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, *input_size)
        maps = collect_features(model, x, range(len(model.feature_info)))
    finally:
        model.train(was_training)
    info = []
    for f, m in zip(model.feature_info, maps):
        f = dict(f)
        f["num_chs"] = int(m.shape[1])
        f["reduction"] = nominal_reduction(input_size[-1] / m.shape[-1])
        info.append(f)
    return info
