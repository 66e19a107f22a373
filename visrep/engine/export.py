"""Exported models: ``model.safetensors`` + ``config.json`` in one directory.

This is the form a finished stage leaves in ``RUN_DIR/models/STAGE`` and the form a later recipe
(a distillation teacher, a fine-tuning start) loads back. Loading never unpickles: safetensors only,
keys checked strictly.

Every export is written by :func:`write_export` and its ``config.json`` names its ``kind``:
``backbone`` (a zoo model, with or without a classifier), ``clip``, ``adaptation``, ... Each method
registers how its kind is loaded (:func:`register_kind`, or an entry point in the group
``visrep.kinds``); :func:`load_exported` and the Hub loaders dispatch on the kind and import no method.
"""
from __future__ import annotations

import json
from pathlib import Path
from importlib.metadata import entry_points
from typing import Any, Callable, Optional

from torch import nn

from visrep.engine.config import BackboneConfig, to_dict
from visrep.engine.distributed import engine_precision, full_fp32_parameters, gathered, is_zero3
from visrep.engine.io import atomic_write_json, is_writer
from visrep.errors import MissingFileError, UserError
from visrep.zoo import create_backbone

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
KIND_ENTRY_POINTS = "visrep.kinds"
HF_FILES_KEY = "hf_files"  # config.json: {dotted key naming a transformers model: its folder in the export}
HF_DIR = "hf"


def write_export(accelerator, model: Optional[nn.Module], out_dir: str | Path, kind: str, config: dict,
                 prefix: Optional[str] = None, state: Optional[dict] = None,
                 hf_names: Optional[dict[str, bool]] = None) -> dict:
    """The one exporter: ``out_dir/model.safetensors`` (the whole model's weights -- gathered from every
    rank's shards and, under DeepSpeed bf16/fp16, the fp32 masters -- or only the keys under ``prefix``,
    which is stripped) and ``out_dir/config.json`` (``{"kind": kind, "library": "visrep", **config}``).
    Call on every rank; the writing process writes. ``state``: an already gathered state dict. Returns
    the gathered state (empty where nothing is written under ZeRO-3), for a second export of a part.

    Transformers models the config names -- ``architecture`` when it is ``hf:...``, and the dotted keys of
    ``hf_names`` (value: with the tokenizer, e.g. ``{"model.text.name": True}``) -- travel with the export:
    their config (and tokenizer) files go to ``out_dir/hf/KEY``, listed under ``hf_files`` in config.json,
    and :func:`read_model_config` points those keys there, so the export loads without the original repo
    or folder."""
    from safetensors.torch import save_file

    state = full_state_dict(accelerator, model) if state is None else state
    if not is_writer(accelerator):
        return state
    tensors = {k[len(prefix or ""):]: v.detach().to("cpu").contiguous() for k, v in state.items()
               if prefix is None or k.startswith(prefix)}
    if not tensors:
        raise KeyError(f"no parameters under '{prefix}' in the model's state dict")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    carried = _carry_hf_files(out, config, hf_names or {})
    atomic_write_json(out / CONFIG_NAME, {"kind": kind, "library": "visrep", **config,
                                          **({HF_FILES_KEY: carried} if carried else {})})
    return state


def _slot(config: dict, key: str) -> tuple[dict, str] | None:
    """(the dict holding dotted ``key``, its last part) in a nested config, or None."""
    *parents, last = key.split(".")
    for part in parents:
        config = config.get(part)
        if not isinstance(config, dict):
            return None
    return (config, last) if isinstance(config.get(last), str) else None


def _carry_hf_files(out: Path, config: dict, hf_names: dict[str, bool]) -> dict[str, str]:
    """Write the files of the transformers models ``config`` names under ``out/hf``; {key: folder in out}."""
    from visrep.zoo.hf_models import PREFIX, save_hf_files

    names = dict(hf_names)
    if str(config.get("architecture", "")).startswith(PREFIX):
        names["architecture"] = False
    carried = {}
    for key, tokenizer in names.items():
        slot = _slot(config, key)
        if slot is None:
            raise KeyError(f"hf_names: '{key}' names no string in the export's config")
        name = slot[0][slot[1]]
        carried[key] = f"{HF_DIR}/{key}"
        save_hf_files(name[len(PREFIX):] if name.startswith(PREFIX) else name, out / carried[key], tokenizer)
    return carried


