"""Where metrics go: one JSON line per record, TensorBoard scalars, and the console."""

from __future__ import annotations

import json
import os
import tempfile
import time

from tpt_jax import storage
from tpt_jax.config import LoggingConfig

SYNC_SECONDS = 30.0


class MetricsWriter:
    """Writes scalar metrics for a step to `metrics.jsonl` and `tensorboard/` in the run folder.

    Only the process that should write (process 0) passes enabled=True; the others no-op. A run
    folder on gs:// is written through a local staging folder mirrored to it every
    SYNC_SECONDS and at close (object stores cannot append); a resumed run continues the
    mirrored metrics.jsonl.
    """

    def __init__(self, run_dir: str, cfg: LoggingConfig, enabled: bool = True):
        self._jsonl = None
        self._tb = None
        self._remote = None
        if not enabled:
            return
        if storage.is_remote(run_dir):
            self._remote, self._synced = run_dir, time.monotonic()
            run_dir = tempfile.mkdtemp(prefix="tpt-metrics-")
            previous = os.path.join(self._remote, "metrics.jsonl")
            if cfg.jsonl and storage.exists(previous):
                storage.write_bytes(
                    os.path.join(run_dir, "metrics.jsonl"), storage.read_text(previous).encode()
                )
        self._local = run_dir
        os.makedirs(run_dir, exist_ok=True)
        if cfg.jsonl:
            self._jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")  # noqa: SIM115 (closed in close())
        if cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), flush_secs=10)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(key, value, step)
        if self._remote and time.monotonic() - self._synced > SYNC_SECONDS:
            self._sync()

    def _sync(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        for root, _, files in os.walk(self._local):
            for name in files:
                local = os.path.join(root, name)
                relative = os.path.relpath(local, self._local)
                with open(local, "rb") as f:
                    storage.write_bytes(os.path.join(self._remote, relative), f.read())
        self._synced = time.monotonic()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._remote:
            self._sync()


def format_metrics(metrics: dict[str, float]) -> str:
    parts = []
    for key, value in metrics.items():
        if key in ("tokens_per_sec",):
            parts.append(f"{key}={value:,.0f}")
        elif abs(value) >= 1e4 or (0 < abs(value) < 1e-3):
            parts.append(f"{key}={value:.3e}")
        else:
            parts.append(f"{key}={value:.4f}")
    return " ".join(parts)
