"""recipes/selfsup.py: every method end to end (results.json with its evaluation protocol card), exact resume
of DINO and MoCo v3 (weights, DINO's centre, teacher temperature and EMA momentum), DINO and MoCo v3
under DeepSpeed ZeRO-2 and ZeRO-3 ending with DDP's weights, the multi-crop views, and the config
errors."""
import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_file

from ds_helpers import fake_accelerator, load_recipe, without_use_cpu, zero_config_args
from helpers import ddp_reference, free_port, results, run_in_process, run_recipe, straight_and_stopped, write_preset
from test_user_errors import assert_one_clear_line
from visrep.ssl import METHODS

TINY = {
    "data": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.25},
    "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
    "simclr": {"proj_hidden_dim": 32, "proj_dim": 16},
    "mocov3": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32, "base_tau": 0.99},
    "dino": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_teacher_temp_epochs": 1.0,
             "base_tau": 0.99, "n_local": 2, "local_size": 8, "local_crop_scale": [0.1, 0.4]},
    "vicreg": {"proj_hidden_dim": 32, "proj_dim": 32},
    "barlow": {"proj_hidden_dim": 32, "proj_dim": 32},
    "byol": {"proj_hidden_dim": 32, "proj_dim": 16, "pred_hidden_dim": 32, "base_tau": 0.99},
    "augment": {"crop_scale": [0.3, 1.0], "hflip": 0.0},
    "optim": {"name": "lars", "lr": 1.0, "eta": 0.02, "weight_decay": 1e-5},
    "schedule": {"epochs": 2, "warmup_epochs": 0.5},
    "eval": {"knn_k": 10, "linear_epochs": 5, "every_epochs": 1},
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1},
}
RECIPE = "selfsup"  # recipes/selfsup.py (a recipe named ssl.py would shadow the standard ssl module)
STEPS_PER_EPOCH = 9  # 315 training digits (label_fraction 0.25) in batches of 32, last one dropped
ONE_EPOCH = ["--schedule.epochs", "1", "--eval.every-epochs", "0", "--eval.linear-epochs", "2"]


def model_dir(run_dir, method):
    return run_dir / "models" / method


def last_ckpt(run_dir, method):
    return sorted((run_dir / "checkpoints" / method).iterdir())[-1]


# ---------------------------------------------------------------------------- every method, 1 process
@pytest.mark.parametrize("method,extra", [(m, []) for m in METHODS] + [
    ("dino", ["--augment.device", "accelerator", "--run.grad-accum", "2"])],
    ids=list(METHODS) + ["dino-device-views-accum"])
def test_each_method_trains_and_records_its_eval_protocol(tiny, tmp_path, method, extra):
    out = tmp_path / "run"
    p = run_recipe(RECIPE, ["--config", str(tiny), "--method", method, "--output-dir", str(out), *ONE_EPOCH, *extra])
    res = results(out)
    assert res["method"] == method and "random init" in p.stdout and "pre-trained" in p.stdout
    for k in ("knn_acc", "linear_acc", "random_init_knn_acc", "random_init_linear_acc", "online_probe_acc"):
        assert 0.0 <= res[k] <= 1.0, k
    assert res["steps"] == (5 if "--run.grad-accum" in extra else STEPS_PER_EPOCH)  # 9 batches: 5 steps of <= 2
    assert ("final_tau" in res) == (method in ("mocov3", "dino", "byol"))
    assert ("final_teacher_temp" in res) == (method == "dino")
    card = res["eval_protocol"]
    assert card["reported_split"] == "test" and "nothing is selected on the test split" in card["selection"]
    assert card["knn"]["k"] == 10 and card["knn"]["temperature"] == 0.07 and card["knn"]["bank"] == "train split"
    assert card["knn"]["feature_normalisation"].startswith("L2")
    assert (card["linear"]["epochs"], card["linear"]["lr"], card["linear"]["batch_size"]) == (2, 0.1, 256)
    assert card["linear"]["train_split"] == "train split" and card["linear"]["reported"].startswith("test split")
    assert card["validation_monitor"]["split"] == "val" and card["splits"]["label_fraction"] == 0.25
    hp = card["hyperparameters"][method]
    assert card["method"] == method and all(hp[k] == v for k, v in TINY[method].items())
    assert card["hyperparameters"]["global_batch"] == 32 * (2 if "--run.grad-accum" in extra else 1)
    # the encoder alone, loadable as a zoo backbone, equal to the pre-trained online backbone
    from visrep.engine.export import load_model

    enc, meta = load_model(model_dir(out, method) / "backbone")
    assert meta["pretraining"] == method
    whole = load_file(str(model_dir(out, method) / "model.safetensors"))
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, whole["backbone." + k], rtol=0, atol=0)
    if method == "dino":  # the centre is a buffer of the model: exported (and checkpointed) with it
        assert whole["criterion.center"].abs().sum() > 0


