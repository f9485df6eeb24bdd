"""The prepared-rows file: fixed-stride packed rows, so any row is one byte range of its shard.

Layout: a HEADER_BYTES header (MAGIC, then JSON padded with spaces: format version, seq_len,
token dtype, row_bytes, row count), then the rows back to back, so row i is the byte range
[HEADER_BYTES + i * row_bytes, HEADER_BYTES + (i + 1) * row_bytes). A row stores only what
cannot be derived from packing.py's convention:
  tokens  [seq_len + 1] in the narrowest unsigned dtype holding the vocabulary (little-endian):
          tokens[0] is the row's first input (0, or the last token of the sample it continues),
          tokens[1:] are the targets (0 on padding);
  starts  [ceil(seq_len / 8)] uint8: a bitmask (little bit order) of the segment starts;
  used    uint32: the number of non-padding positions (padding is only at the end of a row).
Only a row's first segment can continue a split sample, so the inputs are tokens[:-1] with 0 at
every later segment's start. With uint16 tokens and seq_len 2048 a row is 4358 bytes: 2.13 bytes
per token against 12 for the int32 [3, seq_len] rows packing.py builds.

Readers read only the rows asked for: locally with os.pread (no file kept open between reads), on
gs:// (any fsspec store) with one batch of concurrent ranged reads for all the files of a step;
neither ever copies a whole shard.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence

import fsspec
import numpy as np

from tpt_jax import storage
from tpt_jax.errors import TptError

MAGIC = b"TPTROWS\n"
FORMAT_VERSION = 1
HEADER_BYTES = 1024  # a few shards per task: small against their rows
SUFFIX = ".rows"
_TOKEN_DTYPES = ("uint8", "uint16", "uint32")


class RowsFileError(TptError):
    """A prepared-rows file that is not in this format, of another version, or cut short."""


def token_dtype(vocab_size: int) -> str:
    """The narrowest unsigned dtype name holding token ids 0 .. vocab_size - 1."""
    for name in _TOKEN_DTYPES:
        if vocab_size - 1 <= np.iinfo(name).max:
            return name
    raise ValueError(f"a vocabulary of {vocab_size} ids does not fit in uint32")


def row_dtype(seq_len: int, tokens: str) -> np.dtype:
    """The numpy record of one stored row (packed, little-endian); its itemsize is row_bytes."""
    if tokens not in _TOKEN_DTYPES:
        raise ValueError(f"token dtype must be one of {_TOKEN_DTYPES}, got {tokens!r}")
    return np.dtype(
        [
            ("tokens", np.dtype(tokens).newbyteorder("<"), (seq_len + 1,)),
            ("starts", np.uint8, (-(-seq_len // 8),)),
            ("used", "<u4"),
        ]
    )


def encode(rows: np.ndarray, tokens: str) -> np.ndarray:
    """int32 [N, 3, T] packed rows (inputs, targets, segment_ids; see packing.py) -> [N] records
    of row_dtype(T, tokens). Raises ValueError for a token outside the dtype or rows whose inputs
    do not follow packing's convention (decode would not give them back)."""
    rows = np.asarray(rows)
    n, _, seq_len = rows.shape
    inputs, targets, segment_ids = rows[:, 0], rows[:, 1], rows[:, 2]
    limit = np.iinfo(tokens).max
    if n and (min(inputs.min(), targets.min()) < 0 or max(inputs.max(), targets.max()) > limit):
        raise ValueError(f"a token id is outside 0..{limit} ({tokens})")
    out = np.zeros(n, row_dtype(seq_len, tokens))
    out["tokens"][:, 0] = inputs[:, 0]
    out["tokens"][:, 1:] = targets
    previous = np.concatenate([np.zeros_like(segment_ids[:, :1]), segment_ids[:, :-1]], axis=1)
    out["starts"] = np.packbits(
        (segment_ids != previous) & (segment_ids > 0), axis=1, bitorder="little"
    )
    out["used"] = (segment_ids > 0).sum(axis=1)
    back = decode(out)
    for name, column in (("inputs", inputs), ("targets", targets), ("segment_ids", segment_ids)):
        if not np.array_equal(back[name], column):
            raise ValueError(
                f"rows do not follow packing's convention: their {name} differ once decoded"
            )
    return out


