"""Corpus readers: JSONL (plain, .gz, .zst), Parquet and ArrayRecord of JSON records, local or gs://.

Readers yield `Document`s in file order with their file and line (row) number, so every output
can be traced back and every bad record is reported where it is. Files are opened through
fsspec (gcsfs for gs://), so the same code reads a laptop folder and a bucket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence

import fsspec

from tpt_jax.config import CorpusConfig
from tpt_jax.data.rejects import RejectLog

JSONL_SUFFIXES = (
    ".jsonl",
    ".json",
    ".jsonl.gz",
    ".json.gz",
    ".jsonl.zst",
    ".json.zst",
    ".gz",
    ".zst",
)
PARQUET_SUFFIXES = (".parquet",)
ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")


@dataclasses.dataclass(frozen=True)
class Document:
    """One input record. `thinking` is None for records without thinking."""

    id: str
    text: str
    thinking: str | None
    meta: dict
    source: str
    line: int


def expand(patterns: Sequence[str], rejects: RejectLog) -> list[str]:
    """Files matching each pattern (sorted per pattern, first occurrence kept).

    A pattern that matches nothing is bad input: reported, or fatal with strict.
    """
    files: list[str] = []
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        matches = (
            sorted(fs.glob(path))
            if any(c in path for c in "*?[")
            else ([path] if fs.exists(path) else [])
        )
        if not matches:
            rejects.reject(pattern, None, "missing file: no file matches this path")
            continue
        protocol = pattern.split("://")[0] + "://" if "://" in pattern else ""
        for match in matches:
            full = match if match.startswith(protocol) else protocol + match
            if full not in files:
                files.append(full)
    return files


def unmatched(patterns: Sequence[str]) -> list[str]:
    """The patterns that match no file (a typo, a path relative to another folder)."""
    return [p for p in dict.fromkeys(patterns) if not expand([p], RejectLog())]


def read_records(path: str, rejects: RejectLog) -> Iterator[tuple[int, dict]]:
    """(line or row number, JSON object) for every well-formed record of one file."""
    name = path.lower()
    try:
        if name.endswith(PARQUET_SUFFIXES):
            yield from _parquet(path)
        elif name.endswith(ARRAY_RECORD_SUFFIXES):
            yield from _array_record(path, rejects)
        elif name.endswith(JSONL_SUFFIXES):
            yield from _jsonl(path, rejects)
        else:
            rejects.reject(
                path,
                None,
                "unknown file type: expected .jsonl[.gz|.zst], .parquet or .array_record",
            )
    except (OSError, EOFError, ValueError, zstd_error()) as e:
        # A file that cannot be opened or decompressed to its end: the records it yielded are
        # only part of it, which the caller must know (prepare does not mark such a file done).
        rejects.unreadable(path, e)


def zstd_error() -> type[Exception]:
    import zstandard

    return zstandard.ZstdError


def _lines(raw, path: str):
    """A line iterator over a (possibly compressed) binary file object."""
    if path.lower().endswith(".gz"):
        return gzip.GzipFile(fileobj=raw)
    if path.lower().endswith(".zst"):
        return contextlib.closing(_zstd_lines(raw))
    return raw


def _zstd_lines(raw) -> Iterator[bytes]:
    """Lines of a zstd file (one or more frames). zstandard's stream_reader ends quietly on a
    truncated file, so the end of the last frame is checked here, as gzip does itself."""
    import zstandard

    frame = zstandard.ZstdDecompressor().decompressobj()
    tail, started = b"", False
    for chunk in iter(lambda: raw.read(1 << 20), b""):
        started, data = True, []
        while chunk:
            if frame.eof:  # concatenated frames: the next one starts in the unused input
                frame = zstandard.ZstdDecompressor().decompressobj()
            data.append(frame.decompress(chunk))
            chunk = frame.unused_data if frame.eof else b""
        *lines, tail = (tail + b"".join(data)).split(b"\n")
        yield from (line + b"\n" for line in lines)
    if started and not frame.eof:
        raise EOFError("compressed file ended before the end of its last zstd frame")
    if tail:
        yield tail


def _jsonl(path: str, rejects: RejectLog) -> Iterator[tuple[int, dict]]:
    with fsspec.open(path, "rb") as stream, _lines(stream, path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            record = _decode(line, path, number, rejects)
            if record is not None:
                yield number, record


def _decode(raw: bytes, path: str, number: int, rejects: RejectLog) -> dict | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        rejects.reject(path, number, f"non-UTF-8 bytes: at byte {e.start}")
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        rejects.reject(path, number, f"malformed JSON: {e.msg} at column {e.colno}")
        return None
    if not isinstance(record, dict):
        rejects.reject(path, number, f"not a JSON object: got {type(record).__name__}")
        return None
    return record


def _parquet(path: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    with fsspec.open(path, "rb") as f:
        number = 0
        for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row


def _array_record(path: str, rejects: RejectLog) -> Iterator[tuple[int, dict]]:
    from array_record.python import array_record_module

    local = path
    if "://" in path:  # the reader needs a local file: stage a copy for the duration
        fs, inner = fsspec.core.url_to_fs(path)
        handle, local = tempfile.mkstemp(suffix=".array_record")
        os.close(handle)
        fs.get_file(inner, local)
    reader = None
    try:
        reader = array_record_module.ArrayRecordReader(local)
        total = reader.num_records()
        for start in range(0, total, 1024):
            chunk = reader.read(list(range(start, min(start + 1024, total))))
            for offset, raw in enumerate(chunk):
                record = _decode(raw, path, start + offset + 1, rejects)
                if record is not None:
                    yield start + offset + 1, record
        done, reader = reader, None
        done.close()  # a file that ended early may only be reported here
    except RuntimeError as e:  # how the C++ reader reports a truncated or corrupt file
        raise OSError(f"corrupt or truncated ArrayRecord file: {e}") from None
    finally:
        if reader is not None:  # stopped early: by an error, or the caller stopped reading
            with contextlib.suppress(RuntimeError):
                reader.close()
        if local != path:
            os.remove(local)


def content_id(corpus_name: str, text: str) -> str:
    """The id of a record that has none: the corpus name and a hash of the text."""
    return f"{corpus_name}:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:20]}"


def to_document(
    record: dict, corpus: CorpusConfig, path: str, line: int, rejects: RejectLog
) -> Document | None:
    """Checks one record's fields; rejects it (and returns None) if it is unusable."""
    text = record.get(corpus.text_field)
    if text is None:
        rejects.reject(path, line, f"missing field: '{corpus.text_field}'")
        return None
    if not isinstance(text, str):
        rejects.reject(
            path,
            line,
            f"wrong field type: '{corpus.text_field}' is {type(text).__name__}, not a string",
        )
        return None
    if not text.strip():
        rejects.reject(path, line, "empty document: text is empty or whitespace")
        return None
    thinking = None
    if corpus.thinking_field:
        thinking = record.get(corpus.thinking_field)
        if thinking is not None and not isinstance(thinking, str):
            rejects.reject(
                path,
                line,
                f"wrong field type: '{corpus.thinking_field}' is {type(thinking).__name__}, not a string",
            )
            return None
        if thinking is not None and not thinking.strip():
            thinking = None
    raw_id = record.get(corpus.id_field)
    doc_id = str(raw_id) if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
    for field, value in ((corpus.text_field, text), (corpus.thinking_field, thinking),
                         (corpus.id_field, doc_id)):  # fmt: skip
        try:
            (value or "").encode("utf-8")
        except UnicodeEncodeError as e:  # JSON may escape half of a surrogate pair ("\ud83d")
            rejects.reject(
                path,
                line,
                f"invalid Unicode: '{field}' has a lone surrogate at character {e.start}",
            )
            return None
    if doc_id is None:
        # From the content, not the position: two files of one name in different folders, a
        # document prepended to a file or files reordered leave every other id unchanged. Two
        # records of the same text share an id and are treated as duplicates downstream.
        doc_id = content_id(corpus.name, text)
    meta = {key: record[key] for key in corpus.meta_fields if key in record}
    return Document(doc_id, text, thinking, meta, path, line)


def read_corpus(corpus: CorpusConfig, rejects: RejectLog) -> Iterator[Document]:
    """Every usable document of a corpus, in file order."""
    for path in expand(corpus.paths, rejects):
        for line, record in read_records(path, rejects):
            doc = to_document(record, corpus, path, line, rejects)
            if doc is not None:
                yield doc
