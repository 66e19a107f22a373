import math

import pytest
import torch

from visrep.engine import OptimConfig, ScheduleConfig, StepSchedule, build_optimizer, lr_factor


def test_lr_factor_warmup_cosine_values():
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 100, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(100, 100, 10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, 0, "linear") == pytest.approx(0.5)
    assert lr_factor(50, 100, 0, "constant") == 1.0


def test_weight_decay_groups_and_per_group_schedule():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2))
    opt = build_optimizer(model, OptimConfig(lr=0.2, weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    opt.param_groups[1]["initial_lr"] = 0.05  # e.g. a layer-decayed group
    sched = StepSchedule(opt, ScheduleConfig(epochs=2, warmup_epochs=0.5), steps_per_epoch=10)
    sched.apply(2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 3 / 5)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.05 * 3 / 5)
