"""The uniform model API, for backbones written here (``ZooModel``), and data configs."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def make_data_config(input_size=(3, 224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     interpolation: str = "bilinear", crop_pct: float = 0.875) -> dict:
    """The data config every zoo model carries: ``mean``, ``std``, ``input_size``, ``interpolation``,
    ``crop_pct``. Mean/std have one entry per input channel (3-tuples for RGB; the channel
    average when ``in_chans`` differs from 3)."""
    in_chans = int(input_size[0])
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != in_chans:
        mean = (sum(mean) / len(mean),) * in_chans
        std = (sum(std) / len(std),) * in_chans
    return {
        "input_size": tuple(int(s) for s in input_size),
        "mean": mean,
        "std": std,
        "interpolation": interpolation,
        "crop_pct": float(crop_pct),
    }


class ZooModel(nn.Module):
    """Base of the backbones written here: ``stem -> stages -> global_pool -> pre_logits -> fc``.

    Subclasses build ``stem``, ``stages`` (an ``nn.Sequential``), ``pre_logits`` (identity or an
    MLP), set ``num_features`` (width after ``pre_logits``), ``feature_info`` and ``data_config``,
    then call ``self._init_head(num_classes, drop_rate)``.
    """

    num_features: int
    num_classes: int
    feature_info: list
    data_config: dict

    def _init_head(self, num_classes: int, drop_rate: float = 0.0):
        if not hasattr(self, "global_pool"):
            self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        if not hasattr(self, "pre_logits"):
            self.pre_logits = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes)

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Gradient checkpointing (timm's method name): in training, each stage keeps only its input and
        recomputes its activations during the backward -- activation memory of about one stage, for
        roughly one more forward of compute. The same gradients (tests/test_fast.py)."""
        self.grad_checkpointing = bool(enable)

    def run_stages(self, x):
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for stage in self.stages:
                x = checkpoint(stage, x, use_reentrant=False)
            return x
        return self.stages(x)

    def forward_features(self, x):
        """Unpooled feature map (N, C, H, W) of the last stage."""
        return self.run_stages(self.stem(x))

    def forward_head(self, x, pre_logits: bool = False):
        """Pool (and pre-logits MLP); then the classifier unless ``pre_logits``."""
        x = self.pre_logits(self.global_pool(x))
        return x if pre_logits else self.fc(self.head_drop(x))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool=None):
        """New linear classifier over ``num_features`` (``num_classes=0``: identity)."""
        self.num_classes = int(num_classes)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def prune_for_features(self, keep_modules: list[str]):
        """Drop the head and the stages after the last module in ``keep_modules`` (features_only)."""
        self.pre_logits, self.fc, self.global_pool = nn.Identity(), nn.Identity(), nn.Identity()
        last = -1
        for name in keep_modules:
            parts = name.split(".")
            if parts[0] == "stages" and len(parts) > 1:
                last = max(last, int(parts[1]))
        if last >= 0 and isinstance(self.stages, nn.Sequential):
            for i in range(last + 1, len(self.stages)):
                self.stages[i] = nn.Identity()
