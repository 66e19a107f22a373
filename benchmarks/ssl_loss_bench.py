"""VICReg's and Barlow Twins' losses, forward + backward: visrep against lightly's, at the digits preset's
size and at the papers'.

Both losses need ``sum_ij`` of a squared ``D x D`` statistic (VICReg's covariance, Barlow Twins'
cross-correlation). lightly (and the official code) build that matrix: ``N x D x D`` multiply-adds and a
``D x D`` matrix, 268 MB in fp32 at the papers' ``D = 8192``, with its gradient and temporaries. visrep
takes it through the ``N x N`` Gram matrices when that does fewer multiply-adds (``gram=None``, the
default; ``visrep.ssl.objectives``): ``2 x N x N x D`` for Barlow Twins, ``N x N x D`` per view for VICReg, and
across ranks each rank computes only its own rows' block. Rows, each timed in interleaved rounds (median
step; per-round ratios beside):

- visrep (default: the Gram path at these sizes),
- visrep with ``gram=False`` (the ``D x D`` matrix, as lightly),
- lightly (``VICRegLoss``, ``BarlowTwinsLoss``).

Inputs are random ``N x D`` projections of two views in fp32 (the losses' cost does not depend on their
values). The sizes: the preset's (``N = 64`` images a step, ``D = 512``) and the papers' (``D = 8192``,
``N = 256``: one GPU's share of the papers' 2048).

    python benchmarks/ssl_loss_bench.py                      # both sizes, about 4 minutes on 1 thread
    python benchmarks/ssl_loss_bench.py --sizes 64x512
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench_parser, ratio_spread, round_ratios, warm_and_interleave  # noqa: E402

SIZES = ["64x512", "256x8192"]


def size(text: str) -> tuple[int, int]:
    try:
        n, d = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--sizes {text!r}: give NxD, e.g. 256x8192") from None
    if n < 2 or d < 1:
        raise SystemExit(f"--sizes {text!r}: N must be at least 2 and D at least 1")
    return n, d


def losses(loss: str) -> dict:
    """``{row: loss(z1, z2)}``: visrep's default, visrep's D x D path, lightly's."""
    from lightly.loss import BarlowTwinsLoss, VICRegLoss

    from visrep.ssl import barlow_twins_loss, vicreg_loss

    if loss == "vicreg":
        ours = {"visrep": lambda a, b: vicreg_loss(a, b)["loss"],
                "visrep gram=False": lambda a, b: vicreg_loss(a, b, gram=False)["loss"]}
        peer = VICRegLoss()
    else:
        ours = {"visrep": lambda a, b: barlow_twins_loss(a, b),
                "visrep gram=False": lambda a, b: barlow_twins_loss(a, b, gram=False)}
        peer = BarlowTwinsLoss()
    return {**ours, "lightly": peer}


def step_of(fn):
    """A timed call: the loss forward and its backward to both inputs."""
    def step(z1, z2):
        a, b = z1.detach().requires_grad_(), z2.detach().requires_grad_()
        fn(a, b).backward()
        return a.grad
    return step


def main(argv=None) -> list:
    p = bench_parser(__doc__, "auto", rounds=5, steps=2, warmup=1, threads=1)
    p.add_argument("--sizes", nargs="+", default=SIZES, metavar="NxD", help=f"batch x dimension (default: {SIZES})")
    p.add_argument("--losses", nargs="+", choices=["vicreg", "barlow"], default=["vicreg", "barlow"])
    args = p.parse_args(argv)
    sizes = [size(s) for s in args.sizes]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"VICReg / Barlow Twins loss, forward + backward, fp32, {args.device}, torch threads "
          f"{torch.get_num_threads()}, {args.rounds}x{args.steps} timed calls per row (interleaved rounds)")
    table = []
    for n, d in sizes:
        g = torch.Generator().manual_seed(0)
        batches = [(torch.randn(n, d, generator=g).to(args.device), torch.randn(n, d, generator=g).to(args.device))]
        for loss in args.losses:
            fns = losses(loss)
            with torch.no_grad():  # the same loss (the same coefficients and eps), computed three ways
                values = {k: fn(*batches[0]).item() for k, fn in fns.items()}
            steps = {k: step_of(fn) for k, fn in fns.items()}
            times, _ = warm_and_interleave(steps, batches, args.warmup, args.rounds, args.steps, args.device)
            ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
            ratio = ms["lightly"] / ms["visrep"]
            print(f"\n{loss}, N={n}, D={d} (loss: " + ", ".join(f"{k} {v:.7g}" for k, v in values.items()) + ")")
            for k, v in ms.items():
                print(f"  {k:<22}{v:>10.2f} ms")
            spread = ratio_spread(round_ratios(times, "visrep", "lightly", args.steps))
            print(f"  visrep / lightly speed: {ratio:.2f}x; per round {spread}")
            table.append((loss, n, d, ms["visrep"], ms["visrep gram=False"], ms["lightly"], ratio))
    print(f"\n{'loss':<8}{'N':>6}{'D':>6}{'visrep ms':>11}{'gram=False ms':>15}{'lightly ms':>12}{'speed-up':>10}")
    for loss, n, d, a, b, c, r in table:
        print(f"{loss:<8}{n:>6}{d:>6}{a:>11.2f}{b:>15.2f}{c:>12.2f}{r:>9.2f}x")
    return table


if __name__ == "__main__":
    main()
