"""TPU slices by gcloud accelerator type, as devices a step can be compiled for on any machine.

With libtpu installed (`pip install "jax[tpu]"`), `jax.experimental.topologies` describes the
devices of any TPU slice without the hardware; `jax.jit(...).lower(...).compile()` against them
runs the real TPU compiler. The chip figures below are the ones the compiler and Google's
published specifications give (HBM as the compiler reports it available per device).
"""

from __future__ import annotations

import dataclasses
import math
import os

from tpt_jax.errors import TptError

_GIB = 1 << 30


@dataclasses.dataclass(frozen=True, kw_only=True)
class TpuChip:
    """One TPU chip as a JAX device.

    Attributes:
        generation: the name in topology descriptions ("v5p", "v5e", "v6e").
        hbm_bytes: HBM the compiler lets one program use (as it reports on overflow).
        peak_flops: dense bfloat16 FLOP/s.
        hbm_bytes_per_s: HBM bandwidth.
        ici_bytes_per_s: inter-chip interconnect bandwidth per chip, all links, one direction.
        dcn_bytes_per_s: data-center network bandwidth per chip between slices (assumed: a
            host's 200 Gbit/s shared by its chips).
        dims: 3 for a 3D torus (v5p), 2 for a 2D one (v5e, v6e).
    """

    generation: str
    hbm_bytes: int
    peak_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    dcn_bytes_per_s: float
    dims: int


CHIPS = {
    "v5p": TpuChip(
        generation="v5p",
        hbm_bytes=int(95.74 * _GIB),
        peak_flops=459e12,
        hbm_bytes_per_s=2.765e12,
        ici_bytes_per_s=4800e9 / 8,
        dcn_bytes_per_s=200e9 / 8 / 4,
        dims=3,
    ),
    "v5e": TpuChip(
        generation="v5e",
        hbm_bytes=int(15.75 * _GIB),
        peak_flops=197e12,
        hbm_bytes_per_s=819e9,
        ici_bytes_per_s=1600e9 / 8,
        dcn_bytes_per_s=200e9 / 8 / 4,
        dims=2,
    ),
    "v6e": TpuChip(
        generation="v6e",
        hbm_bytes=int(31.25 * _GIB),
        peak_flops=918e12,
        hbm_bytes_per_s=1640e9,
        ici_bytes_per_s=3584e9 / 8,
        dcn_bytes_per_s=200e9 / 8 / 4,
        dims=2,
    ),
}
# gcloud names -> generation; v5p counts TensorCores (2 per chip), v5e and v6e count chips.
_ALIASES = {"v5p": ("v5p", 2), "v5litepod": ("v5e", 1), "v5e": ("v5e", 1), "v6e": ("v6e", 1)}
LIBTPU_HINT = 'pip install "jax[tpu]==0.10.2"  (brings libtpu; no TPU needed to compile)'


def _torus_shape(chips: int, dims: int) -> tuple[int, ...]:
    """The slice shape Cloud TPU uses for `chips` chips: 64 v5p chips are 4x4x4, 256 v6e 16x16.

    From the smallest slice (2x2x1, or 2x2), every doubling doubles the last of the smallest
    dimensions: 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, ... and 2x4, 4x4, 4x8, 8x8, ...
    """
    if chips == 1:
        return (1,) * dims
    if chips < 4 or chips & (chips - 1):
        raise ValueError(f"{chips} chips is not a slice size (4, 8, 16, ... chips)")
    shape = [2, 2] + [1] * (dims - 2)
    while math.prod(shape) < chips:
        if dims == 3 and shape[2] < shape[0]:
            shape[2] *= 2
            continue
        smallest = min(shape)
        last = max(i for i, s in enumerate(shape) if s == smallest)
        shape[last] *= 2
    return tuple(shape)


def parse_topology(name: str) -> tuple[TpuChip, str, int]:
    """(chip, topology name for jax, chips) of "v5p-128", "v6e-256", "v5litepod-16" or "v5p:4x4x4"."""
    if ":" in name:
        generation, _, shape = name.partition(":")
        if generation not in CHIPS:
            raise TptError(f"topology {name!r}: unknown TPU generation (one of {', '.join(CHIPS)})")
        try:
            chips = math.prod(int(s) for s in shape.split("x"))
        except ValueError:
            raise TptError(f"topology {name!r}: expected a shape such as 4x4x4") from None
        return CHIPS[generation], name, chips
    family, _, count = name.rpartition("-")
    if family not in _ALIASES or not count.isdigit():
        known = "v5p-N, v5litepod-N, v6e-N or a shape such as v5p:4x4x4"
        raise TptError(f"topology {name!r} is not a TPU type tpt compile knows ({known})")
    generation, cores_per_chip = _ALIASES[family]
    chip = CHIPS[generation]
    chips = max(1, int(count) // cores_per_chip)
    try:
        shape = _torus_shape(chips, chip.dims)
    except ValueError as e:
        raise TptError(f"topology {name!r}: {e}") from None
    return chip, f"{generation}:{'x'.join(map(str, shape))}", chips


def topology_devices(name: str, slices: int = 1) -> tuple[TpuChip, list]:
    """(chip, devices) of `slices` slices of TPU type `name`, for ahead-of-time compilation."""
    chip, topology, chips = parse_topology(name)
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
    # Compiling never touches a local TPU, so it need not own libtpu's one-process lock (held by
    # a training process on a TPU VM, or by another compile).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401
        from jax.experimental import topologies
    except ImportError:
        raise TptError(f"compiling for a TPU needs libtpu: {LIBTPU_HINT}") from None
    kwargs = {"num_slices": slices} if slices > 1 else {}
    if chips < 4:  # a slice smaller than one host
        kwargs["chips_per_host_bounds"] = (1, 1, 1) if chips == 1 else (2, 1, 1)
    try:
        description = topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs)
    except Exception as e:  # libtpu raises plain RuntimeErrors / XlaRuntimeErrors
        raise TptError(f"libtpu cannot describe topology {topology}: {e}") from None
    return chip, list(description.devices)
