"""Contract checks for zoo backbones, for tests (ours and of anyone who registers a backbone)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .features import collect_features
from .registry import get_data_config

CONTRACT = ("num_classes", "num_features", "forward_features", "forward_head", "reset_classifier",
            "feature_info", "data_config")


def _close_to(actual: int, expected: float) -> bool:
    # unpadded convs/pools (AlexNet, ZFNet) round sizes down by a pixel or two
    return abs(actual - expected) <= max(2.0, 0.35 * expected)


def check_backbone_contract(model: nn.Module, input_size=(3, 32, 32), batch: int = 2,
                            backward: bool = True) -> torch.Tensor:
    """Assert the uniform model API on ``model`` at ``input_size`` (C, H, W); return the output.

    Checks: attributes, data config, ``forward_features`` -> ``forward_head(pre_logits=True)`` width
    == ``num_features``, logits width == ``num_classes`` (or ``num_features`` when 0), ``forward``
    == head(features) in eval mode, a backward pass reaching the parameters, and ``feature_info``
    channels/reductions against the real feature maps.
    """
    for attr in CONTRACT:
        assert hasattr(model, attr), f"missing {attr}"
    cfg = get_data_config(model)
    assert set(cfg) >= {"mean", "std", "input_size", "interpolation", "crop_pct"}, cfg
    assert len(cfg["mean"]) == len(cfg["std"]) == cfg["input_size"][0] == input_size[0], cfg
    assert isinstance(cfg["interpolation"], str) and 0 < cfg["crop_pct"] <= 1, cfg
    x = torch.randn(batch, *input_size)
    model.train()
    feats = model.forward_features(x)
    pooled = model.forward_head(feats, pre_logits=True)
    assert pooled.shape == (batch, model.num_features), (pooled.shape, model.num_features)
    out = model.forward_head(feats)
    width = model.num_classes if model.num_classes else model.num_features
    assert out.shape == (batch, width), (out.shape, width)
    if backward:
        out.float().square().mean().backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x[:1]), model.forward_head(model.forward_features(x[:1])), atol=1e-5)
        maps = collect_features(model, x[:1], range(len(model.feature_info)))
    assert len(maps) == len(model.feature_info) > 0
    for info, m in zip(model.feature_info, maps):
        assert {"num_chs", "reduction", "module"} <= set(info), info
        assert m.ndim == 4 and m.shape[1] == info["num_chs"], (info, tuple(m.shape))
        assert _close_to(m.shape[-1], input_size[-1] / info["reduction"]), (info, tuple(m.shape), input_size)
        assert _close_to(m.shape[-2], input_size[-2] / info["reduction"]), (info, tuple(m.shape), input_size)
    return out
