"""The built-in registry entries: plain names and the source each one comes from.

Default sources (a plain name's source is what ``visrep zoo list`` shows):

* written here (``visrep``): ``resnet20/32/44/56/110`` (CIFAR ResNets; ``attention="se"|"cbam"``),
  ``plain20/32/44/56/110`` (the same without shortcuts), ``zfnet``, ``googlenet``
  (Inception v1 with its two auxiliary classifiers).
* torchvision (``tv``): ``alexnet``, ``vgg11/13/16/19`` and ``*_bn``.
* timm (everything else): ResNet-18..152, ResNeXt-50 32x4d, Wide ResNet-50-2, DenseNet-121,
  SE-ResNets, MobileNet v1/v2/v3, EfficientNet-B0..B7, ConvNeXt, ViT, Swin, Inception-v3
  (``aux_classifiers=True``: its auxiliary classifier, ``visrep.zoo.inception``).
"""
from __future__ import annotations

from functools import partial

from .cifar_resnet import CifarResNet
from .classic import GoogLeNet, ZFNet
from .entries import register_backbone
from .timm_backbones import create_timm_backbone

_HE2015 = "He et al., Deep Residual Learning for Image Recognition, 2015, arXiv:1512.03385"


# ----------------------------------------------------------------- written here: CIFAR ResNets

def _cifar_resnet(depth, num_classes=0, in_chans=3, small_input=True, **kwargs):
    # the CIFAR ResNets are 32x32 models already; small_input is accepted and changes nothing
    return CifarResNet(depth, num_classes=num_classes, in_chans=in_chans, **kwargs)


for _d in (20, 32, 44, 56, 110):
    register_backbone(f"resnet{_d}", partial(_cifar_resnet, _d), source="visrep",
                      description=f"CIFAR ResNet-{_d} (16/32/64 channels, 32x32 input); "
                                  "kwargs width, shortcut (A/B/none), attention (se/cbam)",
                      paper=_HE2015, tags=("cnn", "cifar"))
    register_backbone(f"plain{_d}", partial(_cifar_resnet, _d, shortcut="none"), source="visrep",
                      description=f"CIFAR plain-{_d}: ResNet-{_d} without shortcuts (the degradation problem)",
                      paper=_HE2015, tags=("cnn", "cifar"))


register_backbone("zfnet", lambda **kw: ZFNet(**kw), source="visrep",
                  description="ZFNet (7x7/2 stem AlexNet variant), 4096-wide pre-logits",
                  paper="Zeiler & Fergus, Visualizing and Understanding Convolutional Networks, 2013, arXiv:1311.2901",
                  tags=("cnn",))
_GOOG = "Szegedy et al., Going Deeper with Convolutions, 2014, arXiv:1409.4842"
for _n in ("googlenet", "inception_v1"):
    register_backbone(_n, lambda **kw: GoogLeNet(**kw), source="visrep", paper=_GOOG, tags=("cnn",),
                      description="GoogLeNet / Inception v1 with BN; aux classifiers in train mode (model.aux_logits)")


# ----------------------------------------------------------------- timm-backed plain names

_TIMM = {
    # name: (timm name, description, paper)
    "resnet18": ("resnet18", "ResNet-18", _HE2015),
    "resnet34": ("resnet34", "ResNet-34", _HE2015),
    "resnet50": ("resnet50", "ResNet-50", _HE2015),
    "resnet101": ("resnet101", "ResNet-101", _HE2015),
    "resnet152": ("resnet152", "ResNet-152", _HE2015),
    "resnext50_32x4d": ("resnext50_32x4d", "ResNeXt-50 32x4d",
                        "Xie et al., Aggregated Residual Transformations for Deep Neural Networks, 2016, arXiv:1611.05431"),
    "wide_resnet50_2": ("wide_resnet50_2", "Wide ResNet-50-2",
                        "Zagoruyko & Komodakis, Wide Residual Networks, 2016, arXiv:1605.07146"),
    "densenet121": ("densenet121", "DenseNet-121",
                    "Huang et al., Densely Connected Convolutional Networks, 2016, arXiv:1608.06993"),
    "inception_v3": ("inception_v3", "Inception-v3 (min input 75x75); aux_classifiers=True: its auxiliary "
                                     "classifier in train mode (model.aux_logits; min input 299x299)",
                     "Szegedy et al., Rethinking the Inception Architecture for Computer Vision, 2015, arXiv:1512.00567"),
    "mobilenetv1_100": ("mobilenetv1_100", "MobileNet v1 1.0",
                        "Howard et al., MobileNets, 2017, arXiv:1704.04861"),
    "mobilenetv1_125": ("mobilenetv1_125", "MobileNet v1 1.25", "Howard et al., MobileNets, 2017, arXiv:1704.04861"),
}
_SE = "Hu et al., Squeeze-and-Excitation Networks, 2017, arXiv:1709.01507"
for _d in (18, 34, 50, 101, 152):
    _TIMM[f"seresnet{_d}"] = (f"seresnet{_d}", f"SE-ResNet-{_d}", _SE)
