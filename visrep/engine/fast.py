"""The fast paths a run switches on: ``torch.compile`` with a fallback, and the CUDA math settings.

``run.compile`` compiles the *training* forward of the model a stage trains (and, through AOTAutograd,
its backward). Evaluation (the module in eval mode) runs eager: its batch shapes differ from the
training batch and it runs a few times an epoch, so a second graph would cost more than it saves. A
frozen teacher is compiled for inference on its own (:meth:`visrep.distill.FrozenTeacher.compile_inference`).

- ``off``: eager.
- ``on``: compiled; a missing compiler is a :class:`ConfigError` that says what is missing.
- ``auto`` (the default): compiled when the stage runs at least ``run.compile_min_steps`` optimizer steps
  (compiling a CIFAR ResNet takes tens of seconds on a CPU; ``benchmarks/fast_paths_bench.py`` measures
  the cost and the gain) and a compiler is present; otherwise eager, said once. If the compiler then
  fails on the first batch, the run says so and continues eager.

Not under DeepSpeed: its engine wraps the forward in ZeRO hooks that the compiler cannot trace
(``auto`` runs eager there, ``on`` is refused).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from typing import Any, Callable, Optional

import torch
from torch import nn

from visrep.checks import ConfigError


def compiler_missing(device: torch.device | str) -> Optional[str]:
    """Why ``torch.compile`` cannot run on ``device`` here, or None when it can: inductor needs a C++
    compiler for CPU code and Triton (and a GPU of compute capability >= 7.0) for CUDA code."""
    device = torch.device(device)
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support this Python ({sys.version.split()[0]}) or platform"
    if device.type == "cpu":
        cxx = os.environ.get("CXX") or "c++"
        if not any(shutil.which(c) for c in (cxx, "g++", "clang++")):
            return "no C++ compiler found (install gcc or clang, or set CXX), which inductor needs for CPU code"
    elif device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "Triton is not installed (pip install triton), which inductor needs for GPU code"
        if torch.cuda.get_device_capability(device)[0] < 7:
            return "the GPU's compute capability is below 7.0, the least Triton supports"
    return None


def compile_decision(mode: str, steps: int, min_steps: int, device: torch.device | str,
                     deepspeed: bool = False) -> tuple[bool, str]:
    """Whether a stage of ``steps`` optimizer steps compiles under ``run.compile = mode``, and why (for the
    log). ``on`` with no way to compile raises a :class:`ConfigError`."""
    if mode == "off":
        return False, "run.compile is off"
    missing = "DeepSpeed's engine cannot be compiled here" if deepspeed else compiler_missing(device)
    if missing:
        if mode == "on":
            raise ConfigError(f"run.compile is 'on' but {missing}. Set run.compile to 'auto' (compiles where it "
                              f"can, else runs eager) or 'off'.")
        return False, missing
    if mode == "auto" and steps < min_steps:
        return False, f"{steps} steps < run.compile_min_steps ({min_steps}): compiling would cost more than it saves"
    return True, "compiled"


def compile_training_forward(module: nn.Module, fallback: bool, say: Callable[[str], None] = print,
                             **options: Any) -> nn.Module:
    """Compile ``module``'s forward in place for training mode; eval mode keeps the eager forward.

    ``fallback``: if compiling fails (on the first batch, where the compiler runs), say so and run eager
    from then on; otherwise the error propagates. Returns ``module``."""
    compiled = torch.compile(module._call_impl, **options)
    eager = module._call_impl
    state = {"failed": False}

    def call(*args: Any, **kwargs: Any) -> Any:
        if not module.training or state["failed"]:
            return eager(*args, **kwargs)
        if not fallback:
            return compiled(*args, **kwargs)
        try:
            return compiled(*args, **kwargs)
        except Exception as e:  # the compiler, not the model: the eager call below re-raises a model error
            state["failed"] = True
            cause = getattr(e, "inner_exception", None) or e.__cause__ or e
            first = str(cause).splitlines()[0][:200] if str(cause) else ""
            say(f"[visrep] warning: torch.compile failed ({type(cause).__name__}: {first}); continuing eager "
                f"(set run.compile off to skip the attempt)")
            return eager(*args, **kwargs)

    # nn.Module.__call__ routes through _compiled_call_impl when it is set (what nn.Module.compile does)
    module._compiled_call_impl = call
    return module


def to_channels_last(module: nn.Module) -> nn.Module:
    """``module`` stored channels_last (NHWC) in place when it has convolutions (``run.channels_last``);
    a model without any is left as it is. Returns ``module``."""
    if any(isinstance(m, nn.Conv2d) for m in module.modules()):
        module.to(memory_format=torch.channels_last)
    return module


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def cuda_fast_math(deterministic: bool) -> None:
    """On CUDA: TF32 for fp32 matmuls and convolutions (Ampere and newer; ~10 bits of mantissa), and cuDNN
    autotuning unless ``run.deterministic``."""
    if not torch.cuda.is_available():
        return
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if not deterministic:
        torch.backends.cudnn.benchmark = True
