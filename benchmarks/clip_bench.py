"""CLIP loss and training step: visrep.clip vs. open_clip's ``ClipLoss``, side by side in one run.

  1. loss forward + backward, 1 process, at equal batch and width;
  2. the same in 2 processes (gloo on CPU / nccl on CUDA), both computing the local loss
     (open_clip: ``ClipLoss(local_loss=True, gather_with_grad=True)``; ours: ``clip_loss``);
  3. a full training step (forward of both towers, loss, backward, AdamW) of a small CLIP model,
     the same model, data and optimizer, only the loss differs; and the same step with open_clip's
     loss on both sides (an A/A control: how far from 1.00 the ratio moves by noise alone).
     The step also gets a table of its own, one interleaved run of four rows:

     - visrep fast: at the recipes' fast defaults: the model channels_last (its image tower has
       convolutions), its training forward compiled with
       ``visrep.engine.fast.compile_training_forward(model, fallback=False)``, foreach AdamW;
     - visrep eager: ours as in 3. (the reference);
     - open_clip default: the peer as in 3. (eager, NCHW, torch's default AdamW);
     - open_clip compiled: the peer with the same switches: channels_last, ``nn.Module.compile()``,
       foreach AdamW.

     Ratios (throughput): visrep fast / open_clip default (target >= 1.25), visrep fast / open_clip
     compiled (target >= 1.0), visrep fast / visrep eager. Warm-up steps (compilation included) are
     untimed; their seconds are printed per row. The two sides train the same model (only the loss
     differs), so the compiled peer reuses the graphs compiled for visrep fast (torch.compile caches
     per code, with the parameters as graph inputs): its warm-up shows no compilation. Under
     ``--no-compile-variants``: the eager rows only.

Timings alternate between the two implementations (so drift in machine load hits both alike); the
median is reported. Memory: on CUDA the peak allocated during forward + backward; on CPU (no
allocator statistics) the bytes the autograd graph saves for the backward pass, which is what
grows with the batch. Ratios: speed = open_clip time / ours (>= 1: ours is faster); memory = ours /
open_clip (<= 1: ours uses no more).

    python benchmarks/clip_bench.py                                  # CPU defaults
    python benchmarks/clip_bench.py --batch-size 4096 --width 512 --device cuda
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timing import bench_parser, require_compiler, time_steps, update  # noqa: E402

# the training-step rows: key -> label ("ours" and "open_clip" are the eager steps of the main table)
STEP_VARIANTS = {
    "ours fast": "visrep fast (channels_last + compile + foreach)",
    "ours": "visrep eager",
    "open_clip": "open_clip default (eager)",
    "open_clip compiled": "open_clip + channels_last + compile + foreach",
}
FAST_STEPS = ("ours fast", "open_clip compiled")


class SavedBytes:
    """Bytes of the tensors autograd saves for backward (counted once per storage)."""

    def __init__(self):
        self.seen, self.total = set(), 0

    def pack(self, t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in self.seen:
            self.seen.add(key)
            self.total += key[1]
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


def loss_fns(rank: int = 0, world: int = 1):
    from open_clip.loss import ClipLoss

    from visrep.clip import clip_loss

    oc = ClipLoss(local_loss=world > 1, gather_with_grad=world > 1, cache_labels=True, rank=rank, world_size=world)
    return {"ours": lambda i, t, s: clip_loss(i, t, s), "open_clip": lambda i, t, s: oc(i, t, s)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_loss(args, device, rank: int = 0, world: int = 1) -> dict:
    fns = loss_fns(rank, world)
    g = torch.Generator().manual_seed(rank)
    img = F.normalize(torch.randn(args.batch_size, args.width, generator=g), dim=1).to(device)
    txt = F.normalize(torch.randn(args.batch_size, args.width, generator=g), dim=1).to(device)
    times = {k: [] for k in fns}
    mem = {}
    for r in range(args.warmup + args.rounds):
        for name, fn in (fns.items() if r % 2 == 0 else reversed(list(fns.items()))):
            i, t = img.clone().requires_grad_(), txt.clone().requires_grad_()
            s = torch.tensor(1 / 0.07, device=device, requires_grad=True)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            sync(device)
            t0 = time.perf_counter()
            with SavedBytes() as sb:
                loss = fn(i, t, s)
            loss.backward()
            sync(device)
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
            mem[name] = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else sb.total
    return {k: (statistics.median(v), mem[k]) for k, v in times.items()}


def bench_step(args, device, control: bool = False, compile_variants: bool = False) -> tuple[dict, dict]:
    """A full training step; ``control``: open_clip's loss on *both* sides (an A/A run: the ratio it
    gives is the noise floor of this measurement); ``compile_variants``: also the fast rows of
    ``STEP_VARIANTS``. Returns the median seconds per step (and no memory figure) of each row, and
    the seconds of each row's untimed warm-up steps."""
    import copy

    from open_clip.loss import ClipLoss

    from visrep.clip import ClipModelConfig, TextTowerConfig, build_clip_model, clip_loss, get_tokenizer
    from visrep.data.pairs import DIGIT_NAMES, DIGIT_TRAIN_TEMPLATES
    from visrep.engine.fast import compile_training_forward, to_channels_last

    cfg = ClipModelConfig(text=TextTowerConfig(context_length=16, width=64, layers=2, heads=2), embed_dim=64)
    torch.manual_seed(0)
    base = build_clip_model(cfg).to(device)
    tok = get_tokenizer(cfg)
    n = args.step_batch
    caps = [DIGIT_TRAIN_TEMPLATES[i % 10].format(DIGIT_NAMES[i % 10][0]) for i in range(n)]
    images, tokens = torch.randn(n, 3, 16, 16, device=device), tok(caps).to(device)
    oc = ClipLoss(cache_labels=True)

    def ours(o):
        return (oc if control else clip_loss)(o["image_features"], o["text_features"], o["logit_scale"])

    def peer(o):
        return oc(o["image_features"], o["text_features"], o["logit_scale"])

    impls = {"ours": ours, "open_clip": peer}
    if compile_variants and not control:
        impls = {"ours fast": ours, **impls, "open_clip compiled": peer}
    models = {k: copy.deepcopy(base) for k in impls}
    if "ours fast" in models:
        compile_training_forward(to_channels_last(models["ours fast"]), fallback=False)
        to_channels_last(models["open_clip compiled"]).compile()
    # foreach=None: torch's default (the per-parameter loop on a CPU)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4, foreach=True if k in FAST_STEPS else None)
            for k, m in models.items()}

    def make_step(name):
        model, opt, loss_fn = models[name], opts[name], impls[name]
        return lambda x, t: update(opt, loss_fn(model(x, t)))

    steps = {k: make_step(k) for k in impls}
    warm = {}
    for name, step in steps.items():  # untimed: compilation happens here
        t0 = time.perf_counter()
        time_steps(step, [(images, tokens)], args.warmup, args.device)
        warm[name] = time.perf_counter() - t0
    times = {k: [] for k in impls}
    for r in range(args.step_rounds):  # one step of each per round, the order alternating
        for name in (steps if r % 2 == 0 else reversed(list(steps))):
            times[name] += time_steps(steps[name], [(images, tokens)], 1, args.device)
    return {k: (statistics.median(v), None) for k, v in times.items()}, warm