# ---------------------------------------------------------------------------- exact resume
@pytest.mark.slow
@pytest.mark.parametrize("method", ["dino", "mocov3"])
def test_resume_is_exact(tiny, tmp_path, method):
    """Stopped after 7 optimizer steps (mid-epoch, inside DINO's teacher-temperature warm-up and last-layer
    freeze) and resumed: every weight (online, EMA target / teacher, probe, BN statistics, DINO's centre),
    the EMA's momentum and step, DINO's teacher temperature and weight decay equal the straight run's, bit
    for bit. DINO's last layer stays fixed through its one-epoch freeze and trains after it; its weight
    decay follows the cosine 1e-5 -> 1e-3, one value per optimizer step."""
    args = ["--config", str(tiny), "--method", method]
    if method == "dino":
        args += ["--dino.freeze-last-layer", "1", "--dino.weight-decay-end", "1e-3"]
    a, b = straight_and_stopped(RECIPE, args, tmp_path, 7)
    last_layer = "head.last_layer.weight_v"
    frozen = load_file(str(last_ckpt(b, method) / "model.safetensors")).get(last_layer)  # at step 7
    ema = torch.load(last_ckpt(b, method) / "extra_ema_rank0.pt", weights_only=True)
    assert ema["step"] == 7 and ema["total_steps"] == 2 * STEPS_PER_EPOCH
    if method == "dino":
        temp = torch.load(last_ckpt(b, method) / "extra_teacher_temp.pt", weights_only=True)
        assert temp["step"] == 7 and temp["warmup_steps"] == STEPS_PER_EPOCH
        assert 0.04 < temp["last"] < 0.07, "stopped inside the warm-up"
    run_recipe(RECIPE, [*args, "--output-dir", str(b), "--resume", "latest"])

    wa, wb = (load_file(str(model_dir(d, method) / "model.safetensors")) for d in (a, b))
    target = "teacher_backbone." if method == "dino" else "target_backbone."
    assert wa.keys() == wb.keys() and any(k.startswith(target) for k in wa)
    assert method != "dino" or "criterion.center" in wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)
    ea, eb = (torch.load(last_ckpt(d, method) / "extra_ema_rank0.pt", weights_only=True) for d in (a, b))
    assert ea == eb and ea["step"] == 2 * STEPS_PER_EPOCH and ea["last_tau"] > 0.99
    if method == "dino":
        ta, tb = (torch.load(last_ckpt(d, method) / "extra_teacher_temp.pt", weights_only=True) for d in (a, b))
        assert ta == tb and ta["last"] == 0.07
    if method == "dino":  # the last layer fixed through the freeze (steps 0-8), an EMA of it in the teacher
        at_9 = load_file(str(a / "checkpoints" / method / "step_00000009" / "model.safetensors"))
        torch.testing.assert_close(at_9[last_layer], frozen, rtol=0, atol=0)
        torch.testing.assert_close(at_9["teacher_" + last_layer], frozen)
        assert not torch.equal(wa[last_layer], frozen)
    ra, rb = results(a), results(b)
    for k in ("knn_acc", "linear_acc", "online_probe_acc", "z_std", "final_tau"):
        assert ra[k] == rb[k], k
    recs = [json.loads(l) for l in (a / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "train/loss" in r]
    assert [r["stage_step"] for r in logged] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    if method == "dino":  # the warm-up, one temperature per optimizer step: 0.04 at step 0 to 0.07 at step 9
        temps = [r["train/teacher_temp"] for r in logged]
        assert temps[0] == pytest.approx(0.04) and temps[STEPS_PER_EPOCH:] == [pytest.approx(0.07)] * STEPS_PER_EPOCH
        assert all(x < y for x, y in zip(temps[:STEPS_PER_EPOCH], temps[1:STEPS_PER_EPOCH + 1]))
        total = 2 * STEPS_PER_EPOCH  # the weight decay of step k: 1e-3 + (1e-5 - 1e-3)(1 + cos(pi k / 18)) / 2
        assert [r["train/weight_decay"] for r in logged] == pytest.approx(
            [1e-3 + (1e-5 - 1e-3) * (1 + math.cos(math.pi * k / total)) / 2 for k in range(total)], rel=1e-6)
    # the offline evaluation of the exported encoder reproduces the run's figures, with the same card
    run_recipe(RECIPE, [*args, "--eval-only", str(a), "--output-dir", str(tmp_path / "ev")])
    ev = json.loads((tmp_path / "ev" / "eval_results.json").read_text())
    assert ev["knn_acc"] == pytest.approx(ra["knn_acc"]) and ev["linear_acc"] == pytest.approx(ra["linear_acc"])
    assert ev["pretraining"] == method and ev["eval_protocol"]["knn"] == ra["eval_protocol"]["knn"]


# ---------------------------------------------------------------------------- DeepSpeed == DDP
# SGD (LARS is refused under ZeRO), BN-free heads where the method allows, one evaluation at the end
DS_TINY = dict(TINY, optim={"name": "sgd", "lr": 0.5, "weight_decay": 1e-5}, eval=dict(TINY["eval"], every_epochs=2))
PERSISTENCE = 300  # ZeRO-3 keeps parameters of at most this many elements whole, partitions the rest


@pytest.fixture(scope="module", params=["dino", pytest.param("mocov3", marks=pytest.mark.exhaustive)])
def ddp_run(request, tmp_path_factory):
    """One 2-process DDP run per method: the reference both ZeRO runs are compared with."""
    method = request.param
    tmp = tmp_path_factory.mktemp(f"ddp-{method}")
    preset, run_dir = ddp_reference(RECIPE, dict(DS_TINY, method=method), tmp)
    return method, preset, run_dir


@pytest.mark.slow
# `make test` keeps DINO under ZeRO-3 with a resume (its persistence threshold takes both EMA paths; the
# centre and the teacher temperature are checkpointed) and every recipe under ZeRO-2 bf16
# (tests/test_precision.py); the rest of the DeepSpeed-vs-DDP matrix (ZeRO-2, MoCo v3) runs in make test-all.
@pytest.mark.parametrize("zero", [pytest.param(2, marks=pytest.mark.exhaustive), 3])
def test_deepspeed_equals_ddp(ddp_run, zero, tmp_path, monkeypatch):
    """ZeRO-2 runs straight; ZeRO-3 (a persistence threshold that splits the model into partitioned and
    whole parameters, so both EMA paths run) too, and for DINO it stops after 5 steps and resumes, with its
    centre, teacher temperature and the EMA's per-rank master copies in the checkpoint (MoCo v3 keeps only
    the EMA, BYOL's, whose ZeRO-3 resume tests/test_deepspeed_byol.py checks). All end with DDP's weights
    (online, EMA target / teacher, probe, centre): 7 launches in all, one DDP reference per method."""
    method, preset, ddp = ddp_run
    without_use_cpu(monkeypatch)
    out = tmp_path / f"zero{zero}"
    args = ["--config", str(preset), "--output-dir", str(out)]
    zero_kw = {"stage3_param_persistence_threshold": PERSISTENCE} if zero == 3 else {}
    launch = zero_config_args(RECIPE, args, zero, free_port(), **zero_kw)
    if zero == 3 and method == "dino":
        run_recipe(RECIPE, args + ["--run.stop-after-steps", "5"], launcher_args=launch)
        args = args + ["--resume", "latest"]
    run_recipe(RECIPE, args, launcher_args=launch)
    ref, got = (load_file(str(model_dir(d, method) / "model.safetensors")) for d in (ddp, out))
    assert got.keys() == ref.keys() and (method != "dino" or "criterion.center" in ref)
    if zero == 3:
        trained = [v for k, v in ref.items() if v.is_floating_point() and "running_" not in k and "center" not in k]
        assert {v.numel() <= PERSISTENCE for v in trained} == {True, False}, "the threshold must split the model"
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=k)
    res, ref_res = results(out), results(ddp)
    assert res["final_tau"] == ref_res["final_tau"]
    assert res.get("final_teacher_temp") == ref_res.get("final_teacher_temp")
    assert abs(res["knn_acc"] - ref_res["knn_acc"]) <= 1.5 / 270, (res, ref_res)


