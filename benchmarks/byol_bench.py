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
   alternating rounds, so drift in machine load hits all alike; median step time -> images/s. Rows:

   - visrep fast: ours at the recipes' fast defaults: the BYOL module channels_last (it has
     convolutions), its whole training forward (the EMA target's under ``no_grad`` included)
     compiled with ``visrep.engine.fast.compile_training_forward(model, fallback=False)``, foreach SGD;
   - visrep eager: ours as the recipe ran before those switches (the reference);
   - lightly default: the peer as lightly's example runs it (eager, NCHW, torch's default SGD);
   - lightly compiled: the peer with the same switches: channels_last, ``nn.Module.compile()`` on the
     modules its step calls (the online network backbone -> projection -> prediction in one, the
     momentum backbone and projection head each), foreach SGD.

   Ratios (throughput): visrep fast / lightly default (target >= 1.25), visrep fast / lightly compiled
   (target >= 1.0), visrep fast / visrep eager. Warm-up steps (compilation included) are untimed; their
   seconds are printed per row. ``--no-compile-variants``: the two eager rows only (quick runs).
2. Accuracy: each trained with the BYOL recipe's digits preset (same backbone, heads, two-view
   loader, LARS at the scaled rate with the predictor's rate multiplier, warm-up + cosine, cosine
   tau) from the same initial weights, then weighted kNN on the test split; over several seeds
   (mean +- std), next to the untrained backbone.

    python benchmarks/byol_bench.py                                   # CPU defaults
    python benchmarks/byol_bench.py --epochs 0 --no-compile-variants  # eager throughput only, quick
    python benchmarks/byol_bench.py --backbone resnet18 --proj-hidden 4096 --proj-dim 256 \
        --image-size 32 --batch-size 256 --device cuda --precision bf16 --epochs 20
