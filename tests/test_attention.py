"""The attention kernels compute the same function: splash (Pallas, interpret mode on CPU) equals
the blocked XLA path in values and gradients, packed segments and grouped heads included, alone
and inside shard_map on a mesh; and "auto" picks the kernel of the platform a step is built for."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from tpt_jax.config import ModelConfig
from tpt_jax.model._attention import blocked_attention, implementation, splash_attention
from tpt_jax.parallel import DEFAULT_RULES, activation_sharding, topology_devices

CFG = ModelConfig(
    num_heads=8,
    num_kv_heads=2,
    head_dim=32,
    hidden_size=256,
    dtype="float32",
    splash_block_q=128,
    splash_block_kv=256,
    splash_block_kv_compute=128,
)


def _inputs(length, batch=2, heads=8, kv_heads=2, dim=32):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (batch, length, heads, dim))
    k = jax.random.normal(keys[1], (batch, length, kv_heads, dim))
    v = jax.random.normal(keys[2], (batch, length, kv_heads, dim))
    # Row 0: three documents and trailing padding (segment 0); row 1: one document.
    cuts = [length // 3, length // 2 + 7, length - length // 8]
    row = np.zeros(length, np.int32)
    row[: cuts[0]], row[cuts[0] : cuts[1]], row[cuts[1] : cuts[2]] = 1, 2, 3
    segments = jnp.asarray(np.stack([row, np.ones(length, np.int32)]))
    return q, k, v, segments


def _loss(fn):
    def loss(q, k, v, segments):
        out = fn(q, k, v, segments)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.shape[-1]))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _assert_same(got, want, atol=2e-5):
    (value, grads), (value_ref, grads_ref) = got, want
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for g, r in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(g, r, atol=atol, rtol=1e-4)


@pytest.mark.parametrize(
    "length,fused",
    [(256, False), (256, True), (200, False), (100, False)],
    ids=["tiled", "fused_bwd", "padded", "short"],
)
def test_splash_equals_blocked_attention(length, fused):
    cfg = dataclasses.replace(CFG, splash_fused_bwd=fused)
    inputs = _inputs(length)
    want = _loss(lambda *a: blocked_attention(*a, block=64))(*inputs)
    got = _loss(lambda *a: splash_attention(*a, cfg))(*inputs)
    _assert_same(got, want)


@pytest.mark.parametrize("tensor", [2, 4], ids=["kv_heads_split", "kv_heads_repeated"])
def test_splash_under_shard_map_equals_blocked_attention(tensor):
    devices = np.asarray(jax.devices()[: 2 * tensor]).reshape(2, 1, tensor)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    inputs = _inputs(256)
    want = _loss(lambda *a: blocked_attention(*a, block=128))(*inputs)

    def sharded(*args):
        with activation_sharding(mesh, DEFAULT_RULES):
            return splash_attention(*args, CFG)

    _assert_same(_loss(sharded)(*inputs), want)
    hlo = jax.jit(sharded).lower(*inputs).as_text()
    assert "shard_map" in hlo or "sdy.manual_computation" in hlo


def test_auto_picks_the_kernel_of_the_mesh_platform():
    cpu = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    with activation_sharding(cpu, DEFAULT_RULES):
        assert implementation(CFG) == "xla"
    assert implementation(dataclasses.replace(CFG, attention="splash")) == "splash"

    _, devices = topology_devices("v5p-8")  # a TPU slice described by libtpu, no TPU needed
    tpu = Mesh(np.asarray(devices).reshape(1, 4, 1), ("data", "fsdp", "tensor"))
    with activation_sharding(tpu, DEFAULT_RULES):
        assert implementation(CFG) == "splash"
