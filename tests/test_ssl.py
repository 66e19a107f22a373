"""visrep.ssl: BYOL loss, heads, EMA target, LARS, augmentations, evaluation, export (in process, fast)."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from visrep.engine.distributed import local_shard
from visrep.ssl import (BYOL, LARS, BatchedBYOLAugment, EMAUpdater, MLPHead, SSLAugmentConfig, SSLOptimConfig,
                        build_ssl_optimizer, byol_loss, byol_transforms, cosine_tau, knn_accuracy, knn_predict,
                        linear_eval, normalized_std, scaled_lr, ssl_param_groups)


class Tiny(nn.Module):
    """A BN-free backbone with the zoo's ``num_features``."""

    def __init__(self, d_in=6, width=5):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, width), nn.ReLU())
        self.num_features = width

    def forward(self, x):
        return self.body(x)


# ---------------------------------------------------------------------------- loss
def test_loss_equals_hand_computed_value():
    # p1 . z2' : cos 1 -> 0 ; p2 . z1' : cos 0 -> 2       (sample 0)
    # p1 . z2' : cos -1 -> 4 ; p2 . z1' : cos 1/sqrt2 -> 2 - sqrt2   (sample 1)
    p1 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[5.0, 0.0], [0.0, -3.0]])
    p2 = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    z1 = torch.tensor([[1.0, 0.0], [4.0, 0.0]])
    expected = ((0.0 + 2.0) + (4.0 + 2.0 - math.sqrt(2.0))) / 2
    assert byol_loss(p1, p2, z1, z2).item() == pytest.approx(expected, abs=1e-6)


def test_loss_matches_naive_formula_and_stops_target_gradient():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(7, 16, generator=g, requires_grad=True) for _ in range(4))
    naive = 0.0
    for i in range(7):
        for p, z in ((p1[i], z2[i]), (p2[i], z1[i])):
            naive = naive + ((p / p.norm() - z / z.norm()) ** 2).sum()
    naive = naive / 7
    loss = byol_loss(p1, p2, z1, z2)
    torch.testing.assert_close(loss, naive.detach(), rtol=1e-5, atol=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None
    assert 0.0 <= loss.item() <= 8.0


def test_collapse_monitor():
    z = torch.randn(4096, 64)
    assert normalized_std(z).item() == pytest.approx(64 ** -0.5, rel=0.05)
    assert normalized_std(torch.ones(32, 64) + 1e-9 * torch.randn(32, 64)).item() < 1e-6


# ---------------------------------------------------------------------------- heads / model
def test_heads_and_target_network():
    head = MLPHead(8, 32, 4)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head[0].bias is None and head[3].bias is not None
    assert MLPHead(8, 32, 4, batch_norm=False)[0].bias is not None

    torch.manual_seed(0)
    m = BYOL(Tiny(), proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=12, num_classes=3)
    names = [n for n, _ in m.named_parameters()]
    assert any(n.startswith("predictor.") for n in names)
    assert not any("predictor" in n for n in names if n.startswith("target")), "predictor exists only online"
    online, target = m.ema_pairs()
    assert len(online) == len(target)
    for o, t in zip(online, target):
        assert torch.equal(o, t) and o is not t and not t.requires_grad and o.requires_grad
    x1, x2, y = torch.randn(10, 6), torch.randn(10, 6), torch.randint(0, 3, (10,))
    out = m(x1, x2)
    assert out["p"][0].shape == (10, 8) and out["z_target"][0].shape == (10, 8) and out["logits"].shape == (10, 3)
    loss = byol_loss(*out["p"], *out["z_target"])
    loss.backward()
    assert all(t.grad is None for t in target), "the target receives no gradient"
    assert all(p.grad is None for p in m.probe.parameters()), "the BYOL loss does not reach the probe"
    assert all(p.grad is not None for p in m.predictor.parameters())
    m.zero_grad(set_to_none=True)
    F.cross_entropy(m(x1, x2)["logits"], y).backward()
    assert all(p.grad is None for p in m.backbone.parameters()), "the probe's loss does not reach the encoder"
    assert all(p.grad is not None for p in m.probe.parameters())
    opt = build_ssl_optimizer(m, SSLOptimConfig(), 256)
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(t) in opt_params for t in target)


