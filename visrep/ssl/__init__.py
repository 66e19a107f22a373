"""Self-supervised pre-training: BYOL (Grill et al. 2020, arXiv:2006.07733), and the objectives of SimCLR,
MoCo v3, DINO, VICReg and Barlow Twins.

Heads and the online/target pair (``BYOL``, ``MLPHead``), the loss (``byol_loss``), the target's EMA
on a cosine momentum schedule counted in optimizer steps (``EMAUpdater``), two-view augmentations
(``byol_transforms``, ``BatchedBYOLAugment``), LARS and the scaled-rate optimizer set-up
(``build_ssl_optimizer``), and evaluation on frozen features (weighted kNN, linear evaluation).

Other methods' objectives, each over the global batch across ranks (``visrep.ssl.objectives``): SimCLR's
NT-Xent (``nt_xent_loss``, arXiv:2002.05709); MoCo v3's loss and query / momentum-key pair (``mocov3_loss``,
``MoCoV3``, ``MoCoV3MLP``, arXiv:2104.02057); DINO's head, loss with its centre, and teacher-temperature
schedule (``DINOHead``, ``DINOLoss``, ``teacher_temp_schedule``, arXiv:2104.14294; its weight-decay cosine:
``cosine_weight_decay``, ``WeightDecaySchedule``); VICReg (``vicreg_loss``,
arXiv:2105.04906); Barlow Twins (``barlow_twins_loss``, arXiv:2103.03230).

The six methods as models behind one interface (``visrep.ssl.methods``: ``build_method``, ``SimCLR``,
``MoCoV3Method``, ``DINO``, ``VICReg``, ``BarlowTwins``, ``BYOLMethod``, their config groups, DINO's
``TeacherTemperature``), DINO's multi-crop (``multicrop_transforms``, ``BatchedMultiCrop``), and the
evaluation protocol card every run records (``eval_protocol``).
"""
from visrep.ssl.ema import EMAUpdater, cosine_tau
from visrep.ssl.evaluate import (SSLEvalConfig, bank_loader, eval_protocol, evaluate_pretrained,
                                 evaluate_representation, extract_features, knn_accuracy, knn_predict, linear_eval,
                                 offline_eval, rank0_buffers, results_table, validation_monitor)
from visrep.ssl.export import export_backbone, export_byol
from visrep.ssl.heads import BYOL, BYOLConfig, MLPHead
from visrep.ssl.loss import byol_loss, normalized_std, regression_loss
from visrep.ssl.methods import (DINO, LOSS_PATHS, METHODS, BarlowConfig, BarlowTwins, BYOLMethod, DINOConfig,
                                MoCoV3Config, MoCoV3Method, SimCLR, SimCLRConfig, TeacherTemperature, VICReg,
                                VICRegConfig, build_backbone, build_method, export_method)
from visrep.ssl.objectives import (DINOHead, DINOLoss, MoCoV3, MoCoV3MLP, barlow_twins_loss, mocov3_loss,
                                   nt_xent_loss, teacher_temp_schedule, vicreg_loss)
from visrep.engine.optim import LARS
from visrep.ssl.optim import (SSLOptimConfig, WeightDecaySchedule, build_ssl_optimizer, cosine_weight_decay,
                              refuse_lars_under_deepspeed, scaled_lr, ssl_param_groups)
from visrep.ssl.transforms import (BatchedBYOLAugment, BatchedMultiCrop, MultiCrop, SSLAugmentConfig, TwoViews,
                                   base_transform, batch_seed, byol_transforms, byol_view_transform,
                                   multicrop_transforms)

__all__ = [
    "BYOL", "BYOLConfig", "MLPHead", "byol_loss", "regression_loss",
    "normalized_std", "EMAUpdater", "cosine_tau", "LARS", "SSLOptimConfig", "build_ssl_optimizer",
    "scaled_lr", "ssl_param_groups", "cosine_weight_decay", "WeightDecaySchedule", "SSLAugmentConfig", "TwoViews",
    "byol_transforms", "byol_view_transform",
    "refuse_lars_under_deepspeed", "BatchedBYOLAugment", "base_transform", "batch_seed", "SSLEvalConfig",
    "extract_features", "knn_predict",
    "knn_accuracy", "linear_eval", "evaluate_representation", "export_backbone", "export_byol",
    "nt_xent_loss", "mocov3_loss", "MoCoV3", "MoCoV3MLP", "DINOHead", "DINOLoss", "teacher_temp_schedule",
    "vicreg_loss", "barlow_twins_loss", "LOSS_PATHS",
    "bank_loader", "eval_protocol", "evaluate_pretrained", "offline_eval",
    "rank0_buffers", "results_table", "validation_monitor", "METHODS", "SimCLR",
    "SimCLRConfig", "MoCoV3Method", "MoCoV3Config", "DINO", "DINOConfig", "VICReg", "VICRegConfig", "BarlowTwins",
    "BarlowConfig", "BYOLMethod", "TeacherTemperature", "build_backbone", "build_method", "export_method",
    "MultiCrop", "BatchedMultiCrop", "multicrop_transforms",
]
