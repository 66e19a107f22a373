"""Batch-summed alignment losses across 2 processes: with sync='gather' the loss and the DDP-averaged
gradient equal the single-process loss and gradient on the concatenated global batch."""
import json
import shutil
import subprocess

import pytest
import torch

from helpers import ROOT, VENV_BIN, env, free_port

SCRIPT = r'''
import json, os, sys, torch
from accelerate import Accelerator
from visrep.transfer import CoralLoss, MultiKernelMMDLoss, all_gather_with_grad

acc = Accelerator(cpu=True)
r = acc.process_index
torch.manual_seed(0)
model = torch.nn.Linear(5, 4)
g = torch.Generator().manual_seed(1)
xs, xt = torch.randn(8, 5, generator=g), torch.randn(7, 5, generator=g) + 0.5
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
with open(sys.argv[1] + f"/rank{r}.json", "w") as fh:
    json.dump(local, fh)
acc.wait_for_everyone()
torch.distributed.destroy_process_group()  # a clean shutdown: no gloo thread left behind at exit
# Exit without interpreter teardown: a DDP/gloo object still alive then can abort the process
# ("terminate called without an active exception") after the results are already written.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
'''


@pytest.mark.slow
def test_gathered_mmd_and_coral_equal_single_process_loss_and_gradient(tmp_path):
    from visrep.transfer import coral, mk_mmd

    script = tmp_path / "dist_align.py"
    script.write_text(SCRIPT)
    accelerate = shutil.which("accelerate", path=str(VENV_BIN)) or "accelerate"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), str(script), str(tmp_path)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 4)
    g = torch.Generator().manual_seed(1)
    xs, xt = torch.randn(8, 5, generator=g), torch.randn(7, 5, generator=g) + 0.5
    f = model(torch.cat([xs, xt]))
    mmd, cor = mk_mmd(f[:8], f[8:]), coral(f[:8], f[8:])
    (mmd + 10 * cor).backward()
    for r in ranks:
        assert r["world"] == 2 and r["gathered_rows"] == 7
        assert r["mmd"] == pytest.approx(mmd.item(), rel=1e-5, abs=1e-7)
        assert r["coral"] == pytest.approx(cor.item(), rel=1e-5, abs=1e-7)
        torch.testing.assert_close(torch.tensor(r["grad_w"]), model.weight.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.tensor(r["grad_b"]), model.bias.grad, rtol=1e-4, atol=1e-6)
