"""Inception-v3's auxiliary classifier behind the zoo contract.

timm's ``InceptionV3(aux_logits=True)`` builds the auxiliary head (``AuxLogits``, an ``InceptionAux`` on
``Mixed_6e``) but then returns ``(logits, aux)`` from ``forward`` in training -- not the zoo's contract -- and
uses the name ``aux_logits`` for its bool switch. :class:`ZooInceptionV3` keeps timm's modules and weights
(state dict key for key) and runs timm's own ``forward_preaux`` -> ``AuxLogits`` -> ``forward_postaux``, with
``forward`` returning the logits and the auxiliary logits recorded in ``model.aux_logits`` (a 1-tuple, in
training mode only), which the supervised objective (``visrep.engine.supervised``) adds with its
``aux_weight``.

The head is timm's (= torchvision's = the paper's, Fig. 8 / Sec. 4): 5x5/3 average pool, 1x1 conv (128),
5x5 conv (768), fc. It is kept as is rather than made adaptive: its pool and 5x5 conv are sized for the
17x17 ``Mixed_6e`` map of a 299x299 input, which is also what the published ``tv_in1k`` aux weights were
trained on; smaller inputs are one clear error (:data:`AUX_MIN_INPUT`). Paper: Szegedy et al., "Rethinking
the Inception Architecture for Computer Vision", 2015, arXiv:1512.00567 (the auxiliary classifier as a
regulariser).
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import ConvNormAct, get_device_dtype, trunc_normal_
from timm.models.inception_v3 import InceptionAux, InceptionV3

from .errors import BackboneArgumentError

AUX_MIN_MAP = 17
"""The smallest ``Mixed_6e`` map timm's ``InceptionAux`` takes: 5x5/3 pool to 5x5, then a 5x5 conv."""
AUX_MIN_INPUT = 299
"""The smallest input side that gives a 17x17 ``Mixed_6e`` map (298 px gives 16x16)."""


def aux_conv_block(norm_layer="batchnorm2d", norm_eps: float = 1e-3, act_layer="relu", **_):
    """The ``conv_block`` ``InceptionV3.__init__`` builds its layers (and ``InceptionAux``) with."""
    return partial(ConvNormAct, padding=0, norm_layer=norm_layer, act_layer=act_layer,
                   norm_kwargs=dict(eps=norm_eps), act_kwargs=dict(inplace=True))


class ZooInceptionV3(InceptionV3):
    """timm's ``InceptionV3`` whose ``forward`` returns logits and whose auxiliary classifier (``AuxLogits``)
    records its logits in ``self.aux_logits`` (``(aux,)`` in training mode, ``None`` otherwise).
    ``num_classes=0`` (``reset_classifier(0)``, ``features_only``): no auxiliary head; ``reset_classifier(n)``
    builds a fresh one, initialised as timm does."""

    aux_logits: Optional[tuple]  # timm's class annotation is a jit-final bool; here it is the record

    @classmethod
    def adopt(cls, model: InceptionV3, conv_block) -> "ZooInceptionV3":
        """Turn a timm ``InceptionV3`` (built with ``aux_logits=True``) into this class, in place."""
        model.__class__ = cls
        model._aux_conv_block = conv_block
        model.aux_logits = None
        if model.num_classes <= 0:
            model.AuxLogits = None
        return model

    def _new_aux(self, num_classes: int) -> InceptionAux:
        aux = InceptionAux(768, num_classes, conv_block=self._aux_conv_block, **get_device_dtype(self))
        for m in aux.modules():  # InceptionV3.__init__'s init
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                trunc_normal_(m.weight, std=getattr(m, "stddev", 0.1))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        return aux.train(self.training)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        """Both heads to ``num_classes``: a fresh auxiliary head where there was none; where there is one (e.g.
        ImageNet's), its trained convolutions kept and only its classifier replaced when the count changes."""
        super().reset_classifier(num_classes, global_pool)
        if num_classes <= 0:
            self.AuxLogits = None
        elif self.AuxLogits is None:
            self.AuxLogits = self._new_aux(num_classes)
        elif self.AuxLogits.fc.out_features != num_classes:
            fc = self.AuxLogits.fc
            self.AuxLogits.fc = nn.Linear(fc.in_features, num_classes, device=fc.weight.device, dtype=fc.weight.dtype)
            trunc_normal_(self.AuxLogits.fc.weight, std=0.001)  # InceptionAux's fc.stddev, as timm initialises it
            nn.init.zeros_(self.AuxLogits.fc.bias)

    def prune_intermediate_layers(self, *args, **kwargs):
        try:
            return super().prune_intermediate_layers(*args, **kwargs)
        finally:
            self.aux_logits = None  # timm sets its bool to False

    def run_aux(self, x: torch.Tensor) -> torch.Tensor:
        """``AuxLogits`` on the ``Mixed_6e`` map ``x``; a map under 17x17 is one clear error."""
        h, w = x.shape[-2:]
        if h < AUX_MIN_MAP or w < AUX_MIN_MAP:
            raise BackboneArgumentError(
                f"Inception-v3's auxiliary classifier needs an input of at least {AUX_MIN_INPUT}x{AUX_MIN_INPUT} "
                f"px (a {AUX_MIN_MAP}x{AUX_MIN_MAP} Mixed_6e map for its 5x5/3 pool and 5x5 conv); this input gives "
                f"a {h}x{w} map. Train at {AUX_MIN_INPUT} px (the model's data_config) or build it without "
                f"aux_classifiers.")
        return self.AuxLogits(x)

    def forward_features(self, x):
        x = self.forward_preaux(x)
        record = self.training and self.AuxLogits is not None
        self.aux_logits = (self.run_aux(x),) if record else None
        return self.forward_postaux(x)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))
