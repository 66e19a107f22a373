"""Soft/hard-target knowledge distillation and the frozen teacher."""
from visrep.distill.losses import DistillationLoss, KDConfig, soft_target_kd_loss
from visrep.distill.teacher import FrozenTeacher, WeakTeacherError, check_teacher

__all__ = ["DistillationLoss", "KDConfig", "soft_target_kd_loss", "FrozenTeacher", "WeakTeacherError", "check_teacher"]
