"""BYOL: visrep's training step vs. one built from lightly's BYOL building blocks.

Peer: ``lightly.models.modules.BYOLProjectionHead`` / ``BYOLPredictionHead``,
``lightly.loss.NegativeCosineSimilarity``, ``lightly.models.utils.update_momentum`` and
``deactivate_requires_grad``, ``lightly.utils.scheduler.cosine_schedule``, assembled as in lightly's
BYOL example. Ours: ``visrep.ssl.BYOL`` + ``byol_loss`` + ``EMAUpdater`` (fused lerp), prepared by
Accelerate as the recipe does.

Both use the same backbone (same initial weights), the same head widths and initial head weights,
the same batch, precision and optimizer, and optimise the same objective: lightly's loss is written
as ``4 + 2 * (ncs(p0, z1) + ncs(p1, z0))``, which equals BYOL's ``sum of 2 - 2 cos`` (lightly's example
uses ``0.5 * (...)``, the same objective up to an affine map, i.e. another learning rate).

1. Throughput: training steps (two views, target forward, loss, backward, optimizer, EMA) timed in
   alternating rounds, so drift in machine load hits both alike; median step time -> images/s.
2. Accuracy: each trained the same number of epochs on the embedded digits (same two-view loader,
   LARS at the scaled rate, warm-up + cosine, cosine tau), then weighted kNN on the test split.

    python benchmarks/byol_bench.py                                   # CPU defaults
    python benchmarks/byol_bench.py --backbone resnet18 --proj-hidden 4096 --proj-dim 256 \
        --image-size 32 --batch-size 256 --device cuda --precision bf16 --epochs 20
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from types import SimpleNamespace

import torch

from timing import time_steps


def make_backbone(args):
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    return create_backbone(args.backbone, num_classes=0, small_input=True, width=args.width) \
        if args.width is not None else create_backbone(args.backbone, num_classes=0, small_input=True)


def autocast(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    return torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------------
# The two implementations. Each returns (step(v1, v2, k, total), online_encoder, params)
# ----------------------------------------------------------------------------------------------
def ours(args, backbone, make_opt, accelerator):
    from visrep.ssl import BYOL, EMAUpdater, byol_loss

    torch.manual_seed(1)
    model = BYOL(copy.deepcopy(backbone), args.proj_hidden, args.proj_dim, args.proj_hidden)
    opt = make_opt(model)
    model, opt = accelerator.prepare(model, opt)
    net = accelerator.unwrap_model(model)
    online, target = net.ema_pairs()
    ema = EMAUpdater(args.total_steps, args.base_tau)
    model.train()

    def step(v1, v2):
        with accelerator.autocast():
            out = model(v1, v2)
        loss = byol_loss(*out["p"], *out["z_target"])
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(online, target)
        return loss

    return step, net.backbone, model, opt


def peer(args, backbone, make_opt, heads_from):
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    device = torch.device(args.device)

    class LightlyBYOL(torch.nn.Module):  # lightly's example, verbatim in structure
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone
            self.projection_head = BYOLProjectionHead(backbone.num_features, args.proj_hidden, args.proj_dim)
            self.prediction_head = BYOLPredictionHead(args.proj_dim, args.proj_hidden, args.proj_dim)
            self.backbone_momentum = copy.deepcopy(self.backbone)
            self.projection_head_momentum = copy.deepcopy(self.projection_head)
            deactivate_requires_grad(self.backbone_momentum)
            deactivate_requires_grad(self.projection_head_momentum)

        def forward(self, x):
            return self.prediction_head(self.projection_head(self.backbone(x)))

        def forward_momentum(self, x):
            return self.projection_head_momentum(self.backbone_momentum(x)).detach()

    model = LightlyBYOL(copy.deepcopy(backbone))
    # identical initial head weights (same layer layout: Linear(no bias)-BN-ReLU-Linear)
    for mine, theirs in ((heads_from.projector, model.projection_head), (heads_from.predictor, model.prediction_head)):
        theirs.layers.load_state_dict(mine.state_dict())
    model.projection_head_momentum.load_state_dict(model.projection_head.state_dict())
    model = model.to(device)
    opt = make_opt(model)
    criterion = NegativeCosineSimilarity()
    k = [0]
    model.train()

    def step(x0, x1):
        m = cosine_schedule(k[0], args.total_steps, args.base_tau, 1.0)
        update_momentum(model.backbone, model.backbone_momentum, m=m)
        update_momentum(model.projection_head, model.projection_head_momentum, m=m)
        with autocast(args):
            p0, p1 = model(x0), model(x1)
            z0, z1 = model.forward_momentum(x0), model.forward_momentum(x1)
        loss = 4 + 2 * (criterion(p0.float(), z1.float()) + criterion(p1.float(), z0.float()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        k[0] += 1
        return loss

    return step, model.backbone, model, opt


# ----------------------------------------------------------------------------------------------
def throughput(args, backbone, accelerator, make_opt):
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    batches = [(torch.randn(*shape, generator=g).to(dev), torch.randn(*shape, generator=g).to(dev)) for _ in range(3)]
    args.total_steps = 10_000
    ours_step, _, ours_model, _ = ours(args, backbone, make_opt, accelerator)
    peer_step, *_ = peer(args, backbone, make_opt, accelerator.unwrap_model(ours_model))
    steps = {"visrep": ours_step, "lightly": peer_step}
    for step in steps.values():
        time_steps(step, batches, args.warmup, args.device)
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name] += time_steps(step, batches, args.steps, args.device)
    return {k: args.batch_size / statistics.median(v) for k, v in times.items()}, \
        {k: 1000 * statistics.median(v) for k, v in times.items()}


def accuracy(args, backbone, accelerator):
    """Train both for ``args.epochs`` on the digits with the same loader, optimizer and schedules;
    weighted kNN on the test split."""
    from visrep.data import DataConfig, build_classification_data
    from visrep.engine import ScheduleConfig, StepSchedule
    from visrep.ssl import (SSLAugmentConfig, SSLEvalConfig, SSLOptimConfig, build_ssl_optimizer, byol_transforms,
                            evaluate_representation)
    from visrep.zoo import get_data_config

    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))
    from byol import eval_loaders  # noqa: E402

    size = args.acc_image_size
    dcfg = DataConfig(source="digits", image_size=size, hflip=0.0)
    dc = dict(get_data_config(backbone), input_size=(3, size, size))
    aug = SSLAugmentConfig(crop_scale=(0.3, 1.0), hflip=0.0)
    views = byol_transforms(aug, size, dc["mean"], dc["std"])
    data = build_classification_data(dcfg, dc, 0, args.acc_batch_size, 256, 0, train_transform=views)
    ocfg = SSLOptimConfig(name="lars", base_lr=1.0, weight_decay=1e-5, eta=0.02)
    sched_cfg = ScheduleConfig(epochs=args.epochs, warmup_epochs=min(2.0, args.epochs / 4))
    spe = len(data.train_loader)
    args.total_steps = spe * args.epochs

    def make_opt(m):
        return build_ssl_optimizer(m, ocfg, args.acc_batch_size)

    rc = SimpleNamespace(data=dcfg, run=SimpleNamespace(eval_batch_size=256, num_workers=0))
    bank, test = eval_loaders(rc, data, dc), data.test_loader
    out = {}
    heads = None
    for name in ("visrep", "lightly"):
        torch.manual_seed(0)
        if name == "visrep":
            step, encoder, model, opt = ours(args, backbone, make_opt, accelerator)
            heads = accelerator.unwrap_model(model)
        else:
            step, encoder, model, opt = peer(args, backbone, make_opt, heads)
        sched = StepSchedule(opt, sched_cfg, spe)
        t0, k = time.perf_counter(), 0
        for epoch in range(args.epochs):
            data.sampler.set_epoch(epoch)
            data.train.set_epoch(epoch)
            for (v1, v2), _ in data.train_loader:
                sched.apply(k)
                step(v1.to(args.device), v2.to(args.device))
                k += 1
        ev = evaluate_representation(encoder, bank, test, accelerator, data.num_classes,
                                     SSLEvalConfig(knn_k=20, knn_t=0.07), module=model, linear=False)
        out[name] = (ev["knn_acc"], time.perf_counter() - t0)
    return out


def main(argv=None):
    from accelerate import Accelerator

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet20")
    p.add_argument("--width", type=float, default=0.5, help="width multiplier (CIFAR ResNets); -1: none")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--proj-hidden", type=int, default=512, help="paper: 4096")
    p.add_argument("--proj-dim", type=int, default=128, help="paper: 256")
    p.add_argument("--base-tau", type=float, default=0.99)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--epochs", type=int, default=6, help="accuracy: pre-training epochs on the digits (0: skip)")
    p.add_argument("--acc-image-size", type=int, default=16)
    p.add_argument("--acc-batch-size", type=int, default=64)
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.width = None if args.width is not None and args.width < 0 else args.width
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(args.precision, args.precision),
                              cpu=args.device == "cpu")
    backbone = make_backbone(args)

    def make_opt(m):
        return torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=0.01, momentum=0.9)

    ips, ms = throughput(args, backbone, accelerator, make_opt)
    acc = accuracy(args, backbone, accelerator) if args.epochs > 0 else None

    n_b = sum(q.numel() for q in backbone.parameters())
    print(f"\nBYOL step: {args.backbone} (width {args.width}, {n_b / 1e6:.3f}M params), heads "
          f"{args.proj_hidden}->{args.proj_dim}, batch {args.batch_size} x 2 views, {args.image_size}x{args.image_size}, "
          f"{args.precision}, {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds}x{args.steps} timed steps each (interleaved rounds)")
    head = f"{'implementation':<40}{'step ms':>10}{'images/s':>10}"
    if acc:
        head += f"{'kNN acc':>10}{'train s':>9}"
    print(head)
    for name, label in (("visrep", "visrep (BYOL + byol_loss + EMAUpdater)"), ("lightly", "lightly BYOL blocks")):
        row = f"{label:<40}{ms[name]:>10.1f}{ips[name]:>10.1f}"
        if acc:
            row += f"{acc[name][0]:>10.4f}{acc[name][1]:>9.1f}"
        print(row)
    print(f"ratio visrep / lightly: throughput {ips['visrep'] / ips['lightly']:.3f}" +
          (f", kNN accuracy {acc['visrep'][0] / max(acc['lightly'][0], 1e-9):.3f} "
           f"({args.epochs} epochs on digits {args.acc_image_size}px, batch {args.acc_batch_size})" if acc else ""))
    return ips, acc


if __name__ == "__main__":
    main()
