"""The supervised objective (visrep.engine.supervised): label smoothing, MixUp / CutMix targets drawn from a
seed, and trained auxiliary classifiers, also under DDP."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from visrep.checks import ConfigError
from visrep.engine.config import validate
from visrep.engine.supervised import SupervisedConfig, SupervisedObjective, recorded_aux_logits

K = 5


def batch(n=6, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, K, (n,), generator=g)


def test_plain_and_label_smoothed_cross_entropy_against_the_formula():
    x, y = batch()
    logits = torch.randn(6, K, dtype=torch.float64)
    obj = SupervisedObjective(SupervisedConfig(), K)
    assert obj.mix(x, y, None) == (x, y)
    assert obj(torch.nn.Identity(), logits, y)["loss"].item() == pytest.approx(F.cross_entropy(logits, y).item())
    eps = 0.2
    smooth = SupervisedObjective(SupervisedConfig(label_smoothing=eps), K)
    t = (1 - eps) * F.one_hot(y, K) + eps / K  # Szegedy et al.: (1 - eps) * one-hot + eps / K
    naive = -(t * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert smooth(torch.nn.Identity(), logits, y)["loss"].item() == pytest.approx(naive.item(), rel=1e-6)


def test_mixup_mixes_images_and_targets_with_one_lambda():
    x, y = batch()
    obj = SupervisedObjective(SupervisedConfig(mixup_alpha=0.8), K)
    xm, t = obj.mix(x, y, draw=3)
    assert t.shape == (6, K) and torch.allclose(t.sum(1), torch.ones(6))
    # target_i = lam * onehot(y_i) + (1 - lam) * onehot(y_{i-1}); recover lam from a sample with y_i != y_{i-1}
    i = next(i for i in range(6) if y[i] != y[i - 1])
    lam = t[i, y[i]].item()
    assert 0 < lam < 1
    expect_t = lam * F.one_hot(y, K) + (1 - lam) * F.one_hot(y.roll(1, 0), K)
    assert torch.allclose(t, expect_t.float(), atol=1e-6)
    assert torch.allclose(xm, lam * x + (1 - lam) * x.roll(1, 0), atol=1e-5)


def test_cutmix_pastes_a_box_whose_area_is_the_target_weight():
    x, y = batch(size=16)
    obj = SupervisedObjective(SupervisedConfig(cutmix_alpha=1.0), K)
    for draw in range(5):
        xm, t = obj.mix(x, y, draw=draw)
        from_self = (xm == x).all(dim=1)  # (B, H, W): pixel kept from the sample itself
        from_prev = (xm == x.roll(1, 0)).all(dim=1)
        assert (from_self | from_prev).all()
        kept = from_self[0].float().mean().item()  # one box for the whole batch
        assert (from_self.float().mean(dim=(1, 2)) == kept).all()
        i = next(i for i in range(6) if y[i] != y[i - 1])
        assert t[i, y[i]].item() == pytest.approx(kept, abs=1e-6)


def test_draws_are_seeded_by_step_and_rank_and_leave_the_global_generator_alone():
    x, y = batch()
    cfg = SupervisedConfig(mixup_alpha=1.0, cutmix_alpha=1.0, mix_prob=0.8)
    a, b = SupervisedObjective(cfg, K, seed=1), SupervisedObjective(cfg, K, seed=1)
    stage = SimpleNamespace(epoch=2, batch_in_epoch=7)
    before = torch.get_rng_state()
    first = a.mix(x, y, stage)
    assert torch.equal(torch.get_rng_state(), before)
    again = b.mix(x, y, stage)  # a resumed run at the same micro-batch
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    draws = {round(a.mix(x, y, SimpleNamespace(epoch=2, batch_in_epoch=j))[1].max().item(), 6) for j in range(12)}
    assert len(draws) > 3  # different micro-batches, different lam (some unmixed: mix_prob 0.8)
    other_rank = SupervisedObjective(cfg, K, seed=1, rank=1).mix(x, y, stage)
    assert not torch.equal(first[1], other_rank[1])
    unmixed = SupervisedObjective(SupervisedConfig(mixup_alpha=1.0, mix_prob=1e-9), K).mix(x, y, stage)
    assert torch.equal(unmixed[0], x) and torch.equal(unmixed[1], F.one_hot(y, K).float())


def test_soft_targets_with_smoothing_against_the_formula():
    x, y = batch()
    obj = SupervisedObjective(SupervisedConfig(mixup_alpha=0.5, label_smoothing=0.1), K)
    _, t = obj.mix(x, y, draw=0)
    logits = torch.randn(6, K)
    naive = -(((1 - 0.1) * t + 0.1 / K) * torch.log_softmax(logits, -1)).sum(-1).mean()
    assert obj(torch.nn.Identity(), logits, t)["loss"].item() == pytest.approx(naive.item(), rel=1e-6)


def test_googlenet_auxiliary_classifiers_are_trained_with_weight_0_3():
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    net = create_backbone("googlenet", num_classes=K)
    x, y = batch(n=4, size=32)
    net.train()
    obj = SupervisedObjective(SupervisedConfig(), K)
    logits = net(x)
    aux = recorded_aux_logits(net)
    assert len(aux) == 2
    losses = obj(net, logits, y)
    expect = F.cross_entropy(logits, y) + 0.3 * (F.cross_entropy(aux[0], y) + F.cross_entropy(aux[1], y))
    assert losses["loss"].item() == pytest.approx(expect.item(), rel=1e-6)
    assert losses["aux"].item() == pytest.approx((F.cross_entropy(aux[0], y) + F.cross_entropy(aux[1], y)).item(),
                                                 rel=1e-6)
    losses["loss"].backward()
    assert net.aux1.fc2.weight.grad.abs().sum() > 0 and net.aux2.fc2.weight.grad.abs().sum() > 0
    # the same through a wrapper (what DDP / a compiled module look like) and nothing in eval mode
    wrapped = torch.nn.Module()
    wrapped.module = net
    assert recorded_aux_logits(wrapped)[0] is aux[0]
    net.eval()
    assert recorded_aux_logits(net) == ()


@pytest.mark.parametrize("key,value", [("label_smoothing", 1.0), ("mixup_alpha", -1.0), ("mix_prob", 1.5)])
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"supervised.{key}"):
        validate(SupervisedConfig(**{key: value}), "supervised.")


# ---- the data side: RandAugment and random erasing, seeded per sample -------------------------------------------
def _image(seed=0, channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, 16, 16), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_is_seeded_and_changes_the_image(channels):
    from visrep.data.images import build_transforms, seeded

    dc = {"mean": (0.5,) * channels, "std": (0.25,) * channels, "input_size": (channels, 16, 16)}
    plain = build_transforms(dc, 16, train=True, hflip=0.0, augment="none")
    ra = build_transforms(dc, 16, train=True, hflip=0.0, augment="none", randaugment=(2, 9))
    img = _image(channels=channels)
    outs = []
    for s in (1, 1, 2):
        with seeded(s):
            outs.append(ra(img))
    assert torch.equal(outs[0], outs[1])  # the same sample seed (a resumed epoch): the same image
    changed = [not torch.equal(ra_out, plain(img)) for ra_out in outs]
    assert any(changed)


def test_random_erasing_replaces_one_box_with_noise():
    from visrep.data.images import build_transforms, seeded

    dc = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "input_size": (3, 16, 16)}
    plain = build_transforms(dc, 16, train=True, hflip=0.0, augment="none")
    erase = build_transforms(dc, 16, train=True, hflip=0.0, augment="none", random_erasing=1.0)
    img = _image()
    with seeded(5):
        out = erase(img)
    diff = (out != plain(img)).any(dim=0)
    rows, cols = diff.any(dim=1).nonzero().flatten(), diff.any(dim=0).nonzero().flatten()
    box = diff[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    area = box.numel() / diff.numel()
    assert box.all() and 0.02 <= area <= 1 / 3 + 1e-6  # one rectangle of 2-33% of the image
    assert build_transforms(dc, 16, train=False, random_erasing=1.0)(img).equal(
        build_transforms(dc, 16, train=False)(img))  # evaluation: never


@pytest.mark.slow
def test_finetune_with_mixing_and_augmentation_resumes_exactly(tmp_path):
    import json

    from safetensors.torch import load_file

    from helpers import run_recipe, straight_and_stopped, write_preset
    from test_finetune_recipe import TINY

    tiny = write_preset(tmp_path / "tiny.yaml", TINY)
    base = ["--config", str(tiny), "--init.source", "scratch", "--finetune.strategy", "full",
            "--compare-scratch", "False", "--schedule.epochs", "2"]
    args = [*base, "--supervised.mixup-alpha", "0.4", "--supervised.cutmix-alpha", "1.0",
            "--supervised.label-smoothing", "0.1", "--data.randaugment-ops", "2", "--data.random-erasing", "0.25"]
    a, b = straight_and_stopped("finetune", args, tmp_path, 15)  # 378 labels: 12 steps an epoch
    run_recipe("finetune", [*args, "--output-dir", str(b), "--resume", "latest"])
    weights = lambda d: load_file(str(d / "models" / "finetune" / "model.safetensors"))  # noqa: E731
    wa, wb = weights(a), weights(b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    run_recipe("finetune", [*base, "--output-dir", str(tmp_path / "plain")])
    wp = weights(tmp_path / "plain")
    assert any(not torch.allclose(wp[k].float(), wa[k].float()) for k in wa)  # the options took effect
    cfg = (a / "config.yaml").read_text()
    assert "mixup_alpha: 0.4" in cfg and "randaugment_ops: 2" in cfg
    assert json.loads((a / "results.json").read_text())["target_acc"] > 0


@pytest.mark.slow
def test_distill_mixes_the_batch_teacher_and_student_see(tmp_path, monkeypatch):
    """With CutMix on, every KD step's teacher input is the mixed batch the student trains on (not the loader's
    batch), and the label term is the smoothed cross-entropy on the mixed targets."""
    import json

    from helpers import run_recipe, write_preset
    from test_distill_recipe import TINY
    from visrep.distill.teacher import FrozenTeacher

    mixed, seen = [], []
    real_mix, real_forward = SupervisedObjective.mix, FrozenTeacher.forward

    def spy_mix(self, x, y, stage=None, draw=None):
        xm, t = real_mix(self, x, y, stage, draw)
        if stage is not None and stage.name == "kd":
            mixed.append((x.clone(), xm.clone(), t.clone()))
        return xm, t

    def spy_forward(self, x):
        seen.append(x.detach().clone())
        return real_forward(self, x)

    monkeypatch.setattr(SupervisedObjective, "mix", spy_mix)
    monkeypatch.setattr(FrozenTeacher, "forward", spy_forward)
    tiny = write_preset(tmp_path / "tiny.yaml", TINY)
    out = tmp_path / "run"
    run_recipe("distill", ["--config", str(tiny), "--output-dir", str(out), "--schedule.epochs", "1",
                           "--teacher.train-epochs", "1", "--supervised.cutmix-alpha", "1.0",
                           "--supervised.label-smoothing", "0.1", "--kd.allow-weaker-teacher", "True"])
    assert len(mixed) == 9  # one per KD micro-batch (315 images, batches of 32, last dropped)
    assert any(not torch.equal(x, xm) for x, xm, _ in mixed)  # CutMix changed the images
    for x, xm, t in mixed:
        assert t.shape == (x.shape[0], 10) and torch.allclose(t.sum(1), torch.ones(len(t)))
        assert any(s.shape == xm.shape and torch.equal(s, xm) for s in seen), "the teacher saw the mixed batch"
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kd = [r for r in recs if r.get("stage") == "kd" and "train/kd" in r]
    assert kd and all(r["train/ce"] > 0.1 for r in kd)  # smoothed CE on soft targets: never near 0


# ---- 2 processes: DDP of GoogLeNet with its auxiliary classifiers, no unused parameters -------------------------
def worker(out_dir: str, use_aux: str) -> None:
    import torch.distributed as dist

    from helpers import exit_cleanly
    from visrep.zoo import create_backbone

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    net = create_backbone("googlenet", num_classes=K)
    ddp = torch.nn.parallel.DistributedDataParallel(net)  # find_unused_parameters=False, as the recipes
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    obj = SupervisedObjective(SupervisedConfig(aux_weight=0.3 if use_aux == "aux" else 0.0), K)
    error = None
    try:
        for step in range(2):
            x, y = batch(n=4, size=32, seed=10 * step + rank)
            logits = ddp(x)
            loss = obj(ddp, logits, y)["loss"] if use_aux == "aux" else F.cross_entropy(logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
    except RuntimeError as e:
        error = str(e)
    torch.save({"error": error, "aux1": net.aux1.fc2.weight.detach().clone()}, Path(out_dir) / f"rank{rank}.pt")
    exit_cleanly()


@pytest.mark.slow
def test_auxiliary_classifiers_under_ddp(tmp_path):
    from helpers import two_gloo_ranks

    torch.manual_seed(0)
    from visrep.zoo import create_backbone
    init = create_backbone("googlenet", num_classes=K).aux1.fc2.weight.detach().clone()
    ranks = two_gloo_ranks(Path(__file__).resolve(), tmp_path / "aux", "aux")
    assert ranks[0]["error"] is None and ranks[1]["error"] is None
    assert torch.equal(ranks[0]["aux1"], ranks[1]["aux1"]) and not torch.equal(ranks[0]["aux1"], init)
    # the hazard the objective removes: CE on the main logits only leaves the aux heads without gradients
    plain = two_gloo_ranks(Path(__file__).resolve(), tmp_path / "plain", "main-only")
    assert plain[0]["error"] is not None and "reduction" in plain[0]["error"]


if __name__ == "__main__":
    (Path(sys.argv[1])).mkdir(parents=True, exist_ok=True)
    worker(sys.argv[1], sys.argv[2])
