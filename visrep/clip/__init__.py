"""CLIP: image-text contrastive training and zero-shot use (Radford et al. 2021, arXiv:2103.00020).

    from visrep.clip import ClipModelConfig, build_clip_model, get_tokenizer, clip_loss, evaluate_clip

* ``loss``: symmetric InfoNCE (CLIP) and pairwise sigmoid (SigLIP) losses over all ranks' features
  (autograd-aware all-gather), CLIP-to-CLIP distillation, the logit-scale clamp.
* ``model``: towers (zoo backbone / open_clip image tower; small / open_clip text tower),
  projections, learnable logit scale, tokenizer, export and load, a frozen CLIP teacher.
* ``gradcache``: one training step; gradient accumulation that keeps all negatives.
* ``zeroshot``: prompt-ensemble zero-shot classifier, retrieval recall@k, split evaluation.
"""
from visrep.clip.gradcache import contrastive_step
from visrep.clip.loss import (INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, ContrastiveLoss, all_gather_with_grad,
                              clamp_logit_scale, clip_distill_loss, clip_loss, gathered_logits, sigmoid_loss)
from visrep.clip.model import (ClipModel, ClipModelConfig, FrozenClipTeacher, ImageTowerConfig,
                               PretrainedUnavailableError, TextTowerConfig, Tokenizer, build_clip_model,
                               create_open_clip, export_clip, fit_context, get_tokenizer, image_data_config,
                               load_clip, resolve_pretrained)
from visrep.clip.zeroshot import (embed_split, evaluate_clip, retrieval_metrics, zero_shot_accuracy,
                                  zero_shot_classifier)

__all__ = [
    "INIT_LOGIT_SCALE", "MAX_LOGIT_SCALE", "ContrastiveLoss", "all_gather_with_grad", "clamp_logit_scale",
    "clip_distill_loss", "clip_loss", "gathered_logits", "sigmoid_loss", "ClipModel", "ClipModelConfig",
    "FrozenClipTeacher", "ImageTowerConfig", "PretrainedUnavailableError", "TextTowerConfig", "Tokenizer",
    "build_clip_model", "create_open_clip", "export_clip", "fit_context", "get_tokenizer", "image_data_config",
    "load_clip", "resolve_pretrained", "contrastive_step", "embed_split", "evaluate_clip", "retrieval_metrics",
    "zero_shot_accuracy", "zero_shot_classifier",
]
