"""The stateless, elastic Grain loader over prepared (packed) ArrayRecord shards.

Global row g of the training stream is a pure function of (seed, g):
  1. Mixing is block-deterministic: every block of MIX_BLOCK rows holds each task's share of the
     block (largest-remainder rounding of the rates), in an order permuted by (seed, block). So
     the rates hold to within one row per block, and row g's task and its index within the task
     follow without reading anything else.
  2. Each task is a Grain MapDataset over its shards, shuffled by a per-task seed; Grain re-draws
     the permutation every epoch, and the epoch of a task index is index // rows.
The batch of step s is rows [s * B, (s + 1) * B); a process takes its contiguous slice. The data
position is therefore the step, resume is exact, and any process count sees the same batches.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Sequence

import fsspec
import grain
import numpy as np

from tpt_jax import storage
from tpt_jax.config import MixtureComponent
from tpt_jax.data import prepare
from tpt_jax.data.packing import row_to_batch_fields

MIX_BLOCK = 4096


def _largest_remainder(rates: np.ndarray, total: int) -> np.ndarray:
    exact = rates / rates.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


class MixedRows:
    """Random access to the globally mixed, shuffled, endlessly repeated rows of prepared tasks."""

    def __init__(
        self,
        prepared_dir: str,
        mixture: Sequence[MixtureComponent],
        seed: int,
        seq_len: int,
        vocab_checksum: str | None = None,
    ):
        manifest_path = os.path.join(prepared_dir, prepare.MANIFEST)
        try:
            with fsspec.open(manifest_path, "r") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise prepare.PreparedDataError(
                f"{manifest_path} not found: run `tpt prepare` first"
            ) from None
        if manifest["seq_len"] != seq_len:
            raise prepare.PreparedDataError(
                f"{prepared_dir} holds rows of {manifest['seq_len']} tokens but train.seq_len is {seq_len}"
            )
        if vocab_checksum is not None and manifest["vocab_checksum"] != vocab_checksum:
            raise prepare.PreparedDataError(
                f"{prepared_dir} was prepared with vocabulary {manifest['vocab_checksum']} but data.vocab_path "
                f"is {vocab_checksum}: prepare again with this vocabulary, or train with the one it used"
            )
        self.seq_len = seq_len
        self.seed = seed
        self.tasks = [m.task for m in mixture]
        self.datasets = []
        self.lengths = []
        for i, name in enumerate(self.tasks):
            info = manifest["tasks"].get(name)
            if info is None or info["rows"] == 0:
                raise prepare.PreparedDataError(
                    f"{prepared_dir}: task {name} is not prepared (run `tpt prepare`)"
                )
            paths = [
                _local(os.path.join(prepared_dir, f["path"])) for f in info["files"] if f["rows"]
            ]
            source = grain.sources.ArrayRecordDataSource(paths)
            self.datasets.append(
                grain.MapDataset.source(source).shuffle(seed=(seed * 1_000_003 + i) % 2**31)
            )
            self.lengths.append(len(source))
        self.counts = _largest_remainder(np.array([m.rate for m in mixture], np.float64), MIX_BLOCK)

    @functools.lru_cache(maxsize=8)  # noqa: B019 (a handful of blocks per batch; the object lives for the run)
    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """(task of each slot, index of the slot within its task's rows of this block)."""
        slots = np.repeat(np.arange(len(self.counts)), self.counts)
        slots = np.random.default_rng([self.seed, block]).permutation(slots)
        rank = np.zeros_like(slots)
        for task in range(len(self.counts)):
            where = slots == task
            rank[where] = np.arange(where.sum())
        return slots, rank

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(task, index within the task's endless stream) of each global row number."""
        tasks = np.empty(len(rows), np.int64)
        local = np.empty(len(rows), np.int64)
        for i, g in enumerate(rows):
            block, offset = divmod(int(g), MIX_BLOCK)
            slots, rank = self._block(block)
            tasks[i] = slots[offset]
            local[i] = block * self.counts[slots[offset]] + rank[offset]
        return tasks, local

    def rows(self, global_rows: np.ndarray) -> np.ndarray:
        """int32 [N, 3, seq_len] stored rows for the given global row numbers."""
        tasks, local = self.locate(global_rows)
        out = np.empty((len(global_rows), 3, self.seq_len), np.int32)
        for task in np.unique(tasks):
            where = np.flatnonzero(tasks == task)
            dataset = self.datasets[task]
            records = [dataset[int(i)] for i in local[where]]
            for slot, record in zip(where, records, strict=True):
                out[slot] = np.frombuffer(record, np.int32).reshape(3, self.seq_len)
        return out

    def epochs_seen(self, rows_consumed: int) -> dict[str, float]:
        """Epochs of each task consumed by the first `rows_consumed` global rows."""
        if rows_consumed == 0:
            return dict.fromkeys(self.tasks, 0.0)
        full, part = divmod(rows_consumed, MIX_BLOCK)
        seen = self.counts * full
        if part:
            slots, _ = self._block(full)
            seen = seen + np.bincount(slots[:part], minlength=len(self.counts))
        return {name: float(seen[i]) / self.lengths[i] for i, name in enumerate(self.tasks)}


def _local(path: str) -> str:
    """Prepared shards on gs:// are read from a local copy, downloaded once per host (for data
    larger than the local disk, mount the bucket with gcsfuse and give the mounted path)."""
    return storage.local_copy(path)


def process_rows(
    step: int, global_batch: int, process_index: int, process_count: int
) -> np.ndarray:
    """The global row numbers this process feeds at `step`: its contiguous slice of the batch."""
    per_process = global_batch // process_count
    start = step * global_batch + process_index * per_process
    return np.arange(start, start + per_process)


def batches(
    data: MixedRows,
    start_step: int,
    global_batch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every global batch from `start_step` on, in the DESIGN.md format."""
    step = start_step
    while True:
        yield row_to_batch_fields(
            data.rows(process_rows(step, global_batch, process_index, process_count))
        )
        step += 1
