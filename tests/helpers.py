"""Running recipes as users do: in a subprocess, with 1 or 2 processes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# `accelerate launch` as the module its console script dispatches to: the same launcher code without the
# CLI's other sub-commands, whose imports (timm through `accelerate estimate-memory`) cost about 4 s of CPU
# a launch. tests/test_launch.py runs the real `accelerate` command the SLURM script writes.
ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def _base_env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             ACCELERATE_USE_CPU="1", TOKENIZERS_PARALLELISM="false")
    # scripts run in a subprocess import these helpers too (exit_cleanly)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), e.get("PYTHONPATH")]))
    e.pop("ACCELERATE_CONFIG_FILE", None)
    return e


def env() -> dict:
    return _base_env()


def free_port() -> int:
    """A TCP port nobody listens on now (for a launch's rendezvous): tests that run side by side
    (pytest -n 2) must not share one."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_gloo_ranks(script: Path, out_dir: Path, *args: str, timeout: int = 180) -> list:
    """Run ``python script out_dir *args`` as ranks 0 and 1 of a 2-process gloo group (no launcher: the
    script calls ``torch.distributed.init_process_group("gloo")`` and saves ``out_dir/rank{r}.pt``); return
    the two saved objects. Fails with a rank's log when it exits non-zero."""
    import torch

    base = {**env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, str(script), str(out_dir), *args], cwd=ROOT,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(2)]


def run_in_process(recipe: str, argv: list[str], capsys) -> subprocess.CompletedProcess:
    """``recipes/RECIPE.py ARGV`` as its ``__main__`` runs it (``visrep.errors.run_cli(main, argv)``) but in
    this process, for the checks that end before or soon after training starts (no interpreter start-up):
    (exit status, captured stdout, stderr). tyro's own usage errors exit with status 2 as they would."""
    from ds_helpers import load_recipe
    from visrep.errors import run_cli

    mod = load_recipe(recipe)
    capsys.readouterr()
    try:
        code = run_cli(mod.main, list(argv))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 2
    finally:
        reset_accelerate()
    out = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out.out, out.err)


def reset_accelerate() -> None:
    """Forget the process-wide Accelerate state, so the next ``Accelerator`` starts afresh."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def exit_cleanly(acc=None) -> None:
    """The end of a script run by a launcher: wait for every rank (given ``acc``), destroy the process group (no gloo
    thread left behind) and exit without interpreter teardown, where a DDP/gloo object still alive can
    abort the process ("terminate called without an active exception") after the results are written."""
    import torch

    if acc is not None:
        acc.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def results(run_dir: Path) -> dict:
    """A run's ``results.json``."""
    import json

    return json.loads((Path(run_dir) / "results.json").read_text())


def write_preset(path: Path, data: dict) -> Path:
    """``data`` as a YAML preset. A preset that does not say ``run.report`` leaves the end-of-run report out
    (3-4 s a run, and the suite runs recipes some 150 times); tests/test_report.py turns it on."""
    run = dict(data.get("run") or {})
    run.setdefault("report", False)
    path.write_text(yaml.safe_dump(dict(data, run=run)))
    return path


def run_recipe(recipe: str, args: list[str], processes: int = 1, timeout: int = 600, check: bool = True,
               launcher_args: list[str] | None = None, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``recipes/RECIPE.py ARGS``: with more than one process (or a launcher's arguments) under
    ``accelerate launch``; with one process and ``extra_env`` in a subprocess of its own; else in this
    process, as its ``__main__`` would run it (:func:`in_process`), which saves the interpreter's
    start-up and imports."""
    if processes == 1 and launcher_args is None and extra_env is None:
        p = in_process(recipe, args)
        if check and p.returncode != 0:
            raise AssertionError(f"{recipe} {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                                 f"{p.stderr[-6000:]}")
        return p
    script = str(ROOT / "recipes" / f"{recipe}.py")
    if processes == 1 and launcher_args is None:  # an environment read at import time (the Hub's endpoint)
        cmd = [sys.executable, script, *args]
    else:
        cmd = [*ACCELERATE_LAUNCH, *(launcher_args or ["--multi_gpu", "--num_processes", str(processes),
                                                          "--num_machines", "1", "--mixed_precision", "no",
                                                          "--dynamo_backend", "no", "--main_process_port",
                                                          str(free_port())]), script, *args]
    p = subprocess.run(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p


def in_process(recipe: str, args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """A 1-process run of ``recipes/RECIPE.py ARGS`` inside this process, set up as the subprocess would
    be (its environment and ``env``, one thread, the repository as the working directory, every warning
    shown) and put back afterwards (Accelerate's state, threads, deterministic mode, the root logger's level,
    environment): (exit status, stdout, stderr)."""
    import contextlib
    import io
    import logging
    import warnings

    import torch

    from ds_helpers import load_recipe
    from visrep.errors import run_cli

    saved_env, threads, log_level = dict(os.environ), torch.get_num_threads(), logging.getLogger().level
    deterministic = torch.are_deterministic_algorithms_enabled()
    out, err = io.StringIO(), io.StringIO()
    os.environ.update({k: v for k, v in _base_env().items() if k != "PYTHONPATH"}, **(env or {}))
    torch.set_num_threads(1)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")
            try:
                code = run_cli(load_recipe(recipe).main, list(args))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
    finally:
        os.chdir(cwd)
        reset_accelerate()
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        logging.getLogger().setLevel(log_level)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def ddp_reference(recipe: str, preset: dict, tmp_path: Path) -> tuple[Path, Path]:
    """Write ``preset`` and run ``recipe`` with it under 2-process DDP: (preset file, run directory), the
    reference a DeepSpeed run of the same preset is compared with."""
    path = write_preset(tmp_path / f"{recipe}.yaml", preset)
    run_recipe(recipe, ["--config", str(path), "--output-dir", str(tmp_path / "ddp")], processes=2)
    return path, tmp_path / "ddp"


def straight_and_stopped(recipe: str, args: list[str], tmp_path: Path, stop_after: int, **kw) -> tuple[Path, Path]:
    """``recipe ARGS`` run straight through in ``tmp_path/a`` and stopped after ``stop_after`` optimizer
    steps in ``tmp_path/b`` (nothing final written there yet): the directories, for a resume of ``b``."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_recipe(recipe, [*args, "--output-dir", str(a)], **kw)
    p = run_recipe(recipe, [*args, "--output-dir", str(b), "--run.stop-after-steps", str(stop_after)], **kw)
    assert f"stopped after {stop_after} optimizer steps" in p.stdout + p.stderr and not (b / "results.json").exists()
    return a, b
