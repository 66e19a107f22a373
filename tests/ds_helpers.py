"""DeepSpeed runs of the recipes on CPU (gloo), for the tests that compare them with DDP."""
from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import torch
from safetensors.torch import load_file

import helpers


def without_use_cpu(monkeypatch) -> None:
    """ACCELERATE_USE_CPU would switch DeepSpeed off: the DeepSpeed runs go without it."""
    monkeypatch.setattr(helpers, "env", lambda: {k: v for k, v in helpers._base_env().items()
                                                 if k != "ACCELERATE_USE_CPU"})


def deepspeed_args(stage: int, port: int) -> list[str]:
    return ["--use_deepspeed", "--num_processes", "2", "--zero_stage", str(stage), "--mixed_precision", "no",
            "--main_process_port", str(port)]


def zero_config_args(recipe: str, recipe_args: list[str], stage: int, port: int, **zero: object) -> list[str]:
    """Launcher arguments for a 2-process ZeRO run whose ``zero_optimization`` section gets ``zero``
    (e.g. ``stage3_param_persistence_threshold=0``: every parameter partitioned)."""
    from visrep.launch.accelerate_config import LaunchSpec, write_launch_files

    files = write_launch_files(LaunchSpec(recipe, list(recipe_args), gpus_per_node=2, deepspeed=f"zero{stage}",
                                          cpu=True, main_process_port=port))
    ds = json.loads(files["deepspeed"].read_text())
    ds["zero_optimization"].update(zero)
    files["deepspeed"].write_text(json.dumps(ds))
    return ["--config_file", str(files["accelerate_config"])]


def assert_same_weights(ref: Path, got: Path, atol: float = 1e-6, label: str = "") -> dict:
    """Two exported ``model.safetensors`` hold the same keys and the same values (to ``atol``)."""
    a, b = load_file(str(ref)), load_file(str(got))
    assert a.keys() == b.keys(), f"{label}: keys differ: {sorted(a.keys() ^ b.keys())[:5]}"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=f"{label}: {k}")
    return a


def fake_accelerator(zero_stage):
    """Just enough of an ``Accelerator`` for a recipe's ``refuse_under_deepspeed``: DeepSpeed at
    ``zero_stage``, or DDP when it is None."""
    from accelerate.utils import DistributedType

    if zero_stage is None:
        return types.SimpleNamespace(distributed_type=DistributedType.MULTI_CPU,
                                     state=types.SimpleNamespace(deepspeed_plugin=None))
    return types.SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                                 state=types.SimpleNamespace(deepspeed_plugin=types.SimpleNamespace(zero_stage=zero_stage)))


def load_recipe(name: str):
    """``recipes/NAME.py`` as a module (the recipes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", helpers.ROOT / "recipes" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod
