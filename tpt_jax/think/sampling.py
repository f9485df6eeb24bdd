"""Per-row token sampling: greedy, temperature, top-k and top-p, each row with its own settings."""

from __future__ import annotations

import jax
import jax.numpy as jnp

_EXCLUDED = -jnp.inf


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Sets every logit outside the top-k and the top-p nucleus to -inf.

    Args:
        logits: float32 [B, V] (already divided by the temperature).
        top_k: int [B]; 0 keeps every token.
        top_p: float [B]; 1.0 keeps every token. The nucleus is the smallest set of most likely
            tokens whose probability reaches top_p (the most likely token is always kept).
    """
    vocab = logits.shape[-1]
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]  # descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
    in_nucleus = before < top_p[:, None]
    cutoff = jnp.min(jnp.where(in_nucleus, ordered, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth, cutoff)
    return jnp.where(logits >= threshold, logits, _EXCLUDED)


def sample(
    logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> jax.Array:
    """Next tokens [B] from float32 logits [B, V]; rows with temperature 0 take the argmax.

    keys: one PRNG key per row, so a request's samples depend only on its own seed and step.
    """
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    filtered = filter_logits(scaled, top_k, top_p)
    drawn = jax.vmap(jax.random.categorical)(keys, filtered)
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