def point_into_export(config: dict, path: Path) -> dict:
    """The keys an export carries the transformers files of (``hf_files``) pointed at those files."""
    from visrep.zoo.hf_models import PREFIX

    for key, folder in (config.get(HF_FILES_KEY) or {}).items():
        slot = _slot(config, key)
        if slot is not None:
            parent, last = slot
            local = str((path / folder).resolve())
            parent[last] = PREFIX + local if parent[last].startswith(PREFIX) else local
    return config


def backbone_config(backbone: BackboneConfig, num_classes: int, data_config: dict) -> dict:
    """What rebuilds a zoo model: architecture, head, stem and builder kwargs, and its data config."""
    return {"architecture": backbone.name, "num_classes": int(num_classes), "small_input": backbone.small_input,
            "kwargs": to_dict(backbone.kwargs), "data_config": to_dict(data_config)}


def export_model(accelerator, model: nn.Module, out_dir: str | Path, backbone: BackboneConfig, num_classes: int,
                 data_config: dict, extra: Optional[dict] = None, kind: str = "backbone") -> None:
    """A zoo model (``kind`` backbone) or a model built around one (``extra`` describes the rest). Call on
    every rank (DeepSpeed ZeRO-3 gathers the shards); the main process writes."""
    write_export(accelerator, model, out_dir, kind, {**backbone_config(backbone, num_classes, data_config),
                                                     **(extra or {})})


# ----------------------------------------------------------------------------------------------
# Kinds
# ----------------------------------------------------------------------------------------------
_KINDS: dict[str, Callable[[Path], tuple[nn.Module, dict]]] = {}


def register_kind(kind: str, loader: Callable[[Path], tuple[nn.Module, dict]]) -> None:
    """Exports whose ``config.json`` says ``kind`` are loaded with ``loader(path) -> (model, config)``."""
    _KINDS[kind] = loader


def export_kind(config: dict) -> str:
    """The ``kind`` of an export's config (exports written before the key: adaptation models by their
    ``model_type``, everything else a backbone)."""
    vis = config.get("visrep", config)
    if vis.get("model_type") == "AdaptationModel":  # the marker adaptation exports have always carried
        return "adaptation"
    return str(vis.get("kind") or "backbone")


def kind_loader(kind: str) -> Callable[[Path], tuple[nn.Module, dict]]:
    """The registered loader of ``kind`` (installed packages' entry points included)."""
    if kind not in _KINDS:
        for ep in entry_points(group=KIND_ENTRY_POINTS):
            if ep.name == kind:
                _KINDS[kind] = ep.load()
                break
    if kind not in _KINDS:
        raise UserError(f"no loader is registered for exports of kind '{kind}' (known: {', '.join(sorted(_KINDS))}). "
                        f"Import the package that wrote it, or install it.")
    return _KINDS[kind]


def load_exported(path: str | Path, kind: Optional[str] = None) -> tuple[nn.Module, dict]:
    """Rebuild any export from its directory, dispatching on its kind; ``kind`` given: refuse another
    kind with a message naming both."""
    found = export_kind(read_model_config(path))
    if kind is not None and found != kind:
        raise WrongKindError(f"'{path}' holds a '{found}' model, not a '{kind}' model; load it with "
                             f"visrep.engine.export.load_exported('{path}').")
    return kind_loader(found)(Path(path))


class WrongKindError(UserError, ValueError):
    """An export of another kind than the one asked for."""


