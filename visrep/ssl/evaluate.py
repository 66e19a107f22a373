"""Evaluating a representation without fine-tuning it: weighted kNN and linear evaluation on frozen
features, across ranks."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from visrep.checks import check
from visrep.engine.distributed import broadcast_buffers, gather_rows, is_distributed, release_gathered


@dataclasses.dataclass
class SSLEvalConfig:
    knn_k: int = 20
    knn_t: float = 0.07
    """Temperature of the kNN vote weights exp(cos / T)."""
    linear_epochs: int = 100
    linear_lr: float = 0.1
    linear_batch_size: int = 256
    linear_weight_decay: float = 0.0
    every_epochs: int = 1
    """Epochs between validation kNN evaluations during pre-training (0: only at the end)."""

    def validate(self, prefix: str) -> None:
        check(self.knn_k >= 1, f"{prefix}knn_k", self.knn_k, "an integer >= 1")
        check(self.knn_t > 0, f"{prefix}knn_t", self.knn_t, "a positive number")
        check(self.linear_epochs >= 1, f"{prefix}linear_epochs", self.linear_epochs, "an integer >= 1")
        check(self.linear_lr > 0, f"{prefix}linear_lr", self.linear_lr, "a positive number")
        check(self.every_epochs >= 0, f"{prefix}every_epochs", self.every_epochs, "an integer >= 0")


@torch.no_grad()
def _extract(encoder, loader, accelerator, module, whole: bool, shard: bool):
    """(whole split, this rank's shard), each ``(features, labels)`` or ``None`` when not asked for."""
    module = module if module is not None else encoder
    world, rank = accelerator.num_processes, accelerator.process_index
    was_training = module.training
    module.eval()
    whole_parts, shard_parts = [], []
    try:
        for x, y in loader:
            with accelerator.autocast():
                f = encoder(x)
            f, y = accelerator.gather_for_metrics((f.float().contiguous(), y))
            if whole:
                whole_parts.append((f, y))
            if shard:
                shard_parts.append((f.tensor_split(world)[rank], y.tensor_split(world)[rank]))
    finally:
        module.train(was_training)

    def cat(parts):
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])) if parts else None

    return cat(whole_parts), cat(shard_parts)


