"""The think engine's decode call at the scale it exists for: Qwen3-8B's layer widths, 64 slots
of 2k prompt + 8k thinking, tensor-parallel over the 4 chips of a v5e-4 host, compiled ahead of
time with libtpu (no TPU here). Per chip, the program takes the weights' and the pool's shares and
nothing that grows with the pool besides; the Pallas kernel reads the pages on each chip; no
collective moves pages."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tpt_jax.config import load_config
from tpt_jax.generate import SlotEngine
from tpt_jax.model import init_params, unstack_layers
from tpt_jax.parallel import topology_devices

SLOTS, PAGE = 64, 64
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _compile(num_pages: int):
    cfg = load_config("tpt_jax/configs/models/qwen3-8b.yaml").model
    # One layer of the real widths: every layer compiles to the same program.
    cfg = dataclasses.replace(cfg, num_layers=1, dtype="bfloat16", param_dtype="bfloat16")
    _, devices = topology_devices("v5e-4")
    mesh = Mesh(np.asarray(devices).reshape(1, 1, 4), ("data", "fsdp", "tensor"))
    engine = SlotEngine(
        cfg, max_concurrent_decodes=SLOTS, max_prefill_length=2048, max_target_length=10241,
        page_size=PAGE, num_pages=num_pages, mesh=mesh, kernel="pallas",
    )  # fmt: skip

    def placed(tree, sharding):
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree
        )

    params = jax.eval_shape(lambda: unstack_layers(init_params(cfg, jax.random.key(0))))
    params = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        params,
        engine.param_shardings(),
    )
    state = jax.eval_shape(engine.init_decode_state)
    everywhere = NamedSharding(mesh, PartitionSpec())
    state = placed(state, everywhere).replace(pages=placed(state.pages, engine.page_sharding()))
    table = jax.ShapeDtypeStruct((SLOTS, engine.max_pages), jnp.int32, sharding=everywhere)
    live = 64  # 4k live tokens per slot
    return engine.decode_call(params, state, table, live).compile(), cfg


@pytest.fixture(scope="module")
def compiled():
    return {pages: _compile(pages) for pages in (2048, 4096)}


def test_per_chip_memory_is_the_weights_and_pool_shares_and_nothing_grows_with_the_pool(compiled):
    (small, cfg), (large, _) = compiled[2048], compiled[4096]
    pool_share = 2 * cfg.num_layers * (cfg.num_kv_heads // 4) * PAGE * cfg.resolved_head_dim * 2
    a, b = small.memory_analysis(), large.memory_analysis()
    assert b.argument_size_in_bytes - a.argument_size_in_bytes == 2048 * pool_share
    assert a.temp_size_in_bytes == b.temp_size_in_bytes < 256 * 2**20
    for program, pages in ((small, 2048), (large, 4096)):
        pool = f"bf16[{cfg.num_kv_heads // 4},{pages},{PAGE},{cfg.resolved_head_dim}]"
        hlo = program.as_text()
        copies = [line for line in hlo.splitlines() if " copy(" in line and pool in line]
        assert not copies, copies[:2]  # the pool is updated in place, in the kernel's layout


def test_the_kernel_runs_per_chip_and_no_collective_moves_pages(compiled):
    program, cfg = compiled[4096]
    hlo = program.as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') == cfg.num_layers
    pool_elements = (cfg.num_kv_heads // 4) * 4096 * PAGE * cfg.resolved_head_dim
    for line in hlo.splitlines():
        op = next((c for c in COLLECTIVES if f" {c}(" in line or f" {c}-start(" in line), None)
        if op is None:
            continue
        shapes = re.findall(r"[a-z]+\d*\[([\d,]+)\]", line.split(op)[0])
        biggest = max((int(np.prod([int(x) for x in s.split(",")])) for s in shapes), default=0)
        assert biggest < pool_elements // 16, line[:200]
