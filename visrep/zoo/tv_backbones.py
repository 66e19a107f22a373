"""torchvision classification models behind the zoo contract.

A torchvision model is taken apart into a flat list of its body's modules and its head. The body
is regrouped into ``stages`` wherever the spatial resolution changes (found with one probe
forward), so ``feature_info`` lists the last module at each resolution, as in timm. The head
becomes ``global_pool -> pre_logits -> fc``. Module names keep torchvision's inside each stage
(``stages.1.layer1``). Supported families: :data:`TV_FAMILIES`.
"""
from __future__ import annotations

import fnmatch
from collections import OrderedDict

import torch
import torch.nn as nn

from .base import ZooModel, make_data_config
from .features import nominal_reduction

TV_FAMILIES = ("resnet", "resnext", "wide_resnet", "alexnet", "vgg", "densenet", "mobilenet_v2",
               "mobilenet_v3", "efficientnet", "convnext")


def _family(name: str) -> str:
    for fam in sorted(TV_FAMILIES, key=len, reverse=True):
        if name.startswith(fam):
            return fam
    raise ValueError(f"torchvision model {name!r} is not supported by the zoo adapter "
                     f"(families: {', '.join(TV_FAMILIES)}); use timm:NAME or a registered name instead")


def list_tv_models(pattern: str = "*") -> list[str]:
    import torchvision
    out = []
    for n in torchvision.models.list_models(module=torchvision.models):
        try:
            _family(n)
        except ValueError:
            continue
        if fnmatch.fnmatch(n, pattern):
            out.append(n)
    return sorted(out)


def tv_weights_url(name: str) -> str | None:
    import torchvision
    try:
        return torchvision.models.get_model_weights(name).DEFAULT.url
    except Exception:
        return None


def _tv_data_config(name: str, in_chans: int, small_input: bool) -> dict:
    import torchvision
    try:
        t = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        crop, resize = t.crop_size[0], t.resize_size[0]
        interp = t.interpolation.value
        mean, std = t.mean, t.std
    except Exception:
        crop, resize, interp = 224, 256, "bilinear"
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if small_input:
        return make_data_config((in_chans, 32, 32), mean, std, interp, 1.0)
    return make_data_config((in_chans, crop, crop), mean, std, interp, crop / resize)


def _first_conv(modules: list[tuple[str, nn.Module]]):
    for top, mod in modules:
        if isinstance(mod, nn.Conv2d):
            return mod, (lambda new, top=top: _set_top(modules, top, new))
        for sub, m in mod.named_modules():
            if isinstance(m, nn.Conv2d):
                parent = mod.get_submodule(sub.rsplit(".", 1)[0]) if "." in sub else mod
                return m, (lambda new, parent=parent, leaf=sub.rsplit(".", 1)[-1]: setattr(parent, leaf, new))
    raise ValueError("no convolution in the model body")


def _set_top(modules, name, new):
    for i, (n, _) in enumerate(modules):
        if n == name:
            modules[i] = (n, new)


def _adapt_stem(modules, in_chans: int, small_input: bool, strided_blocks: bool):
    conv, setter = _first_conv(modules)
    if small_input or in_chans != conv.in_channels:
        k, s, p = ((3, 3), (1, 1), (1, 1)) if small_input else (conv.kernel_size, conv.stride, conv.padding)
        new = nn.Conv2d(in_chans, conv.out_channels, k, s, p, bias=conv.bias is not None)
        if not small_input:  # keep (pretrained) filters, averaged over the input channels
            with torch.no_grad():
                new.weight.copy_(conv.weight.mean(1, keepdim=True).expand_as(new.weight) * 3 / in_chans)
                if conv.bias is not None:
                    new.bias.copy_(conv.bias)
        setter(new)
    if not small_input:
        return modules
    pools = [i for i, (_, m) in enumerate(modules) if isinstance(m, nn.MaxPool2d)]
    if pools:
        del modules[pools[0]]
    elif strided_blocks:  # MobileNet / EfficientNet: the first strided block keeps resolution
        for _, mod in modules[1:]:
            c = next((m for m in mod.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)), None)
            if c is not None:
                c.stride = (1, 1)
                break
    return modules


