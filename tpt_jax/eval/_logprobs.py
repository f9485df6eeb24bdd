"""Teacher-forced log-probabilities of target tokens, batched: what lm-eval's loglikelihood needs.

The logits [B, T, V] are never whole: the final hidden states are projected a chunk of positions
at a time, and each chunk keeps only the target's log-probability and whether the target is the
argmax, so memory follows [B, chunk, V] (Llama-3's 128k vocabulary in float32 is 0.5 MB per
position).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

MIN_WIDTH = 16  # shortest padded row: few distinct shapes, few compilations


def target_logprobs(hidden: jax.Array, head: jax.Array, targets: jax.Array, chunk: int):
    """log p(target) and whether the target is the greedy token, at every position.

    Args:
        hidden: [B, T, E] final normed hidden states; head: [E, V] output projection
            (`Decoder(..., return_hidden=True)`); targets: int [B, T].
        chunk: positions projected at once (T is padded to a multiple of it).

    Returns:
        (float32 [B, T] log-probabilities in nats, bool [B, T] target == argmax).
    """
    b, t, _ = hidden.shape
    chunk = min(chunk, t)
    pad = -t % chunk
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk

    def score(args):
        h, tgt = args  # [B, C, E], [B, C]
        logits = jnp.einsum("bce,ev->bcv", h, head, preferred_element_type=jnp.float32)
        chosen = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        logz = jax.nn.logsumexp(logits, axis=-1)
        return chosen - logz, chosen >= jnp.max(logits, axis=-1)

    split = lambda a: a.reshape(b, n, chunk, *a.shape[2:]).swapaxes(0, 1)  # noqa: E731
    logp, greedy = jax.lax.map(score, (split(hidden), split(targets)))
    merge = lambda a: a.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]  # noqa: E731
    return merge(logp), merge(greedy)


class Scorer:
    """Scores token rows with a decoder: `score(rows)` for lm-eval's `_loglikelihood_tokens`.

    Args:
        model_cfg: the decoder's ModelConfig.
        batch_size: rows per forward pass (the last batch is padded to it: one shape).
        chunk: positions projected onto the vocabulary at once.
        mesh, rules: with a mesh, the parameters are sharded over it by the training rules
            (logical axis names), the rows over its data-parallel axes, and the activations
            constrained as in training; None: one device.
    Call `place(params)` (stacked layers) before `score`.
    """

    def __init__(self, model_cfg, batch_size: int, chunk: int = 256, mesh=None, rules=None):
        from tpt_jax.model import Decoder, abstract_params
        from tpt_jax.parallel import (
            DEFAULT_RULES,
            activation_sharding,
            batch_sharding,
            data_parallel_size,
            logical_shardings,
        )

        self.batch_size, self.params = batch_size, None
        rules = rules or DEFAULT_RULES
        self._param_shardings = self._rows = None
        if mesh is not None:
            self._param_shardings = logical_shardings(abstract_params(model_cfg), mesh, rules)
            self._rows = batch_sharding(mesh, rules)
            dp = data_parallel_size(mesh)  # rows per pass: a multiple of it (padding scores 0)
            self.batch_size = -(-batch_size // dp) * dp
        model = Decoder(model_cfg)

        @functools.partial(jax.jit, static_argnames="chunk")
        def forward(params, tokens, targets, segments, chunk):
            with activation_sharding(mesh, rules):  # traced here: the constraints apply
                positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
                hidden, head = model.apply(
                    {"params": params}, tokens, positions, segments, return_hidden=True
                )
                return target_logprobs(hidden, head, targets, chunk)

        self._forward = functools.partial(forward, chunk=chunk)

    def place(self, params) -> dict:
        """Puts `params` where the forward pass reads them (the mesh, when there is one)."""
        if self._param_shardings is not None:
            params = jax.device_put(params, self._param_shardings)
        self.params = params
        return params

    def score(self, rows: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
        """rows: (inputs, targets, n) with targets = inputs shifted by one token; the last n
        targets are scored. Returns (sum of their log-probabilities in nats, all greedy)."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar widths batch
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = [rows[i] for i in order[start : start + self.batch_size]]
            width = max(MIN_WIDTH, 1 << (max(len(r[0]) for r in batch) - 1).bit_length())
            tokens = np.zeros((self.batch_size, width), np.int32)
            targets, segments = np.zeros_like(tokens), np.zeros_like(tokens)
            for i, (inputs, shifted, _) in enumerate(batch):
                tokens[i, : len(inputs)], targets[i, : len(inputs)] = inputs, shifted
                segments[i, : len(inputs)] = 1
            if self._rows is not None:
                tokens, targets, segments = jax.device_put((tokens, targets, segments), self._rows)
            logp, greedy = jax.device_get(self._forward(self.params, tokens, targets, segments))
            for i, (inputs, _, n) in enumerate(batch):
                end = len(inputs)
                out[order[start + i]] = (
                    float(logp[i, end - n : end].sum(dtype=np.float64)),
                    bool(greedy[i, end - n : end].all()),
                )
        return out
