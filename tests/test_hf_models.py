"""Hugging Face transformers models in visrep: ``hf:`` zoo backbones and ``hf`` CLIP text towers.

Everything offline (``HF_HUB_OFFLINE=1``, tests/conftest.py) on tiny configs saved with
``save_pretrained`` to a temporary folder and loaded as ``hf:<folder>``.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from visrep.zoo import PretrainedWeightsUnavailable, create_backbone  # noqa: E402
from visrep.zoo.features import collect_features  # noqa: E402
from visrep.zoo.hf_models import HFModelUnavailable  # noqa: E402
from visrep.zoo.testing import check_backbone_contract  # noqa: E402

CONFIGS = {
    "vit": lambda: transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, image_size=32, patch_size=8),
    "resnet": lambda: transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1]),
    "convnext": lambda: transformers.ConvNextConfig(hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1]),
    "dinov2": lambda: transformers.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                mlp_ratio=2, image_size=32, patch_size=8),
}
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "the", "number", "digit", "handwritten",
         "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> folder holding a randomly initialised tiny base model (save_pretrained)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for family, make in CONFIGS.items():
        torch.manual_seed(0)
        transformers.AutoModel.from_config(make()).save_pretrained(root / family)
        out[family] = root / family
    return out


def _folded(family: str, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A transformers hidden state as the NCHW map feature_info describes, written out by hand."""
    if h.ndim == 4:
        return h
    n, t, d = h.shape
    gh, gw = x.shape[-2] // 8, x.shape[-1] // 8
    patches = h[:, t - gh * gw:]  # ViT / DINOv2: one class token in front
    return patches.reshape(n, gh, gw, d).permute(0, 3, 1, 2)


@pytest.mark.parametrize("family", list(CONFIGS))
def test_hf_backbone_contract_and_same_outputs_as_transformers(saved, family):
    torch.manual_seed(0)
    model = create_backbone(f"hf:{saved[family]}", pretrained=True, num_classes=3)
    ref = transformers.AutoModel.from_pretrained(saved[family]).eval()
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        maps = collect_features(model, x, range(len(model.feature_info)))
        logits = model(x)
    assert torch.equal(feats, out.last_hidden_state)
    # what each family's *ForImageClassification head reads: the class token (ViT), the pooler output (others)
    want = out.last_hidden_state[:, 0] if family == "vit" else out.pooler_output.flatten(1)
    assert torch.equal(pooled, want)
    assert torch.equal(logits, pooled @ model.fc.weight.T + model.fc.bias)
    # feature_info: one level per stage / layer, the real hidden states folded to maps
    hidden = out.hidden_states[1:]
    assert len(maps) == len(hidden) == len(model.feature_info)
    for info, m, h in zip(model.feature_info, maps, hidden):
        assert torch.equal(m, _folded(family, h, x))
        assert m.shape[1] == info["num_chs"] and 32 // m.shape[-1] == info["reduction"]
    # features_only: the same maps, the head and the layers after the last requested level dropped
    feat = create_backbone(f"hf:{saved[family]}", pretrained=True, features_only=True, out_indices=(0,)).eval()
    with torch.no_grad():
        assert torch.equal(feat(x)[0], maps[0])
    assert sum(p.numel() for p in feat.parameters()) < sum(p.numel() for p in model.parameters())
    check_backbone_contract(model, (3, 32, 32))  # last: a train-mode pass moves BatchNorm statistics


def test_pretrained_loads_the_saved_weights_and_false_builds_from_the_config(saved):
    name = f"hf:{saved['resnet']}"
    want = transformers.AutoModel.from_pretrained(saved["resnet"]).state_dict()
    loaded = create_backbone(name, pretrained=True).hf.state_dict()
    torch.manual_seed(1)
    fresh = create_backbone(name).hf.state_dict()
    assert loaded.keys() == want.keys() == fresh.keys()
    assert all(torch.equal(loaded[k], want[k]) for k in want)
    convs = [k for k in want if k.endswith("convolution.weight")]
    assert convs and not any(torch.equal(fresh[k], want[k]) for k in convs)  # random init, same architecture
    # config overrides and input channels for a model built from its config
    assert create_backbone(name, in_chans=1).hf.config.num_channels == 1
    assert create_backbone(f"hf:{saved['vit']}", hidden_dropout_prob=0.25).hf.config.hidden_dropout_prob == 0.25


