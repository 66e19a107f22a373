"""Classic CNNs written here because neither timm nor torchvision has them as specified:
ZFNet, and GoogLeNet with its two auxiliary classifiers."""
from __future__ import annotations

import torch.nn as nn

from .base import ZooModel, make_data_config
from .blocks import ConvBnAct, InceptionModule, _init_weights
from .features import measure_feature_info


class ZFNet(ZooModel):
    """ZFNet: AlexNet with a 7x7/2 first layer and a 5x5/2 second layer (Fig. 3 of the paper).

    224 -> conv 7x7/2 (96) -> 110 -> max-pool 3/2 -> 55 -> contrast norm -> conv 5x5/2 (256) -> 26
    -> max-pool 3/2 -> 13 -> norm -> conv 3x3 (384, 384, 256) -> max-pool 3/2 -> 6x6x256 -> FC 4096
    -> FC 4096 -> classifier. ``small_input``: 3x3/1 first conv, no first max-pool.
    Paper: Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", 2013, arXiv:1311.2901.
    """

    def __init__(self, num_classes: int = 0, in_chans: int = 3, small_input: bool = False, drop_rate: float = 0.5):
        super().__init__()
        relu = lambda: nn.ReLU(inplace=True)  # noqa: E731
        lrn = lambda: nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)  # noqa: E731
        conv1 = nn.Conv2d(in_chans, 96, 3, 1, 1) if small_input else nn.Conv2d(in_chans, 96, 7, 2, 1)
        pool1 = nn.Identity() if small_input else nn.MaxPool2d(3, 2, padding=1)
        self.stem = nn.Identity()
        self.stages = nn.Sequential(
            nn.Sequential(conv1, relu()),
            nn.Sequential(pool1, lrn(), nn.Conv2d(96, 256, 5, 2, 2 if small_input else 0), relu()),
            nn.Sequential(nn.MaxPool2d(3, 2, padding=1), lrn(),
                          nn.Conv2d(256, 384, 3, 1, 1), relu(), nn.Conv2d(384, 384, 3, 1, 1), relu(),
                          nn.Conv2d(384, 256, 3, 1, 1), relu()),
            nn.Sequential(nn.MaxPool2d(3, 2)),
        )
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(6), nn.Flatten(1))
        self.pre_logits = nn.Sequential(nn.Linear(256 * 36, 4096), relu(), nn.Dropout(drop_rate),
                                        nn.Linear(4096, 4096), relu(), nn.Dropout(drop_rate))
        self.num_features = 4096
        size = 32 if small_input else 224
        self.data_config = make_data_config((in_chans, size, size), crop_pct=1.0 if small_input else 0.875)
        self.feature_info = [dict(num_chs=c, reduction=1, module=f"stages.{i}")
                             for i, c in enumerate((96, 256, 256, 256))]
        self.feature_info = measure_feature_info(self, (in_chans, size, size))
        self._init_head(num_classes)
        _init_weights(self)


class InceptionAux(nn.Module):
    """GoogLeNet auxiliary classifier: avg-pool to 4x4, 1x1 conv (128), FC 1024, dropout 0.7, FC.

    Paper: Szegedy et al., "Going Deeper with Convolutions", 2014, arXiv:1409.4842 (Sec. 5).
    """

    def __init__(self, in_chs: int, num_classes: int, drop_rate: float = 0.7):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.conv = ConvBnAct(in_chs, 128, 1)
        self.fc1 = nn.Linear(128 * 16, 1024)
        self.act = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate)
        self.fc2 = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = self.conv(self.pool(x)).flatten(1)
        return self.fc2(self.drop(self.act(self.fc1(x))))


class _TappedSequential(nn.Sequential):
    """Sequential that keeps the outputs of the layers at ``taps`` when ``record`` is set."""

    def __init__(self, taps, *layers):
        super().__init__(*layers)
        self.taps, self.record, self.tapped = tuple(taps), False, []

    def forward(self, x):
        for i, layer in enumerate(self):
            x = layer(x)
            if self.record and i in self.taps:
                self.tapped.append(x)
        return x


