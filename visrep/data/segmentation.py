"""Digits-M segmentation: an embedded semantic-segmentation task, generated offline from the digits.

Each image is a Digits-M image (``visrep.data.digits_m``: a digit blended with a colour photo patch,
``|patch - digit|``); its mask labels every stroke pixel with the digit's class and the rest as background:

    mask[p] = 1 + digit   where stroke[p] >= stroke_threshold            (classes 1..10: digits 0..9)
    mask[p] = IGNORE      where ignore_below <= stroke[p] < stroke_threshold   (the blurred stroke edge)
    mask[p] = 0           elsewhere                                      (class 0: background)

``stroke[p]`` is the digit's grey level in [0, 1] at the image size -- the very image that was blended
into the photo (the 8x8 scikit-learn digit resized bilinearly). One digit per image. The edge band is left
out of the loss and the metrics (``ignore_below = stroke_threshold`` turns it off).

Splits: those of Digits-M, hence the same stratified train/val/test split of the digit indices as the
``digits`` source (same ``split_seed``, ``val_fraction``, ``test_fraction``), test backgrounds cut from
unseen parts of the photos. ``label_fraction`` keeps a stratified share of the training images. Training
augmentation (``augment: light``): a pad-and-crop shift applied to image and mask alike, drawn from
(seed, epoch, index) -- padded pixels are IGNORE in the mask -- so order and augmentation are a function
of the epoch and a resumed run continues exactly.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Optional

import numpy as np
import torch

from visrep.checks import check
from visrep.data.digits_m import PATCH_SEED, digits_m_arrays
from visrep.data.images import EpochSampler, SplitLoaders, epoch_of, loader_options, sample_seed
from visrep.data.sources import DataConfig, digits_arrays, stratified_split

IGNORE_INDEX = 255
"""Mask value of pixels left out of the loss and the metrics (the stroke edge band, padding)."""
CLASSES = ["background"] + [f"digit {i}" for i in range(10)]


@dataclasses.dataclass
class SegmentationDataConfig:
    """Digits-M segmentation (background + 10 digit classes), built offline."""

    image_size: int = 16
    stroke_threshold: float = 0.5
    """A pixel is stroke (labelled with its digit) where the digit's grey level, in [0, 1], is at least this."""
    ignore_below: float = 0.25
    """Grey levels in [ignore_below, stroke_threshold) are the stroke's blurred edge: IGNORE (255) in the mask."""
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    split_seed: int = 0
    label_fraction: float = 1.0
    """Keep this (stratified) fraction of the training images."""
    augment: Literal["none", "light"] = "light"
    """light: a random shift (pad by image_size // 8 and crop) of image and mask together."""
    patch_seed: int = PATCH_SEED

    def validate(self, prefix: str) -> None:
        check(self.image_size >= 8, f"{prefix}image_size", self.image_size, "an integer >= 8")
        check(0 < self.stroke_threshold <= 1, f"{prefix}stroke_threshold", self.stroke_threshold,
              "a grey level in (0, 1]")
        check(0 < self.ignore_below <= self.stroke_threshold, f"{prefix}ignore_below", self.ignore_below,
              f"a grey level in (0, stroke_threshold={self.stroke_threshold}] (equal: no ignored edge band)")
        check(0 < self.val_fraction < 1, f"{prefix}val_fraction", self.val_fraction, "a number in (0, 1)")
        check(0 < self.test_fraction < 1, f"{prefix}test_fraction", self.test_fraction, "a number in (0, 1)")
        check(0 < self.label_fraction <= 1, f"{prefix}label_fraction", self.label_fraction, "a number in (0, 1]")

    def digits_config(self) -> DataConfig:
        """The Digits-M settings these images and splits come from."""
        return DataConfig(source="digits_m", image_size=self.image_size, val_fraction=self.val_fraction,
                          test_fraction=self.test_fraction, split_seed=self.split_seed)


