"""Model summaries: parameters, FLOPs/MACs (``torch.utils.flop_counter``), per-layer output shapes and
activation memory, an estimate of training memory for a batch size, and (``receptive_field=True``) the
theoretical receptive field and stride of every ``feature_info`` stage (:mod:`visrep.zoo.receptive_field`).

Models named by string are built on the ``meta`` device: no weights are allocated and nothing is
computed, so even VGG-16 or ResNet-152 at 224x224 summarise instantly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

OPTIMIZER_STATE_BYTES = {"sgd": 0, "momentum": 4, "adam": 8, "adamw": 8}  # per fp32 parameter


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple
    params: int
    activation_bytes: int  # bytes of this module's output(s) for the summarised batch
    macs: int


@dataclass
class ModelSummary:
    name: str
    input_size: tuple
    batch_size: int
    params: int
    trainable_params: int
    macs: int  # multiply-accumulates for one forward of the batch
    activation_bytes: int  # leaf-module outputs kept for backward, whole batch
    param_bytes: int
    layers: list[LayerRow] = field(default_factory=list)
    optimizer: str = "adamw"
    receptive_fields: list[dict] = field(default_factory=list)  # per feature_info stage, when asked

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def training_memory_bytes(self, batch_size: int | None = None, optimizer: str | None = None) -> int:
        """Weights + gradients + optimizer state + saved activations (fp32, no activation checkpointing)."""
        b = batch_size or self.batch_size
        opt = OPTIMIZER_STATE_BYTES[(optimizer or self.optimizer).lower()]
        act = self.activation_bytes / self.batch_size * b
        return int(self.param_bytes * 2 + self.trainable_params * opt + act)

    def to_text(self, max_rows: int | None = None) -> str:
        return format_summary(self, max_rows)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n}"


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _shape(out) -> tuple:
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    if isinstance(out, (list, tuple)) and out and isinstance(out[0], torch.Tensor):
        return tuple(tuple(o.shape) for o in out)
    return ()


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (list, tuple)):
        return sum(_nbytes(o) for o in out)
    if isinstance(out, dict):
        return sum(_nbytes(o) for o in out.values())
    return 0


def summarize(model: nn.Module | str, input_size=(3, 224, 224), batch_size: int = 1, depth: int = 2,
              optimizer: str = "adamw", receptive_field: bool = False, **create_kwargs) -> ModelSummary:
    """Summarise a model (or a zoo name, built on the meta device) for ``batch_size`` inputs of ``input_size``.

    ``layers`` lists modules up to ``depth`` levels deep (``-1``: leaves only) with output shape,
    parameters, output (activation) bytes and MACs. ``activation_bytes`` sums the outputs of leaf
    modules, a standard upper-bound-ish estimate of what autograd saves for backward.
    ``receptive_field``: also measure each stage's receptive field and stride (a real forward and backward on
    CPU, see :func:`visrep.zoo.receptive_field.receptive_fields`; a name is then also built off the meta device).
    """
    name = model if isinstance(model, str) else type(model).__name__
    rfs: list[dict] = []
    if receptive_field:
        from .receptive_field import receptive_fields
        if isinstance(model, str):
            from .registry import create_backbone
            rfs = receptive_fields(create_backbone(model, features_only=True, **create_kwargs), input_size)
        elif any(p.is_meta for p in model.parameters()):
            raise ValueError("receptive_field=True needs real weights: pass a model built off the meta device "
                             "(or its name)")
        else:
            rfs = receptive_fields(model, input_size)
    if isinstance(model, str):
        from .registry import create_backbone
        create_kwargs.setdefault("num_classes", 1000)
        with torch.device("meta"):
            model = create_backbone(model, **create_kwargs)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.zeros(batch_size, *input_size, device=device)

    named = dict(model.named_modules())
    outputs: dict[str, object] = {}
    leaf_bytes: dict[str, int] = {}
    hooks = []
    for mname, mod in named.items():
        if not mname:
            continue
        is_leaf = next(mod.children(), None) is None
        level = mname.count(".") + 1
        if not is_leaf and depth >= 0 and level > depth:
            continue

        def hook(_m, _i, out, mname=mname, is_leaf=is_leaf):
            if mname not in outputs:  # first call only (modules reused in a forward count once)
                outputs[mname] = out
            if is_leaf:
                leaf_bytes[mname] = leaf_bytes.get(mname, 0) + _nbytes(out)
        hooks.append(mod.register_forward_hook(hook))

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, depth=None)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    flop_counts = counter.get_flop_counts()
    root = type(model).__name__

    def module_macs(mname: str) -> int:
        return int(sum(flop_counts.get(f"{root}.{mname}", {}).values()) // 2)

    rows = []
    for mname, out in outputs.items():
        level = mname.count(".") + 1
        is_leaf = next(named[mname].children(), None) is None
        if depth >= 0 and level > depth:
            continue
        if depth < 0 and not is_leaf or isinstance(named[mname], nn.Identity):
            continue
        rows.append(LayerRow(mname, type(named[mname]).__name__, _shape(out),
                             sum(p.numel() for p in named[mname].parameters()), _nbytes(out), module_macs(mname)))

    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return ModelSummary(name, tuple(input_size), batch_size, params, trainable,
                        int(counter.get_total_flops() // 2), sum(leaf_bytes.values()), param_bytes, rows, optimizer, rfs)


def format_summary(s: ModelSummary, max_rows: int | None = None) -> str:
    """A plain-text table (what ``visrep zoo summary`` prints)."""
    lines = [f"{s.name}  input {s.batch_size}x{'x'.join(map(str, s.input_size))}", ""]
    header = f"{'layer':<34} {'type':<22} {'output shape':<24} {'params':>10} {'MACs':>10} {'act. mem':>11}"
    lines += [header, "-" * len(header)]
    rows = s.layers if max_rows is None else s.layers[:max_rows]
    for r in rows:
        shape = "x".join(map(str, r.output_shape)) if r.output_shape and isinstance(r.output_shape[0], int) \
            else str(r.output_shape)
        lines.append(f"{r.name[:34]:<34} {r.kind[:22]:<22} {shape[:24]:<24} {_fmt_count(r.params):>10} "
                     f"{_fmt_count(r.macs):>10} {_fmt_bytes(r.activation_bytes):>11}")
    if max_rows is not None and len(s.layers) > max_rows:
        lines.append(f"... {len(s.layers) - max_rows} more rows")
    lines += ["-" * len(header),
              f"parameters:            {s.params:,} ({s.params / 1e6:.1f}M; trainable {s.trainable_params:,})",
              f"MACs (forward):        {s.macs / s.batch_size / 1e9:.2f} G per image ({s.flops / s.batch_size / 1e9:.2f} "
              f"GFLOPs); {s.macs / 1e9:.2f} G for the batch of {s.batch_size}",
              f"training FLOPs/step:   ~{3 * s.flops / 1e9:.2f} G (forward + backward ~ 3x forward)",
              f"parameter memory:      {_fmt_bytes(s.param_bytes)}",
              f"activation memory:     {_fmt_bytes(s.activation_bytes)} (batch {s.batch_size}, leaf outputs)",
              f"est. training memory:  {_fmt_bytes(s.training_memory_bytes())} "
              f"(weights + grads + {s.optimizer} state + activations, fp32, batch {s.batch_size})"]
    if s.receptive_fields:
        lines += ["", format_receptive_fields(s.receptive_fields)]
    return "\n".join(lines)


def format_receptive_fields(rfs: list[dict]) -> str:
    """The per-stage table: module, reduction, measured stride, receptive field (``>=`` when clipped)."""
    header = f"{'feature stage':<24} {'reduction':>9} {'stride':>8} {'receptive field':>18}"
    lines = [header, "-" * len(header)]

    def pair(p):
        return "?" if p[0] is None else (f"{p[0]}" if p[0] == p[1] else f"{p[0]}x{p[1]}")
    for r in rfs:
        rf = f"{r['rf'][0]}x{r['rf'][1]}"
        rf = f">={rf} (clipped)" if r["clipped"] else rf
        lines.append(f"{r['module'][:24]:<24} {r['reduction'] if r['reduction'] is not None else '?':>9} "
                     f"{pair(r['stride']):>8} {rf:>18}")
    lines.append("receptive field: input pixels with a path to one unit (theoretical RF, measured by gradient "
                 "support); stride: input pixels between neighbouring units")
    return "\n".join(lines)
