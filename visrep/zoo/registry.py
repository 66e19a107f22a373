"""One registry for every backbone: ``create_backbone``, ``list_backbones``, ``register_backbone``.

Names resolve as follows:

* ``timm:NAME`` -- any ``timm`` model (``timm.list_models()``), adapted to the contract.
* ``tv:NAME`` -- a ``torchvision`` classification model of a supported family
  (see :data:`visrep.zoo.tv_backbones.TV_FAMILIES`).
* ``hf:REPO`` or ``hf:/path/to/dir`` -- a ``transformers`` vision model (see :mod:`visrep.zoo.hf_models`).
* ``visrep:NAME`` or a plain ``NAME`` -- the registered entry; its ``source`` says where a plain
  name comes from (``visrep zoo list`` prints it).
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import os
import time
import urllib.error
import warnings
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch.nn as nn

from .entries import _REGISTRY, BackboneEntry, register_backbone
from .errors import CheckpointMismatchError, PretrainedWeightsUnavailable, UnknownBackboneError
from .features import FeatureExtractor
from .net import offline, reachable

__all__ = ["BackboneEntry", "register_backbone", "create_backbone", "list_backbones", "get_backbone_entry",
           "get_data_config", "load_checkpoint", "save_checkpoint"]


_PREFIXES: dict[str, Callable[..., nn.Module]] = {}
# the libraries whose every model is a backbone: prefix -> (module, its builder, library name)
_LIBRARY_PREFIXES = {"timm:": (".timm_backbones", "create_timm_backbone", "timm"),
                     "tv:": (".tv_backbones", "create_tv_backbone", "torchvision"),
                     "hf:": (".hf_models", "create_hf_backbone", "transformers")}
PREFIX_ENTRY_POINTS = "visrep.zoo_prefixes"


def register_prefix(prefix: str, loader: Callable[..., nn.Module]) -> None:
    """Names starting with ``prefix`` (e.g. ``"hf-hub:"``) are built by ``loader(name, num_classes=...,
    in_chans=..., small_input=..., features_only=..., out_indices=..., **kwargs)``. The zoo imports
    nothing of ours: code that can load such names registers here, or declares an entry point in the
    group ``visrep.zoo_prefixes`` (name: the prefix without its colon) so that installed packages work
    without being imported first."""
    _PREFIXES[prefix] = loader


def _prefix_loader(name: str):
    """(prefix, loader) for a name with a registered prefix, else None."""
    for prefix, loader in _PREFIXES.items():
        if name.startswith(prefix):
            return prefix, loader
    if ":" not in name or name.startswith(("timm:", "tv:", "visrep:")):  # no plugin scan for the zoo's own
        return None
    from importlib.metadata import entry_points

    for ep in entry_points(group=PREFIX_ENTRY_POINTS):
        prefix = ep.name + ":"
        if name.startswith(prefix):
            _PREFIXES[prefix] = ep.load()
            return prefix, _PREFIXES[prefix]
    return None


def _ensure_builtin():
    # importing the model modules registers them
    from . import models  # noqa: F401


def get_backbone_entry(name: str) -> BackboneEntry:
    """The entry a name resolves to (prefixes ``timm:``, ``tv:``, ``visrep:`` included)."""
    _ensure_builtin()
    for prefix, (module, builder, library) in _LIBRARY_PREFIXES.items():
        if name.startswith(prefix):
            create = getattr(importlib.import_module(module, __package__), builder)
            target = name[len(prefix):]
            return BackboneEntry(name, functools.partial(create, target), prefix[:-1], target,
                                 f"{library} model {target}", True)
    plain = name[7:] if name.startswith("visrep:") else name
    if plain not in _REGISTRY:
        close = difflib.get_close_matches(plain, list(_REGISTRY), n=5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownBackboneError(f"unknown backbone {name!r}.{hint} See list_backbones() / `visrep zoo list`, "
                       "or use a 'timm:NAME', 'tv:NAME' or 'hf-hub:USER/REPO' name.")
    return _REGISTRY[plain]


def list_backbones(pattern: str | None = None, source: str | None = None) -> list[str]:
    """Sorted registered names matching a glob ``pattern`` (``*`` appended if it has no wildcard).

    ``list_backbones("timm:vit*")`` / ``list_backbones("tv:res*")`` list the source library's names.
    """
    _ensure_builtin()
    if pattern and pattern.startswith("timm:"):
        import timm
        return [f"timm:{n}" for n in timm.list_models(pattern[5:] or "*")]
    if pattern and pattern.startswith("tv:"):
        from .tv_backbones import list_tv_models
        return [f"tv:{n}" for n in list_tv_models(pattern[3:] or "*")]
    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    names = [n for n, e in _REGISTRY.items()
             if (pattern is None or fnmatch.fnmatch(n, pattern)) and (source is None or e.source == source)]
    return sorted(names)


# --------------------------------------------------------------------------- pretrained weights

def _offline() -> bool:
    return offline()


def _weight_locations(entry: BackboneEntry) -> tuple[list[str], bool]:
    """(hosts the weights would come from, whether a local cached copy exists)."""
    if entry.source == "timm" and (entry.target or "").startswith("hf-hub:"):
        from .timm_backbones import hf_hub_snapshot
        return ["huggingface.co"], hf_hub_snapshot(entry.target[len("hf-hub:"):]) is not None
    if entry.source == "timm":
        from timm.models import get_pretrained_cfg
        try:
            cfg = get_pretrained_cfg(entry.target)
        except Exception:
            cfg = None
        if cfg is None:
            return [], False
        hosts, cached = [], False
        if cfg.file and Path(cfg.file).exists():
            return [], True
        if cfg.hf_hub_id:
            hosts.append("huggingface.co")
            try:
                from huggingface_hub import try_to_load_from_cache
                repo = cfg.hf_hub_id.split("@")[0]
                for fname in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else
                              ["model.safetensors", "open_clip_pytorch_model.bin", "pytorch_model.bin"]):
                    if isinstance(try_to_load_from_cache(repo, fname), str):
                        cached = True
            except Exception:
                pass
        if cfg.url:
            hosts.append(urlparse(cfg.url).hostname or "")
            cached = cached or _torch_hub_cached(cfg.url)
        return hosts, cached
    if entry.source == "tv":
        from .tv_backbones import tv_weights_url
        url = tv_weights_url(entry.target)
        if url is None:
            return [], False
        return [urlparse(url).hostname or ""], _torch_hub_cached(url)
    if entry.source == "hf":
        from .hf_models import hf_files_cached
        return ["huggingface.co"], hf_files_cached(entry.target)
    return [], False


def _torch_hub_cached(url: str) -> bool:
    import torch.hub
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)).exists()


def _unavailable(name: str, entry: BackboneEntry, reason: str) -> PretrainedWeightsUnavailable:
    how = {
        "timm": f"import timm; m = timm.create_model({entry.target!r}, pretrained=True)",
        "tv": f"import torchvision; m = torchvision.models.get_model({entry.target!r}, weights='DEFAULT')",
        "hf": f"import transformers; m = transformers.AutoModel.from_pretrained({entry.target!r})",
    }.get(entry.source, "")
    msg = (f"pretrained weights for {name!r} ({entry.source}:{entry.target}) are unavailable: {reason}. "
           "No random init was substituted. To use weights from a local file, save a state dict of this "
           "architecture as safetensors (e.g. `safetensors.torch.save_file(create_backbone("
           f"{name!r}, num_classes=N).state_dict(), 'w.safetensors')` after loading the weights"
           + (f" on a machine with network access: `{how}`" if how else "") +
           f") and pass create_backbone({name!r}, checkpoint='w.safetensors', num_classes=N). "
           "If the weights are already downloaded, point HF_HOME / TORCH_HOME at that cache.")
    return PretrainedWeightsUnavailable(msg)


def _check_pretrained(name: str, entry: BackboneEntry) -> None:
    if not entry.pretrained:
        raise _unavailable(name, entry, "no pretrained weights are published for this architecture")
    hosts, cached = _weight_locations(entry)
    if cached:
        return
    if entry.source == "timm" and not hosts:
        raise _unavailable(name, entry, "timm lists no pretrained weights for it")
    if entry.source == "timm" and (entry.target or "").startswith("hf-hub:"):
        repo = entry.target[len("hf-hub:"):]
        need = (f"the Hugging Face repo {repo!r} needs network access to huggingface.co or a cached copy of it "
                "(config.json and weights) in the Hugging Face cache (HF_HUB_CACHE / HF_HOME)")
        if _offline():
            raise _unavailable(name, entry, f"offline mode (HF_HUB_OFFLINE / VISREP_OFFLINE) and no cached "
                                            f"copy; {need}")
        if not reachable("huggingface.co", timeout=3.0):
            raise _unavailable(name, entry, f"cannot connect to huggingface.co and no cached copy; {need}")
        return
    if _offline():
        raise _unavailable(name, entry, "offline mode (HF_HUB_OFFLINE / VISREP_OFFLINE) and no cached copy")
    if hosts and not any(reachable(h, timeout=3.0) for h in hosts if h):
        raise _unavailable(name, entry, f"cannot connect to {', '.join(h for h in hosts if h)} and no cached copy")


_NET_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError, urllib.error.URLError, TimeoutError)


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Save ``model.state_dict()`` as safetensors (what ``checkpoint=`` loads)."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a safetensors state dict strictly; ``CheckpointMismatchError`` names every bad key."""
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix != ".safetensors":
        raise ValueError(f"checkpoint must be a .safetensors file, got {path}")
    sd = load_file(str(path))
    if sd and all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def _fmt(title, items):
            if not items:
                return ""
            more = f" ... (+{len(items) - 10} more)" if len(items) > 10 else ""
            return f"\n  {title} ({len(items)}): {', '.join(items[:10])}{more}"
        hint = ""
        if any(k.split(".")[0] in ("fc", "head", "classifier") for k in missing + unexpected):
            hint = ("\n  hint: classifier keys differ; create the model with the checkpoint's num_classes "
                    "(then reset_classifier) or save it without the head.")
        raise CheckpointMismatchError(
            f"checkpoint {path} does not match {type(model).__name__}:"
            + _fmt("missing keys", missing) + _fmt("unexpected keys", unexpected)
            + _fmt("shape mismatches", shapes) + hint)
    model.load_state_dict(sd, strict=True)
    return model


