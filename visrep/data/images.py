"""Decoding, transforms and the torch-side dataset.

Randomness is a function of (seed, epoch, sample index): the sampler's order per epoch and each
sample's augmentation are seeded from them. Data order and augmentation therefore survive a resume
exactly, are the same with any number of workers, and do not depend on how batches are sharded
across ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import os
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from visrep.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class CorruptImageError(UserError, RuntimeError):
    """An image could not be decoded; the message names the file (or row) and what to do."""


def _describe(value, split: str, index: int) -> str:
    path = value.get("path") if isinstance(value, dict) else None
    return f"'{path}'" if path else f"row {index} of split '{split}'"


def decode_image(value, mode: str = "RGB", split: str = "?", index: int = -1) -> Image.Image:
    """Decode an undecoded ``datasets.Image`` value (``{'path', 'bytes'}``) or a PIL image."""
    try:
        if isinstance(value, Image.Image):
            img = value
        elif isinstance(value, dict) and value.get("bytes") is not None:
            img = Image.open(io.BytesIO(value["bytes"]))
        elif isinstance(value, dict) and value.get("path"):
            img = Image.open(value["path"])
        else:
            raise ValueError(f"no image data in {type(value).__name__}")
        img.load()
        return img.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise CorruptImageError(
            f"cannot read image {_describe(value, split, index)}: {e}. Repair or remove the file, or set "
            f"data.on_corrupt=skip to skip unreadable images (they are counted in the log).") from None


_PNG, _JPEG = b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff"
_LUMA = (19595, 38470, 7471)  # PIL's RGB -> L weights (ITU-R 601-2) in 16-bit fixed point


@functools.lru_cache(maxsize=1)
def _tensor_decoder() -> Optional[Callable]:
    """``torchvision.io.decode_image`` to RGB, or None where torchvision has none: it deprecated its image
    codecs in 0.29 in favour of TorchCodec (whose builds are tied to one torch version); without them
    PIL decodes, to the same pixels."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:
        return None
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                            category=DeprecationWarning)
    return functools.partial(decode_image, mode=ImageReadMode.RGB)


def decode_tensor(value, mode: str = "RGB", split: str = "?", index: int = -1) -> torch.Tensor:
    """:func:`decode_image` into a ``uint8`` CHW tensor, the input of every transform here.

    JPEG and PNG bytes are decoded by ``torchvision.io`` straight into a tensor (libjpeg-turbo and
    libpng, as Pillow's): no PIL image and no copy from one, 1.4-1.5x faster for a JPEG, and the same
    pixels as PIL's ``convert("RGB")`` (``"L"``: PIL's integer luma formula applied to the RGB pixels,
    so again the same values). Other formats, modes and bit depths go through PIL."""
    data = None
    if isinstance(value, dict) and mode in ("RGB", "L"):
        data = value.get("bytes")
        if data is None and str(value.get("path") or "").lower().endswith((".jpg", ".jpeg", ".png")):
            with contextlib.suppress(OSError):  # else PIL names the problem
                with open(value["path"], "rb") as f:
                    data = f.read()
    decode = _tensor_decoder() if data is not None and (data[:8] == _PNG or data[:3] == _JPEG) else None
    if decode is not None:
        try:
            x = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        except RuntimeError:
            x = None  # PIL names the problem (or reads what libjpeg would not)
        if x is not None and x.dtype == torch.uint8:
            if mode == "L":
                r, g, b = x.to(torch.int32).unbind(0)
                x = ((r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2] + 0x8000) >> 16).to(torch.uint8)[None]
            return x
    img = np.asarray(decode_image(value, mode, split, index), dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(img.reshape(*img.shape[:2], -1).transpose(2, 0, 1)))