def stroke_masks(strokes: np.ndarray, labels: np.ndarray, stroke_threshold: float = 0.5,
                 ignore_below: float = 0.25) -> np.ndarray:
    """Masks (N, H, W) uint8 from stroke intensities (N, H, W) uint8 (0..255) and digit labels (N,): ``1 +
    label`` on the stroke, IGNORE on its edge band, 0 elsewhere (see the module docstring)."""
    level = strokes.astype(np.float64) / 255.0
    out = np.zeros(strokes.shape, dtype=np.uint8)
    out[level >= ignore_below] = IGNORE_INDEX
    stroke = level >= stroke_threshold
    out[stroke] = (1 + np.broadcast_to(np.asarray(labels, dtype=np.int64)[:, None, None], strokes.shape))[stroke]
    return out


def segmentation_arrays(cfg: SegmentationDataConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Images (N, S, S, 3) uint8, masks (N, S, S) uint8, digit labels (N,) and the split indices."""
    dcfg = cfg.digits_config()
    images, labels, splits = digits_m_arrays(dcfg, cfg.patch_seed)
    strokes = digits_arrays(cfg.image_size, 3)[0][..., 0]  # the grey digit blended into each image
    masks = stroke_masks(strokes, labels, cfg.stroke_threshold, cfg.ignore_below)
    splits = dict(splits)
    if cfg.label_fraction < 1.0:
        _, keep = stratified_split(labels[splits["train"]], cfg.label_fraction, cfg.split_seed)
        splits["train"] = splits["train"][keep]
    return images, masks, labels, splits


class SegmentationDataset(torch.utils.data.Dataset):
    """(normalised image (3, S, S) float, mask (S, S) long) pairs; with ``shift > 0`` (training) a random
    pad-and-crop shift of both, drawn from (seed, epoch, index)."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, mean, std, shift: int = 0, seed: Optional[int] = None):
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.images = (x - mean) / std
        self.masks = torch.from_numpy(np.ascontiguousarray(masks)).long()
        self.shift, self.seed, self.epoch = shift, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.masks)

    def __getitem__(self, index):
        x, m = self.images[index], self.masks[index]
        if self.shift and self.seed is not None:
            rng = np.random.default_rng(sample_seed(self.seed, epoch_of(index, self.epoch), index))
            dy, dx = (int(v) for v in rng.integers(0, 2 * self.shift + 1, size=2))
            p, (h, w) = self.shift, m.shape
            x = torch.nn.functional.pad(x, (p, p, p, p))[:, dy:dy + h, dx:dx + w]
            m = torch.nn.functional.pad(m, (p, p, p, p), value=IGNORE_INDEX)[dy:dy + h, dx:dx + w]
        return x, m


@dataclasses.dataclass
class SegmentationData(SplitLoaders):
    """The splits and loaders (:class:`SplitLoaders`), the class names and the ignored mask value."""

    classes: list[str] = dataclasses.field(default_factory=lambda: list(CLASSES))
    ignore_index: int = IGNORE_INDEX

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def build_segmentation_data(cfg: SegmentationDataConfig, data_config: dict, seed: int, batch_size: int,
                            eval_batch_size: int, num_workers: int = 0) -> SegmentationData:
    """Loaders of Digits-M segmentation, normalised with the backbone's ``data_config`` (mean, std): the
    training split shuffled per (seed, epoch), the last incomplete batch dropped; val / test in order."""
    images, masks, _, splits = segmentation_arrays(cfg)
    mean, std = data_config.get("mean", (0.5, 0.5, 0.5)), data_config.get("std", (0.5, 0.5, 0.5))
    shift = cfg.image_size // 8 if cfg.augment == "light" else 0
    train = SegmentationDataset(images[splits["train"]], masks[splits["train"]], mean, std, shift, seed)
    val, test = (SegmentationDataset(images[splits[s]], masks[splits[s]], mean, std) for s in ("val", "test"))
    check(len(train) >= batch_size, "run.batch_size", batch_size,
          f"at most the {len(train)} training images (data.label_fraction={cfg.label_fraction})")
    kw = loader_options(num_workers, torch.utils.data.default_collate)
    sampler = EpochSampler(len(train), seed)
    train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=True, **kw)
    return SegmentationData.build(train, train_loader, sampler, val, test, eval_batch_size, kw)


__all__ = ["CLASSES", "IGNORE_INDEX", "SegmentationData", "SegmentationDataConfig", "SegmentationDataset",
           "build_segmentation_data", "segmentation_arrays", "stroke_masks"]
