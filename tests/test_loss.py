"""The chunked losses equal a plain log-softmax over whole logits, in value and gradient, however
the positions are chunked, and on a mesh that splits the batch and the vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh

from tpt_jax.model import token_nll, weighted_nll_sum
from tpt_jax.parallel import DEFAULT_RULES, activation_sharding

B, T, E, V = 4, 37, 16, 48


def _inputs():
    keys = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(keys[0], (B, T, E))
    head = 0.3 * jax.random.normal(keys[1], (E, V))
    targets = jax.random.randint(keys[2], (B, T), 0, V)
    weights = (jax.random.uniform(keys[3], (B, T)) > 0.3).astype(jnp.float32)
    return hidden, head, targets, weights


def _reference(hidden, head, targets, weights):
    logp = jax.nn.log_softmax(hidden @ head)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights)


# Tokens per device per chunk: one chunk, chunks that divide T, and chunks that do not.
@pytest.mark.parametrize("chunk", [0, 4 * 37, 4 * 8, 4 * 5, 4])
def test_chunked_losses_equal_whole_logits(chunk):
    hidden, head, targets, weights = _inputs()
    want, want_grads = jax.value_and_grad(_reference, argnums=(0, 1))(*_inputs())
    loss = jax.jit(jax.value_and_grad(weighted_nll_sum, argnums=(0, 1)), static_argnums=(4,))
    got, grads = loss(hidden, head, targets, weights, chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-5)
    per_token = token_nll(hidden, head, targets, chunk)
    np.testing.assert_allclose(jnp.sum(per_token * weights), want, rtol=1e-5)
    # The per-token loss is differentiable too (checkpointed chunks).
    token_grads = jax.grad(
        lambda h, w_: jnp.sum(token_nll(h, w_, targets, chunk) * weights), argnums=(0, 1)
    )(hidden, head)
    for g, w in zip(token_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-5)


def test_chunked_loss_on_a_mesh_with_the_vocab_split():
    devices = np.asarray(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = Mesh(devices, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    inputs = _inputs()
    want, want_grads = jax.value_and_grad(_reference, argnums=(0, 1))(*inputs)

    def sharded(hidden, head, targets, weights):
        with activation_sharding(mesh, DEFAULT_RULES):
            return weighted_nll_sum(hidden, head, targets, weights, 8)  # 2 positions per chunk

    got, grads = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(*inputs)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-6, rtol=1e-5)
