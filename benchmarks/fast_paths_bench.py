"""The fast-path switches one at a time, on the recipes' own models: the optimizer implementation
(``optim.implementation``: torch's per-parameter loop, foreach, fused) and the memory layout
(``run.channels_last``), measured on a full training step (forward, backward, SGD with momentum and
weight decay) against the eager default (NCHW, the per-parameter loop: what torch picks on a CPU).

    python benchmarks/fast_paths_bench.py                  # CPU, 5 interleaved rounds
    python benchmarks/fast_paths_bench.py --device cuda --batch-size 256

Rounds interleave the variants (one block of ``--steps`` steps of each per round, after ``--warmup``
untimed steps); the table gives the median step time and each variant's speed-up over the default.
A switch is on by default in the recipes only where this table shows it wins.
"""
from __future__ import annotations

import statistics
import sys
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
VARIANTS = {  # name -> (optimizer implementation, channels_last)
    "default (loop, NCHW)": ("loop", False),
    "foreach": ("foreach", False),
    "fused": ("fused", False),
    "channels_last": ("loop", True),
    "fused + channels_last": ("fused", True),
}


def make_step(spec: dict, impl: str, channels_last: bool, device: str, classes: int = 10):
    from visrep.engine.config import OptimConfig
    from visrep.engine.optim import build_optimizer
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    spec = dict(spec)
    model = create_backbone(spec.pop("name"), num_classes=classes, small_input=True, **spec).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.05, implementation=impl))

    def step(x, y):
        return update(opt, torch.nn.functional.cross_entropy(model(x), y))

    return step


def main(argv=None) -> int:
    ap = bench_parser(__doc__, device="auto", rounds=5, steps=5, warmup=3, batch_size=128, image_size=32,
                      threads=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(args.device),
                torch.randint(0, 10, (args.batch_size,), generator=g).to(args.device)) for _ in range(2)]
    print(f"train step (fwd + bwd + SGD), batch {args.batch_size} at {args.image_size} px, {args.device}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds x {args.steps} steps (medians)")
    w = max(map(len, VARIANTS)) + 2
    for model_name, spec in MODELS.items():
        steps = {v: make_step(spec, impl, cl, args.device) for v, (impl, cl) in VARIANTS.items()}
        for step in steps.values():
            time_steps(step, batches, args.warmup, args.device)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(args.rounds):
            for v, step in steps.items():
                times[v].append(statistics.median(time_steps(step, batches, args.steps, args.device)))
        base = statistics.median(times["default (loop, NCHW)"])
        print(f"\n{model_name}")
        print(f"  {'variant':<{w}}{'ms / step':>10}{'speed-up':>10}")
        for v, ts in times.items():
            m = statistics.median(ts)
            print(f"  {v:<{w}}{1e3 * m:>10.1f}{base / m:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
