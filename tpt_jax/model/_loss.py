"""Next-token cross-entropy from the decoder's final hidden states, a chunk of positions at a time.

The logits of a whole batch are the largest activation of a language model: [B, T, V] in
float32 is 34 GB per chip for 8 x 8192 tokens of Llama-3's 128k vocabulary. Both functions here
split the sequence into chunks and project and score one chunk at a time, so only [B, chunk, V]
ever exists:
  - `token_nll`: per-token losses (scoring, evaluation);
  - `weighted_nll_sum`: the training loss, whose gradient is computed in the same pass over the
    chunks (softmax minus one-hot is known as soon as a chunk's logits are), so the backward
    pass neither keeps nor recomputes any logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tpt_jax.model._layers import contract
from tpt_jax.parallel import constrain, local_shape

LOGITS = ("activation_batch", "activation_length", "activation_vocab")
_HIDDEN = ("activation_batch", "activation_length", "activation_embed")
_HEAD = ("embed", "vocab")  # the output projection's parameter axes


def _logits(hidden, head):
    return constrain(contract(hidden, head, 1, jnp.float32), LOGITS)


def _chunk_nll(hidden, head, targets):
    """hidden [B, C, E], head [E, V], targets int [B, C] -> float32 [B, C]."""
    logits = _logits(hidden, head)
    logz = jax.nn.logsumexp(logits, axis=-1)
    # A one-hot product rather than a gather: with the vocab split over devices each device
    # scores its own slice and one reduction combines them.
    one_hot = jax.nn.one_hot(targets, logits.shape[-1], dtype=logits.dtype)
    return logz - jnp.sum(logits * one_hot, axis=-1)


def _chunks(tokens: int, unroll: int, *arrays):
    """[B, T, ...] arrays -> ([n, B, C, ...] arrays, n, T, unroll), padding T to a multiple of C.

    C is the number of positions that makes `tokens` tokens per device (the batch is split
    over the data-parallel devices); tokens = 0 gives one chunk.
    """
    b, t = arrays[0].shape[:2]
    local_batch = local_shape((b, t, 1), _HIDDEN)[0]
    chunk = min(max(tokens // local_batch, 1) if tokens else t, t)
    pad = -t % chunk
    n = (t + pad) // chunk
    out = []
    for a in arrays:
        if pad:  # padded positions have target 0 and weight 0, and are cut off by callers
            a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        out.append(a.reshape(a.shape[0], n, chunk, *a.shape[2:]).swapaxes(0, 1))
    return out, n, t, min(unroll, n)


def token_nll(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int, unroll: int = 1
) -> jax.Array:
    """Per-token cross-entropy of `targets` under logits hidden . head.

    Args:
        hidden: [B, T, E] final normed hidden states; head: [E, V] output projection
            (`Decoder(..., return_hidden=True)`); targets: int [B, T].
        chunk: tokens per device per chunk (of its share of the batch); 0 computes all
            positions at once.
        unroll: chunks per iteration of the loop over chunks.

    Returns:
        float32 [B, T]: -log softmax(logits)[target] at every position.
    """
    (xs, ts), n, t, unroll = _chunks(chunk, unroll, hidden, targets)
    if n == 1:
        return _chunk_nll(hidden, head, targets)
    score = jax.checkpoint(_chunk_nll, policy=jax.checkpoint_policies.nothing_saveable)
    _, nll = jax.lax.scan(lambda c, a: (c, score(a[0], head, a[1])), None, (xs, ts), unroll=unroll)
    return nll.swapaxes(0, 1).reshape(hidden.shape[0], -1)[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def weighted_nll_sum(hidden, head, targets, weights, chunk: int, unroll: int = 1) -> jax.Array:
    """sum(weights * token_nll(...)) as a float32 scalar; weights float32 [B, T]."""
    (xs, ts, ws), _, _, unroll = _chunks(chunk, unroll, hidden, targets, weights)

    def body(total, args):
        x, tgt, w = args
        return total + jnp.sum(_chunk_nll(x, head, tgt) * w), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (xs, ts, ws), unroll=unroll)
    return total


def _weighted_nll_sum_fwd(hidden, head, targets, weights, chunk, unroll):
    (xs, ts, ws), _, t, unroll = _chunks(chunk, unroll, hidden, targets, weights)

    def body(carry, args):
        total, d_head = carry
        x, tgt, w = args
        logits = _logits(x, head)
        logz = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
        one_hot = jax.nn.one_hot(tgt, logits.shape[-1], dtype=logits.dtype)
        nll = logz[..., 0] - jnp.sum(logits * one_hot, axis=-1)
        # d(sum w * nll) / d logits = w * (softmax - one_hot)
        d_logits = ((jnp.exp(logits - logz) - one_hot) * w[..., None]).astype(x.dtype)
        d_logits = constrain(d_logits, LOGITS)
        d_x = contract(d_logits, head.T, 1)  # [B, C, E]
        batch = tuple(range(x.ndim - 1))
        # A chunk's part of the head's gradient comes out in the compute dtype, as autodiff of
        # the projection would give it, and is summed over devices in that dtype; the float32
        # accumulator is kept split like the head itself, not whole on every device.
        part = jax.lax.dot_general(x, d_logits, ((batch, batch), ((), ())))
        part = constrain(part, _HEAD).astype(jnp.float32)
        return (total + jnp.sum(nll * w), constrain(d_head + part, _HEAD)), d_x

    zeros = constrain(jnp.zeros(head.shape, jnp.float32), _HEAD)
    (total, d_head), d_xs = jax.lax.scan(
        body, (jnp.zeros((), jnp.float32), zeros), (xs, ts, ws), unroll=unroll
    )
    d_hidden = d_xs.swapaxes(0, 1).reshape(hidden.shape[0], -1, hidden.shape[-1])[:, :t]
    return total, (d_hidden, d_head.astype(head.dtype))


def _weighted_nll_sum_bwd(chunk, unroll, residuals, g):
    d_hidden, d_head = residuals  # no gradient flows to targets or weights
    return (g * d_hidden).astype(d_hidden.dtype), (g * d_head).astype(d_head.dtype), None, None


weighted_nll_sum.defvjp(_weighted_nll_sum_fwd, _weighted_nll_sum_bwd)
