"""Decoder building blocks: RMSNorm, projections, grouped-query attention, SwiGLU, one block.

Every parameter is created with logical axis names, so `tpt_jax.parallel` rules can map it onto
any mesh. Parameters are stored in `param_dtype` and cast to `dtype` for compute.

Logical axes: vocab, embed, q_heads, kv_heads, head_dim, mlp, norm (and layers, added by scan).
"""

from __future__ import annotations

import functools
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def contract(x: jnp.ndarray, w: jnp.ndarray, n_in: int, out_dtype=None) -> jnp.ndarray:
    """x [..., *in] . w [*in, *out] -> [..., *out], contracting the n_in trailing axes of x.

    `out_dtype` (e.g. float32 logits from bfloat16 operands) sets the accumulation/output type.
    The backward pass is written out so that both gradients come out of one matmul each in
    their natural layout: dx = g . w over the out axes, dw = x . g over the leading axes. Left
    to autodiff, the weight gradient comes out transposed and XLA (on CPU at least) copies the
    activation gradient into a transposed layout for it, which cost ~1/3 of a train step.
    """
    return _contract_fwd(x, w, n_in, out_dtype)[0]


def _contract_fwd(x, w, n_in, out_dtype):
    dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
    return jax.lax.dot_general(x, w, dims, preferred_element_type=out_dtype), (x, w)


def _contract_bwd(n_in, out_dtype, residuals, g):
    x, w = residuals
    lead = x.ndim - n_in
    g = g.astype(x.dtype)
    dx = jax.lax.dot_general(
        g, w, ((tuple(range(lead, g.ndim)), tuple(range(n_in, w.ndim))), ((), ()))
    )
    batch = tuple(range(lead))
    dw = jax.lax.dot_general(x, g, ((batch, batch), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


contract.defvjp(_contract_fwd, _contract_bwd)


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
        y = contract(x.astype(dtype), kernel.astype(dtype), len(self.in_shape))
        if self.use_bias:
            out_axes = self.axes[len(self.in_shape) :]
            bias = _param(self, "bias", nn.initializers.zeros, self.out_shape, out_axes, self.cfg)
            y = y + bias.astype(dtype)
        return y


def _heads_major(q, k, v):
    """[B, T, H, D], [B, S, KV, D] x2 -> [B, KV, G, T, D], [B, KV, S, D] x2 (G = H / KV).

    Batched matmuls over contiguous heads run far faster on CPU than contracting across the
    sequence-major layout, so attention transposes once on the way in and once on the way out.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    qh = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _seq_major(out):
    """[B, KV, G, T, D] -> [B, T, H, D]."""
    b, kv, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)


def _attend(qh, kh, vh, mask):
    """Heads-major softmax attention: qh [B, KV, G, T, D], kh/vh [B, KV, S, D], mask [B, T, S]."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", qh, kh, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * (qh.shape[-1] ** -0.5), _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(vh.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, vh)


def causal_attention(q, k, v, segment_ids, block: int):
    """Self-attention over packed rows: causal, never across segments.

    Queries are processed in blocks of `block`; block i only reads keys [0, end of block i),
    which skips the masked upper triangle (about half the work at long lengths) and keeps each
    block's scores small.

    Args:
        q: [B, T, H, D]; k, v: [B, T, KV, D]; segment_ids: int [B, T] (0 = padding).
    """
    length = q.shape[1]
    block = min(block or length, length)
    qh, kh, vh = _heads_major(q, k, v)
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        causal = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        same = segment_ids[:, start:end, None] == segment_ids[:, None, :end]
        mask = causal[None] & same
        outs.append(_attend(qh[:, :, :, start:end], kh[:, :, :end], vh[:, :, :end], mask))
    return _seq_major(jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0])


def _decode_attention(q, k, v, cache, lengths):
    """One new token per row against a heads-major cache; returns (out [B, 1, H, D], new cache)."""
    b, _, h, d = q.shape
    k_cache, v_cache = cache
    kv = k_cache.shape[1]
    rows = jnp.arange(b)
    k_cache = k_cache.at[rows, :, lengths].set(k[:, 0].astype(k_cache.dtype))
    v_cache = v_cache.at[rows, :, lengths].set(v[:, 0].astype(v_cache.dtype))
    qg = q.reshape(b, kv, h // kv, d)
    scores = jnp.einsum("bkgd,bksd->bkgs", qg, k_cache, preferred_element_type=jnp.float32)
    visible = jnp.arange(k_cache.shape[2])[None, :] <= lengths[:, None]
    scores = jnp.where(visible[:, None, None], scores * (d**-0.5), _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgs,bksd->bkgd", probs, v_cache)
    return out.reshape(b, 1, h, d), (k_cache, v_cache)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v bias and q/k RMSNorm.

    Without `cache`, attends causally over the packed row and returns (out, (k, v)) so that a
    prefill can keep its keys and values ([B, T, KV, D]). With `cache` = (k_cache, v_cache),
    heads-major [B, KV, S, D], and `lengths` [B], x holds one new token per row: its key/value
    are written at position lengths[b], and it attends to cache positions 0..lengths[b].
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache=None, lengths=None):
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
        if cache is None:
            out = causal_attention(q, k, v, segment_ids, c.attention_block)
            new_cache = (k, v)
        else:
            out, new_cache = _decode_attention(q, k, v, cache, lengths)
        out = Projection(c, (h, d), (e,), ("q_heads", "head_dim", "embed"), name="o")(out)
        return out, new_cache


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
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)).

    Scan-shaped: (x, ..., cache) -> (x, kv). `kv` is this layer's keys and values (the updated
    cache when decoding) if `keep_kv`, else None, so training keeps nothing extra.
    """

    cfg: ModelConfig
    keep_kv: bool = False

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache=None, lengths=None):
        attn, kv = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="input_norm")(x), positions, segment_ids, cache, lengths
        )
        h = x + attn
        out = h + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attn_norm")(h))
        return out, (kv if self.keep_kv else None)
