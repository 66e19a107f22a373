"""Blocks, necks and heads: shapes, rescaling behaviour, closed formulas."""
import math

import pytest
import torch

from visrep.zoo import create_backbone
from visrep.zoo.blocks import (CBAM, BasicBlock, Bottleneck1x1, BottleneckBlock, ChannelAttention,
                               DepthwiseSeparableConv, GroupedConv, InceptionModule, InvertedResidual, SEBlock,
                               SinusoidalPositionalEncoding, SpatialAttention, sinusoidal_encoding,
                               sinusoidal_encoding_2d)
from visrep.zoo.necks import FPN, UNet

torch.manual_seed(0)


def gated(gate, x):
    """``gate(x)`` and its gates, checked: the output is the input times gates in (0, 1)."""
    y, s = gate(x), gate.scale(x)
    assert y.shape == x.shape and (s > 0).all() and (s < 1).all()
    assert torch.allclose(y, x * s)
    return y, s


def test_se_block_rescales_channels():
    x = torch.randn(2, 32, 7, 9)
    y, s = gated(SEBlock(32, reduction=4), x)
    assert s.shape == (2, 32, 1, 1)
    # a per-channel rescale: y / x is constant over positions within each channel
    ratio = y / x
    assert torch.allclose(ratio, ratio[..., :1, :1].expand_as(ratio), atol=1e-5)


def test_cbam_channel_then_spatial():
    cbam = CBAM(16, reduction=4)
    x = torch.randn(2, 16, 11, 13)
    xc, c_scale = gated(cbam.channel, x)
    y, s_scale = gated(cbam.spatial, xc)
    assert c_scale.shape == (2, 16, 1, 1) and s_scale.shape == (2, 1, 11, 13)
    assert torch.allclose(cbam(x), y)
    # spatial attention rescales positions: y / xc is constant across channels at each position
    ratio = y / xc
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    assert ChannelAttention(8)(torch.randn(1, 8, 3, 3)).shape == (1, 8, 3, 3)
    assert SpatialAttention(3)(torch.randn(1, 8, 3, 3)).shape == (1, 8, 3, 3)


def test_sinusoidal_encoding_closed_formula():
    n, d = 50, 16
    pe = sinusoidal_encoding(n, d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert math.isclose(pe[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(pe[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)
    mod = SinusoidalPositionalEncoding(d, max_len=64)
    x = torch.zeros(2, 10, d)
    assert torch.allclose(mod(x), pe[:10].expand(2, 10, d))
    with pytest.raises(ValueError):
        sinusoidal_encoding(4, 7)
    pe2 = sinusoidal_encoding_2d(3, 5, 8)
    assert pe2.shape == (15, 8)
    assert torch.allclose(pe2[5 * 2 + 4, :4], sinusoidal_encoding(3, 4)[2])
    assert torch.allclose(pe2[5 * 2 + 4, 4:], sinusoidal_encoding(5, 4)[4])


@pytest.mark.parametrize("block,cin,cout,stride", [
    (lambda: BasicBlock(16, 32, stride=2), 16, 32, 2),
    (lambda: BasicBlock(16, 32, stride=2, shortcut="A"), 16, 32, 2),
    (lambda: BasicBlock(16, 16), 16, 16, 1),
    (lambda: BottleneckBlock(64, 16), 64, 64, 1),
    (lambda: BottleneckBlock(64, 32, stride=2, groups=8, base_width=4), 64, 128, 2),
    (lambda: GroupedConv(32, 64, groups=8, stride=2), 32, 64, 2),
    (lambda: DepthwiseSeparableConv(16, 24, stride=2), 16, 24, 2),
    (lambda: InvertedResidual(16, 16, expand_ratio=6), 16, 16, 1),
    (lambda: InvertedResidual(16, 24, stride=2, se_ratio=0.25), 16, 24, 2),
    (lambda: Bottleneck1x1(64, 16), 64, 16, 1),
    (lambda: InceptionModule(192, 64, 96, 128, 16, 32, 32), 192, 256, 1),
])
def test_block_shapes(block, cin, cout, stride):
    m = block()
    x = torch.randn(2, cin, 9, 9)
    y = m(x)
    assert y.shape == (2, cout, -(-9 // stride), -(-9 // stride))
    y.sum().backward()


def test_grouped_conv_params():
    g = GroupedConv(64, 64, groups=32)
    assert g[0].weight.numel() == 64 * 64 * 9 // 32
    dw = DepthwiseSeparableConv(32, 64)
    assert dw.dw[0].weight.numel() == 32 * 9 and dw.pw[0].weight.numel() == 32 * 64
    with pytest.raises(ValueError):
        GroupedConv(30, 64, groups=32)


def test_inverted_residual_shortcut():
    m = InvertedResidual(8, 8).eval()
    assert m.use_res
    for p in m.project.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(1, 8, 5, 5)
    assert torch.allclose(m(x), x)  # zero projection: only the identity path remains


@pytest.mark.parametrize("size", [(33, 45), (65, 37), (31, 31)])
def test_fpn_odd_sizes(size):
    fpn = FPN("resnet18", out_channels=32, out_indices=(1, 2, 3, 4), extra_levels=1)
    outs = fpn(torch.randn(2, 3, *size))
    assert len(outs) == 5 == len(fpn.feature_info)
    for o, info in zip(outs, fpn.feature_info):
        assert o.shape[1] == 32
        assert o.shape[-2] == -(-size[0] // info["reduction"]) and o.shape[-1] == -(-size[1] // info["reduction"])


def test_fpn_over_features_only_module():
    body = create_backbone("mobilenetv3_small_050", features_only=True, out_indices=(2, 3, 4))
    fpn = FPN(body, out_channels=16)
    outs = fpn(torch.randn(2, 3, 57, 43))
    assert [o.shape[1] for o in outs] == [16, 16, 16]
    assert outs[0].shape[-2:] == body(torch.randn(2, 3, 57, 43))[0].shape[-2:]


@pytest.mark.parametrize("encoder,size", [("resnet20", (33, 45)), ("resnet18", (65, 37)),
                                          ("mobilenetv2_050", (47, 51)), ("convnext_atto", (61, 35))])
def test_unet_odd_sizes(encoder, size):
    unet = UNet(encoder, num_classes=4, decoder_channels=(32, 16, 16, 8, 8))
    x = torch.randn(2, 3, *size)
    y = unet(x)
    assert y.shape == (2, 4, *size)
    torch.nn.functional.cross_entropy(y, torch.randint(0, 4, (2, *size))).backward()


def test_zero_init_residual_makes_every_block_its_shortcut():
    """CIFAR ResNet with zero_init_residual: at initialisation each residual branch adds exactly zero, so a
    ResNet-56 computes relu(shortcut(x)) per block (a shallow network); off, the branches contribute."""
    from visrep.zoo.cifar_resnet import CifarResNet

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for zero in (True, False):
        net = CifarResNet(depth=56, zero_init_residual=zero).eval()
        h = net.stem(x)
        for block in net.stages.modules():
            if isinstance(block, BasicBlock):
                out = block(h)
                same = torch.equal(out, torch.relu(block.shortcut(h)))
                assert same == zero
                h = out
