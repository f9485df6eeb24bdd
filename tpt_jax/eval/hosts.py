"""How an evaluation spreads over hosts and chips.

Every JAX process builds the same lm-eval requests (lm-eval sees one process: rank 0 of 1) and
answers a share of them on its own chips; the answers are then gathered so that every process
holds all of them in request order and lm-eval's scoring, identical everywhere, gives the
results one process would. Process 0 writes them.

Why not lm-eval's own data-parallel ranks: its evaluator splits documents by rank but counts
and pads them with torch tensors on `lm.device`, pads short ranks with repeated requests, and
answers nothing to ranks other than 0; splitting the requests here needs neither torch nor
padding, and the answers equal one process's by construction (tests/test_lm_eval.py).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import numpy as np

from tpt_jax.errors import TptError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in process order, on every process."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))
    sizes = np.asarray(sizes).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    # Our own processes wrote these bytes a moment ago: unpickling them trusts nobody else.
    return [pickle.loads(gathered[p, : sizes[p]].tobytes()) for p in range(len(sizes))]


def spread(
    items: Sequence[T],
    answer: Callable[[list[T]], list[R]],
    size: Callable[[T], int] = len,
) -> list[R]:
    """answer(items), computed in shares by the JAX processes and gathered on every one.

    Items are dealt longest first (by `size`) round-robin, so the shares cost about the same.
    Every process must call this with the same items at the same point of its program.
    """
    rank, world = jax.process_index(), jax.process_count()
    order = sorted(range(len(items)), key=lambda i: -size(items[i]))
    mine = order[rank::world]
    local = answer([items[i] for i in mine]) if mine else []
    shares = [local] if world == 1 else allgather_objects(local)
    out: list[Any] = [None] * len(items)
    for p, share in enumerate(shares):
        for k, value in enumerate(share):
            out[order[p + k * world]] = value
    return out


def eval_mesh(cfg) -> jax.sharding.Mesh | None:
    """The mesh an evaluation runs on: this process's chips shaped by the config's mesh (None
    on one chip). A pod config's mesh (sized for every chip of the slice) does not fit one
    host; then the host's chips shard the parameters FSDP-style (the `fsdp` axis), which holds
    a model that fits the slice in as few chips as training does."""
    import dataclasses

    from tpt_jax.generate import local_mesh

    n = len(jax.local_devices())
    try:
        return local_mesh(cfg)
    except TptError:
        log.info("eval: the config's mesh does not fit this host's %d chips; using fsdp=%d", n, n)
        mesh = dataclasses.replace(cfg.mesh, data=1, fsdp=n, tensor=1, dcn_data=1, dcn_fsdp=1)
        return local_mesh(dataclasses.replace(cfg, mesh=mesh))
