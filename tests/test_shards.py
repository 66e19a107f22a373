"""Sharded streaming (visrep.data.shards): every key once per epoch across ranks and workers, equal batch
counts, exact mid-epoch resume, resampled mode, the engine's resume of a stream, pack / index / inspect,
and clear errors."""
import dataclasses
import io
import json
import os
import subprocess
import tarfile

import pytest
import torch

from helpers import ACCELERATE_LAUNCH, ROOT, env, free_port
from visrep.data import shards as S
from visrep.errors import DataError, MissingFileError

SIZES = [37, 5, 61, 1, 23, 48, 12, 29]  # 8 uneven shards, 216 samples = 2 ranks x 27 batches of 4


def write_tar(path, keys, extra=None):
    with tarfile.open(path, "w") as tf:
        for k in keys:
            for ext, data in {"cls": str(int(k) % 5).encode(), **(extra or {})}.items():
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    shards, n = [], 0
    for i, size in enumerate(SIZES):
        write_tar(d / f"s-{i:02d}.tar", [f"{n + j:06d}" for j in range(size)])
        shards.append(S.Shard(str(d / f"s-{i:02d}.tar"), size))
        n += size
    S.write_index(d / "train.json", shards, {"classes": list("abcde")})
    return d


def key_of(sample, ordinal, epoch):
    return int(sample["__key__"])


def keys_collate(batch):
    return torch.tensor(batch)


def stream(uneven, rank=0, world=2, batch=4, workers=2, **kw):
    index = S.load_index(str(uneven / "train.json"))
    ds = S.ShardStream(index, key_of, keys_collate, batch, seed=7, rank=rank, world=world, shuffle_buffer=10, **kw)
    return S.StreamLoader(ds, num_workers=workers)


def epoch_batches(loader, epoch, start=0):
    loader.set_epoch(epoch)
    return [b.tolist() for b in loader.start_at(start)]


def test_index_pattern_and_json_agree(uneven):
    by_json = S.load_index(str(uneven / "train.json"))
    by_pattern = S.load_index(str(uneven / "s-{00..07}.tar"))
    assert by_json.counts == by_pattern.counts == SIZES and by_json.classes == list("abcde")
    assert [s.url for s in by_json.shards] == [s.url for s in by_pattern.shards]


def test_plan_covers_every_sample_once_with_equal_batches_per_rank():
    """The pure plan, over world sizes, worker counts and epochs: each rank's workers tile a contiguous
    block, blocks are disjoint, and what is dropped is fewer than world x batch samples."""
    for world in (1, 2, 3):
        for nw in (1, 2, 3):
            for epoch in (0, 1):
                seen = []
                for rank in range(world):
                    for w in range(nw):
                        segs = S.plan_worker(SIZES, epoch=epoch, seed=1, world=world, rank=rank, num_workers=nw,
                                             worker=w, batch_size=4)
                        seen += [(s.shard, i) for s in segs for i in range(s.start, s.stop)]
                assert len(seen) == len(set(seen)) == S.rank_batches(216, world, 4) * world * 4
                assert 216 - len(seen) < world * 4


def test_two_ranks_two_workers_see_every_key_once_per_epoch_in_equal_batches(uneven):
    everything = set(range(216))
    orders = []
    for epoch in (0, 1):
        per_rank = [epoch_batches(stream(uneven, rank=r), epoch) for r in (0, 1)]
        assert [len(b) for b in per_rank] == [27, 27]
        keys = [k for batches in per_rank for b in batches for k in b]
        assert len(keys) == 216 and set(keys) == everything
        orders.append(keys)
    assert orders[0] != orders[1], "shard order and windows are drawn per epoch"
    # the worker count changes the interleaving, never the set of samples
    keys = [k for r in (0, 1) for b in epoch_batches(stream(uneven, rank=r, workers=3), 0) for k in b]
    assert sorted(keys) == sorted(everything)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_reproduces_the_uninterrupted_sequence(uneven, workers):
    loader = stream(uneven, rank=1, workers=workers)
    whole = epoch_batches(loader, 1)
    for k in (1, 2, 7, 13, 26):
        assert epoch_batches(stream(uneven, rank=1, workers=workers), 1, start=k) == whole[k:], k
    assert epoch_batches(loader, 1) == whole, "start_at applies to one pass only"


