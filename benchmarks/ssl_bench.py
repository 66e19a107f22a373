"""The self-supervised family: visrep's training step and accuracy vs lightly's, method by method.

For SimCLR, MoCo v3, DINO, VICReg and Barlow Twins, ours is what ``recipes/selfsup.py`` trains:
``visrep.ssl.build_method`` (the method's networks), the recipe's own ``ssl_loss`` (the loss over the
global batch), ``EMAUpdater`` and ``TeacherTemperature`` where the method has them. The peer is lightly's
implementation of the same method, assembled as lightly's examples assemble it:

  simclr  -- ``SimCLRProjectionHead`` + ``NTXentLoss`` (lightly's head ends in an affine BN; ours, with
             ``proj_last_bn`` as in SimCLR's official code, in a BN with a scale and no shift);
  mocov3  -- ``MoCoProjectionHead`` (projector: ``proj_layers`` layers with BN; predictor:
             ``pred_layers``; with ``batch_norm=True`` both end in an affine BN, whatever the preset's
             ``pred_last_bn``, which only ours follow) + ``update_momentum`` / ``cosine_schedule``;
             lightly has no MoCo v3 loss, so the peer's loss is the paper's Algorithm 1 ``ctr`` written
             out (cross-entropy of q k^T / t against the diagonal, times 2t);
  dino    -- ``DINOProjectionHead`` + ``DINOLoss`` (its own centre) + ``update_momentum``, global and
             local crops through the student one crop at a time, as lightly's example does;
  vicreg  -- ``VICRegProjectionHead`` + ``VICRegLoss``;
  barlow  -- ``BarlowTwinsProjectionHead`` + ``BarlowTwinsLoss``.

Both sides use the same backbone with the same initial weights, the head widths and hyper-parameters of
the recipe's digits preset (``recipes/configs/ssl_digits.yaml``), the same batch and optimizer.

1. Throughput (per method; interleaved rounds, median step -> images/s). Rows: visrep fast (channels_last,
   the training forward compiled with ``compile_training_forward``, foreach SGD: the recipe's fast path),
   visrep eager, lightly default (eager, NCHW, torch's default SGD), lightly compiled (channels_last,
   ``nn.Module.compile()`` on the modules its step calls, foreach SGD). Ratios: fast / lightly default
   (target >= 1.25), fast / lightly compiled (target >= 1.0), each from the medians over all rounds and, beside
   it, the lowest and highest of the per-round ratios (``timing.round_ratios``): how far one run can move.
2. Accuracy (``--epochs``, ``--seeds``): both trained with the preset's augmentations, LARS at the scaled
   rate, warm-up + cosine, EMA momentum and teacher-temperature schedules, from the same initial weights and
   data order, then weighted kNN and linear evaluation of the frozen encoder on the test split (the
   preset's ``eval`` group; nothing is selected on the test split), mean +- std over the seeds. ``--data
   digits_m`` trains with the Digits-M preset (``recipes/configs/ssl_digits_m.yaml``: the digits' preset with
   colour augmentation, chosen on validation).

    python benchmarks/ssl_bench.py --epochs 0                      # throughput only, every method
    python benchmarks/ssl_bench.py --methods simclr dino --epochs 0 --no-compile-variants
    python benchmarks/ssl_bench.py --methods simclr --seeds 3 --data digits_m   # + accuracy, 3 seeds

Seeds can be spread over processes (two 1-thread processes on two cores) and pooled: each process appends
its finished seeds to a file, and ``--summarise`` prints the table over all of them::

    python benchmarks/ssl_bench.py --methods vicreg --seeds 5 --first-seed 0 --threads 1 --record runs/a.jsonl
    python benchmarks/ssl_bench.py --methods vicreg --seeds 5 --first-seed 5 --threads 1 --record runs/b.jsonl
    python benchmarks/ssl_bench.py --summarise runs/a.jsonl runs/b.jsonl

``--visrep-set KEY=VALUE`` (repeatable) changes visrep's side alone, within the measured method's group,
to ask whether one implementation difference separates the two (the setting is recorded, and
``--summarise`` keeps such seeds apart)::

    python benchmarks/ssl_bench.py --methods simclr --data digits_m --visrep-set simclr.joint_batch=False

``benchmarks/ssl_parity.py`` checks the other half of such a comparison: from the same weights, the two
implementations compute the same loss, gradients and trajectory.
"""
from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from timing import bench_parser, ratio_spread, require_compiler, round_ratios, update, warm_and_interleave

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))
METHODS = ("simclr", "mocov3", "dino", "vicreg", "barlow")
VARIANTS = {"visrep fast": "visrep fast (channels_last + compile + foreach)", "visrep": "visrep eager",
            "lightly": "lightly default (eager)", "lightly compiled": "lightly + channels_last + compile + foreach"}


