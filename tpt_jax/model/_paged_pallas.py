"""Decode attention over a paged KV cache with JAX's Pallas TPU paged-attention kernel.

One query token per sequence attends to that sequence's first `lengths[b]` cached tokens, which
live in fixed-size pages of a shared pool. Shapes everywhere:
    q        [B, H, D]          one decode token per slot, NOT pre-scaled
    k_pages  [KV, N, P, D]      the key pool: KV kv-heads, N pages of P tokens (also v_pages)
    lengths  int32 [B]          valid tokens per slot (keys at positions 0..lengths-1 are visible)
    page_table int32 [B, M]     slot b's token t is at page page_table[b, t // P], offset t % P
    -> out   [B, H, D]          in q's dtype; H a multiple of KV (grouped-query attention)

Facts about the kernel (jax.experimental.pallas.ops.tpu.paged_attention, jax 0.10.2) this module
is built on:
- It does not scale the logits: q is multiplied by 1/sqrt(D) here, once, in float32.
- It rounds K and V to bfloat16 before both matmuls (its unquantized path dequantizes to
  bfloat16), so a float32 pool is computed at bfloat16 precision; a bfloat16 pool loses nothing.
- It streams `pages_per_compute_block` pages per step, a number that must divide the table's
  width (the table is padded here to a multiple of it). Within a slot's last block it loads
  pages past `lengths` too (masked, but a NaN there would still poison the sum), so the table
  entries a slot does not use are redirected here to its first page.
- On a real TPU (Mosaic lowering) D must be a multiple of 128; interpret mode has no such limit.
- `megacore_mode` splits the grid over the two TensorCores of a v4 / v5p chip; naming it on a
  one-core chip may hang, so it is derived from the device (`megacore_mode_for`).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.paged_attention import paged_attention

# Tokens one kernel step streams per kv-head (pages_per_compute_block * P). 512 keeps the
# double-buffered K and V blocks at 512 * D * 2 bytes * 4 = 512 KiB of VMEM for D = 128 bfloat16
# (a TPU core's VMEM holds 16 MiB or more), is long enough to amortise a step's fixed cost, and
# short enough that a slot's last, partly used block wastes few loads.
BLOCK_TOKENS_TARGET = 512
# Mosaic tiles the last dimension of a block by 128 lanes; the kernel's outputs block on D.
_LANES = 128


def _kernel_limit(num_heads: int, num_kv_heads: int, head_dim: int, interpret: bool) -> str | None:
    """Why the kernel cannot take these shapes at all, or None."""
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        return f"{num_heads} query heads are not a multiple of {num_kv_heads} kv-heads"
    if not interpret and head_dim % _LANES:
        return f"head_dim {head_dim} is not a multiple of {_LANES} (Mosaic block tiling)"
    return None


def unsupported_reason(
    *, num_heads: int, num_kv_heads: int, head_dim: int, kv_dtype, interpret: bool = False
) -> str | None:
    """Why the engine should not use the Pallas kernel for this model, or None when it should.

    The engine then falls back to its XLA gather path and logs the reason. Beyond the kernel's
    shape limits, a cache in any dtype but bfloat16 is refused: the kernel would silently compute
    at bfloat16 precision. Checked by ahead-of-time compilation for v5e, v5p and v6e with libtpu
    0.0.42.1 (tests/test_paged_pallas.py); never run on a TPU here.
    """
    limit = _kernel_limit(num_heads, num_kv_heads, head_dim, interpret)
    if limit is not None:
        return limit
    if jnp.dtype(kv_dtype) != jnp.bfloat16:
        return (
            f"KV cache dtype {jnp.dtype(kv_dtype).name}: the kernel rounds K and V to bfloat16, "
            "so only a bfloat16 cache gives the numbers of the XLA path"
        )
    return None


def pallas_supported(**shapes) -> bool:
    """True when `unsupported_reason(**shapes)` is None."""
    return unsupported_reason(**shapes) is None


def compute_block_pages(page_size: int, max_pages: int) -> int:
    """Pages the kernel streams per step: about BLOCK_TOKENS_TARGET tokens, at most the table."""
    return max(1, min(max_pages, BLOCK_TOKENS_TARGET // page_size))


def megacore_mode_for(device, batch: int, num_kv_heads: int) -> str | None:
    """The kernel's `megacore_mode` for `device` (a jax Device): None unless it has two cores.

    Splitting kv-heads keeps both cores equally busy whatever the slots' lengths; splitting the
    batch (even slots to one core, odd to the other) is the fallback for an odd kv-head count.
    """
    if getattr(device, "platform", None) != "tpu" or getattr(device, "num_cores", 1) != 2:
        return None
    if num_kv_heads % 2 == 0:
        return "kv_head"
    if batch % 2 == 0:
        return "batch"
    return None


def kernel_page_table(lengths, page_table, *, page_size: int, block_pages: int):
    """The table the kernel reads: [B, M] -> [B, M'] int32, M' the next multiple of block_pages.

    Entries past a slot's last used page (and the padding) become its first page, so unused
    entries may hold anything (stale ids, -1, pages of other slots): the kernel loads only pages
    the slot owns, and nothing for an empty slot. Used entries must be ids in [0, N).
    """
    max_pages = page_table.shape[1]
    padded = -(-max_pages // block_pages) * block_pages
    table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, padded - max_pages)))
    pages_used = (lengths + page_size - 1) // page_size
    used = jnp.arange(padded, dtype=jnp.int32)[None, :] < pages_used[:, None]
    return jnp.where(used, table, table[:, :1])


def decode_attention_pallas(
    q,
    k_pages,
    v_pages,
    lengths,
    page_table,
    *,
    interpret: bool = False,
    megacore_mode: str | None = None,
    block_pages: int | None = None,
):
    """softmax(q k^T / sqrt(D)) v over each slot's first `lengths[b]` keys; shapes in the module
    docstring. A slot with length 0 gets zeros. Lengths beyond the table (M * P) are clipped.
    K and V are used at bfloat16 precision whatever their dtype (the kernel's cast); the
    positions of a slot's last page past its length must hold finite values (a zeroed pool does).

    interpret: run the kernel in Pallas TPU interpret mode (any backend, e.g. the CPU in tests).
    megacore_mode: the kernel's option (None, "kv_head", "batch"); see `megacore_mode_for`.
    block_pages: pages per kernel step; default `compute_block_pages(P, M)`. The table is padded
        to a multiple of it, so it need not divide M.
    """
    _, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    max_pages = page_table.shape[1]
    reason = _kernel_limit(num_heads, num_kv_heads, head_dim, interpret)
    if reason is not None:
        raise ValueError(f"Pallas paged attention cannot run: {reason}")
    block_pages = block_pages or compute_block_pages(page_size, max_pages)
    lengths = jnp.minimum(lengths.astype(jnp.int32), max_pages * page_size)
    table = kernel_page_table(lengths, page_table, page_size=page_size, block_pages=block_pages)
    # Scaled and handed over in float32 (the kernel computes in float32 anyway), so the scale adds
    # no rounding to a bfloat16 q.
    scaled_q = q.astype(jnp.float32) * (1.0 / math.sqrt(head_dim))

    def call():
        return paged_attention(
            scaled_q,
            k_pages,
            v_pages,
            lengths,
            table,
            pages_per_compute_block=block_pages,
            megacore_mode=megacore_mode,
        )

    if interpret:
        with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams()):
            out = call()
    else:
        out = call()
    return out.astype(q.dtype)


__all__ = [
    "BLOCK_TOKENS_TARGET",
    "compute_block_pages",
    "decode_attention_pallas",
    "kernel_page_table",
    "megacore_mode_for",
    "pallas_supported",
    "unsupported_reason",
]
