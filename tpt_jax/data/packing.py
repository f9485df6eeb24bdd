"""Packing tokenized samples into fixed-length rows (pure numpy).

Convention (seqio's decoder-only format): a sample's tokens (EOS included) are the targets of
its segment; the inputs are the targets shifted right by one, starting from 0. A sample longer
than the row continues in the next row as a new segment (positions restart at 0) whose first
input is the previous token, so concatenating the targets of a sample's segments reproduces it
exactly. The Packer yields int32 [3, seq_len] rows: inputs, targets, segment_ids (0 = padding);
positions and loss weights follow from the segment ids. On disk (rows.py) a row keeps only its
tokens, its segment starts and its length, since only a row's first segment can be a
continuation: every other segment's first input is 0.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np


@dataclasses.dataclass
class PackStats:
    samples: int = 0
    rows: int = 0
    tokens: int = 0  # target tokens written (loss-bearing)
    truncated_tokens: int = 0  # tokens dropped by long_docs=truncate
    split_samples: int = 0  # samples that continued into another row


class Packer:
    """Greedy in-order packer. A sample that fits in a row never straddles two rows: if it does
    not fit in the space left, the row is closed. A sample longer than a row starts in the space
    left and continues row after row ("split"), or keeps only its first seq_len tokens ("truncate").
    """

    def __init__(self, seq_len: int, long_docs: str = "split"):
        if long_docs not in ("split", "truncate"):
            raise ValueError(f"long_docs must be split or truncate, got {long_docs!r}")
        self.seq_len = seq_len
        self.long_docs = long_docs
        self.stats = PackStats()
        self._row = np.zeros((3, seq_len), np.int32)
        self._used = 0
        self._segment = 0

    def _flush(self) -> np.ndarray:
        row = self._row
        self._row = np.zeros((3, self.seq_len), np.int32)
        self._used = 0
        self._segment = 0
        self.stats.rows += 1
        return row

    def _put(self, targets: np.ndarray, first_input: int) -> None:
        start, end = self._used, self._used + len(targets)
        self._segment += 1
        self._row[0, start] = first_input
        self._row[0, start + 1 : end] = targets[:-1]
        self._row[1, start:end] = targets
        self._row[2, start:end] = self._segment
        self._used = end
        self.stats.tokens += len(targets)

    def add(self, tokens: np.ndarray) -> Iterator[np.ndarray]:
        """Adds one sample; yields the rows it completes."""
        tokens = np.asarray(tokens, np.int32)
        if len(tokens) == 0:
            return
        self.stats.samples += 1
        if len(tokens) > self.seq_len and self.long_docs == "truncate":
            self.stats.truncated_tokens += len(tokens) - self.seq_len
            tokens = tokens[: self.seq_len]
        if len(tokens) <= self.seq_len:
            if self._used + len(tokens) > self.seq_len:
                yield self._flush()
            self._put(tokens, 0)
            if self._used == self.seq_len:
                yield self._flush()
            return
        self.stats.split_samples += 1
        first_input, offset = 0, 0
        while offset < len(tokens):
            take = min(self.seq_len - self._used, len(tokens) - offset)
            self._put(tokens[offset : offset + take], first_input)
            first_input = int(tokens[offset + take - 1])
            offset += take
            if self._used == self.seq_len:
                yield self._flush()

    def finish(self) -> Iterator[np.ndarray]:
        """Yields the last, partly filled row (if any)."""
        if self._used:
            yield self._flush()


def pack(
    samples: Iterable[np.ndarray], seq_len: int, long_docs: str = "split"
) -> tuple[list[np.ndarray], PackStats]:
    """All rows of a stream of samples, and the packing statistics."""
    packer = Packer(seq_len, long_docs)
    rows = [row for sample in samples for row in packer.add(sample)]
    rows.extend(packer.finish())
    return rows, packer.stats


def row_to_batch_fields(rows: np.ndarray) -> dict[str, np.ndarray]:
    """int32 [N, 3, T] packed rows -> the DESIGN.md batch fields, each [N, T] (the reference
    rows.decode is tested against).

    positions count from 0 within each segment; loss_weights are 1 on tokens, 0 on padding.
    """
    inputs, targets, segment_ids = rows[:, 0], rows[:, 1], rows[:, 2]
    length = rows.shape[-1]
    index = np.broadcast_to(np.arange(length, dtype=np.int32), segment_ids.shape)
    starts = np.concatenate(
        [np.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    segment_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": (index - segment_start).astype(np.int32),
        "loss_weights": (segment_ids > 0).astype(np.float32),
    }
