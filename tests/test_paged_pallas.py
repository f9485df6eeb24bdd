"""Decode attention over the paged KV cache with the Pallas TPU kernel.

- in interpret mode on the CPU it computes softmax(q k^T / sqrt(D)) v over each slot's first
  `lengths[b]` keys, gathered through its page table, as a float64 numpy reference does: grouped
  and plain multi-head attention, ragged lengths, shuffled pools, and unused table entries that
  point at NaN pages or outside the pool;
- it uses K and V at bfloat16 precision, as the kernel documents by its cast;
- compiled ahead of time for TPUs (libtpu, no TPU) at Qwen3-8B's serving shapes it is the Mosaic
  kernel, and its temporaries do not grow with the pool.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import SingleDeviceSharding

from tpt_jax.model._paged_pallas import (
    compute_block_pages,
    decode_attention_pallas,
    megacore_mode_for,
    pallas_supported,
    unsupported_reason,
)
from tpt_jax.parallel import topology_devices

PAGE = 4  # tokens per page
MAX_PAGES = 6  # table width
POOL = 40  # pages in the pool
HEAD_DIM = 32
# One slot per case the brief names: 1 token, exactly one page, one past a page, several pages
# (ending mid-page), the full table.
LENGTHS = (1, PAGE, PAGE + 1, 3 * PAGE + 2, MAX_PAGES * PAGE)


def _bf16_exact(x):
    """float32 values that bfloat16 represents exactly, so the kernel's cast of K/V is lossless."""
    return np.asarray(jnp.asarray(x, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32))


def _paged_case(rng, heads, kv_heads, lengths, garbage_ids):
    """(q [B,H,D], k_pages, v_pages [KV,N,P,D], lengths [B], table [B,M]); pages owned by a slot
    come from a shuffled pool, every other page is NaN, and the table entries past a slot's last
    page hold `garbage_ids(rng, count)`."""
    q = rng.normal(size=(len(lengths), heads, HEAD_DIM)).astype(np.float32)
    k = np.full((kv_heads, POOL, PAGE, HEAD_DIM), np.nan, np.float32)
    v = np.full_like(k, np.nan)
    order = rng.permutation(POOL)
    table = np.zeros((len(lengths), MAX_PAGES), np.int32)
    taken = 0
    for b, length in enumerate(lengths):
        used = -(-length // PAGE)
        pages = order[taken : taken + used]
        taken += used
        table[b, :used] = pages
        table[b, used:] = garbage_ids(rng, MAX_PAGES - used)
        # Owned pages hold finite data everywhere, positions past the length included (stale
        # tokens of an earlier sequence: large, so a leak would show).
        shape = (kv_heads, used, PAGE, HEAD_DIM)
        k[:, pages] = _bf16_exact(rng.normal(size=shape) * 30)
        v[:, pages] = _bf16_exact(rng.normal(size=shape) * 30)
        for page_index, page in enumerate(pages):
            valid = np.arange(PAGE) + page_index * PAGE < length
            k[:, page, valid] = _bf16_exact(rng.normal(size=(kv_heads, valid.sum(), HEAD_DIM)))
            v[:, page, valid] = _bf16_exact(rng.normal(size=(kv_heads, valid.sum(), HEAD_DIM)))
    return q, k, v, np.asarray(lengths, np.int32), table


def _reference(q, k, v, lengths, table):
    """float64 numpy: [B, H, D] attention of each q over its slot's first lengths[b] keys."""
    batch, heads, dim = q.shape
    kv_heads = k.shape[0]
    out = np.zeros((batch, heads, dim))
    for b in range(batch):
        pages = table[b, : -(-lengths[b] // PAGE)]  # the entries its tokens occupy, no others
        keys = k[:, pages].reshape(kv_heads, -1, dim)[:, : lengths[b]].astype(np.float64)
        values = v[:, pages].reshape(kv_heads, -1, dim)[:, : lengths[b]].astype(np.float64)
        for h in range(heads):
            kv = h // (heads // kv_heads)  # query head h reads kv-head h // G
            scores = keys[kv] @ q[b, h].astype(np.float64) / np.sqrt(dim)
            weights = np.exp(scores - scores.max())
            out[b, h] = weights @ values[kv] / weights.sum()
    return out


def _pages_of_other_slots(rng, count):
    return rng.integers(0, POOL, count)


def _out_of_the_pool(rng, count):
    return rng.choice([-1, POOL, 10**6], count)


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (2, 2)])
@pytest.mark.parametrize("block_pages", [None, 1, 4])  # default (the whole table); 4 pads 6 to 8
def test_equals_the_reference(heads, kv_heads, block_pages):
    rng = np.random.default_rng(heads * 10 + (block_pages or 0))
    q, k, v, lengths, table = _paged_case(rng, heads, kv_heads, LENGTHS, _pages_of_other_slots)
    # Under jit, as the engine's decode step calls it: interpret mode is chosen at trace time.
    attend = jax.jit(
        functools.partial(decode_attention_pallas, interpret=True, block_pages=block_pages)
    )
    out = attend(q, k, v, lengths, table)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _reference(q, k, v, lengths, table), rtol=1e-5, atol=1e-5)