def decode(records: np.ndarray) -> dict[str, np.ndarray]:
    """[N] stored records -> the DESIGN.md batch fields, each [N, T]: inputs, targets, segment_ids,
    positions (int32; from 0 in each segment) and loss_weights (float32; 1 on tokens, 0 on padding)."""
    tokens = records["tokens"].astype(np.int32)
    n, seq_len = tokens.shape[0], tokens.shape[1] - 1
    index = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (n, seq_len))
    used = index < records["used"][:, None].astype(np.int64)
    starts = np.unpackbits(records["starts"], axis=1, count=seq_len, bitorder="little").astype(bool)
    segment_ids = np.where(used, np.cumsum(starts, axis=1, dtype=np.int32), 0)
    inputs = np.where(used & ~(starts & (index > 0)), tokens[:, :-1], 0)
    # As packing.row_to_batch_fields: positions also count on from the padding's start.
    restarts = starts | (index == records["used"][:, None].astype(np.int64))
    segment_start = np.maximum.accumulate(np.where(restarts, index, 0), axis=1)
    return {
        "inputs": inputs.astype(np.int32),
        "targets": np.where(used, tokens[:, 1:], 0).astype(np.int32),
        "segment_ids": segment_ids.astype(np.int32),
        "positions": (index - segment_start).astype(np.int32),
        "loss_weights": used.astype(np.float32),
    }


def _header(seq_len: int, tokens: str, count: int) -> bytes:
    meta = {
        "version": FORMAT_VERSION,
        "seq_len": seq_len,
        "token_dtype": tokens,
        "row_bytes": row_dtype(seq_len, tokens).itemsize,
        "rows": count,
    }
    text = MAGIC + json.dumps(meta, sort_keys=True).encode()
    return text + b" " * (HEADER_BYTES - len(text))


def write(path: str, records: np.ndarray) -> None:
    """Writes encoded records (encode's output) to `path` (local or gs://), whole or not at all:
    locally a temporary file, flushed to disk, then renamed; on an object store one upload."""
    seq_len = records.dtype["tokens"].shape[0] - 1
    tokens = records.dtype["tokens"].base.name
    data = _header(seq_len, tokens, len(records)) + np.ascontiguousarray(records).tobytes()
    storage.write_bytes(path, data)


def parse_header(path: str, data: bytes) -> dict:
    """The header's fields, checked; RowsFileError naming `path` if it is not a rows file."""
    if len(data) < HEADER_BYTES or not data.startswith(MAGIC):
        raise RowsFileError(
            f"{path} is not a prepared-rows file (prepared by an older tpt_jax?): run `tpt prepare` "
            "again into a new data.prepared_dir"
        )
    try:
        meta = json.loads(data[len(MAGIC) : HEADER_BYTES].decode())
    except ValueError:
        raise RowsFileError(f"{path}: its header is damaged; run `tpt prepare` again") from None
    if meta.get("version") != FORMAT_VERSION:
        raise RowsFileError(
            f"{path} is rows format version {meta.get('version')}, this tpt_jax reads version "
            f"{FORMAT_VERSION}: run `tpt prepare` again into a new data.prepared_dir"
        )
    expected = row_dtype(meta["seq_len"], meta["token_dtype"]).itemsize
    if meta["row_bytes"] != expected:
        raise RowsFileError(f"{path}: row_bytes {meta['row_bytes']} != {expected}; damaged header")
    return meta


def _runs(indices: np.ndarray) -> list[tuple[int, int]]:
    """Sorted unique row indices -> [(first, stop)) runs of consecutive rows."""
    if len(indices) == 0:
        return []
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    firsts = np.concatenate([indices[:1], indices[breaks]])
    lasts = np.concatenate([indices[breaks - 1], indices[-1:]])
    return [(int(a), int(b) + 1) for a, b in zip(firsts, lasts, strict=True)]


