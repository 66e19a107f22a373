"""Exported models: ``model.safetensors`` + ``config.json`` in one directory.

This is the form a finished stage leaves in ``RUN_DIR/models/STAGE`` and the form a later recipe
(a distillation teacher, a fine-tuning start) loads back. Loading never unpickles: safetensors only,
keys checked strictly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from torch import nn

from visrep.engine.config import BackboneConfig, to_dict
from visrep.engine.distributed import engine_precision, full_fp32_parameters, gathered, is_zero3
from visrep.engine.io import atomic_write_json, is_writer
from visrep.errors import MissingFileError

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def export_model(accelerator, model: nn.Module, out_dir: str | Path, backbone: BackboneConfig, num_classes: int,
                 data_config: dict, extra: Optional[dict] = None) -> None:
    """Call on every rank (DeepSpeed ZeRO-3 gathers the shards); the main process writes."""
    from safetensors.torch import save_file

    state = full_state_dict(accelerator, model)
    if not is_writer(accelerator):
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = {"architecture": backbone.name, "num_classes": int(num_classes), "small_input": backbone.small_input,
           "kwargs": to_dict(backbone.kwargs), "data_config": to_dict(data_config), "library": "visrep"}
    cfg.update(extra or {})
    atomic_write_json(out / CONFIG_NAME, cfg)


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
    path = Path(path)
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file():
        raise MissingFileError(f"'{path}' is not an exported visrep model: '{cfg_file}' is missing. Expected a "
                                f"directory with {WEIGHTS_NAME} and {CONFIG_NAME} (e.g. RUN_DIR/models/STAGE).")
    return json.loads(cfg_file.read_text())


def load_model(path: str | Path, **overrides: Any) -> tuple[nn.Module, dict]:
    """Rebuild an exported model with the zoo and load its weights strictly. Returns (model, config)."""
    from visrep.zoo import create_backbone

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
