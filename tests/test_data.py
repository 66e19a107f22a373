import io
import logging
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from visrep.data import (CorruptImageError, DataConfig, EpochSampler, build_classification_data, digits_arrays,
                         load_splits)

DC = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def make_folder(root, per_class=6, classes=("cat", "dog"), size=12):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_digits_splits_are_stratified_fixed_and_resized():
    d = load_splits(DataConfig(image_size=16))
    sizes = {k: len(v) for k, v in d.items()}
    assert sum(sizes.values()) == 1797 and sizes["test"] == 270 and sizes["val"] == 270
    assert set(d["test"]["label"]) == set(range(10))
    again = load_splits(DataConfig(image_size=16))
    assert d["test"]["label"] == again["test"]["label"]
    imgs, labels = digits_arrays(16)
    assert imgs.shape == (1797, 16, 16, 3) and imgs.dtype == np.uint8 and labels.max() == 9


def test_label_fraction_keeps_a_stratified_subset():
    d = load_splits(DataConfig(label_fraction=0.1))
    assert 120 <= len(d["train"]) <= 130 and set(d["train"]["label"]) == set(range(10))


def test_imagefolder_and_corrupt_file_named(tmp_path, caplog):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "dog" / "broken.png").write_bytes(b"not a png at all")
    cfg = DataConfig(source="imagefolder", data_dir=str(root), image_size=16)
    with pytest.raises(CorruptImageError, match=r"broken\.png.*on_corrupt=skip"):
        build_classification_data(cfg, DC, 0, 4, 4)
    with caplog.at_level(logging.WARNING):
        data = build_classification_data(DataConfig(source="imagefolder", data_dir=str(root), image_size=16,
                                                    on_corrupt="skip"), DC, 0, 4, 4)
    assert "skipped 1 unreadable" in caplog.text and "broken.png" in caplog.text
    assert data.classes == ["cat", "dog"] and len(data.train) + len(data.val) == 12 and len(data.test) == 12
    x, y = next(iter(data.train_loader))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.long


def test_hf_dataset_by_name_with_column_mapping(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 8)):
        ds = datasets.Dataset.from_dict(
            {"img": [Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)) for _ in range(n)],
             "digit": [i % 2 for i in range(n)]},
            features=datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=["even", "odd"])}))
        ds.to_parquet(str(tmp_path / f"{split}.parquet"))
    cfg = DataConfig(source="hf", name=str(tmp_path), image_column="img", label_column="digit", image_size=16)
    d = load_splits(cfg)
    assert {k: len(v) for k, v in d.items()} == {"train": 17, "val": 3, "test": 8}
    assert d["train"].features["label"].names == ["even", "odd"]
    with pytest.raises(KeyError, match="'picture' not found.*img"):
        load_splits(DataConfig(source="hf", name=str(tmp_path), image_column="picture"))


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="class-per-folder"):
        load_splits(DataConfig(source="imagefolder", data_dir=str(tmp_path / "nope")))


def test_order_and_augmentation_are_functions_of_seed_epoch_index():
    cfg = DataConfig(image_size=16, hflip=0.5, augment="strong", label_fraction=0.1)
    a = build_classification_data(cfg, DC, 7, 8, 8)
    b = build_classification_data(cfg, DC, 7, 8, 8)
    for ds in (a, b):
        ds.sampler.set_epoch(3)
        ds.train.set_epoch(3)
    assert list(a.sampler) == list(b.sampler)
    torch.manual_seed(0)
    xa = a.train[5][0]
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(xa, b.train[5][0])
    b.train.set_epoch(4)
    assert not torch.equal(xa, b.train[5][0])
    s = EpochSampler(50, 0)
    s.set_epoch(1)
    first = list(s)
    s.set_epoch(2)
    assert first != list(s) and sorted(first) == list(range(50))


