"""visrep.clip towers, tokenizer, export, zero-shot and retrieval; visrep.data.pairs sources. Offline."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from visrep.clip import (ClipModelConfig, FrozenClipTeacher, ImageTowerConfig, PretrainedUnavailableError,
                         TextTowerConfig, Tokenizer, build_clip_model, fit_context, get_tokenizer, image_data_config,
                         load_clip, resolve_pretrained, retrieval_metrics, zero_shot_accuracy, zero_shot_classifier)
from visrep.data.pairs import (DIGIT_EVAL_TEMPLATES, DIGIT_TRAIN_TEMPLATES, PairsConfig, build_pair_data,
                               load_pair_splits)

TINY_OPEN_CLIP = {"embed_dim": 24, "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8,
                                                   "head_width": 16},
                  "text_cfg": {"context_length": 12, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_tokenizer_works_offline_and_truncates_keeping_the_end_token(monkeypatch):
    import socket

    def no_network(*a, **k):
        raise AssertionError("the tokenizer tried to reach the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    tok = Tokenizer(context_length=8)
    t = tok(["a photo of the number seven", "7"])
    assert t.shape == (2, 8) and t.dtype == torch.long
    assert t[0].tolist()[:3] == [49406, 320, 1125] and t[1].tolist()[:4] == [49406, 278, 49407, 0]
    long = tok(["a very long caption that goes on and on and on"])
    assert long[0, -1].item() == 49407  # truncated, the end token kept
    assert torch.equal(tok(["7"]), t[1:])  # cached captions give the same ids
    assert get_tokenizer(ClipModelConfig()).context_length == 16


def test_pretrained_open_clip_weights_offline_give_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PretrainedUnavailableError, match="laion2b_s34b_b79k") as e:
        resolve_pretrained("ViT-B-32", "laion2b_s34b_b79k")
    assert "local checkpoint file" in str(e.value)
    with pytest.raises(PretrainedUnavailableError, match="known tags"):
        resolve_pretrained("ViT-B-32", "no_such_tag")
    cfg = ClipModelConfig(image=ImageTowerConfig(source="open_clip", name="ViT-B-32", pretrained="laion2b_s34b_b79k"))
    with pytest.raises(PretrainedUnavailableError):
        build_clip_model(cfg)  # fails before building the 150M-parameter model
    with pytest.raises(ValueError, match="Close matches"):
        build_clip_model(ClipModelConfig(image=ImageTowerConfig(source="open_clip", name="ViT-B-33")))


def test_default_model_contract():
    model = build_clip_model(ClipModelConfig())
    tok = get_tokenizer(model)
    out = model(torch.randn(3, 3, 16, 16), tok(["a", "b c", "seven"]))
    assert out["image_features"].shape == out["text_features"].shape == (3, 64)
    torch.testing.assert_close(out["image_features"].norm(dim=1), torch.ones(3))
    assert out["logit_scale"].item() == pytest.approx(1 / 0.07, rel=1e-5) and out["logit_bias"] is None
    assert set(image_data_config(model)) >= {"mean", "std"}


def test_open_clip_towers_from_a_model_config_file(tmp_path):
    path = tmp_path / "visrep-tiny-vit.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    cfg = ClipModelConfig(image=ImageTowerConfig(source="open_clip", name=str(path)),
                          text=TextTowerConfig(source="open_clip", name=str(path)), embed_dim=24)
    model = build_clip_model(cfg, image_size=16)
    assert isinstance(model.image_proj, torch.nn.Identity)  # widths match: the open_clip model stays intact
    tok = get_tokenizer(model)
    assert tok.context_length == 12
    out = model(torch.randn(2, 3, 16, 16), tok(["a photo", "a drawing"]))
    assert out["image_features"].shape == (2, 24)
    assert "logit_scale" in dict(model.named_parameters())
    assert not any(n.startswith("text_tower.model.logit") for n, _ in model.named_parameters())
    out["image_features"].sum().backward()


def test_export_and_load_round_trip(tmp_path):
    from accelerate import Accelerator
    from helpers import reset_accelerate
    from visrep.clip import export_clip

    model = build_clip_model(ClipModelConfig(text=TextTowerConfig(width=32, heads=2, layers=1)))
    try:
        export_clip(Accelerator(cpu=True), model, tmp_path / "m", model.cfg, image_data_config(model),
                    {"image_size": 16})
    finally:
        reset_accelerate()
    again, meta = load_clip(tmp_path / "m")
    assert meta["image_size"] == 16
    x, t = torch.randn(2, 3, 16, 16), get_tokenizer(model)(["one", "two"])
    model.eval(), again.eval()
    torch.testing.assert_close(again(x, t)["image_features"], model(x, t)["image_features"])
    # as a frozen teacher: same features for the same batch, no gradients, eval mode kept
    teacher = FrozenClipTeacher(again, image_data_config(model), meta["data_config"], 16)
    teacher.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())
    torch.testing.assert_close(teacher(x, t)["text_features"], model(x, t)["text_features"])


def test_fit_context():
    t = torch.tensor([[49406, 5, 6, 7, 49407, 0], [49406, 5, 49407, 0, 0, 0]])
    assert fit_context(t, 8).shape == (2, 8)
    short = fit_context(t, 4)
    assert short[0].tolist() == [49406, 5, 6, 49407] and short[1].tolist() == [49406, 5, 49407, 0]


# ----------------------------------------------------------------------------------------------
# Zero-shot and retrieval
# ----------------------------------------------------------------------------------------------
class _FakeText(torch.nn.Module):
    """encode_text maps a prompt's tokens to a fixed vector: lets the ensemble be checked by hand."""

    def __init__(self, table):
        super().__init__()
        self.table = table
        self.w = torch.nn.Parameter(torch.zeros(1))

    def encode_text(self, tokens):
        return torch.stack([self.table[tuple(r.tolist())] for r in tokens])


