"""Typed configuration: dataclasses, YAML presets, dotted command-line overrides.

A recipe declares one root dataclass. ``parse_config`` loads the preset named by ``--config`` (or the
recipe's default preset) strictly -- unknown keys and ill-typed values are errors that name the key,
the file and the valid choices -- and then applies command-line overrides with tyro
(``--optim.lr 0.1``; ``--output-dir`` and ``--output_dir`` both work). A preset may extend another
(``_base_: other.yaml``, :func:`read_preset`). Presets are turned into
dataclasses by dacite, chosen because it is small, pure Python and builds plain dataclasses with strict
type checks, leaving us only hooks (bools are not numbers, lists become tuples, ``output-dir`` keys) and
our own messages.
"""
from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import functools
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence, TypeVar, Union

import dacite
import yaml

from visrep.checks import ConfigError, check, existing
from visrep.engine.io import atomic_write_text

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------
# Shared config groups. Recipes compose these with their own method groups.
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BackboneConfig:
    """A zoo backbone: ``visrep.zoo.create_backbone(name, pretrained, checkpoint=..., small_input, **kwargs)``."""

    name: str = "resnet20"
    pretrained: bool = False
    checkpoint: Optional[str] = None
    small_input: bool = True
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    grad_checkpointing: bool = False
    """Recompute each stage's activations in the backward instead of keeping them: a larger batch or model
    in the same memory, for about one more forward of compute (the zoo's models and timm's)."""


@dataclasses.dataclass
class OptimConfig:
    """Optimizer: SGD, AdamW or LARS. ``lr`` is the peak learning rate -- as given (``lr_scaling: none``)
    or per ``base_batch`` images, multiplied by ``global_batch / base_batch`` with ``global_batch =
    run.batch_size x processes x run.grad_accum`` (``linear``: the rule of BYOL / SimCLR)."""

    name: Literal["sgd", "adamw", "lars"] = "sgd"
    lr: float = 0.1
    lr_scaling: Literal["none", "linear"] = "none"
    base_batch: int = 256
    """The batch ``lr`` is given for when ``lr_scaling`` is linear."""
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = True
    """SGD only."""
    betas: tuple[float, float] = (0.9, 0.999)
    eta: float = 0.001
    """LARS trust coefficient."""
    exclude_bias_and_norm: bool = True
    """LARS: biases and normalisation parameters get no trust ratio (nor weight decay)."""
    grad_clip: Optional[float] = None
    implementation: Literal["torch", "auto", "fused", "foreach", "loop"] = "torch"
    """How SGD and AdamW update the weights: ``fused`` (torch's fused kernels: one pass over each group's
    tensors, CPU and CUDA), ``foreach`` (multi-tensor ops), ``loop`` (one parameter at a time, torch's
    reference); ``auto``: fused where torch has the kernel for the parameters' device, else foreach;
    ``torch``: torch's own choice (foreach on CUDA, the loop on a CPU). They agree to float rounding
    (tests/test_optim.py); ``benchmarks/fast_paths_bench.py`` measures them. LARS is foreach."""

    def peak_lr(self, global_batch: Optional[int] = None) -> float:
        """The peak rate for ``global_batch`` samples per optimizer step."""
        if self.lr_scaling == "none":
            return self.lr
        if not global_batch:
            raise ValueError("lr_scaling 'linear' needs the global batch size")
        return self.lr * global_batch / self.base_batch

    def validate(self, prefix: str) -> None:
        check(self.lr > 0, f"{prefix}lr", self.lr, "a positive number")
        check(self.weight_decay >= 0, f"{prefix}weight_decay", self.weight_decay, "a number >= 0")
        check(self.base_batch >= 1, f"{prefix}base_batch", self.base_batch, "an integer >= 1")
        check(self.eta > 0, f"{prefix}eta", self.eta, "a positive number")
        check(self.grad_clip is None or self.grad_clip > 0, f"{prefix}grad_clip", self.grad_clip,
              "null or a positive number")


@dataclasses.dataclass
class ScheduleConfig:
    """Epoch budget and learning-rate schedule, counted in optimizer steps."""

    epochs: int = 10
    warmup_epochs: float = 1.0
    warmup_steps: Optional[int] = None
    """Warmup counted in optimizer steps (replaces warmup_epochs when set): the same number of small steps
    whatever the dataset size and process count, which is what a deep network needs to start stably.
    At most half the stage."""
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    min_lr_ratio: float = 0.0

    def validate(self, prefix: str) -> None:
        check(self.epochs >= 0, f"{prefix}epochs", self.epochs, "an integer >= 0")
        check(self.warmup_epochs >= 0, f"{prefix}warmup_epochs", self.warmup_epochs, "a number >= 0")
        check(self.warmup_steps is None or self.warmup_steps >= 0, f"{prefix}warmup_steps", self.warmup_steps,
              "null or an integer >= 0")
        check(0 <= self.min_lr_ratio <= 1, f"{prefix}min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")


