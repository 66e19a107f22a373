"""Where a fine-tuning run starts: a zoo model (random or pretrained), an exported model of this
project (``RUN_DIR/models/STAGE``: a distilled student, a trained classifier), or a bare backbone state
dict in ``.safetensors`` (a BYOL online encoder). The classifier is replaced for the new classes."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

from torch import nn

from visrep.engine.config import BackboneConfig
from visrep.errors import DataError, MissingFileError
from visrep.checks import check
from visrep.transfer.finetune import head_param_names
from visrep.zoo import create_backbone
from visrep.engine.export import load_model

HEAD_PREFIXES = ("fc.", "head.", "classifier.", "head.fc.")
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.", "encoder.", "online.backbone.", "online_network.backbone.",
                    "model.")


@dataclasses.dataclass
class InitConfig:
    source: Literal["train", "scratch", "pretrained", "export", "safetensors"] = "train"
    """train: model.name trained on a labelled source domain first (by the recipe); scratch: model.name at random init; pretrained: model.name with timm/torchvision weights; export: an
    exported model of this project (path = RUN_DIR/models/STAGE); safetensors: a backbone state dict
    (path = FILE.safetensors) loaded into model.name (prefixes such as 'backbone.' stripped, head keys
    dropped, every backbone key required)."""
    path: Optional[str] = None
    model: BackboneConfig = dataclasses.field(default_factory=lambda: BackboneConfig(name="resnet20"))
    train_epochs: int = 10
    """source=train: epochs on the source domain."""

    def validate(self, prefix: str) -> None:
        check(self.source in ("train", "scratch", "pretrained") or bool(self.path), f"{prefix}path", self.path,
              f"a path when {prefix}source is '{self.source}'")


def load_backbone_weights(model: nn.Module, path: str | Path) -> dict:
    """Load a backbone state dict into ``model``: strip a common wrapper prefix, ignore classifier
    keys, require every non-classifier key of ``model`` with its shape. Returns what was dropped."""
    from safetensors.torch import load_file


    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"backbone weights '{path}' not found (expected a .safetensors file)")
    sd = load_file(str(path))
    for pre in WRAPPER_PREFIXES:
        if sd and all(k.startswith(pre) for k in sd):
            sd = {k[len(pre):]: v for k, v in sd.items()}
    head = {n.rsplit(".", 1)[0] + "." for n in head_param_names(model)}
    own = model.state_dict()
    dropped = [k for k in sd if k not in own or any(k.startswith(h) for h in head)]
    sd = {k: v for k, v in sd.items() if k not in dropped}
    missing = [k for k in own if k not in sd and not any(k.startswith(h) for h in head)]
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in sd.items()
              if v.shape != own[k].shape]
    if missing or shapes:
        raise DataError(f"'{path}' does not fit {getattr(model, 'zoo_name', type(model).__name__)}: "
                         f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}; shape mismatches {shapes[:8]}"
                         f"; keys ignored: {dropped[:8]}")
    model.load_state_dict(sd, strict=False)
    return {"dropped": dropped, "loaded": len(sd)}


def build_start_model(init: InitConfig, num_classes: int) -> tuple[nn.Module, BackboneConfig, dict]:
    """The starting model with a fresh ``num_classes`` classifier, its BackboneConfig (for export) and
    what was loaded."""
    if init.source == "export":
        model, cfg = load_model(init.path)
        bb = BackboneConfig(name=cfg["architecture"], small_input=bool(cfg.get("small_input", False)),
                            kwargs=dict(cfg.get("kwargs") or {}))
        info = {"from": str(init.path), "source_classes": int(cfg["num_classes"])}
    else:  # train (the recipe trains it afterwards), scratch, pretrained, safetensors
        bb = dataclasses.replace(init.model, pretrained=init.source == "pretrained", checkpoint=None)
        model = create_backbone(bb.name, pretrained=bb.pretrained, num_classes=num_classes,
                                small_input=bb.small_input, **bb.kwargs,
                                grad_checkpointing=bb.grad_checkpointing)
        info = {"from": init.source}
        if init.source == "safetensors":
            info.update(load_backbone_weights(model, init.path), **{"from": str(init.path)})
    model.reset_classifier(num_classes)
    bb = dataclasses.replace(bb, pretrained=False, checkpoint=None)
    return model, bb, info
