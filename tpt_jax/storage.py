"""Files on local disk or object stores (gs://) through fsspec, with atomic writes.

A write is atomic either way: locally a temporary name then a rename; on GCS one object upload,
which readers see whole or not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

import fsspec


def is_remote(path: str) -> bool:
    return "://" in path


def write_bytes(path: str, data: bytes, exclusive: bool = False) -> None:
    """Writes `path` whole or not at all. `exclusive`: only if it does not exist yet (else
    FileExistsError), decided by the file system or the object store, not by a check before."""
    if is_remote(path):
        fs, inner = fsspec.core.url_to_fs(path)
        fs.pipe_file(inner, data, **({"mode": "create"} if exclusive else {}))
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:  # a failed write (a full disk) names no file: name the output
            e.filename = path
        raise
    if exclusive:
        try:
            os.link(path + ".tmp", path)  # fails if `path` exists, where a rename would replace it
        finally:
            os.remove(path + ".tmp")
        return
    os.replace(path + ".tmp", path)


def append_text(path: str, text: str) -> None:
    """Adds `text` to the end of a small log file (object stores cannot append: rewritten whole)."""
    old = read_text(path) if exists(path) else ""
    write_bytes(path, (old + text).encode())


def exists(path: str) -> bool:
    fs, inner = fsspec.core.url_to_fs(path)
    return fs.exists(inner)


def read_text(path: str) -> str:
    with fsspec.open(path, "r") as f:
        return f.read()


def read_json(path: str):
    return json.loads(read_text(path))


def read_bytes(path: str) -> bytes:
    with fsspec.open(path, "rb") as f:
        return f.read()


@contextlib.contextmanager
def staged_folder(path: str) -> Iterator[str]:
    """A local folder to write a whole folder of files into (libraries that only write local
    files): `path` itself when local; else a temporary folder uploaded to `path` once the block
    ends without an error."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tpt_stage_") as local:
        yield local
        fs, inner = fsspec.core.url_to_fs(path)
        for name in sorted(os.listdir(local)):
            fs.put(os.path.join(local, name), f"{inner}/{name}", recursive=True)


def glob(pattern: str) -> list[str]:
    """Sorted matches, as full paths (gs:// kept)."""
    fs, inner = fsspec.core.url_to_fs(pattern)
    protocol = fs.protocol[0] if isinstance(fs.protocol, tuple) else fs.protocol
    matches = fs.glob(inner)
    if is_remote(pattern):
        matches = [f"{protocol}://{m}" for m in matches]
    return sorted(matches)


def makedirs(path: str) -> None:
    """Local folders only: object stores have none to make."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)
