"""Schedules and weight decay give the values the config describes."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpt_jax.config import OptimizerConfig, ScheduleConfig
from tpt_jax.train import decay_mask, learning_rate, make_optimizer


def _lrs(schedule, steps):
    return [float(schedule(s)) for s in steps]


def test_warmup_constant_is_the_papers_pretraining_schedule():
    lr = learning_rate(
        ScheduleConfig(kind="constant", peak_lr=3e-4, warmup_steps=100), total_steps=25_000
    )
    assert _lrs(lr, [0, 49, 99, 100, 20_000]) == pytest.approx([3e-6, 1.5e-4, 3e-4, 3e-4, 3e-4])


def test_warmup_cosine_decays_to_the_final_ratio():
    s = ScheduleConfig(kind="cosine", peak_lr=6e-5, warmup_steps=100, final_lr_ratio=0.1)
    lr = learning_rate(s, total_steps=1100)
    assert float(lr(99)) == pytest.approx(6e-5)
    assert float(lr(100)) == pytest.approx(6e-5)
    assert float(lr(600)) == pytest.approx(6e-5 * (0.1 + 0.9 * 0.5))  # half way: cos = 0
    assert float(lr(1100)) == pytest.approx(6e-6)
    assert float(lr(5000)) == pytest.approx(6e-6)


def test_warmup_stable_decay():
    s = ScheduleConfig(
        kind="wsd", peak_lr=1e-3, warmup_steps=10, decay_steps=20, final_lr_ratio=0.0
    )
    lr = learning_rate(s, total_steps=100)
    assert _lrs(lr, [4, 10, 79, 80, 90, 100]) == pytest.approx(
        [5e-4, 1e-3, 1e-3, 1e-3, 5e-4, 0.0], rel=1e-6, abs=1e-9
    )
    default = learning_rate(
        ScheduleConfig(kind="wsd", peak_lr=1.0, warmup_steps=0), total_steps=100
    )
    assert float(default(90)) == pytest.approx(1.0) and float(default(95)) == pytest.approx(0.55)


PARAMS = {
    "embedding": jnp.ones((4, 2)),
    "final_norm": {"scale": jnp.ones(2)},
    "layers": {
        "attn": {
            "q": {"kernel": jnp.ones((1, 2, 2)), "bias": jnp.ones((1, 2))},
            "q_norm": {"scale": jnp.ones((1, 2))},
        },
        "mlp": {"up": {"kernel": jnp.ones((1, 2, 3))}},
    },
}


def test_decay_mask_excludes_norms_and_biases_by_default():
    mask = decay_mask(PARAMS, OptimizerConfig().weight_decay_exclude)
    assert (
        mask["embedding"]
        and mask["layers"]["attn"]["q"]["kernel"]
        and mask["layers"]["mlp"]["up"]["kernel"]
    )
    assert not mask["final_norm"]["scale"]
    assert not mask["layers"]["attn"]["q"]["bias"] and not mask["layers"]["attn"]["q_norm"]["scale"]


def test_weight_decay_is_decoupled_and_masked():
    lr, wd = 0.01, 0.1
    tx = make_optimizer(OptimizerConfig(weight_decay=wd, grad_clip=1.0), lambda step: lr)
    state = tx.init(PARAMS)
    zero_grads = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zero_grads, state, PARAMS)
    new = jax.tree.map(lambda p, u: p + u, PARAMS, updates)
    np.testing.assert_allclose(new["embedding"], 1 - lr * wd)
    np.testing.assert_allclose(new["layers"]["mlp"]["up"]["kernel"], 1 - lr * wd)
    np.testing.assert_array_equal(new["final_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(new["layers"]["attn"]["q"]["bias"], 1.0)


def test_clipping_bounds_the_global_norm():
    tx = make_optimizer(
        OptimizerConfig(weight_decay=0.0, grad_clip=1.0, b1=0.0, b2=0.0, eps=0.0), lambda s: 1.0
    )
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.array([3.0, 4.0, 0.0, 0.0])}  # norm 5 -> clipped to 1, Adam normalises anyway
    updates, _ = tx.update(grads, tx.init(params), params)
    assert math.isclose(float(jnp.abs(updates["w"][:2]).max()), 1.0, rel_tol=1e-5)