PRESETS = {"digits": "ssl_digits.yaml", "digits_m": "ssl_digits_m.yaml"}


def preset(method: str, seed: int = 0, epochs: int | None = None, data: str = "digits", sets: tuple = ()):
    """The recipe's preset for ``data`` (Digits-M has its own: the digits' preset plus colour augmentation),
    with ``sets`` (``"KEY=VALUE"`` strings, as ``--KEY VALUE`` on the recipe's command line) on top."""
    from selfsup import SSLRecipeConfig

    from visrep.engine.config import parse_config

    over = ["--method", method, "--seed", str(seed)]
    over += ["--schedule.epochs", str(epochs)] if epochs else []
    for kv in sets:
        key, value = kv.split("=", 1)
        over += ["--" + key, value]
    return parse_config(SSLRecipeConfig, ["--config", str(ROOT / "recipes" / "configs" / PRESETS[data]), *over])


def check_visrep_sets(parser, sets: list[str], methods) -> None:
    """``--visrep-set`` takes KEY=VALUE with KEY in the group of the one method measured: the data, augmentation,
    optimizer and schedule stay the preset's on both sides, and only visrep's side is changed."""
    for kv in sets:
        key = kv.split("=", 1)[0]
        if "=" not in kv or len(methods) != 1 or not key.startswith(methods[0] + "."):
            parser.error(f"--visrep-set {kv}: give KEY=VALUE with KEY in the group of the one method of --methods "
                         f"(e.g. --methods simclr --visrep-set simclr.joint_batch=False)")
    if sets:
        preset(methods[0], sets=tuple(sets))  # an unknown key or a bad value stops here, before any timing


# ----------------------------------------------------------------------------------------------
# The two implementations: each returns (step(views), encoder, model, optimizer)
# ----------------------------------------------------------------------------------------------
def ours(cfg, backbone, make_opt, accelerator, total_steps: int, fast: bool = False):
    from selfsup import ssl_loss

    from visrep.engine.fast import compile_training_forward, to_channels_last
    from visrep.ssl import EMAUpdater, TeacherTemperature, build_method

    hp = getattr(cfg, cfg.method)
    torch.manual_seed(1 + cfg.seed)
    model = build_method(cfg.method, hp, copy.deepcopy(backbone), 0)
    if fast:
        to_channels_last(model)
    opt = make_opt(model)
    model, opt = accelerator.prepare(model, opt)
    if fast:
        compile_training_forward(model, fallback=False)
    net = accelerator.unwrap_model(model)
    pairs = net.ema_pairs()
    ema = EMAUpdater(total_steps, hp.base_tau, hp.final_tau) if pairs else None
    temp = TeacherTemperature(warmup_steps(cfg, total_steps), hp.warmup_teacher_temp, hp.teacher_temp) \
        if cfg.method == "dino" else None
    model.train()

    def step(views):
        out = model(*views)
        loss, _ = ssl_loss(cfg, net, out, temp.value if temp else None)
        loss = update(opt, loss, accelerator.backward)
        if ema is not None:
            ema.update(*pairs)
        if temp is not None:
            net.criterion.update_center(out["teacher"])
            temp.tick()
        return loss

    return step, net.backbone, model, opt


def warmup_steps(cfg, total_steps: int) -> int:
    return round(cfg.dino.warmup_teacher_temp_epochs / cfg.schedule.epochs * total_steps)


