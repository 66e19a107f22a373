"""Knowledge distillation: soft/hard targets, feature and relation methods, the frozen teacher."""
from visrep.distill.features import (FEATURE_METHODS, FeatureDistiller, HintRegressor, at_loss, attention_map,
                                     dist_loss, fitnets_hint_loss, match_stages, rkd_angle_loss, rkd_distance_loss)
from visrep.distill.losses import DistillationLoss, KDConfig, soft_target_kd_loss
from visrep.distill.teacher import FrozenTeacher, WeakTeacherError, check_teacher

__all__ = ["DistillationLoss", "KDConfig", "soft_target_kd_loss", "FrozenTeacher", "WeakTeacherError", "check_teacher",
           "FEATURE_METHODS", "FeatureDistiller", "HintRegressor", "at_loss", "attention_map", "dist_loss",
           "fitnets_hint_loss", "match_stages", "rkd_angle_loss", "rkd_distance_loss"]
