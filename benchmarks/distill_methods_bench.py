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

    pip install torchdistill --no-deps     # the bench extra; only torchdistill.losses is imported
    python benchmarks/distill_methods_bench.py                               # throughput, CPU
    python benchmarks/distill_methods_bench.py --device cuda --batch-size 256
    python benchmarks/distill_methods_bench.py --accuracy --seeds 0 1 2      # 5 methods x 3 seeds
"""
from __future__ import annotations

import json
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


def run_one(method: str, seed: int, out: Path, extra: list[str], teacher: Path | None) -> dict:
    teacher_args = ["--teacher.source", "checkpoint", "--teacher.checkpoint", str(teacher)] if teacher else []
    return recipe_results("distill", ["--kd.method", method, "--seed", str(seed), *extra, *teacher_args], out,
                          f"distill_methods_bench {method} seed {seed}")


def accuracy(args) -> dict:
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
    text = "\n".join(lines)
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.txt").write_text(text + "\n")
    return summary


def main(argv=None) -> dict:
    p = bench_parser(__doc__, "auto", image_size=32, batch_size=64, num_classes=10, rounds=5, steps=20, warmup=5,
                     threads=None)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--accuracy", action="store_true", help="train with recipes/distill.py instead of timing")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--output-dir", default="runs/distill_methods_bench")
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
