"""Reusable building blocks of convolutional and transformer backbones.

Each block names the paper it comes from (title, year, arXiv id). Tensors are NCHW unless said.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ConvBnAct", "Bottleneck1x1", "InceptionModule", "BasicBlock", "BottleneckBlock",
    "GroupedConv", "DepthwiseSeparableConv", "InvertedResidual", "SEBlock",
    "ChannelAttention", "SpatialAttention", "CBAM", "make_attention", "sinusoidal_encoding",
    "sinusoidal_encoding_2d", "SinusoidalPositionalEncoding", "make_divisible",
]


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` without losing more than 10% (MobileNetV2)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class ConvBnAct(nn.Sequential):
    """Conv2d -> BatchNorm2d -> activation, 'same' padding for odd kernels."""

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, groups=1, dilation=1,
                 act_layer: type[nn.Module] | None = nn.ReLU, bias=False):
        padding = dilation * (kernel_size - 1) // 2
        layers = [
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation=dilation,
                      groups=groups, bias=bias),
            nn.BatchNorm2d(out_chs),
        ]
        if act_layer is not None:
            layers.append(act_layer(inplace=True) if act_layer in (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish)
                          else act_layer())
        super().__init__(*layers)
        self.out_channels = out_chs


class Bottleneck1x1(ConvBnAct):
    """1x1 convolution that mixes and reduces channels before an expensive conv.

    A per-pixel linear map across channels ("cross channel parametric pooling"), used as a
    dimension reduction in Inception and in ResNet bottlenecks.
    Paper: Lin, Chen, Yan, "Network In Network", 2013, arXiv:1312.4400.
    """

    def __init__(self, in_chs, out_chs, act_layer=nn.ReLU):
        super().__init__(in_chs, out_chs, kernel_size=1, act_layer=act_layer)


class InceptionModule(nn.Module):
    """Inception module with dimension reductions (GoogLeNet, Fig. 2b).

    Four parallel branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 5x5;
    3x3 max-pool -> 1x1. Output channels ``c1 + c3 + c5 + pool_proj``.
    Paper: Szegedy et al., "Going Deeper with Convolutions", 2014, arXiv:1409.4842.
    """

    def __init__(self, in_chs, c1, c3_reduce, c3, c5_reduce, c5, pool_proj):
        super().__init__()
        self.branch1 = Bottleneck1x1(in_chs, c1)
        self.branch3 = nn.Sequential(Bottleneck1x1(in_chs, c3_reduce), ConvBnAct(c3_reduce, c3, 3))
        self.branch5 = nn.Sequential(Bottleneck1x1(in_chs, c5_reduce), ConvBnAct(c5_reduce, c5, 5))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), Bottleneck1x1(in_chs, pool_proj))
        self.out_channels = c1 + c3 + c5 + pool_proj

    def forward(self, x):
        return torch.cat([self.branch1(x), self.branch3(x), self.branch5(x), self.branch_pool(x)], 1)


class BasicBlock(nn.Module):
    """Residual basic block: two 3x3 convs and an identity (or projected) shortcut.

    ``y = relu(attn(bn(conv(relu(bn(conv(x)))))) + shortcut(x))``. ``shortcut="B"`` projects with a
    1x1 conv when shape changes; ``"A"`` pads zeros on channels after strided subsampling
    (parameter-free, used for the CIFAR ResNets of Sec. 4.2); ``"none"`` (or ``False``) drops the
    shortcut: the "plain" block of the paper's Sec. 4.1, ``y = relu(bn(conv(relu(bn(conv(x))))))``.
    ``attention``: ``"se"`` or ``"cbam"`` gates the residual branch before the addition, as SE-ResNet
    (Hu et al. Fig. 3) and CBAM (Woo et al. Fig. 3) place it (see :func:`make_attention`).
    Paper: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", 2015, arXiv:1512.03385.
    """
    expansion = 1

    def __init__(self, in_chs, out_chs, stride=1, shortcut: str = "B", groups=1, base_width=64,
                 attention: str | None = None, attention_reduction: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.attn = make_attention(attention, out_chs, attention_reduction)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = _make_shortcut(in_chs, out_chs, stride, shortcut)

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        y = self.attn(self.bn2(self.conv2(y)))
        return self.act(y if self.shortcut is None else y + self.shortcut(x))


class BottleneckBlock(nn.Module):
    """Residual bottleneck block: 1x1 reduce -> 3x3 (optionally grouped) -> 1x1 expand (x4).

    With ``groups > 1`` this is the ResNeXt block (aggregated transformations); with a larger
    ``base_width`` the Wide ResNet-50-2 block. ``shortcut="none"`` and ``attention`` as in
    :class:`BasicBlock` (the gate follows the last 1x1 conv, before the addition).
    Papers: He et al., "Deep Residual Learning for Image Recognition", 2015, arXiv:1512.03385;
    Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", 2016, arXiv:1611.05431.
    """
    expansion = 4

    def __init__(self, in_chs, planes, stride=1, shortcut: str = "B", groups=1, base_width=64,
                 attention: str | None = None, attention_reduction: int = 16):
        super().__init__()
        width = int(planes * base_width / 64) * groups
        out_chs = planes * self.expansion
        self.conv1 = Bottleneck1x1(in_chs, width)
        self.conv2 = GroupedConv(width, width, 3, stride=stride, groups=groups)
        self.conv3 = ConvBnAct(width, out_chs, 1, act_layer=None)
        self.attn = make_attention(attention, out_chs, attention_reduction)
        self.act = nn.ReLU(inplace=True)
        self.shortcut = _make_shortcut(in_chs, out_chs, stride, shortcut)

    def forward(self, x):
        y = self.attn(self.conv3(self.conv2(self.conv1(x))))
        return self.act(y if self.shortcut is None else y + self.shortcut(x))


ATTENTION_KINDS = (None, "se", "cbam")


def make_attention(kind: str | None, channels: int, reduction: int = 16) -> nn.Module:
    """The gate a residual block puts on its branch: ``None`` -> identity, ``"se"`` -> :class:`SEBlock`
    with ``C / reduction`` hidden units (at least 1, as in the paper's ``C/r``), ``"cbam"`` -> :class:`CBAM`
    (same channel reduction, 7x7 spatial conv)."""
    if kind is None or kind in ("none", ""):
        return nn.Identity()
    if kind == "se":
        return SEBlock(channels, reduction=reduction, min_rd=1)
    if kind == "cbam":
        return CBAM(channels, reduction=reduction)
    raise ValueError(f"attention must be one of None, 'se', 'cbam'; got {kind!r}")


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially, zero-pad the new channels."""

    def __init__(self, in_chs, out_chs, stride):
        super().__init__()
        self.stride, self.pad = stride, out_chs - in_chs

    def forward(self, x):
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        lo = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))


