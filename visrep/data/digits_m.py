"""Digits-M: the embedded digits blended with colour photo patches -- an offline MNIST-M.

MNIST-M (Ganin & Lempitsky 2015, arXiv:1409.7495) was made by blending each MNIST digit with a random
colour patch cut from the BSDS500 photos: ``out = |patch - digit|`` per channel, so strokes take the
inverted colour of the background. Digits-M does the same with the 1,797 digits scikit-learn ships and
patches cut from the two photos scikit-learn ships (``sklearn.datasets.load_sample_images``: a Chinese
temple and a flower). Nothing is downloaded.

Splits: the *same* stratified train/val/test split of the digit indices as the ``digits`` source (same
``split_seed``, ``val_fraction``, ``test_fraction``), so a Digits-M test image is the coloured version of
a digit in the source *test* split, never of one a source model was trained on (as MNIST-M test comes
from MNIST test). Patches are fixed per image (seeded by ``patch_seed`` and the digit index), and the
train/val patches are cut from the left 70% of each photo, the test patches from the right 30%, so the
target test backgrounds are unseen too. ``label_fraction`` keeps a stratified share of the training
labels, as for every source.

    from visrep.data.digits_m import load_digits_m_splits
    splits = load_digits_m_splits(DataConfig(image_size=32))      # DatasetDict train/val/test
    data = build_classification_data(cfg, dc, seed, bs, ebs, splits=splits)
"""
from __future__ import annotations

import functools
import hashlib

import numpy as np

from visrep.data.cache import cached_arrays
from visrep.data.sources import (DataConfig, digit_dataset, digits_arrays, register_source, stratified_split,
                                 with_label_budget)

PATCH_SEED = 1409_7495
TRAIN_REGION = 0.7
"""Train/val patches come from the left TRAIN_REGION of each photo, test patches from the rest."""


@functools.lru_cache(maxsize=2)
def _photos() -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_sample_images

    return tuple(np.asarray(im, dtype=np.uint8) for im in load_sample_images().images)


def split_indices(labels: np.ndarray, cfg: DataConfig) -> dict[str, np.ndarray]:
    """The digit indices of train/val/test: the same stratified split the ``digits`` source makes."""
    rest, test = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)
    tr, va = stratified_split(labels[rest], val_share, cfg.split_seed)
    return {"train": rest[tr], "val": rest[va], "test": test}


def blend(digit: np.ndarray, patch: np.ndarray) -> np.ndarray:
    """MNIST-M's blend: ``|patch - digit|`` per channel (uint8 in, uint8 out)."""
    d = digit.astype(np.int16)
    if d.ndim == 2:
        d = d[..., None]
    return np.abs(patch.astype(np.int16) - d).astype(np.uint8)


def cut_patch(rng: np.random.Generator, size: int, test: bool) -> np.ndarray:
    """A ``size`` x ``size`` RGB patch from a random photo, inside its train or test region."""
    photos = _photos()
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    split = int(w * TRAIN_REGION)
    lo, hi = (split, w - size) if test else (0, split - size)
    x = int(rng.integers(lo, hi + 1))
    y = int(rng.integers(0, h - size + 1))
    return photo[y:y + size, x:x + size]


def digits_m_arrays(cfg: DataConfig, patch_seed: int = PATCH_SEED) -> tuple[np.ndarray, np.ndarray, dict]:
    """All Digits-M images (N, S, S, 3) uint8, labels, and the split indices (images cached on disk)."""
    digits, labels = digits_arrays(cfg.image_size, 3)
    splits = split_indices(labels, cfg)

    def compute():
        test = np.zeros(len(labels), dtype=bool)
        test[splits["test"]] = True
        out = np.empty_like(digits)
        for i in range(len(labels)):
            rng = np.random.default_rng([patch_seed, i])
            out[i] = blend(digits[i], cut_patch(rng, cfg.image_size, bool(test[i])))
        return {"images": out}

    key = {"image_size": cfg.image_size, "patch_seed": patch_seed, "test": hashlib.sha256(splits["test"].tobytes()).hexdigest(),
           "train_region": TRAIN_REGION}
    return cached_arrays("digits_m", key, compute)["images"], labels, splits


def load_digits_m_splits(cfg: DataConfig, patch_seed: int = PATCH_SEED):
    """Digits-M as a ``datasets.DatasetDict`` (train/val/test; ``image`` undecoded PNG, ``label``
    ClassLabel) -- the form ``build_classification_data(..., splits=...)`` takes. ``cfg.channels=1``
    gives grey images (the loader converts); ``cfg.label_fraction`` is applied to train."""
    import datasets

    images, labels, idx = digits_m_arrays(cfg, patch_seed)
    ds = digit_dataset(images, labels)
    d = datasets.DatasetDict({k: ds.select(v) for k, v in idx.items()})
    d = datasets.DatasetDict({k: v.cast_column("image", datasets.Image(decode=False)) for k, v in d.items()})
    return with_label_budget(d, cfg)


register_source("digits_m", load_digits_m_splits)


__all__ = ["load_digits_m_splits", "digits_m_arrays", "split_indices", "blend", "cut_patch", "PATCH_SEED"]
