"""Meshes, logical-axis sharding rules and the shardings derived from them."""

from tpt_jax.parallel._context import activation_sharding, active_mesh, constrain, local_shape
from tpt_jax.parallel._mesh import MESH_AXES, data_parallel_size, make_mesh
from tpt_jax.parallel._rules import (
    DEFAULT_RULES,
    Rules,
    batch_sharding,
    fit_spec,
    logical_shardings,
    mesh_spec,
    rules_from_config,
)
from tpt_jax.parallel._topology import CHIPS, LIBTPU_HINT, TpuChip, parse_topology, topology_devices

__all__ = [
    "CHIPS",
    "DEFAULT_RULES",
    "LIBTPU_HINT",
    "MESH_AXES",
    "Rules",
    "TpuChip",
    "activation_sharding",
    "active_mesh",
    "batch_sharding",
    "constrain",
    "data_parallel_size",
    "fit_spec",
    "local_shape",
    "logical_shardings",
    "make_mesh",
    "mesh_spec",
    "parse_topology",
    "rules_from_config",
    "topology_devices",
]
