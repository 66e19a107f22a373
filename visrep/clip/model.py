"""CLIP towers, projections, learnable logit scale; the tokenizer; export and load.

Image tower: any ``visrep.zoo`` backbone (pooled ``num_features``) or the image tower of an
open_clip model config (``open_clip.create_model(name, pretrained=TAG or None)``). Text tower: a
small configurable transformer (open_clip's ``TextTransformer`` class, pooled at the end-of-text
token), the text tower of an open_clip model config, or a Hugging Face ``transformers`` text encoder
(``visrep.clip.hf_text``: BERT, DistilBERT, CLIPTextModel, ... with its own tokenizer). The first two
use open_clip's BPE tokenizer (its vocabulary ships inside the package: no download). Linear projections map each tower to the shared
``embed_dim``; ``forward`` returns L2-normalised features and ``exp(logit_scale)``, as open_clip's
``CLIP.forward`` does.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from visrep.clip.loss import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE
from visrep.engine.config import from_dict, to_dict
from visrep.engine.distributed import parameter_value
from visrep.engine.export import export_kind, read_model_config, register_kind, write_export
from visrep.errors import UserError
from visrep.checks import check
from visrep.distill.teacher import FrozenTeacher
from visrep.zoo import create_backbone, get_data_config

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class PretrainedUnavailableError(UserError, RuntimeError):
    """Pretrained CLIP weights could not be obtained (no network, unknown tag); says what to do."""


@dataclasses.dataclass
class ImageTowerConfig:
    source: Literal["zoo", "open_clip"] = "zoo"
    """zoo: visrep.zoo.create_backbone(name, num_classes=0, ...); open_clip: the image tower of the
    open_clip model config ``name`` (a built-in name such as ViT-B-32, or a path to a JSON config)."""
    name: str = "resnet20"
    pretrained: Optional[str] = None
    """open_clip: a pretrained tag (open_clip.list_pretrained_tags_by_model(name)) or a local
    checkpoint file; zoo: any value loads the zoo's pretrained weights. null: random init."""
    checkpoint: Optional[str] = None
    """zoo: a local .safetensors state dict of the backbone (e.g. another recipe's export)."""
    small_input: bool = True
    image_size: Optional[int] = None
    """open_clip: force this input size (default: data.image_size, set by the recipe)."""
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    grad_checkpointing: bool = False
    """zoo: recompute the tower's activations in the backward (visrep.engine.BackboneConfig)."""


@dataclasses.dataclass
class TextTowerConfig:
    source: Literal["small", "open_clip", "hf"] = "small"
    """small: a transformer configured below; open_clip: the text tower of model config ``name``;
    hf: the transformers text encoder ``name`` (Hub repo id or save_pretrained folder) and its tokenizer."""
    name: Optional[str] = None
    pretrained: Optional[str] = None
    """open_clip: a pretrained tag or local checkpoint file; hf: any value loads the weights of ``name``
    (null: its config only, random init)."""
    context_length: int = 16
    """small, hf: tokens per caption (start and end tokens included); longer captions are truncated."""
    pool: Literal["auto", "cls", "eos"] = "auto"
    """hf: the token whose last hidden state is the caption's vector (visrep.clip.hf_text)."""
    width: int = 128
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0


