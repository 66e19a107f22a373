"""Hugging Face ``transformers`` text encoders as CLIP text towers (``model.text.source: hf``).

``model.text.name``: a Hub repo id (``distilbert-base-uncased``, ``openai/clip-vit-base-patch32``: the
text half of a two-tower checkpoint is kept) or a folder written by ``save_pretrained`` holding the
model and its tokenizer. ``AutoModel`` + ``AutoTokenizer``; the captions are padded / truncated to
``model.text.context_length`` tokens, the attention mask follows from the tokenizer's pad token, and
the tower returns one vector per caption (``hidden_size`` wide; ``ClipModel.text_proj`` maps it to
``embed_dim``):

* ``cls``: the first token's last hidden state (BERT-style bidirectional encoders: the ``[CLS]`` summary);
* ``eos``: the last unpadded token's (CLIP's text transformer and other causal models, where only the
  end token has seen the whole caption) -- what ``CLIPTextModel``'s ``pooler_output`` is;
* ``auto``: ``eos`` for CLIP text models and decoders, ``cls`` otherwise.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch import nn

from visrep.checks import ConfigError
from visrep.zoo.hf_models import HFModelUnavailable, base_model_kwargs

_EOS_TYPES = ("clip_text_model", "clip")


def _split(name: str) -> tuple[str, Optional[str]]:
    if os.path.isdir(name):
        return name, None
    repo, _, rev = name.partition("@")
    return repo, rev or None


def _unavailable(name: str, what: str, e: Exception) -> HFModelUnavailable:
    return HFModelUnavailable(
        f"cannot load the {what} of text tower model.text.name={name!r} ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). Offline, it must be in the Hugging Face cache (run once "
        f"with network access and HF_HUB_OFFLINE unset) or be a folder written by save_pretrained.")


def load_hf_tokenizer(name: str):
    """``AutoTokenizer`` of ``name``; a tokenizer without a pad token pads with its end token."""
    from transformers import AutoTokenizer

    src, rev = _split(name)
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=rev)
    except (OSError, ValueError) as e:
        raise _unavailable(name, "tokenizer", e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.sep_token
    return tok


class _Encode:
    """Captions -> (N, context_length) token ids, padded and truncated (picklable for data workers)."""

    def __init__(self, tok, context_length: int):
        self.tok, self.context_length = tok, context_length

    def __call__(self, texts) -> torch.Tensor:
        return self.tok(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                        return_tensors="pt")["input_ids"]


def hf_encoder(name: str, context_length: int) -> _Encode:
    """The encoder :class:`visrep.clip.model.Tokenizer` wraps (with its cache) for an ``hf`` text tower."""
    return _Encode(load_hf_tokenizer(name), int(context_length))


def attention_mask(tokens: torch.Tensor, pad_id: int, eos_id: Optional[int]) -> torch.Tensor:
    """1 on the caption's tokens, 0 on padding. When the pad token is the end token (CLIP, GPT-2), the
    first end token belongs to the caption and the rest are padding."""
    if eos_id is None or pad_id != eos_id:
        return (tokens != pad_id).long()
    is_eos = tokens == eos_id
    seen = is_eos.long().cumsum(1)
    return ((seen == 0) | ((seen == 1) & is_eos)).long()


class HFText(nn.Module):
    """A ``transformers`` text encoder pooled to one vector per caption (see the module docstring)."""

    def __init__(self, cfg, load_pretrained: bool = True):
        """``cfg``: a :class:`visrep.clip.model.TextTowerConfig` (name, pretrained, context_length, pool)."""
        super().__init__()
        from transformers import AutoConfig, AutoModel

        name = cfg.name
        src, rev = _split(name)
        tok = load_hf_tokenizer(name)
        try:
            config = AutoConfig.from_pretrained(src, revision=rev)
            kw = base_model_kwargs(config)  # no BERT pooler: its parameters would get no gradient (DDP)
            if cfg.pretrained and load_pretrained:
                model = AutoModel.from_pretrained(src, revision=rev, config=config, **kw)
            else:
                model = AutoModel.from_config(config, **kw)
        except OSError as e:
            raise _unavailable(name, "model", e) from None
        if hasattr(model, "text_model") and hasattr(model, "vision_model"):  # a two-tower checkpoint (CLIP)
            model = model.text_model
        config = model.config
        limit = getattr(config, "max_position_embeddings", None)
        if limit is not None and cfg.context_length > limit:
            raise ConfigError(f"model.text.context_length={cfg.context_length} exceeds the {limit} positions of "
                             f"{name!r}; set model.text.context_length <= {limit}.")
        self.model = model
        self.pool = cfg.pool if cfg.pool != "auto" else (
            "eos" if config.model_type in _EOS_TYPES or _is_causal(config) else "cls")
        self.pad_id = int(tok.pad_token_id)
        self.eos_id = None if tok.eos_token_id is None else int(tok.eos_token_id)
        self.context_length = int(cfg.context_length)
        self.num_features = int(config.hidden_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mask = attention_mask(tokens, self.pad_id, self.eos_id)
        h = self.model(input_ids=tokens, attention_mask=mask).last_hidden_state
        if self.pool == "cls":
            return h[:, 0]
        last = mask.sum(1) - 1
        return h[torch.arange(h.shape[0], device=h.device), last]


def _is_causal(config) -> bool:
    """A decoder-only (causal) language model, whose first token has seen only itself: pool its last token.
    ``is_decoder`` is False in GPT-2 / Llama configs, so their architecture names are read too."""
    return bool(getattr(config, "is_decoder", False)) or any(
        a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or ()))
