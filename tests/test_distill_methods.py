"""Feature- and relation-based distillation (visrep.distill.features): FitNets, AT, DIST, RKD -- each loss
against a naive float64 formula written from its paper, gradients, hand-computed values, the hook wrapper,
and recipes/distill.py --kd.method X end to end."""
import copy
import functools
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import results, run_recipe
from visrep.checks import ConfigError
from visrep.distill import (DistillationLoss, FeatureDistiller, FrozenTeacher, KDConfig, at_loss, dist_loss,
                            fitnets_hint_loss, rkd_angle_loss, rkd_distance_loss)
from visrep.zoo import create_backbone
from visrep.zoo.features import collect_features

TINY = {
    "data": {"source": "digits", "image_size": 8, "hflip": 0.0, "label_fraction": 0.1},
    "teacher": {"source": "train", "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.5}},
                "train_epochs": 1, "optim": {"lr": 0.05}},
    "student": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
    "kd": {"allow_weaker_teacher": True},
    "optim": {"lr": 0.05},
    "schedule": {"epochs": 1, "warmup_epochs": 0.5},
    "run": {"batch_size": 32, "eval_batch_size": 128, "progress": False, "log_every": 1, "compile": "off"},
}


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------- naive formulas, straight from the papers


def naive_fitnets(s, t):
    """Romero et al. Eq. (3): 1/2 ||u_h - r(v_g)||^2 per sample, averaged over the batch."""
    return sum(0.5 * ((t[n] - s[n]) ** 2).sum() for n in range(len(s))) / len(s)


def naive_at(s_maps, t_maps, beta):
    """Zagoruyko & Komodakis: Q = sum_c |A_c|^2, vectorised, L2-normalised; beta/2 * the squared distance
    divided by the number of elements of the map and the batch size, summed over the pairs."""
    total = 0.0
    for s, t in zip(s_maps, t_maps):
        qs, qt = (s ** 2).sum(1, keepdim=True), (t ** 2).sum(1, keepdim=True)
        if qs.shape != qt.shape:
            qs = F.interpolate(qs, size=qt.shape[-2:], mode="bilinear", align_corners=False)
        n, hw = len(s), qt[0].numel()
        for i in range(n):
            a, b = qs[i].flatten(), qt[i].flatten()
            total = total + ((a / a.norm() - b / b.norm()) ** 2).sum() / (hw * n)
    return beta / 2 * total


def naive_pearson(u, v):
    mu, mv = u.mean(), v.mean()
    cov = ((u - mu) * (v - mv)).sum()
    return cov / (((u - mu) ** 2).sum().sqrt() * ((v - mv) ** 2).sum().sqrt())


def naive_dist(zs, zt, tau, beta, gamma):
    """Huang et al. Eqs. (5)-(7): 1 - mean Pearson over the rows (inter) and the columns (intra), times tau^2."""
    ys, yt = torch.softmax(zs / tau, 1), torch.softmax(zt / tau, 1)
    b, c = ys.shape
    inter = 1 - sum(naive_pearson(ys[i], yt[i]) for i in range(b)) / b
    intra = 1 - sum(naive_pearson(ys[:, j], yt[:, j]) for j in range(c)) / c
    return tau ** 2 * (beta * inter + gamma * intra)


def huber(a, b):
    d = abs(a - b)
    return 0.5 * d ** 2 if d < 1 else d - 0.5


def naive_rkd_distance(s, t):
    """Park et al. Eq. (4)-(5): psi_D = ||x_i - x_j|| / mu (mu over the distinct pairs); Huber, mean over B^2."""
    b = len(s)

    def psi(e):
        d = [[(e[i] - e[j]).norm() if i != j else e.new_zeros(()) for j in range(b)] for i in range(b)]
        mu = sum(d[i][j] for i in range(b) for j in range(b) if i != j) / (b * (b - 1))
        return [[d[i][j] / mu for j in range(b)] for i in range(b)]

    ps, pt = psi(s), psi(t)
    return sum(huber(ps[i][j], pt[i][j]) for i in range(b) for j in range(b)) / b ** 2


def naive_rkd_angle(s, t):
    """Park et al. Eq. (6)-(7): cos of the angle at x_j between x_i and x_k; Huber, mean over B^3."""
    b = len(s)

    def psi(e, i, j, k):
        if i == j or k == j:
            return e.new_zeros(())
        u, v = e[i] - e[j], e[k] - e[j]
        return (u / u.norm() * v / v.norm()).sum()

    return sum(huber(psi(s, i, j, k), psi(t, i, j, k)) for i, j, k in itertools.product(range(b), repeat=3)) / b ** 3