def key_and_pid(sample, ordinal, epoch):
    return int(sample["__key__"]), os.getpid()


def test_workers_persist_across_passes_and_follow_epoch_and_resume(uneven):
    """One loader, its two workers started once: every pass (a whole epoch, one abandoned after 3
    batches, one resumed at batch 5, the next epoch) gives what a fresh loader gives."""
    index = S.load_index(str(uneven / "train.json"))
    ds = S.ShardStream(index, key_and_pid, keys_collate, 4, seed=7, rank=1, world=2, shuffle_buffer=10)
    loader, pids = S.StreamLoader(ds, num_workers=2), set()

    def keys(batches):
        pids.update(pid for b in batches for pid in b[:, 1].tolist())
        return [b[:, 0].tolist() for b in batches]

    loader.set_epoch(0)
    assert keys(list(loader)) == epoch_batches(stream(uneven, rank=1), 0)
    loader.set_epoch(1)
    first = []
    for b in loader:
        first.append(b)
        if len(first) == 3:
            break
    whole = epoch_batches(stream(uneven, rank=1), 1)
    assert keys(first) == whole[:3]
    assert keys(list(loader.start_at(5))) == whole[5:]
    loader.set_epoch(2)
    assert keys(list(loader)) == epoch_batches(stream(uneven, rank=1), 2)
    assert len(pids) == 2 and os.getpid() not in pids, "the same two workers served every pass"


def test_resampled_mode_draws_fixed_epochs_and_resumes_exactly(uneven):
    loaders = [stream(uneven, rank=r, resampled_batches=10) for r in (0, 1)]
    runs = [epoch_batches(lo, 3) for lo in loaders]
    assert [len(r) for r in runs] == [10, 10]
    assert epoch_batches(stream(uneven, rank=0, resampled_batches=10), 3, start=5) == runs[0][5:]
    assert epoch_batches(loaders[0], 4) != runs[0]


def test_zipped_streams_pair_batches_and_resume_together(uneven):
    """Adaptation's two streams: batch i of each, paired; the shorter one sets the length; a resumed pass
    continues both at the same batch."""
    def zipped():
        a = stream(uneven, rank=0, world=1, batch=8, workers=0)
        b = S.StreamLoader(S.ShardStream(S.load_index(str(uneven / "train.json")), key_of,
                                         lambda xs: (torch.tensor(xs), torch.tensor(xs)), 8, seed=99, rank=0, world=1))
        a.dataset.collate_fn = lambda xs: (torch.tensor(xs), torch.tensor(xs))
        return S.ZippedStreams(a, b)

    z = zipped()
    z.set_epoch(2)
    whole = [((xa.tolist(), xb.tolist()), y.tolist()) for (xa, xb), y in z]
    assert len(whole) == len(z) == 27 and all(xa == y for (xa, _), y in whole)
    assert any(xa != xb for (xa, xb), _ in whole), "two streams, two orders"
    z2 = zipped()
    z2.set_epoch(2)
    assert [((xa.tolist(), xb.tolist()), y.tolist()) for (xa, xb), y in z2.start_at(11)] == whole[11:]


def test_remainder_is_dropped_not_repeated(uneven, tmp_path):
    index = S.load_index(str(uneven / "train.json"))
    index.shards[-1] = S.Shard(index.shards[-1].url, 28)  # 215 samples: 26 batches of 4 per rank, 7 left over
    (tmp_path / "idx.json").write_text(json.dumps({"shardlist": [{"url": s.url, "nsamples": s.nsamples}
                                                                 for s in index.shards]}))
    keys = []
    for r in (0, 1):
        ds = S.ShardStream(S.load_index(str(tmp_path / "idx.json")), key_of, keys_collate, 4, seed=7, rank=r, world=2)
        keys += [k for b in S.StreamLoader(ds) for k in b.tolist()]
    assert len(keys) == len(set(keys)) == 208


@dataclasses.dataclass
class ToyConfig:
    lr: float = 0.01


