"""Evaluating a representation without fine-tuning it: weighted kNN and linear evaluation on frozen
features, across ranks."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F


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
        from visrep.engine.config import _check

        _check(self.knn_k >= 1, f"{prefix}knn_k", self.knn_k, "an integer >= 1")
        _check(self.knn_t > 0, f"{prefix}knn_t", self.knn_t, "a positive number")
        _check(self.linear_epochs >= 1, f"{prefix}linear_epochs", self.linear_epochs, "an integer >= 1")
        _check(self.linear_lr > 0, f"{prefix}linear_lr", self.linear_lr, "a positive number")
        _check(self.every_epochs >= 0, f"{prefix}every_epochs", self.every_epochs, "an integer >= 0")


@torch.no_grad()
def extract_features(encoder: Callable[[torch.Tensor], torch.Tensor], loader, accelerator,
                     module: Optional[torch.nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of a whole split, in eval mode (``module``, default ``encoder``),
    gathered from every rank (``gather_for_metrics`` drops the samples Accelerate repeated to even
    out the last batch). Every rank returns the full split, in loader order, as float32."""
    module = module if module is not None else encoder
    was_training = module.training
    module.eval()
    feats, labels = [], []
    try:
        for x, y in loader:
            with accelerator.autocast():
                f = encoder(x)
            f, y = accelerator.gather_for_metrics((f.float().contiguous(), y))
            feats.append(f)
            labels.append(y)
    finally:
        module.train(was_training)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, features: torch.Tensor,
                num_classes: int, k: int = 20, t: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """Weighted k-nearest-neighbour vote on cosine similarity.

    For a query ``q``, the ``k`` training features ``x_j`` most similar to it (cosine ``s_j``) vote for
    their class with weight ``exp(s_j / T)``; the class with the largest summed weight wins.

    Paper: Wu, Xiong, Yu, Lin, "Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination", 2018, arXiv:1805.01978, Sec. 3.4 (the protocol of DINO and solo-learn).
    """
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    k = min(k, bank.shape[0])
    preds = []
    for q in F.normalize(features.float(), dim=1).split(chunk):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device, dtype=torch.float32)
        votes.scatter_add_(1, labels[idx], (sim / t).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def knn_accuracy(train_features, train_labels, features, labels, num_classes: int, k: int = 20,
                 t: float = 0.07) -> float:
    pred = knn_predict(train_features, train_labels, features, num_classes, k, t)
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
    DeepSpeed every rank first takes rank 0's buffers (BatchNorm statistics), as DDP does."""
    from visrep.engine.evaluate import broadcast_buffers_under_deepspeed, release_zero3_parameters

    broadcast_buffers_under_deepspeed(module if module is not None else encoder, accelerator)
    ftr, ytr = extract_features(encoder, bank_loader, accelerator, module)
    fte, yte = extract_features(encoder, test_loader, accelerator, module)
    if module is not None:
        release_zero3_parameters(module)
    out = {"knn_acc": knn_accuracy(ftr, ytr, fte, yte, num_classes, cfg.knn_k, cfg.knn_t)}
    if linear:
        lin = linear_eval(ftr, ytr, fte, yte, num_classes, cfg.linear_epochs, cfg.linear_lr,
                          cfg.linear_batch_size, cfg.linear_weight_decay, seed)
        out.update(linear_acc=lin["acc"], linear_train_acc=lin["train_acc"])
    return out
