"""The train state's shardings, derived from the parameters' logical axes, and its creation.

Optimizer-state shardings are never written by hand: `jax.eval_shape` runs the optimizer's init
on the boxed abstract parameters, so moment trees inherit each parameter's logical names, and
scalars (step counts) come out replicated.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from tpt_jax.config import ModelConfig
from tpt_jax.model import abstract_params, init_params
from tpt_jax.parallel import logical_shardings
from tpt_jax.train._step import TrainState


def _new_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation, mesh: Mesh, rules):
    """(abstract TrainState of ShapeDtypeStructs carrying shardings, TrainState of NamedShardings)."""
    boxed = jax.eval_shape(lambda p: _new_state(p, tx), abstract_params(model_cfg))
    shardings = logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        nn.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def bytes_per_device(abstract) -> int:
    """Bytes of one device's shards of a tree of ShapeDtypeStructs carrying shardings."""
    return sum(
        math.prod(s.sharding.shard_shape(s.shape)) * s.dtype.itemsize
        for s in jax.tree.leaves(abstract)
    )


def init_state(model_cfg: ModelConfig, tx, shardings: TrainState, rng: jax.Array) -> TrainState:
    """A fresh state created directly in its shards (no full copy on one device)."""
    make = jax.jit(lambda key: _new_state(init_params(model_cfg, key), tx), out_shardings=shardings)
    return make(rng)


def state_from_params(params: dict, tx, shardings: TrainState) -> TrainState:
    """A state around given (already sharded) parameters with a fresh optimizer: mid-training."""
    return jax.jit(lambda p: _new_state(p, tx), out_shardings=shardings)(params)
