"""visrep.transfer: GRL and its schedule, MMD, CORAL, freezing, layer decay, L2-SP, Digits-M."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from visrep.engine import OptimConfig, ScheduleConfig, StepSchedule, build_optimizer
from visrep.transfer import (L2SP, AdaptationModel, BestOnValidation, GradualUnfreezer, GRLSchedule,
                             PairedDataset, coral, dann_lambda, domain_adversarial_loss, freeze, grad_reverse,
                             is_locked, layer_decay_param_groups, mk_mmd, param_stage_ids, stage_names)
from visrep.transfer.align import bandwidth_heuristic
from visrep.zoo import create_backbone


def tiny_resnet(num_classes=10):
    torch.manual_seed(0)
    return create_backbone("resnet20", num_classes=num_classes, small_input=True, width=0.25)


# ---------------------------------------------------------------------------------------------- GRL
def test_grl_identity_forward_and_exact_negated_backward():
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(5, 7, dtype=torch.float64)
    for lam in (0.0, 0.37, 1.0):
        y = grad_reverse(x, lam)
        assert torch.equal(y, x)
        x.grad = None
        y.backward(g)
        assert torch.equal(x.grad, -lam * g)


def test_dann_lambda_schedule_values_and_state():
    assert dann_lambda(0.0) == 0.0
    for p in (0.1, 0.5, 1.0):
        assert dann_lambda(p) == pytest.approx(2 / (1 + math.exp(-10 * p)) - 1, abs=1e-15)
    assert dann_lambda(0.5) == pytest.approx(0.9866142981514305)
    assert dann_lambda(1.0) == pytest.approx(0.9999092042625951)
    assert dann_lambda(2.0) == dann_lambda(1.0)  # clamped
    s = GRLSchedule(total_steps=40)
    for _ in range(10):
        s.step()
    assert s.progress == 0.25 and s.value == pytest.approx(dann_lambda(0.25))
    t = GRLSchedule(total_steps=40)
    t.load_state_dict(s.state_dict())
    assert t.num_steps == 10 and t.value == s.value
    with pytest.raises(ValueError, match="optimizer steps"):
        GRLSchedule(total_steps=41).load_state_dict(s.state_dict())


def test_domain_loss_and_discriminator_accuracy():
    ds, dt = torch.tensor([[2.0], [-1.0]]), torch.tensor([[-3.0], [0.5], [-0.2]])
    loss, acc = domain_adversarial_loss(ds, dt)
    bce = nn.functional.binary_cross_entropy_with_logits
    ref = 0.5 * (bce(ds.flatten(), torch.ones(2)) + bce(dt.flatten(), torch.zeros(3)))
    assert loss.item() == pytest.approx(ref.item()) and acc.item() == pytest.approx(3 / 5)


# ---------------------------------------------------------------------------------------------- MMD
def naive_mmd(x, y, multipliers, h):
    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / (c * h)) for c in multipliers) / len(multipliers)

    m, n = len(x), len(y)
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return sxx + syy - 2 * sxy


def test_mmd_matches_naive_formula_with_unequal_batches():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randn(6, 4, generator=g, dtype=torch.float64) * 1.5 + 0.5
    mults = (0.5, 1.0, 2.0)
    val, h = mk_mmd(x, y, mults, return_bandwidth=True)
    z = torch.cat([x, y])
    d2 = [float(((z[i] - z[j]) ** 2).sum()) for i in range(len(z)) for j in range(len(z)) if i != j]
    assert h.item() == pytest.approx(float(torch.tensor(d2, dtype=torch.float64).median()))
    assert val.item() == pytest.approx(naive_mmd(x, y, mults, h.item()), rel=1e-10, abs=1e-12)
    mean_h = mk_mmd(x, y, mults, heuristic="mean", return_bandwidth=True)[1]
    assert mean_h.item() == pytest.approx(np.mean(d2))


def test_mmd_near_zero_same_distribution_positive_when_shifted():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 16, generator=g), torch.randn(200, 16, generator=g)
    same = mk_mmd(a, b).item()
    shifted = mk_mmd(a, b + 1.0).item()
    assert abs(same) < 0.01
    assert shifted > 0.1 and shifted > 20 * abs(same)


def test_mmd_gradient_finite_and_bandwidth_has_no_gradient():
    x = torch.randn(8, 3, requires_grad=True)
    y = torch.randn(5, 3, requires_grad=True)
    val = mk_mmd(x, y)
    val.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all() and x.grad.abs().sum() > 0
    assert not bandwidth_heuristic(torch.cdist(x, x) ** 2).requires_grad
    with pytest.raises(ValueError, match="at least 2"):
        mk_mmd(x[:1], y)


# ---------------------------------------------------------------------------------------------- CORAL
def test_coral_equals_hand_computed_value():
    xs = torch.tensor([[1.0, 2.0], [3.0, 0.0], [2.0, 4.0]])
    xt = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    # source: mean (2, 2); centred rows (-1,0), (1,-2), (0,2) -> C_s = [[2,-2],[-2,8]] / 2 = [[1,-1],[-1,4]]
    # target: mean (1, 1); centred rows (-1,-1), (1,1)       -> C_t = [[2,2],[2,2]] / 1
    # diff = [[-1,-3],[-3,2]] -> ||.||_F^2 = 1 + 9 + 9 + 4 = 23; / (4 * 2^2) = 23 / 16
    assert coral(xs, xt).item() == pytest.approx(23 / 16)
    assert coral(xs.double(), xt.double()).dtype == torch.float64
    assert coral(xs.bfloat16(), xt.bfloat16()).dtype == torch.float32  # computed in fp32
    assert coral(xs, xs + 5.0).item() == pytest.approx(0.0, abs=1e-6)  # centred: a shift costs nothing


# ---------------------------------------------------------------------------------------------- freezing
def _train_steps(model, steps=3, lr=0.1):
    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=5e-4))
    model.train()
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("mode,kw,frozen", [("all_but_head", {}, [0, 1, 2, 3]), ("first_n", {"first_n": 2}, [0, 1]),
                                            ("stages", {"stages": ["stem", "stages.2"]}, [0, 3])])
def test_frozen_params_and_bn_stats_bitwise_unchanged(mode, kw, frozen):
    model = tiny_resnet()
    assert freeze(model, mode, **kw) == frozen
    ids = param_stage_ids(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model)
    frozen_mods = [stage_names(model)[i] for i in frozen]
    for k, v in model.state_dict().items():
        in_frozen = any(k == m or k.startswith(m + ".") for m in frozen_mods)
        if in_frozen:
            assert torch.equal(v, before[k]), f"{k} changed although frozen"
        elif k in ids or k.endswith("running_mean"):
            if k.endswith("num_batches_tracked"):
                continue
            assert not torch.equal(v, before[k]), f"{k} did not train"
    bns = [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)
           and any(n == f or n.startswith(f + ".") for f in frozen_mods)]
    assert bns and all(is_locked(b) and not b.training for b in bns)
    model.train()
    assert all(not b.training for b in bns), "frozen BN must stay in eval mode under model.train()"


def test_gradual_unfreezing_schedule_keeps_frozen_stages_bitwise():
    model = tiny_resnet()
    unf = GradualUnfreezer(model, every=1)
    assert [unf.lowest_trainable(e) for e in range(6)] == [4, 3, 2, 1, 0, 0]
    unf.set_epoch(1)  # head and stages.2 train
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(model, OptimConfig(lr=0.1))
    model.train()
    for _ in range(2):
        nn.functional.cross_entropy(model(torch.randn(8, 3, 16, 16)), torch.randint(0, 10, (8,))).backward()
        unf.mask_grads()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        if k.startswith(("stem", "stages.0", "stages.1")):
            assert torch.equal(v, before[k]), k
    changed = [k for k in before if k.startswith("stages.2") and not torch.equal(before[k], model.state_dict()[k])]
    assert changed, "the unfrozen stage must train"
    unf.load_state_dict({"epoch": 4})
    assert not any(is_locked(m) for m in model.modules())


def test_layer_decay_gives_expected_group_lrs_and_schedule_scales_them():
    model = tiny_resnet()
    groups = layer_decay_param_groups(model, lr=0.1, weight_decay=1e-4, layer_decay=0.5, head_lr_scale=2.0)
    got = {(g["stage"], g["weight_decay"]): g["lr"] for g in groups}
    expect = {0: 0.1 * 0.5 ** 4, 1: 0.1 * 0.5 ** 3, 2: 0.1 * 0.5 ** 2, 3: 0.1 * 0.5, 4: 0.2}
    for (stage, wd), lr in got.items():
        assert lr == pytest.approx(expect[stage]) and wd in (0.0, 1e-4)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    for name in ("sgd", "adamw"):
        groups = layer_decay_param_groups(model, lr=0.1, weight_decay=1e-4, layer_decay=0.5, head_lr_scale=2.0)
        opt = build_optimizer(groups, OptimConfig(name=name, lr=0.1))
        assert [g["lr"] for g in opt.param_groups] == [g["initial_lr"] for g in opt.param_groups]
        sched = StepSchedule(opt, ScheduleConfig(epochs=1, warmup_epochs=0, schedule="cosine"), steps_per_epoch=10)
        sched.apply(5)
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(expect[g["stage"]] * sched.factor(5))
    freeze(model, "first_n", first_n=2)
    assert {g["stage"] for g in layer_decay_param_groups(model, 0.1, 0.0, 0.5)} == {2, 3, 4}


def test_stage_assignment_for_timm_resnet():
    model = create_backbone("resnet18", num_classes=3, small_input=True)
    ids = param_stage_ids(model)
    assert stage_names(model) == ["act1", "layer1", "layer2", "layer3", "layer4", "head"]
    assert ids["conv1.weight"] == 0 and ids["bn1.bias"] == 0 and ids["layer3.0.conv1.weight"] == 3
    assert ids["fc.weight"] == 5


def test_l2sp_pulls_toward_start_and_survives_state_dict():
    model = tiny_resnet()
    reg = L2SP(model, alpha=0.1, beta=0.01)
    head_sq = sum((p ** 2).sum() for p in model.fc.parameters())
    assert reg(model).item() == pytest.approx(0.5 * 0.01 * head_sq.item(), rel=1e-6)
    with torch.no_grad():
        model.stem.conv.weight.add_(1.0) if hasattr(model.stem, "conv") else next(model.stem.parameters()).add_(1.0)
    n = next(model.stem.parameters()).numel()
    assert reg(model).item() == pytest.approx(0.5 * 0.1 * n + 0.5 * 0.01 * head_sq.item(), rel=1e-5)
    other = L2SP(tiny_resnet(), 0.0, 0.0)
    other.load_state_dict(reg.state_dict())
    assert other(model).item() == pytest.approx(reg(model).item())


# ---------------------------------------------------------------------------------------------- adaptation pieces
def test_adaptation_model_forward_and_best_keeper():
    backbone = create_backbone("resnet20", num_classes=0, small_input=True, width=0.25)
    model = AdaptationModel(backbone, 10, bottleneck_dim=16, discriminator_hidden=8)
    xs, xt = torch.randn(4, 3, 16, 16), torch.randn(3, 3, 16, 16)
    out = model(xs, xt, grl_coeff=0.5)
    assert out["logits_s"].shape == (4, 10) and out["features_t"].shape == (3, 16)
    assert out["domain_s"].shape == (4, 1) and out["domain_t"].shape == (3, 1)
    model.eval()
    assert model(xs).shape == (4, 10)
    keep = BestOnValidation()
    assert keep.update(model, 0.5, 1) and not keep.update(model, 0.4, 2)
    other = BestOnValidation()
    other.load_state_dict(keep.state_dict())
    assert other.best_epoch == 1 and other.weights.keys() == model.state_dict().keys()


class _Items(torch.utils.data.Dataset):
    def __init__(self, n, offset):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.tensor(float(self.offset + i)), 100 + i


def test_paired_dataset_is_a_function_of_seed_and_epoch_and_hides_target_labels():
    p = PairedDataset(_Items(7, 0), _Items(3, 1000), seed=0)
    (xs, xt), y = p[2]
    assert xs.item() == 2 and y == 102 and 1000 <= xt.item() < 1003
    first = [p[i][0][1].item() for i in range(7)]
    assert sorted(first[:3]) == [1000, 1001, 1002]  # each target once before any repeats
    p.set_epoch(1)
    second = [p[i][0][1].item() for i in range(7)]
    q = PairedDataset(_Items(7, 0), _Items(3, 1000), seed=0)
    q.set_epoch(1)
    assert second == [q[i][0][1].item() for i in range(7)]
    # an index that carries its epoch (a persistent loader worker never sees set_epoch)
    from visrep.data.images import EpochIndex

    r = PairedDataset(_Items(7, 0), _Items(3, 1000), seed=0)
    assert [r[EpochIndex(i, 1)][0][1].item() for i in range(7)] == second
    assert [r[EpochIndex(i, 0)][0][1].item() for i in range(7)] == first


# ---------------------------------------------------------------------------------------------- Digits-M
def test_digits_m_shares_the_digit_split_and_is_fixed():
    from visrep.data.digits_m import blend, digits_m_arrays, load_digits_m_splits
    from visrep.data.sources import DataConfig, load_splits

    cfg = DataConfig(image_size=16)
    m, s = load_digits_m_splits(cfg), load_splits(cfg)
    for split in ("train", "val", "test"):
        assert m[split]["label"] == s[split]["label"]
    assert len(m["test"]) == 270 and len(m["train"]) + len(m["val"]) + len(m["test"]) == 1797
    a, labels, idx = digits_m_arrays(cfg)
    b, _, _ = digits_m_arrays(cfg)
    assert np.array_equal(a, b) and a.shape == (1797, 16, 16, 3) and a.dtype == np.uint8
    assert a.reshape(len(a), -1, 3).std(axis=1).mean() > 5  # coloured, not grey
    assert set(idx["test"]).isdisjoint(idx["train"])
    assert np.array_equal(blend(np.full((2, 2), 200, np.uint8), np.full((2, 2, 3), 50, np.uint8)),
                          np.full((2, 2, 3), 150, np.uint8))
    small = load_digits_m_splits(DataConfig(image_size=16, label_fraction=0.1))
    assert len(small["train"]) == 126 and small["test"]["label"] == m["test"]["label"]


def test_load_backbone_weights_strips_prefix_ignores_head_and_names_missing_keys(tmp_path):
    from safetensors.torch import save_file

    from visrep.transfer import load_backbone_weights

    src = tiny_resnet(num_classes=0)
    f = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(f))
    dst = tiny_resnet(num_classes=7)
    info = load_backbone_weights(dst, f)
    assert info["loaded"] == len(src.state_dict()) and info["dropped"] == []
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    partial = {k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("stages.2")}
    save_file(partial, str(f))
    with pytest.raises(ValueError, match="missing.*stages.2"):
        load_backbone_weights(tiny_resnet(), f)
