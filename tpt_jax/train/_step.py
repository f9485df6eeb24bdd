"""The train and eval steps: pure functions of (state, batch), compiled once by the loop.

Batch (DESIGN.md): dict of [global_batch, seq_len] arrays: inputs, targets (int32), segment_ids
(int32, 0 = padding), positions (int32), loss_weights (float32).
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from tpt_jax.model import weighted_nll_sum
from tpt_jax.parallel import DEFAULT_RULES, Rules, activation_sharding

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar (optimizer steps taken); params and opt_state: pytrees."""

    step: jax.Array
    params: dict
    opt_state: optax.OptState


def loss_sums(model: nn.Module, params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted next-token cross-entropy, sum of weights), both float32 scalars.

    The logits are made and scored `model.cfg.loss_chunk` positions at a time
    (`weighted_nll_sum`).
    """
    hidden, head = model.apply(
        {"params": params},
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        return_hidden=True,
    )
    weights = batch["loss_weights"].astype(jnp.float32)
    c = model.cfg
    total = weighted_nll_sum(hidden, head, batch["targets"], weights, c.loss_chunk, c.scan_unroll)
    return total, jnp.sum(weights)


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schedule: Callable,
    accum_steps: int,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """One optimizer step over a global batch split into `accum_steps` micro-batches.

    The loss is the token-weighted mean over the whole global batch, so accumulation changes
    memory, not the objective. With a `mesh`, the model's activations are pinned to it by
    `rules` when the step is traced (FSDP / tensor parallelism; see tpt_jax.parallel).
    """
    grad_fn = jax.value_and_grad(lambda p, b: loss_sums(model, p, b), has_aux=True)

    def micro_batches(batch):
        # [B, T] -> [A, B/A, T] taking rows i::A, so each device's contiguous rows stay local.
        return jax.tree.map(
            lambda x: jnp.swapaxes(
                x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1
            ),
            batch,
        )

    def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        with activation_sharding(mesh, rules):
            return sharded_step(state, batch)

    def sharded_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        if accum_steps == 1:
            (loss_sum, weight), grads = grad_fn(state.params, batch)
        else:

            def body(carry, micro):
                (l_sum, w_sum), g = grad_fn(state.params, micro)
                acc_g, acc_l, acc_w = carry
                return (jax.tree.map(jnp.add, acc_g, g), acc_l + l_sum, acc_w + w_sum), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grads, loss_sum, weight), _ = jax.lax.scan(body, init, micro_batches(batch))
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm = loss_sum / denom, optax.tree.norm(grads)
        # A finite loss can still come with inf/nan gradients or updates (an overflow in the
        # backward pass, a learning rate that overflows float32); such a step must never reach
        # the state, or it is saved and poisons every later step. Selecting per leaf keeps the
        # donated buffers reusable; the loop stops on the flag.
        finite = (
            jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(updates))
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "loss_tokens": weight,
            "finite": finite,  # bool: False = this step was not applied
        }
        stepped = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        return jax.tree.map(lambda new, old: jnp.where(finite, new, old), stepped, state), metrics

    return step


def make_eval_step(
    model: nn.Module, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES
) -> Callable[[dict, dict], tuple[jax.Array, jax.Array]]:
    """(params, batch) -> (loss sum, weight sum), to be summed over a held-out set."""

    def evaluate(params: dict, batch: dict) -> tuple[jax.Array, jax.Array]:
        with activation_sharding(mesh, rules):
            return loss_sums(model, params, batch)

    return evaluate
