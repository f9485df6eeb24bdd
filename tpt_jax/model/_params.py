"""Parameter creation and metadata for the decoder, without running it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpt_jax.config import ModelConfig
from tpt_jax.model._decoder import Decoder

_SHAPE_ONLY_LENGTH = 1


def _init_fn(cfg: ModelConfig):
    model = Decoder(cfg)
    tokens = jnp.zeros((1, _SHAPE_ONLY_LENGTH), jnp.int32)
    return lambda rng: model.init(rng, tokens)["params"]


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Randomly initialised parameters (plain arrays, logical-axis boxes removed)."""
    return nn.unbox(jax.jit(_init_fn(cfg))(rng))


def abstract_params(cfg: ModelConfig) -> dict:
    """Shapes and dtypes of the parameters, boxed with their logical axis names; no compute."""
    return jax.eval_shape(_init_fn(cfg), jax.random.key(0))


def logical_axes(cfg: ModelConfig) -> dict:
    """Tree like the parameters whose leaves are PartitionSpecs of logical axis names."""
    return nn.get_partition_spec(abstract_params(cfg))


def param_shapes(cfg: ModelConfig) -> dict:
    """Tree like the parameters whose leaves are jax.ShapeDtypeStruct."""
    return nn.unbox(abstract_params(cfg))


def param_count(cfg: ModelConfig) -> int:
    return sum(x.size for x in jax.tree.leaves(param_shapes(cfg)))


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Model FLOPs to train on one token: 6 x matmul parameters + 12 x L x T x H x D attention.

    The embedding lookup is not a matmul; the output projection is (tied or not). Attention is
    counted over the full sequence, as in the usual MFU formula (PaLM, MaxText).
    """
    shapes = param_shapes(cfg)
    matmul = sum(x.size for x in jax.tree.leaves(shapes["layers"]))
    matmul += cfg.hidden_size * cfg.vocab_size
    attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.resolved_head_dim
    return 6.0 * matmul + attention
