"""What a GPU run actually does, measured: the precision chosen, device reads (host syncs) per
optimizer step from the profiler, peak memory, and loader-only vs training-step throughput.

    python benchmarks/gpu_probe.py                 # the GPU if there is one, else the CPU
    python benchmarks/gpu_probe.py --steps 50 --batch-size 256

Host syncs are the ``cudaStreamSynchronize`` / ``cudaDeviceSynchronize`` calls the profiler records in
the timed steps (data loading on the CPU reads CPU tensors, which is no sync).
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import bench_parser  # noqa: E402


def main(argv=None) -> None:
    p = bench_parser(__doc__.split("\n\n")[0], steps=30, batch_size=128, image_size=32, log_every=10)
    args = p.parse_args(argv)

    from visrep.data import DataConfig, build_classification_data
    from visrep.engine import OptimConfig, Run, RunConfig, build_optimizer
    from visrep.engine.precision import native_bf16, resolve_mixed_precision
    from visrep.zoo import create_backbone, get_data_config

    cuda = torch.cuda.is_available()
    print(f"torch {torch.__version__}; cuda {cuda}" + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    print(f"native bf16: {native_bf16()}; auto precision: {resolve_mixed_precision('auto')} "
          f"(launcher says {os.environ.get('ACCELERATE_MIXED_PRECISION', 'nothing')})")

    @dataclasses.dataclass
    class Cfg:
        batch_size: int = args.batch_size

    out = Path(tempfile.mkdtemp(prefix="gpu-probe-"))
    run_cfg = RunConfig(batch_size=args.batch_size, log_every=args.log_every, progress=False)
    with Run(Cfg(), "probe", str(out / "run"), 0, run_cfg) as run:
        acc = run.accelerator
        model = create_backbone("resnet20", num_classes=10, small_input=True)
        data = build_classification_data(DataConfig(image_size=args.image_size), get_data_config(model), 0,
                                         args.batch_size, args.batch_size, run_cfg.num_workers)
        opt = build_optimizer(model, OptimConfig(lr=0.05))
        model, opt, loader = run.prepare(model, opt, data.train_loader)
        print(f"precision used: {acc.mixed_precision}; loader workers: {data.train_loader.num_workers}; "
              f"pinned: {data.train_loader.pin_memory}")

        t = time.perf_counter()
        n = 0
        for _ in range(2):
            for x, y in loader:
                n += x.shape[0]
        loader_ips = n / (time.perf_counter() - t)

        stage = run.stage("probe", model=model, optimizer=opt, train_loader=loader, epochs=10 ** 6)
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t, seen = None, 0
        with profile(activities=activities) as prof:
            for _ in stage.epochs():
                for x, y in stage.batches():
                    with acc.accumulate(model):
                        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
                        acc.backward(loss)
                        opt.step()
                        opt.zero_grad(set_to_none=True)
                    stage.step_done(loss)
                    if stage.step == 1:
                        t = time.perf_counter()
                    elif stage.step > 1:
                        seen += x.shape[0]
                    if stage.step > args.steps:
                        break
                break
        if cuda:
            torch.cuda.synchronize()
        step_ips = seen / (time.perf_counter() - t)
        if cuda:
            events = {e.key: e.count for e in prof.key_averages()}
            syncs = sum(v for k, v in events.items() if "Synchronize" in k)
            print(f"CUDA synchronize calls: {syncs} in {args.steps + 1} optimizer steps (log_every {args.log_every})")
        else:
            print("host syncs: not measurable on a CPU (tests/test_engine.py counts the loop's device reads)")
        if cuda:
            print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
        print(f"throughput: loader alone {loader_ips:.0f} img/s; training step {step_ips:.0f} img/s "
              f"({'loader-bound' if loader_ips < 1.2 * step_ips else 'compute-bound'})")


if __name__ == "__main__":
    main()