def test_zero_shot_classifier_normalizes_each_prompt_then_averages_and_renormalizes():
    tok = Tokenizer(context_length=8)
    prompts = {"a {}": None, "the {}": None}
    table = {}
    vecs = {"a cat": torch.tensor([10.0, 0.0]), "the cat": torch.tensor([0.0, 1.0]),
            "a dog": torch.tensor([-1.0, 0.0]), "the dog": torch.tensor([0.0, -3.0])}
    for text, v in vecs.items():
        table[tuple(tok([text])[0].tolist())] = v
    clf = zero_shot_classifier(_FakeText(table), tok, ["cat", "dog"], list(prompts))
    # a plain average of the raw vectors would point almost along x for "cat"
    torch.testing.assert_close(clf[:, 0], F.normalize(torch.tensor([1.0, 1.0]), dim=0))
    torch.testing.assert_close(clf[:, 1], F.normalize(torch.tensor([-1.0, -1.0]), dim=0))
    acc = zero_shot_accuracy(torch.tensor([[1.0, 0.9], [-2.0, -1.0], [1.0, 1.0]]), torch.tensor([0, 1, 1]), clf)
    assert acc["top1"] == pytest.approx(2 / 3) and acc["top5"] == 1.0


def test_retrieval_recall_exact_pairs_and_keys():
    img = torch.eye(4)
    txt = torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])
    r = retrieval_metrics(img, txt, ks=(1, 2, 10))
    assert r["i2t_r1"] == 0.5 and r["t2i_r1"] == 0.5 and r["i2t_r10"] == 1.0
    # images 1 and 2 share a key (same caption / class): swapping their texts is no error
    r = retrieval_metrics(img, txt, keys=torch.tensor([0, 1, 1, 2]), ks=(1,))
    assert r["i2t_r1"] == 1.0 and r["t2i_r1"] == 1.0


def test_retrieval_by_blocks_equals_the_full_matrix():
    """Blocks of queries with their top-k only give the recall of the full N x N similarity argsort."""
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(203, 16, generator=g), torch.randn(203, 16, generator=g)
    txt[:100] += 2 * img[:100]  # some real matches
    keys = torch.randint(0, 60, (203,), generator=g)

    def naive(keys):
        i, t_ = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
        match = keys[:, None] == keys[None, :]
        out = {}
        for name, s in (("i2t", i @ t_.t()), ("t2i", t_ @ i.t())):
            hits = torch.gather(match, 1, s.argsort(dim=1, descending=True))
            out.update({f"{name}_r{k}": hits[:, :k].any(dim=1).float().mean().item() for k in (1, 5, 10)})
        return out

    for k in (None, keys):
        ref = naive(torch.arange(203) if k is None else k)
        for block in (1, 7, 64, 1024):
            assert retrieval_metrics(img, txt, keys=k, block=block) == ref, block
    assert 0 < ref["i2t_r1"] < ref["i2t_r10"] <= 1


# ----------------------------------------------------------------------------------------------
# Pairs data
# ----------------------------------------------------------------------------------------------
DC = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}


def test_digits_pairs_hold_templates_out_and_are_reproducible():
    assert not set(DIGIT_TRAIN_TEMPLATES) & set(DIGIT_EVAL_TEMPLATES)
    tok = Tokenizer(context_length=16)
    data = build_pair_data(PairsConfig(), DC, tok, seed=0, batch_size=32, eval_batch_size=64)
    assert (len(data.train), len(data.val), len(data.test)) == (1257, 270, 270)
    train_caps = {data.train.caption(i, np.random.default_rng(i)) for i in range(300)}
    strip = lambda c: c.split("{")[0]  # noqa: E731
    assert all(any(c.startswith(strip(t)) for t in DIGIT_TRAIN_TEMPLATES) for c in train_caps)
    assert not any(c.startswith(t.split("{")[0]) for c in train_caps for t in DIGIT_EVAL_TEMPLATES if t.split("{")[0])
    assert data.templates == DIGIT_EVAL_TEMPLATES and data.classnames[7] == ["seven", "7"]
    x1, t1, y1, k1 = data.train[5]
    data.train.set_epoch(1)
    x2, _, _, _ = data.train[5]
    data.train.set_epoch(0)
    x3, t3, _, _ = data.train[5]
    assert torch.equal(x1, x3) and torch.equal(t1, t3) and not torch.equal(x1, x2)
    assert k1 == y1  # templated captions are class-level: retrieval keys are the classes


