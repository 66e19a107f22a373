"""visrep.ssl.objectives: SimCLR, MoCo v3, DINO, VICReg and Barlow Twins.

Each loss against a naive version written here from its paper (loops and explicit sums in float64: the
value and the gradient w.r.t. every input), hand-checkable cases, the MoCo v3 pair, DINO's head, centre
and teacher-temperature schedule, clear errors for bad inputs; and 2 real gloo processes against one
process on the global batch (equal and unequal per-rank row counts).

The cross-rank convention under test (the module docstring of visrep.ssl.objectives): with ``L`` the
one-process loss on the global batch and ``W = 2`` ranks, a rank's local inputs receive ``W * dL/dx``
(the autograd gather's backward sums every rank's gradient), so the DDP average of the per-rank parameter
gradients -- done explicitly here as the mean over the ranks' gradients -- equals ``dL/dtheta``; the
mean over ranks of the returned values equals ``L`` (VICReg and Barlow Twins return ``L`` itself on every
rank).

This file is also the 2-process worker: ``python tests/test_ssl_objectives.py OUT`` with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set (no DDP and no launcher: the assertions average the gradients themselves).
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from visrep.ssl import (BYOL, DINOHead, DINOLoss, EMAUpdater, MLPHead, MoCoV3, MoCoV3MLP, barlow_twins_loss,
                        mocov3_loss, nt_xent_loss, teacher_temp_schedule, vicreg_loss)

F64 = torch.float64


def close(actual, expected, rtol=1e-7, atol=1e-9):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=F64), torch.as_tensor(expected, dtype=F64),
                               rtol=rtol, atol=atol)


def randn(*shape, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(grad)


# ---------------------------------------------------------------------------- naive formulas (the papers)
def naive_nt_xent(z1, z2, t):
    """SimCLR Eq. 1 over the 2N views, positives k <-> k + N, a loop per anchor."""
    n = z1.shape[0]
    u = [v / v.norm() for v in list(z1) + list(z2)]
    total = 0.0
    for k in range(2 * n):
        den = sum(torch.exp(u[k] @ u[j] / t) for j in range(2 * n) if j != k)
        total = total - torch.log(torch.exp(u[k] @ u[(k + n) % (2 * n)] / t) / den)
    return total / (2 * n)


def naive_mocov3(q1, q2, k1, k2, t):
    """MoCo v3 Algorithm 1: ctr(q, k) = CE(q k^T / t, diagonal) * 2t, symmetrised; keys constants."""
    def ctr(q, k):
        k = [v.detach() / v.detach().norm() for v in k]
        total = 0.0
        for i in range(len(q)):
            qi = q[i] / q[i].norm()
            den = sum(torch.exp(qi @ kj / t) for kj in k)
            total = total - torch.log(torch.exp(qi @ k[i] / t) / den)
        return total / len(q) * 2 * t

    return ctr(q1, k2) + ctr(q2, k1)


def naive_dino(student, teacher, center, teacher_temp, student_temp=0.1):
    """DINO Eq. 3-4 and Algorithm 1: H(P_t(x_iq), P_s(x_v)) averaged over pairs v != iq and the batch."""
    total, terms = 0.0, 0
    for iq, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == iq:
                continue
            pair = 0.0
            for b in range(t.shape[0]):
                e = torch.exp((t[b].detach() - center[0]) / teacher_temp)
                p_t = e / e.sum()
                log_p_s = s[b] / student_temp - torch.log(torch.exp(s[b] / student_temp).sum())
                pair = pair - (p_t * log_p_s).sum()
            total, terms = total + pair / t.shape[0], terms + 1
    return total / terms


def naive_vicreg(z1, z2, sim=25.0, std=25.0, cov=1.0, eps=1e-4):
    """VICReg Sec. 3.1-3.2 with the official code's averaged variance term, per dimension."""
    n, d = z1.shape
    inv = sum(((z1[a, j] - z2[a, j]) ** 2 for a in range(n) for j in range(d))) / (n * d)

    def var(z):
        return sum(torch.relu(1 - torch.sqrt(((z[:, j] - z[:, j].mean()) ** 2).sum() / (n - 1) + eps))
                   for j in range(d)) / d

    def covariance(z):
        c = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    c = c + (((z[:, i] - z[:, i].mean()) * (z[:, j] - z[:, j].mean())).sum() / (n - 1)) ** 2
        return c / d

    v, c = (var(z1) + var(z2)) / 2, covariance(z1) + covariance(z2)
    return sim * inv + std * v + cov * c, (inv, v, c)


