"""timm models behind the zoo contract.

timm models already carry ``num_features``, ``forward_features``, ``forward_head``,
``reset_classifier`` and ``feature_info``; this module only adds ``data_config``, the 32x32
``small_input`` variants, and makes ``num_features`` mean the pooled pre-logits width where timm
keeps that separately (``head_hidden_size``: MobileNetV3, VGG).
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .base import make_data_config
from .features import measure_feature_info


class _PreLogitsWidth:
    """Mixin: ``num_features`` reports timm's ``head_hidden_size`` (the pooled pre-logits width)."""

    def reset_classifier(self, num_classes, *args, **kwargs):
        self.num_features = self._timm_num_features
        try:
            return super().reset_classifier(num_classes, *args, **kwargs)
        finally:
            self.num_features = self.head_hidden_size


_FIXED: dict[type, type] = {}


def _prelogits_class(cls: type) -> type:
    if cls not in _FIXED:
        new = type(f"Zoo{cls.__name__}", (_PreLogitsWidth, cls), {"__module__": __name__})
        globals()[new.__name__] = new  # picklable by qualified name
        _FIXED[cls] = new
    return _FIXED[cls]


def _small_input_kwargs(name: str, kwargs: dict) -> dict:
    kwargs = dict(kwargs)
    if name.startswith(("vit_", "deit_")):
        kwargs.setdefault("img_size", 32)
        kwargs.setdefault("patch_size", 4)
    elif name.startswith("swin"):
        kwargs.setdefault("img_size", 32)
        kwargs.setdefault("patch_size", 2)
        kwargs.setdefault("window_size", 4)
    return kwargs


def _stride1_conv3x3(conv: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=conv.bias is not None)


def _patch_small_input(model: nn.Module, name: str) -> None:
    """3x3 stride-1 stem and no early downsampling (the usual CIFAR variants)."""
    from timm.models.convnext import ConvNeXt
    from timm.models.densenet import DenseNet
    from timm.models.efficientnet import EfficientNet
    from timm.models.mobilenetv3 import MobileNetV3
    from timm.models.resnet import ResNet

    if isinstance(model, ResNet):
        if isinstance(model.conv1, nn.Conv2d):
            model.conv1 = _stride1_conv3x3(model.conv1)
        else:  # deep stem: first conv to stride 1
            first = next(m for m in model.conv1.modules() if isinstance(m, nn.Conv2d))
            first.stride = (1, 1)
        model.maxpool = nn.Identity()
    elif isinstance(model, (EfficientNet, MobileNetV3)):
        model.conv_stem.stride = (1, 1)
        # MobileNetV2-on-CIFAR: the first strided block also keeps resolution (32 -> 4x4 at the end)
        first = next((m for m in model.blocks.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)), None)
        if first is not None:
            first.stride = (1, 1)
    elif isinstance(model, DenseNet):
        model.features.conv0 = _stride1_conv3x3(model.features.conv0)
        model.features.pool0 = nn.Identity()
    elif isinstance(model, ConvNeXt):
        model.stem[0] = _stride1_conv3x3(model.stem[0])
    elif name.startswith(("vit_", "deit_", "swin")):
        pass  # handled by constructor kwargs
    else:
        raise ValueError(f"small_input=True is not defined for timm model {name!r} "
                         "(supported: ResNet/ResNeXt/SE-ResNet, MobileNet/EfficientNet, DenseNet, ConvNeXt, ViT, Swin)")


def finalize(model: nn.Module, *, small_input: bool = False, in_chans: int = 3, img_size=None) -> nn.Module:
    """Attach ``data_config`` and fix ``num_features`` on a timm model (in place)."""
    model._zoo_source = "timm"
    hidden = getattr(model, "head_hidden_size", None)
    if hidden is not None and hidden != model.num_features:
        model._timm_num_features = model.num_features
        model.__class__ = _prelogits_class(type(model))
        model.num_features = hidden
    import timm.data

    cfg = timm.data.resolve_model_data_config(model)
    if img_size is not None:  # built for another resolution (ViT/Swin img_size=...)
        hw = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        input_size = (in_chans, *hw)
    else:
        input_size = (in_chans, 32, 32) if small_input else (in_chans, *cfg["input_size"][1:])
    model.data_config = make_data_config(input_size, cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"),
                                         1.0 if small_input else cfg.get("crop_pct", 0.875))
    if small_input:
        model.feature_info = measure_feature_info(model, input_size)
    return model


HF_HUB_PREFIX = "hf-hub:"
# what timm's hf-hub loader reads besides config.json (timm.models._hub: safetensors first)
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                   "open_clip_pytorch_model.bin")


def hf_hub_snapshot(model_id: str) -> Path | None:
    """The folder of a cached copy of the Hub repo ``USER/REPO[@REVISION]`` (its ``config.json`` and a weights
    file, in huggingface_hub's cache: ``HF_HUB_CACHE`` / ``HF_HOME``), or ``None`` when there is none."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, _, revision = model_id.partition("@")
    cfg = try_to_load_from_cache(repo, "config.json", revision=revision or None)
    if not isinstance(cfg, str):
        return None
    folder = Path(cfg).parent
    return folder if any((folder / f).is_file() for f in HF_WEIGHT_FILES) else None


def _hf_hub_source(name: str) -> str:
    """``hf-hub:USER/REPO`` for timm's own hf-hub loading, or ``local-dir:SNAPSHOT`` (timm's local-folder
    loading of the very same files) when the repo is cached and the Hub cannot be asked: offline mode, or
    huggingface.co unreachable (then huggingface_hub would first wait on the network)."""
    from .net import offline, reachable

    local = hf_hub_snapshot(name[len(HF_HUB_PREFIX):])
    if local is not None and (offline() or not reachable("huggingface.co", timeout=3.0)):
        return f"local-dir:{local}"
    return name


def create_timm_backbone(name: str, pretrained: bool = False, num_classes: int = 0, in_chans: int = 3,
                         small_input: bool = False, **kwargs) -> nn.Module:
    """``timm.create_model`` + the zoo contract. ``hf-hub:USER/REPO`` names load through timm's hf-hub
    support (its ``config.json`` and weights), from the local Hugging Face cache when offline."""
    if pretrained and name.startswith(HF_HUB_PREFIX):
        name = _hf_hub_source(name)
    if small_input:
        kwargs = _small_input_kwargs(name, kwargs)
    import timm

    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    model._zoo_source = "timm"
    if small_input:
        _patch_small_input(model, name)
    return finalize(model, small_input=small_input, in_chans=in_chans, img_size=kwargs.get("img_size"))
