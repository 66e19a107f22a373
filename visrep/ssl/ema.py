"""The target network's exponential moving average, on a cosine momentum schedule counted in
optimizer steps."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from visrep.engine.distributed import local_shard, whole_copy_beside_shard
from visrep.engine.optim import half_cosine

LOW_PRECISION = (torch.bfloat16, torch.float16)


def cosine_tau(step: int, total_steps: int, base_tau: float = 0.996, final_tau: float = 1.0) -> float:
    """BYOL's momentum at optimizer step ``k`` of ``K``:

        tau_k = final - (final - base) * (cos(pi * k / K) + 1) / 2

    which with ``final = 1`` is the paper's ``1 - (1 - tau_base) (cos(pi k / K) + 1) / 2``: ``base``
    at k = 0, rising to ``final`` at k = K (and held there after K).
    Paper: Grill et al. 2020, arXiv:2006.07733, Sec. 3.2 / Appendix J.
    """
    return half_cosine(step, total_steps, base_tau, final_tau)


class EMAUpdater:
    """``target <- tau * target + (1 - tau) * online``, once per optimizer step.

    Call ``update`` only when the optimizer really stepped (``accelerator.sync_gradients``): ``step``
    then counts optimizer steps, so the schedule is the same with any gradient accumulation, and it is
    saved (``state_dict``) so a resumed run continues it exactly.

    The update is elementwise and uses fused multi-tensor ops (one ``torch._foreach_lerp_`` over all
    parameters). Each process updates the tensors it holds: with DDP the full replicas (identical on
    every rank, because the online weights are, and the same ``tau`` is used), with DeepSpeed ZeRO-3 its
    own shard of each parameter (``visrep.engine.distributed.local_shard``) -- online and target are partitioned the same way
    when they are parameters of one module prepared together (``visrep.ssl.BYOL``), so shard i of the
    target lines up with shard i of the online weights and no gather is needed. Mismatched local sizes
    raise instead of silently updating the wrong elements.
    """

    def __init__(self, total_steps: int, base_tau: float = 0.996, final_tau: float = 1.0):
        if not 0.0 <= base_tau <= final_tau <= 1.0:
            raise ValueError(f"need 0 <= base_tau <= final_tau <= 1, got base_tau={base_tau}, final_tau={final_tau}")
        self.total_steps = int(total_steps)
        self.base_tau = float(base_tau)
        self.final_tau = float(final_tau)
        self.step = 0
        self.last_tau = self.tau
        self._master: list | None = None  # fp32 copies of low-precision target tensors (this rank's part)

    @property
    def tau(self) -> float:
        """The momentum the next update will use."""
        return cosine_tau(self.step, self.total_steps, self.base_tau, self.final_tau)

    @torch.no_grad()
    def update(self, online: Iterable[torch.Tensor], target: Iterable[torch.Tensor]) -> float:
        """One EMA step with the current ``tau``; advances ``step``. Returns the ``tau`` used."""
        online, target = list(online), list(target)
        src = [local_shard(p) for p in online]
        dst = [local_shard(p) for p in target]
        _check_pairs(src, dst)
        # ZeRO-3 keeps small ("persistent") parameters whole in ``.data`` besides their shard, and the
        # forward reads ``.data``: update that copy too (the optimizer re-gathers the online one after
        # each step), or the target would never move.
        for po, pt in zip(online, target):
            if whole_copy_beside_shard(pt) and pt.data.numel() == po.data.numel():
                src.append(po.data)
                dst.append(pt.data)
        tau = self.tau
        if self._master is None:
            # a low-precision target (DeepSpeed bf16/fp16 casts it with the engine) gets an fp32 master
            # copy: at tau = 0.996 one step moves a weight by less than bf16 can represent
            self._master = [d.detach().float().clone() if d.dtype in LOW_PRECISION else None for d in dst]
        elif len(self._master) != len(dst):
            raise ValueError(f"the EMA holds {len(self._master)} master tensors but the target has {len(dst)}")
        else:  # restored from a checkpoint: onto the target's device
            self._master = [m if m is None or m.device == d.device else m.to(d.device) for m, d in zip(self._master, dst)]
        groups: dict[tuple, tuple[list, list]] = {}
        low: tuple[list, list, list] = ([], [], [])
        for s, d, m in zip(src, dst, self._master):
            if d.numel() == 0:
                continue
            if m is not None:
                low[0].append(m)
                low[1].append(s.to(device=m.device, dtype=torch.float32))
                low[2].append(d)
                continue
            s = s if s.dtype == d.dtype and s.device == d.device else s.to(device=d.device, dtype=d.dtype)
            g = groups.setdefault((d.device, d.dtype), ([], []))
            g[0].append(d)
            g[1].append(s)
        for d_list, s_list in groups.values():
            # lerp(d, s, w) = d + w (s - d) = tau d + (1 - tau) s with w = 1 - tau
            torch._foreach_lerp_(d_list, s_list, 1.0 - tau)
        if low[0]:
            torch._foreach_lerp_(low[0], low[1], 1.0 - tau)  # in fp32, then rounded into the target
            torch._foreach_copy_(low[2], low[0])
        self.last_tau = tau
        self.step += 1
        return tau

    # each rank holds the master copy of its own part (under ZeRO-3 its shards): saved per rank
    rank_local = True

    def state_dict(self) -> dict:
        out = {"step": self.step, "total_steps": self.total_steps, "base_tau": self.base_tau,
               "final_tau": self.final_tau, "last_tau": self.last_tau}
        if self._master is not None:
            out["master"] = [None if m is None else m.detach().cpu() for m in self._master]
        return out

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.last_tau = float(state.get("last_tau", self.tau))
        master = state.get("master")
        self._master = None if master is None else [None if m is None else m.float() for m in master]
        for key in ("total_steps", "base_tau", "final_tau"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(f"EMA state from the checkpoint has {key}={state[key]} but this run has "
                                 f"{getattr(self, key)}; resume with the same schedule and number of processes.")


def _check_pairs(src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor]) -> None:
    if len(src) != len(dst):
        raise ValueError(f"online has {len(src)} parameters, target {len(dst)}")
    for i, (s, d) in enumerate(zip(src, dst)):
        if s.shape != d.shape:
            raise ValueError(f"parameter {i}: online local tensor {tuple(s.shape)} vs target {tuple(d.shape)}; "
                             f"under ZeRO-3 both networks must be partitioned alike (prepare them as one module).")
