"""KD training-step throughput: visrep's distillation step vs. timm's ``timm.task.LogitDistillationTask``.

Same teacher, student, batch, precision and optimizer; both start from the same student weights.
The two are timed in alternating rounds (so drift in machine load hits both alike) and the median
step time of each is reported, in images per second, with the ratio ours / timm.

    python benchmarks/distill_bench.py                       # CPU defaults (small, 32x32)
    python benchmarks/distill_bench.py --teacher resnet50 --student mobilenetv3_small_100 \
        --image-size 224 --batch-size 128 --device cuda --precision bf16
"""
from __future__ import annotations

import copy
import statistics

import torch

from timing import bench_parser, time_steps, update


def make_models(args):
    from visrep.zoo import create_backbone

    torch.manual_seed(0)
    teacher = create_backbone(args.teacher, num_classes=args.num_classes, small_input=args.small_input)
    student = create_backbone(args.student, num_classes=args.num_classes, small_input=args.small_input)
    return teacher, student


def ours(args, teacher, student, batches):
    from accelerate import Accelerator

    from visrep.distill import DistillationLoss, FrozenTeacher, KDConfig
    from visrep.zoo import get_data_config

    acc = Accelerator(mixed_precision={"fp32": "no"}.get(args.precision, args.precision), cpu=args.device == "cpu")
    sdc, tdc = get_data_config(student), get_data_config(teacher)
    frozen = FrozenTeacher(copy.deepcopy(teacher), sdc["mean"], sdc["std"], tdc["mean"], tdc["std"]).to(acc.device)
    model = copy.deepcopy(student)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model, opt = acc.prepare(model, opt)
    loss_fn = DistillationLoss(KDConfig(temperature=args.temperature, kd_weight=args.kd_weight))
    model.train()

    def step(x, y):
        logits = model(x)
        with acc.autocast():
            t_logits = frozen(x)
        return update(opt, loss_fn(logits, t_logits, y)["loss"], acc.backward)

    return step


def peer(args, teacher, student, batches):
    from timm.task import LogitDistillationTask

    device = torch.device(args.device)
    model = copy.deepcopy(student).to(device)
    task = LogitDistillationTask(model, copy.deepcopy(teacher), criterion=torch.nn.CrossEntropyLoss(),
                                 task_loss_weight=1.0 - args.kd_weight, temperature=args.temperature,
                                 device=device, verbose=False)
    task.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
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
    args = p.parse_args(argv)
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")

    teacher, student = make_models(args)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(dev),
                torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(dev)) for _ in range(4)]
    steps = {"visrep": ours(args, teacher, student, batches), "timm": peer(args, teacher, student, batches)}
    for name, step in steps.items():
        time_steps(step, batches, args.warmup, args.device)
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name] += time_steps(step, batches, args.steps, args.device)
    ips = {k: args.batch_size / statistics.median(v) for k, v in times.items()}

    n_t = sum(p.numel() for p in teacher.parameters())
    n_s = sum(p.numel() for p in student.parameters())
    print(f"KD step: teacher {args.teacher} ({n_t / 1e6:.2f}M) -> student {args.student} ({n_s / 1e6:.2f}M), "
          f"batch {args.batch_size}, {args.image_size}x{args.image_size}, {args.precision}, {args.device}, "
          f"torch threads {torch.get_num_threads()}, {args.rounds}x{args.steps} timed steps each")
    rows = [("visrep (DistillationLoss + FrozenTeacher)", "visrep"), ("timm LogitDistillationTask", "timm")]
    print(f"{'implementation':<44}{'median step ms':>16}{'images/s':>12}")
    for label, key in rows:
        print(f"{label:<44}{1000 * statistics.median(times[key]):>16.1f}{ips[key]:>12.1f}")
    print(f"ratio visrep / timm (throughput): {ips['visrep'] / ips['timm']:.3f}")
    return ips


if __name__ == "__main__":
    main()
