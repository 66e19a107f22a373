"""Input-pipeline throughput on JPEG webdataset shards: visrep's stream vs open_clip's webdataset pipeline
vs timm's webdataset reader, same shards, same workers, same decode + augmentation at 224 px; the same
samples as a Hugging Face parquet dataset, streamed by visrep (data.streaming) vs by `datasets`' own
streaming IterableDataset; and a training epoch fed by the stream vs the same steps on batches already
in memory.

    python benchmarks/data_bench.py                      # 2 workers, 1,536 samples in 12 shards, 5 rounds
    python benchmarks/data_bench.py --workers 4 --samples 4096 --rounds 5
    python benchmarks/data_bench.py --only-hf --rounds 3 # the parquet comparison alone

The shards: random 220-420 px crops of scikit-learn's two sample photos resized to 320 px (JPEG, q 90,
~30 KB each) with a class and a caption. Every pipeline decodes with PIL and applies the same callable:
visrep's training transform at 224 px (random-resized crop, flip, to float, normalise). Rounds are
interleaved (one epoch of each pipeline per round, the first round a warm-up) and the table gives the
medians; ratio = visrep's samples/s over the peer's.
"""
from __future__ import annotations

import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from timing import bench_parser  # noqa: E402


def make_shards(folder: Path, n: int, per_shard: int) -> Path:
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from visrep.data.cli import write_shards
    from visrep.data.shards import write_index

    photos = load_sample_images().images
    rng = np.random.default_rng(0)

    def rows():
        for i in range(n):
            p = photos[i % 2]
            s = int(rng.integers(220, 421))
            y, x = int(rng.integers(0, p.shape[0] - s + 1)), int(rng.integers(0, p.shape[1] - s + 1))
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(p[y:y + s, x:x + s])).resize((320, 320)).save(buf, "JPEG", quality=90)
            yield {"jpg": buf.getvalue(), "cls": str(i % 2).encode(), "txt": f"a photo, number {i}".encode()}

    folder.mkdir(parents=True, exist_ok=True)
    shards = write_shards(rows(), folder, "train", per_shard)
    write_index(folder / "train.json", shards, {"classes": ["china", "flower"]})
    return folder