def test_digits_m_is_a_data_source_for_every_recipe():
    """``data.source: digits_m`` gives the Digits-M splits (same images as ``load_digits_m_splits``),
    with the label budget applied like for every other source."""
    from visrep.data import load_splits
    from visrep.data.digits_m import load_digits_m_splits
    from visrep.engine.config import ConfigError, from_dict

    cfg = DataConfig(source="digits_m", image_size=16)
    got, ref = load_splits(cfg), load_digits_m_splits(cfg)
    for split in ("train", "val", "test"):
        assert got[split]["label"] == ref[split]["label"]
        assert [r["bytes"] for r in got[split]["image"][:20]] == [r["bytes"] for r in ref[split]["image"][:20]]
    data = build_classification_data(cfg, {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 16, 16)}, 0, 32, 64)
    x, y = next(iter(data.test_loader))
    assert x.shape == (64, 3, 16, 16) and data.num_classes == 10
    assert float(x.std(dim=(2, 3)).mean()) > 0.1  # coloured backgrounds, not the plain black digits
    budget = load_splits(DataConfig(source="digits_m", image_size=16, label_fraction=0.2))
    assert abs(len(budget["train"]) - 0.2 * len(got["train"])) < 2
    assert from_dict(DataConfig, {"source": "digits_m"}).source == "digits_m"
    with pytest.raises(ConfigError, match="digits_m"):
        from_dict(DataConfig, {"source": "digits-m"})


def test_disk_cache_returns_what_compute_returns_and_survives_damage(tmp_path, monkeypatch):
    from visrep.data.cache import cached_arrays
    from visrep.data.sources import digits_arrays, stratified_split

    calls = []

    def compute():
        calls.append(1)
        return {"a": np.arange(5), "b": np.ones((2, 2), np.uint8)}

    monkeypatch.setenv("VISREP_CACHE", str(tmp_path / "c"))
    first = cached_arrays("t", {"k": 1}, compute)
    again = cached_arrays("t", {"k": 1}, compute)
    other = cached_arrays("t", {"k": 2}, compute)
    assert len(calls) == 2 and all(np.array_equal(first[k], again[k]) for k in first) and other.keys() == first.keys()
    files = sorted((tmp_path / "c").glob("t-*.npz"))
    assert len(files) == 2
    files[0].write_bytes(b"PK\x03\x04 truncated")  # a damaged file is recomputed and replaced
    cached_arrays("t", {"k": 1}, compute), cached_arrays("t", {"k": 2}, compute)
    assert len(calls) == 3
    monkeypatch.setenv("VISREP_CACHE", "off")
    cached_arrays("t", {"k": 1}, compute)
    assert len(calls) == 4
    # cached and computed digits and splits are the same arrays
    imgs, labels = digits_arrays(16)
    monkeypatch.setenv("VISREP_CACHE", str(tmp_path / "d"))
    for _ in range(2):
        i2, l2 = digits_arrays(16)
        assert np.array_equal(imgs, i2) and np.array_equal(labels, l2)
        keep, held = stratified_split(labels, 0.25, 3)
        assert len(held) == 450 and np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(1797))
        counts, sizes = np.bincount(labels[held]), np.bincount(labels)
        assert np.all(np.abs(counts - sizes * 0.25) <= 1)  # stratified: a quarter of every class


def test_persistent_workers_follow_the_epoch():
    """Persistent workers hold their own copy of the dataset and never see ``set_epoch``; the epoch
    reaches them with each index, so their batches equal the in-process loader's, epoch by epoch."""
    from visrep.data import ImageDataset, collate, load_splits, loader_options
    from visrep.data.images import EpochIndex, build_transforms

    cfg = DataConfig(source="digits", image_size=16)
    split = load_splits(cfg)["train"].select(range(24))
    dc = {"mean": (0.5,) * 3, "std": (0.5,) * 3, "input_size": (3, 16, 16), "interpolation": "bilinear",
          "crop_pct": 1.0}
    tf = build_transforms(dc, 16, train=True, hflip=0.5, augment="strong")

    def batches(workers):
        ds, sampler = ImageDataset(split, tf, "RGB", seed=7), EpochSampler(24, 7)
        opts = loader_options(workers, collate)
        assert opts["persistent_workers"] is (workers > 0)
        loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=sampler, **opts)
        out = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            ds.set_epoch(epoch)
            out.append(torch.cat([x for x, _ in loader]))
        return out

    pooled, inline = batches(1), batches(0)
    for a, b in zip(pooled, inline):
        assert torch.equal(a, b)
    assert not torch.equal(inline[0], inline[1])
    assert pickle.loads(pickle.dumps(EpochIndex(5, 2))).epoch == 2


