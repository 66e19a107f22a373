"""DeepSpeed without its CPU inference kernel, in every test process: ``tests/sitecustomize.py`` calls
:func:`install` at the start-up of every Python process the tests start (``tests/`` is on their PYTHONPATH,
``helpers._base_env``); ``tests/conftest.py`` calls it in the pytest processes.

DeepSpeed's CPU backend JIT-compiles a C++ shared-memory all-reduce kernel (``deepspeed_shm_comm``, with
g++ and ninja) the first time a process group starts on a machine, and probes every other op's compiler
needs on the way. On a fresh machine -- every CI run -- that took 110 s of the first DeepSpeed test,
while the other DeepSpeed tests waited on its lock. The kernel serves only ``inference_all_reduce``,
which training never calls (ZeRO's collectives go through ``torch.distributed``), so the tests start
DeepSpeed without it: the same code path as on a machine where the kernel cannot be built."""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys

TARGET = "deepspeed.comm.torch"


class _SkipShmKernel(importlib.abc.MetaPathFinder):
    """After ``deepspeed.comm.torch`` is imported, its ``build_shm_op`` returns None (as DeepSpeed's own does
    when the op is not compatible)."""

    def find_spec(self, name, path, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            module.build_shm_op = lambda: None

        spec.loader.exec_module = exec_and_patch
        return spec


def install() -> None:
    if not any(isinstance(f, _SkipShmKernel) for f in sys.meta_path):
        sys.meta_path.insert(0, _SkipShmKernel())