@dataclasses.dataclass
class ClipModelConfig:
    image: ImageTowerConfig = dataclasses.field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = dataclasses.field(default_factory=TextTowerConfig)
    embed_dim: int = 64
    projection: Literal["auto", "linear", "none"] = "auto"
    """auto: identity for an open_clip tower whose output width already equals embed_dim (keeps a
    pretrained model intact), linear otherwise; none requires matching widths."""
    init_logit_scale: float = INIT_LOGIT_SCALE
    """log of the initial scale: log(1/0.07) (CLIP); log(10) for SigLIP."""
    init_logit_bias: Optional[float] = None
    """A learnable logit bias (SigLIP: -10); null: none (CLIP)."""
    max_logit_scale: float = MAX_LOGIT_SCALE

    def validate(self, prefix: str) -> None:
        check(self.embed_dim >= 1, f"{prefix}embed_dim", self.embed_dim, "an integer >= 1")
        check(0 <= self.init_logit_scale <= self.max_logit_scale, f"{prefix}init_logit_scale",
              self.init_logit_scale, f"a number in [0, max_logit_scale={self.max_logit_scale:.4f}]")
        check(self.text.source != "open_clip" or bool(self.text.name), f"{prefix}text.name", self.text.name,
              "an open_clip model config name when text.source is 'open_clip'")
        check(self.text.source != "hf" or bool(self.text.name), f"{prefix}text.name", self.text.name,
              "a Hugging Face repo id or save_pretrained folder when text.source is 'hf'")
        check(self.text.context_length >= 3, f"{prefix}text.context_length", self.text.context_length,
              "an integer >= 3")
        check(self.text.width % max(1, self.text.heads) == 0, f"{prefix}text.heads", self.text.heads,
              f"a divisor of text.width ({self.text.width})")


# ----------------------------------------------------------------------------------------------
# open_clip models: resolution, pretrained weights with a clear error
# ----------------------------------------------------------------------------------------------
def _open_clip_name(name: str) -> str:
    import open_clip

    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"open_clip model config file '{path}' does not exist.")
        open_clip.add_model_config(path)
        return path.stem
    if name.startswith(("hf-hub:", "local-dir:")) or name in open_clip.list_models():
        return name
    import difflib

    close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
    raise ValueError(f"unknown open_clip model config {name!r}. Close matches: {close or 'none'}; all: "
                     f"open_clip.list_models(). A path to a JSON config (model_cfg form) also works.")


