"""Attention over a paged key/value cache: the decoder's cached form reads and writes pages.

Per layer, keys and values each live in a pool of fixed-size pages, `[KV, N, P, D]` (kv heads,
pages, tokens per page, head dim; the layout of JAX's TPU paged-attention kernel). A sequence owns
the pages listed in its row of a page table `int32 [B, max_pages]`: its token at position t sits
in page `table[b, t // P]` at offset `t % P`. Which pages a sequence owns is decided outside
(tpt_jax.generate); here they are only written and read.

Reads touch the first `live_pages` entries of each row only, so a step's cost follows the longest
live sequence of the batch, not the pool: the caller picks `live_pages` (a static bucket) to cover
every query position. On TPU, one-token decode reads the pages with the Pallas paged-attention
kernel; elsewhere it reads them a block at a time with a running softmax (a loop that stops at the
longest row); prefill chunks gather their live pages at once.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from tpt_jax.model._attention import MASKED_SCORE


@flax.struct.dataclass
class PageView:
    """One layer's pages and how a batch of queries uses them.

    Attributes:
        k_pages, v_pages: [KV, N, P, D] the pool's keys and values.
        page_table: int32 [B, max_pages] each row's pages, in position order.
        write: bool [B, T] whose keys and values are stored (others are dropped: padding,
            finished or idle slots).
        live_pages: how many leading table entries the queries read (static: a compiled bucket);
            every query position must be below live_pages * P.
        kernel: "xla" (the XLA paths), "pallas" (the TPU kernel, for one query token per row; longer
            queries use XLA) or "pallas_interpret" (the kernel in interpret mode, tests).
        mesh, kv_axes: where the pages are sharded over kv heads (mesh axis names of their first
            dimension), the Pallas kernel runs per chip on its heads (shard_map).
    """

    k_pages: jax.Array
    v_pages: jax.Array
    page_table: jax.Array
    write: jax.Array
    live_pages: int = flax.struct.field(pytree_node=False)
    kernel: str = flax.struct.field(pytree_node=False, default="xla")
    mesh: jax.sharding.Mesh | None = flax.struct.field(pytree_node=False, default=None)
    kv_axes: str | tuple[str, ...] | None = flax.struct.field(pytree_node=False, default=None)

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[2]


def pallas_unsupported_reason(**shapes) -> str | None:
    """Why decode attention should not use the Pallas TPU kernel for a model (num_heads,
    num_kv_heads, head_dim, kv_dtype), or None when it should (imports the kernel only here)."""
    from tpt_jax.model._paged_pallas import unsupported_reason

    return unsupported_reason(**shapes)


def write_pages(view: PageView, k: jax.Array, v: jax.Array, positions: jax.Array) -> PageView:
    """Stores keys/values [B, T, KV, D] of tokens at `positions` [B, T] into their pages."""
    pages, size = view.k_pages.shape[1], view.page_size
    slot = jnp.minimum(positions // size, view.page_table.shape[1] - 1)
    page = jnp.take_along_axis(view.page_table, slot, axis=1)
    # The pool seen as [KV, N * P, D], written one (kv head, row) vector of D at a time: a
    # scatter whose window is the last dimension only keeps the pool's own layout (with a wider
    # window, XLA on TPU stores the pool in another layout and copies all of it every step).
    row = jnp.where(view.write, page * size + positions % size, pages * size)  # OOB: dropped
    heads = jnp.arange(view.k_pages.shape[0])[:, None, None]

    def put(pool, new):
        kv, n, p, d = pool.shape
        flat = pool.reshape(kv, n * p, d)
        new = new.transpose(2, 0, 1, 3).astype(pool.dtype)  # [KV, B, T, D]
        flat = flat.at[heads, row[None]].set(new, mode="drop")
        return flat.reshape(kv, n, p, d)

    return view.replace(k_pages=put(view.k_pages, k), v_pages=put(view.v_pages, v))


def paged_attention(q: jax.Array, view: PageView, positions: jax.Array) -> jax.Array:
    """Queries [B, T, H, D] at `positions` [B, T] attend to their row's keys at positions <= their
    own (grouped-query: H a multiple of KV). Returns [B, T, H, D] in q's dtype."""
    if q.shape[1] == 1:
        if view.kernel.startswith("pallas"):
            return _pallas_attention(q[:, 0], view, positions[:, 0] + 1)[:, None]
        return _blockwise_decode_attention(q[:, 0], view, positions[:, 0])[:, None]
    return _gathered_attention(q, view, positions)


