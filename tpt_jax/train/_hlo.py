"""Reading a compiled program's HLO text: its collectives and custom kernels, per step.

XLA prints a loop body once; this module multiplies everything inside a `while` by the loop's
known trip count (the scanned layers, gradient accumulation, the chunked loss), so counts and
bytes are per executed step. Replica groups (all three of XLA's notations) are mapped back to
the names of the mesh axes they span, and to whether they cross slices (DCN).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import re

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2,
    "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
}  # fmt: skip
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALL_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\dm\d\w*)?)\[([\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Instruction:
    computation: str
    name: str
    opcode: str
    result_type: str
    text: str  # the whole line


@dataclasses.dataclass
class Program:
    """Instructions by computation, how many times each computation runs per execution, and the
    devices the module is partitioned over (one slice's, when a multi-slice step is compiled:
    the runtime then moves data between slices through host sends)."""

    instructions: list[Instruction]
    runs: dict[str, int]
    partitions: int = 0


def _result_bytes(result_type: str, largest_only: bool) -> int:
    sizes = [
        _DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]))
        for dtype, dims in _ARRAY.findall(result_type)
    ]
    if not sizes:
        return 0
    return max(sizes) if largest_only else sum(sizes)


def parse(hlo_text: str) -> Program:
    """The instructions of an HLO module and each computation's executions per module run."""
    instructions: list[Instruction] = []
    calls: dict[str, list[tuple[str, int | str]]] = collections.defaultdict(
        list
    )  # callee -> callers
    entry, current = None, None
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            if line.startswith("ENTRY"):
                entry = current
            continue
        match = _INSTRUCTION.match(line) if current else None
        if not match:
            continue
        name, result_type, opcode, _ = match.groups()
        instructions.append(Instruction(current, name, opcode, result_type, line))
        trips: int | str = 1
        if opcode == "while":
            found = _TRIP_COUNT.search(line)
            condition = re.search(r"condition=%?([\w.\-]+)", line)
            trips = int(found.group(1)) if found else (condition.group(1) if condition else 1)
        callees = _CALLS.findall(line)
        for group in _CALL_LISTS.findall(line):
            callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
        for callee in callees:
            calls[callee].append((current, trips))
    by_computation = collections.defaultdict(list)
    for ins in instructions:
        by_computation[ins.computation].append(ins)

    @functools.cache
    def runs(computation: str) -> int:
        if computation == entry:
            return 1
        total = 0
        for caller, trips in calls.get(computation, ()):
            if isinstance(trips, str):
                trips = _trip_count(by_computation.get(trips, []))
            total += runs(caller) * trips
        return total

    names = {i.computation for i in instructions}
    found = re.search(r"\bnum_partitions=(\d+)", hlo_text[:20000])
    partitions = int(found.group(1)) if found else 0
    return Program(instructions, {c: runs(c) for c in names}, partitions)


def _trip_count(condition: list[Instruction]) -> int:
    """Iterations of a while loop from its condition `counter < N` (JAX loops count from 0 by 1).

    The TPU compiler's optimized HLO drops `known_trip_count`, but keeps this condition.
    """
    constants = {}
    for ins in condition:
        found = re.search(r"\bconstant\((-?\d+)\)", ins.text)
        if ins.opcode == "constant" and found:
            constants[ins.name] = int(found.group(1))
    for ins in condition:
        if ins.opcode != "compare":
            continue
        operands = re.findall(r"%([\w.\-]+)", ins.text.split("compare(", 1)[1].split(")", 1)[0])
        direction = re.search(r"direction=(\w+)", ins.text)
        if len(operands) == 2 and direction:
            if direction.group(1) == "LT" and operands[1] in constants:
                return max(constants[operands[1]], 0)
            if direction.group(1) == "GT" and operands[0] in constants:
                return max(constants[operands[0]], 0)
    return 1


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
    ids = np.arange(int(np.prod(dims))).reshape(dims)
    return ids.transpose(perm) if perm else ids


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def replica_groups(line: str) -> list[list[int]] | None:
    """The device groups of a collective, from any of XLA's notations; None if absent."""
    found = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", line)
    if found:
        return [_ints(g) for g in re.findall(r"\{([\d,]*)\}", found.group(1))]
    found = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if found:
        shape, dims = _ints(found.group(1)), _ints(found.group(2))
        perm = _ints(found.group(3)) if found.group(3) else None
        return _iota(dims, perm).reshape(shape).tolist()
    found = re.search(
        r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))? "
        r"\{([^}]*)\}",
        line,
    )
    if found:
        axes = re.findall(r"'(\w+)'=(\d+)", found.group(1))
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        if found.group(2):
            perm = _ints(found.group(3)) if found.group(3) else None
            ids = _iota(_ints(found.group(2)), perm).reshape(sizes)
        else:
            ids = np.arange(int(np.prod(sizes))).reshape(sizes)
        chosen = [names.index(a) for a in re.findall(r"'(\w+)'", found.group(4))]
        rest = [i for i in range(len(names)) if i not in chosen]
        size = int(np.prod([sizes[i] for i in chosen])) if chosen else 1
        return ids.transpose(rest + chosen).reshape(-1, size).tolist()
    pairs = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", line)
    if pairs:
        return [_ints(p) for p in re.findall(r"\{(\d+,\d+)\}", pairs.group(1))]
    return None