class ScaleNormalize:
    """``ToDtype(float32, scale=True)`` then ``Normalize(mean, std)`` in one pass over the image:
    ``x * (1 / (255 std)) - mean / std`` (the same values to float32 rounding, ~1e-6), writing one
    contiguous float tensor instead of two. ``deferred=True`` (:func:`defer_normalize`) returns a
    :class:`PendingImage` instead, which :func:`collate` normalises straight into the batch."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], deferred: bool = False):
        std_t = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.mean, self.std, self.deferred = tuple(mean), tuple(std), deferred
        self.bias = -torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t
        self.scales = {torch.uint8: 1.0 / (255.0 * std_t), torch.float32: 1.0 / std_t}

    def __call__(self, x: torch.Tensor):
        x = x.as_subclass(torch.Tensor)
        if self.deferred:
            return PendingImage(x, self)
        return self.into(x, torch.empty(x.shape, dtype=torch.float32))

    def into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write the normalised ``x`` into ``out`` (a float32 tensor of its shape)."""
        out.copy_(x)
        return out.mul_(self.scales[torch.uint8 if x.dtype == torch.uint8 else torch.float32]).add_(self.bias)

    def __repr__(self) -> str:
        return f"ScaleNormalize(mean={self.mean}, std={self.std}{', deferred' if self.deferred else ''})"


@dataclasses.dataclass
class PendingImage:
    """An augmented image whose normalisation :func:`collate` does, writing it into its place in the batch:
    the batch is the only float copy made (one pass over memory instead of two, and on a 224 px batch of
    64 the largest cost after decoding and resizing)."""

    image: torch.Tensor
    normalize: ScaleNormalize

    @property
    def shape(self) -> torch.Size:
        return self.image.shape


def defer_normalize(transform: Callable) -> Callable:
    """``transform`` with a final :class:`ScaleNormalize` (also in each view of a two-view transform)
    deferred to :func:`collate`; any other transform as it is."""
    from torchvision.transforms import v2 as T

    last = transform.transforms[-1] if isinstance(transform, T.Compose) and transform.transforms else None
    if isinstance(last, ScaleNormalize):
        return T.Compose([*transform.transforms[:-1], ScaleNormalize(last.mean, last.std, deferred=True)])
    if hasattr(transform, "view1") and hasattr(transform, "view2"):
        return type(transform)(defer_normalize(transform.view1), defer_normalize(transform.view2))
    return transform


def stack(items: Sequence) -> torch.Tensor:
    """Stack tensors (or normalise :class:`PendingImage` s) into one batch. In a loader worker the batch
    is allocated in shared memory, as ``default_collate`` does, so sending it copies nothing."""
    items = list(items)
    if not isinstance(items[0], PendingImage):
        return torch.utils.data.default_collate(items)
    shape = (len(items), *items[0].shape)
    proto = torch.empty(0, dtype=torch.float32)
    if torch.utils.data.get_worker_info() is not None and hasattr(proto, "_typed_storage"):  # as default_collate
        out = proto.new(proto._typed_storage()._new_shared(int(np.prod(shape)))).resize_(shape)
    else:
        out = torch.empty(shape, dtype=torch.float32)
    for o, p in zip(out, items):
        p.normalize.into(p.image, o)
    return out


def drop_unreadable(ds, mode: str, split: str):
    """Remove rows whose image does not decode; returns (dataset, list of the bad files/rows)."""
    bad_idx, bad_names = [], []
    for i, value in enumerate(ds["image"]):
        try:
            decode_image(value, mode, split, i)
        except CorruptImageError:
            bad_idx.append(i)
            bad_names.append(_describe(value, split, i))
    if bad_idx:
        keep = sorted(set(range(len(ds))) - set(bad_idx))
        ds = ds.select(keep)
        log.warning("skipped %d unreadable image(s) in split '%s': %s", len(bad_idx), split, ", ".join(bad_names))
    return ds, bad_names


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, int(index)]).generate_state(1, dtype=np.uint32)[0])


@contextlib.contextmanager
def seeded(seed: int):
    """Inside: the global CPU generator seeded with ``seed`` (what the transforms draw from); after: its
    previous state. Only the CPU generator is touched: ``torch.manual_seed`` also queues a CUDA seeding
    call on a CUDA build, formatting the Python stack each time while CUDA is not started (measured:
    0.29 ms a sample with it, most of the gap to open_clip's pipeline at 224 px)."""
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


