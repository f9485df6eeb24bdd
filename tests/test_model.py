"""Decoder properties a training run relies on: remat and dtype policies, logical axes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpt_jax.config import ModelConfig
from tpt_jax.model import Decoder, init_params, logical_axes, param_shapes

CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=48,
    dtype="float32",
)


def _loss_and_grads(cfg, params, tokens):
    def loss(p):
        logits = Decoder(cfg).apply({"params": p}, tokens[:, :-1])
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policy_keeps_loss_and_gradients(policy):
    params = init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, CFG.vocab_size)
    loss, grads = _loss_and_grads(CFG, params, tokens)
    loss_r, grads_r = _loss_and_grads(dataclasses.replace(CFG, remat_policy=policy), params, tokens)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params():
    bf16 = dataclasses.replace(CFG, dtype="bfloat16")
    params = init_params(bf16, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, CFG.vocab_size)
    low = Decoder(bf16).apply({"params": params}, tokens)
    high = Decoder(CFG).apply({"params": params}, tokens)
    assert low.dtype == jnp.float32  # logits are returned in float32 for the loss
    assert float(jnp.abs(low - high).max()) < 0.05 * float(jnp.abs(high).max())
    assert not np.array_equal(np.asarray(low), np.asarray(high))


def test_every_parameter_has_logical_axes():
    for qwen in ({"qkv_bias": True}, {"qk_norm": True, "head_dim": 16}):
        cfg = dataclasses.replace(CFG, **qwen)
        shapes = jax.tree.leaves(param_shapes(cfg))
        specs = jax.tree.leaves(
            logical_axes(cfg), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
        )
        assert len(shapes) == len(specs)
        for shape, spec in zip(shapes, specs, strict=True):
            assert len(spec) == len(shape.shape) and all(isinstance(n, str) for n in spec)


def test_segments_do_not_see_each_other():
    params = init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, CFG.vocab_size)
    segments = jnp.array([[1] * 6 + [2] * 6])
    positions = jnp.array([list(range(6)) * 2])
    out = Decoder(CFG).apply({"params": params}, tokens, positions, segments)
    changed = tokens.at[0, 7].set((tokens[0, 7] + 1) % CFG.vocab_size)
    out2 = Decoder(CFG).apply({"params": params}, changed, positions, segments)
    np.testing.assert_array_equal(out[0, :6], out2[0, :6])  # segment 1 untouched
    np.testing.assert_array_equal(out[0, 6], out2[0, 6])  # causal: earlier tokens of segment 2 too
    assert not np.allclose(out[0, 7:], out2[0, 7:])


@pytest.mark.parametrize("block", [0, 5, 12])
def test_attention_blocks_do_not_change_the_result(block):
    params = init_params(CFG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 24), 0, CFG.vocab_size)
    segments = jnp.array([[1] * 10 + [2] * 9 + [0] * 5, [1] * 24])
    positions = jnp.array([list(range(10)) + list(range(9)) + list(range(5)), list(range(24))])
    whole = Decoder(dataclasses.replace(CFG, attention_block=0)).apply(
        {"params": params}, tokens, positions, segments
    )
    blocked = Decoder(dataclasses.replace(CFG, attention_block=block)).apply(
        {"params": params}, tokens, positions, segments
    )
    np.testing.assert_allclose(blocked, whole, atol=1e-5, rtol=1e-5)
