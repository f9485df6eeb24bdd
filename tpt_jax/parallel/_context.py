"""The mesh and rules a traced function shards its activations with.

A step function (training, evaluation) is traced inside `activation_sharding(mesh, rules)`; the
decoder then calls `constrain(x, logical_names)` on its intermediate values. Outside such a
context (tests on one device, generation) `constrain` returns its input, so the model has one
code path everywhere.

Why constraints at all: without them XLA's sharding propagation is free to keep the weights in
place and move activations instead, which on a pod made every chip hold the activations of the
whole global batch. Pinning the batch axis of every activation to the data-parallel mesh axes
leaves XLA one sensible plan: gather each layer's weights, compute on the local batch, and
reduce-scatter the weight gradients (FSDP).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding

from tpt_jax.parallel._rules import Rules, mesh_spec

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "tpt_activation_sharding", default=None
)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules) -> Iterator[None]:
    """Within this block, `constrain` pins activations to `mesh` by `rules` (no-op if mesh is None)."""
    token = _ACTIVE.set(None if mesh is None else (mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Rules] | None:
    """(mesh, rules) of the enclosing `activation_sharding` block, or None."""
    return _ACTIVE.get()


def local_shape(shape: tuple[int, ...], logical: Sequence[str | None]) -> tuple[int, ...]:
    """Each device's share of an array of `shape` constrained to `logical` (shape itself when
    no mesh is active)."""
    active = _ACTIVE.get()
    if active is None:
        return tuple(shape)
    mesh, rules = active
    spec = mesh_spec(logical, shape, mesh, rules, f"activation {tuple(logical)}")
    return NamedSharding(mesh, spec).shard_shape(tuple(shape))


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """x with a sharding constraint from its axes' logical names (one name or None per axis)."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    spec = mesh_spec(logical, x.shape, mesh, rules, f"activation {tuple(logical)}")
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