@dataclasses.dataclass
class RunConfig:
    """Plumbing shared by every recipe."""

    batch_size: int = 64
    """Per-device training batch size."""
    eval_batch_size: int = 256
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 on a CUDA device that supports it, fp32 on CPU (bf16 matmul is very slow there)."""
    log_every: int = 10
    """Optimizer steps between metric records."""
    checkpoint_every: int = 0
    """Optimizer steps between checkpoints; 0 = at the end of every epoch."""
    keep_last: int = 2
    trackers: list[str] = dataclasses.field(default_factory=lambda: ["jsonl"])
    """jsonl is always written; add tensorboard, wandb, ... (any Accelerate tracker)."""
    progress: bool = True
    stop_after_steps: Optional[int] = None
    """Stop (after a checkpoint) once the run has taken this many optimizer steps in total; continue
    later with --resume latest. For interrupted jobs and tests."""
    num_workers: int = -1
    """DataLoader workers per process; -1: automatic (a GPU host's CPUs shared among its local processes,
    at most 8 each; 0 on a CPU-only host, where workers would compete with training for the cores)."""
    deterministic: bool = False
    """Deterministic kernels (torch.use_deterministic_algorithms, cuDNN autotuning off, a fixed cuBLAS
    workspace): same seed, same results on GPUs too, at some speed. CPU runs with the same seed, thread
    count and process count are already reproducible."""
    dist_timeout_s: int = 1800
    """Seconds a collective may wait for the other ranks before the job fails (NCCL's default is 600)."""
    save_on_each_node: bool = False
    """Write checkpoints and exports on every node (node-local disks) instead of once (shared filesystem)."""
    channels_last: bool = False
    """Convolutional models prepared by the run are stored channels_last (NHWC; the inputs follow at the
    first convolution): the layout oneDNN and cuDNN run fastest. The same step to float rounding
    (tests/test_engine.py)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the training forward and backward of the model each stage trains (evaluation runs
    eager). auto: when the stage runs at least compile_min_steps optimizer steps and a compiler is present
    (else eager, said once; a compiler failure falls back to eager); on: always, an error if it cannot;
    off: eager. Not under DeepSpeed. See visrep.engine.fast."""
    compile_min_steps: int = 1000
    """auto compiles stages of at least this many optimizer steps. Compiling a CIFAR ResNet costs 20-70 s on
    a 2-core CPU (benchmarks/fast_paths_bench.py); at batch 32 the full-width ResNet-20 won it back
    after ~200 steps, the half-width one only after ~1,200 (its steps are mostly overhead that eager
    already keeps small)."""
    report: bool = True
    """At the end of the recipe (main process), write RUN_DIR/report/index.html: curves, results, config,
    confusion matrices, Grad-CAM, the first training views (visrep.report; also `visrep report RUN_DIR`).
    A figure that cannot be made is a warning; the report never fails the run."""

    def validate(self, prefix: str) -> None:
        check(self.compile_min_steps >= 0, f"{prefix}compile_min_steps", self.compile_min_steps, "an integer >= 0")
        for key in ("batch_size", "eval_batch_size", "grad_accum", "log_every", "keep_last"):
            check(getattr(self, key) >= 1, f"{prefix}{key}", getattr(self, key), "an integer >= 1")
        check(self.checkpoint_every >= 0, f"{prefix}checkpoint_every", self.checkpoint_every, "an integer >= 0")
        check(self.num_workers >= -1, f"{prefix}num_workers", self.num_workers, "an integer >= 0, or -1 (automatic)")
        check(self.dist_timeout_s >= 1, f"{prefix}dist_timeout_s", self.dist_timeout_s, "an integer >= 1 (seconds)")
        check(self.stop_after_steps is None or self.stop_after_steps >= 1, f"{prefix}stop_after_steps",
              self.stop_after_steps, "null or an integer >= 1")


@dataclasses.dataclass
class RecipeConfig:
    """What every recipe's config has (DESIGN.md, "Recipe conventions"). A recipe subclasses it,
    sets its own ``output_dir`` default and adds its groups (data, model, method, optim, ...)."""

    config: Optional[str] = None
    """YAML preset the values start from (default: the recipe's embedded-data preset)."""
    output_dir: str = "runs/run"
    resume: Optional[str] = None
    """'latest' (the run in --output-dir) or a checkpoint directory."""
    seed: int = 0
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    push_to_hub: Optional[str] = None
    """USER/REPO: push the final model (weights, config.json, model card) to the Hugging Face Hub at the end."""


# ----------------------------------------------------------------------------------------------
# Strict dict -> dataclass conversion (dacite, with our hooks and messages)
# ----------------------------------------------------------------------------------------------
class _Rejected:
    """What a type hook returns for a value dacite would accept or mangle (a bool for an int field, a
    string for a list field): no type matches it, so dacite reports the field as ill-typed."""

    def __init__(self, value: Any):
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


class _UnknownKey(dacite.DaciteFieldError):
    """Raised by a section's hook; dacite prefixes ``field_path`` with the enclosing fields."""

    def __init__(self, key: Any, valid: Sequence[str]):
        super().__init__()
        self.key, self.valid = key, valid


def _int(value: Any) -> Any:
    return _Rejected(value) if isinstance(value, bool) else value


def _float(value: Any) -> Any:
    if isinstance(value, bool):
        return _Rejected(value)
    return float(value) if isinstance(value, int) else value


def _sequence(kind: type) -> Any:
    """Hook for list, tuple and Sequence types: a YAML list (or a tuple) becomes ``kind``; dacite then
    checks the items and a fixed tuple's length."""
    return lambda value: kind(value) if isinstance(value, (list, tuple)) else _Rejected(value)


def _mapping(value: Any) -> Any:
    return value if isinstance(value, Mapping) else _Rejected(value)


def _section(cls: type) -> Any:
    """Hook for a config group: null is an empty section, ``output-dir`` means ``output_dir``, unknown
    keys are errors."""
    valid = sorted(f.name for f in dataclasses.fields(cls) if f.init)

    def hook(value: Any) -> Any:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            return value  # dacite reports the wrong type
        out = {}
        for key, v in value.items():
            name = str(key).replace("-", "_")
            if name not in valid:
                raise _UnknownKey(key, valid)
            out[name] = v
        return out

    return hook


@functools.lru_cache(maxsize=None)
def _dacite_config(cls: type) -> dacite.Config:
    """Hooks for ``cls`` and every config group, list, tuple and mapping type reachable from it."""
    hooks: dict[Any, Any] = {int: _int, float: _float}

    def visit(tp: Any) -> None:
        if isinstance(tp, list):  # Callable[[args], result]
            return
        if tp in hooks:
            return
        if dataclasses.is_dataclass(tp):
            hooks[tp] = _section(tp)
            for hint in typing.get_type_hints(tp).values():
                visit(hint)
        elif (typing.get_origin(tp) or tp) is tuple:
            hooks[tp] = _sequence(tuple)
        elif (typing.get_origin(tp) or tp) in (list, collections.abc.Sequence):
            hooks[tp] = _sequence(list)
        elif (typing.get_origin(tp) or tp) is dict:
            hooks[tp] = _mapping
        if typing.get_origin(tp) is not Literal:
            for arg in typing.get_args(tp):
                visit(arg)

    visit(cls)
    return dacite.Config(type_hooks=hooks, strict=True)


def _expected(tp: Any) -> str:
    """What a value of type ``tp`` looks like in YAML, for messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return "any value"
    if dataclasses.is_dataclass(tp):
        return "a mapping (a config section)"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        options = [_expected(a) for a in args if a is not type(None)]
        return " or ".join((["null"] if type(None) in args else []) + options)
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if tp in simple:
        return simple[tp]
    if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
        return f"a list of {len(args)} items: " + ", ".join(_expected(a) for a in args)
    if origin in (list, tuple, collections.abc.Sequence) and args:
        return f"a list, each item {_expected(args[0])}"
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _same_key(a: Any, b: Any) -> bool:
    """One config key however written (``output-dir`` is ``output_dir``)."""
    return str(a).replace("-", "_") == str(b).replace("-", "_")


def _given(data: Any, path: str, default: Any) -> Any:
    """The value at dotted ``path`` in the mapping as written (``output-dir`` for ``output_dir``)."""
    for part in path.split("."):
        keys = [k for k in data if _same_key(k, part)] if isinstance(data, Mapping) else []
        if not keys:
            return default
        data = data[keys[-1]]
    return data


def from_dict(cls: type[T], data: Any, prefix: str = "", source: str = "") -> T:
    """Build dataclass ``cls`` from a mapping; missing keys take defaults, unknown keys and ill-typed values
    raise a ConfigError naming the dotted key (``prefix`` + key), ``source`` and what is allowed."""
    where = f" in {source}" if source else ""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}'{where} must be a mapping, "
                          f"got {type(data).__name__}.")
    config = _dacite_config(cls)
    try:
        return dacite.from_dict(cls, config.type_hooks[cls](data), config=config)
    except _UnknownKey as e:
        section = prefix + (e.field_path + "." if e.field_path else "")
        under = f" under {section.rstrip('.')!r}" if section else ""
        raise ConfigError(f"unknown config key '{section}{e.key}'{where}. Valid keys{under}: "
                          f"{', '.join(e.valid)}.") from None
    except dacite.WrongTypeError as e:  # UnionMatchError too
        key, value = prefix + e.field_path, _given(data, e.field_path, e.value)
        if dataclasses.is_dataclass(e.field_type):
            raise ConfigError(f"config section '{key}'{where} must be a mapping, "
                              f"got {type(value).__name__}.") from None
        raise ConfigError(f"config key '{key}'{where} has value {value!r}; "
                          f"expected {_expected(e.field_type)}.") from None
    except dacite.MissingValueError as e:
        raise ConfigError(f"config key '{prefix}{e.field_path}'{where} is missing and has no default; "
                          f"set it.") from None


def to_dict(cfg: Any) -> dict:
    """Plain YAML-safe dict of a config (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


BASE_KEY = "_base_"


def merge_presets(base: Mapping, over: Mapping) -> dict:
    """``over`` on top of ``base``, section by section: mappings merge key by key (``output-dir`` and
    ``output_dir`` are one key; the spelling of ``over`` is kept; an empty section keeps the base's), anything
    else (numbers, lists) is replaced whole."""
    out = dict(base)
    for k, v in over.items():
        same = [b for b in out if _same_key(b, k)]
        prev = out[same[-1]] if same else None
        for b in same:
            del out[b]
        if isinstance(prev, Mapping) and v is None:  # an empty section (`eval:`) changes nothing
            v = {}
        out[k] = merge_presets(prev, v) if isinstance(prev, Mapping) and isinstance(v, Mapping) else v
    return out


def read_preset(path: str | os.PathLike, _chain: tuple = ()) -> tuple[Any, list[Path]]:
    """The YAML mapping of a preset with its ``_base_`` chain merged in, and the files read (this one first).

    A preset may start from another: ``_base_: ssl_digits.yaml`` (a path relative to the preset's own folder)
    takes every key of that preset, and the keys written here override it (:func:`merge_presets`)."""
    what = f"the _base_ of '{_chain[-1]}'" if _chain else "config file"
    path = existing(path, ConfigError, f"{what} '{path}' does not exist. "
                    + ("Fix the _base_ path (it is relative to the preset's folder)." if _chain else
                       "Pass --config with a YAML preset (see recipes/configs/)."))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    if not isinstance(data, Mapping) or BASE_KEY not in data:
        return data, [path]
    base = data[BASE_KEY]
    if not isinstance(base, str) or not base:
        raise ConfigError(f"config key '{BASE_KEY}' in {path} has value {base!r}; expected the path of another "
                          f"preset (relative to {path.parent}).")
    base_path = (path.parent / base).resolve()
    if base_path in {p.resolve() for p in (*_chain, path)}:
        loop = " -> ".join(str(p) for p in (*_chain, path, base_path))
        raise ConfigError(f"config file '{path}': its _base_ chain comes back to a file already read ({loop}). "
                          f"Remove the loop.")
    base_data, files = read_preset(base_path, (*_chain, path))
    if base_data is not None and not isinstance(base_data, Mapping):
        raise ConfigError(f"config section '<root>' in {base_path} must be a mapping, got {type(base_data).__name__}.")
    return merge_presets(base_data or {}, {k: v for k, v in data.items() if k != BASE_KEY}), [path, *files]


def load_yaml(cls: type[T], path: str | os.PathLike) -> T:
    data, files = read_preset(path)
    source = str(files[0]) + (f" (with its _base_ {', '.join(str(f) for f in files[1:])})" if files[1:] else "")
    return from_dict(cls, data, source=source)


def validate(cfg: Any, prefix: str = "") -> None:
    """Run each group's ``validate(prefix)`` hook, depth first."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            validate(v, prefix + f.name + ".")
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        hook(prefix)


def parse_config(cls: type[T], argv: Optional[Sequence[str]] = None, default_preset: str | os.PathLike | None = None,
                 description: Optional[str] = None) -> T:
    """Preset (``--config``, else ``default_preset``) + command-line overrides -> validated ``cls``."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    preset = known.config or (str(default_preset) if default_preset else None)
    base = load_yaml(cls, preset) if preset else cls()
    if preset and any(f.name == "config" for f in dataclasses.fields(cls)):
        base = dataclasses.replace(base, config=str(preset))
    cfg = tyro.cli(cls, default=base, args=argv, description=description,
                   config=(tyro.conf.FlagConversionOff,))
    validate(cfg)
    return cfg


def save_yaml(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config atomically."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two plain config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