def test_stage_resumes_a_stream_exactly(uneven, tmp_path):
    """The engine's resume (stop after 9 steps, then --resume latest) continues the stream with the very
    next batch: the batches trained on, and the weights, equal an uninterrupted run's."""
    from helpers import reset_accelerate

    from visrep.engine import Run, RunConfig
    from visrep.engine.config import OptimConfig
    from visrep.engine.optim import build_optimizer

    def go(out, stop=None, resume=None):
        seen, state = [], None
        with Run(ToyConfig(), "toy", str(out), 0, RunConfig(progress=False, stop_after_steps=stop, num_workers=2),
                 resume=resume) as run:
            torch.manual_seed(0)
            model = torch.nn.Linear(1, 1)
            opt = build_optimizer(model, OptimConfig(lr=0.01, weight_decay=0.0))
            model, opt, loader = run.prepare(model, opt, stream(uneven, rank=0, world=1, batch=8))
            stage = run.stage("s", model=model, optimizer=opt, train_loader=loader, epochs=2)
            for _ in stage.epochs():
                for keys in stage.batches():
                    seen += keys.tolist()
                    loss = model(keys.float()[:, None] / 216).pow(2).mean()
                    run.accelerator.backward(loss)
                    stage.optimizer_step(loss)
                stage.epoch_done()
            state = {k: v.clone() for k, v in model.state_dict().items()}
        reset_accelerate()
        return seen, state

    straight, w = go(tmp_path / "a")
    first, _ = go(tmp_path / "b", stop=9)
    rest, w2 = go(tmp_path / "b", resume="latest")
    assert len(straight) == 2 * 216 and first + rest == straight and len(first) == 72
    for k in w:
        assert torch.equal(w[k], w2[k])
    saved = json.loads(next((tmp_path / "b" / "checkpoints" / "s").glob("*/trainer_state.json")).read_text())
    assert saved["data_layout"]["num_workers"] == 2 and saved["data_layout"]["samples"] == 216


def test_two_processes_two_workers_real_ranks(uneven, tmp_path):
    """2 processes (gloo) x 2 loader workers: the ranks split themselves, take equal batch counts (an
    all_reduce per batch would hang otherwise) and together see every key once."""
    out = tmp_path / "keys"
    script = ROOT / "tests" / "shard_ranks_script.py"
    cmd = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(script), str(uneven / "train.json"), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    keys = [json.loads((tmp_path / f"keys{r}.json").read_text()) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 108
    assert sorted(keys[0] + keys[1]) == list(range(216))


def test_samples_decode_to_images_and_name_a_corrupt_one(tmp_path):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (6, 6), (200, 10, 10)).save(buf, format="PNG")
    write_tar(tmp_path / "a.tar", ["10", "11"], {"png": buf.getvalue()})
    write_tar(tmp_path / "b.tar", ["12"], {"png": b"not a png"})
    fn = S.ImageSamples(lambda im: im[:, 0, 0].long(), seed=0)  # a uint8 CHW tensor
    x, y = fn(next(S.iter_shard(str(tmp_path / "a.tar"))), 0, 0)
    assert x.tolist() == [200, 10, 10] and y == 0
    with pytest.raises(Exception, match=r"b\.tar#12\.png"):
        fn(next(S.iter_shard(str(tmp_path / "b.tar"))), 0, 0)
    # on_corrupt=skip: the bad sample is replaced by a readable one, so the batch count stays whole
    index = S.load_index(str(tmp_path / "{a,b}.tar"))
    ds = S.ShardStream(index, fn, lambda b: torch.stack([x for x, _ in b]), 3, seed=0, shuffle=False,
                       on_corrupt="skip")
    (batch,) = list(S.StreamLoader(ds))
    assert batch.shape == (3, 3)


