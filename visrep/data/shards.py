"""Sharded streaming: webdataset-format tar shards, split by rank and loader worker, each sample once
per epoch, every rank the same number of batches, and a stream position that resumes exactly.

The format is webdataset's (what img2dataset writes and open_clip / timm read): a tar file of samples,
each a group of consecutive members sharing a key (``000123.jpg``, ``000123.cls``, ``000123.txt``).
The ``webdataset`` package opens the shards (local paths, brace patterns, ``pipe:`` commands for object
stores, http) and writes them; what is here is the part no peer has, the deterministic plan of an epoch:

* **The index** (:func:`load_index`): the shard list with each shard's sample count, in the JSON layout
  of webdataset's ``wids`` (``{"wids_version": 1, "shardlist": [{"url", "nsamples"}]}``) plus a
  ``visrep`` entry (class names, kind). ``visrep data pack`` and ``visrep data index`` write it; a brace
  pattern of local shards is counted on the fly instead.
* **The plan of an epoch** (:func:`plan_worker`): the shards in an order drawn from (seed, epoch), read
  as one sequence; rank ``r`` takes the contiguous ``r``-th block of ``B * floor(N / (W * B))`` samples
  (what ``drop_last`` drops, fewer than ``W * B`` samples, rotates with the shard order); the rank's
  batches are split into contiguous blocks per loader worker. A rank reads at most two partial shards,
  a worker likewise, so the bytes read per epoch are the data's once.
* **Order within a worker**: its samples in windows of ``shuffle_buffer``, each window permuted by a
  generator seeded from (seed, epoch, rank, worker, window). Each sample's augmentation is seeded from
  (seed, epoch, its place in the epoch's shard sequence), as for the in-memory sources.
* **The position**: the loader's batches interleave the workers round-robin, so after ``k`` batches of
  an epoch each worker's share of them is known; a resumed loader starts each worker right there,
  skipping whole shards without opening them and reading (not decoding) only the window it resumes in.
* **Resampled mode** (for corpora too large for epochs): each worker draws shards with replacement
  from (seed, epoch, rank, worker); an "epoch" is ``samples_per_epoch`` samples. Positions resume the same way.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from accelerate.data_loader import DataLoaderStateMixin
from accelerate.state import GradientState

from visrep.data.images import CorruptImageError, decode_tensor, defer_normalize, sample_seed, seeded
from visrep.checks import existing
from visrep.errors import DataError, MissingFileError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
INDEX_NAME = "{split}.json"


# ----------------------------------------------------------------------------------------------
# Shards and their index
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Shard:
    url: str
    nsamples: int


@dataclasses.dataclass
class ShardIndex:
    shards: list[Shard]
    meta: dict
    """The ``visrep`` entry of the index: ``classes`` (names, position = label), ``kind``
    (classification / pairs)."""
    source: str
    """What it was read from (for messages)."""
    columns: Optional[dict] = None
    """Set for the parquet files of a Hugging Face dataset (:func:`hf_index`): the columns holding the
    ``image``, ``label`` and ``caption``; None for tar shards."""

    def read(self, url: str, start: int = 0, stop: Optional[int] = None) -> Iterator[dict]:
        """Samples ``start`` .. ``stop - 1`` of one of its shards, as webdataset-style dicts."""
        if self.columns is not None:
            return iter_parquet(url, self.columns, start, stop)
        return iter_shard(url, start, stop)

    @property
    def total(self) -> int:
        return sum(s.nsamples for s in self.shards)

    @property
    def counts(self) -> list[int]:
        return [s.nsamples for s in self.shards]

    @property
    def classes(self) -> Optional[list[str]]:
        c = self.meta.get("classes")
        return list(c) if c else None


def is_local(url: str) -> bool:
    """A plain path (or ``file:``), as opposed to ``pipe:``, ``http(s):``, ``s3:``, ..."""
    return url.startswith("file:") or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", url) or bool(
        re.match(r"^[A-Za-z]:[\\/]", url))


def expand_urls(spec: str) -> list[str]:
    """Brace patterns (``train-{000000..000099}.tar``), several joined by ``::`` (webdataset's syntax)."""
    from webdataset.shardlists import expand_urls as expand_braces

    return list(expand_braces(spec))


def load_index(spec: str, what: str = "data.shards") -> ShardIndex:
    """The shards named by ``spec``: an index JSON, or a brace pattern of local ``.tar`` files (each is
    read once to count its samples; a ``pipe:`` or remote pattern needs an index: ``visrep data index``)."""
    if spec.endswith(".json"):
        path = existing(spec, MissingFileError, f"{what}: the shard index '{spec}' does not exist. Write one with "
                        f"`visrep data pack SRC OUT` or `visrep data index 'SHARDS' OUT.json`.")
        try:
            doc = json.loads(path.read_text())
            entries = doc["shardlist"]
            shards = [Shard(_resolve(str(e["url"]), path.parent), int(e["nsamples"])) for e in entries]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{what}: '{spec}' is not a shard index ({type(e).__name__}: {e}); expected JSON with "
                            f"'shardlist': [{{'url': ..., 'nsamples': ...}}, ...]. Rewrite it with "
                            f"`visrep data index`.") from None
        if not shards:
            raise DataError(f"{what}: the shard index '{spec}' lists no shards.")
        return ShardIndex(shards, dict(doc.get("visrep") or {}), spec)
    urls = expand_urls(spec)
    remote = [u for u in urls if not is_local(u)]
    if remote:
        raise DataError(f"{what}: '{remote[0]}' is not a local file, so its samples cannot be counted up front. "
                        f"Write an index once with `visrep data index '{spec}' OUT.json` and pass OUT.json.")
    missing = [u for u in urls if not Path(_strip_file(u)).is_file()]
    if missing:
        raise MissingFileError(f"{what}: shard '{missing[0]}' does not exist ({len(missing)} of {len(urls)} "
                               f"shards of '{spec}' are missing).")
    return ShardIndex([Shard(u, count_samples(u)) for u in urls], {}, spec)


