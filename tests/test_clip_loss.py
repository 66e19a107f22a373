"""visrep.clip losses, logit scale, GradCache step: against naive formulas and hand-made cases."""
import math

import pytest
import torch
import torch.nn.functional as F

from visrep.clip import (ContrastiveLoss, clamp_logit_scale, clip_distill_loss, clip_loss, contrastive_step,
                         sigmoid_loss)
from visrep.clip.loss import _InfoNCERowBlock


def naive_clip_loss(x, y, s):
    """Term by term, straight from the formula."""
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        num_i = math.exp(s * float(x[i] @ y[i]))
        den_i = sum(math.exp(s * float(x[i] @ y[j])) for j in range(n))
        num_t = math.exp(s * float(y[i] @ x[i]))
        den_t = sum(math.exp(s * float(y[i] @ x[j])) for j in range(n))
        total += -0.5 * (math.log(num_i / den_i) + math.log(num_t / den_t))
    return total / n


def feats(n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1),
            F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=1))


@pytest.mark.parametrize("n,d,s", [(1, 4, 1.0), (5, 3, 14.3), (16, 8, 100.0), (33, 16, 2.5)])
def test_infonce_equals_naive_formula(n, d, s):
    x, y = feats(n, d, seed=n)
    got = clip_loss(x, y, torch.tensor(s))
    assert got.item() == pytest.approx(naive_clip_loss(x.double(), y.double(), s), rel=1e-5, abs=1e-5)


def test_infonce_gradients_equal_autograd_reference():
    x, y = feats(12, 6, dtype=torch.float64)
    x1, y1, s1 = x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(7.0, requires_grad=True)
    x2, y2, s2 = x.clone().requires_grad_(), y.clone().requires_grad_(), torch.tensor(7.0, requires_grad=True)
    clip_loss(x1, y1, s1).backward()
    logits = s2.float() * x2.float() @ y2.float().t()
    t = torch.arange(12)
    ((F.cross_entropy(logits, t) + F.cross_entropy(logits.t(), t)) / 2).backward()
    for a, b in ((x1, x2), (y1, y2), (s1, s2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_fused_functions_pass_gradcheck():
    x, y = feats(6, 4, dtype=torch.float64)
    x, y = x.requires_grad_(), y.requires_grad_()
    s = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    # the cross-rank row-block form, here on one rank (the 2-process test covers W = 2)
    assert torch.autograd.gradcheck(lambda a, b, c: _InfoNCERowBlock.apply(a, b, c, True), (x, y, s))


def test_perfect_diagonal_with_large_scale_goes_to_zero():
    x = torch.eye(8, 16)
    assert clip_loss(x, x.clone(), torch.tensor(100.0)).item() < 1e-6
    assert clip_loss(x, x.clone(), torch.tensor(1.0)).item() > 1.0  # small scale: far from 0
    bias = torch.tensor(-50.0)
    assert sigmoid_loss(x, x.clone(), torch.tensor(100.0), bias).item() < 1e-6


def test_sigmoid_loss_equals_naive_formula():
    x, y = feats(7, 5)
    s, b = torch.tensor(10.0), torch.tensor(-3.0)
    ref = 0.0
    for i in range(7):
        for j in range(7):
            z = 1.0 if i == j else -1.0
            ref += -math.log(1.0 / (1.0 + math.exp(-z * (10.0 * float(x[i] @ y[j]) - 3.0))))
    assert sigmoid_loss(x, y, s, b).item() == pytest.approx(ref / 7, rel=1e-5)


def test_distillation_loss_zero_for_identical_models_and_gradient_only_to_student():
    x, y = feats(10, 8)
    xs, ys = x.clone().requires_grad_(), y.clone().requires_grad_()
    s = torch.tensor(20.0)
    assert clip_distill_loss((xs, ys, s), (x, y, s)).item() == pytest.approx(0.0, abs=1e-6)
    x2, y2 = feats(10, 8, seed=3)
    kd = clip_distill_loss((xs, ys, s), (x2, y2, s), temperature=2.0)
    assert kd.item() > 0.01
    kd.backward()
    assert xs.grad.abs().sum() > 0 and ys.grad.abs().sum() > 0
    out = ContrastiveLoss("infonce", kd_weight=0.25)({"image_features": x, "text_features": y, "logit_scale": s},
                                                     {"image_features": x2, "text_features": y2, "logit_scale": s})
    assert out["loss"].item() == pytest.approx(0.75 * out["contrastive"].item() + 0.25 * out["kd"].item(), rel=1e-6)


def test_sigmoid_needs_a_bias():
    x, y = feats(4, 4)
    with pytest.raises(ValueError, match="logit bias"):
        ContrastiveLoss("sigmoid")({"image_features": x, "text_features": y, "logit_scale": torch.tensor(10.0)})


# ----------------------------------------------------------------------------------------------
# Logit scale: init, clamp after each step, no weight decay
# ----------------------------------------------------------------------------------------------
def tiny_model(**kw):
    from test_clip_distributed import make_model

    return make_model(kw.get("kind", "infonce"))


def test_logit_scale_init_clamp_and_no_weight_decay():
    from visrep.clip import ClipModelConfig, build_clip_model
    from visrep.engine import OptimConfig, build_optimizer

    cfg = ClipModelConfig()
    assert cfg.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    model = build_clip_model(cfg)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=1.0, weight_decay=0.5))
    group = next(g for g in opt.param_groups if any(p is model.logit_scale for p in g["params"]))
    assert group["weight_decay"] == 0.0
    assert any(g["weight_decay"] == 0.5 for g in opt.param_groups)
    # no decay: with a zero gradient AdamW leaves the scale where it is
    before = model.logit_scale.item()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert model.logit_scale.item() == before
    # a step that pushes the scale far up is clamped back to ln(100), every step
    for _ in range(3):
        model.logit_scale.grad = torch.full_like(model.logit_scale, -1.0)
        opt.step()
        clamp_logit_scale(model)
        assert model.logit_scale.item() <= math.log(100.0) + 1e-7
    assert model.logit_scale.item() == pytest.approx(math.log(100.0))