"""
from __future__ import annotations

import copy
import statistics
import time
from types import SimpleNamespace

import torch

from timing import bench_parser, require_compiler, time_steps, update, warm_and_interleave

# throughput rows: key -> label
VARIANTS = {
    "visrep fast": "visrep fast (channels_last + compile + foreach)",
    "visrep": "visrep eager (BYOL + byol_loss + EMAUpdater)",
    "lightly": "lightly default (BYOL blocks, eager)",
    "lightly compiled": "lightly + channels_last + compile + foreach",
}


def make_backbone(args, seed: int = 0):
    from visrep.zoo import create_backbone

    torch.manual_seed(seed)
    return create_backbone(args.backbone, num_classes=0, small_input=True, width=args.width) \
        if args.width is not None else create_backbone(args.backbone, num_classes=0, small_input=True)


def autocast(args):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    return torch.autocast(torch.device(args.device).type, dtype=dtype, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------------
# The two implementations. Each returns (step(v1, v2, k, total), online_encoder, params)
# ----------------------------------------------------------------------------------------------
def ours(args, backbone, make_opt, accelerator, seed: int = 0, fast: bool = False):
    """``fast``: channels_last and the training forward compiled, as the recipe's fast defaults do
    (the optimizer is ``make_opt``'s)."""
    from visrep.engine.fast import compile_training_forward, to_channels_last
    from visrep.ssl import BYOL, EMAUpdater, byol_loss

    torch.manual_seed(1 + seed)
    model = BYOL(copy.deepcopy(backbone), args.proj_hidden, args.proj_dim, args.proj_hidden)
    if fast:
        to_channels_last(model)
    opt = make_opt(model)
    model, opt = accelerator.prepare(model, opt)
    if fast:
        compile_training_forward(model, fallback=False)
    net = accelerator.unwrap_model(model)
    online, target = net.ema_pairs()
    ema = EMAUpdater(args.total_steps, args.base_tau)
    model.train()

    def step(v1, v2):
        with accelerator.autocast():
            out = model(v1, v2)
        loss = update(opt, byol_loss(*out["p"], *out["z_target"]), accelerator.backward)
        ema.update(online, target)
        return loss

    return step, net.backbone, model, opt


def peer(args, backbone, make_opt, heads_from, fast: bool = False):
    """``fast``: channels_last and ``nn.Module.compile()`` on every module the step calls."""
    from lightly.loss import NegativeCosineSimilarity
    from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    from visrep.engine.fast import to_channels_last

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
    if fast:
        to_channels_last(model)
        # the step calls model(x) (backbone -> projection -> prediction) and forward_momentum, a plain
        # method that calls the two momentum modules: compile those three
        for m in (model, model.backbone_momentum, model.projection_head_momentum):
            m.compile()
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
        k[0] += 1
        return update(opt, 4 + 2 * (criterion(p0.float(), z1.float()) + criterion(p1.float(), z0.float())))

    return step, model.backbone, model, opt


# ----------------------------------------------------------------------------------------------
def throughput(args, backbone, accelerator, make_opt):
    """Images/s and ms per step of each row of ``VARIANTS`` (the fast ones unless
    ``--no-compile-variants``), the warm-up seconds of each, and the EMA update alone."""
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    batches = [(torch.randn(*shape, generator=g).to(dev), torch.randn(*shape, generator=g).to(dev)) for _ in range(3)]
    args.total_steps = 10_000
    fast = args.compile_variants
    # every variant is built before any steps, so the peer copies ours' *initial* heads
    ours_step, _, ours_model, _ = ours(args, backbone, make_opt, accelerator)
    heads = accelerator.unwrap_model(ours_model)
    steps = {}
    if fast:
        steps["visrep fast"] = ours(args, backbone, lambda m: make_opt(m, foreach=True), accelerator, fast=True)[0]
    steps["visrep"] = ours_step
    steps["lightly"], _, peer_model, _ = peer(args, backbone, make_opt, heads)
    if fast:
        steps["lightly compiled"] = peer(args, backbone, lambda m: make_opt(m, foreach=True), heads, fast=True)[0]
    times, warm = warm_and_interleave(steps, batches, args.warmup, args.rounds, args.steps, args.device)
    return {k: args.batch_size / statistics.median(v) for k, v in times.items()}, \
        {k: 1000 * statistics.median(v) for k, v in times.items()}, warm, \
        ema_times(args, heads, peer_model)


def ema_times(args, ours_net, peer_net) -> dict:
    """The EMA update alone (part of the step above), ms per update: ours (one fused lerp over all
    tracked parameters) vs. lightly's ``update_momentum`` on the backbone and the projection head."""
    from lightly.models.utils import update_momentum

    from visrep.ssl import EMAUpdater

    online, target = ours_net.ema_pairs()
    ema = EMAUpdater(10_000, args.base_tau)

    def peer_update():
        update_momentum(peer_net.backbone, peer_net.backbone_momentum, m=0.99)
        update_momentum(peer_net.projection_head, peer_net.projection_head_momentum, m=0.99)

    fns = {"visrep": lambda: ema.update(online, target), "lightly": peer_update}
    times = {k: [] for k in fns}
    for r in range(args.rounds):
        for name, fn in (list(fns.items()) if r % 2 == 0 else reversed(list(fns.items()))):
            times[name] += time_steps(fn, [()], 5 * args.steps, args.device)
    res = {k: 1000 * statistics.median(v) for k, v in times.items()}
    res["params"] = sum(p.numel() for p in online)
    return res


def accuracy(args, accelerator, seed: int):
    """Train both on the digits with the BYOL recipe's own preset (``recipes/configs/byol_digits.yaml``:
    backbone, heads, augmentations, LARS, rates, warm-up + cosine, tau schedule; ``--epochs`` overrides
    its length) from the same initial weights (backbone, heads and data order from ``seed``), then a
    weighted kNN on the test split. Also the kNN of the untrained backbone (the floor)."""
    import sys
    from pathlib import Path

    from visrep.data import build_classification_data
    from visrep.engine import StepSchedule
    from visrep.engine.config import parse_config
    from visrep.ssl import build_ssl_optimizer, byol_transforms, evaluate_representation
    from visrep.zoo import get_data_config

    recipes = Path(__file__).resolve().parent.parent / "recipes"
    sys.path.insert(0, str(recipes))
    from byol import BYOLRecipeConfig, build_backbone, eval_loaders  # noqa: E402

    over = ["--seed", str(seed)] + (["--schedule.epochs", str(args.epochs)] if args.epochs else [])
    cfg = parse_config(BYOLRecipeConfig, ["--config", str(recipes / "configs" / "byol_digits.yaml"), *over])
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.model)
    size = cfg.data.image_size
    dc = dict(get_data_config(backbone), input_size=(cfg.data.channels, size, size))
    views = byol_transforms(cfg.augment, size, dc["mean"], dc["std"], cfg.data.channels)
    data = build_classification_data(cfg.data, dc, seed, cfg.run.batch_size, cfg.run.eval_batch_size, 0,
                                     train_transform=views)
    spe, epochs = len(data.train_loader), cfg.schedule.epochs
    run_args = SimpleNamespace(**vars(args))
    run_args.proj_hidden, run_args.proj_dim = cfg.byol.proj_hidden_dim, cfg.byol.proj_dim
    run_args.base_tau, run_args.total_steps = cfg.byol.base_tau, spe * epochs
    assert cfg.byol.pred_hidden_dim == cfg.byol.proj_hidden_dim and cfg.byol.final_tau == 1.0

    bank, test = eval_loaders(cfg, data, dc), data.test_loader
    floor = evaluate_representation(copy.deepcopy(backbone), bank, test, accelerator, data.num_classes, cfg.eval,
                                    linear=False)
    out = {"random init": (floor["knn_acc"], 0.0)}
    heads = None
    for name in ("visrep", "lightly"):
        torch.manual_seed(seed)
        if name == "visrep":
            step, encoder, model, opt = ours(
                run_args, backbone, lambda m: build_ssl_optimizer(m, cfg.optim, cfg.run.batch_size), accelerator, seed)
            # the peer starts from the same *initial* heads: copy them before ours trains
            heads = copy.deepcopy(accelerator.unwrap_model(model))
        else:
            step, encoder, model, opt = peer(
                run_args, backbone, lambda m: build_ssl_optimizer(m, cfg.optim, cfg.run.batch_size,
                                                                  predictor_prefix="prediction_head."), heads)
        sched = StepSchedule(opt, cfg.schedule, spe)
        t0, k = time.perf_counter(), 0
        for epoch in range(epochs):
            data.sampler.set_epoch(epoch)
            data.train.set_epoch(epoch)
            for (v1, v2), _ in data.train_loader:
                sched.apply(k)
                step(v1.to(args.device), v2.to(args.device))
                k += 1
        ev = evaluate_representation(encoder, bank, test, accelerator, data.num_classes, cfg.eval, module=model,
                                     linear=False)
        out[name] = (ev["knn_acc"], time.perf_counter() - t0)
    return out, epochs