# ---------------------------------------------------------------------------- EMA
@pytest.mark.parametrize("base", [0.996, 0.99])
def test_tau_schedule_at_0_half_and_end(base):
    K = 1000
    assert cosine_tau(0, K, base) == pytest.approx(base)
    assert cosine_tau(K // 2, K, base) == pytest.approx(1 - (1 - base) / 2)
    assert cosine_tau(K, K, base) == pytest.approx(1.0)
    assert cosine_tau(K + 10, K, base) == pytest.approx(1.0)
    k = 123
    assert cosine_tau(k, K, base) == pytest.approx(1 - (1 - base) * (math.cos(math.pi * k / K) + 1) / 2)
    ema = EMAUpdater(K, base)
    assert ema.tau == pytest.approx(base)
    ema.step = K // 2
    assert ema.tau == pytest.approx(1 - (1 - base) / 2)


def test_ema_update_matches_formula_and_state_round_trip():
    torch.manual_seed(0)
    online = [torch.randn(3, 4), torch.randn(5)]
    target = [torch.randn(3, 4), torch.randn(5)]
    before = [t.clone() for t in target]
    ema = EMAUpdater(10, 0.9)
    tau = ema.update(online, target)
    assert tau == pytest.approx(0.9) and ema.step == 1
    for t, b, o in zip(target, before, online):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
    state = ema.state_dict()
    other = EMAUpdater(10, 0.9)
    other.load_state_dict(state)
    assert other.step == 1 and other.tau == ema.tau and other.last_tau == ema.last_tau
    with pytest.raises(ValueError, match="total_steps"):
        EMAUpdater(20, 0.9).load_state_dict(state)


def test_ema_updates_zero3_shards_locally():
    """ZeRO-3 keeps an empty placeholder in ``param.data`` and this rank's flat shard in
    ``param.ds_tensor``; the update must touch the shard, elementwise."""
    def sharded(full, rank, world=2):
        p = nn.Parameter(torch.empty(0))
        chunk = -(-full.numel() // world)
        p.ds_tensor = full.flatten()[rank * chunk:(rank + 1) * chunk].clone()
        return p

    torch.manual_seed(0)
    full_on, full_tg = [torch.randn(4, 3), torch.randn(7)], [torch.randn(4, 3), torch.randn(7)]
    ref = [t.clone() for t in full_tg]
    EMAUpdater(10, 0.8).update(full_on, ref)  # unsharded reference
    for rank in (0, 1):
        on = [sharded(t, rank) for t in full_on]
        tg = [sharded(t, rank) for t in full_tg]
        assert local_shard(tg[0]) is tg[0].ds_tensor
        EMAUpdater(10, 0.8).update(on, tg)
        for t, r in zip(tg, ref):
            chunk = -(-r.numel() // 2)
            torch.testing.assert_close(t.ds_tensor, r.flatten()[rank * chunk:(rank + 1) * chunk])
            assert t.data.numel() == 0
    bad_on, bad_tg = [sharded(full_on[0], 0)], [sharded(full_tg[0], 0)]
    bad_tg[0].ds_tensor = bad_tg[0].ds_tensor[:2]
    with pytest.raises(ValueError, match="partitioned alike"):
        EMAUpdater(10).update(bad_on, bad_tg)


def byol_micro_step(acc, model, opt, ema, pairs, view1, view2):
    """One micro-batch of BYOL as the recipe writes it; the target's EMA update (its tau) follows each
    optimizer step only (None on the other micro-batches)."""
    with acc.accumulate(model):
        out = model(view1, view2)
        acc.backward(byol_loss(*out["p"], *out["z_target"]))
        opt.step()
        opt.zero_grad()
        return ema.update(*pairs) if acc.sync_gradients else None


def test_ema_runs_once_per_optimizer_step_under_accumulation():
    """Accumulation 4: the recipe's update (``if accelerator.sync_gradients``) runs on micro-batches
    4 and 8 only, and the schedule counts optimizer steps."""
    from accelerate import Accelerator
    from helpers import reset_accelerate

    try:
        acc = Accelerator(cpu=True, gradient_accumulation_steps=4)
        torch.manual_seed(0)
        model = BYOL(Tiny(), 16, 8, 16, num_classes=0, batch_norm=False)
        opt = build_ssl_optimizer(model, SSLOptimConfig(name="sgd", lr=1.0), 8 * 4)
        ema = EMAUpdater(total_steps=2, base_tau=0.5)
        model, opt = acc.prepare(model, opt)
        online, target = model.ema_pairs()
        snapshots, taus = [], []
        for i in range(8):
            tau = byol_micro_step(acc, model, opt, ema, (online, target), torch.randn(8, 6), torch.randn(8, 6))
            taus += [tau] if tau is not None else []
            snapshots.append([t.detach().clone() for t in target])
    finally:
        reset_accelerate()
    assert ema.step == 2 and taus == [pytest.approx(0.5), pytest.approx(0.75)]
    changed = [i for i in range(1, 8) if not all(torch.equal(a, b) for a, b in zip(snapshots[i], snapshots[i - 1]))]
    assert changed == [3, 7], changed


# ---------------------------------------------------------------------------- optimizer
def test_lars_step_matches_formula_and_excludes_bias_and_norm():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    groups = ssl_param_groups(m, SSLOptimConfig(weight_decay=0.1), lr=0.5, probe_lr=0.1)
    assert [g["name"] for g in groups] == ["weights", "bias_and_norm"]
    assert groups[0]["params"] == [m[0].weight] and groups[1]["weight_decay"] == 0.0 and groups[1]["lars_exclude"]
    assert all(g["initial_lr"] == 0.5 for g in groups)
    opt = LARS(groups, lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.02)
    w0, b0 = m[0].weight.detach().clone(), m[0].bias.detach().clone()
    m(torch.randn(8, 4)).pow(2).sum().backward()
    gw, gb = m[0].weight.grad.clone(), m[0].bias.grad.clone()
    opt.step()
    d = gw + 0.1 * w0
    d = d * 0.02 * w0.norm() / d.norm()
    torch.testing.assert_close(m[0].weight.detach(), w0 - 0.5 * d)
    torch.testing.assert_close(m[0].bias.detach(), b0 - 0.5 * gb)  # no decay, no trust ratio


def test_scaled_lr_and_optimizer_choices():
    assert scaled_lr(0.2, 64, 2, 4) == pytest.approx(0.2 * 512 / 256)
    m = BYOL(Tiny(), 16, 8, 16, num_classes=3)
    for name, cls in (("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)):
        opt = build_ssl_optimizer(m, SSLOptimConfig(name=name, lr=0.4, probe_lr=0.2), 512)
        assert isinstance(opt, cls)
        by_name = {g["name"]: g for g in opt.param_groups}
        assert by_name["weights"]["initial_lr"] == pytest.approx(0.8)
        assert by_name["probe"]["initial_lr"] == pytest.approx(0.4) and by_name["probe"]["weight_decay"] == 0
    opt = build_ssl_optimizer(m, SSLOptimConfig(lr=0.4, predictor_lr_mult=10), 512)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["predictor"]["initial_lr"] == pytest.approx(8.0)
    assert {id(p) for p in m.predictor.parameters()} == {id(p) for g in opt.param_groups
                                                         if g["name"].startswith("predictor") for p in g["params"]}


# ---------------------------------------------------------------------------- augmentations
def _digit_image():
    import numpy as np
    from PIL import Image

    a = np.zeros((32, 32, 3), np.uint8)
    a[8:24, 12:20] = (250, 120, 30)
    a[4:8, 4:28] = (30, 200, 90)
    return Image.fromarray(a)


def test_two_views_small_variant_and_reproducible():
    cfg = SSLAugmentConfig()
    tf = byol_transforms(cfg, 32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    text = repr(tf)
    assert "GaussianBlur" not in text, "32x32 inputs use the small-image variant (no blur)"
    assert "RandomSolarize" in text and "ColorJitter" in text and "RandomGrayscale" in text
    big = repr(byol_transforms(cfg, 96, (0.5,) * 3, (0.25,) * 3))
    assert big.count("GaussianBlur") == 2 and big.count("RandomSolarize") == 1, "asymmetric views"
    img = _digit_image()
    torch.manual_seed(3)
    v1, v2 = tf(img)
    torch.manual_seed(3)
    w1, w2 = tf(img)
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
    assert torch.equal(v1, w1) and torch.equal(v2, w2) and not torch.equal(v1, v2)


def test_batched_views_are_random_per_image():
    from torchvision.transforms import v2 as T

    x = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True)])(_digit_image())
    batch = x.expand(16, -1, -1, -1).contiguous()
    aug = BatchedBYOLAugment(SSLAugmentConfig(variant="imagenet"), 32, (0.0,) * 3, (1.0,) * 3)
    v1, v2 = aug(batch, seed=5)
    assert v1.shape == v2.shape == batch.shape
    assert v1.min() >= 0 and v1.max() <= 1 + 1e-6  # mean 0 / std 1: values stay in [0, 1]
    flat = v1.flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == 16, "every image draws its own parameters"
    r1, r2 = aug(batch, seed=5)
    assert torch.equal(r1, v1) and torch.equal(r2, v2)
    assert not torch.equal(aug(batch, seed=6)[0], v1)
    # no-op parameters leave the image unchanged
    ident = BatchedBYOLAugment(SSLAugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip=0.0,
                                                jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0),
                                                solarize_prob=(0.0, 0.0)), 32, (0.0,) * 3, (1.0,) * 3)
    torch.testing.assert_close(ident(batch, seed=0)[0], batch, atol=1e-5, rtol=0)
    # the loader ships uint8 (a quarter of the bytes); the views are those of the float input
    u8 = T.ToImage()(_digit_image()).expand(16, -1, -1, -1).contiguous()
    assert u8.dtype == torch.uint8 and torch.equal(u8.float().mul_(1 / 255), batch)
    w1, w2 = aug(u8, seed=5)
    assert torch.equal(w1, v1) and torch.equal(w2, v2)


# ---------------------------------------------------------------------------- evaluation
def test_knn_matches_naive_vote():
    g = torch.Generator().manual_seed(0)
    bank, labels = torch.randn(50, 8, generator=g), torch.randint(0, 4, (50,), generator=g)
    q = torch.randn(9, 8, generator=g)
    pred = knn_predict(bank, labels, q, 4, k=5, t=0.1, chunk=4)
    for i in range(9):
        sims = F.cosine_similarity(q[i][None], bank)
        top = sims.topk(5).indices
        votes = torch.zeros(4)
        for j in top:
            votes[labels[j]] += torch.exp(sims[j] / 0.1)
        assert pred[i].item() == votes.argmax().item()
    assert knn_accuracy(bank, labels, bank, labels, 4, k=1) == 1.0


def test_linear_eval_separable_and_leaves_global_rng():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 10, generator=g) * 4
    y = torch.randint(0, 3, (300,), generator=g)
    x = centers[y] + torch.randn(300, 10, generator=g)
    state = torch.get_rng_state()
    a = linear_eval(x[:200], y[:200], x[200:], y[200:], 3, epochs=20, lr=0.1, batch_size=64)
    assert torch.equal(state, torch.get_rng_state())
    b = linear_eval(x[:200], y[:200], x[200:], y[200:], 3, epochs=20, lr=0.1, batch_size=64)
    assert a == b and a["acc"] > 0.95


