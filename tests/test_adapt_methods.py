"""CDAN(+E), MCC and MDD: each loss against a naive float64 formula written from its paper (values and
gradients) and hand-computed cases; the gradient reversal into the discriminator / adversarial head;
MCC and CDAN+E's weights in 2 gloo processes against 1 process on the global batch; each method end
to end through recipes/adapt.py, an exact resume, and clear config errors."""
import json
import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from helpers import exit_cleanly, free_port, results, run_recipe, straight_and_stopped
from visrep.transfer import (AdaptationModel, MinimumClassConfusionLoss, MultiLinearMap, RandomizedMultiLinearMap,
                             conditioning_map, domain_adversarial_loss, entropy_weights, mcc_loss, mdd_loss)
from visrep.zoo import create_backbone

D64 = torch.float64


def close(a, b, **kw):
    torch.testing.assert_close(a, b, **{"rtol": 1e-10, "atol": 1e-12, **kw})


# ---------------------------------------------------------------------------------------------- naive formulas
def naive_softmax(z):
    e = [[math.exp(v - max(row)) for v in row] for row in z]
    return [[v / sum(row) for v in row] for row in e]


def naive_entropy(p):
    return -sum(v * math.log(v) for v in p if v > 0)


def naive_mcc(logits, temperature):
    """Jin et al. 2020, arXiv:1912.03699, Sec. 3, element by element (row-normalised confusion)."""
    y = naive_softmax([[v / temperature for v in row] for row in logits.tolist()])
    b, c = len(y), len(y[0])
    e = [1 + math.exp(-naive_entropy(row)) for row in y]
    w = [b * v / sum(e) for v in e]
    conf = [[sum(y[i][j] * w[i] * y[i][k] for i in range(b)) for k in range(c)] for j in range(c)]
    norm = [[conf[j][k] / sum(conf[j]) for k in range(c)] for j in range(c)]
    return sum(norm[j][k] for j in range(c) for k in range(c) if j != k) / c


def naive_cdan_e(dom_s, dom_t, logits_s, logits_t):
    """Long et al. 2018, arXiv:1705.10667: weighted BCE, w = 1 + exp(-H(g)) normalised to mean 1."""
    g = naive_softmax(logits_s.tolist() + logits_t.tolist())
    e = [1 + math.exp(-naive_entropy(row)) for row in g]
    n = len(e)
    w = [n * v / sum(e) for v in e]
    sig = [1 / (1 + math.exp(-d)) for d in dom_s.reshape(-1).tolist() + dom_t.reshape(-1).tolist()]
    labels = [1.0] * dom_s.shape[0] + [0.0] * dom_t.shape[0]
    return sum(wi * -(y * math.log(s) + (1 - y) * math.log(1 - s)) for wi, s, y in zip(w, sig, labels)) / n


def naive_mdd(y_s, ya_s, y_t, ya_t, margin):
    """Zhang et al. 2019, arXiv:1904.05801, Sec. 5: -(gamma E_s log sigma_h(h') + E_t log(1 - sigma_h(h')))."""
    def pred(row):
        return max(range(len(row)), key=row.__getitem__)
    ps, pt = naive_softmax(ya_s.tolist()), naive_softmax(ya_t.tolist())
    src = sum(math.log(p[pred(r)]) for p, r in zip(ps, y_s.tolist())) / len(ps)
    tgt = sum(math.log(1 - p[pred(r)]) for p, r in zip(pt, y_t.tolist())) / len(pt)
    return -(margin * src + tgt)


# ---------------------------------------------------------------------------------------------- CDAN
def test_multilinear_map_is_the_flattened_outer_product_and_randomized_map_follows_its_formula():
    g0 = torch.Generator().manual_seed(0)
    f, g = torch.randn(3, 4, generator=g0, dtype=D64), torch.rand(3, 5, generator=g0, dtype=D64)
    t = MultiLinearMap()(f, g)
    assert t.shape == (3, 20)
    for i in range(3):
        for c in range(5):
            for k in range(4):
                assert t[i, c * 4 + k].item() == pytest.approx(g[i, c].item() * f[i, k].item(), rel=1e-14)
    rmap = RandomizedMultiLinearMap(4, 5, 7, generator=torch.Generator().manual_seed(1)).double()
    out = rmap(f, g)
    for i in range(3):
        for o in range(7):
            rf = sum(rmap.Rf[k, o].item() * f[i, k].item() for k in range(4))
            rg = sum(rmap.Rg[c, o].item() * g[i, c].item() for c in range(5))
            assert out[i, o].item() == pytest.approx(rf * rg / math.sqrt(7), rel=1e-12, abs=1e-12)
    assert set(rmap.state_dict()) == {"Rf", "Rg"}  # fixed, checkpointed, exported


