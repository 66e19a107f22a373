"""visrep.zoo: every backbone behind one contract.

    from visrep.zoo import create_backbone, list_backbones, get_data_config
    model = create_backbone("resnet18", num_classes=10, small_input=True)

Every model answers: ``num_classes``, ``num_features`` (width of the pooled pre-logits features),
``forward_features(x)`` (unpooled map or tokens), ``forward_head(x, pre_logits=False)``,
``forward(x)``, ``reset_classifier(n)``, ``feature_info`` (``num_chs``, ``reduction``, ``module``
per stage) and ``data_config`` (``mean``, ``std``, ``input_size``, ``interpolation``,
``crop_pct``). Name resolution and default sources: see ``visrep.zoo.registry`` and
``visrep.zoo.models``.
"""
from .errors import CheckpointMismatchError, PretrainedWeightsUnavailable
from .features import FeatureExtractor
from .necks import FPN, UNet
from .registry import (
    BackboneEntry,
    create_backbone,
    get_backbone_entry,
    get_data_config,
    list_backbones,
    load_checkpoint,
    register_backbone,
    register_prefix,
    save_checkpoint,
)

__all__ = [
    "create_backbone", "list_backbones", "get_data_config", "register_backbone", "register_prefix", "get_backbone_entry",
    "BackboneEntry", "PretrainedWeightsUnavailable", "CheckpointMismatchError", "FeatureExtractor",
    "load_checkpoint", "save_checkpoint", "FPN", "UNet",
]
