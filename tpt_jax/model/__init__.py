"""The Flax decoder for the Llama-3, Qwen2 and Qwen3 families, and its parameters."""

from tpt_jax.model._decoder import Decoder
from tpt_jax.model._params import (
    abstract_params,
    init_params,
    logical_axes,
    param_count,
    param_shapes,
    training_flops_per_token,
)

__all__ = [
    "Decoder",
    "abstract_params",
    "init_params",
    "logical_axes",
    "param_count",
    "param_shapes",
    "training_flops_per_token",
]
