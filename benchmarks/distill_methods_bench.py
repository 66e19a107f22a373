"""Feature- and relation-based distillation losses: visrep.distill vs torchdistill, speed and accuracy.

1. Throughput (default): each loss's forward + backward on the same tensors -- visrep's pure functions
   (``visrep.distill.features``) against torchdistill's implementation of the same loss
   (``torchdistill.losses.mid_level``: ``ATLoss`` in its 'code' mode with weight beta/2, ``DISTLoss``,
   ``RKDLoss`` with factors 25/50; for FitNets torchdistill's ``SimpleLossWrapper`` around ``nn.MSELoss``,
   its FitNets configs' criterion). The inputs are shaped as a CIFAR ResNet pair's at ``--image-size``:
   stage maps of a ResNet-20 x0.5 student (8/16/32 channels) and a ResNet-20 teacher (16/32/64),
   logits over ``--num-classes``, penultimate embeddings (32 / 64). Interleaved rounds (the order reversed
   every other round), median step -> steps/s and the ratio ours / torchdistill; the loss values of both
   are printed beside (they must agree).
2. ``--accuracy``: recipes/distill.py per method and seed (``--seeds``; default 3), our losses in the
   recipe's loop, on the default digits preset (or the recipe arguments after ``--``). Per seed the
   ``kd`` run trains the teacher and the scratch student; the other methods distil from that run's
   teacher (``--teacher.source checkpoint``), so every method of a seed shares teacher and scratch
   student. Prints student KD test accuracy mean +- std (sample std) and the gain over scratch.
   ``--impl torchdistill``: the same runs (same seeds, recipe arguments and per-seed ``kd`` teacher, which
   is trained with our recipe in any case) with the method's loss term computed by torchdistill's module
   instead of ours -- a benchmark-only substitution: the recipe runs in a child of this script with the
   loss functions that ``visrep.distill.losses.DistillationLoss`` calls (``fitnets_hint_loss``, ``at_loss``,
   ``dist_loss``, ``rkd_distance_loss``/``rkd_angle_loss``) replaced by thin adapters around
   torchdistill's modules (same inputs, same weights; checked against ours on random tensors before the
   recipe starts). The runs go to ``METHOD_td_seedS``; the table then sets them beside ours (run or
   reused from ``METHOD_seedS``) with the ratio torchdistill / ours.

    pip install torchdistill --no-deps     # the bench extra; only torchdistill.losses is imported
    python benchmarks/distill_methods_bench.py                               # throughput, CPU
    python benchmarks/distill_methods_bench.py --device cuda --batch-size 256
    python benchmarks/distill_methods_bench.py --accuracy --seeds 0 1 2      # 5 methods x 3 seeds
    python benchmarks/distill_methods_bench.py --accuracy --impl torchdistill --methods fitnets at rkd dist
"""
from __future__ import annotations

import json
import runpy
import statistics
import sys
from pathlib import Path

import torch
from torch import nn

from timing import bench_parser, mean_std, recipe_results, warm_and_interleave

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("kd", "fitnets", "at", "dist", "rkd")


# ---------------------------------------------------------------- 1. throughput