def test_stream_normalises_into_the_batch_what_the_transform_gives(tmp_path):
    """ImageSamples defers the transform's normalisation to collate, which writes each image into its
    place in the batch (shared memory in a worker): the same values as the transform run eagerly on the
    decoded image, bitwise, with 0 and 2 workers; labels and two-view transforms alike."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from visrep.data.images import build_transforms, collate, decode_tensor, seeded
    from visrep.ssl.transforms import SSLAugmentConfig, byol_transforms

    photo = load_sample_images().images[0]
    jpgs = []
    for i in range(6):
        buf = io.BytesIO()
        Image.fromarray(photo[40 * i:40 * i + 90, 50 * i:50 * i + 120]).save(buf, format="JPEG", quality=90)
        jpgs.append(buf.getvalue())
    with tarfile.open(tmp_path / "p.tar", "w") as tar:
        for i, data in enumerate(jpgs):
            for ext, value in (("jpg", data), ("cls", b"1")):
                info = tarfile.TarInfo(f"{i:02d}.{ext}")
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
    tfs = {"one view": build_transforms({}, 40, train=True, hflip=0.5),
           "two views": byol_transforms(SSLAugmentConfig(), 24, (0.5,) * 3, (0.25,) * 3)}
    for name, tf in tfs.items():
        samples = S.ImageSamples(tf, seed=3)
        for workers in (0, 2):
            ds = S.ShardStream(S.load_index(str(tmp_path / "p.tar")), samples, collate, 3, seed=5, shuffle=False)
            batches = list(S.StreamLoader(ds, num_workers=workers))
            assert len(batches) == 2
            for b, (x, y) in enumerate(batches):
                assert y.tolist() == [1, 1, 1]
                views = x if isinstance(x, (tuple, list)) else (x,)
                for j in range(3):
                    with seeded(S.sample_seed(3, 0, 3 * b + j)):
                        want = tf(decode_tensor({"bytes": jpgs[3 * b + j]}))
                    for got, w in zip(views, want if isinstance(want, tuple) else (want,)):
                        assert got.dtype == torch.float32 and torch.equal(got[j], w), (name, workers, b, j)


def test_clear_errors(uneven, tmp_path):
    with pytest.raises(MissingFileError, match="visrep data pack"):
        S.load_index(str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="visrep data index"):
        S.load_index("pipe:cat x-{0..3}.tar")
    (tmp_path / "bad.json").write_text("{\"shards\": []}")
    with pytest.raises(DataError, match="not a shard index"):
        S.load_index(str(tmp_path / "bad.json"))
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"shardlist": [{"url": str(uneven / "s-01.tar"), "nsamples": 9}]}))
    ds = S.ShardStream(S.load_index(str(short)), key_of, keys_collate, 4, seed=0, shuffle=False)
    with pytest.raises(DataError, match="holds 5 samples, but its index says 9"):
        list(S.StreamLoader(ds))
    with pytest.raises(DataError, match="fewer than one batch"):
        S.ShardStream(S.load_index(str(short)), key_of, keys_collate, 64, seed=0)


def test_pack_index_inspect_roundtrip(tmp_path, capsys, monkeypatch):
    """`visrep data pack` of an image folder (photos of scikit-learn, JPEG bytes kept as they are),
    then `index` and `inspect`; the packed splits equal the in-memory source's."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from visrep.data import DataConfig, load_splits

    root = tmp_path / "photos"
    for c, photo in enumerate(load_sample_images().images):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(10):
            patch = photo[40 * i:40 * i + 48, 60 * i:60 * i + 48]
            Image.fromarray(np.ascontiguousarray(patch)).save(root / f"class{c}" / f"{i}.jpg", quality=90)
    out = tmp_path / "packed"

    def cli(*argv):
        from visrep.cli import main

        capsys.readouterr()
        code = main(["data", *argv])
        return code, capsys.readouterr()

    code, _ = cli("pack", str(root), str(out), "--shard-size", "4")
    assert code == 0
    ref = load_splits(DataConfig(source="imagefolder", data_dir=str(root)))
    for split in ("train", "val", "test"):
        idx = S.load_index(str(out / f"{split}.json"))
        got = S.read_split(idx)
        assert idx.classes == ["class0", "class1"] and idx.total == len(ref[split])
        # the same (image bytes, label) pairs as the in-memory split, written in a shuffled order
        packed = [(v["bytes"], y) for v, y in zip(got["image"], got["label"])]
        want = [(open(v["path"], "rb").read(), y) for v, y in zip(ref[split]["image"], ref[split]["label"])]
        assert sorted(packed) == sorted(want)
        if split == "train":
            assert [y for _, y in packed] != sorted(y for _, y in packed), "not written class by class"
    code, _ = cli("index", str(out / "train-{000000..000003}.tar"), str(tmp_path / "again.json"))
    assert code == 0
    assert S.load_index(str(tmp_path / "again.json")).counts == S.load_index(str(out / "train.json")).counts
    code, o = cli("inspect", str(out / "train.json"), "--grid", str(tmp_path / "g.png"))
    assert code == 0 and "2 classes" in o.out and "class1" in o.out, o.out
    assert Image.open(tmp_path / "g.png").size == (8 * 64, 2 * 64)
    code, o = cli("pack", str(root), str(out))
    assert code == 2 and "--overwrite" in o.err and "Traceback" not in o.err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [], "nothing half-written"

    # a Hugging Face dataset read as a stream (here the same folder through datasets' imagefolder builder,
    # offline), written in one pass; it has only a train split, so val and test are held out by position
    import datasets

    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda name, conf=None, streaming=False: real(
        "imagefolder", data_dir=str(root), streaming=streaming))
    code, o = cli("pack", "hf:someone/photos", str(tmp_path / "streamed"), "--streaming", "--val-fraction", "0.2",
                  "--test-fraction", "0.2")
    assert code == 0, o.err
    idx = {s: S.load_index(str(tmp_path / "streamed" / f"{s}.json")) for s in ("train", "val", "test")}
    assert sum(i.total for i in idx.values()) == 20 and min(i.total for i in idx.values()) >= 1
    assert idx["train"].classes == ["class0", "class1"]
    got = {bytes(v["bytes"]) for s in idx.values() for v in S.read_split(s)["image"]}
    assert got == {p.read_bytes() for p in root.rglob("*.jpg")}, "every image once, its bytes unchanged"


