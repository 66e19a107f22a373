import math

import pytest
import torch

from visrep.engine import OptimConfig, ScheduleConfig, StepSchedule, build_optimizer, lr_factor


def test_half_cosine_is_the_one_schedule_shape():
    """start at 0, the mean at K/2, end at K and after; the rate, EMA momentum, DINO's weight decay use it."""
    from visrep.engine.optim import half_cosine
    from visrep.ssl.ema import cosine_tau
    from visrep.ssl.optim import cosine_weight_decay

    assert half_cosine(0, 10, 0.04, 0.4) == pytest.approx(0.04) and half_cosine(10, 10, 0.04, 0.4) == pytest.approx(0.4)
    assert half_cosine(5, 10, 0.04, 0.4) == pytest.approx(0.22)
    assert half_cosine(25, 10, 0.04, 0.4) == half_cosine(10, 10, 0.04, 0.4)
    assert half_cosine(3, 0, 1.0, 0.0) == 0.0
    k, big_k = 7, 20
    by_hand = 1 - (1 - 0.99) * (math.cos(math.pi * k / big_k) + 1) / 2  # BYOL's tau, as its paper writes it
    assert cosine_tau(k, big_k, 0.99) == pytest.approx(by_hand, abs=1e-15)
    wd = 0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * k / big_k)) / 2
    assert cosine_weight_decay(k, big_k, 0.04, 0.4) == pytest.approx(wd)


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


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_foreach_and_loop_take_the_same_steps(name):
    """optim.implementation: torch's fused kernel (auto picks it on CPU), foreach and the per-parameter
    loop (torch's default on CPU) train the same model to the same weights within 1e-6 over 5 steps
    (float rounding only), with the weight-decay groups, nesterov and a schedule's changing rate."""
    from visrep.engine.config import OptimConfig
    from visrep.engine.optim import build_optimizer

    def train(impl):
        torch.manual_seed(0)
        # (no conv bias before the BN: its gradient is rounding noise, which Adam scales up to whole steps)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                    torch.nn.Linear(8 * 6 * 6, 4))
        opt = build_optimizer(model, OptimConfig(name=name, lr=0.05, implementation=impl))
        kinds = {("fused" if g.get("fused") else "foreach" if g.get("foreach") else "loop") for g in opt.param_groups}
        for step in range(5):
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * (step + 1) / 5
            x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        return kinds, [p.detach().clone() for p in model.parameters()]

    kinds, ref = train("loop")
    assert kinds == {"loop"}
    for impl, want in (("foreach", "foreach"), ("fused", "fused"), ("auto", "fused"), ("torch", "loop")):
        kinds, got = train(impl)
        assert kinds == {want}, impl
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_without_a_fused_kernel_auto_falls_back_and_fused_is_a_clear_error(monkeypatch):
    from visrep.checks import ConfigError

    real = torch.optim.SGD

    def no_fused(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.optim, "SGD", no_fused)
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig(name="sgd", implementation="auto"))
    assert all(g["foreach"] and not g.get("fused") for g in opt.param_groups)
    with pytest.raises(ConfigError, match="optim.implementation 'fused' is not available here .*supported devices"):
        build_optimizer(model, OptimConfig(name="sgd", implementation="fused"))
