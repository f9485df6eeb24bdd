"""The paged KV cache: the decoder's cached form over pages equals its training form, whatever
pages a sequence owns, at a cost that follows the live length; the Pallas kernel (interpret mode)
gives the XLA path's logits; the page allocator gives and takes back pages exactly."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpt_jax.config import ModelConfig
from tpt_jax.generate import PageAllocator
from tpt_jax.model import Decoder, decode_forward, empty_pages, init_params, unstack_layers

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=128,
    dtype="float32",
)
PAGE = 8


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def _shuffled_table(rng, rows: int, width: int, pages: int) -> np.ndarray:
    return rng.permutation(pages)[: rows * width].reshape(rows, width).astype(np.int32)


def test_prefill_then_decode_over_pages_equals_the_training_forward(params):
    """Two sequences in scattered pages: a chunked prefill, then token-by-token decode, give the
    logits of the scanned training forward over the whole sequence (1e-4)."""
    rng = np.random.default_rng(0)
    lengths = (21, 13)
    tokens = rng.integers(0, CFG.vocab_size, (2, 24)).astype(np.int32)
    full = Decoder(CFG).apply({"params": params}, jnp.asarray(tokens))
    flat = unstack_layers(params)
    pages = empty_pages(CFG, 16, PAGE)
    table = jnp.asarray(_shuffled_table(rng, 2, 4, 16))
    split = 9  # prefill the first 9 tokens (two chunks: 8 + 1), then decode one at a time
    for start, stop in ((0, 8), (8, split)):
        chunk = jnp.asarray(tokens[:, start:stop])
        positions = jnp.broadcast_to(jnp.arange(start, stop), chunk.shape)
        logits, pages = decode_forward(
            flat, CFG, chunk, positions, pages, table, jnp.ones(chunk.shape, bool), live_pages=2
        )
        np.testing.assert_allclose(logits, full[:, start:stop], atol=1e-4, rtol=1e-4)
    for t in range(split, max(lengths)):
        write = jnp.asarray([[t < n] for n in lengths])
        logits, pages = decode_forward(
            flat, CFG, jnp.asarray(tokens[:, t : t + 1]), jnp.full((2, 1), t), pages, table,
            write, live_pages=4, logits_at=jnp.zeros(2, jnp.int32),
        )  # fmt: skip
        for row, n in enumerate(lengths):
            if t < n:
                np.testing.assert_allclose(logits[row], full[row, t], atol=1e-4, rtol=1e-4)


def test_pages_of_other_sequences_and_unused_entries_do_not_matter(params):
    """Garbage (huge values) in pages a row does not own, and in the table's unused entries,
    change nothing: the first row's logits equal those of a clean pool."""
    flat = unstack_layers(params)
    tokens = jnp.asarray([[5, 6, 7, 8, 9, 10]], jnp.int32)
    positions = jnp.arange(6)[None]
    clean = empty_pages(CFG, 8, PAGE)
    dirty = [(k + 1e4, v - 1e4) for k, v in empty_pages(CFG, 8, PAGE)]
    table = jnp.asarray([[3, 7, 1, 0]], jnp.int32)  # only page 3 is used (6 tokens)
    write = jnp.ones((1, 6), bool)
    a, _ = decode_forward(flat, CFG, tokens, positions, clean, table, write, live_pages=4)
    b, _ = decode_forward(flat, CFG, tokens, positions, dirty, table, write, live_pages=4)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_a_step_reads_only_the_live_pages(params):
    """The compiled decode step touches the pool only to write its new keys and values, in
    place; attention reads the live pages only: its temporaries are the same for a 16x larger
    pool, and grow with live_pages."""
    flat = unstack_layers(params)

    def compiled(num_pages: int, live: int):
        def step(pages):
            return decode_forward(
                flat, CFG, jnp.zeros((4, 1), jnp.int32), jnp.full((4, 1), 5), pages,
                jnp.zeros((4, 64), jnp.int32), jnp.ones((4, 1), bool), live,
                logits_at=jnp.zeros(4, jnp.int32),
            )  # fmt: skip

        pages = jax.eval_shape(lambda: empty_pages(CFG, num_pages, PAGE))
        return jax.jit(step, donate_argnums=0).lower(pages).compile()

    small, large = compiled(64, 4), compiled(1024, 4)
    temp = small.memory_analysis().temp_size_in_bytes
    assert large.memory_analysis().temp_size_in_bytes == temp
    assert compiled(64, 32).memory_analysis().temp_size_in_bytes > 2 * temp
    pool = "f32[2,1024,8,16]"
    entry = large.as_text().split("ENTRY")[1]
    touching = [line for line in entry.splitlines() if f"= {pool}" in line]
    assert len(touching) == 4 * CFG.num_layers  # per layer: 2 parameters, 2 in-place scatters
    assert all("parameter(" in line or "scatter" in line for line in touching), touching