# ----------------------------------------------------------------------------------------------
# Recipes on shards written by `visrep data pack`
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The digits packed as classification shards (16 px) and as captioned pairs (8 px), with small
    training splits (180 images)."""
    from visrep.cli import main

    d = tmp_path_factory.mktemp("packed")
    small = ["--shard-size", "64", "--val-fraction", "0.45", "--test-fraction", "0.45"]
    assert main(["data", "pack", "digits", str(d / "cls"), "--image-size", "16", *small]) == 0
    assert main(["data", "pack", "digits", str(d / "pairs"), "--pairs", "--image-size", "8", *small]) == 0
    assert main(["data", "pack", "digits_m", str(d / "dm"), "--image-size", "16", *small]) == 0
    return d


@pytest.mark.slow
def test_distill_on_shards_in_2_processes_stops_before_a_weaker_teacher(tmp_path):
    """2 processes stream the packed digits (DDP: unequal batch counts would hang); the teacher is left
    untrained (lr 1e-6: chance, 0.1), so the recipe stops after the student from scratch with one clear
    message, said once (the guard itself: test_distill_recipe.py::test_check_teacher_...)."""
    from helpers import run_recipe, write_preset
    from visrep.cli import main

    assert main(["data", "pack", "digits", str(tmp_path / "cls"), "--image-size", "16", "--shard-size", "200"]) == 0
    preset = write_preset(tmp_path / "p.yaml", {
        "data": {"source": "shards", "data_dir": str(tmp_path / "cls"), "image_size": 16, "hflip": 0.0},
        "teacher": {"model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
                    "train_epochs": 1, "optim": {"lr": 1.0e-6}},
        "student": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.5}},
        "optim": {"lr": 0.05}, "schedule": {"epochs": 2, "warmup_steps": 5},
        "run": {"batch_size": 32, "eval_batch_size": 256, "progress": False, "log_every": 1, "num_workers": 1}})
    out = tmp_path / "run"
    p = run_recipe("distill", ["--config", str(preset), "--output-dir", str(out)], processes=2, check=False)
    assert p.returncode != 0 and "validation accuracy: teacher 0.1" in p.stdout, p.stdout[-2000:] + p.stderr[-3000:]
    assert p.stderr.count("visrep: error: the teacher (resnet20) reaches validation accuracy") == 1  # rank 0 says it
    assert "--kd.allow-weaker-teacher True" in p.stderr
    state = json.loads(next((out / "checkpoints" / "scratch").glob("*/trainer_state.json")).read_text())
    assert state["total_steps"] == 2 * 19 and state["data_layout"]["world"] == 2  # 1257 // (2 x 32) = 19 per epoch
    assert not (out / "models" / "kd").exists() and (out / "models" / "scratch").exists()


RUN = {"batch_size": 32, "eval_batch_size": 256, "progress": False, "log_every": 1}


def train_in_process(recipe, preset, tmp_path, capsys, *args):
    """``recipe`` with ``preset`` (one epoch, batch 32) in this process (no interpreter start-up): its results."""
    from helpers import results, run_in_process, write_preset

    preset = {"schedule": {"epochs": 1, "warmup_epochs": 0.2}, "run": RUN, **preset}
    out = tmp_path / recipe
    p = run_in_process(recipe, ["--config", str(write_preset(tmp_path / f"{recipe}.yaml", preset)),
                                "--output-dir", str(out), *args], capsys)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return results(out)


@pytest.mark.slow
def test_byol_and_clip_train_on_packed_shards(packed, tmp_path, capsys):
    r = train_in_process("byol", {
        "data": {"source": "shards", "data_dir": str(packed / "cls"), "image_size": 16, "hflip": 0.0},
        "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
        "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32},
        "eval": {"knn_k": 5, "linear_epochs": 2}}, tmp_path, capsys)
    assert 0.0 < r["knn_acc"] <= 1.0
    r = train_in_process("clip", {
        "data": {"source": "shards", "data_dir": str(packed / "pairs"), "image_size": 8, "hflip": 0.0},
        "model": {"image": {"source": "zoo", "name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
                  "text": {"source": "small", "context_length": 12, "width": 32, "layers": 1, "heads": 2},
                  "embed_dim": 16}}, tmp_path, capsys)
    assert r["chance_acc"] == 0.1 and "zero_shot_acc" in r  # class names and prompts came from the index


@pytest.mark.slow
def test_adapt_and_finetune_train_on_packed_shards(packed, tmp_path, capsys):
    """Adaptation pairs two streams batch by batch (digits -> Digits-M shards, CORAL); fine-tuning streams
    its target (Digits-M shards) after a source stage on the in-memory digits."""
    small = {"model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}}}
    r = train_in_process("adapt", {
        "source": {"source": "shards", "data_dir": str(packed / "cls"), "image_size": 16, "hflip": 0.0},
        "target": {"source": "shards", "data_dir": str(packed / "dm"), "image_size": 16, "hflip": 0.0},
        "target_domain": "config", **small, "adapt": {"bottleneck_dim": 16, "coral_weight": 10.0}},
        tmp_path, capsys, "--method", "coral")
    assert 0.0 <= r["target_acc"] <= 1.0
    state = json.loads(next((tmp_path / "adapt" / "checkpoints" / "adapt").glob("*/trainer_state.json")).read_text())
    assert state["total_steps"] == 180 // 32 and set(state["data_layout"]) == {"first", "second"}
    r = train_in_process("finetune", {
        "init": {"source": "train", **small, "train_epochs": 1},
        "source_data": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.1},
        "data": {"source": "shards", "data_dir": str(packed / "dm"), "image_size": 16, "hflip": 0.0},
        "finetune": {"strategy": "full"}, "compare_scratch": False}, tmp_path, capsys)
    assert r["train_labels"] == S.load_index(str(packed / "dm" / "train.json")).total and 0.0 <= r["target_acc"] <= 1.0


# ---------------------------------------------------------------------------------------------- Hugging Face, streamed
HF_SPLITS = {"train": [(0, 230), (230, 300)], "validation": [(300, 400)], "test": [(400, 500)]}


@pytest.fixture(scope="module")
def hf_parquet(tmp_path_factory):
    """A local Hugging Face dataset as the Hub stores one: parquet data files per split (train in two
    uneven files of 64-row groups), a ClassLabel with names, PNG bytes."""
    import datasets
    from PIL import Image

    from visrep.data.sources import digits_arrays

    root = tmp_path_factory.mktemp("hf") / "digits_parquet"
    (root / "data").mkdir(parents=True)
    images, labels = digits_arrays(16, 3)

    def png(a):
        b = io.BytesIO()
        Image.fromarray(a).save(b, format="PNG")
        return b.getvalue()

    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[f"d{i}" for i in range(10)])})
    for split, parts in HF_SPLITS.items():
        for i, (lo, hi) in enumerate(parts):
            rows = {"image": [{"bytes": png(a), "path": f"{j}.png"} for j, a in zip(range(lo, hi), images[lo:hi])],
                    "label": labels[lo:hi].tolist()}
            datasets.Dataset.from_dict(rows, features=feats).to_parquet(
                str(root / "data" / f"{split}-{i:05d}-of-{len(parts):05d}.parquet"), batch_size=64)
    return root


def test_a_streamed_hf_dataset_is_its_parquet_files(hf_parquet):
    """data.source hf with streaming: the parquet files are the shards (row counts from their footers,
    class names from the ClassLabel); a slice reads only its row groups and equals the same rows of a
    whole read; 2 ranks x 2 workers see every row once in equal batches, and a resumed pass continues."""
    from visrep.data.sources import DataConfig

    cfg = DataConfig(source="hf", name=str(hf_parquet), streaming=True)
    assert cfg.streamed
    index = S.split_index(cfg, "train")
    assert index.counts == [230, 70] and index.classes == [f"d{i}" for i in range(10)]
    url = index.shards[0].url
    whole = list(S.iter_parquet(url, index.columns))
    assert len(whole) == 230 and set(whole[0]) == {"__key__", "__url__", "png", "cls"}
    for lo, hi in ((0, 5), (63, 65), (100, 230), (129, 192)):  # inside, across and on row-group edges
        assert list(S.iter_parquet(url, index.columns, lo, hi)) == whole[lo:hi], (lo, hi)

    def loader(rank, workers=2):
        ds = S.ShardStream(index, lambda s, o, e: (s["__url__"][-20:], int(s["__key__"])), lambda b: b, 8,
                           seed=3, rank=rank, world=2, shuffle_buffer=16)
        return S.StreamLoader(ds, num_workers=workers)

    per_rank = []
    for r in (0, 1):
        lo = loader(r)
        lo.set_epoch(1)
        per_rank.append([b for b in lo])
    assert [len(b) for b in per_rank] == [18, 18]  # 300 rows // (2 x 8)
    seen = [tuple(k) for batches in per_rank for b in batches for k in b]  # (file, row)
    assert len(seen) == len(set(seen)) == 288
    resumed = loader(1, workers=2)
    resumed.set_epoch(1)
    assert list(resumed.start_at(5)) == per_rank[1][5:]
    ev, _ = S.eval_splits(cfg)
    assert (len(ev["val"]), len(ev["test"])) == (100, 100) and ev["val"].features["label"].names[3] == "d3"
    with pytest.raises(DataError, match="has no split 'valid'.*set data.train_split"):
        S.split_index(dataclasses.replace(cfg, val_split="valid"), "val")
    with pytest.raises(DataError, match="no column 'img'.*data.image_column"):
        S.split_index(dataclasses.replace(cfg, image_column="img"), "train")


@pytest.mark.slow
def test_distill_streams_a_hf_dataset_and_resumes_exactly(hf_parquet, tmp_path, capsys):
    """The distillation recipe trains on a streamed Hugging Face dataset (no download, no packing), and a
    run stopped mid-stage and resumed ends with the uninterrupted run's weights."""
    from safetensors.torch import load_file

    from helpers import run_in_process, write_preset

    small = {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}}
    preset = write_preset(tmp_path / "p.yaml", {
        "data": {"source": "hf", "name": str(hf_parquet), "streaming": True, "image_size": 16, "hflip": 0.0,
                 "shards": {"shuffle_buffer": 50}},
        "teacher": {"source": "train", "model": small, "train_epochs": 1},
        "student": small, "kd": {"allow_weaker_teacher": True}, "schedule": {"epochs": 1, "warmup_epochs": 0.2},
        "run": {"batch_size": 32, "eval_batch_size": 256, "progress": False, "log_every": 1}})
    for out, extra in (("a", []), ("b", ["--run.stop-after-steps", "12"]), ("b", ["--resume", "latest"])):
        p = run_in_process("distill", ["--config", str(preset), "--output-dir", str(tmp_path / out), *extra], capsys)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    for k in ("teacher_acc", "student_scratch_acc", "student_kd_acc", "student_kd_val_acc"):  # test split: 100 rows
        assert r[k] == rb[k] and abs(r[k] * 100 - round(r[k] * 100)) < 1e-9, k
    state = json.loads(next((tmp_path / "b" / "checkpoints" / "scratch").glob("*/trainer_state.json")).read_text())
    assert state["total_steps"] == 9 and state["data_layout"]["samples"] == 300  # 300 rows // 32 a stage
    for stage in ("teacher", "scratch", "kd"):  # the stop (12 steps) fell inside the second stage
        wa, wb = (load_file(str(tmp_path / d / "models" / stage / "model.safetensors")) for d in ("a", "b"))
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=f"{stage}/{k}")
