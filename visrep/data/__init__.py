"""Datasets: the embedded digits, Hugging Face datasets, local image folders; transforms from the
backbone's data config; reproducible per-epoch order and augmentation."""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

from visrep.data.images import (CorruptImageError, EpochSampler, ImageDataset, SplitLoaders, build_transforms, collate,
                                loader_options, decode_image, drop_unreadable)
from visrep.data.digits_m import load_digits_m_splits  # also registers data.source 'digits_m'
from visrep.data.sources import DataConfig, ShardsConfig, class_names, digits_arrays, load_splits
from visrep.data import shards


@dataclasses.dataclass
class ClassificationData(SplitLoaders):
    """The splits and loaders (:class:`SplitLoaders`), plus what a recipe needs to know."""

    classes: list[str] = dataclasses.field(default_factory=list)
    cfg: Optional[DataConfig] = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def bank_split(self):
        """The training images (undecoded) with labels, for evaluation (a kNN bank, a linear probe): the
        whole split in memory, or the first ``data.shards.eval_max_samples`` of a sharded source."""
        if isinstance(self.train, ImageDataset):
            return self.train.ds
        return shards.read_split(self.train.index, limit=self.cfg.shards.eval_max_samples)


def build_classification_data(cfg: DataConfig, data_config: dict, seed: int, batch_size: int,
                              eval_batch_size: int, num_workers: int = 0,
                              train_transform: Optional[Callable] = None, splits=None) -> ClassificationData:
    """Loaders for the configured source. ``data_config`` is the backbone's (mean, std, ...); the
    training transform can be replaced (e.g. by two-view SSL augmentation). With ``data.source: shards``
    the training split is streamed (split by rank and worker) and val / test are read into memory."""
    streamed = cfg.streamed and splits is None
    if splits is None:
        splits = shards.eval_splits(cfg)[0] if streamed else load_splits(cfg)
    mode = "RGB" if cfg.channels == 3 else "L"
    if cfg.on_corrupt == "skip":
        for name in list(splits):
            splits[name], _ = drop_unreadable(splits[name], mode, name)
    dc = dict(data_config, input_size=(cfg.channels, cfg.image_size, cfg.image_size))
    train_tf = train_transform or build_transforms(dc, cfg.image_size, train=True, **cfg.train_transform_options())
    eval_tf = build_transforms(dc, cfg.image_size, train=False)
    kw = loader_options(num_workers, collate)
    if streamed:
        train_loader = shards.train_stream(cfg, shards.ImageSamples(train_tf, mode, seed), collate, batch_size, seed,
                                           kw["num_workers"], kw["pin_memory"])
        train, sampler = train_loader.dataset, None
    else:
        train = ImageDataset(splits["train"], train_tf, mode, "train", seed=seed)
        sampler = EpochSampler(len(train), seed)
        train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=True, **kw)
    val = ImageDataset(splits["val"], eval_tf, mode, "val")
    test = ImageDataset(splits["test"], eval_tf, mode, "test")
    return ClassificationData.build(train, train_loader, sampler, val, test, eval_batch_size, kw,
                                    classes=class_names(splits), cfg=cfg)


__all__ = ["DataConfig", "ShardsConfig", "shards", "ClassificationData", "CorruptImageError", "EpochSampler", "ImageDataset",
           "build_classification_data", "build_transforms", "class_names", "collate", "decode_image",
           "digits_arrays", "drop_unreadable", "load_digits_m_splits", "load_splits", "loader_options"]
