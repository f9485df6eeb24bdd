"""Causal self-attention over packed rows, by backend: blocked XLA, Pallas splash (TPU), cuDNN (GPU).

All three compute the same function: softmax(q k^T / sqrt(D)) v, causal, and never across
segments (tokens attend only to earlier tokens of an equal segment id; padding, id 0, attends
among itself, so no row is empty). Shapes everywhere:
    q [B, T, H, D], k and v [B, T, KV, D] (H a multiple of KV), segment_ids int [B, T]
    -> out [B, T, H, D] in q's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from tpt_jax.config import ModelConfig
from tpt_jax.parallel import active_mesh, mesh_spec

_LANES = 128  # splash tiles are multiples of this
# The checkpoint name of splash attention's residuals (its output and log-sum-exp): remat
# policies that keep the attention output keep these too, so the backward pass does not run the
# forward kernel again.
RESIDUALS_NAME = "attention_residuals"
# Large negative score for masked keys: finite, so a fully masked row cannot produce NaN.
MASKED_SCORE = -0.7 * float(jnp.finfo(jnp.float32).max)


def implementation(cfg: ModelConfig) -> str:
    """The kernel `cfg.attention` names; "auto" picks by the platform of the mesh a train or
    eval step is traced for (`parallel.activation_sharding`), so a step compiled ahead of time
    for a TPU topology on a CPU host gets splash attention. Outside such a step (generation's
    prefill, scoring) "auto" is the XLA path: a Pallas or cuDNN call on arrays sharded without
    shard_map would not partition.
    """
    if cfg.attention != "auto":
        return cfg.attention
    active = active_mesh()
    platform = active[0].devices.flat[0].platform if active else "cpu"
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and cfg.dtype in ("bfloat16", "float16"):
        return "cudnn"
    return "xla"


def causal_attention(q, k, v, segment_ids, cfg: ModelConfig):
    """Dispatches to the kernel of `implementation(cfg)`."""
    kind = implementation(cfg)
    if kind == "splash":
        return splash_attention(q, k, v, segment_ids, cfg)
    if kind == "cudnn":
        return cudnn_attention(q, k, v, segment_ids)
    return blocked_attention(q, k, v, segment_ids, cfg.attention_block)


def heads_major(q, k, v):
    """[B, T, H, D], [B, S, KV, D] x2 -> [B, KV, G, T, D], [B, KV, S, D] x2 (G = H / KV).

    Batched matmuls over contiguous heads run far faster on CPU than contracting across the
    sequence-major layout, so attention transposes once on the way in and once on the way out.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    qh = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    return qh, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def seq_major(out):
    """[B, KV, G, T, D] -> [B, T, H, D]."""
    b, kv, g, t, d = out.shape
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, kv * g, d)


def attend(qh, kh, vh, mask):
    """Heads-major softmax attention: qh [B, KV, G, T, D], kh/vh [B, KV, S, D], mask [B, T, S]."""
    scores = jnp.einsum("bkgtd,bksd->bkgts", qh, kh, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, None, None], scores * (qh.shape[-1] ** -0.5), MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(vh.dtype)
    return jnp.einsum("bkgts,bksd->bkgtd", probs, vh)


def blocked_attention(q, k, v, segment_ids, block: int):
    """The XLA path: queries in blocks of `block`; block i reads only keys [0, end of block i).

    That skips the masked upper triangle (about half the work at long lengths) and keeps each
    block's scores small. Memory still grows with T^2 over a whole row (autodiff keeps every
    block's probabilities): long sequences on accelerators want splash or cuDNN.
    """
    length = q.shape[1]
    block = min(block or length, length)
    qh, kh, vh = heads_major(q, k, v)
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        causal = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        same = segment_ids[:, start:end, None] == segment_ids[:, None, :end]
        mask = causal[None] & same
        outs.append(attend(qh[:, :, :, start:end], kh[:, :, :end], vh[:, :, :end], mask))
    return seq_major(jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0])


def cudnn_attention(q, k, v, segment_ids):
    """cuDNN flash attention through `jax.nn.dot_product_attention`; segments as a boolean mask."""
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]  # [B, 1, T, T]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="cudnn")


def _splash_kernel(heads: int, length: int, cfg: ModelConfig, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    def tile(size: int) -> int:
        return min(size, length)

    q_block, kv_block = tile(cfg.splash_block_q), tile(cfg.splash_block_kv)
    kv_compute = min(tile(cfg.splash_block_kv_compute), kv_block)
    backward = {"block_q_dkv": q_block, "block_kv_dkv": kv_block}
    backward["block_kv_dkv_compute"] = kv_compute
    if not cfg.splash_fused_bwd:
        backward.update(block_q_dq=q_block, block_kv_dq=kv_block)
    sizes = splash.BlockSizes(
        block_q=q_block,
        block_kv=kv_block,
        block_kv_compute=kv_compute,
        use_fused_bwd_kernel=cfg.splash_fused_bwd,
        **backward,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * heads)
    return splash.make_splash_mha(
        mask,
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        residual_checkpoint_name=RESIDUALS_NAME,
        interpret=interpret,
    )


def splash_attention(q, k, v, segment_ids, cfg: ModelConfig):
    """Pallas splash attention, one kernel call per example on each device's shard.

    Under a mesh the kernel runs inside `shard_map`: the batch split over the data-parallel
    axes, heads over `tensor`. When the tensor axis divides the query heads but not the kv
    heads, k and v are repeated to one head per query head first, so each device holds the kv
    heads its query heads read. Off TPU the kernel runs in Pallas interpret mode (tests).
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    _, length, h, d = q.shape
    # Tiles are multiples of 128 (TPU lanes) capped at the padded length; a row they do not
    # divide is padded with keys and queries of their own segment (-1), which nothing else
    # attends to.
    tiles = (cfg.splash_block_q, cfg.splash_block_kv, cfg.splash_block_kv_compute)
    step = _LANES if length <= min(tiles) else math.lcm(*tiles)
    t = -(-length // step) * step
    if t != length:
        pad = ((0, 0), (0, t - length), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids, ((0, 0), (0, t - length)), constant_values=-1)
    q = (q * d**-0.5).astype(q.dtype).transpose(0, 2, 1, 3)  # [B, H, T, D]
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, T, D]
    active = active_mesh()
    platform = active[0].devices.flat[0].platform if active else jax.default_backend()
    interpret = platform != "tpu"

    def per_device(q, k, v, segment_ids):
        kernel = _splash_kernel(q.shape[1], t, cfg, interpret)
        ids = SegmentIds(q=segment_ids, kv=segment_ids)
        return jax.vmap(kernel)(q, k, v, segment_ids=ids)

    if active is None:
        out = per_device(q, k, v, segment_ids)
    else:
        mesh, rules = active
        names = ("activation_batch", "activation_heads", None, None)
        q_spec = mesh_spec(names, q.shape, mesh, rules, "splash attention q")
        kv_names = ("activation_batch", "activation_kv_heads", None, None)
        kv_spec = mesh_spec(kv_names, k.shape, mesh, rules, "splash attention kv")
        if q_spec[1] is not None and kv_spec[1] != q_spec[1]:
            k, v = (jnp.repeat(x, h // k.shape[1], axis=1) for x in (k, v))
            kv_spec = q_spec
        out = jax.shard_map(
            per_device,
            mesh=mesh,
            in_specs=(q_spec, kv_spec, kv_spec, PartitionSpec(q_spec[0], None)),
            out_specs=q_spec,
            check_vma=False,
        )(q, k, v, segment_ids)
    return out.transpose(0, 2, 1, 3)[:, :length]