def _pallas_attention(q, view: PageView, lengths):
    """q [B, H, D] through the Pallas kernel, per chip on its kv heads when the pool is sharded."""
    import functools

    from jax.sharding import PartitionSpec

    from tpt_jax.model._paged_pallas import decode_attention_pallas, megacore_mode_for

    kv_heads, pages = view.k_pages.shape[:2]
    # Released slots keep a stale length over a row of out-of-pool ids: point them at a real
    # page (read, never used) so that the kernel never copies from outside the pool.
    table = jnp.minimum(view.page_table, pages - 1)
    shards = 1
    if view.mesh is not None and view.kv_axes:
        axes = (view.kv_axes,) if isinstance(view.kv_axes, str) else view.kv_axes
        shards = int(np.prod([view.mesh.shape[a] for a in axes]))
    device = view.mesh.devices.flat[0] if view.mesh is not None else jax.devices()[0]
    attend = functools.partial(
        decode_attention_pallas,
        interpret=view.kernel == "pallas_interpret",
        megacore_mode=megacore_mode_for(device, q.shape[0], kv_heads // shards),
    )
    if view.mesh is None:
        return attend(q, view.k_pages, view.v_pages, lengths, table)
    heads = PartitionSpec(None, view.kv_axes, None)
    pool = PartitionSpec(view.kv_axes, None, None, None)
    everywhere = PartitionSpec()
    return jax.shard_map(
        attend,
        mesh=view.mesh,
        in_specs=(heads, pool, pool, everywhere, everywhere),
        out_specs=heads,
        check_vma=False,
    )(q, view.k_pages, view.v_pages, lengths, table)


# Keys per block of the XLA decode path: a block's gathered pages stay in cache while they are
# read. Measured on a 2-core CPU (16 rows, 8 kv heads of 64, 4k live tokens): 37 ms per layer at
# 256 tokens, 41 at 64, 57 at 1024; gathering all live pages first, then attending: 105 ms.
BLOCK_TOKENS = 256


def _blockwise_decode_attention(q, view: PageView, positions):
    """One query per row [B, H, D] at `positions` [B] over its row's pages, a block of pages at a
    time with a running softmax (no copy of all live pages is ever made), for as many blocks as
    the longest row needs: the cost follows the longest live sequence itself, not its bucket."""
    b, h, d = q.shape
    kv, pages, size = view.k_pages.shape[:3]
    group = max(1, min(view.live_pages, BLOCK_TOKENS // size))  # pages per block
    blocks = -(-view.live_pages // group)
    table = view.page_table[:, : view.live_pages]
    table = jnp.pad(table, ((0, 0), (0, blocks * group - table.shape[1])))
    table = jnp.minimum(table, pages - 1)  # unowned entries: a real page, masked below
    qg = q.reshape(b, kv, h // kv, d).transpose(1, 0, 2, 3) * (d**-0.5)  # [KV, B, G, D]
    width = group * size

    def block(j, carry):
        top, total, acc = carry  # [KV, B, G], [KV, B, G], [KV, B, G, D]
        ids = jax.lax.dynamic_slice_in_dim(table, j * group, group, axis=1)  # [B, group]
        keys = view.k_pages[:, ids].reshape(kv, b, width, d)
        values = view.v_pages[:, ids].reshape(kv, b, width, d)
        scores = jnp.einsum("kbgd,kbsd->kbgs", qg, keys, preferred_element_type=jnp.float32)
        visible = j * width + jnp.arange(width)[None, :] <= positions[:, None]  # [B, S]
        scores = jnp.where(visible[None, :, None], scores, MASKED_SCORE)
        new_top = jnp.maximum(top, scores.max(-1))
        weights = jnp.exp(scores - new_top[..., None])
        scale = jnp.exp(top - new_top)
        part = jnp.einsum(
            "kbgs,kbsd->kbgd", weights.astype(values.dtype), values,
            preferred_element_type=jnp.float32,
        )  # fmt: skip
        return new_top, total * scale + weights.sum(-1), acc * scale[..., None] + part

    needed = jnp.minimum(jnp.max(positions) // width + 1, blocks)
    start = (
        jnp.full((kv, b, h // kv), MASKED_SCORE, jnp.float32),
        jnp.zeros((kv, b, h // kv), jnp.float32),
        jnp.zeros((kv, b, h // kv, d), jnp.float32),
    )
    _, total, acc = jax.lax.fori_loop(0, needed, block, start)
    out = acc / total[..., None]  # [KV, B, G, D]; block 0 always holds position 0: total > 0
    return out.transpose(1, 0, 2, 3).reshape(b, h, d).astype(q.dtype)


def _gathered_attention(q, view: PageView, positions):
    b, t, h, d = q.shape
    kv = view.k_pages.shape[0]
    ids = view.page_table[:, : view.live_pages]  # [B, L]

    def gather(pool):  # [KV, B, L, P, D] -> [B, KV, L * P, D]
        return pool[:, ids].transpose(1, 0, 2, 3, 4).reshape(b, kv, -1, d)

    keys, values = gather(view.k_pages), gather(view.v_pages)
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, keys, preferred_element_type=jnp.float32)
    visible = jnp.arange(keys.shape[2])[None, None, :] <= positions[:, :, None]  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores * (d**-0.5), MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, values)
    return out.reshape(b, t, h, d).astype(q.dtype)