_MV2 = "Sandler et al., MobileNetV2: Inverted Residuals and Linear Bottlenecks, 2018, arXiv:1801.04381"
for _w in ("035", "050", "075", "100", "140"):
    _TIMM[f"mobilenetv2_{_w}"] = (f"mobilenetv2_{_w}", f"MobileNet v2 {int(_w) / 100:g}", _MV2)
_MV3 = "Howard et al., Searching for MobileNetV3, 2019, arXiv:1905.02244"
for _v in ("small_050", "small_075", "small_100", "large_075", "large_100"):
    _TIMM[f"mobilenetv3_{_v}"] = (f"mobilenetv3_{_v}", f"MobileNet v3 {_v.replace('_', ' ')}", _MV3)
_EFF = "Tan & Le, EfficientNet: Rethinking Model Scaling for CNNs, 2019, arXiv:1905.11946"
for _b in range(8):
    _TIMM[f"efficientnet_b{_b}"] = (f"efficientnet_b{_b}", f"EfficientNet-B{_b}", _EFF)
_CNX = "Liu et al., A ConvNet for the 2020s, 2022, arXiv:2201.03545"
for _v in ("atto", "femto", "pico", "nano", "tiny", "small", "base"):
    _TIMM[f"convnext_{_v}"] = (f"convnext_{_v}", f"ConvNeXt-{_v}", _CNX)
_VIT = "Dosovitskiy et al., An Image is Worth 16x16 Words, 2020, arXiv:2010.11929"
for _v in ("tiny", "small", "base"):
    _TIMM[f"vit_{_v}_patch16_224"] = (f"vit_{_v}_patch16_224", f"ViT-{_v[0].upper()}/16", _VIT)
_SWIN = "Liu et al., Swin Transformer, 2021, arXiv:2103.14030"
for _v in ("tiny", "small", "base"):
    _TIMM[f"swin_{_v}_patch4_window7_224"] = (f"swin_{_v}_patch4_window7_224", f"Swin-{_v[0].upper()}", _SWIN)

for _name, (_target, _desc, _paper) in _TIMM.items():
    register_backbone(_name, partial(create_timm_backbone, _target), source="timm", target=_target,
                      description=_desc, pretrained=True, paper=_paper)


# ----------------------------------------------------------------- torchvision-backed plain names

from .tv_backbones import create_tv_backbone  # noqa: E402

register_backbone("alexnet", partial(create_tv_backbone, "alexnet"), source="tv", target="alexnet",
                  description="AlexNet (single-tower torchvision variant)", pretrained=True,
                  paper="Krizhevsky et al., ImageNet Classification with Deep CNNs, NeurIPS 2012")
_VGG = "Simonyan & Zisserman, Very Deep Convolutional Networks, 2014, arXiv:1409.1556"
for _d in (11, 13, 16, 19):
    for _bn in ("", "_bn"):
        register_backbone(f"vgg{_d}{_bn}", partial(create_tv_backbone, f"vgg{_d}{_bn}"), source="tv",
                          target=f"vgg{_d}{_bn}", pretrained=True, paper=_VGG,
                          description=f"VGG-{_d}{' with BatchNorm' if _bn else ''} "
                                      "(small_input: no first max-pool, global pool, 512-wide head)")