def _make_shortcut(in_chs, out_chs, stride, kind):
    if kind is False or kind is None or kind == "none":
        return None  # a plain block (He et al. Sec. 4.1): no identity path at all
    if kind not in ("A", "B"):
        raise ValueError(f"shortcut must be 'A', 'B' or 'none', got {kind!r}")
    if stride == 1 and in_chs == out_chs:
        return nn.Identity()
    if kind == "A":
        return _PadShortcut(in_chs, out_chs, stride)
    return ConvBnAct(in_chs, out_chs, 1, stride, act_layer=None)


class GroupedConv(ConvBnAct):
    """Grouped convolution + BN + ReLU: channels split into ``groups`` independent convolutions.

    Cost and parameters drop by ``groups``; it is the "cardinality" of ResNeXt (and the two-GPU
    split of AlexNet).
    Paper: Xie et al., "Aggregated Residual Transformations for Deep Neural Networks", 2016,
    arXiv:1611.05431.
    """

    def __init__(self, in_chs, out_chs, kernel_size=3, stride=1, groups=32, act_layer=nn.ReLU):
        if in_chs % groups or out_chs % groups:
            raise ValueError(f"channels ({in_chs}, {out_chs}) must be divisible by groups={groups}")
        super().__init__(in_chs, out_chs, kernel_size, stride, groups=groups, act_layer=act_layer)


class DepthwiseSeparableConv(nn.Module):
    """Depthwise 3x3 conv (one filter per channel) followed by a pointwise 1x1 conv, BN+ReLU each.

    Costs about ``1/out + 1/k^2`` of a standard conv.
    Paper: Howard et al., "MobileNets: Efficient Convolutional Neural Networks for Mobile Vision
    Applications", 2017, arXiv:1704.04861.
    """

    def __init__(self, in_chs, out_chs, stride=1, kernel_size=3, act_layer=nn.ReLU):
        super().__init__()
        self.dw = ConvBnAct(in_chs, in_chs, kernel_size, stride, groups=in_chs, act_layer=act_layer)
        self.pw = ConvBnAct(in_chs, out_chs, 1, act_layer=act_layer)

    def forward(self, x):
        return self.pw(self.dw(x))