def test_lars_and_dino_freeze_are_refused_under_deepspeed():
    from visrep.engine import ConfigError, from_dict

    recipe = load_recipe(RECIPE)
    lars, sgd = (from_dict(recipe.SSLRecipeConfig, dict(TINY, method="dino", optim=dict(TINY["optim"], name=n)))
                 for n in ("lars", "sgd"))
    frozen = from_dict(recipe.SSLRecipeConfig, dict(TINY, method="dino", optim=dict(TINY["optim"], name="sgd"),
                                                    dino=dict(TINY["dino"], freeze_last_layer=1.0)))
    for stage in (2, 3):
        with pytest.raises(ConfigError, match="optim.name 'lars'.*--optim.name sgd"):
            recipe.refuse_under_deepspeed(lars, fake_accelerator(stage))
        recipe.refuse_under_deepspeed(sgd, fake_accelerator(stage))
    for stage in (0, 2, 3):  # ZeRO-0 too: the engine steps inside backward at every stage
        with pytest.raises(ConfigError, match="dino.freeze_last_layer > 0.*--dino.freeze-last-layer 0"):
            recipe.refuse_under_deepspeed(frozen, fake_accelerator(stage))
    recipe.refuse_under_deepspeed(lars, fake_accelerator(None))
    recipe.refuse_under_deepspeed(frozen, fake_accelerator(None))


