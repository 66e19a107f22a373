"""Exporting the pre-trained encoder alone."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from visrep.engine.config import BackboneConfig
from visrep.engine.export import backbone_config, write_export


def export_backbone(accelerator, model: nn.Module, out_dir: str | Path, backbone: BackboneConfig, data_config: dict,
                    prefix: str = "backbone.", extra: dict | None = None, state: dict | None = None) -> None:
    """Write the online backbone of a (prepared) ``visrep.ssl.BYOL`` as an exported model (kind
    ``backbone``): ``out_dir/model.safetensors`` with the backbone's own key names (timm's, for timm
    backbones) and ``out_dir/config.json`` (``num_classes`` 0). Loadable with
    ``visrep.zoo.create_backbone(name, checkpoint=out_dir/'model.safetensors', **kwargs)`` or
    ``visrep.engine.export.load_model(out_dir)``. Call on every rank: ZeRO-3 shards are gathered; the main
    process writes."""
    write_export(accelerator, model, out_dir, "backbone",
                 {**backbone_config(backbone, 0, data_config), "pretraining": "byol", **(extra or {})},
                 prefix=prefix, state=state)


def export_byol(accelerator, model: nn.Module, out_dir: str | Path, backbone: BackboneConfig, data_config: dict,
                extra: dict | None = None) -> None:
    """A finished BYOL stage: ``out_dir`` holds the whole module (kind ``byol``: online, target, probe; what
    ``--resume`` reloads) and ``out_dir/backbone/`` the exported encoder alone (see ``export_backbone``)."""
    state = write_export(accelerator, model, out_dir, "byol",
                         {**backbone_config(backbone, 0, data_config), **(extra or {})})
    export_backbone(accelerator, model, Path(out_dir) / "backbone", backbone, data_config, extra=extra, state=state)
