"""Exporting the pre-trained encoder alone."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from visrep.engine.config import BackboneConfig
from visrep.engine.export import full_state_dict


def export_backbone(accelerator, model: nn.Module, out_dir: str | Path, backbone: BackboneConfig, data_config: dict,
                    prefix: str = "backbone.", extra: dict | None = None, state: dict | None = None) -> None:
    """Write the online backbone of a (prepared) ``visrep.ssl.BYOL`` as an exported model:
    ``out_dir/model.safetensors`` with the backbone's own key names (timm's, for timm backbones) and
    ``out_dir/config.json`` (``num_classes`` 0). Loadable with
    ``visrep.zoo.create_backbone(name, checkpoint=out_dir/'model.safetensors', **kwargs)`` or
    ``visrep.engine.export.load_model(out_dir)``. Call on every rank: ``get_state_dict`` gathers
    ZeRO-3 shards; the main process writes."""
    from safetensors.torch import save_file

    from visrep.engine.export import CONFIG_NAME, WEIGHTS_NAME
    from visrep.engine.io import atomic_write_json
    from visrep.engine.config import to_dict

    state = full_state_dict(accelerator, model) if state is None else state
    if not accelerator.is_main_process:
        return
    tensors = {k[len(prefix):]: v.detach().to("cpu").contiguous() for k, v in state.items() if k.startswith(prefix)}
    if not tensors:
        raise KeyError(f"no parameters under '{prefix}' in the model's state dict")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    cfg = {"architecture": backbone.name, "num_classes": 0, "small_input": backbone.small_input,
           "kwargs": to_dict(backbone.kwargs), "data_config": to_dict(data_config), "library": "visrep",
           "pretraining": "byol"}
    cfg.update(extra or {})
    atomic_write_json(out / CONFIG_NAME, cfg)


def export_byol(accelerator, model: nn.Module, out_dir: str | Path, backbone: BackboneConfig, data_config: dict,
                extra: dict | None = None) -> None:
    """A finished BYOL stage: ``out_dir/model.safetensors`` holds the whole module (online, target,
    probe; what ``--resume`` reloads) and ``out_dir/backbone/`` the exported encoder alone (see
    ``export_backbone``)."""
    from safetensors.torch import save_file

    from visrep.engine.export import WEIGHTS_NAME

    state = full_state_dict(accelerator, model)  # gathers ZeRO-3 shards
    if accelerator.is_main_process:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(out / WEIGHTS_NAME),
                  metadata={"format": "pt"})
    export_backbone(accelerator, model, Path(out_dir) / "backbone", backbone, data_config, extra=extra, state=state)
