"""BYOL's two asymmetric views, sampled per image: in the data loader (torchvision v2, one image at
a time) or on the accelerator (a whole batch at once, every image with its own random parameters).
DINO's multi-crop adds smaller local crops to the same two global views (:class:`MultiCrop`,
:class:`BatchedMultiCrop`).

View parameters follow the paper (Grill et al. 2020, arXiv:2006.07733, Appendix B, Table 6):

    =========================  ==========  ==========
    parameter                  view 1 (T)  view 2 (T')
    =========================  ==========  ==========
    random resized crop        0.08 - 1    0.08 - 1
    horizontal flip            0.5         0.5
    colour jitter (0.4, 0.4,   0.8         0.8
    0.2, 0.1)
    grayscale                  0.2         0.2
    Gaussian blur              1.0         0.1
    solarize                   0.0         0.2
    =========================  ==========  ==========

Small-image variant (inputs <= 64 px, e.g. CIFAR's 32x32): the same, without Gaussian blur, which on a
32-pixel image wipes out most of the signal (the CIFAR settings of solo-learn and lightly do the same).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from visrep.checks import check
from visrep.data.images import ScaleNormalize


@dataclasses.dataclass
class SSLAugmentConfig:
    """Two-view augmentation. Pairs are (view 1, view 2)."""

    variant: Literal["auto", "imagenet", "small"] = "auto"
    """auto: 'small' for data.image_size <= 64, else 'imagenet'; small = no Gaussian blur."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, float] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: tuple[float, float] = (0.0, 0.2)
    device: Literal["loader", "accelerator"] = "loader"
    """loader: per image with torchvision in the data loader workers; accelerator: batched on the
    training device (the loader only decodes and resizes), still random per image."""

    def validate(self, prefix: str) -> None:
        for key in ("hflip", "jitter_prob", "grayscale_prob"):
            check(0 <= getattr(self, key) <= 1, f"{prefix}{key}", getattr(self, key), "a probability in [0, 1]")
        for key in ("blur_prob", "solarize_prob"):
            check(all(0 <= v <= 1 for v in getattr(self, key)), f"{prefix}{key}", getattr(self, key),
                  "two probabilities in [0, 1]")
        lo, hi = self.crop_scale
        check(0 < lo <= hi <= 1, f"{prefix}crop_scale", self.crop_scale, "0 < min <= max <= 1")
        check(0 <= self.hue <= 0.5, f"{prefix}hue", self.hue, "a number in [0, 0.5]")

    def resolved(self, image_size: int) -> "SSLAugmentConfig":
        """The config with the small-image variant applied (blur off) when it is in effect."""
        small = self.variant == "small" or (self.variant == "auto" and image_size <= 64)
        return dataclasses.replace(self, blur_prob=(0.0, 0.0)) if small else self


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the image side, odd (23 px at 224 px, as in SimCLR / BYOL)."""
    k = max(3, int(round(0.1 * image_size)))
    return k if k % 2 else k + 1


class TwoViews:
    """Callable: image -> (view1(image), view2(image)). Collated into a pair of batches."""

    def __init__(self, view1, view2):
        self.view1, self.view2 = view1, view2

    def __call__(self, img):
        return self.view1(img), self.view2(img)

    def __repr__(self):
        return f"TwoViews(\n  view1={self.view1},\n  view2={self.view2})"


def _norm_stats(mean: Sequence[float], std: Sequence[float], channels: int):
    mean, std = tuple(mean), tuple(std)
    if len(mean) != channels:
        mean, std = (sum(mean) / len(mean),) * channels, (sum(std) / len(std),) * channels
    return mean, std


def byol_view_transform(cfg: SSLAugmentConfig, view: int, image_size: int, mean, std, channels: int = 3):
    """torchvision v2 pipeline of one view (0 or 1), uint8 image tensor (or PIL image) -> normalised float tensor."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    cfg = cfg.resolved(image_size)
    mean, std = _norm_stats(mean, std, channels)
    ops: list = [T.ToImage(),
                 T.RandomResizedCrop(image_size, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                                     interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if cfg.hflip > 0:
        ops.append(T.RandomHorizontalFlip(cfg.hflip))
    color = channels == 3
    if cfg.jitter_prob > 0:
        ops.append(T.RandomApply([T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation if color else 0,
                                                cfg.hue if color else 0)], p=cfg.jitter_prob))
    if color and cfg.grayscale_prob > 0:
        ops.append(T.RandomGrayscale(cfg.grayscale_prob))
    if cfg.blur_prob[view] > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(image_size), sigma=tuple(cfg.blur_sigma))],
                                 p=cfg.blur_prob[view]))
    if cfg.solarize_prob[view] > 0:
        ops.append(T.RandomSolarize(threshold=128, p=cfg.solarize_prob[view]))
    return T.Compose(ops + [ScaleNormalize(mean, std)])


