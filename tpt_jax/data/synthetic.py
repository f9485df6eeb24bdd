"""A built-in, learnable token stream in the packed batch format, for smoke tests and benchmarks.

Each document is an arithmetic progression modulo the vocabulary (random start and stride,
random length) ended by EOS; documents are packed back to back into rows. The batch of a step
is a pure function of (seed, step), so the data position is the step number and a resume is
exact on any number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

EOS_ID = 1
FIRST_TOKEN = 2  # ids 0 (padding) and 1 (EOS) never appear inside a document


def global_batch(
    seed: int, step: int, batch: int, seq_len: int, vocab: int
) -> dict[str, np.ndarray]:
    """The whole [batch, seq_len] batch of `step` (DESIGN.md format)."""
    rng = np.random.default_rng([seed, step])
    out = {
        "inputs": np.zeros((batch, seq_len), np.int32),
        "targets": np.zeros((batch, seq_len), np.int32),
        "segment_ids": np.zeros((batch, seq_len), np.int32),
        "positions": np.zeros((batch, seq_len), np.int32),
        "loss_weights": np.zeros((batch, seq_len), np.float32),
    }
    span = vocab - FIRST_TOKEN
    for row in range(batch):
        start, segment = 0, 1
        while seq_len - start >= 4:
            length = int(rng.integers(4, max(5, seq_len // 2)))
            length = min(length, seq_len - start)
            first, stride = int(rng.integers(span)), int(rng.integers(1, 8))
            doc = FIRST_TOKEN + (first + stride * np.arange(length)) % span
            doc = np.append(doc, EOS_ID)  # tokens + EOS; the row holds length inputs/targets
            end = start + length
            out["inputs"][row, start:end] = doc[:-1]
            out["targets"][row, start:end] = doc[1:]
            out["segment_ids"][row, start:end] = segment
            out["positions"][row, start:end] = np.arange(length)
            out["loss_weights"][row, start:end] = 1.0
            start, segment = end, segment + 1
    return out


def batches(
    seed: int,
    start_step: int,
    batch: int,
    seq_len: int,
    vocab: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every global batch from `start_step` on."""
    rows = batch // process_count
    step = start_step
    while True:
        full = global_batch(seed, step, batch, seq_len, vocab)
        yield {k: v[process_index * rows : (process_index + 1) * rows] for k, v in full.items()}
        step += 1