class GoogLeNet(ZooModel):
    """GoogLeNet (Inception v1, Table 1 of the paper), with BatchNorm after each conv.

    Auxiliary classifiers after inception 4a and 4d are used in training only: in train mode each
    forward stores their logits in ``model.aux_logits`` (a tuple ``(aux1, aux2)``; ``None`` in eval
    mode or with ``num_classes=0``), and ``model.forward_train(x)`` returns ``(logits, aux1, aux2)``.
    The paper's loss is ``CE(logits) + 0.3 * (CE(aux1) + CE(aux2))`` (``aux_weight``); see
    :meth:`loss`. ``forward(x)`` always returns the main logits, as every zoo model.
    Paper: Szegedy et al., "Going Deeper with Convolutions", 2014, arXiv:1409.4842.
    """

    aux_weight = 0.3

    def __init__(self, num_classes: int = 0, in_chans: int = 3, small_input: bool = False,
                 aux_classifiers: bool = True, drop_rate: float = 0.4):
        super().__init__()
        pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)  # noqa: E731
        self.stem = nn.Identity()
        self.stages = nn.Sequential(
            nn.Sequential(ConvBnAct(in_chans, 64, 3 if small_input else 7, 1 if small_input else 2)),
            nn.Sequential(nn.Identity() if small_input else pool(), ConvBnAct(64, 64, 1), ConvBnAct(64, 192, 3)),
            nn.Sequential(pool(), InceptionModule(192, 64, 96, 128, 16, 32, 32),
                          InceptionModule(256, 128, 128, 192, 32, 96, 64)),
            _TappedSequential((1, 4), pool(), InceptionModule(480, 192, 96, 208, 16, 48, 64),
                              InceptionModule(512, 160, 112, 224, 24, 64, 64),
                              InceptionModule(512, 128, 128, 256, 24, 64, 64),
                              InceptionModule(512, 112, 144, 288, 32, 64, 64),
                              InceptionModule(528, 256, 160, 320, 32, 128, 128)),
            nn.Sequential(pool(), InceptionModule(832, 256, 160, 320, 32, 128, 128),
                          InceptionModule(832, 384, 192, 384, 48, 128, 128)),
        )
        self.num_features = 1024
        self.use_aux = aux_classifiers
        self.aux_logits = None
        size = 32 if small_input else 224
        self.data_config = make_data_config((in_chans, size, size), crop_pct=1.0 if small_input else 0.875)
        r = (1, 1, 2, 4, 8) if small_input else (2, 4, 8, 16, 32)
        self.feature_info = [dict(num_chs=c, reduction=red, module=f"stages.{i}")
                             for i, (c, red) in enumerate(zip((64, 192, 480, 832, 1024), r))]
        self._init_head(num_classes, drop_rate)
        _init_weights(self)

    def reset_classifier(self, num_classes: int, global_pool=None):
        super().reset_classifier(num_classes)
        use = getattr(self, "use_aux", True) and num_classes > 0
        self.aux1 = InceptionAux(512, num_classes) if use else None
        self.aux2 = InceptionAux(528, num_classes) if use else None

    def forward_features(self, x):
        stage4 = self.stages[3]
        stage4.record = self.training and self.aux1 is not None
        try:
            x = self.run_stages(self.stem(x))
            taps = getattr(stage4, "tapped", [])
            self.aux_logits = (self.aux1(taps[0]), self.aux2(taps[1])) if stage4.record and len(taps) == 2 else None
        finally:
            stage4.tapped, stage4.record = [], False
        return x

    def forward_train(self, x):
        """``(logits, aux1, aux2)``; aux are ``None`` in eval mode or without aux classifiers."""
        logits = self.forward(x)
        aux = self.aux_logits or (None, None)
        return logits, aux[0], aux[1]

    def loss(self, x, target, criterion=nn.functional.cross_entropy):
        """Main loss plus ``aux_weight`` times each auxiliary loss (in train mode)."""
        logits, a1, a2 = self.forward_train(x)
        loss = criterion(logits, target)
        if a1 is not None:
            loss = loss + self.aux_weight * (criterion(a1, target) + criterion(a2, target))
        return loss

    def prune_for_features(self, keep_modules):
        super().prune_for_features(keep_modules)
        self.aux1 = self.aux2 = None

