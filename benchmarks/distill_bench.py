"""KD training-step throughput: visrep's distillation step vs. timm's ``timm.task.LogitDistillationTask``.

Same teacher, student, batch, precision and optimizer; both start from the same student weights.
Four steps are timed in alternating rounds (so drift in machine load hits all alike), after untimed
warm-up steps (which include compilation; their seconds are printed), and the median step time of each
is reported in images per second:

- visrep at its fast defaults: student and teacher channels_last, the student's training forward
  compiled (``run.compile``), the frozen teacher compiled for inference, a foreach optimizer;
- visrep eager (NCHW, no compile, torch's default optimizer loop);
- timm at its defaults (eager);
- timm with compile + channels_last too (both models converted and ``nn.Module.compile``d, foreach).

The ratios printed: visrep fast / timm default (the issue's target: >= 1.25) and visrep fast / timm
compiled (>= 1.0: no peer is faster even at its best).

    python benchmarks/distill_bench.py                       # CPU defaults (small, 32x32)
    python benchmarks/distill_bench.py --teacher resnet50 --student mobilenetv3_small_100 \
        --image-size 224 --batch-size 128 --device cuda --precision bf16
"""
from __future__ import annotations

import copy
import statistics

import torch

from timing import bench_parser, update, warm_and_interleave


def make_models(args):
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    teacher = create_backbone(args.teacher, num_classes=args.num_classes, small_input=args.small_input)
    student = create_backbone(args.student, num_classes=args.num_classes, small_input=args.small_input)
    return teacher, student


def _fast(module, on: bool):
    from visrep.engine.fast import to_channels_last

    return to_channels_last(module) if on else module


def ours(args, teacher, student, batches, fast: bool = False):
    from accelerate import Accelerator

    from visrep.distill import DistillationLoss, FrozenTeacher, KDConfig
    from visrep.zoo import get_data_config

    acc = Accelerator(mixed_precision={"fp32": "no"}.get(args.precision, args.precision), cpu=args.device == "cpu")
    sdc, tdc = get_data_config(student), get_data_config(teacher)
    frozen = FrozenTeacher(_fast(copy.deepcopy(teacher), fast), sdc["mean"], sdc["std"], tdc["mean"],
                           tdc["std"]).to(acc.device)
    model = _fast(copy.deepcopy(student), fast)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True if fast else None)
    model, opt = acc.prepare(model, opt)
    if fast:
        from visrep.engine.fast import compile_training_forward

        compile_training_forward(model, fallback=False)
        frozen.compile_inference()
    loss_fn = DistillationLoss(KDConfig(temperature=args.temperature, kd_weight=args.kd_weight))
    model.train()

    def step(x, y):
        logits = model(x)
        with acc.autocast():
            t_logits = frozen(x)
        return update(opt, loss_fn(logits, t_logits, y)["loss"], acc.backward)

    return step


def peer(args, teacher, student, batches, fast: bool = False):
    from timm.task import LogitDistillationTask

    device = torch.device(args.device)
    model = _fast(copy.deepcopy(student).to(device), fast)
    t_model = _fast(copy.deepcopy(teacher), fast)
    task = LogitDistillationTask(model, t_model, criterion=torch.nn.CrossEntropyLoss(),
                                 task_loss_weight=1.0 - args.kd_weight, temperature=args.temperature,
                                 device=device, verbose=False)
    task.train()
    if fast:  # compiled in place: the task calls these very modules
        model.compile()
        t_model.compile()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, foreach=True if fast else None)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)

    def step(x, y):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = task(x, y)["loss"]
        return update(opt, loss)

    return step


def main(argv=None):
    p = bench_parser(__doc__, "auto", image_size=32, batch_size=64, num_classes=10, rounds=5, steps=10, warmup=3)
    p.add_argument("--teacher", default="resnet56")
    p.add_argument("--student", default="mobilenetv3_small_050")
    p.add_argument("--small-input", type=lambda s: s.lower() in ("1", "true", "yes"), default=True)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--kd-weight", type=float, default=0.9)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--no-compile-variants", action="store_true",
                   help="time visrep eager vs timm's defaults only (no compilation)")
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")

    teacher, student = make_models(args)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(dev),
                torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(dev)) for _ in range(4)]
    steps = {"visrep": ours(args, teacher, student, batches, fast=not args.no_compile_variants)}
    if not args.no_compile_variants:
        steps["visrep eager"] = ours(args, teacher, student, batches)
    steps["timm"] = peer(args, teacher, student, batches)
    if not args.no_compile_variants:
        steps["timm compiled"] = peer(args, teacher, student, batches, fast=True)
    times, warm = warm_and_interleave(steps, batches, args.warmup, args.rounds, args.steps, args.device)
    ips = {k: args.batch_size / statistics.median(v) for k, v in times.items()}

    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    print(f"KD step: teacher {args.teacher} ({n_t / 1e6:.2f}M) -> student {args.student} ({n_s / 1e6:.2f}M), "
          f"batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.precision}, {args.device}, "
          f"torch threads {torch.get_num_threads()}, {args.rounds}x{args.steps} timed steps each")
    labels = {"visrep": "visrep, fast defaults (compile + channels_last)" if not args.no_compile_variants
              else "visrep (DistillationLoss + FrozenTeacher)",
              "visrep eager": "visrep eager", "timm": "timm LogitDistillationTask (defaults)",
              "timm compiled": "timm, compile + channels_last"}
    print(f"{'implementation':<50}{'median step ms':>16}{'images/s':>12}{'warm-up s':>11}")
    for key in steps:
        print(f"{labels[key]:<50}{1000 * statistics.median(times[key]):>16.1f}{ips[key]:>12.1f}{warm[key]:>11.1f}")
    print(f"ratio visrep / timm default (throughput): {ips['visrep'] / ips['timm']:.3f}")
    if not args.no_compile_variants:
        print(f"ratio visrep / timm compiled: {ips['visrep'] / ips['timm compiled']:.3f}")
        print(f"ratio visrep fast / visrep eager: {ips['visrep'] / ips['visrep eager']:.3f}")
    return ips


if __name__ == "__main__":
    main()