class TorchvisionBackbone(ZooModel):
    """A torchvision model regrouped as ``stages -> global_pool -> pre_logits -> fc``."""

    def __init__(self, name: str, body: list[tuple[str, nn.Module]], global_pool: nn.Module,
                 pre_logits: nn.Module, fc: nn.Linear, num_features: int, num_classes: int,
                 drop_rate: float, data_config: dict):
        super().__init__()
        self.stem = nn.Identity()
        size = data_config["input_size"]
        probe = (size[0], max(64, size[1]), max(64, size[2])) if size[1] > 32 else size
        groups, shapes = self._group(body, probe)
        self.stages = nn.Sequential(*[nn.Sequential(OrderedDict(g)) for g in groups])
        self.feature_info = []
        for i, (g, shp) in enumerate(zip(groups, shapes)):
            self.feature_info.append(dict(num_chs=shp[1], reduction=nominal_reduction(probe[-1] / shp[-1]),
                                          module=f"stages.{i}"))
        self.global_pool, self.pre_logits = global_pool, pre_logits
        self.num_features = num_features
        self.data_config = data_config
        self.tv_name = name
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = num_classes
        self.fc = fc if (fc is not None and num_classes == fc.out_features) else None
        if self.fc is None:
            self.reset_classifier(num_classes)

    @staticmethod
    @torch.no_grad()
    def _group(body, probe):
        x = torch.zeros(1, *probe)
        groups, shapes, cur, res = [], [], [], None
        training = [m.training for _, m in body]
        for _, m in body:
            m.eval()
        for n, m in body:
            y = m(x)
            if res is not None and y.shape[-2:] != res and cur:
                groups.append(cur)
                shapes.append(prev_shape)
                cur = []
            cur.append((n, m))
            res, prev_shape, x = y.shape[-2:], y.shape, y
        groups.append(cur)
        shapes.append(prev_shape)
        for (_, m), t in zip(body, training):
            m.train(t)
        return groups, shapes


def create_tv_backbone(name: str, pretrained: bool = False, num_classes: int = 0, in_chans: int = 3,
                       small_input: bool = False, **kwargs) -> TorchvisionBackbone:
    """``torchvision.models.get_model`` + the zoo contract (families: :data:`TV_FAMILIES`)."""
    import torchvision
    fam = _family(name)
    weights = "DEFAULT" if pretrained else None
    tv = torchvision.models.get_model(name, weights=weights, **kwargs)
    drop = 0.0
    strided_blocks = False
    if fam in ("resnet", "resnext", "wide_resnet"):
        body = [(n, getattr(tv, n)) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")]
        pool, pre, fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), nn.Identity(), tv.fc
    elif fam in ("alexnet", "vgg"):
        body = [(f"features{i}", m) for i, m in enumerate(tv.features)]
        pool = nn.Sequential(tv.avgpool, nn.Flatten(1))
        pre, fc = tv.classifier[:-1], tv.classifier[-1]
        if small_input and fam == "vgg":  # CIFAR VGG: global pooling straight into the classifier
            pool, pre, fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), nn.Identity(), None
    elif fam == "densenet":
        body = list(tv.features.named_children()) + [("relu5", nn.ReLU(inplace=True))]
        pool, pre, fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), nn.Identity(), tv.classifier
    elif fam in ("mobilenet_v2", "efficientnet"):
        body = [(f"features{i}", m) for i, m in enumerate(tv.features)]
        pool, pre, fc = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)), nn.Identity(), tv.classifier[-1]
        drop, strided_blocks = tv.classifier[0].p, True
    elif fam == "mobilenet_v3":
        body = [(f"features{i}", m) for i, m in enumerate(tv.features)]
        pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        pre, fc, drop, strided_blocks = tv.classifier[:2], tv.classifier[3], tv.classifier[2].p, True
    elif fam == "convnext":
        body = [(f"features{i}", m) for i, m in enumerate(tv.features)]
        pool = nn.Sequential(tv.avgpool, tv.classifier[0], tv.classifier[1])
        pre, fc = nn.Identity(), tv.classifier[2]
    else:  # pragma: no cover
        raise ValueError(name)
    body = _adapt_stem(body, in_chans, small_input, strided_blocks)
    num_features = fc.in_features if fc is not None else _last_channels(body)
    cfg = _tv_data_config(name, in_chans, small_input)
    model = TorchvisionBackbone(name, body, pool, pre, fc, num_features, num_classes, drop, cfg)
    return model


def _last_channels(body) -> int:
    for _, m in reversed(body):
        convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
        if convs:
            return convs[-1].out_channels
    raise ValueError("no conv in body")