# ---------------------------------------------------------------------------- the pieces
def test_multicrop_views_on_the_loader_and_on_the_device():
    from visrep.ssl import BatchedBYOLAugment, BatchedMultiCrop, SSLAugmentConfig, multicrop_transforms

    cfg = SSLAugmentConfig(crop_scale=(0.3, 1.0), hflip=0.0)
    img = (torch.rand(1, 16, 16) * 255).to(torch.uint8)
    views = multicrop_transforms(cfg, 16, [0.5], [0.5], 1, n_local=3, local_size=8, local_crop_scale=(0.1, 0.4))(img)
    assert [tuple(v.shape) for v in views] == [(1, 16, 16)] * 2 + [(1, 8, 8)] * 3
    assert len(multicrop_transforms(cfg, 16, [0.5], [0.5], 1)(img)) == 2  # no local crops: BYOL's two views
    batch = (torch.rand(4, 1, 16, 16) * 255).to(torch.uint8)
    crops = BatchedMultiCrop(cfg, 16, [0.5], [0.5], 1, n_local=2, local_size=8, local_crop_scale=(0.1, 0.4))(batch, 7)
    assert [tuple(v.shape) for v in crops] == [(4, 1, 16, 16)] * 2 + [(4, 1, 8, 8)] * 2
    two = BatchedBYOLAugment(cfg, 16, [0.5], [0.5], 1)(batch, 7)
    for a, b in zip(crops[:2], two):  # the global crops are BYOL's views of the same seed
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dino_model_teacher_temperature_and_interface():
    from visrep.ssl import BarlowConfig, DINOConfig, SimCLRConfig, TeacherTemperature, VICRegConfig, build_method
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    cfg = DINOConfig(out_dim=12, hidden_dim=16, bottleneck_dim=8)
    net = build_method("dino", cfg, create_backbone("resnet20", num_classes=0, small_input=True, width=0.25), 10)
    g1, g2, l1, l2, l3 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), *torch.randn(3, 4, 3, 8, 8)
    out = net(g1, g2, l1, l2, l3)
    assert out["student"].shape == (5 * 4, 12) and out["teacher"].shape == (2 * 4, 12)
    assert out["logits"].shape == (4, 10) and not out["teacher"].requires_grad
    loss = net.criterion(out["student"], out["teacher"], 0.04)
    loss.backward()
    assert all(p.grad is not None for p in net.head.mlp.parameters())
    online, target = net.ema_pairs()
    assert len(online) == len(target) and not any(p.requires_grad for p in target)
    assert "criterion.center" in net.state_dict() and net.project(g1).shape == (4, 8)
    net.criterion.update_center([out["teacher"]])
    torch.testing.assert_close(net.criterion.center, 0.1 * out["teacher"].mean(0, keepdim=True))

    temp = TeacherTemperature(4, 0.04, 0.07)
    seen = []
    for _ in range(6):
        seen.append(temp.value)
        temp.tick()
    assert seen == pytest.approx([0.04, 0.0475, 0.055, 0.0625, 0.07, 0.07]) and temp.last == 0.07
    again = TeacherTemperature(4, 0.04, 0.07)
    again.load_state_dict(temp.state_dict())
    assert (again.step, again.value) == (6, 0.07)
    with pytest.raises(ValueError, match="warmup_steps"):
        TeacherTemperature(5, 0.04, 0.07).load_state_dict(temp.state_dict())
    for name, group in (("simclr", SimCLRConfig), ("vicreg", VICRegConfig), ("barlow", BarlowConfig)):
        bb = create_backbone("resnet20", num_classes=0, small_input=True, width=0.25)
        other = build_method(name, group(proj_hidden_dim=8, proj_dim=8), bb, 10)
        z = other(g1, g2)
        assert other.ema_pairs() is None and z["z"][0].shape == (4, 8) and z["logits"].shape == (4, 10)


