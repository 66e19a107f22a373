import math

import pytest
import torch
import torch.nn.functional as F

from visrep.distill import DistillationLoss, FrozenTeacher, KDConfig, soft_target_kd_loss


def test_kd_loss_hand_computed():
    # Rows are permutations of each other, so the log-partition functions cancel:
    # log p_t - log p_s = (t - s) / T, and KL = sum_i p_t,i * (t_i - s_i) / T.
    s = torch.tensor([[1.0, 2.0, 3.0]])
    t = torch.tensor([[3.0, 2.0, 1.0]])
    e = math.exp
    kl_T1 = 2 * (e(3) - e(1)) / (e(3) + e(2) + e(1))
    assert soft_target_kd_loss(s, t, 1.0).item() == pytest.approx(kl_T1, rel=1e-6)
    kl_T2 = (e(1.5) - e(0.5)) / (e(1.5) + e(1.0) + e(0.5))
    assert soft_target_kd_loss(s, t, 2.0).item() == pytest.approx(4 * kl_T2, rel=1e-6)
    # batchmean: a second, identical pair adds 0 and halves the mean
    s2, t2 = torch.cat([s, t]), torch.cat([t, t])
    assert soft_target_kd_loss(s2, t2, 2.0).item() == pytest.approx(2 * kl_T2, rel=1e-6)


def naive_kd(s, t, T):
    total = 0.0
    for row_s, row_t in zip(s.double(), t.double()):
        p_t = torch.exp(row_t / T) / torch.exp(row_t / T).sum()
        p_s = torch.exp(row_s / T) / torch.exp(row_s / T).sum()
        total += (p_t * (p_t.log() - p_s.log())).sum()
    return (total / s.shape[0]) * T * T


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0, 10.0])
def test_kd_loss_matches_naive(T):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 3
    assert soft_target_kd_loss(s, t, T).item() == pytest.approx(naive_kd(s, t, T).item(), rel=1e-5)


def test_kd_loss_zero_for_identical_logits_and_fp32_under_bf16():
    x = torch.randn(8, 10)
    assert soft_target_kd_loss(x, x.clone(), 4.0).abs().item() < 1e-6
    out = soft_target_kd_loss(x.bfloat16(), x.bfloat16() + 0.5, 4.0)
    assert out.dtype == torch.float32


def test_kd_gradient_magnitude_roughly_independent_of_T():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(32, 10, generator=g)
    s0 = torch.randn(32, 10, generator=g)
    norms, raw = {}, {}
    for T in (4.0, 8.0, 16.0):
        s = s0.clone().requires_grad_(True)
        soft_target_kd_loss(s, t, T).backward()
        norms[T] = s.grad.norm().item()
        s = s0.clone().requires_grad_(True)
        (soft_target_kd_loss(s, t, T) / (T * T)).backward()
        raw[T] = s.grad.norm().item()
    assert 0.8 < norms[4.0] / norms[16.0] < 1.25
    assert raw[4.0] / raw[16.0] > 10  # without T**2 the gradient would shrink ~T**2


def test_teacher_logits_get_no_gradient_and_shape_mismatch_is_clear():
    s = torch.randn(4, 10, requires_grad=True)
    t = torch.randn(4, 10, requires_grad=True)
    soft_target_kd_loss(s, t, 2.0).backward()
    assert t.grad is None and s.grad is not None
    with pytest.raises(ValueError, match="same classes"):
        soft_target_kd_loss(torch.randn(4, 10), torch.randn(4, 5))


def test_distillation_loss_mixing_weight():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    kd, ce = soft_target_kd_loss(s, t, 3.0), F.cross_entropy(s, y)
    out = DistillationLoss(KDConfig(temperature=3.0, kd_weight=0.7))(s, t, y)
    assert out["loss"].item() == pytest.approx(0.7 * kd.item() + 0.3 * ce.item(), rel=1e-6)
    hard = DistillationLoss(KDConfig(kd_weight=1.0, targets="hard"))(s, t, y)
    assert hard["loss"].item() == pytest.approx(F.cross_entropy(s, t.argmax(-1)).item(), rel=1e-6)
    free = DistillationLoss(KDConfig(temperature=3.0, kd_weight=0.2, label_free=True))(s, t)
    assert free["loss"].item() == pytest.approx(kd.item(), rel=1e-6)
    with pytest.raises(ValueError, match="labels are required"):
        DistillationLoss(KDConfig())(s, t)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.bn = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.drop(self.bn(self.conv(x)).mean((2, 3))))


def test_frozen_teacher_stays_eval_no_grad_and_adapts_normalisation():
    torch.manual_seed(0)
    net = _Net()
    teacher = FrozenTeacher(net, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), (0.4, 0.4, 0.4), (0.2, 0.2, 0.2))
    teacher.train()
    assert not teacher.training and not net.training and not net.bn.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    out = teacher(x)
    assert not out.requires_grad
    raw = x.detach() * 0.25 + 0.5  # back to pixel space, then the teacher's normalisation
    assert torch.allclose(out, net((raw - 0.4) / 0.2), atol=1e-5)
    same = FrozenTeacher(_Net(), (0.5,) * 3, (0.25,) * 3, (0.5,) * 3, (0.25,) * 3)
    assert not same.adapt
