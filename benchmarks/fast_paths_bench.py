"""The fast-path switches, one at a time and together, on the recipes' own models: the optimizer
implementation (``optim.implementation``), the memory layout (``run.channels_last``) and
``torch.compile`` (``run.compile``, the recipes' own ``compile_training_forward``), measured on a full
training step (forward, backward, SGD with momentum and weight decay) against the eager default
(NCHW, the per-parameter loop: what torch picks on a CPU).

    python benchmarks/fast_paths_bench.py                  # CPU, 5 interleaved rounds
    python benchmarks/fast_paths_bench.py --device cuda --batch-size 256

Rounds interleave the variants (one block of ``--steps`` steps of each per round, after ``--warmup``
untimed steps, which include compilation: its cost is printed apart); the table gives the median step
time, each variant's speed-up over the default, and the fraction of the GEMM peak it reaches: the
step's FLOPs (``torch.utils.flop_counter`` on the eager step: forward and backward) per second over a
large fp32 matrix product's FLOPs per second. The peak is measured in every round, just before that
round's steps, as the faster of two products of 2048 x 2048 matrices: ``torch.mm`` (the BLAS: MKL on
x86) and the same product as a 1x1 convolution (oneDNN on a CPU, cuDNN on CUDA: the library the
convolutions run in). A shared machine's speed drifts by a third within minutes; a peak taken once
and steps timed later make the fraction mostly that drift, so each round's steps are divided by its
own peak and the table gives the median of those fractions. A switch is on by default in the recipes
only where this table shows it wins.
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from timing import bench_parser, time_steps, update  # noqa: E402

# the distillation preset's models, and the deeper CIFAR ResNet of earlier presets
MODELS = {
    "ResNet-20/2 (student)": dict(name="resnet20", width=0.5),
    "ResNet-20 (teacher)": dict(name="resnet20"),
    "ResNet-56": dict(name="resnet56"),
}
VARIANTS = {  # name -> (optimizer implementation, channels_last, compile)
    "default (loop, NCHW)": ("loop", False, False),
    "foreach": ("foreach", False, False),
    "fused": ("fused", False, False),
    "channels_last": ("loop", True, False),
    "compile": ("foreach", False, True),
    "compile + channels_last": ("foreach", True, True),
}


def make_step(spec: dict, impl: str, channels_last: bool, compiled: bool, device: str, classes: int = 10):
    from visrep.engine.config import OptimConfig
    from visrep.engine.fast import compile_training_forward, to_channels_last
    from visrep.engine.optim import build_optimizer
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    spec = dict(spec)
    model = create_backbone(spec.pop("name"), num_classes=classes, small_input=True, **spec).to(device)
    if channels_last:
        to_channels_last(model)
    if compiled:
        compile_training_forward(model, fallback=False)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, implementation=impl))

    def step(x, y):
        return update(opt, torch.nn.functional.cross_entropy(model(x), y))

    return step, model


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """FLOPs of one forward + backward (matrix products and convolutions: what the counter counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def gemm_peaks(device: str, n: int = 2048, reps: int = 5) -> dict[str, float]:
    """FLOP/s of an n x n x n fp32 matrix product (median of ``reps`` after one untimed call), two ways:
    ``torch.mm`` and a 1x1 convolution of an (n x n) image with n channels by an (n x n) filter bank."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    x = torch.randn(1, n, n, 1, device=device).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1, device=device).contiguous(memory_format=torch.channels_last)
    out = {}
    for name, fn in (("mm", lambda: torch.mm(a, b)), ("1x1 conv", lambda: torch.nn.functional.conv2d(x, w))):
        times = time_steps(fn, [()], reps + 1, device)[1:]
        out[name] = 2 * n ** 3 / statistics.median(times)
    return out


def main(argv=None) -> int:
    ap = bench_parser(__doc__, device="auto", rounds=5, steps=5, warmup=3, batch_size=128, image_size=32,
                      threads=None)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(args.device),
                torch.randint(0, 10, (args.batch_size,), generator=g).to(args.device)) for _ in range(2)]
    print(f"train step (fwd + bwd + SGD), batch {args.batch_size} at {args.image_size} px, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds x {args.steps} steps (medians); "
          f"the fp32 GEMM peak measured in every round")
    w = max(map(len, VARIANTS)) + 2
    for model_name in args.models:
        spec = MODELS[model_name]
        steps, setup = {}, {}
        for v, (impl, cl, comp) in VARIANTS.items():
            steps[v], model = make_step(spec, impl, cl, comp, args.device)
            t = time.perf_counter()
            time_steps(steps[v], batches, args.warmup, args.device)
            setup[v] = time.perf_counter() - t
        flops = step_flops(make_step(spec, "loop", False, False, args.device)[1], *batches[0])
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        peaks: list[dict[str, float]] = []
        for r in range(args.rounds):
            peaks.append(gemm_peaks(args.device))
            for v, step in (list(steps.items()) if r % 2 == 0 else reversed(list(steps.items()))):
                times[v].append(statistics.median(time_steps(step, batches, args.steps, args.device)))
        peak = [max(p.values()) for p in peaks]
        base = statistics.median(times["default (loop, NCHW)"])
        print(f"\n{model_name}: {flops / 1e9:.2f} GFLOP per step; GEMM peak per round "
              f"{' '.join(f'{p / 1e9:.0f}' for p in peak)} GFLOP/s (the faster of "
              + ", ".join(f"{k} median {statistics.median(p[k] for p in peaks) / 1e9:.0f}" for k in peaks[0]) + ")")
        print(f"  {'variant':<{w}}{'ms / step':>10}{'speed-up':>10}{'of peak':>9}{'rounds':>10}{'GFLOP/s':>9}"
              f"{'warm-up s':>11}")
        for v, ts in times.items():
            m = statistics.median(ts)
            fracs = [100 * flops / t / p for t, p in zip(ts, peak)]
            spread = f"{min(fracs):.0f}-{max(fracs):.0f}%"
            print(f"  {v:<{w}}{1e3 * m:>10.1f}{base / m:>9.2f}x{statistics.median(fracs):>8.0f}%{spread:>10}"
                  f"{flops / m / 1e9:>9.0f}{setup[v]:>11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
