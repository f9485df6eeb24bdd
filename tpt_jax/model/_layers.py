"""Decoder building blocks: RMSNorm, projections, grouped-query attention, SwiGLU, one block.

Every parameter is created with logical axis names, so `tpt_jax.parallel` rules can map it onto
any mesh. Parameters are stored in `param_dtype` and cast to `dtype` for compute.

Logical axes: vocab, embed, q_heads, kv_heads, head_dim, mlp, norm (and layers, added by scan).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tpt_jax.config import ModelConfig
from tpt_jax.model._rope import apply_rope, inverse_frequencies

# Large negative score for masked keys: finite, so a fully masked row cannot produce NaN.
_MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str], cfg):
    boxed = nn.with_logical_partitioning(init, tuple(axes))
    return module.param(name, boxed, tuple(shape), jnp.dtype(cfg.param_dtype))


class RMSNorm(nn.Module):
    """y = x / rms(x) * scale, normalised in float32 (as HF does), returned in cfg.dtype."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",), self.cfg)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        dtype = jnp.dtype(self.cfg.dtype)
        return y.astype(dtype) * scale.astype(dtype)


class Projection(nn.Module):
    """A linear map contracting the leading `contract` input axes: kernel [*in_shape, *out_shape]."""

    cfg: ModelConfig
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        init = nn.initializers.normal(self.cfg.init_std)
        kernel = _param(self, "kernel", init, self.in_shape + self.out_shape, self.axes, self.cfg)
        dtype = jnp.dtype(self.cfg.dtype)
        n_in = len(self.in_shape)
        contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
        y = jax.lax.dot_general(x.astype(dtype), kernel.astype(dtype), (contract, ((), ())))
        if self.use_bias:
            out_axes = self.axes[n_in:]
            bias = _param(self, "bias", nn.initializers.zeros, self.out_shape, out_axes, self.cfg)
            y = y + bias.astype(dtype)
        return y


def attention_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Causal mask that never crosses packed segments: bool [B, T, T] (query, key)."""
    length = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal[None] & same


def grouped_attention(q, k, v, mask):
    """Softmax attention with grouped key/value heads.

    Args:
        q: [B, T, H, D]; k, v: [B, S, KV, D] with H a multiple of KV; mask: bool [B, T, S].

    Returns:
        [B, T, H, D] in v's dtype. Scores and softmax run in float32.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d**-0.5)
    scores = jnp.where(mask[:, None, None], scores, _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v bias and q/k RMSNorm."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask):
        c = self.cfg
        e, h, kv, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.resolved_head_dim
        q = Projection(c, (e,), (h, d), ("embed", "q_heads", "head_dim"), c.qkv_bias, name="q")(x)
        k = Projection(c, (e,), (kv, d), ("embed", "kv_heads", "head_dim"), c.qkv_bias, name="k")(x)
        v = Projection(c, (e,), (kv, d), ("embed", "kv_heads", "head_dim"), c.qkv_bias, name="v")(x)
        if c.qk_norm:
            q = RMSNorm(c, name="q_norm")(q)
            k = RMSNorm(c, name="k_norm")(k)
        inv_freq = inverse_frequencies(c)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        out = grouped_attention(q, k, v, mask)
        return Projection(c, (h, d), (e,), ("q_heads", "head_dim", "embed"), name="o")(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        gate = Projection(c, (c.hidden_size,), (c.mlp_dim,), ("embed", "mlp"), name="gate")(x)
        up = Projection(c, (c.hidden_size,), (c.mlp_dim,), ("embed", "mlp"), name="up")(x)
        hidden = nn.silu(gate) * up
        return Projection(c, (c.mlp_dim,), (c.hidden_size,), ("mlp", "embed"), name="down")(hidden)


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)). Scan-shaped: (carry, _) -> (carry, None)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask):
        h = x + Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="input_norm")(x), positions, mask
        )
        out = h + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attn_norm")(h))
        return out, None
