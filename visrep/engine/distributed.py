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


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes):
        rank, world = dist_info()
        ctx.rank, ctx.n, ctx.sizes = rank, x.shape[0], sizes
        if sizes is None:
            return gather_rows(x)
        rows = max(sizes)
        padded = gather_rows(_pad_rows(x, rows)).view(world, rows, *x.shape[1:])
        return torch.cat([padded[r, :s] for r, s in enumerate(sizes)])

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


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor, same_size: bool = True) -> torch.Tensor:
    """As :func:`all_gather_with_grad`, for constants (a frozen teacher's features)."""
    _, world = dist_info()
    if world == 1:
        return x
    if same_size:
        return gather_rows(x)
    sizes = row_counts(x)
    rows = max(sizes)
    padded = gather_rows(_pad_rows(x, rows)).view(world, rows, *x.shape[1:])
    return torch.cat([padded[r, :s] for r, s in enumerate(sizes)])
