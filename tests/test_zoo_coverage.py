"""Every registered backbone: created, a forward/backward step, contract-checked.

Heavy models (VGG/AlexNet/ZFNet FC heads, the big ConvNeXt/ViT/Swin, ResNet-101/152, ...) run at
full width under ``@pytest.mark.slow``; the default run covers them through cheap meta-device
construction (parameter counts) and their ``small_input`` variants. The larger siblings of a family
whose smaller members already run at full width here (EfficientNet-B2..B7, ResNet-101/152, ...: the
same classes with bigger multipliers) are marked ``exhaustive``: ``make test-all`` runs them, ``make
test`` leaves them to the meta-device check, which keeps the suite within its time budget.
"""
import pytest
import torch

from visrep.zoo import create_backbone, list_backbones
from visrep.zoo.testing import _close_to, check_backbone_contract

HEAVY = {
    "alexnet", "zfnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
    "convnext_tiny", "convnext_small", "convnext_base", "convnext_nano", "vit_small_patch16_224",
    "vit_base_patch16_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
    "resnet101", "resnet152", "resnet110", "seresnet34", "seresnet50", "seresnet101", "seresnet152",
    "wide_resnet50_2", "resnext50_32x4d", "resnet34", "mobilenetv1_125", "mobilenetv2_140",
    "efficientnet_b1", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6",
    "efficientnet_b7", "mobilenetv2_075", "mobilenetv3_small_075", "mobilenetv3_large_075", "resnet44",
    "plain44", "plain56", "plain110",  # the same class as plain20 (tested here), without shortcuts
}


def _config(name):
    """(input size, kwargs): the minimum each architecture takes."""
    if name.startswith("vit"):
        return (3, 32, 32), dict(img_size=32)
    if name.startswith("swin"):
        return (3, 64, 64), dict(img_size=64, window_size=4)
    if name == "inception_v3":
        return (3, 75, 75), {}
    if name in ("alexnet", "zfnet"):
        return (3, 64, 64), {}
    return (3, 32, 32), {}


ALL = [n for n in list_backbones() if not n.startswith("test_")]


# the larger siblings (same class, bigger width / depth multipliers) of a member tested at full width
EXHAUSTIVE = {
    "efficientnet_b2", "efficientnet_b3", "efficientnet_b4", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "resnet101", "resnet152", "seresnet101", "seresnet152", "resnet110", "convnext_small", "convnext_base",
    "swin_base_patch4_window7_224", "vit_base_patch16_224", "vgg13", "vgg13_bn", "vgg19", "vgg19_bn",
    "mobilenetv2_140", "plain110",
}


def _param(name):
    if name in EXHAUSTIVE:
        return pytest.param(name, marks=[pytest.mark.slow, pytest.mark.exhaustive])
    return pytest.param(name, marks=pytest.mark.slow) if name in HEAVY else name


@pytest.mark.parametrize("name", [_param(n) for n in ALL])
def test_backbone(name):
    size, kw = _config(name)
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=3, **kw)
    check_backbone_contract(model, size)


SMALL = ["mobilenetv1_100", "mobilenetv3_small_050", "convnext_atto", "vit_tiny_patch16_224",
         "swin_tiny_patch4_window7_224", "alexnet", "zfnet", "vgg11", "tv:resnet18", "tv:mobilenet_v3_small"]
SMALL_HEAVY = ["seresnet18", "efficientnet_b0", "googlenet", "resnet50", "resnext50_32x4d", "densenet121",
               "vgg16_bn", "vgg19", "tv:densenet121", "tv:efficientnet_b0", "tv:convnext_tiny"]


@pytest.mark.parametrize("name", SMALL + [pytest.param(n, marks=pytest.mark.slow) for n in SMALL_HEAVY])
def test_small_input(name):
    model = create_backbone(name, num_classes=10, small_input=True)
    assert model.data_config["input_size"] == (3, 32, 32)
    check_backbone_contract(model, (3, 32, 32))


FEATURES = ["mobilenetv3_small_050", "convnext_atto", "googlenet", "vit_tiny_patch16_224",
            "swin_tiny_patch4_window7_224", "tv:mobilenet_v2"]