def transform():
    from visrep.data.images import build_transforms

    return build_transforms({"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}, 224, train=True)


def visrep_loader(folder: Path, batch: int, workers: int):
    from visrep.data.images import collate
    from visrep.data.shards import ImageSamples, ShardStream, StreamLoader, load_index

    ds = ShardStream(load_index(str(folder / "train.json")), ImageSamples(transform()), collate, batch, seed=0)
    return StreamLoader(ds, num_workers=workers)


def _open_clip_on_webdataset_1x() -> None:
    """open_clip's training code is written for webdataset <= 0.2.86; webdataset 1.x ends each shard with an
    empty end-of-shard marker that its ``group_by_keys_nothrow`` does not expect. Skip the marker (the
    only change to open_clip's pipeline)."""
    import open_clip_train.data as ocd

    if getattr(ocd.group_by_keys_nothrow, "_visrep_shim", False):
        return
    original = ocd.group_by_keys_nothrow

    def group_by_keys(data, *args, **kwargs):
        return original((s for s in data if s), *args, **kwargs)

    group_by_keys._visrep_shim = True
    ocd.group_by_keys_nothrow = group_by_keys


def open_clip_loader(folder: Path, batch: int, workers: int, n: int, n_shards: int):
    from open_clip_train.data import get_wds_dataset

    _open_clip_on_webdataset_1x()

    tf = transform()
    args = SimpleNamespace(train_data=str(folder / f"train-{{000000..{n_shards - 1:06d}}}.tar"),
                           train_num_samples=n, dataset_resampled=False, train_data_upsampling_factors=None,
                           seed=0, batch_size=batch, world_size=1, workers=workers)
    info = get_wds_dataset(args, tf, is_train=True, epoch=0, floor=True, tokenizer=lambda t: torch.zeros(1, 8))
    return info.dataloader


def timm_loader(folder: Path, batch: int, workers: int, n: int, n_shards: int):
    from timm.data import create_dataset

    ds = create_dataset("wds/bench", root=str(folder), split=f"train-{{000000..{n_shards - 1:06d}}}.tar",
                        is_training=True, batch_size=batch, num_samples=n, seed=0)
    ds.transform = transform()
    # persistent workers: the default of timm's create_loader
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0)


def epoch_rate(loader) -> tuple[float, int]:
    t0, count = time.perf_counter(), 0
    for b in loader:
        x = b[0]
        count += x.shape[0]
    return count / (time.perf_counter() - t0), count


def rounds_table(makers: dict, args, title: str) -> list[str]:
    """One epoch of each loader (``makers``: name -> a loader, visrep's first; each built once, as a
    training run builds it, its workers persistent where the library makes them so) per round, rounds
    interleaved, the first a warm-up (workers, page cache, imports): the medians and visrep's ratio to
    each."""
    loaders = {name: make() for name, make in makers.items()}
    rates: dict[str, list[float]] = {k: [] for k in makers}
    counts: dict[str, int] = {}
    for r in range(args.rounds + 1):
        for name, loader in loaders.items():
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(r)
            rate, counts[name] = epoch_rate(loader)
            if r > 0:
                rates[name].append(rate)
    ours = statistics.median(next(iter(rates.values())))
    w = max(16, max(map(len, makers)) + 2)
    lines = [f"{title}, batch {args.batch_size}, {args.workers} worker(s), {args.rounds} interleaved rounds (medians)",
             f"{'pipeline':<{w}}{'samples/s':>12}{'per epoch':>12}{'visrep / this':>15}", "-" * (w + 39)]
    for name, rs in rates.items():
        m = statistics.median(rs)
        lines.append(f"{name:<{w}}{m:>12.1f}{counts[name]:>12}{ours / m:>14.2f}x")
    return lines


def pipeline_table(folder: Path, args, n_shards: int) -> list[str]:
    return rounds_table({
        "visrep stream": lambda: visrep_loader(folder, args.batch_size, args.workers),
        "open_clip wds": lambda: open_clip_loader(folder, args.batch_size, args.workers, args.samples, n_shards),
        "timm wds": lambda: timm_loader(folder, args.batch_size, args.workers, args.samples, n_shards),
    }, args, f"decode + augment at 224 px, {args.samples} JPEG samples in {n_shards} shards")


def make_parquet(folder: Path, shards: Path, n_files: int) -> Path:
    """The same samples as a Hugging Face dataset laid out as the Hub lays one out: data/train-*.parquet
    (``image`` with the JPEG bytes, ``label`` a ClassLabel)."""
    import datasets

    from visrep.data.shards import iter_shard, load_index

    rows = [s for sh in load_index(str(shards / "train.json")).shards for s in iter_shard(sh.url)]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["china", "flower"])})
    (folder / "data").mkdir(parents=True)
    per = math.ceil(len(rows) / n_files)
    for i in range(n_files):
        part = rows[i * per:(i + 1) * per]
        datasets.Dataset.from_dict({"image": [{"bytes": r["jpg"], "path": f"{r['__key__']}.jpg"} for r in part],
                                    "label": [int(r["cls"]) for r in part]}, features=feats).to_parquet(
            str(folder / "data" / f"train-{i:05d}-of-{n_files:05d}.parquet"), batch_size=64)
    return folder


def visrep_hf_loader(folder: Path, batch: int, workers: int):
    from visrep.data.images import collate
    from visrep.data.shards import ImageSamples, ShardStream, StreamLoader, split_index
    from visrep.data.sources import DataConfig

    index = split_index(DataConfig(source="hf", name=str(folder), streaming=True), "train")
    return StreamLoader(ShardStream(index, ImageSamples(transform()), collate, batch, seed=0), num_workers=workers)