# --------------------------------------------------------------------------- create

_CONTRACT = ("num_classes", "num_features", "forward_features", "forward_head", "reset_classifier",
             "feature_info", "data_config")


def create_backbone(name: str, pretrained: bool = False, num_classes: int = 0, in_chans: int = 3,
                    features_only: bool = False, out_indices=None, checkpoint: str | os.PathLike | None = None,
                    small_input: bool = False, grad_checkpointing: bool = False, **kwargs) -> nn.Module:
    """Build a backbone by name (see the module docstring for how names resolve).

    ``num_classes=0``: no classifier, ``forward`` returns pooled ``num_features``-wide features.
    ``small_input``: the 32x32 variant of a CNN (3x3 stride-1 stem, no early max-pool).
    ``pretrained``: weights through timm/torchvision, else ``PretrainedWeightsUnavailable``.
    ``checkpoint``: a local ``.safetensors`` state dict loaded strictly (after construction).
    ``features_only``: a ``FeatureExtractor`` returning the feature maps of ``out_indices``.
    ``grad_checkpointing``: recompute activations in the backward (``model.set_grad_checkpointing``, which
    the zoo's own models and timm's have); a model without it is a ValueError naming it.
    Extra ``kwargs`` go to the builder (timm kwargs such as ``drop_rate``, ``img_size``; ``width``).
    """
    found = _prefix_loader(name)
    if found is not None:  # e.g. hf-hub:USER/REPO, registered by the code that knows the Hub
        if pretrained or checkpoint is not None:
            raise ValueError(f"{name!r} loads its own weights ({found[0]} names); drop pretrained=/checkpoint=")
        return _checkpointed(found[1](name, num_classes=num_classes, in_chans=in_chans, small_input=small_input,
                                      features_only=features_only, out_indices=out_indices, **kwargs),
                             name, grad_checkpointing)
    entry = get_backbone_entry(name)
    if pretrained and checkpoint is not None:
        raise ValueError("pass either pretrained=True or checkpoint=..., not both")
    if pretrained:
        t0 = time.perf_counter()
        _check_pretrained(name, entry)
        if small_input:
            warnings.warn(f"{name}: small_input=True replaces the stem, so its pretrained weights are not used",
                          stacklevel=2)
    call = dict(num_classes=num_classes, in_chans=in_chans, small_input=small_input, **kwargs)
    if pretrained:
        call["pretrained"] = True
    try:
        model = entry.builder(**call)
    except _NET_ERRORS as e:
        if pretrained:
            raise _unavailable(name, entry, f"download failed after {time.perf_counter() - t0:.1f}s "
                                            f"({type(e).__name__}: {e})") from e
        raise
    except RuntimeError as e:
        if pretrained and "pretrained" in str(e).lower():
            raise _unavailable(name, entry, str(e)) from e
        raise
    missing = [a for a in _CONTRACT if not hasattr(model, a)]
    if missing:
        raise TypeError(f"builder of {name!r} returned a {type(model).__name__} without {missing}")
    model.zoo_name = name
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    _checkpointed(model, name, grad_checkpointing)
    if features_only:
        model = FeatureExtractor(model, out_indices)
        model.zoo_name = name
    return model


def _checkpointed(model: nn.Module, name: str, enable: bool) -> nn.Module:
    if enable:
        target = getattr(model, "model", model)  # a FeatureExtractor's backbone
        if not callable(getattr(target, "set_grad_checkpointing", None)):
            raise ValueError(f"{name!r} ({type(target).__name__}) has no gradient checkpointing; set "
                             f"grad_checkpointing false for it")
        target.set_grad_checkpointing(True)
    return model


def get_data_config(model: nn.Module) -> dict:
    """The model's data config: ``mean``, ``std``, ``input_size``, ``interpolation``, ``crop_pct``."""
    cfg = getattr(model, "data_config", None)
    if cfg is None:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)  # DDP / torch.compile
        if inner is not None:
            return get_data_config(inner)
        raise AttributeError(f"{type(model).__name__} has no data_config; build it with create_backbone")
    return dict(cfg)
