"""Pictures of what a backbone does: Grad-CAM, feature-map grids, ViT attention maps (PNG files)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .registry import get_data_config


# ----------------------------------------------------------------------------- inputs

def load_image(path, data_config: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised batch (1, C, H, W), display image (H, W, 3) in [0, 1]) resized to the model's input size."""
    from PIL import Image
    c, h, w = data_config["input_size"]
    img = Image.open(path).convert("RGB" if c == 3 else "L").resize((w, h), Image.BILINEAR)
    t = torch.as_tensor(bytearray(img.tobytes()), dtype=torch.uint8).float().div(255)
    t = t.view(h, w, c).permute(2, 0, 1)
    return normalize(t, data_config)[None], t.permute(1, 2, 0).expand(h, w, 3) if c == 1 else t.permute(1, 2, 0)


def synthetic_image(data_config: dict, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic test pattern (smooth blobs) when no image is given."""
    c, h, w = data_config["input_size"]
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    img = torch.stack([0.5 + 0.5 * torch.sin(2 * math.pi * (xx * f + yy * (k + 1)) + torch.rand(1, generator=g) * 6)
                       for k, f in enumerate((1.0, 2.0, 3.0)[:c])])
    disp = img.permute(1, 2, 0) if c == 3 else img[0][..., None].expand(h, w, 3)
    return normalize(img, data_config)[None], disp


def normalize(img: torch.Tensor, data_config: dict) -> torch.Tensor:
    mean = torch.tensor(data_config["mean"]).view(-1, 1, 1)
    std = torch.tensor(data_config["std"]).view(-1, 1, 1)
    return (img - mean) / std


# ----------------------------------------------------------------------------- Grad-CAM

def default_cam_layer(model: nn.Module) -> str:
    """The deepest ``feature_info`` module (the last conv stage)."""
    return model.feature_info[-1]["module"]


def grad_cam(model: nn.Module, x: torch.Tensor, target=None, layer: str | None = None, score: str = "logit"):
    """Grad-CAM heatmaps ``(N, H, W)`` min-max scaled to [0, 1] at the input resolution, and the classes.

    ``cam = relu(sum_k alpha_k A^k)`` with ``alpha_k`` the spatial mean of ``d y_c / d A^k`` over the
    feature maps ``A`` of ``layer`` (default: the last ``feature_info`` stage); ``target`` is a class
    index (int or per-sample tensor), default the predicted class. ``score="margin"`` explains
    ``y_c - max_{j != c} y_j`` instead of the raw logit, which removes evidence shared by all classes.
    Paper: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", 2016, arXiv:1610.02391.
    """
    if getattr(model, "num_classes", 1) == 0:
        raise ValueError("Grad-CAM explains a class score: build the model with num_classes > 0")
    layer = layer or default_cam_layer(model)
    module = dict(model.named_modules()).get(layer)
    if module is None:
        raise KeyError(f"no module named {layer!r} in {type(model).__name__}")
    store = {}
    handle = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("act", out))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(x.detach().clone().requires_grad_(True))
            if target is None:
                target = logits.argmax(1)
            target = torch.as_tensor(target, device=logits.device).expand(logits.shape[0]).long()
            act = store["act"]
            value = logits.gather(1, target[:, None])[:, 0]
            if score == "margin":
                others = logits.scatter(1, target[:, None], float("-inf"))
                value = value - others.amax(1)
            elif score != "logit":
                raise ValueError(f"score must be 'logit' or 'margin', got {score!r}")
            grad, = torch.autograd.grad(value.sum(), act)
    finally:
        handle.remove()
        model.train(was_training)
    if act.ndim != 4:
        raise ValueError(f"layer {layer!r} gives a {act.ndim}-d output; Grad-CAM needs an (N, C, H, W) map")
    weights = grad.mean((2, 3), keepdim=True)
    cam = F.relu((weights * act).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = cam.flatten(1).amin(1)[:, None, None]  # min-max scaling, as is usual for display
    hi = cam.flatten(1).amax(1)[:, None, None]
    return (cam - lo) / (hi - lo).clamp_min(1e-12), target


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def save_gradcam(model: nn.Module, image: torch.Tensor, display: torch.Tensor, out_path, target=None,
                 layer: str | None = None) -> Path:
    """Image, heatmap and overlay side by side as a PNG."""
    plt = _plt()
    cam, target = grad_cam(model, image, target, layer)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    axes[0].imshow(display.numpy())
    axes[0].set_title("input")
    axes[1].imshow(cam[0].numpy(), cmap="jet", vmin=0, vmax=1)
    axes[1].set_title(f"Grad-CAM ({layer or default_cam_layer(model)})")
    axes[2].imshow(display.numpy())
    axes[2].imshow(cam[0].numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
    axes[2].set_title(f"class {int(target[0])}")
    for a in axes:
        a.axis("off")
    return _save(fig, out_path)


def _save(fig, out_path) -> Path:
    plt = _plt()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- feature maps

@torch.no_grad()
def feature_maps(model: nn.Module, x: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Output (N, C, H, W) of ``layer`` (default: the middle ``feature_info`` stage)."""
    from .features import collect_features
    was_training = model.training
    model.eval()
    try:
        if layer is None or layer in [f["module"] for f in model.feature_info]:
            idx = len(model.feature_info) // 2 if layer is None else \
                [f["module"] for f in model.feature_info].index(layer)
            return collect_features(model, x, [idx])[0]
        store = {}
        module = dict(model.named_modules())[layer]
        h = module.register_forward_hook(lambda _m, _i, out: store.__setitem__("out", out))
        try:
            model.forward_features(x)
        finally:
            h.remove()
        out = store["out"]
        if out.ndim == 3:  # tokens: (N, L, C) -> no grid known here
            raise ValueError(f"layer {layer!r} outputs tokens, not a feature map")
        return out
    finally:
        model.train(was_training)


def save_feature_grid(model: nn.Module, image: torch.Tensor, out_path, layer: str | None = None,
                      max_channels: int = 32) -> Path:
    """Grid of the first ``max_channels`` channels of a layer's feature map (channels sorted by energy)."""
    plt = _plt()
    maps = feature_maps(model, image, layer)[0]
    order = maps.flatten(1).pow(2).mean(1).argsort(descending=True)[:max_channels]
    n = len(order)
    cols = min(8, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.6 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, c in zip(axes.flat, order.tolist()):
        ax.imshow(maps[c].numpy(), cmap="viridis")
        ax.set_title(f"ch {c}", fontsize=7)
    name = layer or model.feature_info[len(model.feature_info) // 2]["module"]
    fig.suptitle(f"{name}: {tuple(maps.shape)}", fontsize=9)
    return _save(fig, out_path)


# ----------------------------------------------------------------------------- ViT attention

@torch.no_grad()
def vit_attention(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Attention probabilities ``(N, heads, L, L)`` of every block of a timm ViT."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn") and hasattr(b.attn, "attn_drop") for b in blocks):
        raise ValueError(f"{type(model).__name__} is not a ViT with attention blocks (try vit_tiny_patch16_224)")
    maps, hooks, fused = [], [], []
    for b in blocks:
        fused.append(getattr(b.attn, "fused_attn", False))
        b.attn.fused_attn = False  # materialise the softmax so it can be read
        hooks.append(b.attn.attn_drop.register_forward_hook(lambda _m, _i, out: maps.append(out.detach())))
    was_training = model.training
    model.eval()
    try:
        model.forward_features(x)
    finally:
        for b, f, h in zip(blocks, fused, hooks):
            b.attn.fused_attn = f
            h.remove()
        model.train(was_training)
    return maps


def attention_rollout(attn: list[torch.Tensor], num_prefix: int = 1) -> torch.Tensor:
    """CLS-to-patch attention rollout ``(N, L - num_prefix)``: product over layers of
    ``0.5 * mean_heads(A) + 0.5 * I`` (rows renormalised).
    Paper: Abnar & Zuidema, "Quantifying Attention Flow in Transformers", 2020, arXiv:2005.00928.
    """
    a = attn[0].mean(1)
    eye = torch.eye(a.shape[-1], device=a.device)
    result = eye.expand_as(a).clone()
    for layer in attn:
        a = 0.5 * layer.mean(1) + 0.5 * eye
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    return result[:, 0, num_prefix:]


def save_attention(model: nn.Module, image: torch.Tensor, display: torch.Tensor, out_path,
                   max_heads: int = 6) -> Path:
    """Input, attention rollout, and last-block CLS attention of each head, as a PNG."""
    plt = _plt()
    attn = vit_attention(model, image)
    prefix = getattr(model, "num_prefix_tokens", 1)
    gh, gw = model.patch_embed.grid_size if hasattr(model, "patch_embed") else (int(math.isqrt(attn[-1].shape[-1] - prefix)),) * 2
    rollout = attention_rollout(attn, prefix)[0].reshape(gh, gw)
    last = attn[-1][0, :, 0, prefix:].reshape(-1, gh, gw)
    heads = min(max_heads, last.shape[0])
    fig, axes = plt.subplots(1, 2 + heads, figsize=(2.2 * (2 + heads), 2.6))
    axes[0].imshow(display.numpy())
    axes[0].set_title("input")
    axes[1].imshow(rollout.numpy(), cmap="inferno")
    axes[1].set_title("rollout")
    for i in range(heads):
        axes[2 + i].imshow(last[i].numpy(), cmap="inferno")
        axes[2 + i].set_title(f"head {i}")
    for a in axes:
        a.axis("off")
    return _save(fig, out_path)


def prepare_input(model: nn.Module, image_path=None):
    """(batch, display image) from a file (resized/normalised per the model's data config) or a test pattern."""
    cfg = get_data_config(model)
    return load_image(image_path, cfg) if image_path else synthetic_image(cfg)