class EpochIndex(int):
    """A sample index that carries the epoch it was drawn for. :class:`EpochSampler` yields these, so a
    dataset reads the epoch from the index (:func:`epoch_of`) instead of from its own ``set_epoch`` --
    which a *persistent* loader worker, holding its own copy of the dataset, would never see. Anywhere
    else it is the plain integer."""

    def __new__(cls, index: int, epoch: int):
        obj = super().__new__(cls, index)
        obj.epoch = epoch
        return obj

    def __reduce__(self):
        return EpochIndex, (int(self), self.epoch)


def epoch_of(index, default: int) -> int:
    """The epoch an index was drawn for (:class:`EpochIndex`), else ``default`` (the dataset's own)."""
    return getattr(index, "epoch", default)


class LabelledImages(torch.utils.data.Dataset):
    """A split with undecoded ``image`` and integer ``label`` columns, and what every dataset over one
    does alike: decode an image (once, kept in memory, when the split is small: ``cache_bytes`` for the
    decoded pixels, estimated), the epoch for per-epoch randomness, and ``transform`` (a uint8 CHW
    tensor, :func:`decode_tensor`, to a float tensor, or to a tuple of them such as two views) run under
    an RNG seeded by (seed, epoch, index) when ``seed`` is set."""

    def __init__(self, split_ds, transform: Callable, mode: str = "RGB", split: str = "train",
                 seed: Optional[int] = None, cache_bytes: int = 256 << 20):
        self.ds, self.transform, self.mode, self.split, self.seed, self.epoch = split_ds, transform, mode, split, seed, 0
        self.labels = np.asarray(split_ds["label"], dtype=np.int64)
        images = split_ds["image"]
        approx = sum(len(v["bytes"]) if isinstance(v, dict) and v.get("bytes") else 1 << 20 for v in images[:64])
        small = approx / max(1, min(64, len(images))) * len(images) * 4 < cache_bytes
        self._cache = [decode_tensor(v, mode, split, i) for i, v in enumerate(images)] if small else None
        self._images = None if small else images  # the encoded bytes are kept only when not decoded

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        if self._cache is not None:
            return self._cache[index]
        return decode_tensor(self._images[index], self.mode, self.split, index)

    def sample_seed(self, index) -> Optional[int]:
        """The seed of sample ``index``'s randomness this epoch (None without ``seed``)."""
        return None if self.seed is None else sample_seed(self.seed, epoch_of(index, self.epoch), index)

    def transformed(self, index):
        """Sample ``index``'s image through ``transform`` (seeded per sample when ``seed`` is set)."""
        s = self.sample_seed(index)
        if s is None:
            return self.transform(self.image(index))
        with seeded(s):
            return self.transform(self.image(index))


class ImageDataset(LabelledImages):
    """(image tensor, label) pairs from a split (:class:`LabelledImages`)."""

    def __getitem__(self, index: int):
        return self.transformed(index), int(self.labels[index])


@dataclasses.dataclass
class SplitLoaders:
    """The three splits as torch datasets and their (unprepared) loaders. ``train`` may be a stream
    (:class:`visrep.data.shards.ShardStream`, its loader a :class:`~visrep.data.shards.StreamLoader`);
    ``sampler`` is then None."""

    train: Any
    val: LabelledImages
    test: LabelledImages
    train_loader: Any
    val_loader: torch.utils.data.DataLoader
    test_loader: torch.utils.data.DataLoader
    sampler: Optional["EpochSampler"]

    @property
    def epoch_setters(self) -> tuple:
        """What makes order and augmentation a function of the epoch (``set_epoch``): sampler and dataset."""
        return tuple(o for o in (self.sampler, self.train) if o is not None)

    @classmethod
    def build(cls, train, train_loader, sampler, val, test, eval_batch_size: int, loader_kw: dict, **extra):
        """With val / test loaders that keep the splits' order, ``eval_batch_size`` a batch."""
        def in_order(ds):
            return torch.utils.data.DataLoader(ds, batch_size=eval_batch_size, shuffle=False, **loader_kw)

        return cls(train=train, val=val, test=test, train_loader=train_loader, val_loader=in_order(val),
                   test_loader=in_order(test), sampler=sampler, **extra)


