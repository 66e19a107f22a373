"""Where images come from: the embedded digits, any Hugging Face dataset, or a local image folder.

Every source ends as a ``datasets.DatasetDict`` with ``train``, ``val`` and ``test`` splits and the
columns ``image`` and ``label`` (a ``ClassLabel``). Images are stored undecoded and decoded by
``visrep.data.images`` so a bad file is reported by name.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from visrep.data.cache import cached_arrays
from visrep.errors import MissingFileError, MissingKeyError
from visrep.checks import check


@dataclasses.dataclass
class ShardsConfig:
    """data.source=shards: webdataset-format tar shards, streamed (``visrep.data.shards``)."""

    train: Optional[str] = None
    """The training shards: an index JSON (``visrep data pack`` / ``visrep data index`` write one; needed
    for pipe: and remote shards), or a brace pattern of local .tar files. Default: DATA_DIR/train.json."""
    val: Optional[str] = None
    """Validation shards (read into memory, at most eval_max_samples). Default: DATA_DIR/val.json."""
    test: Optional[str] = None
    """Test shards. Default: DATA_DIR/test.json."""
    shuffle_buffer: int = 1000
    """Samples permuted together in a loader worker (each worker holds this many encoded samples)."""
    resampled: bool = False
    """Draw shards with replacement (corpora too large for epochs); an epoch is samples_per_epoch samples."""
    samples_per_epoch: Optional[int] = None
    eval_max_samples: int = 50_000
    """At most this many samples of val / test are read (in order); also the size of a kNN bank drawn
    from the training shards (BYOL's evaluation)."""

    def spec(self, split: str, data_dir: Optional[str]) -> Optional[str]:
        given = getattr(self, split)
        if given:
            return given
        return str(Path(data_dir) / f"{split}.json") if data_dir else None

    def validate(self, prefix: str) -> None:
        check(self.shuffle_buffer >= 1, f"{prefix}shuffle_buffer", self.shuffle_buffer, "an integer >= 1")
        check(self.eval_max_samples >= 1, f"{prefix}eval_max_samples", self.eval_max_samples, "an integer >= 1")
        check(not self.resampled or (self.samples_per_epoch or 0) >= 1, f"{prefix}samples_per_epoch",
              self.samples_per_epoch, "an integer >= 1 when resampled is true")


@dataclasses.dataclass
class DataConfig:
    source: Literal["digits", "digits_m", "hf", "imagefolder", "shards"] = "digits"
    """digits: scikit-learn's bundled 8x8 digits (no download); digits_m: the same digits blended with
    colour patches of scikit-learn's sample photos (an offline MNIST-M, ``visrep.data.digits_m``; same
    splits as digits); hf: datasets.load_dataset(name, hf_config); imagefolder: a local tree
    (class-per-folder, optionally under train/ val/ test/); shards: webdataset tar shards, streamed
    (data.shards; ``visrep data pack`` writes them from any of the others)."""
    name: Optional[str] = None
    """Hugging Face dataset name (source=hf)."""
    hf_config: Optional[str] = None
    streaming: bool = False
    """source=hf: stream the training split from the dataset's parquet files (on the Hub or local) instead
    of downloading it: split by rank and loader worker, exact resume, as data.source shards (whose
    shuffle_buffer, resampled and eval_max_samples apply); val / test are read into memory (capped)."""
    data_dir: Optional[str] = None
    """Image folder root (source=imagefolder); the folder of train/val/test.json (source=shards)."""
    train_split: str = "train"
    val_split: Optional[str] = "validation"
    """Used when the source has it; otherwise val_fraction of train is held out (stratified, seeded)."""
    test_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    image_size: int = 32
    channels: Literal[1, 3] = 3
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    """Held out of train when the source has no test split (the digits have neither)."""
    split_seed: int = 0
    hflip: float = 0.5
    """Probability of a horizontal flip at train time (0 for digits: a mirrored 7 is no 7)."""
    augment: Literal["none", "light", "strong"] = "light"
    """light: pad-and-crop (small inputs) or random-resized crop; strong adds colour jitter."""
    randaugment_ops: int = 0
    """RandAugment (Cubuk et al. 2019, arXiv:1909.13719) after the crop and flip: this many random ops per image
    (torchvision's v2.RandAugment); 0: off. timm's ``rand-m9-n2`` is 2 ops at magnitude 9."""
    randaugment_magnitude: int = 9
    """RandAugment's magnitude, 0-30 (torchvision's 31 bins)."""
    random_erasing: float = 0.0
    """Random erasing (Zhong et al. 2017, arXiv:1708.04896): probability that a box (2-33% of the image, aspect
    0.3-3.3) of the normalised image is replaced by per-pixel normal noise (timm's ``mode='pixel'``); 0: off."""
    on_corrupt: Literal["error", "skip"] = "error"
    """error: stop with the file's name; skip: drop unreadable images up front and log how many."""
    label_fraction: float = 1.0
    """Keep this fraction of the training labels (stratified, seeded): the label budget."""
    shards: ShardsConfig = dataclasses.field(default_factory=ShardsConfig)

    def train_transform_options(self) -> dict:
        """The augmentation keywords of ``build_transforms(..., train=True)``."""
        return dict(hflip=self.hflip, augment=self.augment, random_erasing=self.random_erasing,
                    randaugment=(self.randaugment_ops, self.randaugment_magnitude))

    @property
    def streamed(self) -> bool:
        """Whether the training split is streamed (split by rank and worker): tar shards, or a Hugging
        Face dataset with ``streaming``."""
        return self.source == "shards" or (self.source == "hf" and self.streaming)

    def validate(self, prefix: str) -> None:
        check(self.image_size >= 8, f"{prefix}image_size", self.image_size, "an integer >= 8")
        check(not self.streaming or self.source == "hf", f"{prefix}streaming", self.streaming,
              "false unless data.source is 'hf' (tar shards always stream: data.source shards)")
        check(0 < self.val_fraction < 1, f"{prefix}val_fraction", self.val_fraction, "a number in (0, 1)")
        check(0 < self.test_fraction < 1, f"{prefix}test_fraction", self.test_fraction, "a number in (0, 1)")
        check(0 <= self.hflip <= 1, f"{prefix}hflip", self.hflip, "a probability in [0, 1]")
        check(self.randaugment_ops >= 0, f"{prefix}randaugment_ops", self.randaugment_ops, "an integer >= 0")
        check(0 <= self.randaugment_magnitude <= 30, f"{prefix}randaugment_magnitude", self.randaugment_magnitude,
              "an integer in [0, 30]")
        check(0 <= self.random_erasing <= 1, f"{prefix}random_erasing", self.random_erasing, "a probability in [0, 1]")
        check(0 < self.label_fraction <= 1, f"{prefix}label_fraction", self.label_fraction, "a number in (0, 1]")
        check(self.source != "hf" or bool(self.name), f"{prefix}name", self.name,
              "a Hugging Face dataset name when data.source is 'hf'")
        check(self.source != "imagefolder" or bool(self.data_dir), f"{prefix}data_dir", self.data_dir,
              "a directory when data.source is 'imagefolder'")
        if self.streamed:
            self.shards.validate(f"{prefix}shards.")
            check(self.label_fraction == 1.0, f"{prefix}label_fraction", self.label_fraction,
                  "1.0 when the training split is streamed (a label budget on a stream: pack the subset with "
                  "`visrep data pack`)")
        if self.source == "shards":
            for split in ("train", "val", "test"):
                check(self.shards.spec(split, self.data_dir) is not None, f"{prefix}shards.{split}", None,
                      f"the {split} shards (an index JSON or a pattern), or data.data_dir holding {split}.json, "
                      f"when data.source is 'shards'")


def digits_arrays(image_size: int = 32, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 bundled digits as uint8 images (N, H, W[, 3]) resized to ``image_size``, and labels
    (cached on disk: ``visrep.data.cache``)."""

    def compute():
        from PIL import Image
        from sklearn.datasets import load_digits

        d = load_digits()
        raw = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
        out = []
        for img in raw:
            im = Image.fromarray(img, mode="L").resize((image_size, image_size), Image.BILINEAR)
            out.append(np.asarray(im.convert("RGB") if channels == 3 else im))
        return {"images": np.stack(out), "labels": d.target.astype(np.int64)}

    r = cached_arrays("digits", {"image_size": image_size, "channels": channels}, compute)
    return r["images"], r["labels"]


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (kept, held out) of a stratified split holding out ``fraction`` of ``labels``
    (scikit-learn's ``train_test_split``; cached on disk)."""

    def compute():
        from sklearn.model_selection import train_test_split

        idx = np.arange(len(labels))
        keep, held = train_test_split(idx, test_size=fraction, stratify=labels, random_state=seed)
        return {"keep": np.sort(keep), "held": np.sort(held)}

    labels = np.asarray(labels)
    key = {"labels": hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest(), "fraction": fraction, "seed": seed}
    r = cached_arrays("split", key, compute)
    return r["keep"], r["held"]



def digit_dataset(images: np.ndarray, labels: np.ndarray):
    """A ``datasets.Dataset`` of digit images (uint8 arrays) with ClassLabel labels '0'..'9'."""
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    return datasets.Dataset.from_dict({"image": [Image.fromarray(im) for im in images], "label": labels.tolist()},
                                      features=features)


def _digits(cfg: DataConfig):
    import datasets

    images, labels = digits_arrays(cfg.image_size, cfg.channels)
    ds = digit_dataset(images, labels)
    rest, test = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    val_share = cfg.val_fraction / (1.0 - cfg.test_fraction)
    tr, va = stratified_split(labels[rest], val_share, cfg.split_seed)
    return datasets.DatasetDict(train=ds.select(rest[tr]), val=ds.select(rest[va]), test=ds.select(test))


def _standardize(d, cfg: DataConfig):
    """Rename the configured columns to image/label, make label a ClassLabel, and derive missing splits."""
    import datasets

    first = next(iter(d.values()))
    for col in (cfg.image_column, cfg.label_column):
        if col not in first.column_names:
            raise MissingKeyError(f"dataset column '{col}' not found; available columns: {first.column_names}. "
                           f"Set data.image_column / data.label_column.")
    out = {}
    for split, ds in d.items():
        ds = ds.select_columns([cfg.image_column, cfg.label_column])
        if cfg.image_column != "image":
            ds = ds.rename_column(cfg.image_column, "image")
        if cfg.label_column != "label":
            ds = ds.rename_column(cfg.label_column, "label")
        out[split] = ds
    labels_feat = out[cfg.train_split].features["label"] if cfg.train_split in out else first.features[cfg.label_column]
    if not isinstance(labels_feat, datasets.ClassLabel):
        names = sorted({str(v) for ds in out.values() for v in ds.unique("label")})
        for split in out:
            out[split] = out[split].map(lambda r: {"label": str(r["label"])}).cast_column(
                "label", datasets.ClassLabel(names=names))
    if cfg.train_split not in out:
        raise MissingKeyError(f"split '{cfg.train_split}' not found; available splits: {sorted(out)}. Set data.train_split.")
    train = out[cfg.train_split]
    labels = np.asarray(train["label"])
    if cfg.test_split in out:
        test = out[cfg.test_split]
    else:
        keep, held = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
        train, test, labels = train.select(keep), train.select(held), labels[keep]
    if cfg.val_split and cfg.val_split in out:
        val = out[cfg.val_split]
    else:
        keep, held = stratified_split(labels, cfg.val_fraction, cfg.split_seed)
        train, val = train.select(keep), train.select(held)
    return datasets.DatasetDict(train=train, val=val, test=test)


_SOURCES: dict = {}


def register_source(name: str, loader) -> None:
    """``data.source: NAME`` gives ``loader(cfg)`` (a DatasetDict of train / val / test with undecoded
    images); the label budget is applied after it. For sources built on this module's own (Digits-M
    blends the digits), which therefore cannot be imported from here."""
    _SOURCES[name] = loader


def load_splits(cfg: DataConfig):
    """The three splits of the configured source, images left undecoded (``{'path', 'bytes'}``)."""
    import datasets

    if cfg.source == "digits":
        d = _digits(cfg)
    elif cfg.source in _SOURCES:  # sources built on this module (digits_m) register themselves
        d = _SOURCES[cfg.source](dataclasses.replace(cfg, label_fraction=1.0))  # the budget is applied below
    elif cfg.source == "hf":
        d = datasets.load_dataset(cfg.name, cfg.hf_config)
        d = _standardize(d, cfg)
    elif cfg.source == "imagefolder":
        root = Path(cfg.data_dir)
        if not root.is_dir():
            raise MissingFileError(f"data.data_dir '{root}' is not a directory. Point it at a class-per-folder "
                                    f"image tree (root/CLASS/*.png, optionally root/train/CLASS/...).")
        d = datasets.load_dataset("imagefolder", data_dir=str(root))
        d = _standardize(d, dataclasses.replace(cfg, image_column="image", label_column="label"))
    else:  # pragma: no cover
        raise ValueError(cfg.source)
    d = datasets.DatasetDict({k: v.cast_column("image", datasets.Image(decode=False)) for k, v in d.items()})
    return with_label_budget(d, cfg)


def with_label_budget(d, cfg: DataConfig):
    """``d`` with its train split cut to ``cfg.label_fraction`` of the labels (stratified, seeded)."""
    if cfg.label_fraction < 1.0:
        _, keep = stratified_split(np.asarray(d["train"]["label"]), cfg.label_fraction, cfg.split_seed)
        d["train"] = d["train"].select(keep)
    return d


def class_names(splits) -> list[str]:
    """The label names (a streamed source's splits hold only val and test)."""
    return list(splits["train" if "train" in splits else "val"].features["label"].names)