def test_pallas_kernel_in_interpret_mode_gives_the_xla_logits(params):
    """A bfloat16 cache (the kernel's precision): one decode step through the Pallas kernel in
    interpret mode equals the XLA gather path."""
    cfg = dataclasses.replace(CFG, dtype="bfloat16", head_dim=16)
    flat = unstack_layers(params)
    rng = np.random.default_rng(3)
    pages = [
        tuple(jnp.asarray(rng.normal(size=(2, 12, PAGE, 16)), jnp.bfloat16) for _ in range(2))
        for _ in range(cfg.num_layers)
    ]
    table = jnp.asarray(_shuffled_table(rng, 3, 4, 12))
    positions = jnp.asarray([[3], [17], [30]])
    tokens = jnp.asarray([[4], [9], [60]])
    write = jnp.asarray([[True], [True], [False]])
    first = jnp.zeros(3, jnp.int32)
    out = {
        kernel: decode_forward(
            flat, cfg, tokens, positions, pages, table, write, 4, logits_at=first, kernel=kernel
        )
        for kernel in ("xla", "pallas_interpret")
    }
    np.testing.assert_allclose(out["xla"][0], out["pallas_interpret"][0], atol=2e-2, rtol=2e-2)
    # The first layer writes the same keys and values (before any attention); later layers
    # differ by the bfloat16 rounding of the layers below.
    (k1, v1), (k2, v2) = out["xla"][1][0], out["pallas_interpret"][1][0]
    np.testing.assert_array_equal(np.asarray(k1, np.float32), np.asarray(k2, np.float32))
    np.testing.assert_array_equal(np.asarray(v1, np.float32), np.asarray(v2, np.float32))


def test_allocator_gives_pages_as_needed_and_takes_them_back():
    pages = PageAllocator(num_pages=6, page_size=4, slots=3, max_pages=4)
    assert pages.ensure(0, 5) and pages.owned[0] == 2  # 5 positions: 2 pages
    assert pages.ensure(1, 12) and pages.owned[1] == 3
    assert pages.free_pages == 1 and not pages.ensure(2, 8)  # needs 2: nothing given
    assert pages.owned[2] == 0 and pages.free_pages == 1
    mine = set(pages.table[0, :2]) | set(pages.table[1, :3])
    assert len(mine) == 5 and pages.table[2].tolist() == [pages.sentinel] * 4
    pages.release(1)
    assert pages.free_pages == 4 and pages.table[1].tolist() == [6] * 4
    assert pages.ensure(2, 16) and pages.owned[2] == 4
    assert not set(pages.table[2]) & set(pages.table[0, :2])  # never two owners


def test_pallas_kernel_on_a_sharded_pool_runs_per_chip_with_the_same_logits(params):
    """Pages split over kv heads on a 2-chip tensor mesh: the kernel (interpret mode) runs on
    each chip's heads inside shard_map and gives the unsharded XLA path's logits."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    cfg = dataclasses.replace(CFG, dtype="bfloat16")
    flat = unstack_layers(params)
    mesh = Mesh(np.asarray(jax.devices()[:2]), ("tensor",))
    rng = np.random.default_rng(5)
    pages = [
        tuple(jnp.asarray(rng.normal(size=(2, 12, PAGE, 16)), jnp.bfloat16) for _ in range(2))
        for _ in range(cfg.num_layers)
    ]
    split = NamedSharding(mesh, PartitionSpec("tensor", None, None, None))
    sharded = jax.device_put(pages, [(split, split)] * len(pages))
    table = jnp.asarray(_shuffled_table(rng, 3, 4, 12))
    args = (jnp.asarray([[4], [9], [60]]), jnp.asarray([[3], [17], [30]]))
    write, first = jnp.asarray([[True], [True], [False]]), jnp.zeros(3, jnp.int32)
    expected, _ = decode_forward(flat, cfg, *args, pages, table, write, 4, logits_at=first)
    got, updated = jax.jit(
        lambda p: decode_forward(
            flat,
            cfg,
            *args,
            p,
            table,
            write,
            4,
            logits_at=first,
            kernel="pallas_interpret",
            mesh=mesh,
            kv_axes="tensor",
        )
    )(sharded)
    np.testing.assert_allclose(expected, got, atol=2e-2, rtol=2e-2)
    assert updated[0][0].sharding.spec[0] == "tensor"