def test_unused_table_entries_may_point_outside_the_pool_and_empty_slots_get_zeros():
    rng = np.random.default_rng(7)
    lengths = (0, PAGE + 1, 0, 2 * PAGE, MAX_PAGES * PAGE)
    q, k, v, lengths, table = _paged_case(rng, 4, 2, lengths, _out_of_the_pool)
    table[0] = -1  # an empty slot's table may be all garbage
    too_long = lengths.copy()
    too_long[-1] = 10**6  # more tokens than the table holds: the table's tokens are attended
    out = np.asarray(
        decode_attention_pallas(q, k, v, too_long, table, interpret=True, block_pages=4)
    )
    np.testing.assert_array_equal(out[[0, 2]], 0.0)
    live = [1, 3, 4]
    ref = _reference(q[live], k, v, lengths[live], table[live])
    np.testing.assert_allclose(out[live], ref, rtol=1e-5, atol=1e-5)


def test_keys_and_values_are_used_at_bfloat16_precision():
    rng = np.random.default_rng(3)
    q, k, v, lengths, table = _paged_case(rng, 4, 2, LENGTHS, _pages_of_other_slots)
    owned = ~np.isnan(k)
    k[owned] += rng.uniform(-1e-3, 1e-3, owned.sum()).astype(np.float32)  # below bf16 resolution
    out = decode_attention_pallas(q, k, v, lengths, table, interpret=True)
    rounded = _reference(q, _bf16_exact(k), _bf16_exact(v), lengths, table)
    np.testing.assert_allclose(out, rounded, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(out) - _reference(q, k, v, lengths, table)).max() > 1e-4


def test_bfloat16_inputs_give_a_bfloat16_output():
    rng = np.random.default_rng(5)
    q, k, v, lengths, table = _paged_case(rng, 4, 2, LENGTHS, _pages_of_other_slots)
    q16 = jnp.asarray(q, jnp.bfloat16)
    out = decode_attention_pallas(
        q16, jnp.asarray(k, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), lengths, table,
        interpret=True,
    )  # fmt: skip
    assert out.dtype == jnp.bfloat16
    ref = _reference(np.asarray(q16.astype(jnp.float32)), k, v, lengths, table)
    np.testing.assert_allclose(np.asarray(out, np.float32), ref, rtol=1e-2, atol=1e-2)


def test_shapes_the_kernel_cannot_take_give_the_reason():
    qwen3_8b = dict(num_heads=32, num_kv_heads=8, head_dim=128, kv_dtype=jnp.bfloat16)
    assert pallas_supported(**qwen3_8b) and unsupported_reason(**qwen3_8b) is None
    assert "head_dim 64" in unsupported_reason(**{**qwen3_8b, "head_dim": 64})
    assert unsupported_reason(**{**qwen3_8b, "head_dim": 64, "interpret": True}) is None
    assert "float32" in unsupported_reason(**{**qwen3_8b, "kv_dtype": jnp.float32})
    assert "multiple of 8 kv-heads" in unsupported_reason(**{**qwen3_8b, "num_heads": 12})
    q = np.zeros((1, 6, 128), np.float32)
    pool = np.zeros((4, 2, PAGE, 128), np.float32)
    with pytest.raises(ValueError, match="6 query heads"):
        decode_attention_pallas(q, pool, pool, np.ones(1, np.int32), np.zeros((1, 2), np.int32))
    assert compute_block_pages(64, 160) == 8 and compute_block_pages(128, 160) == 4
    assert compute_block_pages(16, 5) == 5 and compute_block_pages(1024, 3) == 1


@pytest.mark.parametrize(
    "topology,kv_heads,batch,mode",
    [("v5e-1", 8, 64, None), ("v6e-1", 8, 64, None), ("v5p-2", 8, 64, "kv_head"),
     ("v5p-2", 1, 64, "batch"), ("v5p-2", 1, 63, None)],
)  # fmt: skip
def test_megacore_only_on_two_core_chips(topology, kv_heads, batch, mode):
    _, devices = topology_devices(topology)
    assert megacore_mode_for(devices[0], batch, kv_heads) == mode
    assert megacore_mode_for(jax.devices("cpu")[0], batch, kv_heads) is None


def _compile_for_tpu(topology, pool_pages, page_size, max_pages):
    """The compiled executable of Qwen3-8B's decode attention on one chip of `topology`."""
    _, devices = topology_devices(topology)
    batch, heads, kv_heads, dim = 64, 32, 8, 128
    chip = SingleDeviceSharding(devices[0])

    def abstract(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=chip)

    mode = megacore_mode_for(devices[0], batch, kv_heads)
    attend = jax.jit(lambda *a: decode_attention_pallas(*a, megacore_mode=mode))
    pool = abstract((kv_heads, pool_pages, page_size, dim), jnp.bfloat16)
    return attend.lower(
        abstract((batch, heads, dim), jnp.bfloat16), pool, pool,
        abstract((batch,), jnp.int32), abstract((batch, max_pages), jnp.int32),
    ).compile()  # fmt: skip


@pytest.mark.parametrize("topology,page_size", [("v5e-1", 64), ("v6e-1", 128), ("v5p-2", 64)])
def test_compiles_to_the_mosaic_kernel_with_temporaries_independent_of_the_pool(
    topology, page_size
):
    small, large = (_compile_for_tpu(topology, n, page_size, 160) for n in (4096, 8192))
    for compiled in (small, large):
        hlo = compiled.as_text()
        assert hlo.count('custom_call_target="tpu_custom_call"') == 1, hlo
        assert " gather(" not in hlo  # no XLA gather of the pool beside the kernel
    pool_bytes = 8 * 4096 * page_size * 128 * 2
    small_memory, large_memory = small.memory_analysis(), large.memory_analysis()
    # The pools are arguments (so the program really takes them) and nothing pool-sized is copied.
    assert (
        large_memory.argument_size_in_bytes - small_memory.argument_size_in_bytes == 2 * pool_bytes
    )
    assert small_memory.temp_size_in_bytes == large_memory.temp_size_in_bytes < 8 * 2**20