def test_randomized_map_preserves_inner_products_in_expectation():
    """<T(f,g), T(f',g')> ~ <f,f'><g,g'> (Long et al. 2018, Sec. 3.1), with a wide output."""
    g0 = torch.Generator().manual_seed(2)
    f, g = torch.randn(2, 6, generator=g0, dtype=D64), torch.rand(2, 3, generator=g0, dtype=D64)
    t = RandomizedMultiLinearMap(6, 3, 200_000, generator=torch.Generator().manual_seed(3)).double()(f, g)
    exact = (f[0] @ f[1]) * (g[0] @ g[1])
    full = MultiLinearMap()(f, g)
    assert (full[0] @ full[1]).item() == pytest.approx(exact.item(), rel=1e-12)
    assert (t[0] @ t[1]).item() == pytest.approx(exact.item(), rel=0.05, abs=0.05 * (f.norm(dim=1).prod()
                                                                                   * g.norm(dim=1).prod()).item())


def test_conditioning_map_is_randomized_above_4096_dimensions():
    assert conditioning_map(128, 10)[1] == 1280 and isinstance(conditioning_map(128, 10)[0], MultiLinearMap)
    m, width = conditioning_map(512, 10, "auto", 256)
    assert width == 256 and isinstance(m, RandomizedMultiLinearMap)
    assert isinstance(conditioning_map(16, 10, "randomized", 32)[0], RandomizedMultiLinearMap)
    with pytest.raises(ValueError, match="full"):
        conditioning_map(16, 10, "fancy")


def test_entropy_weights_hand_computed():
    # a certain prediction: H = 0, 1 + e^0 = 2; a uniform one over 3 classes: 1 + 1/3 -> normalised to mean 1
    ws, wt = entropy_weights(torch.tensor([[200.0, 0.0, 0.0]]), torch.zeros(1, 3), sync="local")
    close(ws, torch.tensor([1.2]), rtol=1e-6, atol=0)
    close(wt, torch.tensor([0.8]), rtol=1e-6, atol=0)


def test_cdan_e_loss_matches_the_naive_formula_with_gradients():
    g0 = torch.Generator().manual_seed(4)
    ls, lt = torch.randn(5, 4, generator=g0, dtype=D64) * 2, torch.randn(5, 4, generator=g0, dtype=D64) * 2
    ds = torch.randn(5, 1, generator=g0, dtype=D64, requires_grad=True)
    dt = torch.randn(5, 1, generator=g0, dtype=D64, requires_grad=True)
    w = entropy_weights(ls, lt, sync="local")
    assert torch.cat(w).mean().item() == pytest.approx(1.0, rel=1e-6)
    loss, acc = domain_adversarial_loss(ds, dt, w)
    assert loss.item() == pytest.approx(naive_cdan_e(ds.detach(), dt.detach(), ls, lt), rel=1e-6)
    # gradient: d/dd_i of (1/N) sum w_i BCE_i = w_i (sigmoid(d_i) - y_i) / N
    loss.backward()
    n = 10
    close(ds.grad.reshape(-1), w[0].double() * (torch.sigmoid(ds.detach()).reshape(-1) - 1) / n, rtol=1e-6, atol=1e-9)
    close(dt.grad.reshape(-1), w[1].double() * torch.sigmoid(dt.detach()).reshape(-1) / n, rtol=1e-6, atol=1e-9)
    # zero logits: every BCE is log 2 whatever the (mean-1) weights; no weights -> DANN's loss
    z = torch.zeros(5, 1)
    assert domain_adversarial_loss(z, z, w)[0].item() == pytest.approx(math.log(2), rel=1e-6)
    assert domain_adversarial_loss(ds, dt)[0].item() == pytest.approx(
        naive_cdan_e(ds.detach(), dt.detach(), torch.zeros(5, 4), torch.zeros(5, 4)), rel=1e-6)