def test_exported_backbone_loads_in_the_zoo_and_timm(tmp_path):
    from accelerate import Accelerator
    from helpers import reset_accelerate

    from visrep.engine import BackboneConfig
    from visrep.engine.export import load_model
    from visrep.ssl import export_byol
    from visrep.zoo import create_backbone, get_data_config

    try:
        acc = Accelerator(cpu=True)
        for name in ("resnet20", "resnet18"):
            torch.manual_seed(0)
            bb = create_backbone(name, num_classes=0, small_input=True)
            model = acc.prepare(BYOL(bb, 16, 8, 16, num_classes=10))
            with torch.no_grad():
                model.backbone.stem[0].weight.add_(1.0) if name == "resnet20" else model.backbone.conv1.weight.add_(1.0)
            out = tmp_path / name
            export_byol(acc, model, out, BackboneConfig(name=name), get_data_config(bb))
            loaded = create_backbone(name, num_classes=0, small_input=True,
                                     checkpoint=out / "backbone" / "model.safetensors")
            for k, v in bb.state_dict().items():
                assert torch.equal(loaded.state_dict()[k], v), k
            again, meta = load_model(out / "backbone")
            assert meta["num_classes"] == 0 and meta["pretraining"] == "byol"
            if name == "resnet18":  # a timm backbone: the same key names as timm's own model
                import timm

                from safetensors.torch import load_file

                ref = timm.create_model("resnet18", num_classes=0)
                assert set(load_file(str(out / "backbone" / "model.safetensors"))) == set(ref.state_dict())
    finally:
        reset_accelerate()