def byol_transforms(cfg: SSLAugmentConfig, image_size: int, mean, std, channels: int = 3) -> TwoViews:
    """The loader-side two-view transform: uint8 image tensor (or PIL image) -> (view 1, view 2)."""
    return TwoViews(byol_view_transform(cfg, 0, image_size, mean, std, channels),
                    byol_view_transform(cfg, 1, image_size, mean, std, channels))


class MultiCrop:
    """Callable: image -> (global view 1, global view 2, local crop 1, ..., local crop n): DINO's
    multi-crop (the two global views are BYOL's; every local crop is drawn afresh). Collated into a tuple
    of batches."""

    def __init__(self, global1, global2, local=None, n_local: int = 0):
        self.global1, self.global2, self.local, self.n_local = global1, global2, local, int(n_local)

    def __call__(self, img):
        return (self.global1(img), self.global2(img), *(self.local(img) for _ in range(self.n_local)))

    def __repr__(self):
        return (f"MultiCrop(\n  global1={self.global1},\n  global2={self.global2},\n"
                f"  {self.n_local} x local={self.local})")


def local_crop_config(cfg: SSLAugmentConfig, crop_scale: Sequence[float]) -> SSLAugmentConfig:
    """The augmentation of DINO's local crops: the global views' jitter, grayscale and flip, a smaller
    crop scale, blur with probability 0.5, no solarize (Caron et al. 2021, arXiv:2104.14294, Appendix)."""
    return dataclasses.replace(cfg, crop_scale=tuple(crop_scale), blur_prob=(0.5, 0.5), solarize_prob=(0.0, 0.0))


def multicrop_transforms(cfg: SSLAugmentConfig, image_size: int, mean, std, channels: int = 3, n_local: int = 0,
                         local_size: int = 96, local_crop_scale: Sequence[float] = (0.05, 0.4)):
    """The loader-side views: BYOL's two views (:func:`byol_transforms`) when ``n_local`` is 0, else
    :class:`MultiCrop` with ``n_local`` local crops of ``local_size`` pixels."""
    if n_local == 0:
        return byol_transforms(cfg, image_size, mean, std, channels)
    local = byol_view_transform(local_crop_config(cfg, local_crop_scale), 0, local_size, mean, std, channels)
    return MultiCrop(byol_view_transform(cfg, 0, image_size, mean, std, channels),
                     byol_view_transform(cfg, 1, image_size, mean, std, channels), local, n_local)


def base_transform(image_size: int):
    """Loader side of ``device='accelerator'``: decode and resize to a uint8 tensor. The loader, the
    pinned buffers and the host-to-device copy move a quarter of the bytes of float32; the scaling to
    [0, 1] happens on the device (:class:`BatchedBYOLAugment`)."""
    from torchvision.transforms import v2 as T

    return T.Compose([T.ToImage(), T.Resize((image_size, image_size), antialias=True)])


# ----------------------------------------------------------------------------------------------
# Batched, on the accelerator
# ----------------------------------------------------------------------------------------------
def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """Seed of one batch's augmentation: a function of (seed, epoch, batch index, rank), so a resumed
    run draws the same views."""
    return int(np.random.SeedSequence([seed, epoch, batch, rank, 0xB401]).generate_state(1, dtype=np.uint32)[0])


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    v = maxc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-8), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, v], 1)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(1)
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in
                         ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 0)  # 6,N,3,H,W
    return table.gather(0, i[None, :, None].expand(1, -1, 3, -1, -1)).squeeze(0)


