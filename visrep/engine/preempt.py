"""Stop requests from the scheduler: SIGTERM (SLURM, Kubernetes, cloud spot instances) and SIGUSR1.

The handler only records the signal; the training loop reads the flag once per optimizer step, in
the same collective as its finite-loss check, so every rank agrees to stop after the same step, writes
one checkpoint and exits with :data:`visrep.errors.EXIT_REQUEUE` ("requeue me").
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Records the first stop signal received while installed (a context manager)."""

    def __init__(self, signals: tuple = STOP_SIGNALS):
        self.signals = signals
        self.signum: Optional[int] = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()