# ---------------------------------------------------------------------------------------------- MCC
def test_mcc_matches_the_naive_formula_and_its_gradient():
    g0 = torch.Generator().manual_seed(5)
    z = (torch.randn(7, 4, generator=g0, dtype=D64) * 3).requires_grad_()
    for t in (1.0, 2.5):
        assert mcc_loss(z, t).item() == pytest.approx(naive_mcc(z.detach(), t), rel=1e-12)
    # the weights are constants (detached): compare with the same formula in torch, weights detached
    def reference(zz, t=2.5):
        y = torch.softmax(zz / t, dim=1)
        h = -(y * y.log()).sum(1).detach()
        w = (1 + torch.exp(-h)) * zz.shape[0] / (1 + torch.exp(-h)).sum()
        conf = torch.stack([torch.stack([(y[:, j] * w * y[:, k]).sum() for k in range(4)]) for j in range(4)])
        conf = conf / conf.sum(1, keepdim=True)
        return (conf.sum() - conf.diagonal().sum()) / 4
    g_ours, = torch.autograd.grad(mcc_loss(z, 2.5), z)
    g_ref, = torch.autograd.grad(reference(z), z)
    close(g_ours, g_ref)


def test_mcc_hand_computed_cases():
    # identical uniform predictions: every normalised row is 1/C -> L = (C - 1) / C, any temperature
    assert mcc_loss(torch.zeros(6, 5), 3.0).item() == pytest.approx(4 / 5, rel=1e-6)
    # confident predictions on distinct classes: the confusion matrix is diagonal -> L ~ 0
    assert mcc_loss(torch.eye(4) * 200, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        mcc_loss(torch.zeros(2, 3), 0.0)


# ---------------------------------------------------------------------------------------------- MDD
def test_mdd_matches_the_naive_formula_gradients_and_transfer_learning_library():
    g0 = torch.Generator().manual_seed(6)
    y_s, y_t = torch.randn(6, 5, generator=g0, dtype=D64, requires_grad=True), torch.randn(4, 5, generator=g0,
                                                                                            dtype=D64)
    ya_s = torch.randn(6, 5, generator=g0, dtype=D64, requires_grad=True)
    ya_t = torch.randn(4, 5, generator=g0, dtype=D64, requires_grad=True)
    loss = mdd_loss(y_s, ya_s, y_t, ya_t, margin=4.0, eps=0.0)
    assert loss.item() == pytest.approx(naive_mdd(y_s.detach(), ya_s.detach(), y_t, ya_t.detach(), 4.0), rel=1e-12)
    loss.backward()
    assert y_s.grad is None  # the main head's argmax carries no gradient
    # d/dya_s: gamma (softmax - onehot(pred)) / m;  d/dya_t: p_k (delta_k,pred - p_pred) ... via the closed form
    p_s, oh_s = torch.softmax(ya_s.detach(), 1), torch.nn.functional.one_hot(y_s.detach().argmax(1), 5).double()
    close(ya_s.grad, 4.0 * (p_s - oh_s) / 6)
    p_t, oh_t = torch.softmax(ya_t.detach(), 1), torch.nn.functional.one_hot(y_t.argmax(1), 5).double()
    pp = (p_t * oh_t).sum(1, keepdim=True)
    close(ya_t.grad, pp * (oh_t - p_t) / (1 - pp) / 4)
    # Transfer-Learning-Library: mdd = -gamma CE(ya_s, pred_s) - nll(shift_log(1 - softmax(ya_t)), pred_t); we minimise -mdd
    F = torch.nn.functional
    tllib = (-4.0 * F.cross_entropy(ya_s, y_s.argmax(1))
             - F.nll_loss(torch.log(torch.clamp(1.0 - F.softmax(ya_t, 1) + 1e-6, max=1.0)), y_t.argmax(1)))
    close(mdd_loss(y_s, ya_s, y_t, ya_t, margin=4.0), -tllib)


def test_mdd_hand_computed_and_finite_when_the_adversary_is_certain():
    # h' uniform over 4 classes: gamma log 4 - log(3/4)
    z = torch.zeros(3, 4)
    assert mdd_loss(torch.randn(3, 4), z, torch.randn(3, 4), z, margin=2.0, eps=0.0).item() == pytest.approx(
        2 * math.log(4) - math.log(0.75), rel=1e-6)
    y = torch.tensor([[5.0, 0.0]])
    certain = torch.tensor([[500.0, 0.0]], requires_grad=True)
    loss = mdd_loss(y, certain, y, certain)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(certain.grad).all()
    assert loss.item() == pytest.approx(-math.log(1e-6), rel=1e-3)


# ---------------------------------------------------------------------------------------------- GRL into h' / D
def _model(**kw):
    torch.manual_seed(0)
    backbone = create_backbone("resnet20", num_classes=0, small_input=True, width=0.25)
    return AdaptationModel(backbone, 10, bottleneck_dim=8, **kw).double()


@pytest.mark.parametrize("method", ["cdan", "mdd"])
def test_gradient_reversal_flips_only_the_feature_gradient(method):
    kw = dict(discriminator_hidden=8, condition="full") if method == "cdan" else dict(adversarial_head=True)
    model = _model(**kw)
    g0 = torch.Generator().manual_seed(7)
    xs, xt = torch.randn(4, 3, 16, 16, generator=g0, dtype=D64), torch.randn(4, 3, 16, 16, generator=g0, dtype=D64)
    adv = model.discriminator if method == "cdan" else model.adversarial_head
    params = [model.bottleneck[0].weight, next(adv.parameters()), model.head.weight]

    def loss_of(out):
        if method == "cdan":
            return domain_adversarial_loss(out["domain_s"], out["domain_t"])[0]
        return mdd_loss(out["logits_s"], out["adv_logits_s"], out["logits_t"], out["adv_logits_t"])

    coeff = 0.3
    got = torch.autograd.grad(loss_of(model(xs, xt, grl_coeff=coeff)), params, allow_unused=True)
    # the same loss without a reversal layer
    f = model.features(torch.cat([xs, xt]))
    logits = model.head(f)
    if method == "cdan":
        d = model.discriminator(model.condition(f, logits.softmax(1).detach()))
        out = {"domain_s": d[:4], "domain_t": d[4:]}
    else:
        y = model.adversarial_head(f)
        out = {"logits_s": logits[:4], "logits_t": logits[4:], "adv_logits_s": y[:4], "adv_logits_t": y[4:]}
    ref = torch.autograd.grad(loss_of(out), params[:2])
    assert ref[0].abs().sum() > 0 and ref[1].abs().sum() > 0
    close(got[0], -coeff * ref[0])   # features: reversed and scaled -- they maximise the adversary's loss
    close(got[1], ref[1])            # discriminator / h': its own loss, minimised
    assert got[2] is None            # the classifier: g detached (CDAN), argmax (MDD)


# ---------------------------------------------------------------------------------------------- 2 processes vs 1
def sync_problem():
    """16 target logits rows from a linear map (8 per rank) and 16 source rows, for MCC and CDAN+E."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 5).double()
    g0 = torch.Generator().manual_seed(8)
    return lin, torch.randn(16, 6, generator=g0, dtype=D64) * 2, torch.randn(16, 5, generator=g0, dtype=D64) * 3


def sync_compute(rows: slice, sync: str) -> dict:
    lin, x, ls = sync_problem()
    loss = MinimumClassConfusionLoss(2.5, sync, same_size=True)(lin(x[rows]))
    loss.backward()
    w_s, w_t = entropy_weights(ls[rows], lin(x[rows]).detach(), sync)
    return {"loss": loss.item(), "weight": lin.weight.grad, "bias": lin.bias.grad, "w_s": w_s, "w_t": w_t}


def _rank(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = slice(8 * rank, 8 * rank + 8)
    torch.save({"gather": sync_compute(rows, "gather"), "local": sync_compute(rows, "local")},
               os.path.join(out_dir, f"rank{rank}.pt"))
    exit_cleanly()


def test_mcc_and_cdan_e_weights_two_processes_equal_one_on_the_global_batch(tmp_path):
    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref = sync_compute(slice(None), "local")
    for r in ranks:  # gather: the global loss on every rank
        assert r["gather"]["loss"] == pytest.approx(ref["loss"], rel=1e-12)
    for key in ("weight", "bias"):  # ... and DDP's average of the ranks' gradients is the 1-process one
        close(sum(r["gather"][key] for r in ranks) / 2, ref[key])
    close(torch.cat([r["gather"]["w_s"] for r in ranks]), ref["w_s"], rtol=1e-6, atol=0)
    close(torch.cat([r["gather"]["w_t"] for r in ranks]), ref["w_t"], rtol=1e-6, atol=0)
    for rank, r in enumerate(ranks):  # local: each rank's own batch statistic
        own = sync_compute(slice(8 * rank, 8 * rank + 8), "local")
        assert r["local"]["loss"] == pytest.approx(own["loss"], rel=1e-12)
        assert r["local"]["loss"] != pytest.approx(ref["loss"], rel=1e-3)
        close(r["local"]["w_t"], own["w_t"])


# ---------------------------------------------------------------------------------------------- the recipe
TINY = {
    "source": {"source": "digits", "image_size": 16, "hflip": 0.0, "label_fraction": 0.1},
    "target_domain": "config",  # the digits again: no Digits-M to build (the alignment paths are the same)
    "target": {"source": "digits", "image_size": 16, "hflip": 0.0},
    "model": {"name": "resnet20", "small_input": True, "kwargs": {"width": 0.25}},
    "adapt": {"bottleneck_dim": 16, "discriminator_hidden": 16, "cdan_randomized_dim": 32},
    "optim": {"lr": 0.05},
    "schedule": {"epochs": 1, "warmup_epochs": 0.5},
    "run": {"batch_size": 32, "eval_batch_size": 256, "progress": False, "log_every": 1},
}


@pytest.mark.parametrize("method", ["cdan", "mcc", "mdd"])
def test_method_end_to_end(tiny, tmp_path, method):
    run_recipe("adapt", ["--config", str(tiny), "--method", method, "--output-dir", str(tmp_path)])
    r = results(tmp_path)
    assert r["method"] == method and 0 <= r["target_acc"] <= 1 and 0 < r["source_val_acc"] <= 1
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "train/transfer_loss" in s]
    assert len(steps) == 3 and all(math.isfinite(s["train/transfer_loss"]) for s in steps)
    assert all(("train/grl_lambda" in s) == (method != "mcc") for s in steps)
    if method == "mdd":
        assert max(s["train/grl_lambda"] for s in steps) <= 0.1  # capped at mdd_grl_max

    from visrep.transfer.adapt import load_adaptation_model

    model, cfg = load_adaptation_model(tmp_path / "models" / "adapt")
    assert cfg["method"] == method
    assert (model.adversarial_head is not None) == (method == "mdd")
    assert (model.discriminator is not None) == (method == "cdan")
    if method == "cdan":
        assert model.discriminator[0].in_features == 16 * 10  # the full multilinear map: 160 <= 4096


def test_cdan_e_randomized_resume_mid_epoch_equals_straight_run(tiny, tmp_path):
    args = ["--config", str(tiny), "--method", "cdan_e", "--adapt.cdan-map", "randomized", "--schedule.epochs", "2"]
    a, b = straight_and_stopped("adapt", args, tmp_path, 4)  # 3 steps per epoch: stop inside epoch 2
    run_recipe("adapt", [*args, "--output-dir", str(b), "--resume", "latest"])
    wa, wb = (load_file(str(d / "models" / "adapt" / "model.safetensors")) for d in (a, b))
    assert wa.keys() == wb.keys() and {"condition.Rf", "condition.Rg"} <= wa.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    ra, rb = results(a), results(b)
    for k in ("target_acc", "source_val_acc", "source_test_acc", "selected_epoch", "oracle_target_acc"):
        assert ra[k] == rb[k], k
    assert ra["method"] == "cdan_e"
    from visrep.transfer.adapt import load_adaptation_model

    model, _ = load_adaptation_model(a / "models" / "adapt")
    assert model.discriminator[0].in_features == 32 and torch.equal(model.condition.Rf, wa["condition.Rf"])


@pytest.mark.parametrize("args,key", [
    (["--method", "mcc", "--adapt.mcc-temperature", "0"], "adapt.mcc_temperature"),
    (["--method", "mdd", "--adapt.mdd-margin=-1"], "adapt.mdd_margin"),
    (["--method", "cdan", "--adapt.cdan-weight=-0.5"], "adapt.cdan_weight"),
    (["--method", "cdan", "--adapt.cdan-map", "fancy"], "randomized"),
    (["--method", "cdann"], "cdan_e"),
])
def test_config_errors_name_the_key(tiny, tmp_path, args, key):
    p = run_recipe("adapt", ["--config", str(tiny), "--output-dir", str(tmp_path), *args], check=False)
    assert p.returncode != 0 and key in p.stderr + p.stdout