# ---------------------------------------------------------------- the losses


def test_fitnets_hint_is_the_papers_l2_normalised_per_element_with_gradients():
    s, t = rand(3, 4, 5, 5).requires_grad_(), rand(3, 4, 5, 5, seed=1)
    ours = fitnets_hint_loss(s, t)
    assert ours.dtype == torch.float64
    # the element-averaged MSE = the paper's per-sample 1/2 ||.||^2 times 2 / (C H W)
    torch.testing.assert_close(ours, naive_fitnets(s, t) * 2 / (4 * 5 * 5), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda a: fitnets_hint_loss(a, t), (s,))
    with pytest.raises(ValueError, match="differ in shape"):
        fitnets_hint_loss(s, t[:, :2])


def test_attention_transfer_matches_the_paper_hand_value_and_gradients():
    # hand-computed: Q_s = [1, 0], Q_t = [0, 1] (already unit norm); mean((Q_s - Q_t)^2) = 1; beta/2 = 500
    s = torch.tensor([[[[1.0, 0.0]]]], dtype=torch.float64)
    t = torch.tensor([[[[0.0, 1.0]]]], dtype=torch.float64)
    assert at_loss([s], [t], beta=1000.0).item() == pytest.approx(500.0, abs=1e-12)
    # several stages, channel counts differing (AT is channel-free), one student map at half the size
    s_maps = [rand(2, 3, 4, 4).requires_grad_(), rand(2, 5, 2, 2, seed=2).requires_grad_()]
    t_maps = [rand(2, 7, 4, 4, seed=3), rand(2, 6, 4, 4, seed=4)]
    ours = at_loss(s_maps, t_maps, beta=1000.0)
    torch.testing.assert_close(ours, naive_at(s_maps, t_maps, 1000.0), rtol=1e-10, atol=0)
    assert torch.autograd.gradcheck(lambda a, b: at_loss([a, b], t_maps, 1000.0), tuple(s_maps))


