"""Necks and dense heads over any zoo backbone: FPN and U-Net."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import ConvBnAct
from .features import FeatureExtractor


def as_feature_extractor(backbone, out_indices=None, **kwargs) -> nn.Module:
    """A features_only module from a name, a zoo backbone, or a features_only module (unchanged)."""
    if isinstance(backbone, str):
        from .registry import create_backbone
        return create_backbone(backbone, features_only=True, out_indices=out_indices, **kwargs)
    if isinstance(backbone, FeatureExtractor) or not hasattr(backbone, "forward_features"):
        if not hasattr(backbone, "feature_info"):
            raise TypeError("backbone must be a zoo name, a zoo model, or a features_only module with feature_info")
        return backbone
    return FeatureExtractor(backbone, out_indices)


class FPN(nn.Module):
    """Feature Pyramid Network: 1x1 lateral convs, top-down nearest upsampling + sum, 3x3 smoothing.

    ``P_i = conv3x3(lateral_i(C_i) + upsample(P_{i+1}))``, all with ``out_channels``; the upsampling
    targets each lateral's exact size, so odd input sizes work. ``extra_levels`` adds stride-2 max-pool
    levels on top (P6, as in Mask R-CNN). Returns a list, finest level first.
    Paper: Lin et al., "Feature Pyramid Networks for Object Detection", 2016, arXiv:1612.03144.
    """

    def __init__(self, backbone, out_channels: int = 256, out_indices=None, extra_levels: int = 0, **kwargs):
        super().__init__()
        self.body = as_feature_extractor(backbone, out_indices, **kwargs)
        in_chs = [f["num_chs"] for f in self.body.feature_info]
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in in_chs)
        self.smooth = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_chs)
        self.extra_levels = extra_levels
        self.feature_info = [dict(num_chs=out_channels, reduction=f["reduction"], module=f"smooth.{i}")
                             for i, f in enumerate(self.body.feature_info)]
        last = self.body.feature_info[-1]["reduction"]
        self.feature_info += [dict(num_chs=out_channels, reduction=last * 2 ** (k + 1), module="extra")
                              for k in range(extra_levels)]
        self.data_config = dict(getattr(self.body, "data_config", {}))

    def forward(self, x):
        feats = self.body(x)
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        outs = [lat[-1]]
        for lateral in reversed(lat[:-1]):
            outs.insert(0, lateral + F.interpolate(outs[0], size=lateral.shape[-2:], mode="nearest"))
        outs = [conv(o) for conv, o in zip(self.smooth, outs)]
        for _ in range(self.extra_levels):
            outs.append(F.max_pool2d(outs[-1], 1, stride=2))
        return outs


class UNetDecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate the skip, two 3x3 conv-BN-ReLU."""

    def __init__(self, in_chs: int, skip_chs: int, out_chs: int):
        super().__init__()
        self.conv1 = ConvBnAct(in_chs + skip_chs, out_chs, 3)
        self.conv2 = ConvBnAct(out_chs, out_chs, 3)

    def forward(self, x, skip=None, size=None):
        x = F.interpolate(x, size=skip.shape[-2:] if skip is not None else size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], 1)
        return self.conv2(self.conv1(x))


class UNet(nn.Module):
    """U-Net segmentation model over any zoo encoder (its features_only pyramid as skips).

    The decoder walks from the deepest feature map up, each step upsampling to the next skip's exact
    size (odd sizes work), concatenating it, and applying two 3x3 convs; a last block brings the map
    to the input size and a 1x1 conv gives ``(N, num_classes, H, W)`` logits.
    Paper: Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
    Segmentation", 2015, arXiv:1505.04597.
    """

    def __init__(self, encoder, num_classes: int, decoder_channels=(256, 128, 64, 32, 16), out_indices=None,
                 **kwargs):
        super().__init__()
        self.encoder = as_feature_extractor(encoder, out_indices, **kwargs)
        chs = [f["num_chs"] for f in self.encoder.feature_info]
        n = len(chs)
        dec = list(decoder_channels)[:n]
        dec += [dec[-1]] * (n - len(dec))
        skips = list(reversed(chs[:-1])) + [0]  # the last block upsamples to the input size, no skip
        blocks, in_chs = [], chs[-1]
        for out_chs, skip in zip(dec, skips):
            blocks.append(UNetDecoderBlock(in_chs, skip, out_chs))
            in_chs = out_chs
        self.decoder = nn.ModuleList(blocks)
        self.head = nn.Conv2d(in_chs, num_classes, 1)
        self.num_classes = num_classes
        self.data_config = dict(getattr(self.encoder, "data_config", {}))

    def forward(self, x):
        feats = self.encoder(x)
        y = feats[-1]
        skips = list(reversed(feats[:-1]))
        for i, block in enumerate(self.decoder):
            y = block(y, skips[i] if i < len(skips) else None, size=x.shape[-2:])
        return self.head(y)
