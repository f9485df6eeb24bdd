"""Logical axis names -> mesh axes, and the NamedShardings they give parameters and activations.

Defaults follow MaxText's spirit. Parameters are sharded over `fsdp` along their embed axis and
over `tensor` along heads / MLP width / vocab. Activations (the `activation_*` names the decoder
constrains its intermediate values with) split the batch over every data-parallel axis and the
heads, MLP width and vocab over `tensor`; their sequence axes stay whole unless a rule maps them
(`activation_norm_length: tensor` is sequence parallelism of the residual stream). The residual
stream's model width (`activation_embed`) stays whole, as in Megatron: split over `tensor` inside
a loop (gradient accumulation, the chunked loss) XLA's partitioner computed wrong values on a
data x fsdp x tensor mesh (tests/test_sharding.py), so the config refuses that rule.
A dimension that a mesh axis does not divide stays replicated along that axis (reported once).
"""

from __future__ import annotations

import functools
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
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_norm_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)

_log = logging.getLogger(__name__)


def rules_from_config(rules: Sequence) -> Rules:
    """cfg.mesh.rules ([[logical, mesh_axis | [axes] | null], ...]) over the defaults.

    A configured rule replaces the default rule of the same logical name; names without a
    configured rule keep their default, so a config only lists what it changes.
    """
    given = tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules)
    names = {name for name, _ in given}
    return given + tuple(rule for rule in DEFAULT_RULES if rule[0] not in names)


@functools.lru_cache(maxsize=256)
def _report_once(message: str) -> None:
    _log.info(message)


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh, where: str) -> PartitionSpec:
    """`spec` with every mesh axis dropped that does not divide its dimension of `shape`."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = 1
        for name in names:
            size *= mesh.shape[name]
        if names and dim % size:
            _report_once(
                f"{where}: dimension {dim} is not divisible by mesh axes {names}; replicated"
            )
            names = ()
        fitted.append(names[0] if len(names) == 1 else (names or None))
    return PartitionSpec(*fitted)


def mesh_spec(
    logical: Sequence[str | None], shape: tuple[int, ...], mesh: Mesh, rules: Rules, where: str
) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose axes carry the `logical` names."""
    spec = nn.logical_to_mesh(PartitionSpec(*logical), rules)
    return fit_spec(spec, shape, mesh, where)


def logical_shardings(boxed_tree, mesh: Mesh, rules: Rules):
    """NamedShardings for a tree whose leaves are boxed with logical names (flax metadata).

    Leaves without names (scalars such as an optimizer step count) are replicated.
    """
    specs = nn.get_partition_spec(boxed_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.unbox(boxed_tree)

    def to_sharding(path, spec, shape):
        return NamedSharding(mesh, fit_spec(spec, shape.shape, mesh, jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(
        to_sharding, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of every [global_batch, seq_len] array of a batch."""
    spec = nn.logical_to_mesh(PartitionSpec("batch", "length"), rules)
    return NamedSharding(mesh, spec)
