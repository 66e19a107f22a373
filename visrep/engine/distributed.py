"""Ranks, shards and gathers: the one module that speaks of process groups and of DeepSpeed's parameter
partitions. Methods ask it for what they need by name (a batch gathered from every rank, a whole
parameter, this rank's shard); none of them reads an engine's private attributes.

Gathers. :func:`all_gather_with_grad` concatenates a tensor from every rank in rank order; its backward
gives each rank the sum over ranks of the gradient w.r.t. its own rows (a reduce-scatter), so a rank's
features receive the gradient of every rank's loss terms, and DDP's average then equals the gradient of
the single-process loss on the concatenated batch. ``accelerator.gather`` carries no gradient and would
drop every cross-rank term. With ``same_size=True`` the caller promises that every rank holds the same
number of rows (loaders that drop the last incomplete batch): no size is exchanged, so nothing is read
on the host. Without it the row counts are exchanged first (one small all-gather and one host read).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from visrep.checks import ConfigError


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """Whether a process group with more than one rank is running."""
    return dist_info()[1] > 1


# ----------------------------------------------------------------------------------------------
# Row gathers
# ----------------------------------------------------------------------------------------------
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """``cat`` of ``x`` (the same shape on every rank) from all ranks along dim 0, in rank order; no
    gradient. ``x`` itself without a process group."""
    _, world = dist_info()
    if world == 1:
        return x
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous())
    return out


def reduce_scatter_rows(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks of ``x`` (``W B x ...``, the same shape everywhere); this rank's ``B`` rows. NCCL has
    a native reduce-scatter; on gloo an all-to-all moving each slice to its owner, then a local sum,
    sends half the bytes of an all-reduce (and is several times faster on CPU)."""
    _, world = dist_info()
    if world == 1:
        return x
    n = x.shape[0] // world
    if dist.get_backend() == "nccl":
        out = x.new_empty((n, *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x.contiguous())
        return out
    parts = torch.empty_like(x)
    dist.all_to_all_single(parts, x.contiguous())
    return parts.view(world, n, *x.shape[1:]).sum(0)


def row_counts(x: torch.Tensor) -> list[int]:
    """Every rank's ``x.shape[0]``, in rank order (one small all-gather and a host read)."""
    _, world = dist_info()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = torch.empty(world, device=x.device, dtype=torch.long)
    dist.all_gather_into_tensor(sizes, n)
    return sizes.tolist()


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    if x.shape[0] == rows:
        return x.contiguous()
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))]).contiguous()


