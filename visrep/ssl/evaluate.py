"""Evaluating a representation without fine-tuning it: weighted kNN and linear evaluation on frozen
features, across ranks; the protocol card each SSL run records, and the offline evaluation of an
exported encoder (``--eval-only``)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from visrep.checks import check
from visrep.engine.config import to_dict
from visrep.engine.distributed import broadcast_buffers, gather_rows, is_deepspeed, is_distributed, release_gathered
from visrep.engine.evaluate import evaluate_classifier
from visrep.engine.optim import half_cosine
from visrep.ssl.loss import normalized_std


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
                    group["lr"] = lr * half_cosine(step, total, 1.0, 0.0)
                loss = F.cross_entropy(clf(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
    with torch.no_grad():
        train_acc = (clf(xtr).argmax(1) == ytr).float().mean().item()
        acc = (clf(xte).argmax(1) == yte).float().mean().item()
    return {"acc": acc, "train_acc": train_acc, "loss": loss.item()}


def rank0_buffers(model, accelerator) -> None:
    """Before a split is scored across ranks, every rank takes rank 0's buffers (BatchNorm statistics), so
    the figures are those of the model that is exported (rank 0's). DeepSpeed never broadcasts them
    (``visrep.engine.distributed.broadcast_buffers``); DDP does at the start of each forward, so after the
    last training forward every rank still holds statistics its own batch updated. Nothing in one process
    or for a plain function."""
    if accelerator.num_processes < 2 or not isinstance(model, torch.nn.Module):
        return
    if is_deepspeed(accelerator):
        broadcast_buffers(model, accelerator)
        return
    for buf in accelerator.unwrap_model(model).buffers():
        torch.distributed.broadcast(buf.data, src=0)


def evaluate_representation(encoder, bank_loader, test_loader, accelerator, num_classes: int,
                            cfg: SSLEvalConfig, module: Optional[torch.nn.Module] = None, seed: int = 0,
                            linear: bool = True) -> dict:
    """kNN (and, with ``linear``, linear-evaluation) accuracy of ``encoder`` on ``test_loader``, with
    ``bank_loader`` (the training split under the evaluation transform) as the labelled set. Every rank
    first takes rank 0's buffers (BatchNorm statistics, :func:`rank0_buffers`).

    Across ranks the kNN bank is sharded (each rank holds ``1/W`` of it, :func:`knn_predict`) and the
    linear probe is trained once, on the main process, which holds the whole bank and broadcasts the
    figures; every rank returns the same dict, equal to the single-process one."""
    rank0_buffers(module if module is not None else encoder, accelerator)
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


# ----------------------------------------------------------------------------------------------
# The protocol as the recipes run it: the bank, the card in results.json, offline evaluation
# ----------------------------------------------------------------------------------------------
def bank_loader(cfg, data, data_config: dict):
    """The training split under the evaluation transform (no augmentation): the kNN bank and the linear
    probe's training set. ``cfg``: a recipe config with ``data`` and ``run`` groups; ``data`` the
    recipe's :class:`visrep.data.ClassificationData`."""
    from visrep.data import ImageDataset, build_transforms, collate, loader_options

    dc = dict(data_config, input_size=(cfg.data.channels, cfg.data.image_size, cfg.data.image_size))
    tf = build_transforms(dc, cfg.data.image_size, train=False)
    bank = ImageDataset(data.bank_split(), tf, "RGB" if cfg.data.channels == 3 else "L", "train")
    return torch.utils.data.DataLoader(bank, batch_size=cfg.run.eval_batch_size, shuffle=False,
                                       **loader_options(cfg.run.num_workers, collate))


def eval_protocol(cfg: SSLEvalConfig, seed: int, method: str, hyperparameters: dict, data=None) -> dict:
    """The evaluation protocol card every SSL run writes into ``results.json`` (``eval_protocol``): how
    :func:`evaluate_representation` measured the figures -- the kNN vote, the linear probe, the splits
    each one used and which split is reported -- and the method's hyper-parameters. ``data``: the run's
    :class:`visrep.data.DataConfig`, for the split sizes and the label budget."""
    card: dict[str, Any] = {
        "reported_split": "test",
        "selection": "nothing is selected on the test split: the encoder is the last pre-training epoch's (never "
                     "the best), the linear probe's last epoch is reported; the validation split only monitors "
                     "training (val_knn_acc, val_probe_acc) and is the split presets are tuned on",
        "features": "pooled backbone features (the exported encoder), eval mode, no augmentation",
        "knn": {"k": cfg.knn_k, "temperature": cfg.knn_t, "similarity": "cosine",
                "feature_normalisation": "L2 (bank and queries)",
                "vote": "weighted: each of the k nearest bank rows adds exp(cos / temperature) to its class",
                "bank": "train split", "queries": "test split"},
        "linear": {"epochs": cfg.linear_epochs, "lr": cfg.linear_lr, "batch_size": cfg.linear_batch_size,
                   "weight_decay": cfg.linear_weight_decay,
                   "optimizer": "SGD, momentum 0.9, Nesterov; cosine learning rate, no warmup",
                   "feature_normalisation": "standardised with the train split's mean and std (frozen)",
                   "train_split": "train split", "reported": "test split, last epoch", "seed": seed},
        "validation_monitor": {"split": "val", "every_epochs": cfg.every_epochs,
                               "figures": ["val_knn_acc", "val_probe_acc"], "used_for": "monitoring only"},
        "floor": "the same architecture with the very weights pre-training starts from, measured with this protocol",
        "method": method,
        "hyperparameters": to_dict(hyperparameters),
    }
    if data is not None:
        card["splits"] = {"source": data.source, "val_fraction": data.val_fraction, "test_fraction": data.test_fraction,
                          "split_seed": data.split_seed, "label_fraction": data.label_fraction,
                          "image_size": data.image_size}
    return card


def validation_monitor(net, model, bank, val_loader, accelerator, num_classes: int, cfg: SSLEvalConfig) -> dict:
    """The per-epoch progress figures of pre-training, on the validation split (never used to select
    anything): kNN accuracy of ``net.encode`` with the training split as the bank, and the online probe's
    accuracy (``net.probe``). ``model``: the prepared module (eval mode, ZeRO-3 gathers)."""
    knn = evaluate_representation(net.encode, bank, val_loader, accelerator, num_classes, cfg, module=model,
                                  linear=False)
    probe = evaluate_classifier(model, val_loader, accelerator, forward=lambda x: net.probe(net.encode(x)))
    return {"val_knn_acc": knn["knn_acc"], "val_probe_acc": probe["top1"]}


def evaluate_pretrained(net, model, project: Callable, bank, val_loader, test_loader, accelerator, num_classes: int,
                        cfg: SSLEvalConfig, floor: dict, seed: int = 0) -> dict:
    """The last phase of an SSL recipe: the pre-trained encoder ``net.encode`` (last epoch, never the
    best) on the test split -- weighted kNN and linear evaluation (``cfg``), the online probe -- its gains
    over the random-init ``floor`` (the same figures of the untrained network), and the collapse monitor:
    ``z_std``, the std of the L2-normalised projections (``project``) of the validation split, 0 at
    collapse and ``d^-1/2`` (``z_std_uniform``) for projections spread uniformly on the sphere."""
    final = evaluate_representation(net.encode, bank, test_loader, accelerator, num_classes, cfg, module=model,
                                    seed=seed)
    probe = evaluate_classifier(model, test_loader, accelerator, forward=lambda x: net.probe(net.encode(x)))
    z, _ = extract_features(project, val_loader, accelerator, module=model)
    return {"knn_acc": final["knn_acc"], "linear_acc": final["linear_acc"],
            "random_init_knn_acc": floor["knn_acc"], "random_init_linear_acc": floor["linear_acc"],
            "online_probe_acc": probe["top1"], "knn_gain": final["knn_acc"] - floor["knn_acc"],
            "linear_gain": final["linear_acc"] - floor["linear_acc"],
            "z_std": normalized_std(z).item(), "z_std_uniform": z.shape[1] ** -0.5}


def results_table(r: dict, title: str, model, cfg: SSLEvalConfig) -> str:
    """The table an SSL recipe prints at the end: the pre-trained encoder (``title``) against the random
    init on the test split, the gains, the online probe, the collapse monitor and where the encoder went."""
    arch = model.name + (f" {model.kwargs}" if model.kwargs else "")
    lines = [f"\nencoder: {arch}, {r['backbone_params']:,} parameters; test split (kNN k={cfg.knn_k}, T={cfg.knn_t}; "
             f"linear {cfg.linear_epochs} epochs, lr {cfg.linear_lr})",
             f"{'encoder':<28}{'kNN acc':>10}{'linear acc':>12}", "-" * 50,
             f"{title:<28}{r['knn_acc']:>10.4f}{r['linear_acc']:>12.4f}",
             f"{'random init (same arch)':<28}{r['random_init_knn_acc']:>10.4f}{r['random_init_linear_acc']:>12.4f}",
             f"{'gain':<28}{r['knn_gain']:>+10.4f}{r['linear_gain']:>+12.4f}",
             f"online probe acc {r['online_probe_acc']:.4f}; collapse monitor z_std {r['z_std']:.4f} "
             f"(uniform on the sphere: {r['z_std_uniform']:.4f}); {r['steps']} steps, "
             f"{r['pretrain_wall_s']:.1f}s pre-training",
             f"encoder exported to {r['backbone_path']}"]
    return "\n".join(lines)


def find_encoder(path: str | Path, stages: Sequence[str]) -> Path:
    """An exported encoder: ``path`` itself, or ``path/models/STAGE/backbone`` of a run directory (the first
    of ``stages`` that exists)."""
    path = Path(path)
    for stage in stages:
        if (path / "models" / stage / "backbone").is_dir():
            return path / "models" / stage / "backbone"
    return path


def offline_eval(cfg, stages: Sequence[str]) -> dict:
    """``--eval-only PATH``: kNN and linear evaluation of an exported encoder (``cfg.eval_only``: its
    directory, or a run directory with ``models/STAGE/backbone`` for one of ``stages``) on frozen features
    of ``cfg.data``, with ``cfg.eval``'s protocol; writes ``cfg.output_dir/eval_results.json`` and prints
    the figures. ``cfg``: a recipe config with ``eval_only``, ``data``, ``run``, ``eval``, ``seed``,
    ``output_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from visrep.data import build_classification_data
    from visrep.engine.export import load_model
    from visrep.zoo import get_data_config

    path = find_encoder(cfg.eval_only, stages)
    encoder, meta = load_model(path)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    size = cfg.data.image_size
    data_config = dict(get_data_config(encoder), input_size=(cfg.data.channels, size, size))
    data = build_classification_data(cfg.data, data_config, cfg.seed, cfg.run.batch_size, cfg.run.eval_batch_size,
                                     cfg.run.num_workers)
    encoder, bank, test = accelerator.prepare(encoder, bank_loader(cfg, data, data_config), data.test_loader)
    res = evaluate_representation(encoder, bank, test, accelerator, data.num_classes, cfg.eval, seed=cfg.seed)
    res = {"knn_acc": res["knn_acc"], "linear_acc": res["linear_acc"], "linear_train_acc": res["linear_train_acc"],
           "encoder": str(path), "architecture": meta["architecture"], "pretraining": meta.get("pretraining"),
           "eval_protocol": eval_protocol(cfg.eval, cfg.seed, str(meta.get("pretraining")), {}, cfg.data)}
    if accelerator.is_main_process:
        out = Path(cfg.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval_results.json").write_text(json.dumps(res, indent=2))
    accelerator.print(f"{meta['architecture']} from {path}: knn_acc={res['knn_acc']:.4f} "
                      f"linear_acc={res['linear_acc']:.4f} (k={cfg.eval.knn_k}, T={cfg.eval.knn_t}, "
                      f"{cfg.eval.linear_epochs} linear epochs)")
    return res