def test_loader_options_for_the_host(monkeypatch):
    from visrep.data import collate, loader_options

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    o = loader_options(-1, collate)
    assert o["num_workers"] == 0 and o["pin_memory"] is False and o["persistent_workers"] is False
    assert loader_options(3, collate)["num_workers"] == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    o = loader_options(-1, collate)
    assert o["num_workers"] == 7 and o["pin_memory"] is True  # 16 CPUs / 2 local processes, less one each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_options(-1, collate)["num_workers"] == 8  # at most 8


def _encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_tensor_decoding_gives_pils_pixels_for_every_kind_of_image(tmp_path, monkeypatch):
    """decode_tensor (torchvision.io, and its PIL fallback) against PIL's convert: the same uint8 values."""
    from sklearn.datasets import load_sample_images

    from visrep.data import images as I

    photo = Image.fromarray(load_sample_images().images[1][100:160, 200:248])
    cases = {"rgb.jpg": _encoded(photo, "JPEG"), "grey.jpg": _encoded(photo.convert("L"), "JPEG"),
             "rgb.png": _encoded(photo, "PNG"), "rgba.png": _encoded(photo.convert("RGBA"), "PNG"),
             "palette.png": _encoded(photo.convert("P"), "PNG"), "grey.bmp": _encoded(photo.convert("L"), "BMP")}
    (tmp_path / "on_disk.jpg").write_bytes(cases["rgb.jpg"])
    values = [{"bytes": b, "path": name} for name, b in cases.items()]
    values.append({"bytes": None, "path": str(tmp_path / "on_disk.jpg")})
    for fallback in (False, True):
        if fallback:
            monkeypatch.setattr(I, "_tensor_decoder", lambda: None)
        for value in values:
            for mode in ("RGB", "L"):
                want = np.asarray(Image.open(io.BytesIO(value["bytes"] or cases["rgb.jpg"])).convert(mode))
                got = I.decode_tensor(value, mode)
                assert got.dtype == torch.uint8 and got.shape[0] == len(mode), (value["path"], mode)
                assert np.array_equal(got.permute(1, 2, 0).squeeze(-1).numpy(), want), (value["path"], mode, fallback)
    with pytest.raises(CorruptImageError, match="'broken.jpg'"):
        I.decode_tensor({"bytes": cases["rgb.jpg"][:300], "path": "broken.jpg"})


def test_scale_normalize_is_todtype_then_normalize():
    from torchvision.transforms import v2 as T

    from visrep.data.images import ScaleNormalize

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = torch.randint(0, 256, (3, 17, 9), dtype=torch.uint8)
    ref = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)])(T.ToImage()(x))
    for inp in (x, T.ToImage()(x), x.permute(0, 2, 1).contiguous().permute(0, 2, 1)):
        out = ScaleNormalize(mean, std)(inp)
        assert type(out) is torch.Tensor and out.dtype == torch.float32 and out.is_contiguous()
        torch.testing.assert_close(out, ref.as_subclass(torch.Tensor), atol=2e-6, rtol=0)
    f = x.float() / 255
    torch.testing.assert_close(ScaleNormalize(mean, std)(f), ref.as_subclass(torch.Tensor), atol=2e-6, rtol=0)
