"""Hugging Face ``transformers`` vision models behind the zoo contract: ``create_backbone("hf:REPO")``.

``hf:microsoft/resnet-50``, ``hf:google/vit-base-patch16-224``, ``hf:facebook/convnext-tiny-224``,
``hf:facebook/dinov2-small`` (``@revision`` accepted), or ``hf:/path/to/dir`` -- a folder written by
``save_pretrained``. ``pretrained=True``: ``AutoModel.from_pretrained`` (offline: the HF cache or the
folder only); ``pretrained=False``: the same architecture from its ``config.json``, randomly initialised.
Extra ``kwargs`` override config attributes (``drop_path_rate=0.1``; an unknown key is a ValueError).

The model is the base model (``AutoModel``, no task head) in ``.hf``; on top of it:

* ``forward_features``: ``last_hidden_state`` -- an (N, C, H, W) map (ResNet, RegNet, ConvNeXt) or the
  (N, T, D) tokens after the final norm (ViT, DeiT, DINOv2).
* ``forward_head(pre_logits=True)``: the model's own pooled vector -- ResNet's average pool, ConvNeXt's
  pooled layernorm, the class token for ViT-style models (what their ``*ForImageClassification`` heads
  read; ViT's tanh "pooler" is not built) -- then ``fc``, a new linear head (``num_classes``). With
  ``pretrained=True`` and ``num_classes`` equal to a checkpoint's own labels its classifier is kept.
* ``feature_info``: one level per stage (CNNs) or per transformer layer (ViTs, tokens folded to a map
  of stride ``patch_size``); ``module`` names ``taps.I``, modules that see each hidden state, so
  ``collect_features`` / ``features_only`` and forward hooks work the same for every family.
* ``data_config``: mean, std, input size, interpolation and crop_pct from ``preprocessor_config.json``.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import torch
import torch.nn as nn

from .base import IMAGENET_MEAN, IMAGENET_STD, make_data_config
from .errors import BackboneArgumentError
from .features import nominal_reduction

PREFIX = "hf:"
CNN_TYPES = ("resnet", "regnet", "convnext", "convnextv2")
# ViT-style model types and the tokens before the patch tokens (class, distillation, registers)
TOKEN_TYPES = {"vit": 1, "deit": 2, "dinov2": 1, "dinov2_with_registers": None}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class HFModelUnavailable(RuntimeError):
    """The files of an ``hf:`` model (its ``config.json``) are neither in a local folder nor reachable."""

    user_error = True


def _split(target: str) -> tuple[str, str | None]:
    """(repo id or folder, revision)."""
    if os.path.isdir(target):
        return target, None
    repo, _, rev = target.partition("@")
    return repo, rev or None


def hf_files_cached(target: str) -> bool:
    """Whether ``target`` (a folder or ``REPO[@REV]``) has a config and weights here, with no download."""
    src, rev = _split(target)
    if os.path.isdir(src):
        return (Path(src) / "config.json").is_file()
    from huggingface_hub import try_to_load_from_cache

    def cached(f):
        return isinstance(try_to_load_from_cache(src, f, revision=rev), str)

    return cached("config.json") and any(cached(f) for f in WEIGHT_FILES)


def _load_config(target: str, in_chans: int, pretrained: bool, overrides: dict):
    from transformers import AutoConfig

    src, rev = _split(target)
    try:
        config, unused = AutoConfig.from_pretrained(src, revision=rev, return_unused_kwargs=True, **overrides)
    except OSError as e:
        where = "folder" if os.path.isdir(src) else "Hugging Face repo"
        raise HFModelUnavailable(
            f"hf:{target}: cannot read config.json of {where} '{src}' ({str(e).splitlines()[0]}); offline, the "
            "model must be in the HF cache (download it once with network access, or point HF_HOME at a cache "
            "that has it) or be a folder written by save_pretrained (hf:/path/to/dir).") from None
    kind = config.model_type
    if kind not in CNN_TYPES and kind not in TOKEN_TYPES:
        raise BackboneArgumentError(f"hf:{target}: model type {kind!r} is not supported as a backbone; supported: "
                         f"{', '.join(CNN_TYPES + tuple(TOKEN_TYPES))}.")
    if unused:
        raise BackboneArgumentError(f"hf:{target}: unknown config keys {sorted(unused)} for a {type(config).__name__}; "
                         "extra kwargs of create_backbone('hf:...') set attributes of the model's config.")
    if in_chans != config.num_channels:
        if pretrained:
            raise BackboneArgumentError(f"hf:{target}: the pretrained weights take {config.num_channels} input channels, "
                             f"not in_chans={in_chans}; use pretrained=False to build it for {in_chans}.")
        config.num_channels = in_chans
    return config, src, rev


def _processor_config(src: str, rev: str | None) -> dict:
    from transformers.utils import cached_file

    try:
        path = cached_file(src, "preprocessor_config.json", revision=rev, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
    except OSError:
        path = None
    return json.loads(Path(path).read_text()) if path else {}


def save_hf_files(target: str, out_dir: str | Path, tokenizer: bool = False) -> None:
    """Write what rebuilds ``target`` (a folder or ``REPO[@REV]``) without its weights into ``out_dir``: the
    transformers ``config.json``, the ``preprocessor_config.json`` when there is one and, with ``tokenizer``,
    the tokenizer's files -- so an export that carries them loads with no repo, folder or cache."""
    from transformers import AutoConfig, AutoTokenizer

    src, rev = _split(target)
    try:
        AutoConfig.from_pretrained(src, revision=rev).save_pretrained(out_dir)
        if tokenizer:
            AutoTokenizer.from_pretrained(src, revision=rev).save_pretrained(out_dir)
    except (OSError, ValueError) as e:
        raise HFModelUnavailable(f"cannot copy the config{' and tokenizer' if tokenizer else ''} of '{target}' "
                                 f"into the export ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                                 "the model it was built from must still be readable (HF cache or folder).") from None
    processor = _processor_config(src, rev)
    if processor:
        (Path(out_dir) / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))