@dataclasses.dataclass(frozen=True)
class Collective:
    """One kind of collective over one set of mesh axes, totalled over a step.

    Attributes:
        kind: the HLO op (all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute).
        axes: mesh axes its device groups span ("?" when the groups are not known).
        count: executions per step.
        bytes: result bytes per device, summed over the executions.
        largest: the largest single result, bytes.
        group_size: devices per group.
        crosses_slices: a group spans several slices (its traffic goes over DCN).
    """

    kind: str
    axes: tuple[str, ...]
    count: int
    bytes: int
    largest: int
    group_size: int
    crosses_slices: bool


def _slice_of(device) -> int:
    return getattr(device, "slice_index", None) or 0


def _device_coords(program: Program, mesh) -> np.ndarray:
    """Mesh coordinates of the module's partition ids: all devices in mesh order, or, for a
    module compiled per slice, the devices of one slice in mesh order."""
    coords = np.array(list(np.ndindex(mesh.devices.shape)))
    if program.partitions and program.partitions < mesh.devices.size:
        flat = list(mesh.devices.flat)
        first = _slice_of(flat[0])
        coords = coords[[i for i, d in enumerate(flat) if _slice_of(d) == first]]
    return coords


def _group_axes(group: list[int], coords: np.ndarray, mesh) -> tuple[str, ...]:
    rows = coords[[i for i in group if i < len(coords)]]
    if len(rows) < 2:
        return ()
    return tuple(n for n, col in zip(mesh.axis_names, rows.T, strict=True) if len(set(col)) > 1)


def _slice_axes(mesh) -> tuple[str, ...]:
    """The mesh axes along which devices belong to different slices."""
    slices = np.vectorize(_slice_of, otypes=[int])(mesh.devices)
    return tuple(
        name
        for i, name in enumerate(mesh.axis_names)
        if slices.shape[i] > 1 and (np.diff(slices, axis=i) != 0).any()
    )


_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def collectives(program: Program, mesh) -> list[Collective]:
    """The program's collectives per step, one entry per (kind, mesh axes, over DCN or not).

    Collectives between slices appear in a per-slice module as host `send`s to the megascale
    runtime, tagged with the collective they implement; they are counted over the mesh axes
    that span slices.
    """
    coords = _device_coords(program, mesh)
    totals: dict[tuple, list[int]] = {}
    for ins in program.instructions:
        runs = program.runs.get(ins.computation, 0)
        megascale = _MEGASCALE.search(ins.text) if ins.opcode == "send" else None
        base = ins.opcode.removesuffix("-start")
        if megascale:
            base = megascale.group(1).lower().replace("_", "-")
            axes, dcn = _slice_axes(mesh), True
            size = _result_bytes(ins.result_type, largest_only=True)
            group_size = len({_slice_of(d) for d in mesh.devices.flat})
        elif base in COLLECTIVES and not ins.opcode.endswith("-done"):
            size = _result_bytes(ins.result_type, largest_only=ins.opcode.endswith("-start"))
            groups = replica_groups(ins.text)
            axes, dcn = (_group_axes(groups[0], coords, mesh), False) if groups else (("?",), False)
            if not groups:
                group_size = len(coords)
            else:
                group_size = len(groups) if base == "collective-permute" else len(groups[0])
        else:
            continue
        if not runs or base not in COLLECTIVES:
            continue
        entry = totals.setdefault((base, axes, dcn), [0, 0, 0, group_size])
        entry[0] += runs
        entry[1] += runs * size
        entry[2] = max(entry[2], size)
    return sorted(
        (
            Collective(kind, axes, c, b, big, g, dcn)
            for (kind, axes, dcn), (c, b, big, g) in totals.items()
        ),
        key=lambda c: (COLLECTIVES.index(c.kind), c.axes, c.crosses_slices),
    )


def custom_call_runs(program: Program, prefix: str) -> collections.Counter:
    """Executions per step of custom calls whose instruction name starts with `prefix`, by name
    without its numeric suffix (e.g. splash_mha_fwd_segmented_residuals)."""
    counts: collections.Counter = collections.Counter()
    for ins in program.instructions:
        if ins.opcode == "custom-call" and ins.name.startswith(prefix):
            counts[ins.name.split(".")[0]] += program.runs.get(ins.computation, 0)
    return counts


def traffic_bytes(c: Collective) -> float:
    """Bytes each device sends for `c` with bandwidth-optimal algorithms (ring / torus)."""
    n = max(c.group_size, 1)
    share = (n - 1) / n
    if c.kind == "all-reduce":
        return 2 * c.bytes * share
    if c.kind == "reduce-scatter":
        return c.bytes * (n - 1)  # its result is the shard: the input is n times larger
    if c.kind == "collective-permute":
        return float(c.bytes)
    return c.bytes * share  # all-gather (result = whole), all-to-all
