"""Memory-mapped safetensors reading and shard-by-shard writing of HF checkpoint folders.

Reading maps each file and returns numpy views: nothing is copied until a tensor is used, so a
converter can build its own layout one layer at a time without a second full copy in memory.
The format is an 8-byte little-endian header length, a JSON header
{name: {dtype, shape, data_offsets: [begin, end]}}, then the raw bytes.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator

import ml_dtypes
import numpy as np
import safetensors.numpy

from tpt_jax.errors import CheckpointError

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def _read_header(path: str) -> tuple[dict, int]:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return header, 8 + size


class SafetensorsFolder:
    """Random access to every tensor of an HF folder (one file or a sharded index)."""

    def __init__(self, folder: str):
        self.folder = folder
        index = os.path.join(folder, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map", {})
            files = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(folder, SINGLE_FILE)):
            files = [SINGLE_FILE]
        else:
            raise CheckpointError(
                f"{folder}: no {SINGLE_FILE} or {INDEX_FILE}; only safetensors checkpoints are "
                "supported (re-save a .bin checkpoint with save_pretrained(safe_serialization=True))"
            )
        self._entries: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(folder, name)
            header, data_start = _read_header(path)
            for key, info in header.items():
                if key != "__metadata__":
                    self._entries[key] = (path, info, data_start)

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of tensor `name`."""
        if name not in self._entries:
            raise CheckpointError(f"{self.folder}: tensor '{name}' is missing from the checkpoint")
        path, info, data_start = self._entries[name]
        if info["dtype"] not in _DTYPES:
            raise CheckpointError(f"{path}: tensor '{name}' has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if end == begin:
            return np.zeros(shape, _DTYPES[info["dtype"]])
        return np.memmap(
            path, dtype=_DTYPES[info["dtype"]], mode="r", offset=data_start + begin, shape=shape
        )


def write_sharded(
    tensors: Iterable[tuple[str, np.ndarray]], folder: str, max_shard_bytes: int
) -> list[str]:
    """Writes (name, array) pairs into shards of at most max_shard_bytes (one tensor may exceed).

    Only the current shard is held in memory. With more than one shard, files are named
    model-0000i-of-0000n.safetensors and an index is written, as transformers does.

    Returns:
        the shard file names.
    """
    os.makedirs(folder, exist_ok=True)
    shards: list[list[str]] = []
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(_group_by_size(tensors, max_shard_bytes)):
        tmp_name = f"shard-{i:05d}.tmp"
        safetensors.numpy.save_file(
            dict(group), os.path.join(folder, tmp_name), metadata={"format": "pt"}
        )
        shards.append([tmp_name, *(name for name, _ in group)])
        total += sum(a.nbytes for _, a in group)
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for final, (tmp_name, *keys) in zip(names, shards, strict=True):
        os.replace(os.path.join(folder, tmp_name), os.path.join(folder, final))
        weight_map.update(dict.fromkeys(keys, final))
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(folder, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    return names


def _group_by_size(
    tensors: Iterable[tuple[str, np.ndarray]], max_bytes: int
) -> Iterator[list[tuple[str, np.ndarray]]]:
    group: list[tuple[str, np.ndarray]] = []
    size = 0
    for name, array in tensors:
        if group and size + array.nbytes > max_bytes:
            yield group
            group, size = [], 0
        group.append((name, np.ascontiguousarray(array)))
        size += array.nbytes
    if group:
        yield group