def test_simclr_projector_ends_in_the_official_codes_scale_only_batch_norm():
    """SimCLR's head as google-research/simclr builds it: the last Linear without bias, then BN with a learnt
    scale and no shift. In training mode each output feature has mean 0 and standard deviation |scale| over
    the batch (the 2N views); the scale is trained without decay or LARS' trust ratio; SyncBatchNorm swaps
    the norm and keeps the scale; ``proj_last_bn=False`` gives the paper text's head (a biased Linear last)."""
    from visrep.ssl import SimCLRConfig, SSLOptimConfig, build_method, build_ssl_optimizer
    from visrep.ssl.heads import ScaledBatchNorm1d
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("resnet20", num_classes=0, small_input=True, width=0.25)
    net = build_method("simclr", SimCLRConfig(proj_hidden_dim=16, proj_dim=8), bb, 0)
    last_linear, norm = net.projector[3], net.projector[4]
    assert isinstance(norm, ScaledBatchNorm1d) and last_linear.bias is None and len(net.projector) == 5
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    z1, z2 = net(torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16))["z"]
    z = torch.cat([z1, z2])
    torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False).sqrt(), torch.linspace(0.5, 2.0, 8), atol=1e-3, rtol=0)
    F.normalize(z, dim=1).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0
    groups = build_ssl_optimizer(net, SSLOptimConfig(name="lars", lr=0.5, weight_decay=1e-5), 32).param_groups
    (home,) = [g for g in groups if any(p is norm.weight for p in g["params"])]
    assert home["weight_decay"] == 0 and home["lars_exclude"]
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(net.projector)
    assert isinstance(synced[4].bn, nn.SyncBatchNorm) and synced[4].weight is norm.weight

    plain = build_method("simclr", SimCLRConfig(proj_hidden_dim=16, proj_dim=8, proj_last_bn=False), bb, 0)
    assert len(plain.projector) == 4 and plain.projector[3].bias is not None


