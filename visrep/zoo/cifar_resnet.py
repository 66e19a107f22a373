"""CIFAR ResNets (ResNet-20/32/44/56/110) of He et al. 2015, Sec. 4.2.

A 3x3 conv with 16 filters, then three stages of ``n`` basic blocks with 16, 32, 64 filters on
32x32, 16x16, 8x8 maps, global average pooling and a linear classifier: ``6n + 2`` layers.
Shortcuts are parameter-free (option A: subsample + zero-pad) as in the paper; ``shortcut="B"``
uses 1x1 projections. ResNet-20 has 0.27M parameters.
``shortcut="none"`` builds the paper's "plain" counterpart (registered as ``plain20`` ... ``plain110``): the
same layers without any shortcut, whose training error *rises* with depth (the degradation problem, Fig. 6).
``attention="se"`` / ``"cbam"`` gates every residual branch before the addition (SE-ResNet, CBAM-ResNet).
Papers: He, Zhang, Ren, Sun, "Deep Residual Learning for Image Recognition", 2015, arXiv:1512.03385;
Hu et al., "Squeeze-and-Excitation Networks", 2017, arXiv:1709.01507; Woo et al., "CBAM: Convolutional Block
Attention Module", 2018, arXiv:1807.06521.
"""
from __future__ import annotations

import torch.nn as nn

from .base import CIFAR_MEAN, CIFAR_STD, ZooModel, make_data_config
from .blocks import BasicBlock, ConvBnAct, _init_weights


class CifarResNet(ZooModel):
    """ResNet-(6n+2) for 32x32 inputs; ``width`` multiplies the 16/32/64 channel plan.
    ``zero_init_residual``: the last BN of every residual branch starts at zero, so each block starts as
    its shortcut and a deep network as a shallow one (Goyal et al. 2017, arXiv:1706.02677, Sec. 5.1;
    timm's ``zero_init_last``, torchvision's ``zero_init_residual``); the head then starts at PyTorch's
    default scale. Off by default, as in torchvision: measured here it smooths a ResNet-56's start on a
    photo folder (no early validation-loss spikes) but slows it on the digits, whose identity-network
    features (the stem's spatial means) say little about the class (val 0.27 after 4 epochs), and a
    quarter-width ResNet-20 did not move in 33 steps. What made the distillation preset's teacher stable
    was the learning rate scaled with the batch (README, "Defaults for a new dataset")."""

    def __init__(self, depth: int = 20, num_classes: int = 0, in_chans: int = 3, width: float = 1.0,
                 shortcut: str = "A", drop_rate: float = 0.0, zero_init_residual: bool = False,
                 attention: str | None = None, attention_reduction: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if zero_init_residual and shortcut in (None, False, "none"):
            raise ValueError("zero_init_residual needs shortcuts: a plain net (shortcut='none') with zeroed "
                             "branches outputs zeros; drop one of the two")
        n = (depth - 2) // 6
        chs = [max(1, int(round(c * width))) for c in (16, 32, 64)]
        self.stem = ConvBnAct(in_chans, chs[0], 3)
        stages, in_chs = [], chs[0]
        for i, c in enumerate(chs):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(in_chs, c, stride=2 if (i > 0 and j == 0) else 1, shortcut=shortcut,
                                         attention=attention, attention_reduction=attention_reduction))
                in_chs = c
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = chs[-1]
        self.feature_info = [dict(num_chs=chs[0], reduction=1, module="stem")] + [
            dict(num_chs=c, reduction=2 ** i, module=f"stages.{i}") for i, c in enumerate(chs)]
        self.data_config = make_data_config((in_chans, 32, 32), CIFAR_MEAN, CIFAR_STD, "bilinear", 1.0)
        self._init_head(num_classes, drop_rate)
        _init_weights(self)
        if zero_init_residual:
            for block in self.stages.modules():
                if isinstance(block, BasicBlock):
                    nn.init.zeros_(block.bn2.weight)
            if isinstance(getattr(self, "fc", None), nn.Linear):
                # the head at PyTorch's default scale (timm's and torchvision's): with the branches at zero and
                # a N(0, 0.01) head as well, both factors of every gradient start tiny (a saddle)
                self.fc.reset_parameters()