def _write_images(root, n):
    files = []
    for i in range(n):
        f = root / "img" / f"{i}.png"
        f.parent.mkdir(exist_ok=True)
        Image.fromarray((np.random.default_rng(i).random((10, 10, 3)) * 255).astype(np.uint8)).save(f)
        files.append(f"img/{i}.png")
    return files


def test_folder_pairs_from_jsonl_and_csv(tmp_path):
    files = _write_images(tmp_path, 20)
    with open(tmp_path / "captions.jsonl", "w") as f:
        for i, file in enumerate(files):
            row = {"file": file, "captions": [f"picture {i}", f"image {i}"], "label": "odd" if i % 2 else "even"}
            if i >= 16:
                row["split"] = "test"
            f.write(json.dumps(row) + "\n")
    cfg = PairsConfig(source="folder", data_dir=str(tmp_path), label_column="label", image_size=8, val_fraction=0.2,
                      test_fraction=0.2)
    ps = load_pair_splits(cfg)
    assert len(ps.splits["test"]) == 4 and len(ps.splits["train"]) + len(ps.splits["val"]) == 16
    assert ps.classnames == [["even"], ["odd"]]
    data = build_pair_data(cfg, DC, Tokenizer(context_length=8), 0, 4, 8, splits=ps)
    x, tok, y, k = next(iter(data.test_loader))
    assert x.shape == (4, 3, 8, 8) and set(y.tolist()) <= {0, 1} and len(set(k.tolist())) == 4
    assert data.test.caption(0).startswith("picture")

    csv_dir = tmp_path / "csv"
    csv_dir.mkdir()
    files = _write_images(csv_dir, 6)
    (csv_dir / "captions.csv").write_text("file,caption\n" + "".join(f"{f},a photo number {i}\n"
                                                                     for i, f in enumerate(files)))
    ps = load_pair_splits(PairsConfig(source="folder", data_dir=str(csv_dir), val_fraction=0.2, test_fraction=0.2))
    assert sum(len(s) for s in ps.splits.values()) == 6 and ps.classnames is None
    (csv_dir / "captions.csv").write_text("file,caption\nimg/missing.png,x\n")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_pair_splits(PairsConfig(source="folder", data_dir=str(csv_dir)))


def test_hf_pairs_with_caption_lists_and_class_labels(monkeypatch, tmp_path):
    import datasets

    files = _write_images(tmp_path, 12)
    feats = datasets.Features({"jpg": datasets.Image(), "txt": datasets.Sequence(datasets.Value("string")),
                               "cls": datasets.ClassLabel(names=["a", "b", "c"])})
    ds = datasets.Dataset.from_dict({"jpg": [str(tmp_path / f) for f in files],
                                     "txt": [[f"c{i}", f"d{i}"] for i in range(12)], "cls": [i % 3 for i in range(12)]},
                                    features=feats)
    monkeypatch.setattr(datasets, "load_dataset", lambda name, cfg=None: datasets.DatasetDict(train=ds))
    cfg = PairsConfig(source="hf", name="someone/pairs", image_column="jpg", caption_column="txt", label_column="cls",
                      image_size=8, val_fraction=0.25, test_fraction=0.25)
    ps = load_pair_splits(cfg)
    assert ps.classnames == [["a"], ["b"], ["c"]] and sum(len(s) for s in ps.splits.values()) == 12
    assert set(ps.splits["train"].column_names) == {"image", "captions", "label"}
    with pytest.raises(KeyError, match="caption"):
        load_pair_splits(PairsConfig(source="hf", name="x", caption_column="caption"))


def test_config_errors_name_the_key():
    from visrep.engine import ConfigError
    from visrep.engine.config import from_dict, validate

    with pytest.raises(ConfigError, match="eval_templates"):
        validate(from_dict(PairsConfig, {"eval_templates": [DIGIT_TRAIN_TEMPLATES[0]]}))
    with pytest.raises(ConfigError, match="zero_shot_templates"):
        validate(from_dict(PairsConfig, {"zero_shot_templates": ["no placeholder"]}))
    with pytest.raises(ConfigError, match="text.heads"):
        validate(from_dict(ClipModelConfig, {"text": {"width": 30, "heads": 4}}))
