"""Dense transfer: semantic segmentation on top of any zoo backbone.

``SegmentationModel``: the backbone's ``features_only`` pyramid -> a neck (FPN or U-Net decoder,
``visrep.zoo.necks``) -> a 1x1 classifier -> bilinear upsampling to the input size. The loss is the
per-pixel cross-entropy with an ignored label; the metrics come from one confusion matrix over the whole
split, summed over batches and ranks before any division: mean IoU and pixel accuracy.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from visrep.checks import check
from visrep.engine.config import BackboneConfig, to_dict
from visrep.engine.evaluate import evaluate_sums
from visrep.engine.export import backbone_config, rebuild_with_backbone, register_kind, write_export
from visrep.zoo.necks import FPN, UNet

KIND = "segmentation"


@dataclasses.dataclass
class DenseHeadConfig:
    """The neck between the backbone's feature pyramid and the per-pixel classifier."""

    neck: Literal["fpn", "unet"] = "fpn"
    """fpn: Feature Pyramid Network, its levels summed at the finest; unet: U-Net decoder up to the input size."""
    channels: int = 32
    """fpn: the pyramid's width (out_channels)."""
    decoder_channels: list[int] = dataclasses.field(default_factory=lambda: [32, 16, 16, 8, 8])
    """unet: the decoder blocks' widths, deepest first."""
    out_indices: Optional[list[int]] = None
    """The backbone's feature levels (indices into its feature_info) the neck reads; null: all."""

    def validate(self, prefix: str) -> None:
        check(self.channels >= 1, f"{prefix}channels", self.channels, "an integer >= 1")
        check(bool(self.decoder_channels) and all(c >= 1 for c in self.decoder_channels),
              f"{prefix}decoder_channels", self.decoder_channels, "a non-empty list of integers >= 1")
        check(self.out_indices is None or len(self.out_indices) >= 1, f"{prefix}out_indices", self.out_indices,
              "null (every level) or a non-empty list of feature levels")


class SegmentationModel(nn.Module):
    """Semantic segmentation over a zoo backbone: ``features_only`` pyramid -> neck -> 1x1 conv classifier
    -> bilinear upsampling to the input's size, giving ``(N, num_classes, H, W)`` logits.

    The fully convolutional recipe of Long, Shelhamer & Darrell, "Fully Convolutional Networks for
    Semantic Segmentation", 2014, arXiv:1411.4038, with an FPN neck (Lin et al. 2016, arXiv:1612.03144;
    its levels upsampled to the finest and summed before the classifier, the merge of Kirillov et al.'s
    semantic FPN, "Panoptic Feature Pyramid Networks", 2019, arXiv:1901.02446, without its extra convs) or a
    U-Net decoder (Ronneberger et al. 2015, arXiv:1505.04597; its own 1x1 head is this classifier).
    ``backbone``: a zoo model (its head is pruned) or a zoo name.
    """

    def __init__(self, backbone, num_classes: int, head: Optional[DenseHeadConfig] = None):
        super().__init__()
        head = head or DenseHeadConfig()
        out_indices = tuple(head.out_indices) if head.out_indices is not None else None
        if head.neck == "fpn":
            self.neck = FPN(backbone, out_channels=head.channels, out_indices=out_indices)
            width = head.channels
        else:
            self.neck = UNet(backbone, num_classes=1, decoder_channels=tuple(head.decoder_channels),
                             out_indices=out_indices)
            width = self.neck.head.in_channels
            self.neck.head = nn.Identity()  # the classifier below takes its place
        self.classifier = nn.Conv2d(width, num_classes, 1)
        self.num_classes = num_classes
        self.head_config = head
        self.data_config = dict(self.neck.data_config)

    @property
    def encoder(self) -> nn.Module:
        """The backbone's ``features_only`` module."""
        return self.neck.body if isinstance(self.neck, FPN) else self.neck.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.neck(x)
        if isinstance(y, (list, tuple)):  # FPN: every level, brought to the finest level's size, summed
            y = sum(F.interpolate(p, size=y[0].shape[-2:], mode="bilinear", align_corners=False)
                    if p.shape[-2:] != y[0].shape[-2:] else p for p in y)
        y = self.classifier(y)
        if y.shape[-2:] != x.shape[-2:]:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return y


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Per-pixel cross-entropy, averaged over the pixels that are not ignored (Long et al. 2014, FCN,
    arXiv:1411.4038):

        L = -1/|V| sum_{p in V} log softmax(z_p)[y_p],   V = {p : y_p != ignore_index}

    ``logits`` (N, K, H, W), computed in fp32; ``target`` (N, H, W) integer classes."""
    return F.cross_entropy(logits.float(), target, ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------
# Metrics: one confusion matrix, summed, then divided
# ----------------------------------------------------------------------------------------------
def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255,
                     per_sample: bool = False) -> torch.Tensor:
    """Counts ``C[t, p]`` of pixels with target class ``t`` predicted ``p`` (int64, (K, K)), pixels whose target
    is ``ignore_index`` left out; ``per_sample``: one matrix per image, (N, K, K) -- what a gather across
    ranks collects, so that Accelerate's repeated samples of an uneven last batch are dropped before the sum."""
    n, k = pred.shape[0], num_classes
    pred, target = pred.reshape(n, -1).long(), target.reshape(n, -1).long()
    valid = target != ignore_index
    if valid.any() and (target[valid].min() < 0 or target[valid].max() >= k):
        raise ValueError(f"target classes must lie in [0, {k}) or equal ignore_index={ignore_index}")
    sample = torch.arange(n, device=pred.device)[:, None].expand_as(pred)
    idx = (sample * k * k + target * k + pred)[valid]
    counts = torch.bincount(idx, minlength=n * k * k).view(n, k, k)
    return counts if per_sample else counts.sum(0)


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """``IoU_c = C[c, c] / (sum_p C[c, p] + sum_t C[t, c] - C[c, c])`` (float64; NaN for a class absent from
    both target and prediction)."""
    cm = cm.double()
    tp = cm.diagonal()
    union = cm.sum(0) + cm.sum(1) - tp
    return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))


