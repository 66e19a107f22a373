"""Timing shared by the benchmark scripts."""
from __future__ import annotations

import time


def time_steps(step, batches, n: int, device: str) -> list[float]:
    """Seconds of each of ``n`` calls ``step(*batch)``, cycling through ``batches``; CUDA is synchronised
    around every call so the figure is the step's, not the launch's."""
    import torch

    times = []
    for i in range(n):
        batch = batches[i % len(batches)]
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        step(*batch)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times
