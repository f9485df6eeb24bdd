"""Preemption: SIGTERM (what a TPU VM, Kubernetes or a scheduler sends before taking a machine
away) asks the run to stop at the next step boundary, after saving a checkpoint.

One process, or processes that stop independently (thinking shards): a signal handler sets a
flag. Processes of one SPMD program (training) must all stop at the SAME step, so there the
decision is JAX's preemption sync point (`multihost_utils.reached_preemption_sync_point`), which
the coordination service raises on all processes once any of them got the signal.
"""

from __future__ import annotations

import signal
import threading

import jax


class PreemptionWatch:
    def __init__(self, collective: bool = True):
        self._flag = threading.Event()
        self._previous = None
        self._multi = collective and jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._flag.set()

    def stop_requested(self, step: int) -> bool:
        """Whether to save and stop after `step` (call it at every step, on every process)."""
        if self._multi:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
