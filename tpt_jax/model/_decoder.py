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
from tpt_jax.model._attention import RESIDUALS_NAME
from tpt_jax.model._layers import RESIDUAL, DecoderLayer, RMSNorm, _param, contract
from tpt_jax.parallel import constrain

_QKV = ("query_proj", "key_proj", "value_proj")
_EXCEPT_MLP = (*_QKV, "attention_out", RESIDUALS_NAME, "out_proj")
_SAVED_NAMES = {
    "save_qkv_proj": _QKV,
    "save_dot_except_mlp": _EXCEPT_MLP,
    "save_dot_except_mlp_in": (*_EXCEPT_MLP, "mlp_out"),
    "minimal": (*_EXCEPT_MLP, "mlp_gate", "mlp_up", "mlp_out"),
}
_OFFLOADED_NAMES = {"offload_qkv_proj": _QKV, "offload_dot_except_mlp": _EXCEPT_MLP}


def remat_policy(name: str):
    """The jax.checkpoint policy of a `model.remat_policy` name (see ModelConfig)."""
    policies = jax.checkpoint_policies
    if name in _SAVED_NAMES:
        return policies.save_only_these_names(*_SAVED_NAMES[name])
    if name in _OFFLOADED_NAMES:
        return policies.save_and_offload_only_these_names(
            names_which_can_be_saved=[],
            names_which_can_be_offloaded=list(_OFFLOADED_NAMES[name]),
            offload_src="device",
            offload_dst="pinned_host",
        )
    return {
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots,
        "dots_no_batch": policies.checkpoint_dots_with_no_batch_dims,
    }[name]


class Decoder(nn.Module):
    """Causal LM over packed rows (training, evaluation). Generation runs the same layers one by
    one over a paged key/value cache (`decode_forward`).

    Call:
        tokens: int [B, T]; positions: int [B, T] (restart at 0 per segment; default arange);
        segment_ids: int [B, T] (attention stays within equal ids; default all ones);
        return_hidden: return what the logits are made of instead of the logits.
    Returns:
        logits float32 [B, T, V]; with return_hidden, (final normed hidden states [B, T, E],
        output projection [E, V]), both in cfg.dtype, for a loss that never holds all the
        logits at once (`token_nll`).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, return_hidden=False):
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
        # Cast before the lookup: a sharded table is then gathered in the compute dtype.
        x = constrain(jnp.take(table.astype(dtype), tokens, axis=0), RESIDUAL)

        block = DecoderLayer
        if c.remat_policy != "none":
            block = nn.remat(block, policy=remat_policy(c.remat_policy), prevent_cse=False)
        stack = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast),
            length=c.num_layers,
            unroll=min(c.scan_unroll, c.num_layers),
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
        head = head.astype(dtype)
        if return_hidden:
            return x, head
        logits = contract(x, head, 1, jnp.float32)
        return constrain(logits, ("activation_batch", "activation_length", "activation_vocab"))