class InvertedResidual(nn.Module):
    """Inverted residual with linear bottleneck: 1x1 expand -> depthwise 3x3 -> 1x1 project (no act).

    The shortcut joins the thin bottlenecks when stride is 1 and widths match. Optional SE
    (``se_ratio``) as in MobileNetV3 / EfficientNet.
    Paper: Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", 2018,
    arXiv:1801.04381.
    """

    def __init__(self, in_chs, out_chs, stride=1, expand_ratio=6, kernel_size=3, act_layer=nn.ReLU6,
                 se_ratio: float = 0.0):
        super().__init__()
        hidden = int(round(in_chs * expand_ratio))
        self.use_res = stride == 1 and in_chs == out_chs
        self.expand = ConvBnAct(in_chs, hidden, 1, act_layer=act_layer) if expand_ratio != 1 else nn.Identity()
        self.dw = ConvBnAct(hidden, hidden, kernel_size, stride, groups=hidden, act_layer=act_layer)
        self.se = SEBlock(hidden, rd_ratio=se_ratio) if se_ratio > 0 else nn.Identity()
        self.project = ConvBnAct(hidden, out_chs, 1, act_layer=None)

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.use_res else y


class Gate(nn.Module):
    """An attention gate: ``x * scale(x)``, with gates in (0, 1) from the subclass's ``scale``."""

    def scale(self, x):
        raise NotImplementedError

    def forward(self, x):
        return x * self.scale(x)


class SEBlock(Gate):
    """Squeeze-and-Excitation: rescale channels by ``sigmoid(W2 relu(W1 avgpool(x)))``.

    Paper: Hu, Shen, Albanie, Sun, Wu, "Squeeze-and-Excitation Networks", 2017, arXiv:1709.01507.
    """

    def __init__(self, channels, reduction: int = 16, rd_ratio: float | None = None, min_rd=8):
        super().__init__()
        rd = int(channels * rd_ratio) if rd_ratio else channels // reduction
        rd = max(rd, min(min_rd, channels))
        self.fc1 = nn.Conv2d(channels, rd, 1)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(rd, channels, 1)

    def scale(self, x):
        """Per-channel gates in (0, 1), shape (N, C, 1, 1)."""
        return torch.sigmoid(self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True)))))


class ChannelAttention(Gate):
    """CBAM channel attention: ``sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` (shared MLP).

    Paper: Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", 2018, arXiv:1807.06521.
    """

    def __init__(self, channels, reduction=16):
        super().__init__()
        rd = max(1, channels // reduction)
        self.mlp = nn.Sequential(nn.Conv2d(channels, rd, 1, bias=False), nn.ReLU(inplace=True),
                                 nn.Conv2d(rd, channels, 1, bias=False))

    def scale(self, x):
        return torch.sigmoid(self.mlp(x.mean((2, 3), keepdim=True)) + self.mlp(x.amax((2, 3), keepdim=True)))


class SpatialAttention(Gate):
    """CBAM spatial attention: ``sigmoid(conv7x7([mean_c(x); max_c(x)]))``.

    Paper: Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", 2018, arXiv:1807.06521.
    """

    def __init__(self, kernel_size=7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def scale(self, x):
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return torch.sigmoid(self.bn(self.conv(s)))


class CBAM(nn.Module):
    """Convolutional Block Attention Module: channel attention, then spatial attention.

    Paper: Woo, Park, Lee, Kweon, "CBAM: Convolutional Block Attention Module", 2018, arXiv:1807.06521.
    """

    def __init__(self, channels, reduction=16, kernel_size=7):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention(kernel_size)

    def forward(self, x):
        return self.spatial(self.channel(x))


def sinusoidal_encoding(num_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Table (num_positions, dim): ``PE[p, 2i] = sin(p / base^(2i/dim))``, ``PE[p, 2i+1] = cos(...)``.

    Paper: Vaswani et al., "Attention Is All You Need", 2017, arXiv:1706.03762 (Sec. 3.5).
    """
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    pe = torch.zeros(num_positions, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq)
    return pe.float()


def sinusoidal_encoding_2d(height: int, width: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """2-D sin-cos table (height*width, dim): half the channels encode the row, half the column.

    As used for fixed ViT position embeddings in He et al., "Masked Autoencoders Are Scalable
    Vision Learners", 2021, arXiv:2111.06377.
    """
    if dim % 4:
        raise ValueError(f"dim must be divisible by 4, got {dim}")
    row = sinusoidal_encoding(height, dim // 2, base)[:, None, :].expand(height, width, dim // 2)
    col = sinusoidal_encoding(width, dim // 2, base)[None, :, :].expand(height, width, dim // 2)
    return torch.cat([row, col], -1).reshape(height * width, dim)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal position table to a token sequence (B, N, D) (optional dropout).

    Paper: Vaswani et al., "Attention Is All You Need", 2017, arXiv:1706.03762.
    """

    def __init__(self, dim: int, max_len: int = 4096, base: float = 10000.0, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("pe", sinusoidal_encoding(max_len, dim, base), persistent=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        n = x.shape[1]
        if n > self.pe.shape[0]:
            raise ValueError(f"sequence length {n} exceeds max_len {self.pe.shape[0]}")
        return self.drop(x + self.pe[:n].to(x.dtype))


def _init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs, unit BN, small-normal linears (as in the ResNet paper)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