def write_index(path: Path, shards: Sequence[Shard], meta: Optional[dict] = None) -> None:
    """Write a shard index (wids layout; urls under ``path``'s folder are stored relative to it)."""
    base = path.parent.resolve()
    rows = []
    for s in shards:
        url = s.url
        if is_local(url):
            p = Path(_strip_file(url)).resolve()
            url = str(p.relative_to(base)) if p.is_relative_to(base) else str(p)
        rows.append({"url": url, "nsamples": int(s.nsamples)})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"wids_version": 1, "shardlist": rows, "visrep": dict(meta or {})}, indent=1))
    os.replace(tmp, path)


def _strip_file(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def _resolve(url: str, base: Path) -> str:
    if is_local(url) and not os.path.isabs(_strip_file(url)):
        return str(base / _strip_file(url))
    return url


def _key_ext(name: str) -> tuple[Optional[str], Optional[str]]:
    from webdataset.tariterators import base_plus_ext

    return base_plus_ext(name)


def _open_tar(url: str) -> tarfile.TarFile:
    """A local shard opened for seeking (members skipped without being read), anything else as a stream
    through webdataset's ``gopen`` (``pipe:``, http, ...)."""
    try:
        if is_local(url):
            return tarfile.open(_strip_file(url), mode="r:")
        from webdataset import gopen

        return tarfile.open(fileobj=gopen(url, "rb"), mode="r|*")
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"shard '{url}' cannot be opened: {e}. Check the path or command (and that the shard "
                        f"is a tar file).") from None


def _sample_members(tf: tarfile.TarFile) -> Iterator[tuple[str, str, tarfile.TarInfo]]:
    """(key, extension, member) of the files of a shard's samples, in order (webdataset's naming:
    ``KEY.EXT``; metadata entries ``__*__`` and non-files skipped)."""
    for member in tf:
        if member.isreg():
            k, ext = _key_ext(member.name)
            if k is not None and not k.startswith("__"):
                yield k, ext, member


def iter_shard(url: str, start: int = 0, stop: Optional[int] = None) -> Iterator[dict]:
    """Samples ``start`` .. ``stop - 1`` of a shard, as dicts of ``extension -> bytes`` plus ``__key__``
    and ``__url__``. Members of the samples before ``start`` are skipped without being read (seeked
    over in a local file; read through and dropped in a stream)."""
    tf = _open_tar(url)
    index, key, sample = -1, None, None
    try:
        with tf:
            for k, ext, member in _sample_members(tf):
                if k != key:
                    if sample is not None:
                        yield sample
                    index, key = index + 1, k
                    if stop is not None and index >= stop:
                        return
                    sample = {"__key__": k, "__url__": url} if index >= start else None
                if sample is not None:
                    sample[ext.lower()] = tf.extractfile(member).read()
            if sample is not None:
                yield sample
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(f"shard '{url}' is damaged after sample {index} ('{key}'): {e}. Rewrite the shard "
                        f"(visrep data pack) or drop it from the index.") from None