class EpochSampler(torch.utils.data.Sampler[int]):
    """A permutation of ``range(n)`` that is a function of (seed, epoch): shuffled, reproducible,
    and the same on every rank (Accelerate shards the resulting batches). The indices are
    :class:`EpochIndex` values, so the datasets' per-epoch randomness also works in persistent workers."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        if not self.shuffle:
            return (EpochIndex(i, epoch) for i in range(self.n))
        g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 0xFFFFFFFF))
        return (EpochIndex(i, epoch) for i in torch.randperm(self.n, generator=g).tolist())


def build_transforms(data_config: dict, image_size: int, train: bool, hflip: float = 0.5,
                     augment: str = "light", randaugment: tuple[int, int] = (0, 9), random_erasing: float = 0.0):
    """Train/eval transforms from a backbone's data config (mean, std, interpolation, crop_pct).

    Small inputs (<= 64 px): train = pad by size/8 and random crop (+flip); eval = resize.
    Larger inputs: train = random-resized crop (0.08-1) (+flip); eval = resize to size/crop_pct and
    centre crop. ``strong`` adds colour jitter. At train time ``randaugment`` = (ops, magnitude) adds
    RandAugment on the uint8 image and ``random_erasing`` (a probability) erases a box of the normalised
    image with per-pixel normal noise (see ``DataConfig``). All draws come from the CPU generator, which
    the datasets seed per sample."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2 as T

    mean = tuple(data_config.get("mean", IMAGENET_MEAN))
    std = tuple(data_config.get("std", IMAGENET_STD))
    interp = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
              "nearest": InterpolationMode.NEAREST}.get(str(data_config.get("interpolation", "bilinear")),
                                                        InterpolationMode.BILINEAR)
    crop_pct = float(data_config.get("crop_pct", 0.875) or 0.875)
    small = image_size <= 64
    ops: list = [T.ToImage()]
    if train and augment != "none":
        if small:
            ops += [T.Resize((image_size, image_size), interpolation=interp, antialias=True),
                    T.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="edge")]
        else:
            ops += [T.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=interp, antialias=True)]
        if hflip > 0:
            ops.append(T.RandomHorizontalFlip(hflip))
        if augment == "strong":
            ops.append(T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8))
    elif small:
        ops += [T.Resize((image_size, image_size), interpolation=interp, antialias=True)]
    else:
        ops += [T.Resize(int(round(image_size / crop_pct)), interpolation=interp, antialias=True),
                T.CenterCrop(image_size)]
    if train and randaugment[0] > 0:
        ops.append(T.RandAugment(num_ops=randaugment[0], magnitude=randaugment[1], interpolation=interp))
    if len(mean) == 3 and data_config.get("input_size", (3,))[0] == 1:
        mean, std = mean[:1], std[:1]
    ops.append(ScaleNormalize(mean, std))
    if train and random_erasing > 0:  # after normalising: the noise is N(0, 1) in the normalised space
        ops.append(T.RandomErasing(p=random_erasing, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value="random"))
    return T.Compose(ops)


def auto_workers() -> int:
    """Loader workers per process when ``run.num_workers`` is -1: on a GPU host this process's share of
    the CPUs it may use (split among the node's local processes), less one for the process itself, at
    most 8; on a CPU-only host 0 (workers would compete with the training for the same cores)."""
    if not torch.cuda.is_available():
        return 0
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(8, cpus // local - 1))


def loader_options(num_workers: int, collate_fn: Callable) -> dict:
    """``DataLoader`` keyword arguments for the run's host: ``num_workers`` (-1: :func:`auto_workers`),
    pinned memory where a GPU will take the batches (with the accelerator's non-blocking copies), and
    persistent workers (no start-up per epoch): the epoch reaches them with each index
    (:class:`EpochIndex`)."""
    nw = auto_workers() if num_workers < 0 else num_workers
    return dict(num_workers=nw, collate_fn=collate_fn, persistent_workers=nw > 0,
                pin_memory=torch.cuda.is_available())


def collate(batch: Sequence):
    """``(images, labels)`` batches; images may be tuples of views (:func:`stack`)."""
    xs, ys = zip(*batch)
    x = tuple(stack(v) for v in zip(*xs)) if isinstance(xs[0], (tuple, list)) else stack(xs)
    return x, torch.as_tensor(ys, dtype=torch.long)
