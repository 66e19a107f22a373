"""Gradient equivalence across ranks, in a real 2-process gloo run.

2 ranks with local batch B (DDP through Accelerate, gradients averaged) must give the same parameter
gradients as 1 rank with the global batch 2B, computed here with a naive full-batch formula. Cases:
InfoNCE, SigLIP's sigmoid loss, and InfoNCE with GradCache accumulation (2 micro-batches per rank).

This file is also the worker: ``torchrun --nproc_per_node 2 tests/test_clip_distributed.py OUT``.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

B, D_IN, EMBED = 6, 12, 8
CASES = {"infonce": ("infonce", 1), "sigmoid": ("sigmoid", 1), "gradcache": ("infonce", 2)}
# negative control: each rank's own negatives only (no gather) is a different objective
CONTROL = {"no_gather": ("infonce", 1)}


class MLPTower(nn.Module):
    """No BatchNorm: per-rank batch statistics would differ from full-batch ones by design."""

    num_features = 16

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.GELU(), nn.Linear(16, 16))

    def forward(self, x):
        return self.net(x)


def make_model(kind: str):
    from visrep.clip.model import ClipModel, ClipModelConfig, SmallText, TextTowerConfig

    torch.manual_seed(0)
    cfg = ClipModelConfig(text=TextTowerConfig(context_length=8, width=16, layers=1, heads=2), embed_dim=EMBED,
                          init_logit_bias=-2.0 if kind == "sigmoid" else None, init_logit_scale=1.5)
    return ClipModel(MLPTower(), SmallText(cfg.text, vocab_size=64), cfg)


def make_batch(n: int):
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 4, 4, generator=g)
    tokens = torch.randint(1, 60, (n, 8), generator=g)
    tokens[:, 0] = 62
    lengths = torch.randint(3, 8, (n,), generator=g)
    for i, L in enumerate(lengths.tolist()):
        tokens[i, L] = 63  # end token: the highest id, where the tower pools
        tokens[i, L + 1:] = 0
    return images, tokens


def naive_loss(out: dict, kind: str) -> torch.Tensor:
    x, y, s = out["image_features"], out["text_features"], out["logit_scale"]
    n = x.shape[0]
    total = 0.0
    for i in range(n):
        if kind == "infonce":
            li = torch.stack([s * x[i] @ y[j] for j in range(n)])
            lt = torch.stack([s * y[i] @ x[j] for j in range(n)])
            total = total - 0.5 * (li[i] - torch.logsumexp(li, 0)) - 0.5 * (lt[i] - torch.logsumexp(lt, 0))
        else:
            for j in range(n):
                z = 1.0 if i == j else -1.0
                total = total - F.logsigmoid(z * (s * x[i] @ y[j] + out["logit_bias"]))
    return total / n


def worker(out_dir: str) -> None:
    from accelerate import Accelerator

    from helpers import exit_cleanly
    from visrep.clip import ContrastiveLoss, contrastive_step

    acc = Accelerator(cpu=True)
    rank, world = acc.process_index, acc.num_processes
    assert world == 2, world
    images, tokens = make_batch(2 * B)
    for name, (kind, chunks) in {**CASES, **CONTROL}.items():
        model = make_model(kind)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        model, opt = acc.prepare(model, opt)
        sl = slice(rank * B, (rank + 1) * B)
        loss_fn = ContrastiveLoss(kind, gather=name not in CONTROL)
        losses = contrastive_step(acc, model, loss_fn, images[sl], tokens[sl], chunks)
        grads = {k: p.grad.detach().clone() for k, p in acc.unwrap_model(model).named_parameters()}
        if rank == 0:
            torch.save({"grads": grads, "loss": losses["loss"]}, Path(out_dir) / f"{name}.pt")
        acc.free_memory()
    exit_cleanly(acc)


@pytest.fixture(scope="module")
def two_rank_grads(tmp_path_factory):
    from helpers import ROOT, VENV_BIN, env, free_port

    out = tmp_path_factory.mktemp("dist")
    torchrun = shutil.which("torchrun", path=str(VENV_BIN)) or "torchrun"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(Path(__file__).resolve()), str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return {name: torch.load(out / f"{name}.pt") for name in {**CASES, **CONTROL}}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_one_rank_with_the_global_batch(two_rank_grads, name):
    kind, _ = CASES[name]
    model = make_model(kind)
    images, tokens = make_batch(2 * B)
    loss = naive_loss(model(images, tokens), kind)
    loss.backward()
    got = two_rank_grads[name]["grads"]
    ref = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert set(ref) <= set(got)
    assert any(k == "logit_scale" for k in ref)
    for k, g in ref.items():
        torch.testing.assert_close(got[k], g, rtol=0, atol=1e-5, msg=lambda m: f"{name} / {k}: {m}")
    assert max(g.abs().max().item() for g in ref.values()) > 1e-3  # the comparison is not vacuous
    if kind == "infonce":  # rank 0's loss value: its own B rows (image->text) and B columns (text->image)
        with torch.no_grad():
            out = model(images, tokens)
            logits = out["logit_scale"] * out["image_features"] @ out["text_features"].t()
            t = torch.arange(B)
            local = 0.5 * (F.cross_entropy(logits[:B], t) + F.cross_entropy(logits.t()[:B], t))
        torch.testing.assert_close(two_rank_grads[name]["loss"], local, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_comparison_detects_a_rank_local_loss(two_rank_grads):
    model = make_model("infonce")
    images, tokens = make_batch(2 * B)
    naive_loss(model(images, tokens), "infonce").backward()
    got = two_rank_grads["no_gather"]["grads"]
    worst = max((got[k] - p.grad).abs().max().item() for k, p in model.named_parameters())
    assert worst > 1e-3, "without the gather the gradients must differ from the global-batch ones"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    worker(sys.argv[1])
