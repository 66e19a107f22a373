"""Timing and command-line options shared by the benchmark scripts."""
from __future__ import annotations

import argparse
import statistics
import time

# the options every timing benchmark reads alike (only their defaults differ)
OPTION_HELP = {
    "rounds": "interleaved rounds of ours and the peer; the table gives the medians",
    "steps": "timed steps per round",
    "warmup": "untimed steps before the first round (compilation, allocator, caches)",
    "threads": "torch CPU threads (default: torch's choice)",
    "batch_size": "images per step",
    "image_size": "input height and width",
}


def bench_parser(doc: str, device: str | None = None, **int_options: int | None) -> argparse.ArgumentParser:
    """An argument parser for a benchmark: ``doc`` as its description, an integer option ``--NAME`` for
    each ``NAME=default`` keyword (underscores become dashes; help from ``OPTION_HELP``) and, with
    ``device`` ("auto": CUDA where there is one), ``--device``."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in int_options.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default, help=OPTION_HELP.get(name))
    if device is not None:
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        p.add_argument("--device", default=device, choices=["cpu", "cuda"])
    return p


def update(opt, loss, backward=None):
    """The end of a timed training step: ``backward(loss)`` (default ``loss.backward()``; ours pass
    the accelerator's), the optimizer step, gradients set to None; returns the loss."""
    (backward or type(loss).backward)(loss)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def time_steps(step, batches, n: int, device: str) -> list[float]:
    """Seconds of each of ``n`` calls ``step(*batch)``, cycling through ``batches``; CUDA is synchronised
    around every call so the figure is the step's, not the launch's."""
    import torch

    times = []
    for i in range(n):
        batch = batches[i % len(batches)]
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(*batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def warm_and_interleave(steps: dict, batches, warmup: int, rounds: int, n: int, device: str) -> tuple[dict, dict]:
    """Each of ``steps`` (name -> ``step(*batch)``) warmed up untimed (``warmup`` calls: compilation happens
    here), then timed in ``rounds`` alternating rounds of ``n`` calls (the order reversed every other round,
    so drift in machine load hits all alike). Returns ``({name: [seconds of each timed call]}, {name:
    warm-up seconds})``."""
    warm = {}
    for name, step in steps.items():
        t = time.perf_counter()
        time_steps(step, batches, warmup, device)
        warm[name] = time.perf_counter() - t
    times = {name: [] for name in steps}
    for r in range(rounds):
        for name, step in (list(steps.items()) if r % 2 == 0 else reversed(list(steps.items()))):
            times[name] += time_steps(step, batches, n, device)
    return times, warm


def round_ratios(times: dict, fast: str, slow: str, n: int) -> list[float]:
    """``fast``'s speed over ``slow``'s in each interleaved round of ``warm_and_interleave`` (``n`` timed
    calls a round): the ratio of the two rounds' median step times. The two rounds of a pair ran next to each
    other, so drift in machine load moves both; their spread says how far one run's ratio can be trusted."""
    a, b = times[fast], times[slow]
    if len(a) != len(b) or len(a) % n:
        raise ValueError(f"round_ratios: {fast!r} has {len(a)} times and {slow!r} {len(b)}, not whole rounds of {n}")
    return [statistics.median(b[i:i + n]) / statistics.median(a[i:i + n]) for i in range(0, len(a), n)]


def ratio_spread(ratios: list[float]) -> str:
    """``median [lowest-highest] over K rounds`` of per-round ratios, for a benchmark's ratio line."""
    return f"{statistics.median(ratios):.3f} [{min(ratios):.2f}-{max(ratios):.2f} over {len(ratios)} rounds]"


def require_compiler(parser: argparse.ArgumentParser, args) -> None:
    """With ``args.compile_variants``, stop with one usage error when torch.compile cannot run on
    ``args.device`` (no C++ compiler, no Triton, ...), naming the flag that skips the compiled rows."""
    if args.compile_variants:
        from visrep.engine.fast import compiler_missing

        missing = compiler_missing(args.device)
        if missing:
            parser.error(f"the compiled rows need torch.compile, but {missing}; --no-compile-variants skips them")


def recipe_results(recipe: str, args: list, out, tag: str, processes: int = 1,
                   via: tuple[str, list] | None = None) -> dict:
    """``results.json`` of ``recipes/RECIPE.py ARGS --output-dir OUT`` (for the accuracy benchmarks): reused
    when ``out`` already has one, the run resumed when it was interrupted, else run now (``processes`` > 1:
    through ``accelerate launch`` on CPU ranks). ``via = (name, command)``: the recipe's arguments go to
    ``command`` instead (a script that runs the recipe its own way, e.g. with a peer's losses); ``name`` is
    recorded with the arguments, so a run made another way is never reused, and the command's stdout is kept in
    ``OUT/NAME_stdout.log``. A failed run stops the benchmark with its stderr."""
    import json
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root, out = Path(__file__).resolve().parent.parent, Path(out)
    res, saved = out / "results.json", out / "bench_args.json"
    key = list(args) if via is None else [via[0], *args]
    if saved.is_file() and json.loads(saved.read_text()) != key:
        raise SystemExit(f"{out} holds a run with other arguments ({saved}); give this benchmark another "
                         f"--output-dir")
    if res.is_file():
        return json.loads(res.read_text())
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(key))
    args = [*args, "--output-dir", str(out), "--run.progress", "False"]
    if (out / "state.json").exists() or (out / "checkpoints").exists():
        args += ["--resume", "latest"]
    script = str(root / "recipes" / f"{recipe}.py")
    if via is not None:
        cmd = [*via[1], *args]
    elif processes > 1:
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]
    else:
        cmd = [sys.executable, script, *args]
    print(f"[{tag}] -> {out}", flush=True)
    p = subprocess.run(cmd, cwd=root, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True)
    if via is not None:
        (out / f"{via[0]}_stdout.log").write_text(p.stdout)
    if p.returncode != 0:
        shown = f"{p.stdout[-1500:]}\n" if via is not None else ""
        raise SystemExit(f"run failed ({p.returncode}): {' '.join(cmd)}\n{shown}{p.stderr[-3000:]}")
    return json.loads(res.read_text())


def mean_std(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    xs = list(xs)
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)
