"""Batched prefill and decode over the decoder's key/value cache (pure, jit-able functions).

A decode state holds, per slot, the cache of its request and its filled length; one decode step
advances every slot by one token. The JetStream-compatible engine and the offline driver build on
these functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tpt_jax.config import ModelConfig
from tpt_jax.model._layers import DecoderLayer, RMSNorm, contract


def load_generator(model_dir: str, dtype: str = "") -> tuple[ModelConfig, dict]:
    """(model config, parameters) of a `tpt convert from-hf` folder, computing in `dtype` if set."""
    from tpt_jax.model import param_shapes
    from tpt_jax.model._store import load_model_config, restore_params

    cfg = load_model_config(model_dir)
    if dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    return cfg, restore_params(model_dir, param_shapes(cfg))


def unstack_layers(params: dict) -> dict:
    """The decoder's parameters with the stacked layer axis split into a list of layers.

    Generation runs layer by layer over this layout: reading a layer out of the stacked arrays at
    every step would copy its weights (CPU XLA does not feed a slice to a matmul in place), which
    costs more than the decode step itself.
    """
    layers = params["layers"]
    count = jax.tree.leaves(layers)[0].shape[0]
    return {**params, "layers": [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)]}


def forward(
    params: dict, cfg: ModelConfig, tokens, positions, segment_ids, cache=None, lengths=None
):
    """The decoder over unstacked parameters (`unstack_layers`), keeping keys and values.

    Returns:
        (logits float32 [B, T, V], per-layer list of (k, v)): the prompt's keys and values
        [B, T, KV, D] without `cache`, else the updated heads-major caches [B, KV, S, D].
    """
    dtype = jnp.dtype(cfg.dtype)
    x = jnp.take(params["embedding"], tokens, axis=0).astype(dtype)
    layer = DecoderLayer(cfg, keep_kv=True)
    new_cache = []
    for i, layer_params in enumerate(params["layers"]):
        layer_cache = None if cache is None else cache[i]
        x, kv = layer.apply(
            {"params": layer_params}, x, positions, segment_ids, layer_cache, lengths
        )
        new_cache.append(kv)
    x = RMSNorm(cfg).apply({"params": params["final_norm"]}, x)
    head = params["embedding"].T if cfg.tie_embeddings else params["lm_head"]
    return contract(x, head.astype(dtype), 1, jnp.float32), new_cache


def prefill(params: dict, cfg: ModelConfig, tokens: jax.Array, lengths: jax.Array):
    """Runs right-padded prompts [B, T] of `lengths` [B] (unstacked parameters).

    Returns:
        (logits of each prompt's last token [B, V], per-layer list of heads-major (k, v), each
        [B, KV, T, D]).
    """
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    logits, kv = forward(params, cfg, tokens, positions, segment_ids)
    last = logits[jnp.arange(tokens.shape[0]), lengths - 1]
    return last, [tuple(x.transpose(0, 2, 1, 3) for x in layer) for layer in kv]


def decode(params: dict, cfg: ModelConfig, cache, lengths: jax.Array, tokens: jax.Array):
    """One token per slot: tokens [B] at positions `lengths` [B] -> (logits [B, V], new cache)."""
    logits, cache = forward(
        params,
        cfg,
        tokens[:, None],
        lengths[:, None],
        jnp.ones_like(tokens)[:, None],
        cache,
        lengths,
    )
    return logits[:, 0], cache


def empty_cache(cfg: ModelConfig, slots: int, max_len: int) -> list:
    """Per-layer heads-major (k, v) caches, each [slots, KV, max_len, D]."""
    shape = (slots, cfg.num_kv_heads, max_len, cfg.resolved_head_dim)
    return [
        (jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.num_layers)
    ]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 and top_p 1.0 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


def generate(
    params: dict,
    cfg: ModelConfig,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams | list[SamplingParams] | None = None,
    eos_id: int | None = None,
    stops: Sequence[Sequence[int]] = (),
) -> list[list[int]]:
    """Generates for a batch of prompts (different lengths) until EOS, a stop sequence (token
    ids) or max_new_tokens, one decode slot per prompt of a `SlotEngine`; each prompt stops on
    the device, so nothing is decoded past its stop.

    Returns the new tokens of each prompt (the EOS or stop sequence included when produced).
    """
    from tpt_jax.think.slots import STEPS_PER_CALL, SlotEngine, pad_prompt

    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    per_row = (
        sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
    )
    longest = max(16, 1 << (max(len(p) for p in prompts) - 1).bit_length())
    engine = SlotEngine(
        cfg,
        params,
        max_concurrent_decodes=len(prompts),
        max_prefill_length=longest,
        max_target_length=longest + max_new_tokens + 1,
        eos_ids=() if eos_id is None else (eos_id,),
        stops=stops,
    )
    params = engine.load_params()
    state = engine.init_decode_state()
    for slot, (prompt, row_sampling) in enumerate(zip(prompts, per_row, strict=True)):
        padded, length = pad_prompt(prompt, engine.max_prefill_length)
        prefix = engine.prefill(
            params=params, padded_tokens=padded, true_length=length, sampling=row_sampling
        )
        state = engine.insert(prefix, state, slot, max_new_tokens)
    done = np.zeros(len(prompts), bool)
    while not done.all():
        state, done = engine.generate_steps(params, state, STEPS_PER_CALL)
        done = np.asarray(done)
    return engine.collect(state, range(len(prompts)))
