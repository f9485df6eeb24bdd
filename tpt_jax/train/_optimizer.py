"""AdamW with decoupled weight decay, global-norm clipping and the paper's learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from tpt_jax.config import OptimizerConfig, ScheduleConfig


def learning_rate(s: ScheduleConfig, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """lr(step) for the step about to be taken (0-based).

    Warmup rises linearly to peak_lr, reaching it at step warmup_steps - 1, so the first step
    already trains. Then: "constant" stays at peak_lr; "cosine" decays to final_lr_ratio * peak_lr
    over decay_steps (default: the rest of the run); "wsd" holds peak_lr and decays linearly to
    final_lr_ratio * peak_lr over the last decay_steps (default: the last 10% of the run).
    """
    peak, warmup, final = s.peak_lr, s.warmup_steps, s.final_lr_ratio
    if s.kind == "cosine":
        decay = s.decay_steps or max(total_steps - warmup, 1)
    elif s.kind == "wsd":
        decay = s.decay_steps or max(math.ceil(0.1 * total_steps), 1)
    else:
        decay = 1
    stable = max(total_steps - warmup - decay, 0)

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warm = peak * jnp.minimum(1.0, (step + 1.0) / max(warmup, 1))
        after = step - warmup
        if s.kind == "cosine":
            frac = jnp.clip(after / decay, 0.0, 1.0)
            rest = peak * (final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac)))
        elif s.kind == "wsd":
            frac = jnp.clip((after - stable) / decay, 0.0, 1.0)
            rest = peak * (1.0 - (1.0 - final) * frac)
        else:
            rest = jnp.full_like(step, peak)
        return jnp.where(step < warmup, warm, rest)

    return schedule


def _path_names(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params, exclude: Sequence[str]):
    """True where weight decay applies: every parameter whose path contains none of `exclude`."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(s in _path_names(path) for s in exclude), params
    )


def make_optimizer(o: OptimizerConfig, schedule: Callable) -> optax.GradientTransformation:
    """Clip by global norm (if grad_clip > 0), then AdamW with the decay mask."""
    adamw = optax.adamw(
        schedule,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        weight_decay=o.weight_decay,
        mask=lambda params: decay_mask(params, o.weight_decay_exclude),
    )
    if o.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(o.grad_clip), adamw)
    return adamw
