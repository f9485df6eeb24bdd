"""The Flax decoder for the Llama-3, Qwen2 and Qwen3 families, and its parameters."""

from tpt_jax.model._decode import Pages, decode_forward, empty_pages, unstack_layers
from tpt_jax.model._decoder import Decoder, remat_policy
from tpt_jax.model._loss import token_nll, weighted_nll_sum
from tpt_jax.model._paged import pallas_unsupported_reason
from tpt_jax.model._params import (
    abstract_params,
    init_params,
    logical_axes,
    param_count,
    param_shapes,
    training_flops_per_token,
)
from tpt_jax.model._store import check_shapes, load_model_config, restore_params, save_model

__all__ = [
    "Decoder",
    "Pages",
    "abstract_params",
    "check_shapes",
    "decode_forward",
    "empty_pages",
    "init_params",
    "load_model_config",
    "logical_axes",
    "pallas_unsupported_reason",
    "param_count",
    "param_shapes",
    "remat_policy",
    "restore_params",
    "save_model",
    "token_nll",
    "training_flops_per_token",
    "unstack_layers",
    "weighted_nll_sum",
]