def _hw(size) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size, size
    if "height" in size:
        return int(size["height"]), int(size["width"])
    if "shortest_edge" in size:
        return (int(size["shortest_edge"]),) * 2
    return None


def hf_data_config(processor: dict, config) -> dict:
    """The zoo data config from an image processor's settings (``preprocessor_config.json``)."""
    crop = _hw(processor.get("crop_size")) if processor.get("do_center_crop", True) else None
    size = _hw(processor.get("size"))
    image = getattr(config, "image_size", 224)
    hw = crop or size or ((image, image) if isinstance(image, int) else tuple(image))
    crop_pct = processor.get("crop_pct")
    if crop_pct is None:
        crop_pct = min(1.0, crop[0] / size[0]) if crop and size else 1.0
    return make_data_config((config.num_channels, *hw), processor.get("image_mean", IMAGENET_MEAN),
                            processor.get("image_std", IMAGENET_STD),
                            _RESAMPLE.get(processor.get("resample", 3), "bicubic"), float(crop_pct))


class _Tap(nn.Module):
    """Sees one hidden state as a feature map: a hook point for ``feature_info`` (``taps.I``).
    ViT-style tokens (N, T, D) lose their ``prefix`` tokens and fold to (N, D, H/p, W/p) (a view)."""

    def __init__(self, prefix: int = 0):
        super().__init__()
        self.prefix = prefix

    def forward(self, h: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if h.ndim == 3:
            h = h[:, self.prefix:].unflatten(1, grid).permute(0, 3, 1, 2)
        return h


class HFBackbone(nn.Module):
    """A ``transformers`` base vision model (``.hf``) with the zoo contract (module docstring)."""

    _zoo_source = "hf"

    def __init__(self, model: nn.Module, num_classes: int = 0, data_config: dict | None = None):
        super().__init__()
        config = model.config
        kind = config.model_type
        self.hf = model
        self.tokens = kind in TOKEN_TYPES
        if self.tokens:
            prefix = TOKEN_TYPES[kind]
            if prefix is None:  # class token + registers
                prefix = 1 + int(config.num_register_tokens)
            self.patch_size = int(config.patch_size)
            self.num_features = int(config.hidden_size)
            n = int(config.num_hidden_layers)
            self.taps = nn.ModuleList(_Tap(prefix) for _ in range(n))
            self.feature_info = [{"num_chs": self.num_features, "reduction": self.patch_size, "module": f"taps.{i}"}
                                 for i in range(n)]
        else:
            self.num_features = int(config.hidden_sizes[-1])
            self.taps = nn.ModuleList(_Tap() for _ in config.hidden_sizes)
            self.feature_info = self._probe_feature_info()
        self._forward_kw = ({"interpolate_pos_encoding": True}
                            if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters else {})
        self.data_config = data_config or hf_data_config({}, config)
        self.reset_classifier(num_classes)

    @torch.no_grad()
    def _probe_feature_info(self, size: int = 64) -> list[dict]:
        was = self.hf.training
        self.hf.eval()
        try:
            hs = self.hf(pixel_values=torch.zeros(1, self.hf.config.num_channels, size, size),
                            output_hidden_states=True).hidden_states[1:]
        finally:
            self.hf.train(was)
        return [{"num_chs": int(h.shape[1]), "reduction": nominal_reduction(size / h.shape[-1]), "module": f"taps.{i}"}
                for i, h in enumerate(hs)]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``last_hidden_state``; the hidden states go through ``taps`` only when someone hooks them."""
        tapped = any(t._forward_hooks for t in self.taps)
        out = self.hf(pixel_values=x, output_hidden_states=tapped or None, **self._forward_kw)
        if tapped:
            grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size) if self.tokens else None
            for tap, h in zip(self.taps, out.hidden_states[1:]):
                tap(h, grid)
        return out.last_hidden_state

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled vector the model's own classification head reads."""
        if self.tokens:
            return x[:, 0]
        norm = getattr(self.hf, "layernorm", None)
        if isinstance(norm, nn.Module):  # ConvNeXt: layernorm of the spatial mean
            return norm(x.mean([-2, -1]))
        return self.hf.pooler(x).flatten(1)  # ResNet / RegNet: AdaptiveAvgPool2d

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pool(x)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        self.num_classes = int(num_classes)
        self.fc = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if not getattr(self.hf, "supports_gradient_checkpointing", False):
            raise ValueError(f"{type(self.hf).__name__} has no gradient checkpointing; set grad_checkpointing false")
        if enable:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.hf.gradient_checkpointing_disable()

    def prune_for_features(self, keep_modules: list[str]) -> None:
        """``features_only``: drop the head, the final norm and the stages/layers after the last kept tap."""
        self.fc = nn.Identity()
        if isinstance(getattr(self.hf, "layernorm", None), nn.Module):
            self.hf.layernorm = nn.Identity()
        last = max(int(m.split(".")[1]) for m in keep_modules)
        n = len(self.taps)
        blocks = next((m for m in self.hf.modules() if isinstance(m, nn.ModuleList) and len(m) == n), None)
        if blocks is not None:  # ResNet/ConvNeXt encoder.stages, ViT layers, DINOv2 encoder.layer
            del blocks[last + 1:]


def base_model_kwargs(config) -> dict:
    """Keyword arguments of ``AutoModel`` for ``config``: no pooling layer where the class has the choice."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    cls = MODEL_MAPPING[type(config)]
    # ViT/DeiT build a tanh "pooler" that no classification head uses: unused parameters (DDP) otherwise
    return {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls.__init__).parameters else {}


def _checkpoint_head(src, rev, config, num_classes, width):
    """The classifier of an ``*ForImageClassification`` checkpoint with ``num_classes`` labels reading the
    pooled vector, and its base model; else None."""
    if not num_classes or num_classes != config.num_labels or not any(
            a.endswith("ForImageClassification") for a in (config.architectures or [])):
        return None
    from transformers import AutoModelForImageClassification

    full = AutoModelForImageClassification.from_pretrained(src, revision=rev, config=config)
    linear = [m for m in full.classifier.modules() if isinstance(m, nn.Linear)] if hasattr(full, "classifier") else []
    if len(linear) != 1 or linear[0].in_features != width:  # e.g. DINOv2's head reads [class, mean patch]
        return None
    return getattr(full, full.base_model_prefix), linear[0]


def create_hf_backbone(target: str, pretrained: bool = False, num_classes: int = 0, in_chans: int = 3,
                       small_input: bool = False, **kwargs) -> HFBackbone:
    """``create_backbone("hf:" + target)``: see the module docstring."""
    if small_input:
        raise BackboneArgumentError(f"hf:{target}: small_input is not defined for transformers models; build a small config "
                         "(e.g. image_size=32, patch_size=4) with save_pretrained and load it as hf:/path/to/dir.")
    from transformers import AutoModel

    config, src, rev = _load_config(target, in_chans, pretrained, kwargs)
    base_kw = base_model_kwargs(config)
    head = None
    if pretrained:
        width = config.hidden_size if config.model_type in TOKEN_TYPES else config.hidden_sizes[-1]
        head = _checkpoint_head(src, rev, config, num_classes, width)
        model = head[0] if head else AutoModel.from_pretrained(src, revision=rev, config=config, **base_kw)
    else:
        model = AutoModel.from_config(config, **base_kw)
    net = HFBackbone(model, num_classes, hf_data_config(_processor_config(src, rev), config))
    if head is not None:
        net.fc = head[1]
    net.hf_source = target
    return net