def test_ema_of_a_bf16_target_moves_by_the_fp32_amount():
    """A target cast to bf16 (DeepSpeed bf16 casts it with the engine): at tau = 0.996 one step moves a
    weight by ~4e-3 of the gap, below bf16's resolution near 1, so a bf16 EMA never moves. The updater
    keeps an fp32 master copy: after 100 steps the bf16 target equals the fp32 EMA to bf16 rounding."""
    from visrep.ssl import EMAUpdater

    torch.manual_seed(0)
    online = [torch.full((64,), 1.0) + 0.01 * torch.randn(64), torch.randn(3, 3) * 0.0 + 0.5]
    start = [torch.ones(64), torch.full((3, 3), 0.25)]
    ref = [s.clone() for s in start]
    tgt = [s.clone().to(torch.bfloat16) for s in start]
    naive = [s.clone().to(torch.bfloat16) for s in start]
    ema, ema_ref = EMAUpdater(1000, 0.996, 0.996), EMAUpdater(1000, 0.996, 0.996)
    for _ in range(100):
        ema.update([o.to(torch.bfloat16) for o in online], tgt)
        ema_ref.update(online, ref)
        for n, o in zip(naive, online):  # what a plain bf16 lerp does
            torch.lerp(n, o.to(torch.bfloat16), 0.004, out=n)
    moved_ref = (ref[0] - start[0]).abs().max()
    assert moved_ref > 1e-3
    assert torch.equal(naive[0], start[0].to(torch.bfloat16)), "a bf16 EMA does not move at all"
    for t, r in zip(tgt, ref):
        torch.testing.assert_close(t.float(), r, rtol=0, atol=4e-3)  # bf16 rounding of the fp32 EMA
    assert (tgt[0].float() - start[0]).abs().max() > 0.5 * moved_ref
    # the fp32 master copies are saved and restored: a resumed updater continues exactly
    state = ema.state_dict()
    again = EMAUpdater(1000, 0.996, 0.996)
    again.load_state_dict(state)
    t2 = [t.clone() for t in tgt]
    ema.update([o.to(torch.bfloat16) for o in online], tgt)
    again.update([o.to(torch.bfloat16) for o in online], t2)
    assert all(torch.equal(a, b) for a, b in zip(tgt, t2))