@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from helpers import reset_accelerate

    acc = Accelerator(cpu=True)
    yield acc
    reset_accelerate()


@pytest.mark.parametrize("kind", ["infonce", "sigmoid"])
def test_gradcache_accumulation_equals_one_big_batch(accelerator, kind):
    from test_clip_distributed import make_batch, make_model

    images, tokens = make_batch(12)
    grads = []
    for chunks in (1, 3, 4):
        model = make_model(kind)
        losses = contrastive_step(accelerator, model, ContrastiveLoss(kind), images, tokens, chunks)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        if chunks == 1:
            ref_loss = losses["loss"]
        else:
            assert losses["loss"].item() == pytest.approx(ref_loss.item(), rel=1e-6)
    for g in grads[1:]:
        for k in grads[0]:
            torch.testing.assert_close(g[k], grads[0][k], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="equal micro-batches"):
        contrastive_step(accelerator, make_model(kind), ContrastiveLoss(kind), images, tokens, 5)


def test_gradcache_replays_dropout_and_keeps_batchnorm_stats_single(accelerator):
    from visrep.clip.model import ClipModel, ClipModelConfig, SmallText, TextTowerConfig

    class Tower(torch.nn.Module):
        num_features = 8

        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 8), torch.nn.Dropout(0.5),
                                           torch.nn.BatchNorm1d(8))

        def forward(self, x):
            return self.net(x)

    from test_clip_distributed import make_batch

    images, tokens = make_batch(8)
    cfg = ClipModelConfig(text=TextTowerConfig(context_length=8, width=16, layers=1, heads=2), embed_dim=8)
    torch.manual_seed(0)
    model = ClipModel(Tower(), SmallText(cfg.text, vocab_size=64), cfg)
    bn = model.image_tower.net[3]
    torch.manual_seed(5)
    contrastive_step(accelerator, model, ContrastiveLoss(), images, tokens, 2)
    # two micro-batches -> two BN updates (not four: the cache pass restores the buffers)
    assert bn.num_batches_tracked.item() == 2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # the recompute pass sees the cache pass's dropout masks
    from visrep.clip.gradcache import _RngState

    state = _RngState(torch.device("cpu"))
    first = torch.nn.functional.dropout(torch.ones(100), 0.5)
    with state.replay():
        again = torch.nn.functional.dropout(torch.ones(100), 0.5)
    assert torch.equal(first, again)