def full_state_dict(accelerator, model: nn.Module) -> dict:
    """The whole model's weights on the writing process(es) (empty elsewhere under ZeRO-3); call on every
    rank. Under DeepSpeed bf16/fp16 the parameters are the optimizer's fp32 master copies (the module holds
    rounded copies); under ZeRO-3 the shards are gathered -- no 16-bit-save switch needed."""
    if engine_precision(accelerator) is not None:
        unwrapped = accelerator.unwrap_model(model)
        masters = full_fp32_parameters(unwrapped)
        if not is_writer(accelerator):
            return {}
        state = {k: v for k, v in unwrapped.state_dict().items() if k not in masters}  # buffers (whole)
        state.update(masters)
        return {k: v.detach().to("cpu").clone() for k, v in state.items()}
    if is_zero3(accelerator):
        unwrapped = accelerator.unwrap_model(model)
        with gathered(list(unwrapped.parameters())):
            if is_writer(accelerator):
                return {k: v.detach().to("cpu").clone() for k, v in unwrapped.state_dict().items()}
        return {}
    return accelerator.get_state_dict(model)


def load_full_state_dict(accelerator, model: nn.Module, state: dict) -> None:
    """Load a whole-model state dict (strict) into a prepared model; under ZeRO-3 the partitioned
    parameters are gathered, filled on rank 0 and re-partitioned."""
    unwrapped = accelerator.unwrap_model(model)
    if is_zero3(accelerator):
        with gathered(list(unwrapped.parameters()), modifier_rank=0):
            if accelerator.is_main_process:
                unwrapped.load_state_dict(state, strict=True)
        for name, buf in unwrapped.named_buffers():  # buffers are not partitioned: every rank loads them
            if name in state:
                buf.copy_(state[name])
        return
    unwrapped.load_state_dict(state, strict=True)


def read_model_config(path: str | Path) -> dict:
    """An export's ``config.json``; the names of the transformers models it carries (``hf_files``) point into
    it (``hf:/abs/path/EXPORT/hf/architecture``), so what is rebuilt from the config needs nothing else."""
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise MissingFileError(f"'{path}' is not an exported visrep model: '{cfg_file}' is missing. Expected a "
                                f"directory with {WEIGHTS_NAME} and {CONFIG_NAME} (e.g. RUN_DIR/models/STAGE).")
    return point_into_export(json.loads(cfg_file.read_text()), path)


def load_model(path: str | Path, **overrides: Any) -> tuple[nn.Module, dict]:
    """Rebuild an exported model with the zoo and load its weights strictly. Returns (model, config)."""
    path = Path(path)
    cfg = read_model_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise MissingFileError(f"'{weights}' is missing; the export in '{path}' is incomplete.")
    kwargs = dict(cfg.get("kwargs") or {})
    kwargs.update(overrides)
    model = create_backbone(cfg["architecture"], num_classes=cfg["num_classes"], small_input=cfg.get("small_input", False),
                            checkpoint=str(weights), **kwargs)
    return model, cfg


def rebuild_with_backbone(path: str | Path, kind: str, what: str,
                          build: Callable[[nn.Module, dict], nn.Module]) -> tuple[nn.Module, dict]:
    """Rebuild a method's export that wraps a zoo backbone (an adaptation or segmentation model): check that
    ``path`` holds ``kind`` (``what`` names it in the error, e.g. "an adaptation model"), rebuild the headless
    backbone from ``config.json``, wrap it with ``build(backbone, config)`` and load the weights strictly."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = read_model_config(path)
    if export_kind(cfg) != kind:
        raise WrongKindError(f"'{path}' holds a '{export_kind(cfg)}' model, not {what}; load it "
                             f"with visrep.engine.export.load_exported('{path}').")
    backbone = create_backbone(cfg["architecture"], num_classes=0, small_input=cfg.get("small_input", False),
                               **(cfg.get("kwargs") or {}))
    model = build(backbone, cfg)
    model.load_state_dict(load_file(str(path / WEIGHTS_NAME)), strict=True)
    return model, cfg


register_kind("backbone", load_model)