# ----------------------------------------------------------------------------------------------
# A Hugging Face dataset streamed: its parquet data files are the shards
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _hf_data_files(name: str, config: Optional[str]) -> dict:
    """split -> data file URLs of a Hugging Face dataset, resolved once per process (train, val and test
    share it)."""
    import datasets

    builder = datasets.load_dataset_builder(name, config)
    return {k: [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}


def hf_index(cfg, split: str, pairs: bool = False) -> ShardIndex:
    """Split ``split`` of the Hugging Face dataset ``cfg.name`` (``cfg.hf_config``) as shards: its parquet
    data files (on the Hub or local), each file's row count read from its footer, class names from its
    ``ClassLabel`` feature. Nothing else is downloaded: the stream reads the row groups it needs."""
    import datasets
    import fsspec
    import pyarrow.parquet as pq

    where = f"data.name '{cfg.name}'" + (f" (data.hf_config '{cfg.hf_config}')" if cfg.hf_config else "")
    try:
        files = _hf_data_files(cfg.name, cfg.hf_config)
    except (ConnectionError, FileNotFoundError, ValueError) as e:
        raise DataError(f"{where}: the dataset cannot be resolved ({type(e).__name__}: {e}). Check the name, "
                        f"or the network (HF_HUB_OFFLINE).") from None
    if not files.get(split):
        raise DataError(f"{where} has no split '{split}' (it has: {sorted(files)}); set data.train_split / "
                        f"val_split / test_split.")
    urls = [str(f) for f in files[split]]
    other = [u for u in urls if not u.endswith(".parquet")]
    if other:
        raise DataError(f"{where}: streaming reads a dataset's parquet files, and '{other[0]}' is not one. Pack "
                        f"the dataset once (`visrep data pack hf:{cfg.name} OUT --streaming`) and train on the "
                        f"shards (data.source shards).")
    counts, schema = [], None
    for u in urls:
        with fsspec.open(u, "rb") as fh:
            pf = pq.ParquetFile(fh)
            counts.append(pf.metadata.num_rows)
            schema = schema or pf.schema_arrow
    features = datasets.Features.from_arrow_schema(schema)
    columns = {"image": cfg.image_column, "label": cfg.label_column,
               "caption": getattr(cfg, "caption_column", None) if pairs else None}
    for role, col in columns.items():
        if col is not None and col not in features:
            raise DataError(f"{where}: split '{split}' has no column '{col}' (its columns: {list(features)}); "
                            f"set data.{role}_column.")
    label = features.get(columns["label"]) if columns["label"] else None
    meta = {"classes": list(label.names)} if isinstance(label, datasets.ClassLabel) else {}
    return ShardIndex([Shard(u, n) for u, n in zip(urls, counts)], meta, f"hf:{cfg.name}/{split}", columns=columns)


def iter_parquet(url: str, columns: dict, start: int = 0, stop: Optional[int] = None) -> Iterator[dict]:
    """Rows ``start`` .. ``stop - 1`` of a parquet file as webdataset-style samples (the image's bytes
    under its extension, ``cls``, ``json`` captions): only the row groups holding them are read."""
    import fsspec
    import pyarrow
    import pyarrow.parquet as pq

    names = [c for c in dict.fromkeys(columns.values()) if c]
    try:
        with fsspec.open(url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            first = 0
            for group in range(pf.num_row_groups):
                n = pf.metadata.row_group(group).num_rows
                if first + n <= start:  # a whole row group before the start: not read
                    first += n
                    continue
                if stop is not None and first >= stop:
                    return
                for i, row in enumerate(pf.read_row_group(group, columns=names).to_pylist()):
                    if first + i >= start and (stop is None or first + i < stop):
                        yield _parquet_sample(row, columns, url, first + i)
                first += n
    except (OSError, pyarrow.ArrowException) as e:
        raise DataError(f"the parquet file '{url}' cannot be read: {e}.") from None


def _parquet_sample(row: dict, columns: dict, url: str, index: int) -> dict:
    sample = {"__key__": f"{index:09d}", "__url__": url}
    image = row.get(columns["image"])
    if isinstance(image, dict) and image.get("bytes") is not None:
        ext = Path(image.get("path") or "").suffix.lstrip(".").lower()
        sample[ext if ext in IMAGE_EXTS else "png"] = image["bytes"]
    if columns.get("label") and row.get(columns["label"]) is not None:
        sample["cls"] = str(int(row[columns["label"]])).encode()
    if columns.get("caption") and row.get(columns["caption"]) is not None:
        caps = row[columns["caption"]]
        sample["json"] = json.dumps({"captions": caps if isinstance(caps, list) else [caps]}).encode()
    return sample


def split_index(cfg, split: str, pairs: bool = False) -> ShardIndex:
    """The shards of ``split`` (train / val / test) of a streamed source: the tar shards' index, or the
    parquet files of a Hugging Face dataset (``data.source: hf`` with ``data.streaming``)."""
    if cfg.source == "hf":
        name = {"train": cfg.train_split, "val": cfg.val_split, "test": cfg.test_split}[split]
        if not name:
            raise DataError(f"streaming data.name '{cfg.name}' needs its {split} split named: set data.{split}_split.")
        return hf_index(cfg, name, pairs)
    return load_index(cfg.shards.spec(split, cfg.data_dir), f"data.shards.{split}")


def count_samples(url: str) -> int:
    return sum(1 for _ in iter_shard_keys(url))


def iter_shard_keys(url: str) -> Iterator[str]:
    """The sample keys of a shard, in order, without reading the members' contents (local files)."""
    tf = _open_tar(url)
    try:
        with tf:  # a sample's members are consecutive: its key once, in order
            yield from dict.fromkeys(k for k, _, _ in _sample_members(tf))
    except (OSError, tarfile.TarError, EOFError) as e:
        raise DataError(f"shard '{url}' cannot be read: {e}.") from None


# ----------------------------------------------------------------------------------------------
# The plan of an epoch
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Segment:
    """Samples ``start`` .. ``stop - 1`` of shard ``shard``; ``ordinal`` is the first one's place in the
    epoch's sequence (the seed of its augmentation)."""

    shard: int
    start: int
    stop: int
    ordinal: int

    def __len__(self) -> int:
        return self.stop - self.start


def rank_batches(total: int, world: int, batch_size: int) -> int:
    """Batches every rank takes per epoch: the same on all ranks, so none waits in a collective."""
    return total // (world * batch_size)


def worker_span(n_batches: int, num_workers: int, worker: int) -> tuple[int, int]:
    """(first batch, count) of a worker's contiguous block of its rank's batches; the first
    ``n_batches % num_workers`` workers take one more (the loader's round-robin then never skips one)."""
    q, r = divmod(n_batches, num_workers)
    return worker * q + min(worker, r), q + (worker < r)


def delivered(k: int, num_workers: int, worker: int) -> int:
    """How many of the first ``k`` batches of an epoch came from ``worker`` (round-robin order)."""
    return max(0, (k - worker + num_workers - 1) // num_workers)


def shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    return np.random.default_rng([seed, epoch, 0x5A4D]).permutation(n).tolist()


def plan_worker(counts: Sequence[int], *, epoch: int, seed: int, world: int, rank: int, num_workers: int,
                worker: int, batch_size: int, shuffle: bool = True,
                resampled_batches: Optional[int] = None) -> list[Segment]:
    """The segments of shards one loader worker of one rank reads in ``epoch``, in order (a pure
    function of its arguments: every rank and worker computes its own)."""
    if resampled_batches is not None:
        _, nb = worker_span(resampled_batches, num_workers, worker)
        need, out = nb * batch_size, []
        rng = np.random.default_rng([seed, epoch, rank, worker, 0x2E5A])
        base = ((rank * num_workers + worker) << 40)  # ordinals unique across ranks and workers
        while need > 0:
            s = int(rng.integers(len(counts)))
            take = min(counts[s], need)
            if take > 0:
                out.append(Segment(s, 0, take, base))
                base += take
                need -= take
        return out
    n_b = rank_batches(sum(counts), world, batch_size)
    first, nb = worker_span(n_b, num_workers, worker)
    lo = rank * n_b * batch_size + first * batch_size
    hi = lo + nb * batch_size
    out, pos = [], 0
    for s in shard_order(len(counts), seed, epoch, shuffle):
        a, b = max(lo, pos), min(hi, pos + counts[s])
        if a < b:
            out.append(Segment(s, a - pos, b - pos, a))
        pos += counts[s]
        if pos >= hi:
            break
    return out


def window_order(n: int, seed: int, epoch: int, rank: int, worker: int, window: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    return np.random.default_rng([seed, epoch, rank, worker, window, 0x0B1F]).permutation(n).tolist()


# ----------------------------------------------------------------------------------------------
# Samples: what one tar sample becomes
# ----------------------------------------------------------------------------------------------
def _image_value(sample: dict) -> dict:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return {"bytes": sample[ext], "path": f"{sample['__url__']}#{sample['__key__']}.{ext}"}
    present = sorted(k for k in sample if not k.startswith("__"))
    raise DataError(f"sample '{sample['__key__']}' in shard '{sample['__url__']}' has no image (it has: "
                    f"{present}; expected one of {list(IMAGE_EXTS)}). Rewrite the shard or drop it from the index.")


def sample_label(sample: dict, required: bool = True) -> int:
    raw = sample.get("cls")
    if raw is None:
        if not required:
            return -1
        raise DataError(f"sample '{sample['__key__']}' in shard '{sample['__url__']}' has no label ('.cls'). A "
                        f"classification recipe needs one per sample; pack the data with its labels.")
    try:
        return int(raw.decode().strip())
    except ValueError:
        raise DataError(f"sample '{sample['__key__']}' in shard '{sample['__url__']}': label {raw[:40]!r} is "
                        f"not an integer.") from None


def sample_captions(sample: dict) -> list[str]:
    if "json" in sample:
        doc = json.loads(sample["json"].decode())
        caps = doc.get("captions") if isinstance(doc, dict) else doc
        if isinstance(caps, str):
            caps = [caps]
        if caps:
            return [str(c) for c in caps]
    if "txt" in sample:
        return [sample["txt"].decode()]
    raise DataError(f"sample '{sample['__key__']}' in shard '{sample['__url__']}' has no caption ('.txt' or "
                    f"'.json' with 'captions'). Image-text training needs one per sample.")


class ImageSamples:
    """A classification sample: ``(image tensor, label)``; the transform runs under the sample's seed."""

    def __init__(self, transform: Callable, mode: str = "RGB", seed: Optional[int] = 0):
        self.transform, self.mode, self.seed = defer_normalize(transform), mode, seed  # normalised by collate

    def __call__(self, sample: dict, ordinal: int, epoch: int):
        img = decode_tensor(_image_value(sample), self.mode, "train")
        y = sample_label(sample)
        with seeded(sample_seed(self.seed, epoch, ordinal)):
            x = self.transform(img)
        return x, y


class PairSamples:
    """An image-text sample: ``(image, tokens, label or -1, key)``: one caption drawn per (seed, epoch,
    place) and the augmentation under the same seed; ``key`` identifies the caption (retrieval)."""

    def __init__(self, transform: Callable, tokenizer: Callable, mode: str = "RGB", seed: int = 0):
        self.transform, self.tokenizer, self.mode, self.seed = defer_normalize(transform), tokenizer, mode, seed

    def __call__(self, sample: dict, ordinal: int, epoch: int):
        img = decode_tensor(_image_value(sample), self.mode, "train")
        caps = sample_captions(sample)
        s = sample_seed(self.seed, epoch, ordinal)
        text = caps[int(np.random.default_rng(s).integers(len(caps)))] if len(caps) > 1 else caps[0]
        with seeded(s):
            x = self.transform(img)
        key = zlib.crc32(caps[0].encode()) & 0x7FFFFFFF
        return x, self.tokenizer([text])[0], sample_label(sample, required=False), key


# ----------------------------------------------------------------------------------------------
# The stream and its loader
# ----------------------------------------------------------------------------------------------
def _pass_field(i: int, doc: str) -> property:
    """An integer kept in element ``i`` of the stream's shared-memory ``_pass`` tensor."""
    def set_(self, value: int) -> None:
        self._pass[i] = value

    return property(lambda self: int(self._pass[i]), set_, doc=doc)


class ShardStream(torch.utils.data.IterableDataset):
    """The batches of one rank, collated in the loader workers. Yields ``(batch, (worker, n))``: the
    logical worker and its batch number, which :class:`StreamLoader` checks against the round-robin
    order. ``epoch`` and ``skip`` (batches of the epoch already consumed) are set by the loader before
    each pass; they live in a shared-memory tensor, so persistent loader workers, each holding its own
    copy of this object, read the values of the pass they are asked for."""

    def __init__(self, index: ShardIndex, sample_fn: Callable, collate_fn: Callable, batch_size: int, *,
                 seed: int, rank: int = 0, world: int = 1, shuffle: bool = True, shuffle_buffer: int = 1000,
                 resampled_batches: Optional[int] = None, on_corrupt: str = "error"):
        self.index, self.sample_fn, self.collate_fn = index, sample_fn, collate_fn
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.shuffle, self.shuffle_buffer = shuffle, max(1, shuffle_buffer)
        self.resampled_batches, self.on_corrupt = resampled_batches, on_corrupt
        self._pass = torch.zeros(2, dtype=torch.int64).share_memory_()  # epoch, skip
        n = self.batches_per_epoch()
        if n == 0:
            raise DataError(f"'{index.source}' holds {index.total} samples, fewer than one batch per rank "
                            f"({batch_size} x {world} process(es)); lower run.batch_size or add data.")

    def __len__(self) -> int:
        """The training samples in the shards (not what one rank reads per epoch: ``batches_per_epoch``)."""
        return self.index.total

    def batches_per_epoch(self) -> int:
        if self.resampled_batches is not None:
            return self.resampled_batches
        return rank_batches(self.index.total, self.world, self.batch_size)

    epoch = _pass_field(0, "The epoch of the next pass.")
    skip = _pass_field(1, "Batches of the epoch already consumed when the next pass starts.")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        physical, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # a pass resumed after `skip` batches starts at the worker that was next: physical worker 0
        # plays logical worker skip % nw, so the round-robin continues where it stopped
        epoch, skip = self._pass.tolist()  # read once: the pass's values
        return self.worker_batches((physical + skip) % nw, nw, epoch, skip)

    def worker_batches(self, worker: int, num_workers: int, epoch: int,
                       skip: int) -> Iterator[tuple[Any, tuple[int, int]]]:
        n_b = self.batches_per_epoch()
        _, nb = worker_span(n_b, num_workers, worker)
        done = min(nb, delivered(skip, num_workers, worker))
        segments = plan_worker(self.index.counts, epoch=epoch, seed=self.seed, world=self.world,
                               rank=self.rank, num_workers=num_workers, worker=worker, batch_size=self.batch_size,
                               shuffle=self.shuffle, resampled_batches=self.resampled_batches)
        start = done * self.batch_size
        S = self.shuffle_buffer
        window = start // S
        raw = self._raw(segments, window * S)
        batch, n = [], done
        pending_bad, last_good = 0, None
        total = nb * self.batch_size
        pos = window * S
        while pos < total:
            chunk = [next(raw) for _ in range(min(S, total - pos))]
            order = window_order(len(chunk), self.seed, epoch, self.rank, worker, window, self.shuffle)
            items = [chunk[i] for i in order]
            if pos < start:
                items = items[start - pos:]
            for ordinal, sample in items:
                try:
                    out = self.sample_fn(sample, ordinal, epoch)
                except CorruptImageError as e:
                    if self.on_corrupt != "skip":
                        raise
                    log.warning("skipped an unreadable sample (data.on_corrupt=skip; counted, replaced by the next "
                                "readable one): %s", e)
                    pending_bad += 1
                    continue
                for _ in range(1 + pending_bad):
                    batch.append(out)
                    if len(batch) == self.batch_size:
                        yield self.collate_fn(batch), (worker, n)
                        batch, n = [], n + 1
                pending_bad, last_good = 0, out
            pos += len(chunk)
            window += 1
        while pending_bad and last_good is not None:  # unreadable samples at the very end
            batch.append(last_good)
            pending_bad -= 1
            if len(batch) == self.batch_size:
                yield self.collate_fn(batch), (worker, n)
                batch, n = [], n + 1
        if n != nb:
            raise DataError(f"the shards of '{self.index.source}' ended early: worker {worker} of rank {self.rank} "
                            f"made {n} of its {nb} batches (a shard holds fewer samples than its index says, or "
                            f"every sample of the epoch's tail was unreadable). Re-index the shards "
                            f"(`visrep data index`).")

    def _raw(self, segments: Sequence[Segment], start: int) -> Iterator[tuple[int, dict]]:
        """(ordinal, raw sample) from the worker's place ``start`` on: whole segments before it are
        skipped without opening their shard."""
        for seg in segments:
            if start >= len(seg):
                start -= len(seg)
                continue
            url = self.index.shards[seg.shard].url
            expected = seg.start + start
            got = 0
            for i, sample in enumerate(self.index.read(url, seg.start + start, seg.stop)):
                yield seg.ordinal + start + i, sample
                got += 1
            if got < len(seg) - start:
                raise DataError(f"shard '{url}' holds {expected + got} samples, but its index says "
                                f"{self.index.shards[seg.shard].nsamples}. Re-index the shards (`visrep data index`).")
            start = 0


class StreamLoader(DataLoaderStateMixin):
    """The training loader of a sharded source: ``len`` is the batches per rank per epoch (the same on
    every rank), :meth:`set_epoch` selects the epoch's plan and :meth:`start_at` resumes in the middle of
    one. Batches go to ``device`` (set by ``Run.prepare``: the stream is never handed to Accelerate,
    which would read it on one process and scatter it). Takes part in Accelerate's gradient
    accumulation bookkeeping like a prepared loader (Accelerate's ``DataLoaderStateMixin``: the last
    batch of an epoch ends an accumulation)."""

    _drop_last = True  # DataLoaderStateMixin: every batch is whole

    def __init__(self, dataset: ShardStream, num_workers: int = 0, pin_memory: bool = False,
                 track_gradient_state: bool = True):
        self.dataset, self.num_workers, self.pin_memory = dataset, num_workers, pin_memory
        self.track_gradient_state = track_gradient_state
        self.device: Optional[torch.device] = None
        self._start = 0
        self._loader: Optional[torch.utils.data.DataLoader] = None

    def __len__(self) -> int:
        return self.dataset.batches_per_epoch()

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def start_at(self, batches: int) -> "StreamLoader":
        """The next pass begins after ``batches`` batches of the current epoch."""
        self._start = batches
        return self

    def layout(self) -> dict:
        """What the order of batches depends on besides seed and epoch (saved with a checkpoint)."""
        return {"world": self.dataset.world, "num_workers": max(1, self.num_workers),
                "batch_size": self.dataset.batch_size, "shuffle_buffer": self.dataset.shuffle_buffer,
                "samples": self.dataset.index.total}

    def __iter__(self):
        from accelerate.utils import send_to_device

        ds, nw = self.dataset, max(1, self.num_workers)
        ds.skip, self._start = self._start, 0
        total = len(self)
        if self._loader is None:  # the workers persist from pass to pass (they read epoch and skip per pass)
            self._loader = torch.utils.data.DataLoader(
                ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                persistent_workers=self.num_workers > 0, prefetch_factor=2 if self.num_workers else None)
        loader = self._loader
        if self.track_gradient_state:
            self.gradient_state = GradientState()
            self.begin()
        else:
            self.reset()
        try:
            j = ds.skip
            for batch, (worker, n) in loader:
                if (n * nw + worker) != j:  # the round-robin order this module relies on
                    raise RuntimeError(f"stream batch order broken: got worker {worker} batch {n}, expected "
                                       f"global batch {j}")
                j += 1
                self.end_of_dataloader = j == total
                if self.device is not None:
                    batch = send_to_device(batch, self.device, non_blocking=self.pin_memory)
                yield batch
        finally:
            if self.track_gradient_state:
                self.end()


class ZippedStreams(DataLoaderStateMixin):
    """Two streams batch by batch: ``((x_a, x_b), y_a)`` (domain adaptation: labelled source, unlabelled
    target). ``len`` is the shorter one's; epochs, resume positions and the device apply to both."""

    _drop_last = True

    def __init__(self, first: StreamLoader, second: StreamLoader):
        self.first, self.second = first, second
        for s in (first, second):
            s.track_gradient_state = False  # this object is the loader Accelerate's accumulation sees

    @property
    def device(self):
        return self.first.device

    @device.setter
    def device(self, value) -> None:
        self.first.device = self.second.device = value

    def __len__(self) -> int:
        return min(len(self.first), len(self.second))

    def set_epoch(self, epoch: int) -> None:
        self.first.set_epoch(epoch)
        self.second.set_epoch(epoch)

    def start_at(self, batches: int) -> "ZippedStreams":
        self.first.start_at(batches)
        self.second.start_at(batches)
        return self

    def layout(self) -> dict:
        return {"first": self.first.layout(), "second": self.second.layout()}

    def __iter__(self):
        start = max(self.first._start, self.second._start)
        total = len(self)
        self.gradient_state = GradientState()
        self.begin()
        a, b = iter(self.first), iter(self.second)
        try:
            for j in range(start, total):
                (xa, ya), (xb, _) = next(a), next(b)
                self.end_of_dataloader = j + 1 == total
                yield (xa, xb), ya
        finally:
            for it in (a, b):
                it.close()
            self.end()


# ----------------------------------------------------------------------------------------------
# What the recipes build from a config
# ----------------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (the run's accelerator has set them up)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def read_split(index: ShardIndex, pairs: bool = False, limit: Optional[int] = None):
    """The first ``limit`` samples of ``index`` in shard order as an in-memory ``datasets.Dataset`` with
    undecoded images (``image``, ``label``, and ``captions`` for pairs), for evaluation."""
    import datasets

    images, labels, captions = [], [], []
    for shard in index.shards:
        for sample in index.read(shard.url):
            if limit is not None and len(images) >= limit:
                break
            images.append(_image_value(sample))
            labels.append(sample_label(sample, required=not pairs))
            if pairs:
                captions.append(sample_captions(sample))
        if limit is not None and len(images) >= limit:
            break
    classes = index.classes
    if pairs:
        label = datasets.Value("int64")
    else:
        top = max(labels) if labels else -1
        if classes is None:
            classes = [str(i) for i in range(top + 1)]
        if top >= len(classes) or min(labels, default=0) < 0:
            raise DataError(f"'{index.source}' has labels outside 0..{len(classes) - 1} (its index names "
                            f"{len(classes)} classes). Re-pack the data or fix the index's 'classes'.")
        label = datasets.ClassLabel(names=classes)
    cols = {"image": images, "label": labels}
    feats = {"image": datasets.Image(decode=False), "label": label}
    if pairs:
        cols["captions"] = captions
        feats["captions"] = datasets.Sequence(datasets.Value("string"))
    return datasets.Dataset.from_dict(cols, features=datasets.Features(feats))


def train_stream(cfg, sample_fn: Callable, collate_fn: Callable, batch_size: int, seed: int,
                 num_workers: int, pin_memory: bool, pairs: bool = False) -> StreamLoader:
    """The training loader of ``cfg`` (a ``DataConfig`` whose training split is streamed) for this process."""
    sc = cfg.shards
    index = split_index(cfg, "train", pairs)
    rank, world = rank_and_world()
    resampled = None
    if sc.resampled:
        resampled = max(1, sc.samples_per_epoch // (world * batch_size))
    stream = ShardStream(index, sample_fn, collate_fn, batch_size, seed=seed, rank=rank, world=world,
                         shuffle_buffer=sc.shuffle_buffer, resampled_batches=resampled, on_corrupt=cfg.on_corrupt)
    return StreamLoader(stream, num_workers=num_workers, pin_memory=pin_memory)


def class_names_for(cfg) -> list[str]:
    """The class names of ``cfg``'s shards: the validation index's, else ``0 .. max label``."""
    index = split_index(cfg, "val")
    return index.classes or list(read_split(index, limit=cfg.shards.eval_max_samples).features["label"].names)


def eval_splits(cfg, pairs: bool = False) -> tuple[dict, dict]:
    """val and test of ``cfg``'s shards in memory (at most ``shards.eval_max_samples`` each, in order), and
    the ``visrep`` entry of the validation index (class names, ...)."""
    sc = cfg.shards
    out, meta = {}, None
    for split in ("val", "test"):
        index = split_index(cfg, split, pairs)
        out[split] = read_split(index, pairs=pairs, limit=sc.eval_max_samples)
        meta = index.meta if meta is None else meta
    return out, meta or {}