def test_simclr_projector_with_lightlys_affine_output_batch_norm():
    """``last_bn_affine``: lightly's SimCLR head, an affine BN on the output (mean = shift, std = |scale| per
    feature over the 2N views in training mode); asking for it without the output BN is one clear error."""
    from visrep.engine import ConfigError, from_dict
    from visrep.ssl import SimCLRConfig, build_method
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("resnet20", num_classes=0, small_input=True, width=0.25)
    net = build_method("simclr", SimCLRConfig(proj_hidden_dim=16, proj_dim=8, last_bn_affine=True), bb, 0)
    last_linear, norm = net.projector[3], net.projector[4]
    assert type(norm) is nn.BatchNorm1d and norm.affine and last_linear.bias is None
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
        norm.bias.copy_(torch.linspace(-1.0, 1.0, 8))
    z = torch.cat(net(torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16))["z"])
    torch.testing.assert_close(z.mean(0), torch.linspace(-1.0, 1.0, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(0, unbiased=False).sqrt(), torch.linspace(0.5, 2.0, 8), atol=1e-3, rtol=0)
    F.normalize(z, dim=1).sum().backward()
    assert norm.bias.grad is not None and norm.bias.grad.abs().sum() > 0  # the shift moves the cosines
    with pytest.raises(ConfigError, match="simclr.last_bn_affine.*false while simclr.proj_last_bn is false"):
        from_dict(SimCLRConfig, dict(proj_last_bn=False, last_bn_affine=True)).validate("simclr.")


def test_simclr_views_one_batch_or_one_at_a_time():
    """``simclr.joint_batch``: in eval mode the two ways give the same projections; in training mode with the
    official output BN, one view at a time gives each view's projections zero mean per feature (its own
    statistics), the joint batch only the 2N together."""
    from visrep.ssl import SimCLRConfig, build_method
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("resnet20", num_classes=0, small_input=True, width=0.25)
    cfg = SimCLRConfig(proj_hidden_dim=16, proj_dim=8)
    joint = build_method("simclr", cfg, bb, 0)
    alone = build_method("simclr", dataclasses.replace(cfg, joint_batch=False), copy.deepcopy(bb), 0)
    alone.load_state_dict(joint.state_dict())
    assert joint.joint_batch and not alone.joint_batch
    v1, v2 = torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16) + 1.0
    with torch.no_grad():
        for a, b in zip(joint.eval()(v1, v2)["z"], alone.eval()(v1, v2)["z"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        (a1, a2), (b1, b2) = joint.train()(v1, v2)["z"], alone.train()(v1, v2)["z"]
    for z in (b1, b2):
        torch.testing.assert_close(z.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat([a1, a2]).mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    assert a1.mean(0).abs().max() > 1e-2


@pytest.mark.parametrize("affine", [False, True])
def test_mocov3_output_batch_norms_with_and_without_scale_and_shift(affine):
    """MoCo v3's heads end in BN (the predictor only with ``pred_last_bn``): without affine parameters as in
    the official code, or with lightly's scale and shift (``last_bn_affine``), which then train on the query
    side and are carried to the key encoder by the EMA like every other parameter."""
    from visrep.ssl import MoCoV3Config, build_method
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    cfg = MoCoV3Config(proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16, pred_last_bn=True, last_bn_affine=affine)
    net = build_method("mocov3", cfg, create_backbone("resnet20", num_classes=0, small_input=True, width=0.25), 0)
    outs = [net.projector[-1], net.predictor[-1], net.target_projector[-1]]
    assert all(isinstance(bn, nn.BatchNorm1d) and bn.affine is affine for bn in outs)
    out = net(torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16))
    q = torch.cat(out["q"])
    torch.testing.assert_close(q[:6].mean(0), torch.zeros(8), atol=1e-5, rtol=0)  # each view its own batch
    F.normalize(q, dim=1).pow(3).sum().backward()
    online, target = net.ema_pairs()
    if affine:
        assert net.projector[-1].weight.grad.abs().sum() > 0 and net.predictor[-1].bias.grad.abs().sum() > 0
        assert any(p is net.projector[-1].weight for p in online)
        assert any(t is net.target_projector[-1].weight for t in target)
    else:
        assert not list(outs[0].parameters()) and not list(outs[1].parameters())
    assert len(online) == len(target)


def test_dino_crops_one_batch_or_one_at_a_time():
    """``dino.joint_batch``: with BatchNorm on running statistics (eval mode) the two ways give the same
    outputs in the same order (global crops, then local crops); in training mode one crop at a time normalises
    each crop by its own statistics -- the first crop's student output is then that crop alone through the
    student -- while the joint batch does not."""
    from visrep.ssl import DINOConfig, build_method
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    bb = create_backbone("resnet20", num_classes=0, small_input=True, width=0.25)
    cfg = DINOConfig(out_dim=12, hidden_dim=16, bottleneck_dim=8, head_batch_norm=True)
    joint = build_method("dino", cfg, bb, 0)
    alone = build_method("dino", dataclasses.replace(cfg, joint_batch=False), copy.deepcopy(bb), 0)
    alone.load_state_dict(joint.state_dict())
    crops = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    with torch.no_grad():
        a, b = joint.eval()(*crops), alone.eval()(*crops)
        for key in ("student", "teacher", "features"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
        a, b = joint.train()(*crops), alone.train()(*crops)
        first = alone.head(alone.backbone(crops[0]))
    assert a["student"].shape == b["student"].shape == (16, 12) and b["teacher"].shape == (8, 12)
    torch.testing.assert_close(b["student"][:4], first, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a["student"][:4], first, atol=1e-3)


@pytest.mark.parametrize("opt", ["lars", "sgd", "adamw"])
def test_dino_last_layer_freeze_and_weight_decay_cosine(opt):
    """DINO's two step schedules on each optimizer: for the first 3 of 6 steps the head's last layer (V and
    g, both trained here) is not changed at all -- its gradients are dropped, so neither the update nor the
    weight decay touches it -- while the rest trains; then it moves. The groups that decay get
    wd_k = end + (start - end)(1 + cos(pi k / K)) / 2, hand-computed for 0.04 -> 0.4 over K = 6; biases,
    norms and the probe none."""
    from visrep.engine import ScheduleConfig, StepSchedule
    from visrep.ssl import DINOConfig, SSLOptimConfig, WeightDecaySchedule, build_method, build_ssl_optimizer
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    cfg = DINOConfig(out_dim=12, hidden_dim=16, bottleneck_dim=8, norm_last_layer=False)
    net = build_method("dino", cfg, create_backbone("resnet20", num_classes=0, small_input=True, width=0.25), 10)
    optimizer = build_ssl_optimizer(net, SSLOptimConfig(name=opt, lr=0.5, weight_decay=0.04), 32)
    schedule = WeightDecaySchedule(StepSchedule(optimizer, ScheduleConfig(epochs=1, warmup_epochs=0), 6), 6, 0.04, 0.4)
    last, mlp = net.head.last_layer, net.head.mlp[0].weight
    frozen = [p.detach().clone() for p in last.parameters()]
    assert len(frozen) == 2 and all(p.requires_grad for p in last.parameters())
    wds = []
    for k in range(6):
        schedule.apply(k)
        wds.append({g["name"]: g["weight_decay"] for g in optimizer.param_groups})
        before = mlp.detach().clone()
        g1, g2 = torch.randn(2, 8, 3, 16, 16)
        out = net(g1, g2)
        (net.criterion(out["student"], out["teacher"], 0.04) + F.cross_entropy(out["logits"], torch.arange(8))).backward()
        if k < 3:
            net.cancel_last_layer_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert not torch.equal(mlp, before), k  # the rest of the head trains at every step
        same = [torch.equal(p, q) for p, q in zip(last.parameters(), frozen)]
        assert same == ([True, True] if k < 3 else [False, False]), k
    assert {name for name in wds[0]} == {"weights", "bias_and_norm", "probe"}
    assert [w["weights"] for w in wds] == pytest.approx([0.04, 0.064115, 0.13, 0.22, 0.31, 0.375885], abs=1e-6)
    assert all(w["bias_and_norm"] == 0.0 and w["probe"] == 0.0 for w in wds)


# ---------------------------------------------------------------------------- clear errors
@pytest.mark.parametrize("args,needles", [
    (["--method", "swav"], ("'method'", "'swav'", "simclr, mocov3, dino, vicreg, barlow, byol")),
    (["--method", "dino", "--dino.n-local", "-1"], ("'dino.n_local'", "-1", ">= 0")),
    (["--method", "dino", "--dino.local-size", "32"], ("'dino.local_size'", "32", "data.image_size (16)")),
    (["--method", "dino", "--dino.warmup-teacher-temp-epochs", "5"],
     ("'dino.warmup_teacher_temp_epochs'", "schedule.epochs (2)")),
    (["--method", "dino", "--dino.center-momentum", "1.5"], ("'dino.center_momentum'", "1.5")),
    (["--method", "dino", "--dino.freeze-last-layer", "3"], ("'dino.freeze_last_layer'", "schedule.epochs (2)")),
    (["--method", "dino", "--dino.weight-decay-end", "0.1", "--optim.weight-decay", "0"],
     ("'dino.weight_decay_end'", "optim.weight_decay")),
    (["--method", "simclr", "--simclr.temperature", "0"], ("'simclr.temperature'", "positive")),
    (["--method", "mocov3", "--mocov3.base-tau", "1.2"], ("'mocov3.base_tau'", "1.2")),
    (["--method", "barlow", "--barlow.proj-dim", "0"], ("'barlow.proj_dim'", ">= 1")),
    (["--method", "vicreg", "--vicreg.loss-path", "fast"], ("'vicreg.loss_path'", "'fast'", "auto, gram, matrix")),
])
def test_config_errors_are_one_clear_line(tiny, tmp_path, capsys, args, needles):
    p = run_in_process(RECIPE, ["--config", str(tiny), "--output-dir", str(tmp_path / "run"), *args], capsys)
    assert_one_clear_line(p, *needles)
    assert not (tmp_path / "run").exists()


def test_unknown_method_in_a_preset_is_a_config_error(tmp_path, capsys):
    bad = write_preset(tmp_path / "bad.yaml", dict(TINY, method="SimCLR"))
    p = run_in_process(RECIPE, ["--config", str(bad), "--output-dir", str(tmp_path / "run")], capsys)
    assert_one_clear_line(p, "'method'", "'SimCLR'", "one of simclr")


def test_digits_m_preset_is_the_digits_preset_with_colour_augmentation():
    """recipes/configs/ssl_digits_m.yaml names ssl_digits.yaml as its _base_: every method's hyper-parameters,
    the backbone, optimizer and schedule come from there (MoCo v3's predictor output BN too); only the data,
    the augmentation, the run folder and DINO's crop batching (chosen on Digits-M's validation split) differ."""
    from visrep.engine.config import diff_configs, parse_config, to_dict

    mod = load_recipe(RECIPE)
    presets = mod.PRESETS
    digits = to_dict(parse_config(mod.SSLRecipeConfig, ["--config", str(presets / "ssl_digits.yaml")]))
    digits_m = to_dict(parse_config(mod.SSLRecipeConfig, ["--config", str(presets / "ssl_digits_m.yaml")]))
    changed = {line.split(":")[0] for line in diff_configs(digits, digits_m)}
    assert changed == {"config", "output_dir", "data.source", "augment.crop_scale", "augment.jitter_prob",
                       "augment.saturation", "augment.grayscale_prob", "dino.joint_batch"}, changed
    assert digits_m["data"]["source"] == "digits_m" and digits_m["augment"]["jitter_prob"] == 0.8
    assert digits_m["mocov3"]["pred_last_bn"] is True and digits["mocov3"]["pred_last_bn"] is True
    assert digits["simclr"]["proj_last_bn"] is False  # chosen on validation; the config's default is True
    assert digits["dino"]["joint_batch"] is True and digits_m["dino"]["joint_batch"] is False


@pytest.mark.parametrize("method", ["vicreg", "barlow"])
def test_loss_path_reaches_the_loss(method, monkeypatch):
    """``vicreg.loss_path`` / ``barlow.loss_path``: ``matrix`` never takes the Gram path, ``gram`` always, ``auto``
    where it does less work (64 rows, D = 512 here); the loss is the same to fp32 rounding on all three."""
    from visrep.ssl import objectives

    mod = load_recipe(RECIPE)
    calls = []
    real = objectives._gram_sq_sum
    monkeypatch.setattr(objectives, "_gram_sq_sum", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(64, 512, generator=g), torch.randn(64, 512, generator=g))
    values = {}
    for path in ("matrix", "gram", "auto"):
        cfg = mod.parse_config(mod.SSLRecipeConfig, ["--method", method, f"--{method}.loss-path", path])
        calls.clear()
        values[path] = mod.ssl_loss(cfg, None, {"z": z}, None)[0].item()
        assert len(calls) == {"matrix": 0, "gram": 1, "auto": 1}[path] * (2 if method == "vicreg" else 1), path
    assert values["gram"] == pytest.approx(values["matrix"], rel=1e-5)
    assert values["auto"] == values["gram"]
