"""The decoder: embedding, a scanned stack of blocks, final norm, output projection.

Layers are stacked with `nn.scan`, so every block parameter has a leading `layers` axis
(compile time independent of depth); the remat policy wraps the block before the scan.

Parameter tree (shapes, E=hidden, H/KV heads, D=head_dim, M=mlp, L=layers, V=vocab):
    embedding                           [V, E]
    layers/input_norm/scale             [L, E]
    layers/attn/{q}/kernel              [L, E, H, D]     (+ bias [L, H, D] with qkv_bias)
    layers/attn/{k,v}/kernel            [L, E, KV, D]    (+ bias [L, KV, D])
    layers/attn/{q,k}_norm/scale        [L, D]           (qk_norm only)
    layers/attn/o/kernel                [L, H, D, E]
    layers/post_attn_norm/scale         [L, E]
    layers/mlp/{gate,up}/kernel         [L, E, M]
    layers/mlp/down/kernel              [L, M, E]
    final_norm/scale                    [E]
    lm_head                             [E, V]           (untied only)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpt_jax.config import ModelConfig
from tpt_jax.model._layers import DecoderLayer, RMSNorm, _param, contract

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Decoder(nn.Module):
    """Causal LM over packed rows (training, evaluation). Generation runs the same layers one by
    one over a key/value cache (`tpt_jax.think.generate`).

    Call:
        tokens: int [B, T]; positions: int [B, T] (restart at 0 per segment; default arange);
        segment_ids: int [B, T] (attention stays within equal ids; default all ones).
    Returns:
        logits float32 [B, T, V].
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None):
        c = self.cfg
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        init = nn.initializers.normal(c.init_std)
        table = _param(
            self, "embedding", init, (c.vocab_size, c.hidden_size), ("vocab", "embed"), c
        )
        dtype = jnp.dtype(c.dtype)
        x = jnp.take(table, tokens, axis=0).astype(dtype)

        block = DecoderLayer
        if c.remat_policy != "none":
            block = nn.remat(block, policy=_REMAT_POLICIES[c.remat_policy], prevent_cse=False)
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=c.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(c, name="layers")(x, positions, segment_ids)
        x = RMSNorm(c, name="final_norm")(x)

        if c.tie_embeddings:
            head = table.T
        else:
            head = _param(
                self, "lm_head", init, (c.hidden_size, c.vocab_size), ("embed", "vocab"), c
            )
        return contract(x, head.astype(dtype), 1, jnp.float32)