def resolve_pretrained(name: str, tag: str) -> str:
    """A local file holding the weights of open_clip ``name`` / ``tag`` (downloaded to the cache when
    reachable), else :class:`PretrainedUnavailableError` naming the cause and the way out."""
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    if Path(tag).is_file():
        return tag
    cfg = get_pretrained_cfg(name, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise PretrainedUnavailableError(f"open_clip has no pretrained tag {tag!r} for {name!r}; known tags: "
                                         f"{tags or 'none'}. Pass a known tag or a local checkpoint file.")
    try:
        path = download_pretrained(cfg)
    except Exception as e:  # hub offline, no network, auth: all end the same way for the user
        where = cfg.get("hf_hub") or cfg.get("url") or "?"
        raise PretrainedUnavailableError(
            f"cannot load open_clip pretrained weights {name}/{tag} from '{where}' ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). The weights are downloaded on first use: run once "
            f"with network access (and HF_HUB_OFFLINE unset) to fill the cache, or pass the path of a local "
            f"checkpoint file as 'pretrained'.") from None
    if not path:
        raise PretrainedUnavailableError(f"open_clip returned no weights for {name}/{tag}.")
    return path


def create_open_clip(name: str, pretrained: Optional[str] = None, image_size: Optional[int] = None) -> nn.Module:
    import logging

    import open_clip

    name = _open_clip_name(name)
    weights = resolve_pretrained(name, pretrained) if pretrained else None
    kw = {"force_image_size": image_size} if image_size else {}
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(max(level, logging.ERROR))  # open_clip's "no pretrained weights" notice, for this call only
    try:
        return open_clip.create_model(name, pretrained=weights, **kw)
    finally:
        root.setLevel(level)


class OpenClipImage(nn.Module):
    """The image tower of an open_clip model: its ``visual`` module (projection included)."""

    def __init__(self, full: nn.Module):
        super().__init__()
        self.visual = full.visual
        self.num_features = int(getattr(full.visual, "output_dim", 0) or _probe_width(full))
        pc = getattr(full.visual, "preprocess_cfg", None) or {}
        self.data_config = {"mean": tuple(pc.get("mean", OPENAI_MEAN)), "std": tuple(pc.get("std", OPENAI_STD)),
                            "interpolation": pc.get("interpolation", "bicubic"), "crop_pct": 1.0}

    def forward(self, x):
        return self.visual(x)


def _probe_width(full) -> int:
    return int(full.text_projection.shape[1]) if hasattr(full, "text_projection") else 512


class OpenClipText(nn.Module):
    """The text tower of an open_clip model: ``encode_text`` of the model with its image tower
    and logit scale removed."""

    def __init__(self, full: nn.Module):
        super().__init__()
        full.visual = None  # encode_text needs neither the image tower nor the scale
        for attr in ("logit_scale", "logit_bias"):
            if isinstance(getattr(full, attr, None), nn.Parameter):
                delattr(full, attr)
        self.model = full
        cl = getattr(full, "context_length", None) or getattr(getattr(full, "text", None), "context_length", 77)
        self.context_length = int(cl)
        proj = getattr(full, "text_projection", None)
        if isinstance(proj, nn.Linear):
            self.num_features = proj.out_features
        elif proj is not None:
            self.num_features = int(proj.shape[1])
        else:
            self.num_features = int(getattr(getattr(full, "text", None), "output_dim", 512))

    def forward(self, tokens):
        return self.model.encode_text(tokens, normalize=False)


class SelfAttention(nn.Module):
    """Multi-head self-attention holding an ``nn.MultiheadAttention``'s parameters under the same
    state-dict keys (``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``): one packed q/k/v projection,
    then ``F.scaled_dot_product_attention``. It takes the call open_clip's ``ResidualAttentionBlock``
    makes, ``attn(x, x, x, need_weights=False, attn_mask=mask)``, and reads the first input only.

    Why not ``nn.MultiheadAttention`` itself: it uses the packed projection only when ``query is key is
    value``. Under DeepSpeed ZeRO-3 each module input is handed to ``forward`` wrapped by its own
    autograd node (DeepSpeed's backward hooks), so the identity test fails and the attention takes three
    separate projections: equal in exact arithmetic, not in float, so a ZeRO-3 run drifted away from DDP."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        if not (mha.batch_first and mha._qkv_same_embed_dim and mha.in_proj_bias is not None
                and mha.bias_k is None and not mha.add_zero_attn):
            raise ValueError("SelfAttention replaces a batch-first nn.MultiheadAttention with a packed, biased "
                             "input projection and no extra key/value bias only.")
        self.num_heads = mha.num_heads
        self.dropout = mha.dropout
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj

    def forward(self, x: torch.Tensor, key: Optional[torch.Tensor] = None, value: Optional[torch.Tensor] = None,
                need_weights: bool = False, attn_mask: Optional[torch.Tensor] = None):
        if need_weights or any(t is not None and t.shape != x.shape for t in (key, value)):
            raise ValueError("SelfAttention: self-attention only (key and value are the query), no weights returned.")
        b, n, d = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(
            b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d)), None


class SmallText(nn.Module):
    """A small causal text transformer (open_clip's ``TextTransformer``, its attention as
    ``SelfAttention``), pooled at the end-of-text token (the highest token id, as in CLIP)."""

    def __init__(self, cfg: TextTowerConfig, vocab_size: int = 49408):
        super().__init__()
        from open_clip.transformer import TextTransformer

        self.net = TextTransformer(context_length=cfg.context_length, vocab_size=vocab_size, width=cfg.width,
                                   heads=cfg.heads, layers=cfg.layers, mlp_ratio=cfg.mlp_ratio, output_dim=None,
                                   proj_type="none", pool_type="argmax")
        for block in self.net.transformer.resblocks:
            block.attn = SelfAttention(block.attn)
        self.context_length = cfg.context_length
        self.num_features = cfg.width

    def forward(self, tokens):
        return self.net(tokens)


class ClipModel(nn.Module):
    """Two towers, two projections, a learnable ``logit_scale`` (log of the scale; clamped to
    ``max_logit_scale`` after every optimizer step by the recipe) and optionally a ``logit_bias``."""

    def __init__(self, image_tower: nn.Module, text_tower: nn.Module, cfg: ClipModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image_tower = image_tower
        self.text_tower = text_tower
        self.image_proj = _projection(image_tower.num_features, cfg, cfg.image.source == "open_clip", "image")
        self.text_proj = _projection(text_tower.num_features, cfg, cfg.text.source == "open_clip", "text")
        # shape (1,), not 0-dim: DeepSpeed's parameter broadcast cannot take 0-dim tensors over gloo
        self.logit_scale = nn.Parameter(torch.full((1,), float(cfg.init_logit_scale)))
        self.logit_bias = (nn.Parameter(torch.full((1,), float(cfg.init_logit_bias)))
                           if cfg.init_logit_bias is not None else None)
        self.context_length = text_tower.context_length
        zero_key_bias_grads(self)

    def no_weight_decay(self) -> set[str]:
        return {"logit_scale", "logit_bias"}

    @torch.no_grad()
    def logit_scale_value(self) -> torch.Tensor:
        """``exp(logit_scale)`` read outside ``forward``; call on every rank (under ZeRO-3 the parameter is
        gathered for the read: ``visrep.engine.distributed.parameter_value``)."""
        return parameter_value(self.logit_scale).exp()

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.image_proj(self.image_tower(images))
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        f = self.text_proj(self.text_tower(tokens))
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        return {"image_features": self.encode_image(images), "text_features": self.encode_text(tokens),
                "logit_scale": self.logit_scale.exp(),
                "logit_bias": self.logit_bias}


def zero_key_bias_grads(module: nn.Module) -> int:
    """Make the gradient of every attention key bias exactly zero; returns how many were hooked.

    In attention, adding ``b_k`` to every key adds ``q . b_k`` to all logits of a query's row, which
    softmax ignores: the loss does not depend on ``b_k``, and its true gradient is zero. In float it is
    round-off (~1e-10 where q/v biases get ~1e-3), which Adam divides by its own tiny running RMS into
    steps of up to lr in a direction set by round-off: the key bias random-walks, differently for any
    change of summation order (DeepSpeed ZeRO-3's own linear kernel, 1 vs 2 processes) while the model's
    function stays the same. Zeroing that gradient keeps the key bias where it is (zero at init) and
    training reproducible. Acts on the fused ``in_proj_bias`` (q, k, v thirds) of
    ``nn.MultiheadAttention`` and open_clip's ``Attention``; the state dict is unchanged."""
    hooked = 0
    for m in module.modules():
        bias = getattr(m, "in_proj_bias", None)
        if isinstance(bias, nn.Parameter) and bias.requires_grad and bias.ndim == 1 and bias.numel() % 3 == 0:
            bias.register_hook(_without_key_third)
            hooked += 1
    return hooked


def _without_key_third(grad: torch.Tensor) -> torch.Tensor:
    e = grad.shape[0] // 3
    grad = grad.clone()
    grad[e:2 * e] = 0
    return grad


def _projection(width: int, cfg: ClipModelConfig, from_open_clip: bool, which: str) -> nn.Module:
    mode = cfg.projection
    if mode == "auto":
        mode = "none" if from_open_clip and width == cfg.embed_dim else "linear"
    if mode == "none":
        if width != cfg.embed_dim:
            raise ValueError(f"model.projection=none but the {which} tower outputs {width} features and "
                             f"model.embed_dim is {cfg.embed_dim}; set model.embed_dim={width} or use a projection.")
        return nn.Identity()
    proj = nn.Linear(width, cfg.embed_dim, bias=False)
    nn.init.normal_(proj.weight, std=width ** -0.5)
    return proj


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def build_clip_model(cfg: ClipModelConfig, image_size: Optional[int] = None, in_chans: int = 3,
                     load_pretrained: bool = True) -> ClipModel:
    """Build both towers. ``load_pretrained=False`` ignores the pretrained tags (the weights come from
    an export instead)."""
    shared = {}

    def oc(name, pretrained, size):
        key = (name, pretrained if load_pretrained else None, size)
        if key not in shared:
            shared[key] = create_open_clip(name, key[1], size)
            return shared[key]
        import copy

        return copy.deepcopy(shared[key])

    ic = cfg.image
    if ic.source == "zoo":
        image = create_backbone(ic.name, pretrained=bool(ic.pretrained) and load_pretrained, num_classes=0,
                                in_chans=in_chans, checkpoint=ic.checkpoint if load_pretrained else None,
                                small_input=ic.small_input, **ic.kwargs,
                                grad_checkpointing=ic.grad_checkpointing)
    else:
        image = OpenClipImage(oc(ic.name, ic.pretrained, ic.image_size or image_size))
    tc = cfg.text
    if tc.source == "small":
        text = SmallText(tc)
    elif tc.source == "hf":
        from visrep.clip.hf_text import HFText

        text = HFText(tc, load_pretrained)
    else:
        # same model and weights as the image tower: built once
        size = (ic.image_size or image_size) if (ic.source == "open_clip" and ic.name == tc.name) else None
        text = OpenClipText(oc(tc.name, tc.pretrained, size))
    return ClipModel(image, text, cfg)


def image_data_config(model: ClipModel) -> dict:
    """Mean, std, interpolation of the image tower (zoo data config or open_clip's preprocess cfg)."""
    tower = model.image_tower
    if isinstance(tower, OpenClipImage):
        return dict(tower.data_config)

    return dict(get_data_config(tower))


def get_tokenizer(model_or_cfg) -> "Tokenizer":
    cfg = model_or_cfg.cfg if isinstance(model_or_cfg, ClipModel) else model_or_cfg
    if cfg.text.source == "open_clip":
        return Tokenizer(name=cfg.text.name)
    if cfg.text.source == "hf":
        from visrep.clip.hf_text import hf_encoder

        return Tokenizer(cfg.text.context_length, encode=hf_encoder(cfg.text.name, cfg.text.context_length))
    return Tokenizer(context_length=cfg.text.context_length)


class Tokenizer:
    """open_clip's tokenizer: the bundled BPE (``SimpleTokenizer``, offline) for the small tower and
    CLIP configs, the model's own for other open_clip configs, or ``encode`` (an ``hf`` text tower's
    tokenizer: ``visrep.clip.hf_text.hf_encoder``). ``tok(list_of_str) -> LongTensor
    (N, context_length)``; repeated captions are cached."""

    def __init__(self, context_length: int = 77, name: Optional[str] = None, encode=None):
        import open_clip

        if encode is not None:
            self._tok = encode
        elif name is None:
            self._tok = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        else:
            try:
                self._tok = open_clip.get_tokenizer(_open_clip_name(name))
            except OSError as e:
                raise PretrainedUnavailableError(f"the tokenizer of open_clip model {name!r} must be downloaded "
                                                 f"and cannot be ({e}); use a CLIP-BPE model config.") from None
        self.context_length = int(getattr(self._tok, "context_length", context_length) or context_length)
        self._cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            toks = self._tok(missing)
            for t, row in zip(missing, toks):
                if len(self._cache) < 100_000:
                    self._cache[t] = row
                else:
                    return self._tok(list(texts))
        return torch.stack([self._cache[t] for t in texts])

    def decode(self, tokens: torch.Tensor) -> list[str]:
        """(N, context_length) token ids -> the N captions they hold (cut where the text tower's input was
        truncated; no start / end / padding tokens)."""
        hf = getattr(self._tok, "tok", None)  # an hf tower's transformers tokenizer
        if hf is not None:
            return [hf.decode(row, skip_special_tokens=True).strip() for row in tokens.tolist()]
        sot, eot = self._tok.sot_token_id, self._tok.eot_token_id
        rows = [row[1:] if row[:1] == [sot] else row for row in tokens.tolist()]
        texts = [self._tok.decode(row[:row.index(eot)] if eot in row else row).strip() for row in rows]
        return [re.sub(r" ([.,!?;:])", r"\1", t) for t in texts]  # BPE puts a space before punctuation

    def __getstate__(self):
        return {"_tok": self._tok, "context_length": self.context_length, "_cache": {}}


# ----------------------------------------------------------------------------------------------
# Export / load (model.safetensors + config.json, like visrep.engine.export)
# ----------------------------------------------------------------------------------------------
def export_clip(accelerator, model: nn.Module, out_dir, cfg: ClipModelConfig, data_config: dict,
                extra: Optional[dict] = None) -> None:
    """Call on every rank; the main process writes ``model.safetensors`` and ``config.json`` (kind ``clip``).
    An ``hf:`` image tower's config and an ``hf`` text tower's config and tokenizer travel with it."""
    hf = {"model.text.name": True} if cfg.text.source == "hf" else {}
    if cfg.image.source == "zoo" and cfg.image.name.startswith("hf:"):
        hf["model.image.name"] = False
    write_export(accelerator, model, out_dir, "clip", {"model": to_dict(cfg), "data_config": to_dict(data_config),
                                                       **(extra or {})}, hf_names=hf)


def load_clip(path) -> tuple[ClipModel, dict]:
    """Rebuild an exported CLIP model (no download: weights come from the export). Returns (model, config)."""
    path = Path(path)
    cfg_file, weights = path / "config.json", path / "model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"'{path}' is not an exported visrep CLIP model (expected config.json and "
                                f"model.safetensors, e.g. RUN_DIR/models/clip).")
    meta = read_model_config(path)
    if export_kind(meta) != "clip":
        raise ValueError(f"'{path}' holds a {meta.get('kind', 'classifier')!r} export, not a CLIP model.")
    cfg = from_dict(ClipModelConfig, meta["model"])
    model = build_clip_model(cfg, image_size=meta.get("image_size"), in_chans=meta.get("in_chans", 3),
                             load_pretrained=False)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model, meta


__all__ = ["ClipModel", "FrozenClipTeacher", "fit_context", "ClipModelConfig", "ImageTowerConfig", "TextTowerConfig", "Tokenizer", "build_clip_model",
           "create_open_clip", "export_clip", "get_tokenizer", "image_data_config", "load_clip",
           "PretrainedUnavailableError", "resolve_pretrained", "SelfAttention", "zero_key_bias_grads"]


# ----------------------------------------------------------------------------------------------
# A frozen CLIP teacher (distillation)
# ----------------------------------------------------------------------------------------------
def fit_context(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Pad (zeros) or truncate BPE token rows to ``length``; a truncated row keeps its end token last."""
    n = tokens.shape[1]
    if n == length:
        return tokens
    if n < length:
        return F.pad(tokens, (0, length - n))
    eot = tokens.argmax(dim=1)
    out = tokens[:, :length].clone()
    cut = eot >= length
    out[cut, -1] = tokens[cut].gather(1, eot[cut, None]).squeeze(1)
    return out


class FrozenClipTeacher(FrozenTeacher):
    """A CLIP model (ours or open_clip's: anything with ``encode_image``, ``encode_text`` and
    ``logit_scale``) as a :class:`visrep.distill.FrozenTeacher`: frozen in eval mode, seeing the
    student's batch -- images re-normalised from the student's mean/std to its own and resized when its
    input size differs -- with the tokens fitted to its context length. Not wrapped by DDP."""

    def __init__(self, model: nn.Module, student_dc: dict, teacher_dc: dict, image_size: Optional[int] = None):
        super().__init__(model, student_dc["mean"], student_dc["std"], teacher_dc["mean"], teacher_dc["std"],
                         image_size=image_size)
        self.context_length = int(getattr(model, "context_length", 77))

    @torch.no_grad()
    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict:
        m, x = self.model, self.inputs(images.float())
        return {"image_features": F.normalize(m.encode_image(x).float(), dim=-1),
                "text_features": F.normalize(m.encode_text(fit_context(tokens, self.context_length)).float(), dim=-1),
                "logit_scale": m.logit_scale.exp().float()}


register_kind("clip", load_clip)
