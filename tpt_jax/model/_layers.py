"""Decoder building blocks: RMSNorm, projections, grouped-query attention, SwiGLU, one block.

Every parameter is created with logical axis names, so `tpt_jax.parallel` rules can map it onto
any mesh. Parameters are stored in `param_dtype` and cast to `dtype` for compute.

Logical axes: vocab, embed, q_heads, kv_heads, head_dim, mlp, norm (and layers, added by scan).
Activations are pinned by `activation_*` names (a no-op outside `parallel.activation_sharding`),
and the projections carry `checkpoint_name`s that the remat policies select by: query_proj,
key_proj, value_proj, attention_out, out_proj, mlp_gate, mlp_up, mlp_out.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from tpt_jax.config import ModelConfig
from tpt_jax.model._attention import causal_attention
from tpt_jax.model._paged import PageView, paged_attention, write_pages
from tpt_jax.model._rope import apply_rope, inverse_frequencies
from tpt_jax.parallel import constrain

# Logical names of the activations the layers constrain (tpt_jax.parallel rules map them).
RESIDUAL = ("activation_batch", "activation_norm_length", "activation_embed")
Q_HEADS = ("activation_batch", "activation_length", "activation_heads", None)
KV_HEADS = ("activation_batch", "activation_length", "activation_kv_heads", None)
MLP_HIDDEN = ("activation_batch", "activation_length", "activation_mlp")


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


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional q/k/v bias and q/k RMSNorm.

    Without `cache`, attends causally over the packed row (segment_ids) and returns (out, None).
    With `cache`, a `PageView` of the paged key/value cache, the tokens' keys and values are
    written into their pages and each token attends to its sequence's positions up to its own;
    returns (out, the updated view).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache: PageView | None = None):
        c = self.cfg
        e, h, kv, d = c.hidden_size, c.num_heads, c.num_kv_heads, c.resolved_head_dim
        q = Projection(c, (e,), (h, d), ("embed", "q_heads", "head_dim"), c.qkv_bias, name="q")(x)
        k = Projection(c, (e,), (kv, d), ("embed", "kv_heads", "head_dim"), c.qkv_bias, name="k")(x)
        v = Projection(c, (e,), (kv, d), ("embed", "kv_heads", "head_dim"), c.qkv_bias, name="v")(x)
        q = checkpoint_name(constrain(q, Q_HEADS), "query_proj")
        k = checkpoint_name(constrain(k, KV_HEADS), "key_proj")
        v = checkpoint_name(constrain(v, KV_HEADS), "value_proj")
        if c.qk_norm:
            q = RMSNorm(c, name="q_norm")(q)
            k = RMSNorm(c, name="k_norm")(k)
        inv_freq = inverse_frequencies(c)
        q = apply_rope(q, positions, inv_freq)
        k = apply_rope(k, positions, inv_freq)
        if cache is None:
            out, new_cache = causal_attention(q, k, v, segment_ids, c), None
        else:
            new_cache = write_pages(cache, k, v, positions)
            out = paged_attention(q, new_cache, positions)
        out = checkpoint_name(constrain(out, Q_HEADS), "attention_out")
        out = Projection(c, (h, d), (e,), ("q_heads", "head_dim", "embed"), name="o")(out)
        return checkpoint_name(constrain(out, RESIDUAL), "out_proj"), new_cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.cfg
        gate = Projection(c, (c.hidden_size,), (c.mlp_dim,), ("embed", "mlp"), name="gate")(x)
        up = Projection(c, (c.hidden_size,), (c.mlp_dim,), ("embed", "mlp"), name="up")(x)
        gate = checkpoint_name(constrain(gate, MLP_HIDDEN), "mlp_gate")
        up = checkpoint_name(constrain(up, MLP_HIDDEN), "mlp_up")
        hidden = constrain(nn.silu(gate) * up, MLP_HIDDEN)
        out = Projection(c, (c.mlp_dim,), (c.hidden_size,), ("mlp", "embed"), name="down")(hidden)
        return checkpoint_name(constrain(out, RESIDUAL), "mlp_out")


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)).

    Scan-shaped: (x, positions, segment_ids) -> (x, None); with a `cache` (PageView), the
    second output is the updated view.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache: PageView | None = None):
        x = constrain(x, RESIDUAL)
        attn, view = Attention(self.cfg, name="attn")(
            RMSNorm(self.cfg, name="input_norm")(x), positions, segment_ids, cache
        )
        h = constrain(x + attn, RESIDUAL)
        out = h + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attn_norm")(h))
        return constrain(out, RESIDUAL), view
