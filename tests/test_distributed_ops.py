"""What sums over ranks, in 2 real processes against one process: the autograd-aware gather
(equal and unequal row counts), the alignment losses with sync='gather' (loss and DDP-averaged gradient
equal the single-process ones on the concatenated batch), the kNN vote over a bank sharded across ranks
and the linear probe trained once on the main process (the single-process figures)."""
import json
import subprocess

import pytest
import torch

from helpers import ACCELERATE_LAUNCH, ROOT, env, free_port


def align_problem():
    """The alignment problem of the 2-process script and its 1-process reference: a linear feature map,
    8 source and 7 (shifted) target rows."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(8, 5, generator=g), torch.randn(7, 5, generator=g) + 0.5


def eval_problem():
    """The evaluation problem of the 2-process script and its 1-process reference: an encoder, a bank
    of 37 labelled rows and 23 test rows (3 classes)."""
    g = torch.Generator().manual_seed(2)
    torch.manual_seed(5)
    enc = torch.nn.Linear(6, 4)
    bank = torch.randn(37, 6, generator=g), torch.randint(0, 3, (37,), generator=g)
    test = torch.randn(23, 6, generator=g), torch.randint(0, 3, (23,), generator=g)
    return enc, bank, test


SCRIPT = r'''
import json, sys, torch
from accelerate import Accelerator
from helpers import exit_cleanly
from test_distributed_ops import align_problem, eval_problem
from visrep.engine.distributed import all_gather_no_grad, all_gather_with_grad
from visrep.ssl.evaluate import SSLEvalConfig, evaluate_representation, extract_features
from visrep.transfer import CoralLoss, MultiKernelMMDLoss

acc = Accelerator(cpu=True)
r = acc.process_index
model, xs, xt = align_problem()
src = xs[:4] if r == 0 else xs[4:]
tgt = xt[:5] if r == 0 else xt[5:]          # unequal per-rank target shards: 5 and 2
ddp = acc.prepare(model)
f = ddp(torch.cat([src, tgt]))
fs, ft = f[:len(src)], f[len(src):]
mmd, cor = MultiKernelMMDLoss(sync="gather")(fs, ft), CoralLoss(sync="gather")(fs, ft)
loss = mmd + 10 * cor
acc.backward(loss)
local = {"mmd": mmd.item(), "coral": cor.item(), "grad_w": model.weight.grad.tolist(),
         "grad_b": model.bias.grad.tolist(), "gathered_rows": all_gather_with_grad(tgt).shape[0],
         "world": acc.num_processes}

# the gather itself: same-size fast path and unequal row counts (rank 0: 4 rows, rank 1: 1 row)
w = torch.arange(10.0).view(5, 2)
for key, rows, same in (("same", 2, True), ("unequal", 4 if r == 0 else 1, False)):
    x = (torch.arange(rows * 2.0).view(rows, 2) + 100 * r).requires_grad_()
    y = all_gather_with_grad(x, same_size=same)
    (y * w[:y.shape[0]]).sum().backward()
    local[key] = {"gathered": y.tolist(), "grad": x.grad.tolist(),
                  "no_grad": all_gather_no_grad(x.detach(), same_size=same).tolist()}

# kNN on a sharded bank, linear probe on the main process
enc, (bx, by), (tx, ty) = eval_problem()
loader = lambda x, y, b: acc.prepare(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=b))
bank, test, small = loader(bx, by, 5), loader(tx, ty, 4), loader(bx[:9], by[:9], 2)
cfg = SSLEvalConfig(knn_k=5, knn_t=0.1, linear_epochs=3, linear_batch_size=8)
local["eval"] = evaluate_representation(enc, bank, test, acc, 3, cfg, seed=3)
local["eval_small"] = evaluate_representation(enc, small, test, acc, 3, SSLEvalConfig(knn_k=6), linear=False)
local["shard_rows"] = extract_features(enc, bank, acc, keep="shard")[0].shape[0]
with open(sys.argv[1] + f"/rank{r}.json", "w") as fh:
    json.dump(local, fh)
exit_cleanly(acc)
'''


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    from visrep.ssl.evaluate import knn_accuracy, linear_eval
    from visrep.transfer import coral, mk_mmd

    script = tmp_path / "dist_align.py"
    script.write_text(SCRIPT)
    cmd = [*ACCELERATE_LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(script), str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    model, xs, xt = align_problem()
    f = model(torch.cat([xs, xt]))
    mmd, cor = mk_mmd(f[:8], f[8:]), coral(f[:8], f[8:])
    (mmd + 10 * cor).backward()
    for r in ranks:
        assert r["world"] == 2 and r["gathered_rows"] == 7
        assert r["mmd"] == pytest.approx(mmd.item(), rel=1e-5, abs=1e-7)
        assert r["coral"] == pytest.approx(cor.item(), rel=1e-5, abs=1e-7)
        torch.testing.assert_close(torch.tensor(r["grad_w"]), model.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r["grad_b"]), model.bias.grad, rtol=1e-4, atol=1e-6)

    # the gather: rank order, each rank's gradient the sum over ranks of its rows' gradient (2 w rows)
    w = torch.arange(10.0).view(5, 2)
    for key, rows in (("same", (2, 2)), ("unequal", (4, 1))):
        xs = [torch.arange(n * 2.0).view(n, 2) + 100 * r for r, n in enumerate(rows)]
        for r, res in enumerate(ranks):
            assert torch.tensor(res[key]["gathered"]).equal(torch.cat(xs)), key
            assert torch.tensor(res[key]["no_grad"]).equal(torch.cat(xs)), key
            start = sum(rows[:r])
            assert torch.tensor(res[key]["grad"]).equal(2 * w[start:start + rows[r]]), key

    # the evaluation: the bank split over ranks once, kNN and linear probe as in one process
    assert ranks[0]["shard_rows"] + ranks[1]["shard_rows"] == 37
    enc, (bx, by), (tx, ty) = eval_problem()
    with torch.no_grad():
        fb, ft = enc(bx), enc(tx)
    knn = knn_accuracy(fb, by, ft, ty, 3, k=5, t=0.1)
    knn_small = knn_accuracy(fb[:9], by[:9], ft, ty, 3, k=6)
    lin = linear_eval(fb, by, ft, ty, 3, epochs=3, lr=0.1, batch_size=8, seed=3)
    for res in ranks:
        assert res["eval"]["knn_acc"] == knn and res["eval_small"]["knn_acc"] == knn_small
        assert res["eval"]["linear_acc"] == pytest.approx(lin["acc"], abs=1e-9)
        assert res["eval"]["linear_train_acc"] == pytest.approx(lin["train_acc"], abs=1e-9)
