"""The table of registered backbones and ``register_backbone``: the bottom of the zoo, which the model
modules import to register themselves (``visrep.zoo.registry`` builds from it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: ``builder(num_classes=, in_chans=, small_input=, pretrained=, **kw)``."""
    name: str
    builder: Callable[..., nn.Module]
    source: str = "visrep"       # "visrep" (written here), "timm" or "tv"
    target: str | None = None    # the model's name in its source library
    description: str = ""
    pretrained: bool = False     # whether ``pretrained=True`` can load anything
    paper: str = ""
    tags: tuple = field(default_factory=tuple)


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, builder: Callable[..., nn.Module] | None = None, *, source: str = "visrep",
                      target: str | None = None, description: str = "", pretrained: bool = False,
                      paper: str = "", tags=(), overwrite: bool = False):
    """Register ``builder`` under ``name``; usable as a decorator (``@register_backbone("mynet")``).

    The builder is called as ``builder(num_classes=..., in_chans=..., small_input=..., **kwargs)``
    (plus ``pretrained=True`` when asked and the entry declares ``pretrained=True``) and must return
    a module that follows the zoo contract (see ``visrep.zoo``).
    """
    def _add(fn):
        if name in _REGISTRY and not overwrite:
            raise KeyError(f"backbone {name!r} is already registered (pass overwrite=True to replace it)")
        desc = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = BackboneEntry(name, fn, source, target or name, desc, pretrained, paper, tuple(tags))
        return fn

    return _add(builder) if builder is not None else _add
