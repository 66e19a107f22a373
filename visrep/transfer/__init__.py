"""Transfer: fine-tuning (freezing with frozen BatchNorm, gradual unfreezing, LP-FT, layer-wise LR
decay, L2-SP) and domain alignment (DANN, multi-kernel MMD, Deep CORAL, CDAN(+E), MCC, MDD)."""
from visrep.transfer.adapt import AdaptationModel, BestOnValidation, PairedDataset, paired_loader
from visrep.transfer.align import (CoralLoss, DomainDiscriminator, GradientReverseLayer, GRLSchedule,
                                   MultiKernelMMDLoss, all_gather_with_grad, bandwidth_heuristic, coral, covariance,
                                   dann_lambda, domain_adversarial_loss, grad_reverse, mk_mmd)
from visrep.transfer.align_cond import (MinimumClassConfusionLoss, MultiLinearMap, RandomizedMultiLinearMap,
                                        conditioning_map, entropy_weights, mcc_loss, mdd_loss, prediction_entropy)
from visrep.transfer.dense import (DenseHeadConfig, SegmentationModel, confusion_matrix, evaluate_segmentation,
                                   mean_iou, pixel_accuracy, segmentation_loss)
from visrep.transfer.finetune import (L2SP, FreezeConfig, GradualUnfreezer, freeze, frozen_groups, head_param_names,
                                      is_locked, layer_decay_param_groups, lock_batchnorm, num_stages,
                                      param_stage_ids, resolve_stages, set_trainable, stage_names,
                                      sync_batchnorm_locks, unlock_batchnorm)
from visrep.transfer.loading import load_backbone_weights

__all__ = [
    "AdaptationModel", "BestOnValidation", "PairedDataset", "paired_loader", "CoralLoss", "DomainDiscriminator",
    "GradientReverseLayer", "GRLSchedule", "MultiKernelMMDLoss", "all_gather_with_grad", "bandwidth_heuristic",
    "coral", "covariance", "dann_lambda", "domain_adversarial_loss", "grad_reverse", "mk_mmd",
    "MinimumClassConfusionLoss", "MultiLinearMap", "RandomizedMultiLinearMap", "conditioning_map", "entropy_weights",
    "mcc_loss", "mdd_loss", "prediction_entropy", "L2SP",
    "FreezeConfig", "GradualUnfreezer", "freeze", "frozen_groups", "head_param_names", "is_locked",
    "layer_decay_param_groups", "lock_batchnorm", "num_stages", "param_stage_ids", "resolve_stages",
    "set_trainable", "stage_names", "sync_batchnorm_locks", "unlock_batchnorm", "load_backbone_weights",
    "DenseHeadConfig", "SegmentationModel", "confusion_matrix", "evaluate_segmentation", "mean_iou", "pixel_accuracy",
    "segmentation_loss",
]