FEATURES_HEAVY = ["efficientnet_b0", "densenet121", "zfnet", "tv:resnet18", "inception_v3"]


@pytest.mark.parametrize("name", FEATURES + [pytest.param(n, marks=pytest.mark.slow) for n in FEATURES_HEAVY])
def test_features_only(name):
    size, kw = _config(name)
    if name in ("zfnet", "tv:resnet18", "tv:mobilenet_v2"):
        size, kw = (3, 32, 32), dict(small_input=True)
    if name.startswith("swin"):  # a narrow, shallow Swin: the NHWC -> NCHW handling is what is tested
        kw = dict(kw, embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2))
    full = create_backbone(name, **kw)
    n = len(full.feature_info)
    idx = tuple(range(n))[-3:]
    f = create_backbone(name, features_only=True, out_indices=idx, **kw)
    assert f.feature_info == [full.feature_info[i] for i in idx]
    outs = f(torch.randn(2, *size))
    assert len(outs) == len(idx)
    for o, info in zip(outs, f.feature_info):
        assert o.shape[:2] == (2, info["num_chs"])
        assert _close_to(o.shape[-1], size[-1] / info["reduction"]), (o.shape, info)
    sum(o.float().mean() for o in outs).backward()
    # the pruned head leaves no unused parameters behind (DDP-friendly)
    unused = [k for k, p in f.named_parameters() if p.grad is None]
    assert not unused, unused[:5]


KNOWN_PARAMS = {  # millions, with the 1000-class ImageNet head
    "alexnet": 61.1, "zfnet": 62.4, "vgg11": 132.9, "vgg11_bn": 132.9, "vgg16": 138.4, "vgg16_bn": 138.4,
    "vgg19": 143.7, "vgg19_bn": 143.7, "googlenet": 13.4, "inception_v3": 23.8, "resnet18": 11.7,
    "resnet34": 21.8, "resnet50": 25.6, "resnet101": 44.5, "resnet152": 60.2, "resnext50_32x4d": 25.0,
    "wide_resnet50_2": 68.9, "densenet121": 8.0, "seresnet50": 28.1, "mobilenetv1_100": 4.2,
    "mobilenetv2_100": 3.5, "mobilenetv3_large_100": 5.5, "mobilenetv3_small_100": 2.5,
    "efficientnet_b0": 5.3, "efficientnet_b1": 7.8, "efficientnet_b2": 9.1, "efficientnet_b3": 12.2,
    "efficientnet_b4": 19.3, "efficientnet_b5": 30.4, "efficientnet_b6": 43.0, "efficientnet_b7": 66.3,
    "convnext_tiny": 28.6, "vit_base_patch16_224": 86.6, "vit_tiny_patch16_224": 5.7,
    "swin_tiny_patch4_window7_224": 28.3,
}


@pytest.mark.parametrize("name,millions", sorted(KNOWN_PARAMS.items()))
def test_param_counts(name, millions):
    with torch.device("meta"):  # no memory, no init cost
        model = create_backbone(name, num_classes=1000)
    n = sum(p.numel() for p in model.parameters())  # googlenet: with its two auxiliary heads
    assert abs(n / 1e6 - millions) / millions < 0.02, (name, n / 1e6)


def test_every_registered_name_builds_on_meta():
    for name in ALL:
        size, kw = _config(name)
        with torch.device("meta"):
            m = create_backbone(name, num_classes=5, **kw)
        assert m.num_features > 0 and m.num_classes == 5 and len(m.feature_info) >= 3, name


def test_googlenet_aux_classifiers():
    m = create_backbone("googlenet", num_classes=5)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    m.train()
    logits, a1, a2 = m.forward_train(x)
    assert logits.shape == a1.shape == a2.shape == (2, 5)
    assert m.aux_logits is not None and len(m.aux_logits) == 2
    loss = m.loss(x, y)
    loss.backward()
    assert m.aux1.fc2.weight.grad is not None
    m.eval()
    assert m(x).shape == (2, 5) and m.aux_logits is None
    m.reset_classifier(7)
    m.train()
    assert m.forward_train(x)[1].shape == (2, 7)
    assert create_backbone("googlenet").aux1 is None  # num_classes=0: nothing to classify