def datasets_loader(folder: Path, batch: int, workers: int):
    """`datasets`' streaming IterableDataset (files split over the loader workers, a shuffle buffer of
    1,000 as visrep's), decoded with PIL and the same transform in the workers (its best case: no
    `split_dataset_by_node`, one process)."""
    import datasets

    from visrep.data.images import decode_image

    tf = transform()
    ds = datasets.load_dataset(str(folder), split="train", streaming=True)
    ds = ds.cast_column("image", datasets.Image(decode=False)).shuffle(seed=0, buffer_size=1000)
    # decoded and augmented in the collate function, which runs in the workers (a `map` returning tensors
    # would have `datasets` convert each image to Python lists and back)
    return torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True,
                                       persistent_workers=workers > 0,
                                       collate_fn=lambda rs: (torch.stack([tf(decode_image(r["image"])) for r in rs]),
                                                              torch.tensor([r["label"] for r in rs])))


def hf_table(folder: Path, args, n_files: int) -> list[str]:
    return rounds_table({
        "visrep hf stream": lambda: visrep_hf_loader(folder, args.batch_size, args.workers),
        "datasets stream": lambda: datasets_loader(folder, args.batch_size, args.workers),
    }, args, f"the same samples as a Hugging Face parquet dataset ({n_files} files), streamed: decode + augment at 224 px")


def epoch_overhead(folder: Path, args) -> list[str]:
    """A training epoch (ResNet-18, SGD, channels_last) fed by the stream vs by the same batches already
    in memory; the stream built once (as a run builds it) and read with 0 workers (what
    ``run.num_workers: -1`` gives on a host without a GPU: workers would take the training's cores)
    and with ``--workers``."""
    from visrep.zoo import create_backbone

    streams = {w: visrep_loader(folder, args.batch_size, w) for w in sorted({0, args.workers})}
    steps = min(args.train_steps, len(streams[0]))
    cached = []
    for i, (x, y) in enumerate(streams[0]):
        if i >= steps:
            break
        cached.append((x, y))
    model = create_backbone("resnet18", num_classes=2).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def timed(batches) -> float:
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(batches):
            if i >= steps:
                break
            step(x, y)
        return time.perf_counter() - t0

    step(*cached[0])  # warm-up
    times: dict = {"memory": [], **{w: [] for w in streams}}
    for r in range(args.rounds + 1):
        for w, loader in streams.items():
            loader.set_epoch(r)
            times[w].append(timed(loader))
        times["memory"].append(timed(cached))
    m = statistics.median(times.pop("memory")[1:])
    lines = [f"training, ResNet-18 at 224 px, {steps} steps of {args.batch_size}, {args.rounds} interleaved rounds "
             f"after a warm-up (medians): batches in memory {m:.2f} s"]
    for w, ts in times.items():
        s = statistics.median(ts[1:])
        lines.append(f"  streamed from shards, {w} worker(s){' (the CPU default)' if w == 0 else ''}: {s:7.2f} s, "
                     f"input pipeline costs {100 * (s - m) / m:+.1f}%")
    return lines


def main(argv=None) -> int:
    ap = bench_parser(__doc__, samples=1536, per_shard=128, batch_size=64, workers=2, rounds=5, train_steps=6)
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--only-hf", action="store_true", help="only the Hugging Face parquet comparison")
    ap.add_argument("--skip-hf", action="store_true", help="without the Hugging Face parquet comparison")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_shards(Path(tmp) / "wds", args.samples, args.per_shard)
        n_shards = math.ceil(args.samples / args.per_shard)
        if not args.only_hf:
            for line in pipeline_table(folder, args, n_shards):
                print(line, flush=True)
        for line in [] if args.skip_hf else hf_table(make_parquet(Path(tmp) / "hf", folder, max(2, n_shards // 2)),
                                                     args, max(2, n_shards // 2)):
            print(line, flush=True)
        if not args.skip_training and not args.only_hf:
            for line in epoch_overhead(folder, args):
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