def tensors(args, device):
    """Student/teacher tensors shaped as a ResNet-20 x0.5 / ResNet-20 pair's stages at ``image_size``."""
    g = torch.Generator().manual_seed(0)
    b, s = args.batch_size, args.image_size

    def r(*shape):
        return torch.randn(*shape, generator=g).to(device)

    s_maps = [r(b, c, s // f, s // f) for c, f in ((8, 1), (16, 2), (32, 4))]
    t_maps = [r(b, c, s // f, s // f) for c, f in ((16, 1), (32, 2), (64, 4))]
    return {"s_maps": s_maps, "t_maps": t_maps, "s_hint": r(b, 32, s // 2, s // 2), "t_hint": t_maps[1],
            "s_logits": r(b, args.num_classes), "t_logits": r(b, args.num_classes),
            "s_emb": r(b, 32), "t_emb": r(b, 64)}


def leaf(t: dict) -> dict:
    """The student's tensors as fresh leaves that require grad (the backward's inputs)."""
    out = dict(t)
    for k in ("s_hint", "s_logits", "s_emb"):
        out[k] = t[k].detach().clone().requires_grad_()
    out["s_maps"] = [m.detach().clone().requires_grad_() for m in t["s_maps"]]
    return out


def ours(method: str):
    from visrep.distill import at_loss, dist_loss, fitnets_hint_loss, rkd_angle_loss, rkd_distance_loss

    return {
        "fitnets": lambda t: fitnets_hint_loss(t["s_hint"], t["t_hint"]),
        "at": lambda t: at_loss(t["s_maps"], t["t_maps"], 1000.0),
        "dist": lambda t: dist_loss(t["s_logits"], t["t_logits"], 4.0, 2.0, 2.0)["loss"],
        "rkd": lambda t: 25.0 * rkd_distance_loss(t["s_emb"], t["t_emb"]) + 50.0 * rkd_angle_loss(t["s_emb"], t["t_emb"]),
    }[method]


def peer(method: str):
    from torchdistill.losses import mid_level as td

    if method == "fitnets":
        loss = td.SimpleLossWrapper(nn.MSELoss(), input={"is_from_teacher": False, "module_path": "reg", "io": "output"},
                                    target={"is_from_teacher": True, "module_path": "hint", "io": "output"})
        return lambda t: loss({"reg": {"output": t["s_hint"]}}, {"hint": {"output": t["t_hint"]}}, None)
    if method == "at":
        pairs = {f"p{i}": {"student": {"io": "output", "path": f"s{i}"}, "teacher": {"io": "output", "path": f"t{i}"},
                           "weight": 500.0} for i in range(3)}
        loss = td.ATLoss(pairs, mode="code")
        return lambda t: loss({f"s{i}": {"output": m} for i, m in enumerate(t["s_maps"])},
                              {f"t{i}": {"output": m} for i, m in enumerate(t["t_maps"])})
    if method == "dist":
        loss = td.DISTLoss(".", "output", ".", "output", beta=2.0, gamma=2.0, tau=4.0)
        return lambda t: loss({".": {"output": t["s_logits"]}}, {".": {"output": t["t_logits"]}})
    loss = td.RKDLoss("emb", "emb", dist_factor=25.0, angle_factor=50.0, reduction="mean")
    return lambda t: loss({"emb": {"output": t["s_emb"]}}, {"emb": {"output": t["t_emb"]}})


def throughput(args) -> dict:
    device = torch.device(args.device)
    base = tensors(args, device)
    batches = [(leaf(base),) for _ in range(2)]
    print(f"loss forward + backward, batch {args.batch_size}, {args.image_size}x{args.image_size} maps, "
          f"{args.num_classes} classes, {args.device}, torch threads {torch.get_num_threads()}, "
          f"{args.rounds}x{args.steps} timed steps each")
    print(f"{'method':<10}{'ours ms':>10}{'torchdistill ms':>17}{'ratio td/ours':>15}{'ours loss':>14}{'td loss':>14}")
    out = {}
    for method in args.methods:
        if method == "kd":
            continue
        fns = {"ours": ours(method), "torchdistill": peer(method)}
        values = {k: float(f(batches[0][0]).detach()) for k, f in fns.items()}
        steps = {k: (lambda f: lambda t: f(t).backward())(f) for k, f in fns.items()}
        times, _ = warm_and_interleave(steps, batches, args.warmup, args.rounds, args.steps, args.device)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["torchdistill"] / med["ours"]  # > 1: ours is faster
        out[method] = {"ours_ms": 1e3 * med["ours"], "torchdistill_ms": 1e3 * med["torchdistill"], "ratio": ratio,
                       "ours_loss": values["ours"], "torchdistill_loss": values["torchdistill"]}
        print(f"{method:<10}{1e3 * med['ours']:>10.3f}{1e3 * med['torchdistill']:>17.3f}{ratio:>15.3f}"
              f"{values['ours']:>14.6f}{values['torchdistill']:>14.6f}")
    print("ratio: torchdistill's median step time / ours (> 1: ours is faster)")
    return out


# ---------------------------------------------------------------- 2. accuracy


def td_adapters() -> dict:
    """Drop-ins for the loss functions ``visrep.distill.losses`` calls, each computing the term with
    torchdistill's module (built per call with the caller's weights: the modules hold no state)."""
    from torchdistill.losses import mid_level as td

    def fitnets_hint_loss(student_regressed, teacher_hint):
        loss = td.SimpleLossWrapper(nn.MSELoss(), input={"is_from_teacher": False, "module_path": "reg", "io": "output"},
                                    target={"is_from_teacher": True, "module_path": "hint", "io": "output"})
        return loss({"reg": {"output": student_regressed}}, {"hint": {"output": teacher_hint}}, None)

    def at_loss(student_maps, teacher_maps, beta=1000.0):
        pairs = {f"p{i}": {"student": {"io": "output", "path": f"s{i}"}, "teacher": {"io": "output", "path": f"t{i}"},
                           "weight": beta / 2} for i in range(len(student_maps))}
        return td.ATLoss(pairs, mode="code")({f"s{i}": {"output": m} for i, m in enumerate(student_maps)},
                                             {f"t{i}": {"output": m} for i, m in enumerate(teacher_maps)})

    def dist_loss(student_logits, teacher_logits, tau=1.0, beta=1.0, gamma=1.0):
        mod = td.DISTLoss(".", "output", ".", "output", beta=beta, gamma=gamma, tau=tau)
        loss = mod({".": {"output": student_logits}}, {".": {"output": teacher_logits}})
        with torch.no_grad():  # the parts, for the recipe's log only
            ys, yt = (student_logits / tau).softmax(dim=1), (teacher_logits / tau).softmax(dim=1)
            inter, intra = tau ** 2 * mod.inter_class_relation(ys, yt), tau ** 2 * mod.intra_class_relation(ys, yt)
        return {"loss": loss, "inter": inter, "intra": intra}

    def rkd(dist_factor, angle_factor):
        mod = td.RKDLoss("emb", "emb", dist_factor=dist_factor, angle_factor=angle_factor, reduction="mean")
        return lambda s, t: mod({"emb": {"output": s}}, {"emb": {"output": t}})

    return {"fitnets_hint_loss": fitnets_hint_loss, "at_loss": at_loss, "dist_loss": dist_loss,
            "rkd_distance_loss": rkd(1.0, 0.0), "rkd_angle_loss": rkd(0.0, 1.0)}


def check_adapters(adapters: dict) -> None:
    """Each adapter against ours on one batch of random tensors shaped as the recipe's (values and grads)."""
    from visrep.distill import losses

    g = torch.Generator().manual_seed(0)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    b = 32
    cases = {"fitnets_hint_loss": ([r(b, 32, 8, 8)], [r(b, 32, 8, 8)]),
             "at_loss": ([r(b, 4, 16, 16), r(b, 8, 8, 8), r(b, 16, 4, 4)], [r(b, 16, 16, 16), r(b, 32, 8, 8),
                                                                             r(b, 64, 4, 4)], 1000.0),
             "dist_loss": ([r(b, 10)], [r(b, 10)], 4.0, 2.0, 2.0),
             "rkd_distance_loss": ([r(b, 16)], [r(b, 64)]), "rkd_angle_loss": ([r(b, 16)], [r(b, 64)])}
    for name, (s, t, *rest) in cases.items():
        vals, grads = [], []
        for fn in (getattr(losses, name), adapters[name]):
            leaves = [x.clone().requires_grad_() for x in s]
            out = fn(leaves if name == "at_loss" else leaves[0], t if name == "at_loss" else t[0], *rest)
            out = out["loss"] if isinstance(out, dict) else out
            out.backward()
            vals.append(out.detach())
            grads.append(torch.cat([x.grad.flatten() for x in leaves]))
        gdiff = float((grads[0] - grads[1]).abs().max() / grads[0].abs().max().clamp_min(1e-30))
        if not torch.allclose(vals[0], vals[1], rtol=1e-5, atol=1e-6) or gdiff > 1e-4:
            raise SystemExit(f"torchdistill adapter for {name} differs from ours: {float(vals[1])} vs "
                             f"{float(vals[0])}, grads max rel diff {gdiff:.2e}")
        print(f"adapter {name}: torchdistill {float(vals[1]):.6f} = ours {float(vals[0]):.6f} "
              f"(grads max diff / max {gdiff:.1e})", flush=True)


def td_child(recipe_argv: list[str]) -> None:
    """This script's child for ``--impl torchdistill``: recipes/distill.py with torchdistill's losses."""
    from visrep.distill import losses

    adapters = td_adapters()
    check_adapters(adapters)

    def first_batch_checked(name, fn, ref):  # the recipe's first batch: torchdistill's value against ours
        seen = []

        def call(*a, **k):
            out = fn(*a, **k)
            if not seen:
                seen.append(1)
                with torch.no_grad():
                    v, w = (x["loss"] if isinstance(x, dict) else x for x in (out, ref(*a, **k)))
                if not torch.allclose(v.float(), w.float(), rtol=1e-4, atol=1e-6):
                    raise SystemExit(f"first batch: torchdistill {name} {float(v)} != ours {float(w)}")
                print(f"first batch {name}: torchdistill {float(v):.6f}, ours {float(w):.6f}", flush=True)
            return out
        return call

    for name, fn in adapters.items():  # DistillationLoss looks these up in its module at call time
        setattr(losses, name, first_batch_checked(name, fn, getattr(losses, name)))
    sys.argv = [str(ROOT / "recipes" / "distill.py"), *recipe_argv]
    runpy.run_path(sys.argv[0], run_name="__main__")


def run_one(method: str, seed: int, out: Path, extra: list[str], teacher: Path | None, impl: str = "ours") -> dict:
    teacher_args = ["--teacher.source", "checkpoint", "--teacher.checkpoint", str(teacher)] if teacher else []
    rargs = ["--kd.method", method, "--seed", str(seed), *extra, *teacher_args]
    if impl == "torchdistill":  # this script's --td-child runs the recipe with torchdistill's losses
        child = ("torchdistill", [sys.executable, str(Path(__file__).resolve()), "--td-child"])
        return recipe_results("distill", rargs, out, f"distill_methods_bench {method} torchdistill seed {seed}",
                              via=child)
    return recipe_results("distill", rargs, out, f"distill_methods_bench {method} seed {seed}")


def versus(args) -> dict:
    """``--impl torchdistill``: per seed the ``kd`` run (ours: the teacher), then each method with
    torchdistill's loss, then with ours (reused when present; ``--no-run-ours``: only read)."""
    out = Path(args.output_dir)
    methods = [m for m in args.methods if m != "kd"]
    td_rows: dict[str, list[float]] = {m: [] for m in methods}
    our_rows: dict[str, list] = {m: [] for m in methods}
    for seed in args.seeds:
        run_one("kd", seed, out / f"kd_seed{seed}", args.recipe_args, None)
        teacher = out / f"kd_seed{seed}" / "models" / "teacher"
        for method in methods:
            td_rows[method].append(run_one(method, seed, out / f"{method}_td_seed{seed}", args.recipe_args, teacher,
                                           "torchdistill")["student_kd_acc"])
        for method in methods:
            d = out / f"{method}_seed{seed}"
            if args.no_run_ours and not (d / "results.json").is_file():
                our_rows[method].append(None)
                continue
            our_rows[method].append(run_one(method, seed, d, args.recipe_args, teacher)["student_kd_acc"])
    lines = [f"\nrecipes/distill.py, student KD test accuracy, seeds {', '.join(map(str, args.seeds))}: the method's "
             f"loss term from visrep (ours) vs torchdistill, same teacher and recipe",
             f"{'method':<10}{'ours':>18}{'torchdistill':>18}{'ratio td/ours':>15}   per seed ours | torchdistill",
             "-" * 100]
    summary = {}
    for method in methods:
        td_acc, our_acc = td_rows[method], our_rows[method]
        have = [a for a in our_acc if a is not None]
        tm, ts = mean_std(td_acc)
        om, os_ = mean_std(have) if have else (float("nan"), float("nan"))
        fmt = lambda xs: " ".join("-" if x is None else f"{x:.4f}" for x in xs)  # noqa: E731
        lines.append(f"{method:<10}{om:>10.4f} +- {os_:.4f}{tm:>10.4f} +- {ts:.4f}{tm / om:>15.3f}   "
                     f"{fmt(our_acc)} | {fmt(td_acc)}")
        summary[method] = {"ours": our_acc, "torchdistill": td_acc}
    return report(lines, summary, out, "summary_torchdistill")


def report(lines: list[str], summary: dict, out: Path, name: str) -> dict:
    """Print the table and write it (``NAME.txt``) and the figures (``NAME.json``) to ``out``."""
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / f"{name}.txt").write_text(text + "\n")
    return summary


def accuracy(args) -> dict:
    if args.impl == "torchdistill":
        return versus(args)
    out = Path(args.output_dir)
    rows: dict[str, list[dict]] = {}
    for seed in args.seeds:  # seed-major: a partial benchmark already compares methods on equal seeds
        first = run_one("kd", seed, out / f"kd_seed{seed}", args.recipe_args, None)
        teacher = out / f"kd_seed{seed}" / "models" / "teacher"
        for method in args.methods:
            rows.setdefault(method, []).append(
                first if method == "kd" else run_one(method, seed, out / f"{method}_seed{seed}", args.recipe_args, teacher))
    scratch = [r["student_scratch_acc"] for r in rows[args.methods[0]]]
    teach = [r["teacher_acc"] for r in rows[args.methods[0]]]
    lines = [f"\nrecipes/distill.py, {len(args.seeds)} seeds ({', '.join(map(str, args.seeds))}): teacher "
             f"{mean_std(teach)[0]:.4f} +- {mean_std(teach)[1]:.4f}, student from scratch "
             f"{mean_std(scratch)[0]:.4f} +- {mean_std(scratch)[1]:.4f}",
             f"{'method':<10}{'student KD acc':>20}{'gain vs scratch':>18}{'wins':>7}", "-" * 55]
    summary = {}
    for method, rs in rows.items():
        acc = [r["student_kd_acc"] for r in rs]
        m, s = mean_std(acc)
        wins = sum(a > b for a, b in zip(acc, scratch))
        lines.append(f"{method:<10}{m:>12.4f} +- {s:.4f}{m - statistics.fmean(scratch):>+18.4f}{wins:>5}/{len(acc)}")
        summary[method] = {"student_kd_acc": acc, "student_scratch_acc": scratch}
    return report(lines, summary, out, "summary")


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--td-child"]:  # internal: one recipe run with torchdistill's losses (--impl torchdistill)
        return td_child(argv[1:])
    p = bench_parser(__doc__, "auto", image_size=32, batch_size=64, num_classes=10, rounds=5, steps=20, warmup=5,
                     threads=None)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--accuracy", action="store_true", help="train with recipes/distill.py instead of timing")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--output-dir", default="runs/distill_methods_bench")
    p.add_argument("--impl", choices=("ours", "torchdistill"), default="ours",
                   help="--accuracy: whose loss the methods train with (torchdistill: beside ours, with the ratio)")
    p.add_argument("--no-run-ours", action="store_true",
                   help="--impl torchdistill: read ours' runs where present instead of running the missing ones")
    p.add_argument("recipe_args", nargs="*", help="after --: passed to recipes/distill.py (--accuracy)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.accuracy:
        if "kd" not in args.methods:
            args.methods = ["kd", *args.methods]  # the run that trains each seed's teacher and scratch student
        return accuracy(args)
    return throughput(args)


if __name__ == "__main__":
    main(sys.argv[1:])