def extract_features(encoder: Callable[[torch.Tensor], torch.Tensor], loader, accelerator,
                     module: Optional[torch.nn.Module] = None, keep: str = "all"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of a whole split, in eval mode (``module``, default ``encoder``), as
    float32. Each batch is gathered from every rank (``gather_for_metrics`` drops the samples Accelerate
    repeated to even out the last batch); ``keep`` says what this rank holds on to: ``"all"`` the whole
    split in loader order, ``"shard"`` its ``1/W`` share of every gathered batch (the shards of all
    ranks together are the split, each sample once)."""
    if keep not in ("all", "shard"):
        raise ValueError(f"keep must be 'all' or 'shard', got {keep!r}")
    whole, shard = _extract(encoder, loader, accelerator, module, keep == "all", keep == "shard")
    return whole if keep == "all" else shard


def _local_topk(bank: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and bank indices of each query's ``k`` nearest bank rows (``-inf`` and index 0
    where the bank holds fewer than ``k`` rows)."""
    sim, idx = (queries @ bank.T).topk(min(k, bank.shape[0]), dim=1)
    if sim.shape[1] < k:
        pad = k - sim.shape[1]
        sim = torch.cat([sim, sim.new_full((sim.shape[0], pad), float("-inf"))], dim=1)
        idx = torch.cat([idx, idx.new_zeros((idx.shape[0], pad))], dim=1)
    return sim, idx


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                num_classes: int, k: int = 20, t: float = 0.07, chunk: int = 1024,
                sharded: bool = False) -> torch.Tensor:
    """Weighted k-nearest-neighbour vote on cosine similarity.

    For a query ``q``, the ``k`` training features ``x_j`` most similar to it (cosine ``s_j``) vote for
    their class with weight ``exp(s_j / T)``; the class with the largest summed weight wins.

    With ``sharded`` every rank holds a disjoint shard of the bank (``extract_features(keep="shard")``)
    and all the queries: each rank finds the ``k`` nearest neighbours in its shard, the candidates of all
    ranks (``W k`` per query, similarities and labels) are all-gathered and the best ``k`` of them vote --
    the vote of the whole bank, with ``1/W`` of it in memory per rank.

    Paper: Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination", 2018, arXiv:1805.01978, Sec. 3.4 (the protocol of DINO and solo-learn).
    """
    sharded = sharded and is_distributed()
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long().to(bank.device)
    if not sharded:
        k = min(k, bank.shape[0])
    preds = []
    for q in F.normalize(features.float(), dim=1).split(chunk):
        sim, idx = _local_topk(bank, q, k)
        lab = labels[idx]
        if sharded:  # (W k) candidates per query, rank-major, then the best k of them
            def candidates(t):  # (q, k) on each rank -> (q, W k)
                return gather_rows(t.T.contiguous()).view(-1, k, q.shape[0]).permute(2, 0, 1).flatten(1)

            sim, pick = candidates(sim).topk(k, dim=1)
            lab = candidates(lab).gather(1, pick)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=torch.float32)
        votes.scatter_add_(1, lab, (sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_features, train_labels, features, labels, num_classes: int, k: int = 20,
                 t: float = 0.07, sharded: bool = False) -> float:
    pred = knn_predict(train_features, train_labels, features, num_classes, k, t, sharded=sharded)
    return (pred == labels.to(pred.device)).float().mean().item()


def linear_eval(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                test_labels: torch.Tensor, num_classes: int, epochs: int = 100, lr: float = 0.1,
                batch_size: int = 256, weight_decay: float = 0.0, seed: int = 0) -> dict:
    """Linear evaluation on frozen features: a linear classifier on the features standardised with the
    training set's mean and std (a BatchNorm without affine parameters, as in MAE's linear probe),
    trained with SGD (momentum 0.9, nesterov) and a cosine rate for ``epochs`` over shuffled
    mini-batches. Reports the last epoch, never the best. Deterministic given ``seed`` and leaves the
    global RNG untouched, so every rank computes the same result."""
    dev = train_features.device
    mu = train_features.float().mean(0, keepdim=True)
    sd = train_features.float().std(0, keepdim=True).clamp_min(1e-6)
    xtr, xte = (train_features.float() - mu) / sd, (test_features.float() - mu) / sd
    ytr, yte = train_labels.long().to(dev), test_labels.long().to(dev)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = torch.nn.Linear(xtr.shape[1], num_classes).to(dev)
    opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    n = xtr.shape[0]
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=g).to(dev)
            for idx in order.split(batch_size):
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(clf(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    with torch.no_grad():
        train_acc = (clf(xtr).argmax(1) == ytr).float().mean().item()
        acc = (clf(xte).argmax(1) == yte).float().mean().item()
    return {"acc": acc, "train_acc": train_acc, "loss": loss.item()}


def evaluate_representation(encoder, bank_loader, test_loader, accelerator, num_classes: int,
                            cfg: SSLEvalConfig, module: Optional[torch.nn.Module] = None, seed: int = 0,
                            linear: bool = True) -> dict:
    """kNN (and, with ``linear``, linear-evaluation) accuracy of ``encoder`` on ``test_loader``, with
    ``bank_loader`` (the training split under the evaluation transform) as the labelled set. Under
    DeepSpeed every rank first takes rank 0's buffers (BatchNorm statistics), as DDP does.

    Across ranks the kNN bank is sharded (each rank holds ``1/W`` of it, :func:`knn_predict`) and the
    linear probe is trained once, on the main process, which holds the whole bank and broadcasts the
    figures; every rank returns the same dict, equal to the single-process one."""
    broadcast_buffers(module if module is not None else encoder, accelerator)
    distributed = accelerator.num_processes > 1
    whole = not distributed or (linear and accelerator.is_main_process)
    bank, bank_shard = _extract(encoder, bank_loader, accelerator, module, whole, distributed)
    fte, yte = extract_features(encoder, test_loader, accelerator, module)
    if module is not None:
        release_gathered(module)
    bank_f, bank_y = bank_shard if distributed else bank
    out = {"knn_acc": knn_accuracy(bank_f, bank_y, fte, yte, num_classes, cfg.knn_k, cfg.knn_t,
                                   sharded=distributed)}
    if linear:
        figures = torch.zeros(2, dtype=torch.float64, device=fte.device)
        if accelerator.is_main_process:
            lin = linear_eval(*bank, fte, yte, num_classes, cfg.linear_epochs, cfg.linear_lr,
                              cfg.linear_batch_size, cfg.linear_weight_decay, seed)
            figures = figures.new_tensor([lin["acc"], lin["train_acc"]])
        if distributed:
            torch.distributed.broadcast(figures, src=0)
        acc, train_acc = figures.tolist()
        out.update(linear_acc=acc, linear_train_acc=train_acc)
    return out