def mocov3_ctr(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo v3's Algorithm 1, one process: ``CrossEntropy(q k^T / t, arange(N)) * 2t`` on normalised q, k."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return F.cross_entropy(q @ k.t() / t, torch.arange(q.shape[0], device=q.device)) * 2 * t


def peer(cfg, backbone, make_opt, device, total_steps: int, fast: bool = False):
    from lightly.loss import BarlowTwinsLoss, DINOLoss, NTXentLoss, VICRegLoss
    from lightly.models.modules.heads import (BarlowTwinsProjectionHead, DINOProjectionHead, MoCoProjectionHead,
                                        SimCLRProjectionHead, VICRegProjectionHead)
    from lightly.models.utils import deactivate_requires_grad, update_momentum
    from lightly.utils.scheduler import cosine_schedule

    from visrep.engine.fast import to_channels_last
    from visrep.ssl import teacher_temp_schedule

    m, hp = cfg.method, getattr(cfg, cfg.method)
    nf = int(backbone.num_features)
    torch.manual_seed(1 + cfg.seed)
    model = nn.Module()
    model.backbone = copy.deepcopy(backbone)
    if m == "simclr":
        model.head = SimCLRProjectionHead(nf, hp.proj_hidden_dim, hp.proj_dim)
        crit = NTXentLoss(hp.temperature)
    elif m == "vicreg":
        model.head = VICRegProjectionHead(nf, hp.proj_hidden_dim, hp.proj_dim, num_layers=hp.proj_layers)
        crit = VICRegLoss(hp.sim_coeff, hp.std_coeff, hp.cov_coeff)
    elif m == "barlow":
        model.head = BarlowTwinsProjectionHead(nf, hp.proj_hidden_dim, hp.proj_dim)
        crit = BarlowTwinsLoss(hp.lambd)
    elif m == "mocov3":
        model.head = MoCoProjectionHead(nf, hp.proj_hidden_dim, hp.proj_dim, num_layers=hp.proj_layers, batch_norm=True)
        model.predictor = MoCoProjectionHead(hp.proj_dim, hp.pred_hidden_dim, hp.proj_dim, num_layers=hp.pred_layers,
                                             batch_norm=True)
    else:  # dino
        model.head = DINOProjectionHead(nf, hp.hidden_dim, hp.bottleneck_dim, hp.out_dim, batch_norm=hp.head_batch_norm,
                                        norm_last_layer=hp.norm_last_layer)
        crit = DINOLoss(hp.out_dim, hp.warmup_teacher_temp, hp.teacher_temp, student_temp=hp.student_temp,
                        center_momentum=hp.center_momentum)
    if m in ("mocov3", "dino"):
        model.backbone_momentum = copy.deepcopy(model.backbone)
        if m == "dino":  # a weight-normed head cannot be deep-copied: a second one, as lightly's example builds
            model.head_momentum = DINOProjectionHead(nf, hp.hidden_dim, hp.bottleneck_dim, hp.out_dim,
                                                     batch_norm=hp.head_batch_norm, norm_last_layer=hp.norm_last_layer)
            model.head_momentum.load_state_dict(model.head.state_dict())  # starting as the student, as ours does
        else:
            model.head_momentum = copy.deepcopy(model.head)
        deactivate_requires_grad(model.backbone_momentum)
        deactivate_requires_grad(model.head_momentum)
    model = model.to(device)
    if m == "dino":
        crit = crit.to(device)
    if fast:
        to_channels_last(model)
    student = nn.Sequential(model.backbone, model.head)
    query = nn.Sequential(student, model.predictor) if m == "mocov3" else student
    teacher = nn.Sequential(model.backbone_momentum, model.head_momentum) if m in ("mocov3", "dino") else None
    if fast:
        query.compile()
        if teacher is not None:
            teacher.compile()
    opt = make_opt(model)
    k = [0]
    model.train()

    def step(views):
        if teacher is not None:
            tau = cosine_schedule(k[0], total_steps, hp.base_tau, hp.final_tau)
            update_momentum(model.backbone, model.backbone_momentum, m=tau)
            update_momentum(model.head, model.head_momentum, m=tau)
        if m == "mocov3":
            x0, x1 = views
            q0, q1 = query(x0), query(x1)
            with torch.no_grad():
                k0, k1 = teacher(x0), teacher(x1)
            loss = mocov3_ctr(q0, k1, hp.temperature) + mocov3_ctr(q1, k0, hp.temperature)
        elif m == "dino":
            with torch.no_grad():
                t_out = [teacher(v) for v in views[:2]]
            s_out = [student(v) for v in views]
            t = teacher_temp_schedule(k[0], warmup_steps(cfg, total_steps), hp.warmup_teacher_temp, hp.teacher_temp)
            loss = crit(t_out, s_out, teacher_temp=t)
        else:
            z0, z1 = student(views[0]), student(views[1])
            loss = crit(z0, z1)
        k[0] += 1
        return update(opt, loss)

    return step, model.backbone, model, opt


# ----------------------------------------------------------------------------------------------
def random_views(cfg, batch: int, device, g) -> list[torch.Tensor]:
    s = cfg.data.image_size
    views = [torch.randn(batch, 3, s, s, generator=g).to(device) for _ in range(2)]
    if cfg.method == "dino":
        ls = cfg.dino.local_size
        views += [torch.randn(batch, 3, ls, ls, generator=g).to(device) for _ in range(cfg.dino.n_local)]
    return views


def throughput(args, cfg, backbone, accelerator, make_opt) -> tuple[dict, dict, dict]:
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    batches = [(random_views(cfg, args.batch_size, dev, g),) for _ in range(3)]
    steps = {}
    if args.compile_variants:
        steps["visrep fast"] = ours(cfg, backbone, lambda mo: make_opt(mo, True), accelerator, 10_000, fast=True)[0]
    steps["visrep"] = ours(cfg, backbone, make_opt, accelerator, 10_000)[0]
    steps["lightly"] = peer(cfg, backbone, make_opt, dev, 10_000)[0]
    if args.compile_variants:
        steps["lightly compiled"] = peer(cfg, backbone, lambda mo: make_opt(mo, True), dev, 10_000, fast=True)[0]
    times, warm = warm_and_interleave(steps, batches, args.warmup, args.rounds, args.steps, args.device)
    pairs = [("visrep", "lightly")] + ([("visrep fast", "lightly"), ("visrep fast", "lightly compiled")]
                                       if args.compile_variants else [])
    return ({k: args.batch_size / statistics.median(v) for k, v in times.items()},
            {k: 1000 * statistics.median(v) for k, v in times.items()}, warm,
            {pair: round_ratios(times, *pair, args.steps) for pair in pairs})


def accuracy(args, method: str, accelerator, seed: int) -> dict:
    """Both trained with the preset of ``--data`` (``--epochs`` overrides its length) from the same
    initial weights and data order, then kNN + linear evaluation on the test split; and the untrained floor."""
    from selfsup import bank_loader

    from visrep.data import build_classification_data
    from visrep.engine import StepSchedule
    from visrep.ssl import build_backbone, build_ssl_optimizer, evaluate_representation, multicrop_transforms
    from visrep.zoo import get_data_config

    cfg = preset(method, seed, args.epochs, args.data)
    vcfg = preset(method, seed, args.epochs, args.data, tuple(args.visrep_set)) if args.visrep_set else cfg
    hp = getattr(cfg, method)
    torch.manual_seed(seed)
    backbone = build_backbone(cfg.model)
    size, chans = cfg.data.image_size, cfg.data.channels
    dc = dict(get_data_config(backbone), input_size=(chans, size, size))
    crops = dict(n_local=hp.n_local, local_size=hp.local_size, local_crop_scale=hp.local_crop_scale) \
        if method == "dino" else {}
    views = multicrop_transforms(cfg.augment, size, dc["mean"], dc["std"], chans, **crops)
    data = build_classification_data(cfg.data, dc, seed, cfg.run.batch_size, cfg.run.eval_batch_size, 0,
                                     train_transform=views)
    spe, epochs = len(data.train_loader), cfg.schedule.epochs
    bank, test = bank_loader(cfg, data, dc), data.test_loader
    floor = evaluate_representation(copy.deepcopy(backbone), bank, test, accelerator, data.num_classes, cfg.eval,
                                    seed=seed)
    out = {"random init": (floor["knn_acc"], floor["linear_acc"], 0.0)}
    for name in ("visrep", "lightly"):
        torch.manual_seed(seed)
        make_opt = lambda mo: build_ssl_optimizer(mo, cfg.optim, cfg.run.batch_size,  # noqa: E731
                                                  predictor_prefix="predictor.")
        if name == "visrep":
            step, encoder, model, opt = ours(vcfg, backbone, make_opt, accelerator, spe * epochs)
        else:
            step, encoder, model, opt = peer(cfg, backbone, make_opt, torch.device(args.device), spe * epochs)
        sched = StepSchedule(opt, cfg.schedule, spe)
        t0, k = time.perf_counter(), 0
        for epoch in range(epochs):
            data.sampler.set_epoch(epoch)
            data.train.set_epoch(epoch)
            for v, _ in data.train_loader:
                sched.apply(k)
                step([x.to(args.device) for x in v])
                k += 1
        ev = evaluate_representation(encoder, bank, test, accelerator, data.num_classes, cfg.eval, module=model,
                                     seed=seed)
        out[name] = (ev["knn_acc"], ev["linear_acc"], time.perf_counter() - t0)
    return out


def print_accuracy(runs: list[dict]) -> None:
    """Mean +- std over seeds of kNN and linear accuracy (and the mean pre-training seconds) per implementation,
    then each seed's kNN / linear for visrep and lightly."""
    print(f"{'implementation':<20}{'kNN mean +- std':>20}{'linear mean +- std':>22}{'train s':>9}")
    sd = (lambda v: statistics.stdev(v) if len(v) > 1 else 0.0)  # noqa: E731
    for name in ("visrep", "lightly", "random init"):
        knn, lin = [r[name][0] for r in runs], [r[name][1] for r in runs]
        print(f"{name:<20}{f'{statistics.mean(knn):.4f} +- {sd(knn):.4f}':>20}"
              f"{f'{statistics.mean(lin):.4f} +- {sd(lin):.4f}':>22}{statistics.mean(r[name][2] for r in runs):>9.1f}")
    print("per seed kNN visrep / lightly: " + ", ".join(f"{r['visrep'][0]:.3f} / {r['lightly'][0]:.3f}" for r in runs))
    print("per seed linear visrep / lightly: " + ", ".join(f"{r['visrep'][1]:.3f} / {r['lightly'][1]:.3f}"
                                                           for r in runs))
    if len(runs) > 1:  # the seeds pair the two (same initial backbone, same data order)
        line = []
        for i, name in ((0, "kNN"), (1, "linear")):
            d = [r["visrep"][i] - r["lightly"][i] for r in runs]
            wins = sum(x > 0 for x in d), sum(x < 0 for x in d)
            line.append(f"{name} {statistics.mean(d):+.4f} +- {statistics.stdev(d) / len(d) ** 0.5:.4f} "
                        f"(visrep ahead on {wins[0]} seeds, behind on {wins[1]})")
        print("paired difference visrep - lightly, mean +- standard error: " + "; ".join(line))


RECORD_KEYS = ("method", "data", "seed", "visrep", "lightly", "random init")  # one line of --record


def summarise(files: list[Path]) -> dict:
    """The accuracy table of every (method, data) in the ``--record`` files, seeds sorted; a seed recorded
    twice is an error (two runs of one comparison overlapped)."""
    groups: dict = {}
    for path in files:
        if not path.is_file():
            raise SystemExit(f"error: {path}: no such file; pass the files that --record wrote")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise SystemExit(f"error: {path}:{n}: not a seed recorded by --record (not JSON: {e})")
            missing = [k for k in RECORD_KEYS if not isinstance(r, dict) or k not in r]
            if missing:
                raise SystemExit(f"error: {path}:{n}: not a seed recorded by --record (no {', '.join(missing)})")
            sets = tuple(r.get("visrep_set", ()))
            seeds = groups.setdefault((r["method"], r["data"], sets), {})
            if r["seed"] in seeds:
                raise SystemExit(f"error: {path}:{n}: {r['method']} on {r['data']} seed {r['seed']} is recorded twice; "
                                 "keep one run per seed")
            seeds[r["seed"]] = r
    for (method, data, sets), seeds in groups.items():
        order = sorted(seeds)
        print(f"\naccuracy: {method}, {data}" + (f", visrep with {' '.join(sets)}" if sets else "")
              + f", {len(order)} seeds: {', '.join(map(str, order))} (test split)")
        print_accuracy([seeds[s] for s in order])
    return groups


def main(argv=None):
    from accelerate import Accelerator

    p = bench_parser(__doc__, "auto", image_size=16, batch_size=64, rounds=3, steps=4, warmup=2, threads=None)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--epochs", type=int, default=None,
                   help="accuracy: pre-training epochs (default: the preset's; 0: throughput only)")
    p.add_argument("--seeds", type=int, default=3, help="accuracy: N seeds (init, data order)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="accuracy: the first seed (two processes can share the seeds of one comparison)")
    p.add_argument("--data", choices=list(PRESETS), default="digits",
                   help="accuracy: the data, each with its preset (recipes/configs/ssl_digits.yaml, ssl_digits_m.yaml)")
    p.add_argument("--no-compile-variants", dest="compile_variants", action="store_false")
    p.add_argument("--record", type=Path, default=None, metavar="FILE",
                   help="accuracy: append each finished seed to FILE as a JSON line (method, data, seed, results)")
    p.add_argument("--visrep-set", action="append", default=[], metavar="KEY=VALUE",
                   help="accuracy: a setting of the method's group for visrep's side only (repeatable; recorded), "
                        "e.g. simclr.joint_batch=False")
    p.add_argument("--summarise", type=Path, nargs="+", default=None, metavar="FILE",
                   help="print the accuracy table of the seeds recorded in FILEs (several runs' --record) and exit")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds {args.seeds}: give at least one seed (--epochs 0 measures throughput only)")
    if args.summarise:
        return summarise(args.summarise)
    check_visrep_sets(p, args.visrep_set, args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)
    require_compiler(p, args)
    accelerator = Accelerator(cpu=args.device == "cpu")

    def make_opt(mo, foreach=None):
        return torch.optim.SGD([q for q in mo.parameters() if q.requires_grad], lr=0.01, momentum=0.9,
                               foreach=foreach)

    print(f"ssl step: the preset's backbone and heads (recipes/configs/ssl_digits.yaml), batch {args.batch_size}, "
          f"{args.device}, torch threads {torch.get_num_threads()}, {args.rounds}x{args.steps} timed steps per row "
          f"(interleaved rounds)")
    summary = []
    for method in args.methods:
        cfg = preset(method)
        from visrep.ssl import build_backbone

        torch.manual_seed(0)
        backbone = build_backbone(cfg.model)
        ips, ms, warm, per_round = throughput(args, cfg, backbone, accelerator, make_opt)
        print(f"\n{method}: {cfg.data.image_size} px" + (f" + {cfg.dino.n_local} local crops of {cfg.dino.local_size} px"
                                                        if method == "dino" else ""))
        print(f"{'implementation':<48}{'step ms':>10}{'images/s':>10}{'warm-up s':>11}")
        for key, label in VARIANTS.items():
            if key in ips:
                print(f"{label:<48}{ms[key]:>10.1f}{ips[key]:>10.1f}{warm[key]:>11.1f}")
        line = [method, ips["visrep"] / ips["lightly"]]
        print(f"ratio visrep eager / lightly default: {line[1]:.3f}; "
              f"per round {ratio_spread(per_round['visrep', 'lightly'])}")
        if args.compile_variants:
            line += [ips["visrep fast"] / ips["lightly"], ips["visrep fast"] / ips["lightly compiled"]]
            print(f"ratio visrep fast / lightly default: {line[2]:.3f} (target >= 1.25); "
                  f"per round {ratio_spread(per_round['visrep fast', 'lightly'])}")
            print(f"ratio visrep fast / lightly compiled: {line[3]:.3f} (target >= 1.0); "
                  f"per round {ratio_spread(per_round['visrep fast', 'lightly compiled'])}")
        line.append(per_round)
        if args.epochs != 0:
            seeds = range(args.first_seed, args.first_seed + args.seeds)
            runs = []
            for s in seeds:
                runs.append(accuracy(args, method, accelerator, s))
                if args.record:
                    with open(args.record, "a") as f:
                        f.write(json.dumps({"method": method, "data": args.data, "seed": s, **runs[-1],
                                            **({"visrep_set": args.visrep_set} if args.visrep_set else {})}) + "\n")
            print(f"accuracy: {method}, {args.data} ({PRESETS[args.data]})"
                  + (f", visrep with {' '.join(args.visrep_set)}" if args.visrep_set else "")
                  + f", seeds {seeds[0]}..{seeds[-1]} (test split)")
            print_accuracy(runs)
        summary.append(line)
    print(f"\n{'method':<10}{'eager / lightly':>17}" + (f"{'fast / lightly':>16}{'fast / lightly compiled':>25}"
                                                       if args.compile_variants else ""))
    for line in summary:
        print(f"{line[0]:<10}" + "".join(f"{v:>17.3f}" if i == 0 else f"{v:>16.3f}" if i == 1 else f"{v:>25.3f}"
                                          for i, v in enumerate(line[1:-1])))
    print("per-round ratios, lowest-highest (each round times every row back to back):")
    for line in summary:
        print(f"{line[0]:<10}" + "".join(f"{f'{min(r):.2f}-{max(r):.2f}':>{w}}"
                                          for r, w in zip(line[-1].values(), (17, 16, 25))))
    return summary


if __name__ == "__main__":
    main()