def test_a_classification_checkpoint_keeps_its_head_when_the_label_count_matches(tmp_path):
    torch.manual_seed(0)
    cfg = CONFIGS["resnet"]()
    cfg.num_labels = 4
    clf = transformers.ResNetForImageClassification(cfg).eval()
    clf.save_pretrained(tmp_path / "clf")
    x = torch.randn(2, 3, 32, 32)
    same = create_backbone(f"hf:{tmp_path / 'clf'}", pretrained=True, num_classes=4).eval()
    with torch.no_grad():
        # the same weights through two modules: our pooled features + head vs transformers' pooler + classifier
        # (oneDNN may sum in another order from one call to the next, so not bitwise; a head that was not
        # kept would be a fresh random layer, off by ~0.1)
        torch.testing.assert_close(same(x), clf(pixel_values=x).logits, rtol=1e-5, atol=1e-6)
    other = create_backbone(f"hf:{tmp_path / 'clf'}", pretrained=True, num_classes=3)
    assert other.fc.out_features == 3 and torch.equal(other.hf.embedder.embedder.convolution.weight,
                                                      clf.resnet.embedder.embedder.convolution.weight)


def test_data_config_comes_from_the_image_processor(tmp_path, saved):
    import shutil

    shutil.copytree(saved["dinov2"], tmp_path / "m")
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 224, "width": 224}, "do_center_crop": True, "size": {"shortest_edge": 256},
        "resample": 3, "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]}))
    cfg = create_backbone(f"hf:{tmp_path / 'm'}").data_config
    assert cfg == {"input_size": (3, 224, 224), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3),
                   "interpolation": "bicubic", "crop_pct": 224 / 256}
    (tmp_path / "m" / "preprocessor_config.json").write_text(json.dumps({
        "size": 384, "crop_pct": 0.9, "resample": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
    cfg = create_backbone(f"hf:{tmp_path / 'm'}").data_config
    assert cfg["input_size"] == (3, 384, 384) and cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 0.9
    # no processor config: the model's image size, ImageNet statistics
    assert create_backbone(f"hf:{saved['vit']}").data_config["input_size"] == (3, 32, 32)


def test_missing_models_and_bad_arguments_fail_clearly(saved, tmp_path):
    with pytest.raises(PretrainedWeightsUnavailable, match=r"nobody/no-such-model.*offline mode"):
        create_backbone("hf:nobody/no-such-model", pretrained=True)
    with pytest.raises(HFModelUnavailable, match=r"hf:nobody/no-such-model: cannot read config.json .*'nobody/no-such"):
        create_backbone("hf:nobody/no-such-model")
    with pytest.raises(ValueError, match=r"unknown config keys \['no_such_key'\]"):
        create_backbone(f"hf:{saved['vit']}", no_such_key=1)
    with pytest.raises(ValueError, match="small_input is not defined"):
        create_backbone(f"hf:{saved['vit']}", small_input=True)
    with pytest.raises(ValueError, match="take 3 input channels, not in_chans=1"):
        create_backbone(f"hf:{saved['vit']}", pretrained=True, in_chans=1)
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                            vocab_size=len(WORDS)).save_pretrained(tmp_path / "bert")
    with pytest.raises(ValueError, match="model type 'bert' is not supported as a backbone"):
        create_backbone(f"hf:{tmp_path / 'bert'}")


def test_gradient_checkpointing_gives_the_same_gradients(saved):
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        m = create_backbone(f"hf:{saved['vit']}", pretrained=True, num_classes=3, grad_checkpointing=ckpt)
        m.train()
        m(x).square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_export_carries_the_hf_files_and_loads_without_the_source(saved, tmp_path):
    import shutil

    from accelerate import Accelerator

    from visrep.engine.config import BackboneConfig
    from visrep.engine.export import export_model, load_model

    src, exp = tmp_path / "src", tmp_path / "exp"
    shutil.copytree(saved["convnext"], src)
    (src / "preprocessor_config.json").write_text(json.dumps({"size": 48, "image_mean": [0.5] * 3,
                                                              "image_std": [0.25] * 3}))
    name = f"hf:{src}"
    torch.manual_seed(0)
    model = create_backbone(name, num_classes=5, layer_norm_eps=1e-3).eval()
    export_model(Accelerator(cpu=True), model, exp, BackboneConfig(name=name, small_input=False,
                                                                   kwargs={"layer_norm_eps": 1e-3}),
                 5, model.data_config)
    shutil.rmtree(src)  # the export alone rebuilds it, offline
    raw = json.loads((exp / "config.json").read_text())
    assert raw["architecture"] == name and raw["hf_files"] == {"architecture": "hf/architecture"}
    shutil.move(exp, tmp_path / "moved")  # the carried files are found relative to the export
    again, cfg = load_model(tmp_path / "moved")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))
    assert cfg["architecture"] == f"hf:{(tmp_path / 'moved' / 'hf' / 'architecture').resolve()}"
    assert again.hf.config.layer_norm_eps == 1e-3  # the kwargs still apply on top of the carried config
    assert again.data_config == model.data_config and again.data_config["std"] == (0.25,) * 3


