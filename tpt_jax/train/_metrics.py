"""Where metrics go: one JSON line per record, TensorBoard scalars, and the console."""

from __future__ import annotations

import json
import os

from tpt_jax.config import LoggingConfig


class MetricsWriter:
    """Writes scalar metrics for a step to `metrics.jsonl` and `tensorboard/` in the run folder.

    Only the process that should write (process 0) passes enabled=True; the others no-op.
    """

    def __init__(self, run_dir: str, cfg: LoggingConfig, enabled: bool = True):
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
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

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


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