def _gather_uneven(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """:func:`gather_rows` for ranks holding ``sizes`` rows: padded to the largest, gathered, unpadded."""
    rows = max(sizes)
    padded = gather_rows(_pad_rows(x, rows)).view(len(sizes), rows, *x.shape[1:])
    return torch.cat([padded[r, :s] for r, s in enumerate(sizes)])


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes):
        ctx.n, ctx.sizes = x.shape[0], sizes
        return gather_rows(x) if sizes is None else _gather_uneven(x, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.sizes is None:
            return reduce_scatter_rows(grad), None
        rows = max(ctx.sizes)
        padded = torch.cat([_pad_rows(g, rows) for g in grad.split(ctx.sizes)])
        return reduce_scatter_rows(padded)[:ctx.n], None


def all_gather_with_grad(x: torch.Tensor, same_size: bool = False) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, in rank order, with a gradient that flows back to
    every rank's rows (see the module docstring). Ranks may hold different numbers of rows unless
    ``same_size`` (then no host read). The identity without a process group."""
    _, world = dist_info()
    if world == 1:
        return x
    sizes = None if same_size else row_counts(x)
    if sizes is not None and len(set(sizes)) == 1:
        sizes = None
    return _AllGatherWithGrad.apply(x, sizes)


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor):
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """The sum of ``x`` over ranks, on every rank, with a gradient: the backward sums the ranks' gradients
    of the result, so each rank's ``x`` receives the gradient of every rank's loss (the adjoint of the sum
    for the total over ranks, as :func:`all_gather_with_grad`'s reduce-scatter). For a statistic whose
    rows are shared out across ranks, e.g. one Gram-matrix block each. The identity without a process
    group."""
    if dist_info()[1] == 1:
        return x
    return _AllReduceWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, same_size: bool = True) -> torch.Tensor:
    """As :func:`all_gather_with_grad`, for constants (a frozen teacher's features)."""
    _, world = dist_info()
    if world == 1:
        return x
    return gather_rows(x) if same_size else _gather_uneven(x, row_counts(x))


# ----------------------------------------------------------------------------------------------
# The engine: which one, and its configuration
# ----------------------------------------------------------------------------------------------
DEEPSPEED_MAX_BUCKET = 500_000_000  # DeepSpeed's default bucket (elements), sized for billion-parameter models


def deepspeed_plugin(accelerator):
    """Accelerate's DeepSpeed plugin when the run is under DeepSpeed, else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return getattr(accelerator.state, "deepspeed_plugin", None)


def zero_stage(accelerator) -> int:
    """DeepSpeed ZeRO stage of the run (0: not under DeepSpeed)."""
    plugin = deepspeed_plugin(accelerator)
    return int(plugin.zero_stage) if plugin is not None else 0


def is_deepspeed(accelerator) -> bool:
    return deepspeed_plugin(accelerator) is not None


def is_zero3(accelerator) -> bool:
    """Whether parameters are partitioned across ranks (DeepSpeed ZeRO-3)."""
    return zero_stage(accelerator) == 3


def deepspeed_on_cpu() -> bool:
    """DeepSpeed launched on a host without CUDA (the CPU test path: gloo)."""
    import os

    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" and not torch.cuda.is_available()


def engine_precision(accelerator) -> torch.dtype | None:
    """The dtype a DeepSpeed engine computes in (bf16 / fp16), or None (no DeepSpeed, or fp32)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    cfg = plugin.deepspeed_config
    for key, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        enabled = (cfg.get(key) or {}).get("enabled", False)
        if enabled == "auto":
            enabled = accelerator.mixed_precision == key
        if enabled is True:
            return dtype
    return None


def size_buckets(zero: dict, n_params: int) -> dict:
    """Fill the ZeRO communication buckets left unset (or ``"auto"``) from the model's size: DeepSpeed's
    default of 5e8 elements reserves GBs per GPU even for a ResNet-20, while a bucket as large as the
    model already sends it in one piece. Explicit sizes are kept."""
    mib = 2 ** 20  # whole multiples of 2^20 elements satisfy every alignment DeepSpeed asserts (NCCL's too)
    size = int(min(DEEPSPEED_MAX_BUCKET, max(1, -(-n_params // mib)) * mib))
    keys = {"reduce_bucket_size": size, "allgather_bucket_size": size}
    if int(zero.get("stage", 0)) == 3:
        keys = {"reduce_bucket_size": size, "stage3_prefetch_bucket_size": int(min(50_000_000, size))}
    for key, value in keys.items():
        if zero.get(key) in (None, "auto"):
            zero[key] = value
    return zero


def configure_engine(accelerator, modules, grad_clip: float | None) -> None:
    """Before ``accelerator.prepare`` under DeepSpeed: the recipe's gradient clipping (Accelerate would
    fill DeepSpeed's "auto" with 1.0 and clip where DDP does not; the engine clips, and
    ``accelerator.clip_grad_norm_`` is a no-op) and buckets sized from the trainable parameters."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    plugin.deepspeed_config["gradient_clipping"] = float(grad_clip or 0.0)
    n = sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)
    size_buckets(plugin.deepspeed_config.setdefault("zero_optimization", {}), n)


# ----------------------------------------------------------------------------------------------
# Capabilities: what a method needs that an engine cannot give, refused in one place
# ----------------------------------------------------------------------------------------------
CAPABILITIES = {
    # name: (DeepSpeed ZeRO stages that lack it -- 0 is DeepSpeed without ZeRO, not DDP --, why)
    "per_layer_optimizer": ((1, 2, 3), "DeepSpeed ZeRO hands the optimizer flattened partitions, so per-layer "
                                       "quantities (trust ratios) would be computed over shards"),
    "gradient_surgery": ((0, 1, 2, 3), "under DeepSpeed the engine steps inside backward (and its flat ZeRO "
                                    "partitions would still decay and move masked weights), so gradients cannot "
                                    "be edited between backward and the optimizer step"),
    "whole_parameters": ((3,), "DeepSpeed ZeRO-3 holds only this rank's shard of each parameter outside the "
                               "model's forward"),
    "manual_backward": ((0, 1, 2, 3), "a DeepSpeed engine must run its own backward (autograd.backward on its "
                                   "module's outputs skips the engine's gradient handling)"),
}


def require(accelerator, capability: str, feature: str, instead: str) -> None:
    """Refuse ``feature`` (what the config asked for, naming its key) before any training when the run's
    engine lacks ``capability`` (:data:`CAPABILITIES`); ``instead`` says what to use."""
    stages, why = CAPABILITIES[capability]
    stage = zero_stage(accelerator)
    if is_deepspeed(accelerator) and stage in stages:
        raise ConfigError(f"{feature} cannot run under DeepSpeed ZeRO-{stage}: {why}. {instead}")


# ----------------------------------------------------------------------------------------------
# Parameters: whole, local shard, full size, master copies
# ----------------------------------------------------------------------------------------------
def is_partitioned(p: torch.Tensor) -> bool:
    """Whether ``p`` is a DeepSpeed ZeRO-3 parameter (its data lives in per-rank partitions)."""
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter, also when ZeRO-3 partitions it."""
    return int(getattr(p, "ds_numel", p.numel()))


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Parameter count (full sizes under ZeRO-3)."""
    return sum(full_numel(p) for p in model.parameters() if p.requires_grad or not trainable_only)


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The part of ``p`` this process holds: its ZeRO-3 partition (a flat shard) when the parameter is
    partitioned, else the full tensor (DDP / one process)."""
    shard = getattr(p, "ds_tensor", None)
    return shard if shard is not None else p.data


def whole_copy_beside_shard(p: torch.Tensor) -> bool:
    """ZeRO-3 keeps small ("persistent") parameters whole in ``.data`` besides their shard, and the
    forward reads ``.data``: whether ``p`` is one of them."""
    return hasattr(p, "ds_tensor") and p.data.numel() == full_numel(p)


def gathered(params, modifier_rank: int | None = None):
    """A context in which ZeRO-3-partitioned ``params`` are whole on every rank (what ``modifier_rank``
    writes there is kept when they are re-partitioned); nothing for parameters that are not partitioned."""
    import contextlib

    sharded = [p for p in params if is_partitioned(p)]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=modifier_rank)


@torch.no_grad()
def parameter_value(p: torch.Tensor) -> torch.Tensor:
    """A detached copy of the whole parameter, read outside ``forward``. Call on every rank: under ZeRO-3
    a partitioned (non-persistent) parameter is empty between forwards and is gathered for the read."""
    if getattr(getattr(p, "ds_status", None), "name", None) == "NOT_AVAILABLE":
        with gathered([p]):
            return p.detach().clone()
    return p.detach().clone()


@torch.no_grad()
def clamp_parameter_(p: torch.Tensor, low: float, high: float) -> None:
    """Clamp a parameter in place and, under DeepSpeed, the optimizer's fp32 master copy too (or the next
    step would undo the clamp). Elementwise, so under ZeRO-3 each rank clamps its own partition (a rank's
    share of a small parameter may be empty)."""
    p.clamp_(low, high)
    if is_partitioned(p):  # ZeRO-3
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        local = safe_get_local_fp32_param(p)
        if local is not None and local.numel():
            safe_set_local_fp32_param(p, local.clamp(low, high))
        if getattr(p, "ds_tensor", None) is not None and p.ds_tensor.numel():
            p.ds_tensor.clamp_(low, high)
    elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2: each rank holds a fragment; set_full writes its part
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        full = safe_get_full_fp32_param(p)
        if full is not None:
            safe_set_full_fp32_param(p, full.clamp(low, high))


def full_fp32_parameters(module: torch.nn.Module) -> dict:
    """Every parameter of ``module`` by name, whole and in fp32: under DeepSpeed bf16/fp16 the optimizer's
    master copies (gathered from every rank's partition -- a collective, so call on every rank), for
    frozen parameters their own values."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        out[name] = full if full is not None else param.detach().float()
    return out


# ----------------------------------------------------------------------------------------------
# Buffers and evaluation
# ----------------------------------------------------------------------------------------------
def broadcast_buffers(model: torch.nn.Module, accelerator) -> None:
    """Under DeepSpeed, give every rank rank 0's buffers (BatchNorm running statistics) before it scores
    its shard. DDP broadcasts them from rank 0 at every forward; DeepSpeed never does, so each rank's
    statistics follow its own batches only, and a split scored across ranks would not be scored with
    the model that is exported (rank 0's). Nothing under DDP or in one process."""
    if not is_deepspeed(accelerator) or accelerator.num_processes < 2:
        return
    for buf in accelerator.unwrap_model(model).buffers():
        dist.broadcast(buf.data, src=0)


def release_gathered(model: torch.nn.Module) -> None:
    """After forwards outside training, under DeepSpeed ZeRO-3 (``model`` the engine): wait for the
    parameters still being fetched -- prefetched along the module order recorded in training, which an
    evaluation forward need not follow -- and release them all, so that code gathering parameters next
    (best-epoch copies, exports) finds none in flight. Nothing otherwise."""
    partitioned = getattr(model, "zero_optimization_partition_weights", None)
    if callable(partitioned) and partitioned():
        # what the engine's empty_partition_cache() does, without its gc.collect() (a pass over the whole
        # heap at every evaluation: a third of a second in a small CPU process, more in a large one)
        release = getattr(getattr(model, "optimizer", None), "empty_partition_cache", None)
        if callable(release):
            release()


def deepspeed_config_template(stage: int, offload: str | None = None, pin_memory: bool = True) -> dict:
    """The DeepSpeed JSON a launch writes for ZeRO ``stage`` (1-3): batch sizes, accumulation, clipping
    and precision left "auto" for Accelerate to fill from the run; communication buckets "auto" for
    :func:`configure_engine` to size from the model (Accelerate alone would fill them from a transformers
    ``model.config`` only); ``offload`` "optimizer" or "params" to the CPU."""
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True}
    zero.update({"reduce_bucket_size": "auto"} if stage == 3 else {"reduce_bucket_size": "auto",
                                                                   "allgather_bucket_size": "auto"})
    if stage == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": True, "stage3_prefetch_bucket_size": "auto",
                     "stage3_param_persistence_threshold": 100_000})
    if offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin_memory}
    if offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin_memory}
    cfg = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    if offload:
        cfg["zero_force_ds_cpu_optimizer"] = False  # keep the recipe's own torch optimizer
    return cfg