def naive_barlow(z1, z2, lambd=5e-3, eps=1e-5):
    """Barlow Twins Eq. 1-2 with BatchNorm's standardisation (biased variance, eps), per pair (i, j)."""
    n, d = z1.shape

    def standardise(z, j):
        m = z[:, j].mean()
        return (z[:, j] - m) / torch.sqrt(((z[:, j] - m) ** 2).sum() / n + eps)

    a = [standardise(z1, j) for j in range(d)]
    b = [standardise(z2, j) for j in range(d)]
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = (a[i] * b[j]).sum() / n
            loss = loss + ((1 - c) ** 2 if i == j else lambd * c ** 2)
    return loss


def check_against_naive(fn, naive, inputs):
    """Equal value and equal gradient w.r.t. every input that requires one."""
    value, ref = fn(*inputs), naive(*inputs)
    close(value, ref)
    wrt = [x for x in inputs if x.requires_grad]
    for g, r in zip(torch.autograd.grad(value, wrt), torch.autograd.grad(ref, wrt)):
        close(g, r)
    return value


# ---------------------------------------------------------------------------- SimCLR
@pytest.mark.parametrize("t", [0.5, 0.1])
def test_nt_xent_matches_naive_formula(t):
    z1, z2 = randn(6, 5, seed=1), randn(6, 5, seed=2)
    check_against_naive(lambda a, b: nt_xent_loss(a, b, t), lambda a, b: naive_nt_xent(a, b, t), (z1, z2))


def test_nt_xent_hand_computed():
    # u = e1, e2, e1, e2: each anchor sees its positive at cos 1 and two others at cos 0
    z = torch.eye(2, dtype=F64)
    for t in (0.5, 1.0):
        close(nt_xent_loss(z, 3 * z, t), math.log(1 + 2 * math.exp(-1 / t)))
    assert nt_xent_loss(z.half(), z.half()).dtype == torch.float32


# ---------------------------------------------------------------------------- MoCo v3
def test_mocov3_matches_naive_formula_and_keys_get_no_gradient():
    q1, q2 = randn(5, 4, seed=1), randn(5, 4, seed=2)
    k1, k2 = randn(5, 4, seed=3, grad=False), randn(5, 4, seed=4, grad=False)
    check_against_naive(lambda *a: mocov3_loss(*a, temperature=0.2),
                        lambda *a: naive_mocov3(*a, 0.2), (q1, q2, k1, k2))
    k1.requires_grad_(), k2.requires_grad_()  # keys that would take a gradient are still constants
    mocov3_loss(q1, q2, k1, k2).backward()
    assert k1.grad is None and k2.grad is None and q1.grad is not None


def test_mocov3_hand_computed():
    # q = k = e1, e2: per query -log(e^{1/t} / (e^{1/t} + 1)), times 2t, two symmetric terms
    e = torch.eye(2, dtype=F64)
    t = 0.2
    close(mocov3_loss(e, e, e, e, temperature=t), 2 * 2 * t * math.log(1 + math.exp(-1 / t)))


class Tiny(nn.Module):
    """A BN-free backbone with the zoo's ``num_features``."""

    def __init__(self, d_in=6, width=5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.ReLU())
        self.num_features = width

    def forward(self, x):
        return self.body(x)


def test_mocov3_heads():
    proj = MoCoV3MLP(8, 16, 4, num_layers=3, last_bn=True)
    assert isinstance(proj, MLPHead) and (proj.in_dim, proj.hidden_dim, proj.out_dim) == (8, 16, 4)
    assert [type(m) for m in proj] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear, nn.BatchNorm1d, nn.ReLU,
                                       nn.Linear, nn.BatchNorm1d]
    assert all(m.bias is None for m in proj if isinstance(m, nn.Linear))
    assert proj[1].affine and not proj[-1].affine, "only the output BN drops its affine parameters"
    pred = MoCoV3MLP(4, 16, 4, num_layers=2, last_bn=False)
    assert [type(m) for m in pred] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    with pytest.raises(ValueError, match="num_layers"):
        MoCoV3MLP(4, 8, 4, num_layers=0)


