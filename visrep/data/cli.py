"""``visrep data pack|index|inspect`` (see ``visrep.cli``): write webdataset shards with an index from
any source the recipes read, index existing shards, and look inside them.

    visrep data pack DIR OUT                  # a class-per-folder image tree (optionally train/ val/ test/)
    visrep data pack hf:NAME[:CONFIG] OUT     # a Hugging Face dataset (image + label columns)
    visrep data pack hf:NAME OUT --streaming  # the same read as a stream, written in one pass
    visrep data pack captions.jsonl OUT       # image-text pairs: a captions file beside its images
    visrep data pack digits OUT [--pairs]     # the embedded digits (classification, or captioned pairs)
    visrep data index 'pipe:aws s3 cp s3://b/train-{000000..000099}.tar -' train.json
    visrep data inspect OUT/train.json --grid grid.png

``pack`` writes ``OUT/{train,val,test}-NNNNNN.tar`` and ``OUT/{train,val,test}.json`` (the index: shard
list with sample counts, class names) into a temporary folder renamed to OUT at the end, so OUT is
whole or absent. Images keep their encoded bytes (no re-encoding); the splits are those the recipes
use for the same source and fractions. Train with ``--data.source shards --data.data-dir OUT``.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path

SPLITS = ("train", "val", "test")


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="pack data into webdataset shards, index and inspect shards")
    data.set_defaults(_parser=data)
    sub = data.add_subparsers(dest="data_command", metavar="{pack,index,inspect}")

    p = sub.add_parser("pack", help="write train/val/test shards and their indexes from a source")
    p.add_argument("src", help="an image folder, hf:NAME[:CONFIG], a captions file (.jsonl/.csv), digits or digits_m")
    p.add_argument("out", help="output folder (must not exist, or use --overwrite)")
    p.add_argument("--pairs", action="store_true", help="image-text pairs (implied by a captions file)")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--image-size", type=int, default=32, help="digits / digits_m only: the stored image size")
    p.add_argument("--val-fraction", type=float, default=0.15)
    p.add_argument("--test-fraction", type=float, default=0.15)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--caption-column", default="caption", help="hf / captions file: the caption column")
    p.add_argument("--label-column", default=None,
                   help="the class column (hf --streaming: default 'label'; pairs: enables zero-shot evaluation)")
    p.add_argument("--image-column", default="image", help="hf --streaming: the image column")
    p.add_argument("--streaming", action="store_true",
                   help="hf:NAME only: read the dataset as a stream and write the shards in one pass (no full "
                        "download first); missing val/test splits are held out of train by position")
    p.add_argument("--overwrite", action="store_true", help="replace OUT once the new shards are complete")
    p.set_defaults(func=_pack)

    p = sub.add_parser("index", help="count the samples of shards (local, brace pattern, pipe:) into an index")
    p.add_argument("shards", help="shard URLs: brace pattern(s) joined by '::'")
    p.add_argument("out", help="the index JSON to write")
    p.add_argument("--classes", default=None, help="a text file with one class name per line (label order)")
    p.set_defaults(func=_index)

    p = sub.add_parser("inspect", help="shard and sample counts, classes, and a grid of samples as a PNG")
    p.add_argument("index", help="an index JSON or a brace pattern of local shards")
    p.add_argument("--grid", default=None, help="write a grid of the first samples to this PNG")
    p.add_argument("--grid-samples", type=int, default=64)
    p.add_argument("--max-samples", type=int, default=None, help="read at most this many samples")
    p.set_defaults(func=_inspect)


# ----------------------------------------------------------------------------- pack

def _image_bytes(value) -> tuple[bytes, str]:
    """The encoded bytes of an undecoded ``datasets.Image`` value and their file extension."""
    from PIL import Image

    from visrep.errors import DataError

    data = value.get("bytes") if isinstance(value, dict) else None
    path = value.get("path") if isinstance(value, dict) else None
    if data is None and path:
        data = Path(path).read_bytes()
    if data is None:
        raise DataError(f"an image has neither bytes nor a readable path ({path!r}); cannot pack it.")
    try:
        fmt = (Image.open(io.BytesIO(data)).format or "").lower()
    except Exception:  # an unreadable image is packed as it is; data.on_corrupt decides at training time
        fmt = Path(path).suffix.lstrip(".").lower() if path else "bin"
    return data, {"jpeg": "jpg", "mpo": "jpg", "tiff": "tif"}.get(fmt, fmt or "bin")


def _written_order(n: int, seed: int) -> list[int]:
    """Samples are written in a seeded random order: sources list them by class (an image folder, many
    datasets), and a stream only shuffles within a window of samples, so class-sorted shards would give
    batches of one class."""
    import numpy as np

    return np.random.default_rng([seed, 0x5EED]).permutation(n).tolist()


def _classification_source(args):
    from visrep.data.sources import DataConfig, class_names, load_splits

    common = dict(val_fraction=args.val_fraction, test_fraction=args.test_fraction, split_seed=args.split_seed)
    src = args.src
    if src in ("digits", "digits_m"):
        cfg = DataConfig(source=src, image_size=args.image_size, **common)
    elif src.startswith("hf:"):
        name, _, conf = src[3:].partition(":")
        cfg = DataConfig(source="hf", name=name, hf_config=conf or None, **common)
    else:
        cfg = DataConfig(source="imagefolder", data_dir=src, **common)
    splits = load_splits(cfg)
    classes = class_names(splits)

    def rows(split):
        ds = splits[split]  # read row by row (Arrow, memory-mapped): a large split never sits in memory
        for i in _written_order(len(ds), args.split_seed):
            r = ds[i]
            data, ext = _image_bytes(r["image"])
            yield {ext: data, "cls": str(int(r["label"])).encode()}

    return rows, {"kind": "classification", "classes": classes}


def _pairs_source(args):
    from visrep.data.pairs import PairsConfig, load_pair_splits

    common = dict(val_fraction=args.val_fraction, test_fraction=args.test_fraction, split_seed=args.split_seed)
    src = args.src
    if src == "digits":
        cfg = PairsConfig(source="digits", image_size=args.image_size, **common)
    elif src.startswith("hf:"):
        name, _, conf = src[3:].partition(":")
        cfg = PairsConfig(source="hf", name=name, hf_config=conf or None, caption_column=args.caption_column,
                          label_column=args.label_column, **common)
    else:
        p = Path(src)
        cfg = PairsConfig(source="folder", data_dir=str(p.parent), captions_file=p.name,
                          caption_column=args.caption_column, label_column=args.label_column, **common)
    ps = load_pair_splits(cfg)
    meta = {"kind": "pairs", "templates": list(ps.templates)}
    if ps.classnames:
        meta["classnames"] = [list(n) for n in ps.classnames]
        meta["classes"] = [n[0] for n in ps.classnames]
    if ps.train_templates:
        meta["train_templates"] = list(ps.train_templates)

    def captions(split, i, label, row_caps):
        if not ps.train_templates:  # the captions are data
            return list(row_caps)
        names = ps.classnames[label]
        if split == "train":  # every caption a training sample may draw (template x name, uniform)
            return [t.format(n) for t in ps.train_templates for n in names]
        t = len(ps.eval_templates)  # what PairDataset.caption gives an evaluation sample
        return [ps.eval_templates[i % t].format(names[(i // t) % len(names)])]

    def rows(split):
        ds = ps.splits[split]
        for i in _written_order(len(ds), args.split_seed):
            r = ds[i]
            image, label, caps = r["image"], r["label"], r.get("captions")
            data, ext = _image_bytes(image)
            c = captions(split, i, int(label), caps)
            row = {ext: data, "txt": c[0].encode(), "json": json.dumps({"captions": c}).encode()}
            if int(label) >= 0:
                row["cls"] = str(int(label)).encode()
            yield row

    return rows, meta


class ShardWriter:
    """Writes samples (dicts of extension -> bytes) as ``folder/SPLIT-NNNNNN.tar`` shards of ``shard_size``
    samples, keyed by their running number; :meth:`close` returns the :class:`Shard` list."""

    def __init__(self, folder: Path, split: str, shard_size: int):
        self.folder, self.split, self.shard_size = folder, split, shard_size
        self.shards, self.tf, self.n_in, self.k = [], None, 0, 0

    def _close_shard(self) -> None:
        if self.tf is not None:
            self.tf.close()
            from visrep.data.shards import Shard

            self.shards.append(Shard(str(self.folder / f"{self.split}-{len(self.shards):06d}.tar"), self.n_in))
            self.tf = None

    def add(self, row: dict) -> None:
        import tarfile

        if self.tf is None or self.n_in == self.shard_size:
            self._close_shard()
            name = self.folder / f"{self.split}-{len(self.shards):06d}.tar"
            self.tf, self.n_in = tarfile.open(name, "w", format=tarfile.USTAR_FORMAT), 0
        for ext, data in row.items():
            info = tarfile.TarInfo(f"{self.k:08d}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            self.tf.addfile(info, io.BytesIO(data))
        self.n_in, self.k = self.n_in + 1, self.k + 1

    def close(self) -> list:
        self._close_shard()
        return self.shards


def write_shards(rows, folder: Path, split: str, shard_size: int) -> list:
    """Write ``rows`` as the shards of one split (:class:`ShardWriter`); returns the :class:`Shard` list."""
    w = ShardWriter(folder, split, shard_size)
    for row in rows:
        w.add(row)
    return w.close()


def _hf_streaming_source(args, pairs: bool):
    """A Hugging Face dataset read in streaming mode (nothing downloaded up front), written in one pass.
    Splits the dataset lacks are held out of train by a fixed scatter of sample positions (not
    stratified: a stream's labels are not known in advance)."""
    import datasets

    from visrep.data.pairs import GENERIC_TEMPLATES
    from visrep.errors import MissingKeyError

    name, _, conf = args.src[3:].partition(":")
    d = datasets.load_dataset(name, conf or None, streaming=True)
    if "train" not in d:
        raise MissingKeyError(f"'{name}' has no 'train' split (it has {sorted(d)}); cannot pack it.")
    val = next((s for s in ("validation", "val", "valid") if s in d), None)
    test = "test" if "test" in d else None
    label_col = args.label_column or (None if pairs else "label")
    feats = d["train"].features or {}
    for col in (args.image_column, label_col, args.caption_column if pairs else None):
        if col is not None and feats and col not in feats:
            raise MissingKeyError(f"column '{col}' not in '{name}' (columns: {sorted(feats)}); set --image-column, "
                                  f"--label-column or --caption-column.")
    feat = feats.get(label_col) if label_col else None
    classes = list(feat.names) if isinstance(feat, datasets.ClassLabel) else []
    ids = {c: i for i, c in enumerate(classes)}
    meta = {"kind": "pairs" if pairs else "classification", "classes": classes}
    if pairs:
        meta["templates"] = list(GENERIC_TEMPLATES)

    def row(r: dict) -> dict:
        data, ext = _image_bytes(r[args.image_column])
        out = {ext: data}
        if label_col is not None:
            v = r[label_col]
            y = int(v) if isinstance(feat, datasets.ClassLabel) else ids.setdefault(str(v), len(ids))
            if y >= len(classes):
                classes.append(str(v))
            out["cls"] = str(y).encode()
        if pairs:
            caps = r[args.caption_column]
            caps = [caps] if isinstance(caps, str) else [str(c) for c in caps]
            out.update(txt=caps[0].encode(), json=json.dumps({"captions": caps}).encode())
        return out

    def iter_rows():
        def stream(split):  # shard order and a 10,000-sample buffer shuffled (the source may be class-sorted)
            ds = d[split].cast_column(args.image_column, datasets.Image(decode=False))
            return ds.shuffle(seed=args.split_seed, buffer_size=10_000)

        for i, r in enumerate(stream("train")):
            u = (i * 2654435761 % 2 ** 32) / 2 ** 32  # Knuth's multiplicative scatter of positions
            if val is None and u < args.val_fraction:
                yield "val", row(r)
            elif test is None and 1.0 - u <= args.test_fraction:
                yield "test", row(r)
            else:
                yield "train", row(r)
        for split, hf_split in (("val", val), ("test", test)):
            if hf_split is not None:
                for r in stream(hf_split):
                    yield split, row(r)

    return iter_rows, meta


def _pack(args) -> int:
    from visrep.data.shards import write_index
    from visrep.errors import DataError

    out = Path(args.out)
    if args.shard_size < 1:
        raise DataError(f"--shard-size {args.shard_size}: give an integer >= 1 (samples per shard).")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DataError(f"'{out}' exists and is not empty; choose another folder or pass --overwrite.")
    pairs = args.pairs or Path(args.src).suffix.lower() in (".jsonl", ".csv")
    if args.streaming:
        if not args.src.startswith("hf:"):
            raise DataError(f"--streaming reads a Hugging Face dataset (hf:NAME), not '{args.src}'.")
        iter_rows, meta = _hf_streaming_source(args, pairs)
    else:
        rows, meta = (_pairs_source if pairs else _classification_source)(args)

        def iter_rows():
            for split in SPLITS:
                for r in rows(split):
                    yield split, r

    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writers = {split: ShardWriter(tmp, split, args.shard_size) for split in SPLITS}
        for split, r in iter_rows():
            writers[split].add(r)
        summary = {}
        for split, w in writers.items():
            shards = w.close()
            if not shards:
                raise DataError(f"packing '{args.src}' gave no '{split}' samples; adjust --val-fraction / "
                                f"--test-fraction or the source.")
            # the index names the shards relative to itself, so it stays valid after the rename below
            write_index(tmp / f"{split}.json", shards, meta)
            summary[split] = (len(shards), sum(sh.nsamples for sh in shards))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for split, (n_shards, n) in summary.items():
        print(f"{split:<6}{n:>9,} samples in {n_shards} shard(s): {out / (split + '.json')}")
    classes = meta.get("classes")
    if classes:
        print(f"{len(classes)} classes: {', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}")
    print(f"train with: --data.source shards --data.data-dir {out}")
    return 0


# ----------------------------------------------------------------------------- index

def _index(args) -> int:
    from visrep.data.shards import Shard, count_samples, expand_urls, write_index
    from visrep.errors import MissingFileError

    classes = None
    if args.classes:
        p = Path(args.classes)
        if not p.is_file():
            raise MissingFileError(f"--classes '{p}' does not exist (a text file, one class name per line).")
        classes = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    shards = []
    for url in expand_urls(args.shards):
        shards.append(Shard(url, count_samples(url)))
        print(f"{url}: {shards[-1].nsamples} samples", file=sys.stderr)
    write_index(Path(args.out), shards, {"classes": classes} if classes else {})
    print(f"{len(shards)} shard(s), {sum(s.nsamples for s in shards):,} samples: {args.out}")
    return 0


# ----------------------------------------------------------------------------- inspect

def _inspect(args) -> int:
    from visrep.data.shards import IMAGE_EXTS, iter_shard, load_index

    index = load_index(args.index, "visrep data inspect")
    print(f"{index.source}: {len(index.shards)} shard(s), {index.total:,} samples (index)")
    sizes = index.counts
    print(f"samples per shard: min {min(sizes)}, max {max(sizes)}")
    labels, exts, grid, read = Counter(), Counter(), [], 0
    for shard in index.shards:
        for sample in iter_shard(shard.url):
            if args.max_samples is not None and read >= args.max_samples:
                break
            read += 1
            exts.update(k for k in sample if not k.startswith("__"))
            if "cls" in sample:
                labels[int(sample["cls"].decode().strip())] += 1
            if args.grid and len(grid) < args.grid_samples:
                grid.append(next((sample[e] for e in IMAGE_EXTS if e in sample), None))
        if args.max_samples is not None and read >= args.max_samples:
            break
    print(f"read {read:,} samples; members: " + ", ".join(f".{e} x{n}" for e, n in sorted(exts.items())))
    if labels:
        names = index.classes or []
        print(f"{len(labels)} classes:")
        for c in sorted(labels):
            name = names[c] if c < len(names) else str(c)
            print(f"  {c:>5}  {name:<24}{labels[c]:>9,}")
    if args.grid:
        _save_grid([g for g in grid if g is not None], Path(args.grid))
        print(f"grid of {len([g for g in grid if g is not None])} samples: {args.grid}")
    return 0


def _save_grid(images: list, path: Path, cell: int = 64) -> None:
    from PIL import Image

    from visrep.data.images import decode_image

    cols = max(1, min(8, len(images)))
    rows = max(1, -(-len(images) // cols))
    sheet = Image.new("RGB", (cols * cell, rows * cell), "white")
    for i, data in enumerate(images):
        img = decode_image({"bytes": data, "path": None}).resize((cell, cell))
        sheet.paste(img, ((i % cols) * cell, (i // cols) * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
