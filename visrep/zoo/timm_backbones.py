"""timm models behind the zoo contract.

timm models already carry ``num_features``, ``forward_features``, ``forward_head``,
``reset_classifier`` and ``feature_info``; this module only adds ``data_config``, the 32x32
``small_input`` variants, makes ``num_features`` mean the pooled pre-logits width where timm
keeps that separately (``head_hidden_size``: MobileNetV3, VGG), and builds the plain (no-shortcut)
counterpart of timm's ResNets with ``shortcut="none"`` (as ``plain20`` is ResNet-20's), and trains
Inception-v3's auxiliary classifier with ``aux_classifiers=True`` (:mod:`visrep.zoo.inception`).
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from .base import make_data_config
from .errors import BackboneArgumentError
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


class _PlainBasicBlock:
    """timm's ``BasicBlock`` without its shortcut -- the "plain" block of He et al. 2015 (arXiv:1512.03385),
    Sec. 4.1: ``act2(se(bn2(conv2(aa(act1(drop_block(bn1(conv1(x)))))))))``, no ``+ x``."""

    def forward(self, x):
        x = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        x = self.bn2(self.conv2(x))
        return self.act2(x if self.se is None else self.se(x))


class _PlainBottleneck:
    """timm's ``Bottleneck`` without its shortcut (He et al. 2015, Sec. 4.1):
    ``act3(se(bn3(conv3(aa(act2(drop_block(bn2(conv2(act1(bn1(conv1(x)))))))))))``, no ``+ x``."""

    def forward(self, x):
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        return self.act3(x if self.se is None else self.se(x))


_PLAIN: dict[type, type] = {}


def _plain_class(cls: type, mixin: type) -> type:
    if cls not in _PLAIN:
        new = type(f"Plain{cls.__name__}", (mixin, cls), {"__module__": __name__, "__doc__": mixin.__doc__})
        globals()[new.__name__] = new  # picklable by qualified name
        _PLAIN[cls] = new
    return _PLAIN[cls]


def _check_shortcut(name: str, shortcut, kwargs: dict) -> None:
    if shortcut != "none":
        raise BackboneArgumentError(f"shortcut={shortcut!r} for timm model {name!r}: the only option is "
                                    "shortcut='none' (a plain net, no shortcut); leave it out for timm's own.")
    for key in ("zero_init_last", "drop_path_rate"):
        if kwargs.get(key):
            raise BackboneArgumentError(
                f"{key}={kwargs[key]} cannot be combined with shortcut='none': it zeroes a block's whole output "
                f"when the block has no shortcut. Leave {key} out.")


def remove_shortcuts(model: nn.Module, name: str, pretrained: bool = False) -> nn.Module:
    """Make a timm ResNet (its blocks timm's ``BasicBlock`` / ``Bottleneck``: ResNet-18..152, SE-ResNet,
    ResNeXt, Wide ResNet) plain, in place: every block computes only its residual branch (its projection
    ``downsample`` is dropped), stages, ``feature_info`` and the head unchanged. timm zero-initialises each
    block's last BatchNorm scale (``zero_init_last``), which would make a plain block output zeros: with
    ``pretrained=False`` those scales are reset to 1."""
    from timm.models.resnet import BasicBlock, Bottleneck, ResNet

    plain = {BasicBlock: (_PlainBasicBlock, "bn2"), Bottleneck: (_PlainBottleneck, "bn3")}
    stages = [getattr(model, f"layer{i}", None) for i in range(1, 5)] if isinstance(model, ResNet) else []
    if not stages or any(s is None or any(type(b) not in plain for b in s) for s in stages):
        raise BackboneArgumentError(
            f"shortcut='none' is defined for timm ResNets built of BasicBlock / Bottleneck (resnet18..152, "
            f"seresnet*, resnext*, wide_resnet*); {name!r} is a {type(model).__name__}. Leave shortcut out "
            f"(the CIFAR ResNets take it too: plain20..plain110).")
    for stage in stages:
        for block in stage:
            mixin, last_bn = plain[type(block)]
            block.__class__ = _plain_class(type(block), mixin)
            block.downsample = None
            if not pretrained:
                nn.init.ones_(getattr(block, last_bn).weight)
    return model


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


def _check_aux(name: str, aux_classifiers, kwargs: dict) -> bool:
    if kwargs.get("aux_logits"):
        raise BackboneArgumentError(
            f"aux_logits=True for timm model {name!r} makes timm's forward return (logits, aux), not the zoo's "
            "logits; pass aux_classifiers=True instead (the aux logits are recorded in model.aux_logits).")
    kwargs.pop("aux_logits", None)
    if not aux_classifiers:
        return False
    from timm.models import get_arch_name

    if name.startswith(HF_HUB_PREFIX) or get_arch_name(name) != "inception_v3":
        raise BackboneArgumentError(
            f"aux_classifiers=True for timm model {name!r}: of the timm models only inception_v3 has an auxiliary "
            "classifier (googlenet has its two by default). Leave aux_classifiers out.")
    return True


def create_timm_backbone(name: str, pretrained: bool = False, num_classes: int = 0, in_chans: int = 3,
                         small_input: bool = False, shortcut: str | None = None, aux_classifiers: bool = False,
                         **kwargs) -> nn.Module:
    """``timm.create_model`` + the zoo contract. ``hf-hub:USER/REPO`` names load through timm's hf-hub
    support (its ``config.json`` and weights), from the local Hugging Face cache when offline.
    ``shortcut="none"``: the plain counterpart of a timm ResNet (:func:`remove_shortcuts`).
    ``aux_classifiers=True`` (inception_v3): its auxiliary classifier, whose logits a training forward records
    in ``model.aux_logits`` (:class:`visrep.zoo.inception.ZooInceptionV3`); ``forward`` still returns logits."""
    if shortcut is not None:
        _check_shortcut(name, shortcut, kwargs)
    aux = _check_aux(name, aux_classifiers, kwargs)
    if aux and small_input:
        raise BackboneArgumentError(
            f"aux_classifiers=True with small_input=True for {name!r}: Inception-v3's auxiliary classifier needs "
            "299x299 inputs (a 17x17 Mixed_6e map), small_input builds for 32x32. Drop one of the two.")
    if pretrained and name.startswith(HF_HUB_PREFIX):
        name = _hf_hub_source(name)
    if small_input:
        kwargs = _small_input_kwargs(name, kwargs)
    import timm

    if aux and num_classes > 0:
        # tv_in1k carries ImageNet aux weights: load them at 1000 classes (timm drops only "fc" when the class
        # count differs, and a mismatched AuxLogits.fc would fail the load), then resize both heads
        built = 1000 if pretrained else num_classes
        model = timm.create_model(name, pretrained=pretrained, num_classes=built, in_chans=in_chans,
                                  aux_logits=True, **kwargs)
    else:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    if aux:
        from .inception import ZooInceptionV3, aux_conv_block

        ZooInceptionV3.adopt(model, aux_conv_block(**kwargs))
        if model.num_classes != num_classes:  # both heads to num_classes (the aux convolutions keep ImageNet's)
            model.reset_classifier(num_classes)
    model._zoo_source = "timm"
    if shortcut is not None:
        remove_shortcuts(model, name, pretrained)
    if small_input:
        _patch_small_input(model, name)
    return finalize(model, small_input=small_input, in_chans=in_chans, img_size=kwargs.get("img_size"))