def test_dist_matches_the_paper_and_its_gradients():
    zs, zt = (rand(6, 5) * 3).requires_grad_(), rand(6, 5, seed=1) * 3
    for tau, beta, gamma in ((1.0, 1.0, 1.0), (4.0, 2.0, 2.0)):
        ours = dist_loss(zs, zt, tau, beta, gamma)
        torch.testing.assert_close(ours["loss"], naive_dist(zs, zt, tau, beta, gamma), rtol=1e-7, atol=1e-9)
        assert ours["loss"].item() == pytest.approx(beta * ours["inter"].item() + gamma * ours["intra"].item())
    assert torch.autograd.gradcheck(lambda a: dist_loss(a, zt, 4.0, 2.0, 2.0)["loss"], (zs,))
    # hand value, 2 classes: a centred row is (p - 1/2, 1/2 - p), so each Pearson correlation is +-1.
    # Sample 1: student p = sigmoid(1) > 1/2, teacher sigmoid(-1) < 1/2 -> -1; sample 2: equal -> +1;
    # inter = 1 - 0 = 1. Columns: p falls from sample 2 to 1 in both -> +1, +1; intra = 0.
    zs2 = torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    zt2 = torch.tensor([[0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    d = dist_loss(zs2, zt2, tau=1.0, beta=3.0, gamma=5.0)
    assert (d["inter"].item(), d["intra"].item()) == (pytest.approx(1.0, abs=1e-6), pytest.approx(0.0, abs=1e-6))
    assert d["loss"].item() == pytest.approx(3.0, abs=1e-5)


def test_rkd_matches_the_paper_hand_value_and_gradients():
    # hand-computed, 1-D embeddings: student 0, 1, 3 -> distances 1, 3, 2 (mean 2) -> 0.5, 1.5, 1;
    # teacher 0, 1, 2 -> 1, 2, 1 (mean 4/3) -> 0.75, 1.5, 0.75; four entries of the 3x3 matrix differ by
    # 0.25: Huber 0.5 * 0.25^2 each -> 4 * 0.03125 / 9
    s = torch.tensor([[0.0], [1.0], [3.0]], dtype=torch.float64)
    t = torch.tensor([[0.0], [1.0], [2.0]], dtype=torch.float64)
    assert rkd_distance_loss(s, t).item() == pytest.approx(4 * 0.03125 / 9, abs=1e-12)
    # collinear points: every angle is 0 or 180 degrees in both -> the same cosines, no loss
    assert rkd_angle_loss(s, t).item() == pytest.approx(0.0, abs=1e-12)
    es, et = rand(5, 4).requires_grad_(), rand(5, 7, seed=1)  # the widths differ: relations only
    torch.testing.assert_close(rkd_distance_loss(es, et), naive_rkd_distance(es, et), rtol=1e-10, atol=0)
    torch.testing.assert_close(rkd_angle_loss(es, et), naive_rkd_angle(es, et), rtol=1e-10, atol=0)
    assert torch.autograd.gradcheck(lambda a: rkd_distance_loss(a, et), (es,))
    assert torch.autograd.gradcheck(lambda a: rkd_angle_loss(a, et), (es,))
    # the gradients of the naive formulas (the teacher's side constant) equal ours
    g1 = torch.autograd.grad(25 * rkd_distance_loss(es, et) + 50 * rkd_angle_loss(es, et), es)[0]
    g2 = torch.autograd.grad(25 * naive_rkd_distance(es, et) + 50 * naive_rkd_angle(es, et), es)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


def test_distillation_loss_totals_as_the_kdconfig_docstring_says():
    zs, zt = rand(4, 10).requires_grad_(), rand(4, 10, seed=1)
    y = torch.tensor([0, 3, 5, 9])
    ce = F.cross_entropy(zs, y)
    kd = 16 * F.kl_div(F.log_softmax(zs / 4, 1), F.log_softmax(zt / 4, 1), reduction="batchmean", log_target=True)
    fs, ft = [rand(4, 3, 2, 2, seed=2)], [rand(4, 3, 2, 2, seed=3)]
    es, et = rand(4, 5, seed=4), rand(4, 6, seed=5)
    logit = 0.9 * kd + 0.1 * ce
    cases = {
        "kd": ({}, logit),
        "fitnets": ({"student_features": fs, "teacher_features": ft}, logit + 100 * fitnets_hint_loss(fs[0], ft[0])),
        "at": ({"student_features": fs, "teacher_features": ft}, logit + at_loss(fs, ft, 1000.0)),
        "rkd": ({"student_embedding": es, "teacher_embedding": et},
                logit + 25 * rkd_distance_loss(es, et) + 50 * rkd_angle_loss(es, et)),
        "dist": ({}, ce + dist_loss(zs, zt)["loss"]),
    }
    for method, (inputs, want) in cases.items():
        got = DistillationLoss(KDConfig(method=method))(zs, zt, y, **inputs)
        torch.testing.assert_close(got["loss"], want, rtol=1e-6, atol=1e-7, check_dtype=False, msg=method)
    got = DistillationLoss(KDConfig(method="dist", label_free=True))(zs, zt, None)
    torch.testing.assert_close(got["loss"], dist_loss(zs, zt)["loss"])
    with pytest.raises(ValueError, match="FeatureDistiller"):
        DistillationLoss(KDConfig(method="at"))(zs, zt, y)


# ---------------------------------------------------------------- the hook wrapper


@functools.lru_cache(maxsize=None)
def _built(name, width):
    torch.manual_seed(0)
    return create_backbone(name, num_classes=10, small_input=True, **({"width": width} if width else {}))


def models(student="resnet20", width=None):
    """(a fresh copy of ``student``, a frozen full-width ResNet-20 teacher); built once per session."""
    return copy.deepcopy(_built(student, width)), FrozenTeacher(copy.deepcopy(_built("resnet20", None)))


@pytest.mark.parametrize("student,width", [("resnet20", 0.25), ("mobilenetv2_050", None)])
def test_hooks_see_the_maps_of_collect_features_and_leave_the_student_keys(student, width):
    s, teacher = models(student, width)
    keys = list(s.state_dict())
    n_s, n_t = len(s.feature_info), len(teacher.model.feature_info)
    k = min(n_s, n_t)
    cfg = KDConfig(method="at", at_stages=list(range(-k, 0)))
    d = FeatureDistiller(s, teacher, cfg).train()
    x = rand(4, 3, 16, 16).float()
    out = d(x)
    ref_s = collect_features(s, x, d.s_idx)  # training mode, as the distiller's forward: the same batch stats
    with torch.no_grad():
        ref_t = collect_features(teacher.model, x, d.t_idx)
    assert len(out["student_features"]) == len(ref_s) == k
    for a, b in zip(out["student_features"], ref_s):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(out["teacher_features"], ref_t):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert not a.is_inference() and not a.requires_grad
    torch.testing.assert_close(out["logits"], s(x), rtol=0, atol=0)
    assert [k_[len("student."):] for k_ in d.state_dict()] == keys, "the student's keys, unchanged, nothing else"
    assert list(s.state_dict()) == keys
    d.eval()
    assert torch.equal(d(x), s.eval()(x)), "eval: the student's logits alone"


def test_wrapper_handles_channel_and_size_mismatch_and_trains_only_student_and_adapter():
    """A full-width ResNet-20 teacher (16/32/64 channels) and a MobileNetV2-0.5 student (8..160 channels,
    other reductions): fitnets maps channels with its regressor, at resizes the student's maps, rkd
    relates embeddings of different widths; the teacher gets no gradient."""
    x, y = rand(6, 3, 16, 16).float(), torch.arange(6) % 10
    for method in ("fitnets", "at", "rkd"):
        s, teacher = models("mobilenetv2_050")
        cfg = KDConfig(method=method, at_stages=[-2, -1], hint_stage=-2)
        d = FeatureDistiller(s, teacher, cfg).train()
        before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
        out = d(x)
        if method == "fitnets":
            sf, tf = out["student_features"][0], out["teacher_features"][0]
            assert sf.shape == tf.shape and sf.shape[1] == 64  # the teacher stage of the same reduction (4)
            assert d.regressor.conv.in_channels == s.feature_info[-2]["num_chs"] == 48
            assert sorted({k.split(".")[0] for k in d.state_dict()}) == ["regressor", "student"]
        if method == "at":
            assert [f.shape[-1] for f in out["student_features"]] == [4, 2]  # reductions 4, 8 at 16 px
            assert [f.shape[-1] for f in out["teacher_features"]] == [8, 4]
        if method == "rkd":
            assert out["student_embedding"].shape[1] == s.num_features != out["teacher_embedding"].shape[1]
        losses = DistillationLoss(cfg)(out.pop("logits"), out.pop("teacher_logits"), y, **out)
        losses["loss"].backward()
        assert torch.isfinite(losses["loss"])
        trained = [p for p in d.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
        assert len(trained) > 0 and all(p.grad is None for p in teacher.model.parameters())
        if method == "fitnets":
            assert d.regressor.conv.weight.grad.abs().sum() > 0
        assert all(torch.equal(v, before[k]) for k, v in teacher.model.state_dict().items())
        assert not teacher.training


def test_a_plain_student_state_dict_loads_into_the_wrapper():
    s, teacher = models(width=0.25)
    d = FeatureDistiller(s, teacher, KDConfig(method="fitnets"))
    other = {k: v + 1 if v.is_floating_point() else v for k, v in s.state_dict().items()}
    reg = {k: v.clone() for k, v in d.regressor.state_dict().items()}
    d.load_state_dict(other)  # what a finished stage's resume loads: the export
    assert all(torch.equal(v, other[k]) for k, v in s.state_dict().items())
    assert all(torch.equal(v, reg[k]) for k, v in d.regressor.state_dict().items())


def test_clear_config_errors():
    s, teacher = models(width=0.25)
    with pytest.raises(ConfigError, match=r"kd.hint_stage: stage index 7 is out of range for the student, whose "
                                          r"feature_info has 4 stages"):
        FeatureDistiller(s, teacher, KDConfig(method="fitnets", hint_stage=7))
    with pytest.raises(ConfigError, match=r"kd.at_teacher_stages: stage index -9 is out of range for the teacher"):
        FeatureDistiller(s, teacher, KDConfig(method="at", at_stages=[-1], at_teacher_stages=[-9]))
    with pytest.raises(ConfigError, match=r"kd.hint_teacher_stage: the teacher has no stage of reduction 8"):
        FeatureDistiller(models("mobilenetv2_050")[0], teacher, KDConfig(method="fitnets", hint_stage=-1))
    with pytest.raises(ConfigError, match="FeatureDistiller serves the feature methods"):
        FeatureDistiller(s, teacher, KDConfig(method="dist"))
    with pytest.raises(ConfigError, match=r"'kd.targets' has value 'hard'; expected 'soft' with kd.method dist"):
        KDConfig(method="dist", targets="hard").validate("kd.")
    with pytest.raises(ConfigError, match=r"'kd.at_teacher_stages'.*one teacher stage per student stage"):
        KDConfig(method="at", at_stages=[-2, -1], at_teacher_stages=[-1]).validate("kd.")


# ---------------------------------------------------------------- the recipe, end to end


@pytest.fixture(scope="module")
def teacher_run(tiny, tmp_path_factory):
    """One tiny run of the default method (its teacher is the others' teacher checkpoint)."""
    out = tmp_path_factory.mktemp("kd") / "kd"
    run_recipe("distill", ["--config", str(tiny), "--output-dir", str(out)])
    return out


@pytest.fixture(scope="module")
def method_run(tiny, teacher_run, tmp_path_factory):
    """``method -> (run dir, stdout)`` of a tiny run distilling from ``teacher_run``'s teacher (made once)."""
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(method) / method
            p = run_recipe("distill", teacher_args(tiny, teacher_run, method) + ["--output-dir", str(out)])
            runs[method] = out, p.stdout
        return runs[method]

    return get


def teacher_args(tiny, teacher_run, method):
    return ["--config", str(tiny), "--kd.method", method, "--teacher.source", "checkpoint",
            "--teacher.checkpoint", str(teacher_run / "models" / "teacher")]


@pytest.mark.parametrize("method", ["fitnets", "at", "dist", "rkd"])
def test_recipe_runs_each_method_and_exports_the_plain_student(teacher_run, method_run, method):
    from safetensors.torch import load_file

    from visrep.engine.export import load_model

    out, stdout = method_run(method)
    r, r0 = results(out), results(teacher_run)
    assert r["kd_method"] == method and r0["kd_method"] == "kd"
    assert r["student_scratch_acc"] == r0["student_scratch_acc"], "the same scratch student"
    assert r["teacher_acc"] == r0["teacher_acc"] and 0.0 <= r["student_kd_acc"] <= 1.0
    assert f"method={method}" in stdout
    net, cfg = load_model(out / "models" / "kd")
    kd_keys = set(load_file(str(out / "models" / "kd" / "model.safetensors")))
    assert kd_keys == set(load_file(str(out / "models" / "scratch" / "model.safetensors")))
    assert cfg["architecture"] == "resnet20" and sum(p.numel() for p in net.parameters()) == r["student_params"]
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    part = {"fitnets": "train/hint", "at": "train/at", "dist": "train/dist_inter", "rkd": "train/rkd_angle"}[method]
    vals = [rec[part] for rec in lines if rec.get("stage") == "kd" and part in rec]
    assert vals and all(math.isfinite(v) for v in vals)


def test_recipe_resumes_a_feature_method_to_the_same_weights(tiny, teacher_run, method_run, tmp_path):
    """Stopped after 2 optimizer steps of the fitnets KD stage (the regressor's weights and its optimizer
    state in the checkpoint), resumed: the same exported student as the uninterrupted run."""
    from safetensors.torch import load_file

    a = method_run("fitnets")[0]
    b = tmp_path / "b"
    args = teacher_args(tiny, teacher_run, "fitnets") + ["--output-dir", str(b), "--run.checkpoint-every", "2"]
    stop = json.loads((a / "state.json").read_text())["stages"]["scratch"]["steps"] + 2
    p = run_recipe("distill", args + ["--run.stop-after-steps", str(stop)])
    assert f"stopped after {stop} optimizer steps" in p.stdout + p.stderr and not (b / "results.json").exists()
    ckpt = sorted((b / "checkpoints" / "kd").iterdir())[-1]
    assert any("regressor" in k for f in ckpt.glob("model*.safetensors") for k in load_file(str(f)))
    run_recipe("distill", args + ["--resume", "latest"])
    wa, wb = (load_file(str(d / "models" / "kd" / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert results(a)["student_kd_acc"] == results(b)["student_kd_acc"]


def test_recipe_refuses_a_bad_stage_index_before_training(tiny, tmp_path, capsys):
    from helpers import run_in_process

    p = run_in_process("distill", ["--config", str(tiny), "--output-dir", str(tmp_path / "x"), "--kd.method",
                                   "fitnets", "--kd.hint-stage", "9"], capsys)
    assert p.returncode != 0 and "kd.hint_stage: stage index 9 is out of range" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "x" / "models").exists()
    p = run_in_process("distill", ["--config", str(tiny), "--output-dir", str(tmp_path / "y"), "--kd.method",
                                   "crd"], capsys)
    assert p.returncode == 2 and "kd.method" in p.stderr
