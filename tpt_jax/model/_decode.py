"""The decoder's cached form: the same layers as `Decoder`, run over a paged key/value cache.

Training runs the scanned stack (`Decoder`); generation runs the layers one by one over
unstacked parameters and the pages of `_paged.py`, writing each token's keys and values as it
goes. Both forms share every layer, so they cannot drift apart.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tpt_jax.config import ModelConfig
from tpt_jax.model._layers import DecoderLayer, RMSNorm, contract
from tpt_jax.model._paged import PageView

# Per layer (keys, values), each [KV, N, P, D]: the paged cache of `decode_forward`.
Pages = list[tuple[jax.Array, jax.Array]]


def unstack_layers(params: dict) -> dict:
    """The decoder's parameters with the stacked layer axis split into a list of layers.

    Generation runs layer by layer over this layout: reading a layer out of the stacked arrays at
    every step would copy its weights (CPU XLA does not feed a slice to a matmul in place), which
    costs more than the decode step itself.
    """
    layers = params["layers"]
    if isinstance(layers, list):
        return params
    count = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)]}


def empty_pages(cfg: ModelConfig, num_pages: int, page_size: int) -> Pages:
    """A zeroed page pool: per layer (keys, values), each [KV, num_pages, page_size, D]."""
    shape = (cfg.num_kv_heads, num_pages, page_size, cfg.resolved_head_dim)
    return [
        (jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.num_layers)
    ]


def decode_forward(
    params: dict,
    cfg: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    pages: Pages,
    page_table: jax.Array,
    write: jax.Array,
    live_pages: int,
    logits_at: jax.Array | None = None,
    kernel: str = "xla",
    mesh: jax.sharding.Mesh | None = None,
    kv_axes: str | tuple[str, ...] | None = None,
) -> tuple[jax.Array, Pages]:
    """Tokens [B, T] at `positions` [B, T] through the layers (unstacked parameters), each token's
    keys and values stored in its row's pages (where `write` [B, T] is set), each token attending
    to its row's positions up to its own.

    Args:
        page_table: int32 [B, max_pages]; live_pages: the leading entries read (static), covering
            every position; logits_at: int [B], the one token per row whose logits are wanted
            (all of them when None); kernel, mesh, kv_axes: see `PageView`.
    Returns:
        (float32 logits [B, V] with `logits_at`, else [B, T, V]; the updated pages).
    """
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(params["embedding"], tokens, axis=0).astype(dtype)
    segment_ids = jnp.ones_like(tokens)
    layer = DecoderLayer(cfg)
    updated = []
    for layer_params, (k_pages, v_pages) in zip(params["layers"], pages, strict=True):
        view = PageView(k_pages, v_pages, page_table, write, live_pages, kernel, mesh, kv_axes)
        x, view = layer.apply({"params": layer_params}, x, positions, segment_ids, view)
        updated.append((view.k_pages, view.v_pages))
    if logits_at is not None:
        x = x[jnp.arange(x.shape[0]), logits_at]
    x = RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
    head = params["embedding"].T if cfg.tie_embeddings else params["lm_head"]
    return contract(x, head.astype(dtype), 1, jnp.float32), updated