def mean_iou(cm: torch.Tensor) -> float:
    """Mean IoU over the classes present in the target or the prediction (``union > 0``) of the whole
    confusion matrix ``cm`` (Everingham et al., "The PASCAL Visual Object Classes Challenge", 2010); 0.0
    when no pixel was scored."""
    iou = iou_per_class(cm)
    present = ~torch.isnan(iou)
    return float(iou[present].mean()) if present.any() else 0.0


def pixel_accuracy(cm: torch.Tensor) -> float:
    """Pixels predicted right over pixels scored: ``trace(C) / sum(C)`` (0.0 when none was scored)."""
    total = cm.sum()
    return float(cm.diagonal().sum().double() / total.double()) if total > 0 else 0.0


def evaluate_segmentation(model: nn.Module, loader, accelerator, num_classes: int, ignore_index: int = 255) -> dict:
    """Mean IoU, pixel accuracy and mean cross-entropy over a whole split. Each rank scores its shard; the
    per-image confusion matrices and loss sums are gathered (``gather_for_metrics`` drops the samples
    Accelerate repeated to even out the last batch) and summed into one matrix, then divided: the figures of
    one process on the whole split. Returns also ``iou`` (per class, None where absent) and ``confusion``."""
    def score(logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_pixel = F.cross_entropy(logits, y, ignore_index=ignore_index, reduction="none")
        return (confusion_matrix(logits.argmax(1), y, num_classes, ignore_index, per_sample=True),
                per_pixel.double().flatten(1).sum(1))

    cm, nll = evaluate_sums(model, loader, accelerator, score) or (None, None)
    cm = (cm if cm is not None else torch.zeros(num_classes, num_classes, dtype=torch.long)).cpu()
    total = int(cm.sum())
    iou = iou_per_class(cm)
    return {"miou": mean_iou(cm), "pixel_acc": pixel_accuracy(cm),
            "loss": float(nll) / total if total else 0.0, "pixels": total,
            "iou": [None if torch.isnan(v) else float(v) for v in iou], "confusion": cm.tolist()}


# ----------------------------------------------------------------------------------------------
# Export: kind "segmentation"
# ----------------------------------------------------------------------------------------------
def export_segmentation(accelerator, model: nn.Module, out_dir: str | Path, backbone: BackboneConfig,
                        num_classes: int, data_config: dict, head: DenseHeadConfig, extra: Optional[dict] = None) -> None:
    """Write a (prepared) ``SegmentationModel`` as an export of kind ``segmentation``: the backbone's
    architecture, the head config and the classes in ``config.json``. Call on every rank."""
    write_export(accelerator, model, out_dir, KIND, {**backbone_config(backbone, num_classes, data_config),
                                                     "head": to_dict(head), **(extra or {})})


def load_segmentation_model(path) -> tuple[SegmentationModel, dict]:
    """Rebuild a ``SegmentationModel`` exported by ``recipes/segment.py`` (``RUN_DIR/models/segment``)."""
    return rebuild_with_backbone(path, KIND, "a segmentation model", lambda backbone, cfg: SegmentationModel(
        backbone, int(cfg["num_classes"]), DenseHeadConfig(**cfg["head"])))


register_kind(KIND, load_segmentation_model)

__all__ = ["DenseHeadConfig", "SegmentationModel", "segmentation_loss", "confusion_matrix", "iou_per_class",
           "mean_iou", "pixel_accuracy", "evaluate_segmentation", "export_segmentation", "load_segmentation_model"]
