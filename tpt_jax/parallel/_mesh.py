"""The device mesh from config: axes (data, fsdp, tensor), DCN factors folded in for multi-slice."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from tpt_jax.config import Config, validate_for_devices

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(cfg: Config, devices: list | None = None, training: bool = True) -> Mesh:
    """A Mesh over `devices` (default: all) shaped by cfg.mesh (`training`: a mesh the training
    batch must split over, see `validate_for_devices`).

    Across slices (dcn_data / dcn_fsdp > 1) the DCN factor multiplies the axis of the same name,
    and the device order keeps each slice's ICI axes contiguous.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = validate_for_devices(cfg, len(devices), training)
    ici = (sizes["data"], sizes["fsdp"], sizes["tensor"])
    dcn = (sizes["dcn_data"], sizes["dcn_fsdp"], 1)
    if np.prod(dcn) > 1:
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    elif devices[0].platform == "tpu" or len(devices) == len(jax.devices()):
        # All devices, or a TPU slice described for ahead-of-time compilation: lay the mesh
        # axes onto the physical torus.
        grid = mesh_utils.create_device_mesh(ici, devices=devices)
    else:  # a sub-mesh (tests, restore onto fewer devices): keep the given order
        grid = np.asarray(devices).reshape(ici)
    # Auto axes: shardings come from explicit in/out shardings and logical constraints.
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]
