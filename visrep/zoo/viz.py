"""Pictures of what a backbone does: Grad-CAM, feature-map grids, ViT and Swin attention maps (PNG files)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from .errors import UnknownNameError
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


# ----------------------------------------------------------------------------- Grad-CAM and friends

# ``method`` name -> class of the grad-cam package (``pytorch_grad_cam``; jacobgil/pytorch-grad-cam).
# Every one takes a classification model and target layers and nothing else; all run on CPU.
CAM_METHODS: dict[str, str] = {
    "gradcam": "GradCAM",                       # Selvaraju et al. 2016, arXiv:1610.02391
    "gradcam++": "GradCAMPlusPlus",             # Chattopadhyay et al. 2017, arXiv:1710.11063
    "xgradcam": "XGradCAM",                     # Fu et al. 2020, arXiv:2008.02312
    "hirescam": "HiResCAM",                     # Draelos & Carin 2020, arXiv:2011.08891
    "gradcamelementwise": "GradCAMElementWise",  # HiResCAM with a ReLU before the channel sum
    "layercam": "LayerCAM",                     # Jiang et al. 2021, IEEE TIP 30:5875
    "eigencam": "EigenCAM",                     # Muhammad & Yeasin 2020, arXiv:2008.00299 (class-agnostic)
    "eigengradcam": "EigenGradCAM",             # EigenCAM of gradients x activations
    "kpcacam": "KPCA_CAM",                      # kernel-PCA variant of EigenCAM (class-agnostic)
    "scorecam": "ScoreCAM",                     # Wang et al. 2019, arXiv:1910.01279 (one forward per channel)
    "ablationcam": "AblationCAM",               # Desai & Ramaswamy 2020, WACV (one forward per channel)
}
_CAM_TITLES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "xgradcam": "XGrad-CAM",
               "hirescam": "HiResCAM", "gradcamelementwise": "Grad-CAM (element-wise)", "layercam": "LayerCAM",
               "eigencam": "EigenCAM", "eigengradcam": "EigenGrad-CAM", "kpcacam": "KPCA-CAM",
               "scorecam": "Score-CAM", "ablationcam": "Ablation-CAM"}


class CamError(ValueError):
    """A CAM request that cannot be served (unknown method, headless model, a layer without a map)."""

    user_error = True  # reported as one line without a traceback (visrep.errors; the zoo imports nothing of ours)


class UnknownLayerError(UnknownNameError):
    """A ``layer=`` name that is not a module of the model; the message lists close matches."""


def cam_method(method: str) -> str:
    """The canonical name in :data:`CAM_METHODS` of ``method`` (case, ``-`` and ``_`` ignored:
    ``GradCAM++``, ``grad-cam++`` and ``gradcam++`` are one method)."""
    key = str(method).lower().replace("-", "").replace("_", "")
    if key not in CAM_METHODS:
        raise CamError(f"unknown CAM method {method!r}; choose one of: {', '.join(CAM_METHODS)}")
    return key


def _grad_cam_package():
    """``pytorch_grad_cam`` (PyPI ``grad-cam``), imported on first use: it pulls in OpenCV and scipy."""
    try:
        import pytorch_grad_cam
    except ImportError as e:
        if "cv2" in str(e) or "libGL" in str(e) or getattr(e, "name", None) == "cv2":
            hint = ("OpenCV (cv2) failed to import; on a machine without a display install the headless build: "
                    "pip uninstall -y opencv-python && pip install --force-reinstall opencv-python-headless")
        else:
            hint = "install it: pip install 'grad-cam>=1.5.7'"
        raise CamError(f"class activation maps need the grad-cam package ({e}); {hint}") from e
    return pytorch_grad_cam


def default_cam_layer(model: nn.Module) -> str:
    """The deepest ``feature_info`` module (the last stage). For a ViT whose head reads only the class
    token (timm ``global_pool="token"``), the last block's ``norm1`` instead: the patch tokens leaving
    the last block never reach the head, so their gradients are zero (as in the grad-cam ViT tutorial)."""
    name = model.feature_info[-1]["module"]
    if isinstance(getattr(model, "global_pool", None), str) and model.global_pool == "token":
        block = dict(model.named_modules()).get(name)
        if block is not None and hasattr(block, "norm1"):
            name += ".norm1"
    return name


def _to_nchw(model: nn.Module, layer: str, x: torch.Tensor):
    """``reshape_transform`` for the package: a layer's output (or its gradient) as an (N, C, H, W) map.
    Tokens ``(N, L, C)`` lose their prefix tokens and are laid out on the patch grid; NHWC maps (timm Swin)
    are permuted. The copy also keeps the saved map safe from an in-place op after the layer (an inplace
    ReLU would otherwise rewrite it on CPU, where ``.cpu()`` does not copy)."""
    num_chs = {f["module"]: f.get("num_chs") for f in getattr(model, "feature_info", [])}.get(layer)
    nhwc = getattr(model, "output_fmt", None) == "NHWC"
    h_in, w_in = x.shape[-2:]

    def channels_last(t: torch.Tensor) -> bool:
        return t.ndim == 3 or (t.ndim == 4 and (nhwc or (num_chs is not None and t.shape[1] != num_chs
                                                         and t.shape[-1] == num_chs)))

    def transform(t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 3:
            n, length, c = t.shape
            gh, gw = _token_grid(model, length, h_in, w_in)
            t = t[:, length - gh * gw:].reshape(n, gh, gw, c)
            return t.permute(0, 3, 1, 2).contiguous()
        if t.ndim != 4:
            raise CamError(f"layer {layer!r} gives a {t.ndim}-d output; a CAM needs an (N, C, H, W) map or tokens")
        return t.permute(0, 3, 1, 2).contiguous() if channels_last(t) else t.clone()

    transform.channels_last = channels_last
    return transform


def _token_grid(model: nn.Module, length: int, h: int, w: int) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    candidates = []
    if pe is not None and getattr(pe, "patch_size", None) is not None:
        ph, pw = (pe.patch_size, pe.patch_size) if isinstance(pe.patch_size, int) else pe.patch_size
        candidates.append((h // ph, w // pw))
    if pe is not None and getattr(pe, "grid_size", None) is not None:
        candidates.append(tuple(pe.grid_size))
    side = math.isqrt(length - (prefix or 0))
    candidates.append((side, side))
    for gh, gw in candidates:
        if 0 < gh * gw <= length and (prefix is None or gh * gw == length - prefix):
            return gh, gw
    raise CamError(f"cannot lay {length} tokens out on a grid for a {h}x{w} input")


class _ScoreTarget:
    """What is explained: the class logit ``y_c``, or the margin ``y_c - max_{j != c} y_j``
    (a callable on one sample's logits ``(K,)`` or a batch ``(N, K)``, as the package calls it)."""

    def __init__(self, category: int, margin: bool):
        self.category, self.margin = int(category), margin

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        value = logits[..., self.category]
        if self.margin:
            others = torch.cat([logits[..., :self.category], logits[..., self.category + 1:]], -1)
            value = value - others.amax(-1)
        return value


def grad_cam(model: nn.Module, x: torch.Tensor, target=None, layer: str | None = None, score: str = "logit",
             method: str = "gradcam"):
    """Class activation maps ``(N, H, W)`` min-max scaled to [0, 1] at the input resolution, and the classes.

    Computed by the grad-cam package (``pytorch_grad_cam``); ``method`` is one of :data:`CAM_METHODS`.
    The default, Grad-CAM, is ``cam = relu(sum_k alpha_k A^k)`` with ``alpha_k`` the spatial mean of
    ``d y_c / d A^k`` over the feature maps ``A`` of ``layer`` (default: :func:`default_cam_layer`), scaled
    to [0, 1] and resized bilinearly to the input. ``target`` is a class index (int or per-sample tensor),
    default the predicted class. ``score="margin"`` explains ``y_c - max_{j != c} y_j`` instead of the raw
    logit, which removes evidence shared by all classes. The model's train/eval mode and its parameters'
    ``.grad`` are left as they were.
    Paper: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
    Localization", 2016, arXiv:1610.02391 (the other methods: see :data:`CAM_METHODS`).
    """
    method = cam_method(method)
    if score not in ("logit", "margin"):
        raise CamError(f"score must be 'logit' or 'margin', got {score!r}")
    if getattr(model, "num_classes", 1) == 0:
        raise CamError("a class activation map explains a class score: build the model with num_classes > 0")
    layer = layer or default_cam_layer(model)
    modules = dict(model.named_modules())
    module = modules.get(layer)
    if module is None:
        import difflib
        close = difflib.get_close_matches(layer, [n for n in modules if n], n=5)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise UnknownLayerError(f"no module named {layer!r} in {type(model).__name__}{hint}")
    gc = _grad_cam_package()

    was_training = model.training
    grads = {p: p.grad for p in model.parameters()}  # the package zeroes and fills them; give them back
    model.eval()
    cam = None
    try:
        x = x.detach().clone().requires_grad_(True)  # gradients flow even through a frozen model
        if target is None:
            with torch.no_grad():
                target = model(x).argmax(1)
        target = torch.as_tensor(target, device=x.device).expand(x.shape[0]).long()
        targets = [_ScoreTarget(c, score == "margin") for c in target.tolist()]
        kwargs = {"reshape_transform": _to_nchw(model, layer, x)}
        if method == "ablationcam":  # the ablation layer stands in for ``module``: it must know the layout
            last = kwargs["reshape_transform"].channels_last(_probe(model, module, x))
            kwargs["ablation_layer"] = gc.AblationLayerVit() if last else gc.AblationLayer()
        cam = getattr(gc, CAM_METHODS[method])(model=model, target_layers=[module], **kwargs)
        with torch.enable_grad():
            maps = cam(input_tensor=x, targets=targets)
    finally:
        if cam is not None:
            cam.activations_and_grads.release()
            if method == "ablationcam" and dict(model.named_modules()).get(layer) is not module:
                from pytorch_grad_cam.utils.find_layers import replace_layer_recursive
                replace_layer_recursive(model, kwargs["ablation_layer"], module)  # after an error mid-way
        for p, g in grads.items():
            p.grad = g
        model.train(was_training)
    maps = torch.from_numpy(maps).float().clamp_(0, 1).to(x.device)
    return maps, target


def _probe(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of ``module`` for the first sample (one forward pass)."""
    out = {}
    h = module.register_forward_hook(lambda _m, _i, o: out.__setitem__("o", o))
    try:
        with torch.no_grad():
            model(x[:1].detach())
    finally:
        h.remove()
    return out["o"]


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def save_gradcam(model: nn.Module, image: torch.Tensor, display: torch.Tensor, out_path, target=None,
                 layer: str | None = None, method: str = "gradcam") -> Path:
    """Image, heatmap and overlay side by side as a PNG (``method``: one of :data:`CAM_METHODS`)."""
    plt = _plt()
    method = cam_method(method)
    cam, target = grad_cam(model, image, target, layer, method=method)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2))
    axes[0].imshow(display.numpy())
    axes[0].set_title("input")
    axes[1].imshow(cam[0].numpy(), cmap="jet", vmin=0, vmax=1)
    axes[1].set_title(f"{_CAM_TITLES[method]} ({layer or default_cam_layer(model)})")
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


# ----------------------------------------------------------------------------- Swin attention

def _swin_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """Named (shifted-)window attention blocks of a timm Swin, in forward order."""
    return {n: m for n, m in model.named_modules()
            if hasattr(m, "shift_size") and hasattr(m, "window_size") and hasattr(getattr(m, "attn", None), "attn_drop")}


def is_swin(model: nn.Module) -> bool:
    return bool(_swin_blocks(model))


@torch.no_grad()
def swin_window_attention(model: nn.Module, x: torch.Tensor, block: str | int = -1):
    """Raw attention of one Swin block: ``(probs (N * nW, heads, w*w, w*w), grid (H, W), window, shift)``.

    ``probs`` come in timm's window order (row-major over the padded, cyclically shifted token grid).
    ``block``: a module name (``"layers.3.blocks.1"``) or an index over all blocks (default -1: the last).
    """
    blocks = _swin_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} is not a Swin model with window-attention blocks "
                         "(try swin_tiny_patch4_window7_224)")
    names = list(blocks)
    if isinstance(block, int):
        name = names[block]
    elif block in blocks:
        name = block
    else:
        import difflib
        close = difflib.get_close_matches(str(block), names, n=5)
        raise UnknownLayerError(f"no Swin block named {block!r}; blocks: {', '.join(close or names[-3:])}")
    blk = blocks[name]
    store: dict[str, object] = {}
    hooks = [blk.register_forward_pre_hook(lambda _m, args: store.__setitem__("grid", tuple(args[0].shape[1:3]))),
             blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: store.__setitem__("attn", out.detach()))]
    fused = getattr(blk.attn, "fused_attn", False)
    blk.attn.fused_attn = False  # materialise the softmax
    was_training = model.training
    model.eval()
    try:
        model.forward_features(x)
    finally:
        blk.attn.fused_attn = fused
        for h in hooks:
            h.remove()
        model.train(was_training)
    window = tuple(int(w) for w in blk.window_size)
    shift = tuple(int(s) for s in blk.shift_size)
    return store["attn"], store["grid"], window, shift


def swin_attention(model: nn.Module, x: torch.Tensor, block: str | int = -1) -> torch.Tensor:
    """Attention each token *receives* in one Swin block, on the token grid: ``(N, heads, H, W)``.

    Inside window ``w`` the map is ``m[t] = (1 / |w|) sum_{q in w} A[q, t]``, the mean over the window's
    queries of the softmax attention (relative position bias and shifted-window mask included). The windows
    are put back in place (``window_reverse``), the padding cropped and the cyclic shift of a shifted block
    (SW-MSA) undone (``roll`` by ``+shift``), so ``m`` lies on the image's token grid (``H = image_h /
    reduction`` of that stage). Each row of ``A`` sums to 1 over its window, so ``m`` sums to 1 over every
    window: for a shifted block, over the windows of the grid rolled by ``-shift``. Mean over heads for one map.
    Paper: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", 2021,
    arXiv:2103.14030 (Sec. 3.2, Fig. 2 and 4).
    """
    attn, (h, w), (wh, ww), shift = swin_window_attention(model, x, block)
    heads = attn.shape[1]
    hp, wp = -(-h // wh) * wh, -(-w // ww) * ww
    received = attn.mean(2)  # (N * nW, heads, wh * ww): mean over the queries
    grid = received.view(-1, hp // wh, wp // ww, heads, wh, ww).permute(0, 3, 1, 4, 2, 5).reshape(-1, heads, hp, wp)
    grid = grid[:, :, :h, :w]
    if any(shift):
        grid = torch.roll(grid, shifts=shift, dims=(2, 3))
    return grid.contiguous()


def _save_swin_attention(model, image, display, out_path, max_heads: int = 6) -> Path:
    plt = _plt()
    import torch.nn.functional as F
    maps = swin_attention(model, image)[0]
    up = F.interpolate(maps[None], size=tuple(display.shape[:2]), mode="nearest")[0]
    return _attention_figure(plt, display, up.mean(0), "last block (mean)", maps[:max_heads], out_path, overlay=True)


def save_attention(model: nn.Module, image: torch.Tensor, display: torch.Tensor, out_path,
                   max_heads: int = 6) -> Path:
    """Input, attention rollout, and last-block CLS attention of each head, as a PNG (a ViT); for a Swin,
    the attention received per token in the last block's windows (:func:`swin_attention`) per head."""
    if is_swin(model):
        return _save_swin_attention(model, image, display, out_path, max_heads)
    plt = _plt()
    attn = vit_attention(model, image)
    prefix = getattr(model, "num_prefix_tokens", 1)
    gh, gw = model.patch_embed.grid_size if hasattr(model, "patch_embed") else (int(math.isqrt(attn[-1].shape[-1] - prefix)),) * 2
    rollout = attention_rollout(attn, prefix)[0].reshape(gh, gw)
    last = attn[-1][0, :, 0, prefix:].reshape(-1, gh, gw)
    return _attention_figure(plt, display, rollout, "rollout", last[:max_heads], out_path, overlay=False)


def _attention_figure(plt, display: torch.Tensor, summary: torch.Tensor, summary_title: str, heads: torch.Tensor,
                      out_path, overlay: bool) -> Path:
    """Input | summary map (over the input when ``overlay``) | one map per head, as a PNG."""
    fig, axes = plt.subplots(1, 2 + len(heads), figsize=(2.2 * (2 + len(heads)), 2.6))
    axes[0].imshow(display.numpy())
    axes[0].set_title("input")
    if overlay:
        axes[1].imshow(display.numpy())
    axes[1].imshow(summary.numpy(), cmap="inferno", **({"alpha": 0.6} if overlay else {}))
    axes[1].set_title(summary_title)
    for i, m in enumerate(heads):
        axes[2 + i].imshow(m.numpy(), cmap="inferno")
        axes[2 + i].set_title(f"head {i}")
    for a in axes:
        a.axis("off")
    return _save(fig, out_path)


def prepare_input(model: nn.Module, image_path=None):
    """(batch, display image) from a file (resized/normalised per the model's data config) or a test pattern."""
    cfg = get_data_config(model)
    return load_image(image_path, cfg) if image_path else synthetic_image(cfg)