class BatchedBYOLAugment(torch.nn.Module):
    """Both BYOL views of a batch on its own device: ``(N, C, H, W)`` uint8 images (or floats in [0, 1])
    -> (view 1, view 2), normalised. Every image draws its own crop, flip, jitter factors, grayscale,
    blur sigma and solarize coin, as in the per-image pipeline; the parameters are drawn on the CPU
    from a generator seeded by ``batch_seed`` and applied with batched ops (one ``grid_sample`` for all
    crops and flips, a grouped convolution for the per-image blurs).

    Differences from the loader pipeline, by design: colour jitter is applied in the fixed order
    brightness, contrast, saturation, hue (torchvision shuffles the order per image); a crop whose
    sampled side exceeds the image is clipped to it (torchvision re-draws up to 10 times, then
    centre-crops); crops are resampled bilinearly from the already resized image.
    """

    def __init__(self, cfg: SSLAugmentConfig, image_size: int, mean, std, channels: int = 3):
        super().__init__()
        self.cfg = cfg.resolved(image_size)
        self.size = image_size
        mean, std = _norm_stats(mean, std, channels)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.kernel = blur_kernel_size(image_size)

    def forward(self, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(int(seed))
        return self.view(x, 0, g), self.view(x, 1, g)

    def _rand(self, g, n, lo=0.0, hi=1.0):
        return torch.rand(n, generator=g) * (hi - lo) + lo

    @torch.no_grad()
    def view(self, x: torch.Tensor, view: int, g: torch.Generator) -> torch.Tensor:
        cfg, n, dev = self.cfg, x.shape[0], x.device
        x = x.float().mul_(1.0 / 255) if x.dtype == torch.uint8 else x.float()  # as ToDtype(scale=True)
        # random resized crop + flip: one affine grid per image
        area = self._rand(g, n, *cfg.crop_scale)
        log_r = self._rand(g, n, math.log(cfg.crop_ratio[0]), math.log(cfg.crop_ratio[1]))
        ratio = torch.exp(log_r)
        cw = torch.sqrt(area * ratio).clamp(max=1.0)
        ch = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = (self._rand(g, n) * (1 - cw) + cw / 2) * 2 - 1
        cy = (self._rand(g, n) * (1 - ch) + ch / 2) * 2 - 1
        flip = torch.where(self._rand(g, n) < cfg.hflip, -1.0, 1.0)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = cw * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = ch, cy
        grid = F.affine_grid(theta.to(dev), [n, x.shape[1], self.size, self.size], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        color = x.shape[1] == 3

        def per_image(v):
            return v.to(dev).view(n, 1, 1, 1)

        # colour jitter (p = jitter_prob): unselected images get neutral factors
        jit = self._rand(g, n) < cfg.jitter_prob
        b = torch.where(jit, self._rand(g, n, 1 - cfg.brightness, 1 + cfg.brightness), torch.ones(n))
        c = torch.where(jit, self._rand(g, n, 1 - cfg.contrast, 1 + cfg.contrast), torch.ones(n))
        s = torch.where(jit, self._rand(g, n, 1 - cfg.saturation, 1 + cfg.saturation), torch.ones(n))
        h = torch.where(jit, self._rand(g, n, -cfg.hue, cfg.hue), torch.zeros(n))
        x = (x * per_image(b)).clamp(0, 1)
        m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - m) * per_image(c) + m).clamp(0, 1)
        if color:
            gray = _gray(x)
            x = ((x - gray) * per_image(s) + gray).clamp(0, 1)
            if cfg.hue > 0:
                hsv = _rgb_to_hsv(x)
                hsv = torch.stack([(hsv[:, 0] + h.to(dev).view(n, 1, 1)) % 1.0, hsv[:, 1], hsv[:, 2]], 1)
                x = torch.where(per_image(jit), _hsv_to_rgb(hsv), x).clamp(0, 1)
            # grayscale
            to_gray = self._rand(g, n) < cfg.grayscale_prob
            x = torch.where(per_image(to_gray), _gray(x).expand_as(x), x)
        # Gaussian blur: per-image sigma, a delta kernel for the images not blurred
        if cfg.blur_prob[view] > 0:
            blur = self._rand(g, n) < cfg.blur_prob[view]
            sigma = self._rand(g, n, *cfg.blur_sigma)
            k = self.kernel
            t = torch.arange(k, dtype=torch.float32) - k // 2
            ker = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
            ker = ker / ker.sum(1, keepdim=True)
            delta = (t == 0).float().expand(n, k)
            ker = torch.where(blur[:, None], ker, delta).to(dev)
            C = x.shape[1]
            w = ker.repeat_interleave(C, 0)  # (N*C, k)
            y = x.reshape(1, n * C, *x.shape[2:])
            pad = k // 2
            y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), w.view(n * C, 1, 1, k), groups=n * C)
            y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), w.view(n * C, 1, k, 1), groups=n * C)
            x = y.view_as(x)
        if cfg.solarize_prob[view] > 0:
            sol = per_image(self._rand(g, n) < cfg.solarize_prob[view])
            x = torch.where(sol & (x >= 0.5), 1.0 - x, x)
        return (x - self.mean) / self.std


class BatchedMultiCrop(torch.nn.Module):
    """DINO's multi-crop on the accelerator: the two global views of :class:`BatchedBYOLAugment` (the same
    values for the same seed) and ``n_local`` local crops of ``local_size`` pixels (crop scale
    ``local_crop_scale``, :func:`local_crop_config`), each image with its own parameters, all drawn from
    one generator seeded per batch (:func:`batch_seed`)."""

    def __init__(self, cfg: SSLAugmentConfig, image_size: int, mean, std, channels: int = 3, n_local: int = 0,
                 local_size: int = 96, local_crop_scale: Sequence[float] = (0.05, 0.4)):
        super().__init__()
        self.globals = BatchedBYOLAugment(cfg, image_size, mean, std, channels)
        self.n_local = int(n_local)
        self.locals = (BatchedBYOLAugment(local_crop_config(cfg, local_crop_scale), local_size, mean, std, channels)
                       if n_local else None)

    def forward(self, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(int(seed))
        views = [self.globals.view(x, 0, g), self.globals.view(x, 1, g)]
        return tuple(views + [self.locals.view(x, 0, g) for _ in range(self.n_local)])