class RowsReader:
    """Random access to the rows of one file, reading only their byte ranges.

    The header is read on the first read (not on construction), so a loader over thousands of
    shards touches only those it reads from; no file stays open between reads (a run reads
    more shards than a process may hold open). Thread-safe. `read_rows` reads the rows of
    several files in one batch of concurrent ranged reads.

        reader = RowsReader("gs://bucket/prepared/t/a-0123.rows")
        fields = decode(reader.read(np.array([5, 6, 900])))
    """

    def __init__(self, path: str, rows: int | None = None):
        """`rows`: the row count the caller expects (the manifest's); checked on the first read."""
        self.path = path
        self._expected = rows
        self._lock = threading.Lock()
        self._meta: dict | None = None
        self._location: tuple | None = None  # (filesystem, path in it) on an object store

    def _store(self) -> tuple:
        if self._location is None:
            self._location = fsspec.core.url_to_fs(self.path)
        return self._location

    def _accept(self, head: bytes) -> None:
        """Checks a header just read and keeps its fields."""
        meta = parse_header(self.path, head)
        if self._expected is not None and meta["rows"] != self._expected:
            raise RowsFileError(
                f"{self.path} holds {meta['rows']} rows but the manifest says {self._expected}: "
                "run `tpt prepare` again"
            )
        with self._lock:
            self.dtype = row_dtype(meta["seq_len"], meta["token_dtype"])
            self._meta = meta

    def _open(self) -> dict:
        if self._meta is None:
            _read_headers([self])
        return self._meta

    @property
    def meta(self) -> dict:
        """The header: version, seq_len, token_dtype, row_bytes, rows."""
        return self._open()

    def __len__(self) -> int:
        return self._expected if self._expected is not None else self._open()["rows"]

    def read(self, indices: np.ndarray) -> np.ndarray:
        """[N] records (row_dtype) of rows `indices` (any order, repeats allowed). Consecutive
        rows are read as one range; on an object store all ranges are fetched concurrently."""
        return read_rows([(self, indices)])[0]

    def close(self) -> None:
        """Forgets the header (read again on the next read); no file is held open."""
        with self._lock:
            self._meta = None


def _fetch(ranges: list[tuple[RowsReader, int, int]]) -> list[bytes]:
    """The bytes [start, end) of each (file, start, end). On an object store: one concurrent
    `cat_ranges` call per filesystem (one round trip, not one per range). Locally: each file
    opened, read with pread and closed in turn, so at most one file is open at a time."""
    out: list[bytes | None] = [None] * len(ranges)
    remote: dict[int, list[int]] = {}
    local: dict[str, list[int]] = {}
    for i, (reader, _, _) in enumerate(ranges):
        if storage.is_remote(reader.path):
            remote.setdefault(id(reader._store()[0]), []).append(i)
        else:
            local.setdefault(reader.path, []).append(i)
    for path, members in local.items():
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise _missing(path) from None
        try:
            for i in members:
                _, start, end = ranges[i]
                out[i] = os.pread(fd, end - start, start)
        finally:
            os.close(fd)
    for members in remote.values():
        fs = ranges[members[0]][0]._store()[0]
        got = fs.cat_ranges(
            [ranges[i][0]._store()[1] for i in members],
            [ranges[i][1] for i in members],
            [ranges[i][2] for i in members],
            on_error="return",
        )
        for i, piece in zip(members, got, strict=True):
            if isinstance(piece, FileNotFoundError):
                raise _missing(ranges[i][0].path) from None
            if isinstance(piece, BaseException):
                raise piece
            out[i] = piece
    return out


def _missing(path: str) -> RowsFileError:
    return RowsFileError(f"{path} not found: the prepared folder is incomplete; run `tpt prepare`")


def _read_headers(readers: Sequence[RowsReader]) -> None:
    """Reads and checks the headers of files not read from yet, all in one batch."""
    unseen = [r for r in dict.fromkeys(readers) if r._meta is None]
    heads = _fetch([(r, 0, HEADER_BYTES) for r in unseen])
    for reader, head in zip(unseen, heads, strict=True):
        reader._accept(head)


def read_rows(requests: Sequence[tuple[RowsReader, np.ndarray]]) -> list[np.ndarray]:
    """The records of several (file, row indices) at once: [N_i] records (row_dtype) each.

    At most two batches of ranged reads whatever the files: the headers of files not read from
    yet, then every run of consecutive rows of every file (repeats read once). On gs:// each
    batch is one concurrent request batch, so a step costs two round trips, not two per row.
    """
    _read_headers([reader for reader, _ in requests])
    plans, ranges = [], []
    for reader, indices in requests:
        meta = reader._meta
        indices = np.asarray(indices, np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= meta["rows"]):
            raise IndexError(f"{reader.path}: row index out of 0..{meta['rows'] - 1}")
        wanted, inverse = np.unique(indices, return_inverse=True)
        runs = _runs(wanted)
        size = meta["row_bytes"]
        plans.append((reader, len(wanted), inverse.reshape(-1), len(ranges), len(runs)))
        ranges.extend((reader, HEADER_BYTES + a * size, HEADER_BYTES + b * size) for a, b in runs)
    pieces = _fetch(ranges)
    out = []
    for reader, count, inverse, first, n in plans:
        data = b"".join(pieces[first : first + n])
        if len(data) != count * reader._meta["row_bytes"]:
            raise RowsFileError(
                f"{reader.path} is shorter than its header says: run `tpt prepare` again"
            )
        out.append(np.frombuffer(data, reader.dtype)[inverse])
    return out
