"""Logical axis names -> mesh axes, and the NamedShardings they give parameters and batches.

Defaults follow MaxText's spirit: the batch is split over every data-parallel axis; parameters are
sharded over `fsdp` along their embed axis and over `tensor` along heads / MLP width / vocab.
A dimension that a mesh axis does not divide stays replicated along that axis (reported once).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("length", None),
)

_log = logging.getLogger(__name__)


def rules_from_config(rules: Sequence) -> Rules:
    """cfg.mesh.rules ([[logical, mesh_axis | [axes] | null], ...]) or the defaults if empty."""
    if not rules:
        return DEFAULT_RULES
    return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)


def _fit(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = 1
        for name in names:
            size *= mesh.shape[name]
        if names and dim % size:
            _log.info(
                "%s: dimension %d is not divisible by mesh axes %s; replicated", where, dim, names
            )
            names = ()
        fitted.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*fitted)


def logical_shardings(boxed_tree, mesh: Mesh, rules: Rules):
    """NamedShardings for a tree whose leaves are boxed with logical names (flax metadata).

    Leaves without names (scalars such as an optimizer step count) are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.unbox(boxed_tree)

    def to_sharding(path, spec, shape):
        return NamedSharding(mesh, _fit(spec, shape.shape, mesh, jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(
        to_sharding, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of every [global_batch, seq_len] array of a batch."""
    spec = nn.logical_to_mesh(PartitionSpec("batch", "length"), rules)
    return NamedSharding(mesh, spec)