def _dist_worker(rank, world, args, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, args.threads // world))
    backend = "nccl" if args.device == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")
    res = bench_loss(args, device, rank, world)
    if rank == 0:
        out.put(res)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def bench_dist(args, world: int = 2) -> dict:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = 29700 + os.getpid() % 1000
    procs = [ctx.Process(target=_dist_worker, args=(r, world, args, port, out)) for r in range(world)]
    for p in procs:
        p.start()
    res = out.get(timeout=600)
    for p in procs:
        p.join()
    return res


def fmt_mem(b):
    return "-" if b is None else f"{b / 2**20:.1f} MiB"


def main(argv=None):
    ap = bench_parser(__doc__, "cpu", rounds=20, step_rounds=30, warmup=2, threads=2)
    ap.add_argument("--batch-size", type=int, default=1024, help="loss benchmark: batch per process")
    ap.add_argument("--width", type=int, default=256, help="loss benchmark: embedding width")
    ap.add_argument("--step-batch", type=int, default=128, help="training-step benchmark: batch")
    ap.add_argument("--skip-dist", action="store_true")
    ap.add_argument("--no-compile-variants", dest="compile_variants", action="store_false",
                    help="training step: skip the compiled rows (visrep fast, open_clip compiled); quick runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    require_compiler(ap, args)

    rows = [(f"loss fwd+bwd, 1 process (B={args.batch_size}, D={args.width})", bench_loss(args, device))]
    if not args.skip_dist:
        if args.device == "cuda" and torch.cuda.device_count() < 2:
            print("[clip_bench] 2-process CUDA run needs 2 GPUs; skipped", file=sys.stderr)
        else:
            rows.append((f"loss fwd+bwd, 2 processes, local loss (B={args.batch_size}/rank)", bench_dist(args)))
    step, step_warm = bench_step(args, device, compile_variants=args.compile_variants)
    step_name = f"train step, small CLIP (resnet20 16px + 2-layer text, B={args.step_batch})"
    rows.append((step_name, step))
    control = bench_step(args, device, control=True)[0]
    rows.append(("  A/A control: open_clip's loss on both sides (noise floor)", control))

    mem_kind = "peak alloc" if args.device == "cuda" else "saved for bwd"
    head = (f"{'case':<62}{'ours ms':>10}{'open_clip ms':>14}{'speed x':>9}"
            f"{'ours ' + mem_kind:>22}{'open_clip ' + mem_kind:>27}{'mem x':>8}")
    print(f"\nCLIP loss benchmark on {args.device} ({args.threads} threads, torch {torch.__version__})")
    print(head)
    print("-" * len(head))
    for name, r in rows:
        (to, mo), (tc, mc) = r["ours"], r["open_clip"]
        mem_ratio = f"{mo / mc:.2f}" if mo is not None and mc else "-"
        print(f"{name:<62}{to * 1e3:>10.2f}{tc * 1e3:>14.2f}{tc / to:>9.2f}{fmt_mem(mo):>22}{fmt_mem(mc):>27}"
              f"{mem_ratio:>8}")
    print("speed x = open_clip time / ours (>= 1: ours faster); mem x = ours / open_clip (<= 1: ours no more)")

    print(f"\n{step_name}: {args.step_rounds} interleaved rounds x 1 step (medians), {args.warmup} warm-up steps each")
    head = f"{'variant':<50}{'ms / step':>10}{'images/s':>10}{'warm-up s':>11}"
    print(head)
    print("-" * len(head))
    for key, label in STEP_VARIANTS.items():
        if key in step:
            t = step[key][0]
            print(f"{label:<50}{t * 1e3:>10.2f}{args.step_batch / t:>10.1f}{step_warm[key]:>11.1f}")
    if args.compile_variants:
        fast = step["ours fast"][0]
        print(f"throughput ratio visrep fast / open_clip default: {step['open_clip'][0] / fast:.3f} (target >= 1.25)")
        print(f"throughput ratio visrep fast / open_clip compiled: {step['open_clip compiled'][0] / fast:.3f} "
              f"(target >= 1.0)")
        print(f"throughput ratio visrep fast / visrep eager: {step['ours'][0] / fast:.3f}")
    return rows


if __name__ == "__main__":
    main()
