"""Theoretical receptive field and stride of every ``feature_info`` stage, for any zoo model.

The theoretical receptive field (RF) of an output unit is the set of input pixels with a path to it
through the network graph (Araujo, Norris, Sim, "Computing Receptive Fields of Convolutional Neural
Networks", Distill 2019; Luo et al., "Understanding the Effective Receptive Field in Deep CNNs", 2016,
arXiv:1701.04128, whose *effective* RF is the gradient's magnitude over that set).

How: measured, not derived. A formula (``r_out = r_in + (k - 1) * j_in``, ``j_out = j_in * s``) needs the
graph -- residual branches (the RF is the max over paths), concatenations (Inception), attention windows
(Swin), global gates (SE/CBAM) -- which a module list does not give for an arbitrary timm / torchvision
model. The gradient does: on a copy of the model made *linear and positive* -- activation modules replaced by
identities, every weight drawn from U(0.5, 1.5) and divided by its fan-in (so activations stay finite),
biases 0, BatchNorm statistics reset to (0, 1), max-pools replaced by average pools of the same geometry (a
max routes its gradient to one input only), eval mode -- and a positive input, every term of
``d out[c, i, j] / d x`` is a product of positive numbers, so the gradient is non-zero exactly on the pixels
with a path to the output: the theoretical RF, with no cancellation. (Normalisations that subtract a mean,
LayerNorm/GroupNorm, can in principle cancel a term; with random positive weights that has probability 0.)
The RF is the bounding box of that support for the centre output unit; the stride (the "jump") is how far the
box moves for the next unit. The input is grown (tall and wide probes) until the box no longer touches the
image border, so a RF larger than the model's default input is still measured; a model that accepts no
other input size (ViT, Swin with fixed ``img_size``) reports ``clipped=True`` and the RF as the whole input.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["receptive_fields", "linear_positive_copy"]

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Softplus)


def _is_activation(m: nn.Module) -> bool:
    return isinstance(m, _ACTIVATIONS) or type(m).__module__.startswith("timm.layers.activations")


def linear_positive_copy(model: nn.Module, dtype=torch.float32) -> nn.Module:
    """The copy described in the module docstring (eval mode, ``dtype``, no gradients to its parameters)."""
    probe = copy.deepcopy(model).to(dtype=dtype).eval()
    gen = torch.Generator().manual_seed(0)

    def swap(parent: nn.Module):
        for name, child in list(parent.named_children()):
            if _is_activation(child):
                setattr(parent, name, nn.Identity())
            elif isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode, count_include_pad=True))
            elif isinstance(child, nn.AdaptiveMaxPool2d):
                setattr(parent, name, nn.AdaptiveAvgPool2d(child.output_size))
            else:
                swap(child)

    swap(probe)
    with torch.no_grad():
        for p in probe.parameters():
            p.copy_(torch.rand(p.shape, generator=gen, dtype=torch.float64).add_(0.5))
            p.requires_grad_(False)
        for m in probe.modules():
            if isinstance(m, nn.modules.conv._ConvNd):
                m.weight.div_(m.weight[0].numel())  # the fan-in C_in/groups * k^2: each output stays O(1)
            elif isinstance(m, nn.Linear):
                m.weight.div_(m.in_features)
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
            bias = getattr(m, "bias", None)
            if isinstance(bias, torch.Tensor) and not isinstance(m, nn.MultiheadAttention):
                bias.zero_()
    return probe


def _stage_maps(probe: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    from .features import FeatureExtractor, collect_features
    if isinstance(probe, FeatureExtractor):
        return list(probe(x))
    return collect_features(probe, x, range(len(probe.feature_info)))


def _extent(support: torch.Tensor) -> tuple[int, int] | None:
    idx = support.nonzero().flatten()
    return (int(idx[0]), int(idx[-1])) if idx.numel() else None


def _measure(probe: nn.Module, c: int, h: int, w: int, dtype) -> list[dict]:
    """One probe at (h, w): per stage and axis, (extent of the centre unit, of the next unit, input length)."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(2, c, h, w, generator=gen, dtype=torch.float64) + 0.5).to(dtype).requires_grad_(True)
    maps = _stage_maps(probe, x)
    out = []
    for m in maps:
        hs, ws = m.shape[-2:]
        ci, cj = hs // 2, ws // 2
        ni, nj = min(ci + 1, hs - 1), min(cj + 1, ws - 1)
        loss = m[0, :, ci, cj].sum() + m[1, :, ni, nj].sum()
        g = torch.autograd.grad(loss, x, retain_graph=True)[0].abs().sum(1) != 0  # (2, h, w)
        rec = {}
        for axis, length, nxt, other in (("h", h, ni != ci, 1), ("w", w, nj != cj, 0)):
            a = _extent(g[0].any(dim=other))  # the support projected on this axis
            b = _extent(g[1].any(dim=other)) if nxt else None
            rec[axis] = (a, b, length)
        out.append(rec)
    return out


def _clipped(ext, length) -> bool:
    return ext is None or ext[0] == 0 or ext[1] == length - 1


def receptive_fields(model: nn.Module, input_size=None, max_size: int = 2048,
                     dtype=torch.float32) -> list[dict]:
    """Per ``feature_info`` stage: ``{"module", "reduction", "rf": (h, w), "stride": (h, w), "clipped"}``.

    ``rf`` is the side of the theoretical receptive field of one unit of that stage, in input pixels;
    ``stride`` the distance in input pixels between neighbouring units (measured: the shift of the RF from one
    unit to the next; ``None`` where it could not be measured; 0 where neighbours share their RF, as the tokens
    of one Swin window do).
    ``clipped``: the RF reached the border of the largest input the model accepted (up to ``max_size``),
    so ``rf`` is a lower bound (e.g. any ViT: global attention sees the whole input from block 1).
    ``input_size`` (C, H, W) defaults to the model's data config. Method: see the module docstring.
    """
    from .registry import get_data_config
    c, h, w = tuple(input_size or get_data_config(model)["input_size"])
    probe = linear_positive_copy(model, dtype)
    infos = list(probe.feature_info)
    with torch.enable_grad():
        first = _measure(probe, c, h, w, dtype)
        result = [{"rf": {}, "stride": {}, "clipped": {}} for _ in infos]

        def settle(recs, axes):
            for r, rec in zip(result, recs):
                for axis in axes:
                    if axis in r["rf"] and not r["clipped"][axis] and axis in r["stride"]:
                        continue
                    a, b, length = rec[axis]
                    if axis not in r["rf"] or r["clipped"][axis]:
                        r["rf"][axis] = a[1] - a[0] + 1 if a else 0
                        r["clipped"][axis] = _clipped(a, length)
                    if b is not None and not _clipped(a, length) and not _clipped(b, length):
                        r["stride"][axis] = b[0] - a[0]

        settle(first, ("h", "w"))
        for axis in ("h", "w"):
            size = (h if axis == "h" else w) * 2
            while any(r["clipped"][axis] or axis not in r["stride"] for r in result) and size <= max_size:
                try:
                    recs = _measure(probe, c, size if axis == "h" else h, w if axis == "h" else size, dtype)
                except Exception:  # a model with a fixed input size: the RF stays a lower bound
                    break
                settle(recs, (axis,))
                size *= 2
    out = []
    for info, r in zip(infos, result):
        stride = tuple(r["stride"].get(a) for a in ("h", "w"))
        out.append({"module": info["module"], "reduction": info.get("reduction"),
                    "rf": (r["rf"]["h"], r["rf"]["w"]), "stride": stride,
                    "clipped": r["clipped"]["h"] or r["clipped"]["w"]})
    return out
