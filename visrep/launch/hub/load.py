"""Loading models back from the Hub or a local folder: zoo backbones (also as ``hf-hub:`` names in the
zoo), and whole models of any export kind through the kind registry (no method is imported here)."""
from __future__ import annotations

import json
import os
from typing import Any, Optional

from visrep.engine.export import export_kind, kind_loader, point_into_export, read_model_config
from visrep.launch.hub.transport import CONFIG_NAME, HUB_PREFIX, WEIGHTS_NAME, HubError, _locate
from visrep.zoo import create_backbone, register_prefix
from visrep.zoo.errors import CheckpointMismatchError


def _load_whole_model(repo_id_or_dir, token, revision, cache_dir, kind: str, what: str, refusal: str):
    """What the loaders of whole exported models share: locate the folder, refuse it unless its export is
    of ``kind`` (``refusal`` formatted with ``where`` and the ``kind`` found, then how to load it as a
    backbone), rebuild it with the loader registered for ``kind`` (strict keys: a mismatch is a
    ``HubError`` naming ``what``), remember where it came from."""
    src, folder, where = _locate(repo_id_or_dir, token, revision, cache_dir)
    found = export_kind(json.loads((folder / CONFIG_NAME).read_text()))
    if found != kind:
        raise HubError(refusal.format(where=where, kind=found)
                       + f"; load backbones with visrep.zoo.create_backbone('{HUB_PREFIX}{src}').")
    loader = kind_loader(kind)
    try:
        model, config = loader(folder)
    except RuntimeError as e:  # strict load_state_dict: missing / unexpected keys, wrong shapes
        raise HubError(f"{where}: the weights do not match the {what} its {CONFIG_NAME} describes. {e}") from None
    model.hub_source = src
    return model, config


def load_clip_from_hub(repo_id_or_dir: str | os.PathLike, *, token: Optional[str] = None,
                       revision: Optional[str] = None, cache_dir=None):
    """Rebuild a pushed visrep CLIP model (both towers, projections, logit scale) with
    ``visrep.clip.load_clip`` and load its weights strictly; returns ``(model, config)``. The
    tokenizer follows from the model: ``visrep.clip.get_tokenizer(model)``. Same sources and rules as
    :func:`load_backbone_from_hub` (safetensors only; ``USER/REPO`` or a local folder)."""
    return _load_whole_model(repo_id_or_dir, token, revision, cache_dir, "clip", "CLIP model",
                             "{where} holds a '{kind}' model, not a visrep CLIP model")


def load_adaptation_from_hub(repo_id_or_dir: str | os.PathLike, *, token: Optional[str] = None,
                             revision: Optional[str] = None, cache_dir=None):
    """Rebuild a pushed domain-adaptation model (``recipes/adapt.py``: backbone, bottleneck, classifier
    and discriminator) with ``visrep.transfer.adapt.load_adaptation_model``, weights loaded strictly;
    returns ``(model, config)``. Same sources and rules as :func:`load_backbone_from_hub`."""
    return _load_whole_model(repo_id_or_dir, token, revision, cache_dir, "adaptation", "model",
                             "{where} holds no domain-adaptation model (its %s says kind '{kind}')" % CONFIG_NAME)


def create_from_hub(name: str, num_classes: int = 0, in_chans: int = 3, small_input: bool = False, **kwargs):
    """``visrep.zoo.create_backbone("hf-hub:USER/REPO", ...)``: registered with the zoo (see
    ``visrep.zoo.register_prefix`` and the ``visrep.zoo_prefixes`` entry point). ``num_classes`` 0 keeps
    the pushed head (K different from the saved one: ``reset_classifier(K)``)."""
    extra = dict(kwargs)
    if num_classes:
        extra["num_classes"] = num_classes
    if in_chans != 3:
        extra["in_chans"] = in_chans
    if small_input:
        extra["small_input"] = True
    return load_backbone_from_hub(name, **extra)


def load_backbone_from_hub(repo_id_or_dir: str | os.PathLike, *, token: Optional[str] = None,
                           revision: Optional[str] = None, cache_dir=None, return_config: bool = False,
                           **overrides: Any):
    """Rebuild a pushed backbone with ``visrep.zoo.create_backbone`` and load its weights strictly.

    ``repo_id_or_dir``: ``USER/REPO`` (``hf-hub:`` prefix and ``@revision`` accepted) or a local folder
    (a pushed repo's files, or an export ``RUN_DIR/models/STAGE``). Only ``config.json`` and
    ``model.safetensors`` are read (and, for an ``hf:`` architecture, the transformers config its export
    carries under ``hf/``: the original repo or folder is not needed). ``overrides`` go to
    ``create_backbone`` (``features_only``, ``out_indices``, builder kwargs such as ``drop_rate``);
    ``num_classes=K`` different from the saved head loads the weights and then ``reset_classifier(K)``.
    Returns the model (and the config with ``return_config=True``)."""
    src, folder, where = _locate(repo_id_or_dir, token, revision, cache_dir)
    config = read_model_config(folder)  # carried transformers files (hf_files) pointed into the folder
    vis = point_into_export(config["visrep"], folder) if "visrep" in config else config
    kind = export_kind(vis)
    if kind not in ("backbone", "adaptation") or "architecture" not in vis:
        hint = f" Load it with visrep.launch.hub.load_clip_from_hub('{src}')." if kind == "clip" else ""
        raise HubError(f"{where} holds a '{kind}' model, not a zoo backbone.{hint}")
    if kind == "adaptation":
        raise HubError(f"{where} holds a domain-adaptation model (backbone, bottleneck, classifier, domain "
                       f"discriminator), not a zoo backbone. Load it with "
                       f"visrep.launch.hub.load_adaptation_from_hub('{src}').")

    overrides = dict(overrides)
    for key in ("pretrained", "checkpoint"):
        if overrides.pop(key, None):
            raise ValueError(f"{key}= cannot be combined with loading '{src}' (its weights are the checkpoint)")
    saved_classes = int(vis.get("num_classes", 0) or 0)
    want_classes = overrides.pop("num_classes", None)
    small_input = bool(vis.get("small_input", False))
    if "small_input" in overrides and bool(overrides.pop("small_input")) != small_input:
        raise ValueError(f"{where} was trained with small_input={small_input}; it cannot be loaded otherwise")
    kwargs = dict(vis.get("kwargs") or {})
    input_size = (vis.get("data_config") or {}).get("input_size")
    if input_size and "in_chans" not in kwargs:
        kwargs["in_chans"] = int(input_size[0])
    kwargs.update(overrides)
    try:
        model = create_backbone(vis["architecture"], num_classes=saved_classes, small_input=small_input,
                                checkpoint=str(folder / WEIGHTS_NAME), **kwargs)
    except CheckpointMismatchError as e:
        raise CheckpointMismatchError(
            f"{where}: the weights do not match architecture '{vis['architecture']}' (num_classes={saved_classes}, "
            f"small_input={small_input}, kwargs={kwargs}). {e}") from None
    if want_classes is not None and int(want_classes) != saved_classes:
        target = getattr(model, "model", model)  # a features_only wrapper keeps the backbone in .model
        target.reset_classifier(int(want_classes))
    model.hub_source = src
    return (model, config) if return_config else model


register_prefix(HUB_PREFIX, create_from_hub)