# ------------------------------------------------------------------------------------------ CLIP text towers

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT and its WordPiece tokenizer (vocabulary written here) in one save_pretrained folder."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    root = tmp_path_factory.mktemp("bert")
    wordpiece = Tokenizer(models.WordPiece({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                             special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=wordpiece, unk_token="[UNK]", pad_token="[PAD]",
                                         cls_token="[CLS]", sep_token="[SEP]",
                                         mask_token="[MASK]").save_pretrained(root / "m")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(
        vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32), add_pooling_layer=False).save_pretrained(root / "m")
    return root / "m"


def _clip_cfg(text_dir, **text):
    from visrep.clip import ClipModelConfig, ImageTowerConfig, TextTowerConfig

    return ClipModelConfig(image=ImageTowerConfig(name="resnet20", kwargs={"width": 4}),
                           text=TextTowerConfig(source="hf", name=str(text_dir),
                                                **{"pretrained": "yes", "context_length": 10, **text}), embed_dim=8)


def test_clip_with_an_hf_text_tower_trains_and_its_loss_is_the_clip_loss(bert_dir):
    from visrep.clip import build_clip_model, clip_loss, get_tokenizer

    torch.manual_seed(0)
    model = build_clip_model(_clip_cfg(bert_dir), image_size=16)
    tok = get_tokenizer(model)
    captions = ["a photo of the number seven", "a handwritten two", "the digit nine", "a photo of a zero"]
    tokens = tok(captions)
    plain = transformers.AutoTokenizer.from_pretrained(bert_dir)
    assert torch.equal(tokens, plain(captions, padding="max_length", truncation=True, max_length=10,
                                     return_tensors="pt")["input_ids"])
    assert tokens.shape == (4, 10) and model.text_tower.pool == "cls"
    images = torch.randn(4, 3, 16, 16)

    # the text embedding is BERT's [CLS] state (attention mask from the padding), then the projection
    bert = transformers.BertModel.from_pretrained(bert_dir, add_pooling_layer=False).eval()
    model.eval()
    with torch.no_grad():
        cls = bert(input_ids=tokens, attention_mask=(tokens != plain.pad_token_id).long()).last_hidden_state[:, 0]
        assert torch.equal(model.encode_text(tokens), F.normalize(model.text_proj(cls), dim=-1))

    # one training step: the loss is CLIP's symmetric InfoNCE of these embeddings (naive float64 formula)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out = model(images, tokens)
    loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"], gather=False)
    img, txt = out["image_features"].detach().double(), out["text_features"].detach().double()
    logits = out["logit_scale"].detach().double() * img @ txt.T
    naive = 0.5 * sum(-torch.log_softmax(lg, 1).diagonal().mean() for lg in (logits, logits.T))
    assert math.isclose(float(loss), float(naive), rel_tol=1e-5)
    before = {k: v.clone() for k, v in model.text_tower.state_dict().items()}
    loss.backward()
    assert model.text_tower.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    opt.step()
    after = model.text_tower.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_clip_hf_text_export_round_trip_and_config_errors(bert_dir, saved, tmp_path):
    from accelerate import Accelerator

    from visrep.checks import ConfigError
    from visrep.clip import build_clip_model, export_clip, get_tokenizer, image_data_config, load_clip
    from visrep.clip.hf_text import HFText

    import shutil

    from visrep.clip import ImageTowerConfig

    # both towers from transformers folders that are gone when the export is loaded
    shutil.copytree(bert_dir, tmp_path / "bert")
    shutil.copytree(saved["resnet"], tmp_path / "img")
    cfg = _clip_cfg(tmp_path / "bert")
    cfg.image = ImageTowerConfig(name=f"hf:{tmp_path / 'img'}", small_input=False)
    torch.manual_seed(0)
    model = build_clip_model(cfg, image_size=16).eval()
    tok = get_tokenizer(model)
    export_clip(Accelerator(cpu=True), model, tmp_path / "clip", model.cfg, image_data_config(model),
                {"image_size": 16, "in_chans": 3})
    shutil.rmtree(tmp_path / "bert")
    shutil.rmtree(tmp_path / "img")
    again, meta = load_clip(tmp_path / "clip")
    assert meta["hf_files"] == {"model.text.name": "hf/model.text.name", "model.image.name": "hf/model.image.name"}
    captions = ["a photo of the number one", "two"]
    t = get_tokenizer(again)(captions)
    assert torch.equal(t, tok(captions))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(again.eval().encode_text(t), model.encode_text(t))
        assert torch.equal(again.encode_image(x), model.encode_image(x))
    # pretrained null: the config only (random init)
    torch.manual_seed(1)
    fresh = HFText(_clip_cfg(bert_dir, pool="eos", pretrained=None).text)
    fresh_w = fresh.model.embeddings.word_embeddings.weight
    assert fresh.pool == "eos" and not torch.equal(fresh_w, model.text_tower.model.embeddings.word_embeddings.weight)
    cfg = _clip_cfg(bert_dir)
    cfg.text.name = None
    with pytest.raises(ConfigError, match="text.name"):
        cfg.validate("model.")
    with pytest.raises(ValueError, match="context_length=64 exceeds the 32 positions"):
        HFText(_clip_cfg(bert_dir, context_length=64).text)


def test_eos_pooling_is_clip_text_models_pooler_output(bert_dir, tmp_path):
    """A causal CLIPTextModel pools at the end token: the tower's ``eos`` pooling (auto for CLIP text
    models) equals transformers' own ``pooler_output``. The tiny BERT tokenizer's [SEP] is the end token."""
    import shutil

    from visrep.clip.hf_text import HFText, attention_mask

    shutil.copytree(bert_dir, tmp_path / "c")
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "c" / f).unlink()
    sep = WORDS.index("[SEP]")
    torch.manual_seed(0)
    ref = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, eos_token_id=sep, pad_token_id=0, bos_token_id=2)).eval()
    ref.save_pretrained(tmp_path / "c")
    tower = HFText(_clip_cfg(tmp_path / "c", context_length=10).text).eval()
    assert tower.pool == "eos"
    tokens = transformers.AutoTokenizer.from_pretrained(tmp_path / "c")(
        ["a photo of seven", "the handwritten digit three"], padding="max_length", max_length=10,
        return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(tower(tokens), ref(input_ids=tokens).pooler_output)
    # pad == end token (CLIP's tokenizer): the first end token is part of the caption
    ids = torch.tensor([[5, 6, 9, 9, 9], [5, 9, 9, 9, 9]])
    assert attention_mask(ids, 9, 9).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]]
    assert attention_mask(ids, 9, None).tolist() == [[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]


def test_clip_recipe_runs_with_an_hf_text_tower(bert_dir, tmp_path):
    """recipes/clip.py selects the tower from its config (model.text.source: hf); the export reloads."""
    from helpers import run_recipe, write_preset

    from visrep.clip import load_clip
    from visrep.clip.hf_text import HFText

    with pytest.raises(HFModelUnavailable, match="model.text.name='nobody/no-such-text-model'"):
        HFText(_clip_cfg("nobody/no-such-text-model").text)
    preset = write_preset(tmp_path / "hf_clip.yaml", {
        "data": {"source": "digits", "image_size": 8, "hflip": 0.0, "val_fraction": 0.4, "test_fraction": 0.4},
        "model": {"image": {"source": "zoo", "name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
                  "text": {"source": "hf", "name": str(bert_dir), "pretrained": "yes", "context_length": 12},
                  "embed_dim": 16},
        "optim": {"name": "adamw", "lr": 0.003, "weight_decay": 0.1, "betas": [0.9, 0.98]},
        "schedule": {"epochs": 1, "warmup_epochs": 0.5},
        "run": {"batch_size": 64, "eval_batch_size": 256, "progress": False, "log_every": 1},
    })
    run_recipe("clip", ["--config", str(preset), "--output-dir", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0.0 <= results["zero_shot_acc"] <= 1.0 and 0.0 <= results["i2t_r1"] <= 1.0
    model, meta = load_clip(tmp_path / "run" / "models" / "clip")
    assert meta["model"]["text"]["source"] == "hf" and results["text_tower_params"] == sum(
        p.numel() for p in model.text_tower.parameters())


def test_bad_hf_arguments_are_user_errors_without_a_traceback(tmp_path):
    from visrep.errors import is_user_error
    from visrep.zoo import create_backbone

    with pytest.raises(ValueError) as e:
        create_backbone("hf:/nonexistent-but-small-input-checked-first", small_input=True)
    assert is_user_error(e.value) and "small_input is not defined" in str(e.value)
