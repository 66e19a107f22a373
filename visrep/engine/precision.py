"""Mixed precision, decided once and applied the same way under DDP and DeepSpeed.

- ``run.mixed_precision: auto`` defers to the launcher (``accelerate launch --mixed_precision X`` or
  its config file, which set ``ACCELERATE_MIXED_PRECISION``); without a launcher setting it is bf16 on
  a GPU with native bf16 (Ampere and newer; a V100 or T4 would only emulate it, slowly) and fp32
  elsewhere. An explicit ``no`` / ``bf16`` / ``fp16`` in the config wins over the launcher.
- Under DDP, Accelerate autocasts the forward; weights stay fp32.
- Under DeepSpeed, the engine keeps fp32 master weights in the optimizer and casts the module to
  bf16/fp16, but Accelerate's autocast is off and nothing casts the inputs: :func:`cast_inputs_to_engine`
  adds a forward pre-hook that casts floating-point inputs to the engine's dtype (the first forward
  would otherwise fail with "Input type (float) and weight type (bfloat16) should be the same"), and
  :func:`fp32_norm_layers` makes normalisation layers compute in fp32 with their fp32 statistics.
- Frozen partners kept outside the engine (a KD teacher) stay fp32 and run under :func:`autocast`,
  which, unlike ``accelerator.autocast()``, also autocasts under DeepSpeed.
"""
from __future__ import annotations

import contextlib
import os
import types
from typing import Any

import torch
import torch.nn.functional as F

LAUNCHER_ENV = "ACCELERATE_MIXED_PRECISION"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16() -> bool:
    """A CUDA device with bf16 in hardware (not emulated)."""
    if not torch.cuda.is_available():
        return False
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch without the argument: compute capability 8.0 (Ampere) and newer
        return torch.cuda.get_device_capability()[0] >= 8


def resolve_mixed_precision(name: str) -> str:
    """The precision a run uses for config value ``name`` (see the module docstring)."""
    if name != "auto":
        return name
    launcher = os.environ.get(LAUNCHER_ENV, "").strip().lower()
    if launcher in ("no", "bf16", "fp16", "fp8"):
        return launcher
    return "bf16" if native_bf16() else "no"


def _bn_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``nn.modules.batchnorm._BatchNorm.forward`` computed in fp32 -- input, weights and running
    statistics -- and returned in the input's dtype."""
    factor = 0.0 if self.momentum is None else self.momentum
    if self.training and self.track_running_stats and self.num_batches_tracked is not None:
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
    use_batch = self.training or (self.running_mean is None and self.running_var is None)
    keep = not self.training or self.track_running_stats
    out = F.batch_norm(x.float(), self.running_mean if keep else None, self.running_var if keep else None,
                       None if self.weight is None else self.weight.float(),
                       None if self.bias is None else self.bias.float(), use_batch, factor, self.eps)
    return out.to(x.dtype)


def _ln_forward(self, x: torch.Tensor) -> torch.Tensor:
    w, b = (None if v is None else v.float() for v in (self.weight, self.bias))
    return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def _gn_forward(self, x: torch.Tensor) -> torch.Tensor:
    w, b = (None if v is None else v.float() for v in (self.weight, self.bias))
    return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def _norm_forward(m: torch.nn.Module):
    if isinstance(m, torch.nn.SyncBatchNorm):
        return None  # its own forward (cross-rank statistics)
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        return _bn_forward
    if isinstance(m, torch.nn.LayerNorm):
        return _ln_forward
    if isinstance(m, torch.nn.GroupNorm):
        return _gn_forward
    return None


def norm_layers_count(module: torch.nn.Module) -> int:
    return sum(_norm_forward(m) is not None for m in module.modules())


def fp32_norm_layers(module: torch.nn.Module) -> int:
    """Make every BatchNorm / LayerNorm / GroupNorm of ``module`` compute in fp32 whatever the dtype of
    its weights and inputs (DeepSpeed bf16/fp16 casts every parameter, norm weights too, but keeps the
    running statistics fp32: BatchNorm then refuses to run, and bf16 statistics would drift). The
    weights' gradients flow through the cast; the output has the input's dtype. Returns how many."""
    n = 0
    for m in module.modules():
        fn = _norm_forward(m)
        if fn is not None:
            m.forward = types.MethodType(fn, m)
            n += 1
    return n


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cast(o, dtype) for o in obj)
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    return obj


def cast_inputs_to_engine(module: torch.nn.Module, dtype: torch.dtype) -> list:
    """Cast the floating-point inputs of ``module`` and of every submodule that holds parameters to
    ``dtype`` (forward pre-hooks; evaluation often calls a submodule directly, e.g. an encoder).
    Returns the hooks' handles."""

    def hook(mod, args, kwargs):
        return _cast(args, dtype), _cast(kwargs, dtype)

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in module.modules()
            if m is module or next(m.parameters(recurse=False), None) is not None]


def autocast(accelerator):
    """``torch.autocast`` at the run's precision on the accelerator's device -- also under DeepSpeed
    (for fp32 modules outside the engine); a no-op context at fp32."""
    mp = accelerator.mixed_precision
    if mp not in _DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=accelerator.device.type, dtype=_DTYPES[mp])
