"""Running recipes as users do: in a subprocess, with 1 or 2 processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def _base_env() -> dict:
    e = dict(os.environ)
    e.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
             ACCELERATE_USE_CPU="1", TOKENIZERS_PARALLELISM="false")
    e.pop("ACCELERATE_CONFIG_FILE", None)
    return e


def env() -> dict:
    return _base_env()


def write_preset(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def run_recipe(recipe: str, args: list[str], processes: int = 1, timeout: int = 600, check: bool = True,
               launcher_args: list[str] | None = None, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    script = str(ROOT / "recipes" / f"{recipe}.py")
    if processes == 1 and launcher_args is None:
        cmd = [sys.executable, script, *args]
    else:
        accelerate = shutil.which("accelerate", path=str(VENV_BIN)) or "accelerate"
        cmd = [accelerate, "launch", *(launcher_args or ["--multi_gpu", "--num_processes", str(processes),
                                                          "--num_machines", "1", "--mixed_precision", "no",
                                                          "--dynamo_backend", "no", "--main_process_port",
                                                          str(29500 + os.getpid() % 1000)]), script, *args]
    p = subprocess.run(cmd, cwd=ROOT, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return p
