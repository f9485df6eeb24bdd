"""The stateless, elastic Grain loader over prepared (packed) rows files (rows.py).

Global row g of the training stream is a pure function of (seed, g):
  1. Mixing is block-deterministic: every block of MIX_BLOCK rows holds each task's share of the
     block (largest-remainder rounding of the rates), in an order permuted by (seed, block). So
     the rates hold to within one row per block, and row g's task and its index within the task
     follow without reading anything else.
  2. Each task's rows are permuted by a Grain `MapDataset.range(rows).shuffle` of a per-task
     seed; Grain re-draws the permutation every epoch, and the epoch of a task index is
     index // rows. The permuted index names a row of the task's files taken end to end.
The batch of step s is rows [s * B, (s + 1) * B); a process takes its contiguous slice. The data
position is therefore the step, resume is exact, and any process count sees the same batches.

A process reads only the rows of its slice, straight from the prepared folder (local or gs://):
one batch of concurrent ranged reads per step over all its shards and tasks (rows.read_rows),
never a copy of a shard. `batches` reads
the next steps' rows in background threads while the current step trains.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Sequence

import fsspec
import grain
import numpy as np

from tpt_jax.config import MixtureComponent
from tpt_jax.data import prepare, rows

MIX_BLOCK = 4096
PREFETCH_STEPS = 8  # batches read ahead of the step that trains
PREFETCH_THREADS = 4  # steps read at once (ranged reads wait on the network, not the CPU)


def _largest_remainder(rates: np.ndarray, total: int) -> np.ndarray:
    exact = rates / rates.sum() * total
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts


class TaskRows:
    """One task's prepared files, taken end to end, as one random-access sequence of rows.

    `files` is a manifest list of {"path": relative to prepared_dir, "rows": count}; files of no
    rows are skipped. Nothing is opened until rows are read.
    """

    def __init__(self, prepared_dir: str, files: Sequence[dict]):
        self.readers = [
            rows.RowsReader(os.path.join(prepared_dir, f["path"]), f["rows"])
            for f in files
            if f["rows"]
        ]
        self.offsets = np.cumsum([0] + [len(r) for r in self.readers])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def split(self, indices: np.ndarray) -> list[tuple[rows.RowsReader, np.ndarray, np.ndarray]]:
        """(file, its row indices, their positions in `indices`) for each file `indices` touch."""
        indices = np.asarray(indices, np.int64)
        owner = np.searchsorted(self.offsets, indices, side="right") - 1
        parts = []
        for f in np.unique(owner):
            where = np.flatnonzero(owner == f)
            parts.append((self.readers[f], indices[where] - self.offsets[f], where))
        return parts

    def read(self, indices: np.ndarray) -> np.ndarray:
        """[N] stored records (rows.row_dtype) of the given row indices, read in one batch."""
        return _gather(self.split(indices), len(indices))


def _gather(parts: list[tuple[rows.RowsReader, np.ndarray, np.ndarray]], count: int) -> np.ndarray:
    """[count] records: each part's rows read (all in one rows.read_rows) into its positions."""
    if not parts:
        raise ValueError("no rows asked for")
    records = rows.read_rows([(reader, local) for reader, local, _ in parts])
    out = np.empty(count, records[0].dtype)
    for (_, _, where), part in zip(parts, records, strict=True):
        out[where] = part
    return out


class MixedRows:
    """Random access to the globally mixed, shuffled, endlessly repeated rows of prepared tasks."""

    def __init__(
        self,
        prepared_dir: str,
        mixture: Sequence[MixtureComponent],
        seed: int,
        seq_len: int,
        vocab_checksum: str | None = None,
        split: str = "train",
    ):
        """`split="heldout"` reads the tasks' held-out rows (see prepare.is_heldout) instead."""
        manifest_path = os.path.join(prepared_dir, prepare.MANIFEST)
        try:
            with fsspec.open(manifest_path, "r") as f:
                manifest = json.load(f)
        except FileNotFoundError:
            raise prepare.PreparedDataError(
                f"{manifest_path} not found: run `tpt prepare` first"
            ) from None
        if manifest.get("format") != prepare.PREPARED_FORMAT:
            raise prepare.PreparedDataError(
                f"{prepared_dir} was prepared by an older tpt_jax (format "
                f"{manifest.get('format', 'ArrayRecord')}, this one reads {prepare.PREPARED_FORMAT}): "
                "run `tpt prepare` again into a new data.prepared_dir"
            )
        if manifest["seq_len"] != seq_len:
            raise prepare.PreparedDataError(
                f"{prepared_dir} holds rows of {manifest['seq_len']} tokens but train.seq_len is {seq_len}"
            )
        if vocab_checksum is not None and manifest["vocab_checksum"] != vocab_checksum:
            raise prepare.PreparedDataError(
                f"{prepared_dir} was prepared with vocabulary {manifest['vocab_checksum']} but data.vocab_path "
                f"is {vocab_checksum}: prepare again with this vocabulary, or train with the one it used"
            )
        self.manifest = manifest
        self.seq_len = seq_len
        self.seed = seed
        self.tasks = [m.task for m in mixture]
        self.sources: list[TaskRows] = []
        self.orders = []
        self.lengths = []
        for i, name in enumerate(self.tasks):
            info = manifest["tasks"].get(name)
            if split == "heldout":  # nested in the task's entry, in the same shape
                info = (info or {}).get("heldout")
            if info is None or info["rows"] == 0:
                raise prepare.PreparedDataError(
                    f"{prepared_dir}: task {name} is not prepared (run `tpt prepare`)"
                )
            source = TaskRows(prepared_dir, info["files"])
            self.sources.append(source)
            self.orders.append(
                grain.MapDataset.range(len(source)).shuffle(seed=(seed * 1_000_003 + i) % 2**31)
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
        """[N] stored records (rows.row_dtype; rows.decode gives the batch fields) of the given
        global row numbers: the rows of every task and shard in one batch of ranged reads."""
        tasks, local = self.locate(global_rows)
        parts = []
        for task in np.unique(tasks):
            where = np.flatnonzero(tasks == task)
            order = self.orders[task]
            permuted = np.array([order[int(i)] for i in local[where]], np.int64)
            parts.extend(
                (reader, indices, where[at])
                for reader, indices, at in self.sources[task].split(permuted)
            )
        return _gather(parts, len(global_rows))

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
    prefetch: int = PREFETCH_STEPS,
) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of every global batch from `start_step` on, in the DESIGN.md format.

    With `prefetch` > 0 the batches of the next `prefetch` steps are read in background threads
    (Grain's thread prefetch) while the caller trains; the batches are the same either way.
    """

    def batch(step: int) -> dict[str, np.ndarray]:
        return rows.decode(
            data.rows(process_rows(step, global_batch, process_index, process_count))
        )

    if prefetch <= 0:
        step = start_step
        while True:
            yield batch(step)
            step += 1
    steps = grain.MapDataset.range(start_step, 2**62).map(batch)
    options = grain.ReadOptions(
        num_threads=min(PREFETCH_THREADS, prefetch), prefetch_buffer_size=prefetch
    )
    iterator = iter(steps.to_iter_dataset(options))
    try:
        yield from iterator
    finally:
        # Cancels the queued reads: a caller that stops (an error, the last step) must not
        # wait at exit for `prefetch` steps of reads nobody will use.
        iterator.close()