def test_mocov3_pair_trains_the_query_side_only():
    torch.manual_seed(0)
    m = MoCoV3(Tiny(), proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=12, num_classes=3)
    assert isinstance(m, BYOL)
    assert sum(isinstance(x, nn.Linear) for x in m.projector) == 3 and not m.projector[-1].affine
    assert sum(isinstance(x, nn.Linear) for x in m.predictor) == 2 and isinstance(m.predictor[-1], nn.BatchNorm1d)
    assert not any("predictor" in n for n, _ in m.named_parameters() if n.startswith("target"))
    online, target = m.ema_pairs()
    assert len(online) == len(target)
    for o, t in zip(online, target):
        assert torch.equal(o, t) and o is not t and o.requires_grad and not t.requires_grad
    out = m(torch.randn(10, 6), torch.randn(10, 6))
    assert out["q"][0].shape == (10, 8) and out["k"][1].shape == (10, 8) and out["logits"].shape == (10, 3)
    assert out["q"] is out["p"] and out["k"] is out["z_target"] and not out["k"][0].requires_grad
    mocov3_loss(*out["q"], *out["k"]).backward()
    assert all(t.grad is None for t in target)
    assert all(p.grad is not None for p in m.predictor.parameters())
    assert all(p.grad is not None for p in m.backbone.parameters())
    before = [t.clone() for t in target]
    EMAUpdater(10, base_tau=0.99).update(online, target)
    for t, b, o in zip(target, before, online):
        close(t, 0.99 * b + 0.01 * o, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- DINO
def test_dino_head_formula_and_last_layer():
    torch.manual_seed(0)
    head = DINOHead(6, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    assert [type(m) for m in head.mlp] == [nn.Linear, nn.GELU, nn.Linear, nn.GELU, nn.Linear]
    assert head.mlp[0].weight.shape == (16, 6) and head.mlp[4].weight.shape == (4, 16)
    assert not head.last_layer.weight_g.requires_grad and head.last_layer.weight_v.requires_grad
    assert {"last_layer.weight_g", "last_layer.weight_v"} <= set(head.state_dict())
    close(head.last_layer.weight.norm(dim=1), torch.ones(10), rtol=1e-6, atol=1e-6)
    x = torch.randn(7, 6)
    h = head.mlp(x)
    v = head.last_layer.weight_v
    expected = (h / h.norm(dim=1, keepdim=True)) @ (v / v.norm(dim=1, keepdim=True)).t()
    close(head(x), expected, rtol=1e-6, atol=1e-6)
    teacher = copy.deepcopy(head)
    close(teacher(x), head(x), rtol=0, atol=0)
    head(x).sum().backward()
    assert head.last_layer.weight_g.grad is None and head.last_layer.weight_v.grad is not None

    free = DINOHead(6, out_dim=10, hidden_dim=16, bottleneck_dim=4, n_layers=2, use_bn=True, norm_last_layer=False)
    assert [type(m) for m in free.mlp] == [nn.Linear, nn.BatchNorm1d, nn.GELU, nn.Linear]
    assert free.last_layer.weight_g.requires_grad
    assert DINOHead(6, 10, 16, 4, n_layers=1).mlp[0].weight.shape == (4, 6)


def dino_inputs(b=3, k=7, n_crops=4, seed=0):
    student = [randn(b, k, seed=seed + v) for v in range(n_crops)]
    teacher = [randn(b, k, seed=seed + 10 + v, grad=False) * 3 for v in range(2)]
    return student, teacher


def test_dino_loss_matches_naive_formula():
    student, teacher = dino_inputs()
    loss_fn = DINOLoss(7).double()
    loss_fn.center.copy_(randn(1, 7, seed=20, grad=False))
    value = loss_fn(student, teacher, teacher_temp=0.05)
    ref = naive_dino(student, teacher, loss_fn.center, 0.05)
    close(value, ref)
    for g, r in zip(torch.autograd.grad(value, student), torch.autograd.grad(ref, student)):
        close(g, r)
    # the concatenated form is the same loss; the forward leaves the centre alone
    centre = loss_fn.center.clone()
    close(loss_fn(torch.cat(student), torch.cat(teacher), 0.05), value)
    assert torch.equal(loss_fn.center, centre)


def test_dino_loss_hand_computed():
    # uniform teacher and student over K outputs: every cross entropy is log K
    k = 5
    loss_fn = DINOLoss(k)
    value = loss_fn(torch.zeros(3 * 4, k, requires_grad=True), torch.full((2 * 4, k), 2.0), teacher_temp=0.04)
    close(value, math.log(k), rtol=1e-6, atol=1e-6)


def test_dino_centre_is_a_buffer_updated_as_its_formula():
    loss_fn = DINOLoss(6, center_momentum=0.9)
    assert "center" in dict(loss_fn.named_buffers()) and "center" not in dict(loss_fn.named_parameters())
    assert loss_fn.center.shape == (1, 6) and torch.equal(loss_fn.center, torch.zeros(1, 6))
    g = torch.Generator().manual_seed(0)
    c0 = torch.randn(1, 6, generator=g)
    loss_fn.center.copy_(c0)
    t1, t2 = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    loss_fn.update_center([t1, t2])
    close(loss_fn.center, 0.9 * c0 + 0.1 * torch.cat([t1, t2]).mean(0, keepdim=True), rtol=1e-6, atol=1e-7)
    c1 = loss_fn.center.clone()
    loss_fn.update_center(t1)  # a tensor too
    close(loss_fn.center, 0.9 * c1 + 0.1 * t1.mean(0, keepdim=True), rtol=1e-6, atol=1e-7)

    resumed = DINOLoss(6, center_momentum=0.9)
    resumed.load_state_dict(loss_fn.state_dict())
    assert torch.equal(resumed.center, loss_fn.center)
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        loss_fn.update_center(torch.zeros(4, 5))


def test_teacher_temperature_schedule():
    w = 100
    assert teacher_temp_schedule(0, w, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temp_schedule(w // 2, w, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temp_schedule(25, w, 0.04, 0.07) == pytest.approx(0.0475)
    assert teacher_temp_schedule(w, w, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temp_schedule(10 * w, w, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temp_schedule(0, 0) == pytest.approx(0.07)
    assert teacher_temp_schedule(3, 10, 0.04, 0.04) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="step"):
        teacher_temp_schedule(-1, w)
    with pytest.raises(ValueError, match="teacher_temp"):
        teacher_temp_schedule(0, w, teacher_temp=0.0)


# ---------------------------------------------------------------------------- VICReg
GRAM = [False, True]  # the covariance / cross-correlation through the D x D matrix, or the N x N Gram matrices


@pytest.mark.parametrize("gram", GRAM)
@pytest.mark.parametrize("scale", [0.3, 2.0])  # below and above the unit-std hinge
def test_vicreg_matches_naive_formula(scale, gram):
    z1 = (randn(8, 5, seed=1, grad=False) * scale).requires_grad_()
    z2 = (randn(8, 5, seed=2, grad=False) * scale).requires_grad_()
    out = check_against_naive(lambda a, b: vicreg_loss(a, b, gram=gram)["loss"], lambda a, b: naive_vicreg(a, b)[0],
                              (z1, z2))
    parts = vicreg_loss(z1, z2, gram=gram)
    for key, ref in zip(("invariance", "variance", "covariance"), naive_vicreg(z1, z2)[1]):
        close(parts[key], ref)
        assert not parts[key].requires_grad
    close(out, 25 * parts["invariance"] + 25 * parts["variance"] + parts["covariance"])
    close(vicreg_loss(z1, z2, 2.0, 3.0, 4.0, gram=gram)["loss"], naive_vicreg(z1, z2, 2.0, 3.0, 4.0)[0])


@pytest.mark.parametrize("gram", GRAM)
def test_vicreg_hand_computed(gram):
    # orthogonal, centred +-c columns with unbiased std 1/2: variance hinge 1/2, covariance 0
    h = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=F64)
    z = h * math.sqrt(3) / 4
    out = vicreg_loss(z, z.clone(), eps=0.0, gram=gram)
    close(out["variance"], 0.5)
    close(out["invariance"], 0.0)
    close(out["covariance"], 0.0)
    close(out["loss"], 25 * 0.5)
    close(vicreg_loss(z, z, eps=1e-4, gram=gram)["variance"], 1 - math.sqrt(0.25 + 1e-4))
    close(vicreg_loss(4 * z, 4 * z, gram=gram)["loss"], 0.0)  # std 2 >= 1: no hinge
    close(vicreg_loss(z, z + 1.0, eps=0.0, gram=gram)["invariance"], 1.0)
    # one column copied into another: C_01 = C_10 = Var = 1/4 off the diagonal, over D = 3
    dup = z.clone()
    dup[:, 1] = dup[:, 0]
    close(vicreg_loss(dup, dup, eps=0.0, gram=gram)["covariance"], 2 * (2 * 0.25 ** 2) / 3)


# ---------------------------------------------------------------------------- Barlow Twins
@pytest.mark.parametrize("gram", GRAM)
@pytest.mark.parametrize("lambd", [5e-3, 0.5])
def test_barlow_twins_matches_naive_formula(lambd, gram):
    z1, z2 = randn(9, 5, seed=1), randn(9, 5, seed=2)
    check_against_naive(lambda a, b: barlow_twins_loss(a, b, lambd, gram=gram),
                        lambda a, b: naive_barlow(a, b, lambd), (z1, z2))


@pytest.mark.parametrize("gram", GRAM)
def test_barlow_twins_hand_computed(gram):
    # centred orthogonal columns of biased variance 1 (any scale and shift): C = I, or -I when negated
    h = torch.tensor([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=F64)
    z = 3 * h + 5
    close(barlow_twins_loss(z, z, eps=0.0, gram=gram), 0.0, atol=1e-12)
    assert barlow_twins_loss(z, z, gram=gram).item() < 1e-9  # BatchNorm's eps 1e-5 moves C_ii by ~1e-6
    close(barlow_twins_loss(z, -z, eps=0.0, gram=gram), 4.0 * 3)
    # one dimension copied into another: C_01 = C_10 = 1 off the diagonal
    dup = h.clone()
    dup[:, 1] = dup[:, 0]
    close(barlow_twins_loss(dup, dup, lambd=0.5, eps=0.0, gram=gram), 0.5 * 2)


@pytest.mark.parametrize("n,d", [(64, 512), (512, 64)])
def test_gram_and_matrix_paths_agree_in_float32(n, d):
    """The two ways to ||C||^2 in fp32, where the Gram path subtracts the diagonal from the whole sum: at the
    sizes where each is the one chosen, value and gradient within fp32 rounding of the float64 truth."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(d, d, generator=g, dtype=F64) / d ** 0.5 + torch.eye(d, dtype=F64)  # correlated columns
    z1 = torch.randn(n, d, generator=g, dtype=F64) @ mix
    z2 = z1 + 0.5 * torch.randn(n, d, generator=g, dtype=F64)
    for fn in (lambda a, b, gram: vicreg_loss(a, b, gram=gram)["loss"],
               lambda a, b, gram: barlow_twins_loss(a, b, 0.01, gram=gram)):
        a64, b64 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
        truth = fn(a64, b64, False)
        grad64 = torch.autograd.grad(truth, a64)[0]
        for gram in GRAM:
            a, b = z1.float().requires_grad_(), z2.float().requires_grad_()
            value = fn(a, b, gram)
            assert value.dtype == torch.float32
            close(value, truth, rtol=2e-5, atol=0)
            close(torch.autograd.grad(value, a)[0], grad64, rtol=1e-3, atol=1e-4 * grad64.abs().max().item())


@pytest.mark.parametrize("gram", GRAM)
def test_batch_statistic_losses_stay_fp32_under_autocast(gram):
    """Called under bf16 autocast (a user's training loop), VICReg and Barlow Twins give the fp32 value and
    gradient: their matmuls are not cast down (bf16's 8 bits would not survive the Gram path's subtraction)."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 24, generator=g), torch.randn(16, 24, generator=g)
    for fn in (lambda a, b: vicreg_loss(a, b, gram=gram)["loss"], lambda a, b: barlow_twins_loss(a, b, gram=gram)):
        a = z1.clone().requires_grad_()
        ref = fn(a, z2)
        ref_grad = torch.autograd.grad(ref, a)[0]
        a = z1.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = fn(a, z2)
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(torch.autograd.grad(value, a)[0], ref_grad, rtol=1e-6, atol=1e-8)


def test_gram_path_is_chosen_where_it_does_less_work(monkeypatch):
    from visrep.ssl import objectives

    # Barlow Twins: 2 blocks of ceil(N / W) x N x D against N x D x D; VICReg 1 block per view against one product
    assert objectives._use_gram(None, 64, 512, 1, products=2)
    assert not objectives._use_gram(None, 256, 512, 1, products=2)
    assert objectives._use_gram(None, 2048, 8192, 8, products=2)  # the paper's sizes over 8 ranks
    assert objectives._use_gram(None, 256, 512, 2, products=2)  # W = 2: 2 x 128 < 512
    assert not objectives._use_gram(None, 512, 512, 2, products=2)  # 2 x 256 = 512: the product is no dearer
    assert objectives._use_gram(None, 9, 20, 2, products=2)  # unequal rows: ceil(9 / 2) = 5, 2 x 5 < 20
    assert objectives._use_gram(None, 255, 512, 1, products=1)
    assert not objectives._use_gram(None, 512, 512, 1, products=1)
    assert objectives._use_gram(True, 512, 8, 1, products=2) and not objectives._use_gram(False, 2, 512, 1, 2)
    calls = []
    real = objectives._gram_sq_sum
    monkeypatch.setattr(objectives, "_gram_sq_sum", lambda *a: calls.append(a[0].shape) or real(*a))
    z = randn(8, 40, seed=3)
    barlow_twins_loss(z, z + 1)
    vicreg_loss(z, z + 1)
    assert calls == [(8, 40)] * 3  # Barlow once (both views in one sum), VICReg once per view
    barlow_twins_loss(z[:, :10], z[:, :10])  # 2 x 8 >= 10: the D x D product
    assert len(calls) == 3


# ---------------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_named():
    a, b = torch.zeros(4, 3), torch.zeros(4, 2)
    for fn in (nt_xent_loss, vicreg_loss, barlow_twins_loss):
        with pytest.raises(ValueError, match=r"z1 \(4, 3\), z2 \(4, 2\)"):
            fn(a, b)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 3, 1\)"):
        nt_xent_loss(a, a[..., None])
    with pytest.raises(ValueError, match=r"k2 \(5, 3\)"):
        mocov3_loss(a, a, a, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss(a, a, temperature=0.0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        vicreg_loss(a[:1], a[:1])
    with pytest.raises(ValueError, match="at least 2 rows"):
        barlow_twins_loss(a[:1], a[:1])

    loss_fn = DINOLoss(3)
    t = torch.zeros(2 * 4, 3)
    with pytest.raises(ValueError, match=r"student_out \(10, 3\)"):
        loss_fn(torch.zeros(10, 3), t, 0.04)  # 10 rows are not crops of 4
    with pytest.raises(ValueError, match=r"teacher_out \(7, 3\)"):
        loss_fn(torch.zeros(12, 3), torch.zeros(7, 3), 0.04)
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        loss_fn([torch.zeros(4, 3), torch.zeros(4, 2)], t, 0.04)
    with pytest.raises(ValueError, match="teacher_out"):
        loss_fn(torch.zeros(12, 3), [torch.zeros(4, 3)] * 3, 0.04)
    with pytest.raises(ValueError, match="no fewer than the teacher"):
        loss_fn(torch.zeros(4, 3), t, 0.04)
    with pytest.raises(ValueError, match="at least 2"):
        DINOLoss(3, n_global_crops=1)(torch.zeros(4, 3), torch.zeros(4, 3), 0.04)
    with pytest.raises(ValueError, match="teacher_temp"):
        loss_fn(torch.zeros(12, 3), t, 0.0)
    with pytest.raises(ValueError, match="center_momentum"):
        DINOLoss(3, center_momentum=1.5)


# ---------------------------------------------------------------------------- 2 processes against 1
N, D_IN, D = 8, 6, 4
SPLITS = {"equal": (4, 4), "unequal": (5, 3)}
PAIR_LOSSES = {
    "nt_xent": lambda z1, z2, same: nt_xent_loss(z1, z2, 0.5, same_size=same),
    "vicreg": lambda z1, z2, same: vicreg_loss(z1, z2, same_size=same)["loss"],
    "barlow": lambda z1, z2, same: barlow_twins_loss(z1, z2, same_size=same),
    # the Gram path: each rank its rows' block, the partial sums added by all_reduce_with_grad
    "vicreg_gram": lambda z1, z2, same: vicreg_loss(z1, z2, same_size=same, gram=True)["loss"],
    "barlow_gram": lambda z1, z2, same: barlow_twins_loss(z1, z2, same_size=same, gram=True),
}
CASES = [(name, split) for name in [*PAIR_LOSSES, "mocov3"] for split in SPLITS] + [("dino", "equal")]
# L on every rank; the others return a share whose mean is L
VALUE_IS_GLOBAL = {"vicreg", "barlow", "vicreg_gram", "barlow_gram"}


def problem():
    """Query / student encoder (trained), key / teacher encoder (constant), global inputs of 3 crops."""
    torch.manual_seed(0)
    enc, key_enc = nn.Linear(D_IN, D).double(), nn.Linear(D_IN, D).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, N, D_IN, generator=g, dtype=F64)
    return enc, key_enc, x


def compute(name, rows, same):
    """One case on ``rows`` of the global batch: the loss and the gradients w.r.t. the inputs and the
    encoder's parameters (this process's, before any averaging)."""
    enc, key_enc, x = problem()
    x = x[:, rows].clone().requires_grad_()
    if name in PAIR_LOSSES:
        loss = PAIR_LOSSES[name](enc(x[0]), enc(x[1]), same)
    elif name == "mocov3":
        with torch.no_grad():
            k1, k2 = key_enc(x[0]), key_enc(x[1])
        loss = mocov3_loss(enc(x[0]), enc(x[1]), k1, k2, same_size=same)
    else:
        with torch.no_grad():
            teacher = key_enc(x[:2].reshape(-1, D_IN))
        loss = DINOLoss(D).double()(enc(x.reshape(-1, D_IN)), teacher, teacher_temp=0.05)
    loss.backward()
    return {"loss": loss.item(), "x": x.grad, "weight": enc.weight.grad, "bias": enc.bias.grad}


def centre_after_update(rows):
    """DINO's centre after one update from the teacher outputs of ``rows`` (from zero, m = 0.5)."""
    _, key_enc, x = problem()
    loss_fn = DINOLoss(D, center_momentum=0.5).double()
    loss_fn.center.fill_(1.0)
    with torch.no_grad():
        loss_fn.update_center([key_enc(x[0, rows]), key_enc(x[1, rows])])
    return loss_fn.center


def rank_rows(split, rank):
    start = sum(SPLITS[split][:rank])
    return slice(start, start + SPLITS[split][rank])


def worker(out_dir: str) -> None:
    import torch.distributed as dist

    from helpers import exit_cleanly

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    res = {f"{name}/{split}": compute(name, rank_rows(split, rank), same=split == "equal") for name, split in CASES}
    res["centre"] = centre_after_update(rank_rows("unequal", rank))
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")
    exit_cleanly()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks' results: 2 gloo processes started directly (no launcher)."""
    from helpers import two_gloo_ranks

    return two_gloo_ranks(Path(__file__).resolve(), tmp_path_factory.mktemp("ssl_dist"), timeout=120)


@pytest.mark.parametrize("name,split", CASES)
def test_two_processes_equal_one_on_the_global_batch(two_ranks, name, split):
    ref = compute(name, slice(None), same=False)
    ranks = [r[f"{name}/{split}"] for r in two_ranks]
    world = len(ranks)
    values = [r["loss"] for r in ranks]
    if name in VALUE_IS_GLOBAL:
        for v in values:
            assert v == pytest.approx(ref["loss"], rel=1e-10, abs=1e-12)
    else:
        assert sum(values) / world == pytest.approx(ref["loss"], rel=1e-10, abs=1e-12)
    # DDP's gradient average, done here: the mean of the ranks' parameter gradients is the 1-process one
    for key in ("weight", "bias"):
        close(sum(r[key] for r in ranks) / world, ref[key], rtol=1e-9, atol=1e-12)
    # ... because each rank's inputs received world times their rows' 1-process gradient
    for rank, r in enumerate(ranks):
        close(r["x"], world * ref["x"][:, rank_rows(split, rank)], rtol=1e-9, atol=1e-12)


def test_two_processes_dino_centre_is_the_global_mean(two_ranks):
    ref = centre_after_update(slice(None))
    for r in two_ranks:
        close(r["centre"], ref, rtol=1e-12, atol=1e-12)


if __name__ == "__main__":
    worker(sys.argv[1])
