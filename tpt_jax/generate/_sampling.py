"""Per-row token sampling: greedy, temperature, top-k and top-p, each row with its own settings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Top-k / top-p are decided among the most likely CANDIDATES tokens when that is exact for every
# row (k <= CANDIDATES and the candidates hold the top-p mass); otherwise the whole vocabulary is
# sorted. A full sort of [16, 32000] logits costs ~70 ms on a CPU, top-256 ~2 ms.
CANDIDATES = 256


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 and top_p 1.0 disable those filters; token i of a request
    is drawn with fold_in(key(seed), i)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def _threshold(ordered, logz, top_k, top_p):
    """Smallest logit kept per row, from logits sorted in descending order [B, C]."""
    width = ordered.shape[-1]
    k = jnp.clip(top_k, 1, width)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    kth = jnp.where(top_k[:, None] > 0, kth, -jnp.inf)
    probs = jnp.exp(ordered - logz)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
    cutoff = jnp.min(jnp.where(before < top_p[:, None], ordered, jnp.inf), axis=-1, keepdims=True)
    cutoff = jnp.where(top_p[:, None] < 1.0, cutoff, -jnp.inf)
    return jnp.maximum(kth, cutoff)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets every logit outside the top-k and the top-p nucleus to -inf.

    Args:
        logits: float32 [B, V] (already divided by the temperature).
        top_k: int [B]; 0 keeps every token.
        top_p: float [B]; 1.0 keeps every token. The nucleus is the smallest set of most likely
            tokens whose probability reaches top_p (the most likely token is always kept).
    """
    vocab = logits.shape[-1]
    logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    candidates = jax.lax.top_k(logits, min(CANDIDATES, vocab))[0]
    mass = jnp.sum(jnp.exp(candidates - logz), axis=-1)
    exact = ((top_k == 0) | (top_k <= candidates.shape[-1])) & ((top_p >= 1.0) | (mass >= top_p))
    threshold = jax.lax.cond(
        jnp.all(exact),
        lambda: _threshold(candidates, logz, top_k, top_p),
        lambda: _threshold(jnp.sort(logits, axis=-1)[:, ::-1], logz, top_k, top_p),
    )
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def _draw(logits, keys, temperature, top_k, top_p):
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    return jax.vmap(jax.random.categorical)(keys, filter_logits(scaled, top_k, top_p))


def sample(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Next tokens [B] from float32 logits [B, V]; rows with temperature 0 take the argmax.

    keys: one PRNG key per row, so a request's samples depend only on its own seed and step.
    """
    greedy = jnp.argmax(logits, axis=-1)
    drawn = jax.lax.cond(
        jnp.any(temperature > 0),
        lambda: _draw(logits, keys, temperature, top_k, top_p),
        lambda: greedy,
    )
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
