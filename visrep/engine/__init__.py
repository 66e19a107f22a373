"""Shared training-loop pieces: config, accelerator and run directory, checkpoints, logging, evaluation."""
from visrep.engine.config import (BackboneConfig, ConfigError, OptimConfig, RecipeConfig, RunConfig, ScheduleConfig,
                                  from_dict, load_yaml, parse_config, save_yaml, to_dict)
from visrep.engine.distributed import count_parameters
from visrep.engine.evaluate import evaluate_classifier
from visrep.engine.optim import StepSchedule, build_optimizer, lr_factor, param_groups_weight_decay
from visrep.engine.run import NonFiniteLossError, Run, Stage, StopRun, list_checkpoints

__all__ = [
    "BackboneConfig", "ConfigError", "OptimConfig", "RecipeConfig", "RunConfig", "ScheduleConfig", "from_dict",
    "load_yaml", "parse_config", "save_yaml", "to_dict", "count_parameters", "evaluate_classifier", "StepSchedule",
    "build_optimizer", "lr_factor", "param_groups_weight_decay", "NonFiniteLossError", "Run", "Stage", "StopRun",
    "list_checkpoints",
]
