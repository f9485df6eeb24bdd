"""`generate`: a batch of prompts through the slot engine and the batching loop, and the model
folders it reads."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from tpt_jax.config import ModelConfig
from tpt_jax.generate._engine import SlotEngine
from tpt_jax.generate._loop import Request, continuous_batching
from tpt_jax.generate._sampling import SamplingParams


def load_generator(model_dir: str, dtype: str = "") -> tuple[ModelConfig, dict]:
    """(model config, parameters) of a `tpt convert from-hf` folder, computing in `dtype` if set."""
    from tpt_jax.model import load_model_config, param_shapes, restore_params

    cfg = load_model_config(model_dir)
    if dtype:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    return cfg, restore_params(model_dir, param_shapes(cfg))


def generate(
    params: dict,
    cfg: ModelConfig,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: SamplingParams | list[SamplingParams] | None = None,
    eos_id: int | None = None,
    stops: Sequence[Sequence[int]] = (),
    max_concurrent_decodes: int = 0,
) -> list[list[int]]:
    """Generates for prompts (different lengths) until EOS, a stop sequence (token ids) or
    max_new_tokens; each prompt stops on the device, so nothing is decoded past its stop.

    max_concurrent_decodes: slots (0: one per prompt); more prompts than slots are batched
    continuously. Returns the new tokens of each prompt (the EOS or stop sequence included).
    """
    if max_new_tokens <= 0 or not prompts:
        return [[] for _ in prompts]
    per_row = (
        sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * len(prompts)
    )
    longest = max(len(p) for p in prompts)
    # Round the sizes up so that batches of similar prompts share compiled steps.
    bucket = 1 << max(4, (longest - 1).bit_length())
    engine = SlotEngine(
        cfg,
        params,
        max_concurrent_decodes=max_concurrent_decodes or len(prompts),
        max_prefill_length=bucket,
        max_target_length=bucket + (1 << max(4, max_new_tokens.bit_length())),
        eos_ids=() if eos_id is None else (eos_id,),
        stops=stops,
    )
    requests = [
        Request(prompt, max_new_tokens, row_sampling, tag=i)
        for i, (prompt, row_sampling) in enumerate(zip(prompts, per_row, strict=True))
    ]
    outputs: list[list[int]] = [[] for _ in prompts]
    for result in continuous_batching(engine, engine.load_params(), requests):
        outputs[result.request.tag] = result.tokens
    return outputs
