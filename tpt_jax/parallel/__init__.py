"""Meshes, logical-axis sharding rules and the shardings derived from them."""

from tpt_jax.parallel._mesh import MESH_AXES, data_parallel_size, make_mesh
from tpt_jax.parallel._rules import (
    DEFAULT_RULES,
    batch_sharding,
    logical_shardings,
    rules_from_config,
)

__all__ = [
    "DEFAULT_RULES",
    "MESH_AXES",
    "batch_sharding",
    "data_parallel_size",
    "logical_shardings",
    "make_mesh",
    "rules_from_config",
]
