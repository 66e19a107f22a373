"""Image-text pairs: a Hugging Face dataset, a local folder with a captions file, or the embedded digits.

Every source ends as three splits (``train``, ``val``, ``test``) of a ``datasets.Dataset`` with the
columns ``image`` (undecoded, so a bad file is reported by name), ``captions`` (a list of strings per
image) and ``label`` (an int class id, or -1 when the source has no labels), plus optional class names
for zero-shot evaluation.

* ``digits`` -- scikit-learn's bundled digits (the same fixed splits as ``visrep.data``) with captions
  made from templates and class names: "a photo of the number seven", "a handwritten 7", ... The
  training captions use :data:`DIGIT_TRAIN_TEMPLATES`; the templates of :data:`DIGIT_EVAL_TEMPLATES` are
  never seen in training and serve the val/test captions and the zero-shot prompts.
* ``hf`` -- ``datasets.load_dataset(name, hf_config)`` with an image column and a caption column (one
  string or a list of strings per image) and optionally a label column.
* ``folder`` -- ``data_dir`` holding the images and a captions file (JSONL or CSV) with one row per
  image: ``file`` (path relative to data_dir), ``caption`` (or ``captions``: a list in JSONL, ``|``-
  separated in CSV), optional ``label`` and ``split`` (train/val/test).

Training samples draw one of their captions at random per (seed, epoch, index), like their
augmentation; evaluation uses the first caption (digits: a held-out template chosen by index).
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch

from visrep.data.images import (EpochSampler, LabelledImages, SplitLoaders, build_transforms, drop_unreadable,
                                loader_options, stack)
from visrep.data import shards
from visrep.data.sources import DataConfig, load_splits
from visrep.data.imagenet import TEMPLATE_SETS, expand_templates, read_classnames
from visrep.errors import DataError, MissingFileError, MissingKeyError
from visrep.checks import check

DIGIT_NAMES = [["zero", "0"], ["one", "1"], ["two", "2"], ["three", "3"], ["four", "4"], ["five", "5"],
               ["six", "6"], ["seven", "7"], ["eight", "8"], ["nine", "9"]]
DIGIT_TRAIN_TEMPLATES = [
    "a photo of the number {}.", "a handwritten {}.", "the digit {}.", "a drawing of a {}.", "{}",
    "a black and white picture of a {}.", "number {}", "a small {}.", "a pixelated {}.", "a written {}.",
]
DIGIT_EVAL_TEMPLATES = [
    "an image of the number {}.", "a scan of a handwritten {}.", "a blurry photo of the digit {}.", "this is a {}.",
]
GENERIC_TEMPLATES = ["a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}."]


@dataclasses.dataclass
class PairsConfig(DataConfig):
    """Image-text pairs: :class:`DataConfig` (where the images come from, splits, size, augmentation)
    plus the captions and prompt templates. ``label_fraction`` does not apply (captions are the labels)."""

    source: Literal["digits", "hf", "folder", "shards"] = "digits"
    """digits: embedded, no download; hf: datasets.load_dataset(name, hf_config); folder: data_dir + captions
    file; shards: webdataset tar shards with .txt (or .json captions) per image, streamed (data.shards)."""
    captions_file: Optional[str] = None
    """folder: the captions file, relative to data_dir (default: the first of captions.jsonl,
    captions.csv, metadata.jsonl, metadata.csv found there)."""
    caption_column: str = "caption"
    label_column: Optional[str] = None
    """hf / folder: a class column enables zero-shot evaluation (digits: always)."""
    test_split: Optional[str] = "test"
    image_size: int = 16
    hflip: float = 0.0
    zero_shot_templates: list[str] = dataclasses.field(default_factory=list)
    """Prompt templates with one {} for the class name, or the name of a bundled set (``openai_imagenet``: CLIP's
    80 ImageNet templates, ``simple_imagenet``: its 7); empty: the held-out digit templates (digits) or a generic
    photo set."""
    classnames: Optional[str] = None
    """Zero-shot class names in place of the label names: ``imagenet`` (the bundled ImageNet-1k names, matched to
    synset-id labels such as an ImageNet folder's, or to all 1000 classes in index order), or a text file with
    one class per line in label-id order (synonyms separated by ``|``)."""
    train_templates: list[str] = dataclasses.field(default_factory=list)
    """digits: caption templates for training; empty: DIGIT_TRAIN_TEMPLATES."""
    eval_templates: list[str] = dataclasses.field(default_factory=list)
    """digits: held-out caption templates for val/test captions; empty: DIGIT_EVAL_TEMPLATES."""

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        check(self.val_fraction + self.test_fraction < 1, f"{prefix}val_fraction", (self.val_fraction, self.test_fraction),
              "val_fraction and test_fraction in (0, 1), summing to less than 1")
        check(self.label_fraction == 1.0, f"{prefix}label_fraction", self.label_fraction,
              "1.0 (image-text pairs have no label budget)")
        check(self.source != "folder" or bool(self.data_dir), f"{prefix}data_dir", self.data_dir,
              "a directory with images and a captions file when data.source is 'folder'")
        for key in ("zero_shot_templates", "train_templates", "eval_templates"):
            for t in getattr(self, key):
                check(t.count("{}") == 1 or (key == "zero_shot_templates" and t in TEMPLATE_SETS), f"{prefix}{key}", t, "templates with exactly one {} for the class name (zero_shot_templates: or a bundled set, "
                      f"{' or '.join(TEMPLATE_SETS)})")
        overlap = set(self.train_templates or DIGIT_TRAIN_TEMPLATES) & set(self.eval_templates or DIGIT_EVAL_TEMPLATES)
        check(self.source != "digits" or not overlap, f"{prefix}eval_templates", sorted(overlap),
              "templates disjoint from the training templates (they are held out for evaluation)")


@dataclasses.dataclass
class PairSplits:
    splits: dict
    """train / val / test -> datasets.Dataset(image, captions, label)."""
    classnames: Optional[list[list[str]]]
    """Per class, one or more names (synonyms); None: no zero-shot evaluation."""
    templates: list[str]
    """Zero-shot prompt templates."""
    train_templates: Optional[list[str]] = None
    eval_templates: Optional[list[str]] = None
    """digits: captions are generated from these and the class names."""


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------
def _digits(cfg: PairsConfig) -> PairSplits:
    d = load_splits(DataConfig(source="digits", image_size=cfg.image_size, channels=cfg.channels,
                               val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                               split_seed=cfg.split_seed))
    splits = dict(d.items())  # image, label: the captions come from the templates
    return PairSplits(splits, DIGIT_NAMES, list(cfg.zero_shot_templates or cfg.eval_templates or DIGIT_EVAL_TEMPLATES),
                      list(cfg.train_templates or DIGIT_TRAIN_TEMPLATES),
                      list(cfg.eval_templates or DIGIT_EVAL_TEMPLATES))


def _as_captions(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return [str(c) for c in v]


def _standardize(ds, cfg: PairsConfig, names_out: list):
    import datasets

    cols = ds.column_names
    for col in (cfg.image_column, cfg.caption_column) + ((cfg.label_column,) if cfg.label_column else ()):
        if col not in cols:
            raise MissingKeyError(f"dataset column '{col}' not found; available columns: {cols}. Set data.image_column / "
                           f"data.caption_column / data.label_column.")
    keep = [cfg.image_column, cfg.caption_column] + ([cfg.label_column] if cfg.label_column else [])
    ds = ds.select_columns(keep)
    feat = ds.features.get(cfg.label_column) if cfg.label_column else None
    if isinstance(feat, datasets.ClassLabel) and not names_out:
        names_out.extend(feat.names)
    ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))
    if cfg.image_column != "image":
        ds = ds.rename_column(cfg.image_column, "image")
    lab = cfg.label_column

    def fix(r):
        out = {"captions": _as_captions(r[cfg.caption_column])}
        out["label"] = r[lab] if lab else -1
        return out

    return ds.map(fix, remove_columns=[c for c in (cfg.caption_column, lab) if c and c not in ("captions", "label")])


def _held_out(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(n)
    k = max(1, int(round(n * fraction)))
    return np.sort(idx[k:]), np.sort(idx[:k])


def _derive_splits(d: dict, cfg: PairsConfig) -> dict:
    if cfg.train_split not in d:
        raise MissingKeyError(f"split '{cfg.train_split}' not found; available splits: {sorted(d)}. Set data.train_split.")
    train = d[cfg.train_split]
    if cfg.test_split and cfg.test_split in d:
        test = d[cfg.test_split]
    else:
        keep, held = _held_out(len(train), cfg.test_fraction, cfg.split_seed)
        train, test = train.select(keep), train.select(held)
    if cfg.val_split and cfg.val_split in d:
        val = d[cfg.val_split]
    else:
        keep, held = _held_out(len(train), cfg.val_fraction / (1 - cfg.test_fraction), cfg.split_seed + 1)
        train, val = train.select(keep), train.select(held)
    return {"train": train, "val": val, "test": test}


def _string_labels_to_ids(splits: dict, names: list) -> dict:
    """Class ids for the label column: a ClassLabel's ids as they are (``names`` already filled),
    otherwise the sorted distinct values become classes 0..C-1."""
    if names:
        return splits
    ordered = sorted({str(v) for ds in splits.values() for v in ds["label"]})
    names.extend(ordered)
    lookup = {n: i for i, n in enumerate(ordered)}
    return {k: v.map(lambda r: {"label": lookup[str(r["label"])]}) for k, v in splits.items()}


def read_captions_file(path: Path) -> list[dict]:
    """Rows of a captions file: JSONL (one object per line) or CSV with a header."""
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i + 1} is not valid JSON: {e}") from None
        return rows
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            if isinstance(r.get("captions"), str):
                r["captions"] = [c.strip() for c in r["captions"].split("|") if c.strip()]
        return rows
    raise DataError(f"captions file '{path}' must be .jsonl or .csv")


def _folder(cfg: PairsConfig) -> PairSplits:
    import datasets

    root = Path(cfg.data_dir)
    if not root.is_dir():
        raise MissingFileError(f"data.data_dir '{root}' is not a directory.")
    if cfg.captions_file:
        cap = root / cfg.captions_file
    else:
        found = [root / n for n in ("captions.jsonl", "captions.csv", "metadata.jsonl", "metadata.csv")
                 if (root / n).is_file()]
        if not found:
            raise MissingFileError(f"no captions file in '{root}': expected captions.jsonl or captions.csv (rows: "
                                    f"file, caption[, label, split]) or set data.captions_file.")
        cap = found[0]
    if not cap.is_file():
        raise MissingFileError(f"captions file '{cap}' does not exist.")
    rows = read_captions_file(cap)
    if not rows:
        raise DataError(f"captions file '{cap}' has no rows.")
    by_split: dict[str, dict[str, list]] = {}
    missing = []
    for i, r in enumerate(rows):
        file = r.get("file") or r.get("file_name") or r.get("image")
        caps = _as_captions(r.get("captions") if r.get("captions") not in (None, "") else r.get("caption"))
        if not file or not caps:
            raise DataError(f"row {i + 1} of '{cap}' needs 'file' and 'caption' (or 'captions'); got keys {sorted(r)}")
        p = root / file
        if not p.is_file():
            missing.append(str(p))
            continue
        label = r.get(cfg.label_column or "label")
        col = by_split.setdefault(str(r.get("split") or cfg.train_split), {"image": [], "captions": [], "label": []})
        col["image"].append(str(p))
        col["captions"].append(caps)
        col["label"].append(label if label not in (None, "") and cfg.label_column else -1)
    if missing:
        raise MissingFileError(f"{len(missing)} image(s) listed in '{cap}' do not exist, e.g. {missing[:3]}")
    d = {}
    for split, cols in by_split.items():
        ds = datasets.Dataset.from_dict({"image": cols["image"], "captions": cols["captions"],
                                         "label": [str(v) for v in cols["label"]]})
        d[split] = ds.cast_column("image", datasets.Image(decode=False))
    splits = _derive_splits(d, cfg)
    names: list = []
    if cfg.label_column:
        splits = _string_labels_to_ids(splits, names)
    else:
        splits = {k: v.map(lambda r: {"label": -1}) for k, v in splits.items()}
    return PairSplits(splits, [[n] for n in names] or None, list(cfg.zero_shot_templates or GENERIC_TEMPLATES))


def _hf(cfg: PairsConfig) -> PairSplits:
    import datasets

    d = datasets.load_dataset(cfg.name, cfg.hf_config)
    names: list = []
    d = {k: _standardize(v, cfg, names) for k, v in d.items()}
    splits = _derive_splits(d, cfg)
    if cfg.label_column:
        splits = _string_labels_to_ids(splits, names)
    return PairSplits(splits, [[n] for n in names] or None, list(cfg.zero_shot_templates or GENERIC_TEMPLATES))


def _shards(cfg: PairsConfig) -> PairSplits:
    """val and test of the shards in memory (the training split is streamed: :func:`build_pair_data`).
    Class names (zero-shot) and prompt templates come from the index (``visrep data pack`` records
    them), else the configured templates."""
    ev, meta = shards.eval_splits(cfg, pairs=True)
    names = meta.get("classnames") or ([[c] for c in meta["classes"]] if meta.get("classes") else None)
    return PairSplits(ev, names, list(cfg.zero_shot_templates or meta.get("templates") or GENERIC_TEMPLATES),
                      meta.get("train_templates"))


def load_pair_splits(cfg: PairsConfig) -> PairSplits:
    """The three splits of the configured source, images undecoded (``shards``: val and test only)."""
    if cfg.source == "digits":
        out = _digits(cfg)
    elif cfg.streamed:
        out = _shards(cfg)
    elif cfg.source == "hf":
        out = _hf(cfg)
    else:
        out = _folder(cfg)
    if cfg.on_corrupt == "skip":
        mode = "RGB" if cfg.channels == 3 else "L"
        for name in list(out.splits):
            out.splits[name], _ = drop_unreadable(out.splits[name], mode, name)
    if cfg.classnames:
        out.classnames = read_classnames(cfg.classnames, [n[0] for n in out.classnames] if out.classnames else None)
    out.templates = expand_templates(out.templates)
    return out


# ----------------------------------------------------------------------------------------------
# Torch side
# ----------------------------------------------------------------------------------------------
class PairDataset(LabelledImages):
    """``(image, tokens, label, key)`` per sample. ``train=True``: one caption drawn at random per
    (seed, epoch, index) and augmentation under the same seed; else the first caption (digits: held-out
    template ``index mod T`` and class-name form ``index div T``). ``key`` marks interchangeable pairs
    for retrieval: the class for templated digits captions, the caption text otherwise."""

    def __init__(self, split_ds, transform: Callable, tokenizer: Callable, mode: str = "RGB", split: str = "train",
                 train: bool = False, seed: int = 0, templates: Optional[Sequence[str]] = None,
                 classnames: Optional[Sequence[Sequence[str]]] = None):
        super().__init__(split_ds, transform, mode, split, seed if train else None)
        self.tokenizer, self.train, self.templates, self.classnames = tokenizer, train, templates, classnames
        self.captions = None if templates else list(split_ds["captions"])
        if templates:
            self.keys = self.labels.copy()
        else:
            ids: dict[str, int] = {}
            self.keys = np.asarray([ids.setdefault(c[0], len(ids)) for c in self.captions], dtype=np.int64)

    def caption(self, index: int, rng: Optional[np.random.Generator] = None) -> str:
        if self.templates:
            names = self.classnames[int(self.labels[index])]
            if rng is not None:
                return self.templates[rng.integers(len(self.templates))].format(names[rng.integers(len(names))])
            t = len(self.templates)
            return self.templates[index % t].format(names[(index // t) % len(names)])
        caps = self.captions[index]
        return caps[rng.integers(len(caps))] if rng is not None and len(caps) > 1 else caps[0]

    def __getitem__(self, index: int):
        s = self.sample_seed(index)
        text = self.caption(index, None if s is None else np.random.default_rng(s))
        return self.transformed(index), self.tokenizer([text])[0], int(self.labels[index]), int(self.keys[index])


def collate_pairs(batch):
    x, tok, y, k = zip(*batch)
    return stack(x), stack(tok), torch.as_tensor(y, dtype=torch.long), torch.as_tensor(k, dtype=torch.long)


@dataclasses.dataclass
class PairData(SplitLoaders):
    """The splits and loaders of image-caption pairs (:class:`SplitLoaders`), with the class names and
    prompt templates of zero-shot classification."""

    classnames: Optional[list] = None
    templates: list[str] = dataclasses.field(default_factory=list)
    train_templates: Optional[list[str]] = None


def build_pair_data(cfg: PairsConfig, data_config: dict, tokenizer: Callable, seed: int, batch_size: int,
                    eval_batch_size: int, num_workers: int = 0, splits: Optional[PairSplits] = None) -> PairData:
    """Loaders (unprepared) of the three splits. ``batch_size`` is what one loader batch holds (the
    recipe passes per-device batch x accumulation chunks)."""
    ps = splits or load_pair_splits(cfg)
    mode = "RGB" if cfg.channels == 3 else "L"
    dc = dict(data_config, input_size=(cfg.channels, cfg.image_size, cfg.image_size))
    train_tf = build_transforms(dc, cfg.image_size, train=True, **cfg.train_transform_options())
    eval_tf = build_transforms(dc, cfg.image_size, train=False)
    kw = dict(tokenizer=tokenizer, mode=mode, classnames=ps.classnames)
    lk = loader_options(num_workers, collate_pairs)
    if cfg.streamed and splits is None:  # split by rank and worker
        train_loader = shards.train_stream(cfg, shards.PairSamples(train_tf, tokenizer, mode, seed), collate_pairs,
                                           batch_size, seed, lk["num_workers"], lk["pin_memory"], pairs=True)
        train, sampler = train_loader.dataset, None
    else:
        train = PairDataset(ps.splits["train"], train_tf, split="train", train=True, seed=seed,
                            templates=ps.train_templates, **kw)
        if len(train) < batch_size:
            raise DataError(f"the training split has {len(train)} pairs, fewer than one batch of {batch_size}; "
                            f"lower run.batch_size (or run.grad_accum).")
        sampler = EpochSampler(len(train), seed)
        train_loader = torch.utils.data.DataLoader(train, batch_size=batch_size, sampler=sampler, drop_last=True,
                                                   **lk)
    val = PairDataset(ps.splits["val"], eval_tf, split="val", templates=ps.eval_templates, **kw)
    test = PairDataset(ps.splits["test"], eval_tf, split="test", templates=ps.eval_templates, **kw)
    return PairData.build(train, train_loader, sampler, val, test, eval_batch_size, lk, classnames=ps.classnames,
                          templates=ps.templates, train_templates=ps.train_templates)


__all__ = ["PairsConfig", "PairSplits", "PairDataset", "PairData", "build_pair_data", "load_pair_splits",
           "collate_pairs", "read_captions_file", "DIGIT_NAMES", "DIGIT_TRAIN_TEMPLATES", "DIGIT_EVAL_TEMPLATES",
           "GENERIC_TEMPLATES"]
