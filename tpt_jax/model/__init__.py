"""The Flax decoder for the Llama-3, Qwen2 and Qwen3 families, and its parameters."""

from tpt_jax.model._decoder import Decoder, remat_policy
from tpt_jax.model._loss import token_nll, weighted_nll_sum
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
    "remat_policy",
    "token_nll",
    "training_flops_per_token",
    "weighted_nll_sum",
]