def main(argv=None):
    from accelerate import Accelerator

    p = bench_parser(__doc__, "auto", image_size=32, batch_size=64, rounds=6, steps=5, warmup=2, threads=None)
    p.add_argument("--backbone", default="resnet20")
    p.add_argument("--width", type=float, default=0.5, help="width multiplier (CIFAR ResNets); -1: none")
    p.add_argument("--proj-hidden", type=int, default=512, help="paper: 4096")
    p.add_argument("--proj-dim", type=int, default=128, help="paper: 256")
    p.add_argument("--base-tau", type=float, default=0.99)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--epochs", type=int, default=None,
                   help="accuracy: pre-training epochs on the digits (default: the preset's; 0: skip accuracy)")
    p.add_argument("--seeds", type=int, default=3, help="accuracy: runs with seeds 0..N-1 (init, data order)")
    p.add_argument("--no-compile-variants", dest="compile_variants", action="store_false",
                   help="throughput: skip the compiled rows (visrep fast, lightly compiled); quick runs")
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.threads:
        torch.set_num_threads(args.threads)
    require_compiler(p, args)
    args.width = None if args.width is not None and args.width < 0 else args.width
    accelerator = Accelerator(mixed_precision={"fp32": "no"}.get(args.precision, args.precision),
                              cpu=args.device == "cpu")
    backbone = make_backbone(args)

    def make_opt(m, foreach=None):  # foreach=None: torch's default (the per-parameter loop on a CPU)
        return torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=0.01, momentum=0.9,
                               foreach=foreach)

    ips, ms, warm, ema_ms = throughput(args, backbone, accelerator, make_opt)
    runs = [accuracy(args, accelerator, seed) for seed in range(args.seeds)] if args.epochs != 0 else []
    acc = {name: ([r[name][0] for r, _ in runs], statistics.mean(r[name][1] for r, _ in runs))
           for name in ("visrep", "lightly", "random init")} if runs else None
    acc_epochs = runs[0][1] if runs else 0

    n_b = sum(q.numel() for q in backbone.parameters())
    print(f"\nBYOL step: {args.backbone} (width {args.width}, {n_b / 1e6:.3f}M params), heads "
          f"{args.proj_hidden}->{args.proj_dim}, batch {args.batch_size} x 2 views, {args.image_size}x{args.image_size}, "
          f"{args.precision}, {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds}x{args.steps} timed steps each (interleaved rounds)")
    if acc:
        print(f"kNN: the BYOL recipe's preset (recipes/configs/byol_digits.yaml), {acc_epochs} epochs, seeds 0..{args.seeds - 1}")
    head = f"{'implementation':<48}{'step ms':>10}{'images/s':>10}{'warm-up s':>11}"
    if acc:
        head += f"{'kNN acc (mean +- std)':>24}{'per seed':>24}{'train s':>9}"
    print(head)
    mean = {k: statistics.mean(v[0]) for k, v in acc.items()} if acc else {}
    for name, label in (*VARIANTS.items(), ("random init", "untrained backbone (floor)")):
        if name not in ips and not (acc and name in acc):
            continue
        row = f"{label:<48}" + (f"{ms[name]:>10.1f}{ips[name]:>10.1f}{warm[name]:>11.1f}" if name in ips
                                else f"{'-':>10}{'-':>10}{'-':>11}")
        if acc and name in acc:
            accs = acc[name][0]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            row += f"{f'{mean[name]:.4f} +- {std:.4f}':>24}{' '.join(f'{a:.3f}' for a in accs):>24}{acc[name][1]:>9.1f}"
        elif acc:
            row += f"{'-':>24}{'-':>24}{'-':>9}"  # accuracy is trained eager (the same math)
        print(row)
    print(f"EMA update alone ({ema_ms['params'] / 1e6:.2f}M tracked parameters): "
          f"visrep {ema_ms['visrep']:.2f} ms, lightly {ema_ms['lightly']:.2f} ms, "
          f"ratio {ema_ms['lightly'] / ema_ms['visrep']:.2f}x")
    print(f"ratio visrep eager / lightly default: throughput {ips['visrep'] / ips['lightly']:.3f}" +
          (f", mean kNN accuracy {mean['visrep'] / max(mean['lightly'], 1e-9):.3f} ({args.seeds} seeds, "
           f"{acc_epochs} epochs, the recipe's digits preset)" if acc else ""))
    if args.compile_variants:
        fast = ips["visrep fast"]
        print(f"throughput ratio visrep fast / lightly default: {fast / ips['lightly']:.3f} (target >= 1.25)")
        print(f"throughput ratio visrep fast / lightly compiled: {fast / ips['lightly compiled']:.3f} (target >= 1.0)")
        print(f"throughput ratio visrep fast / visrep eager: {fast / ips['visrep']:.3f}")
    return ips, acc


if __name__ == "__main__":
    main()
