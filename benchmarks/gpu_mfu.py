"""Train-step model FLOP utilisation (MFU) on a GPU: visrep's step vs timm's, at the same flags.

For each model (default: ResNet-50 and ViT-B/16 at 224 px), two training steps -- forward, backward,
AdamW (fused) -- are timed in interleaved rounds after an untimed warm-up that includes compilation:

- visrep: ``visrep.zoo.create_backbone`` (the zoo's model), channels_last for convolutional models,
  bf16 autocast, the training forward compiled with ``visrep.engine.fast.compile_training_forward``;
- timm: ``timm.create_model`` of the same architecture, channels_last, bf16 autocast,
  ``nn.Module.compile``.

MFU = the step's FLOPs (``torch.utils.flop_counter`` on one eager forward + backward: matrix products
and convolutions) per second over the GPU's dense bf16 peak: the datasheet figure where the GPU is
known (``--peak-tflops`` overrides it), and, measured in the same run, a large bf16 matrix product's.
Peak memory is ``torch.cuda.max_memory_allocated`` over each step's timed rounds.

    python benchmarks/gpu_mfu.py                            # needs a CUDA GPU
    python benchmarks/gpu_mfu.py --models resnet50 --batch-size 256 --rounds 5
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import bench_parser, time_steps, update  # noqa: E402

MODELS = {"resnet50": "resnet50", "vit_base_patch16_224": "vit_base_patch16_224"}
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def datasheet_peak(name: str) -> float | None:
    for key, tflops in DATASHEET_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def measured_peak(n: int = 8192, reps: int = 10) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    times = time_steps(lambda: torch.mm(a, b), [()], reps + 3, "cuda")[3:]
    return 2 * n ** 3 / statistics.median(times)


def build(which: str, name: str, classes: int) -> torch.nn.Module:
    if which == "visrep":
        from visrep.zoo import create_backbone

        return create_backbone(name, num_classes=classes)
    import timm

    return timm.create_model(name, num_classes=classes)


def make_step(which: str, name: str, classes: int):
    from visrep.engine.fast import compile_training_forward, to_channels_last

    torch.manual_seed(0)
    model = build(which, name, classes).cuda()
    to_channels_last(model)
    flops_model = model
    if which == "visrep":
        compile_training_forward(model, fallback=False)
    else:
        model.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        return update(opt, loss)

    return step, flops_model


def step_flops(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def main(argv=None) -> int:
    p = bench_parser(__doc__, batch_size=256, image_size=224, rounds=5, steps=10, warmup=5, num_classes=1000)
    p.add_argument("--models", nargs="*", default=list(MODELS))
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak (default: the datasheet's)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_mfu.py needs a CUDA GPU; none here.")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    gpu = torch.cuda.get_device_name()
    sheet = args.peak_tflops * 1e12 if args.peak_tflops else datasheet_peak(gpu)
    gemm = measured_peak()
    print(f"{gpu}: bf16 datasheet peak {sheet / 1e12 if sheet else float('nan'):.0f} TFLOP/s, measured GEMM "
          f"{gemm / 1e12:.0f} TFLOP/s; batch {args.batch_size} at {args.image_size} px, bf16 autocast + compile + "
          f"channels_last, fused AdamW, {args.rounds} rounds x {args.steps} steps (medians)")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).cuda(),
                torch.randint(0, args.num_classes, (args.batch_size,), generator=g).cuda()) for _ in range(2)]
    print(f"{'model':<24}{'impl':<8}{'ms/step':>9}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'of GEMM':>9}"
          f"{'peak GiB':>10}{'warm-up s':>11}")
    for name in args.models:
        steps, warm, flops = {}, {}, None
        for which in ("visrep", "timm"):
            steps[which], model = make_step(which, MODELS.get(name, name), args.num_classes)
            if flops is None:
                flops = step_flops(model, *batches[0])
            t = time.perf_counter()
            time_steps(steps[which], batches, args.warmup, "cuda")
            warm[which] = time.perf_counter() - t
        times = {k: [] for k in steps}
        mem = {k: 0 for k in steps}
        for _ in range(args.rounds):
            for k, step in steps.items():
                torch.cuda.reset_peak_memory_stats()
                times[k] += time_steps(step, batches, args.steps, "cuda")
                mem[k] = max(mem[k], torch.cuda.max_memory_allocated())
        for k in steps:
            m = statistics.median(times[k])
            rate = flops / m
            mfu = f"{100 * rate / sheet:>6.1f}%" if sheet else f"{'-':>7}"
            print(f"{name:<24}{k:<8}{1e3 * m:>9.1f}{args.batch_size / m:>9.0f}{rate / 1e12:>9.1f}{mfu}"
                  f"{100 * rate / gemm:>8.1f}%{mem[k] / 2 ** 30:>10.2f}{warm[k]:>11.1f}")
        ratio = statistics.median(times["timm"]) / statistics.median(times["visrep"])
        print(f"{name:<24}visrep / timm throughput: {ratio:.3f}")
        del steps
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
