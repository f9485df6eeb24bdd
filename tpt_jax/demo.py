"""`tpt demo`: the smallest end-to-end job that exists so far, on the packaged demo config.

Until the training and data milestones land, the demo builds the configured decoder, runs it on
a packed batch, and round-trips it through the HF converter (tpt_jax -> HF safetensors ->
tpt_jax), checking that the logits survive unchanged.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from tpt_jax.config import load_config, save_resolved
from tpt_jax.model import Decoder, init_params, param_count, param_shapes
from tpt_jax.model._store import restore_params, save_model
from tpt_jax.model.convert import hf_to_tpt, tpt_to_hf

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.yaml")


def _packed_batch(rng: np.random.Generator, vocab: int, batch: int, length: int) -> dict:
    """Rows of random-length documents packed back to back (DESIGN.md batch format)."""
    tokens = rng.integers(1, vocab, size=(batch, length), dtype=np.int32)
    segment_ids = np.zeros((batch, length), np.int32)
    positions = np.zeros((batch, length), np.int32)
    for row in range(batch):
        start, seg = 0, 1
        while start < length - 4:
            end = min(length - 4, start + int(rng.integers(8, length // 2)))
            segment_ids[row, start:end] = seg
            positions[row, start:end] = np.arange(end - start)
            start, seg = end, seg + 1
    return {"inputs": tokens, "segment_ids": segment_ids, "positions": positions}


def run_demo(config: str | None, overrides: list[str], out_dir: str) -> None:
    if config is not None and "=" in config:
        overrides, config = [config, *overrides], None
    cfg = load_config(config or DEFAULT_CONFIG, overrides)
    print(
        f"demo: {param_count(cfg.model):,}-parameter {cfg.model.family} decoder, out -> {out_dir}"
    )
    save_resolved(cfg, out_dir)
    params = init_params(cfg.model, jax.random.key(cfg.train.seed))
    batch = _packed_batch(
        np.random.default_rng(cfg.train.seed), cfg.model.vocab_size, 4, cfg.train.seq_len
    )
    forward = jax.jit(
        lambda p, b: Decoder(cfg.model).apply(
            {"params": p}, b["inputs"], b["positions"], b["segment_ids"]
        )
    )
    start = time.perf_counter()
    logits = np.asarray(forward(params, batch))
    print(
        f"demo: forward on a packed batch {batch['inputs'].shape} in {time.perf_counter() - start:.2f}s"
    )

    ours, hf, back = (os.path.join(out_dir, name) for name in ("model", "hf", "model_from_hf"))
    save_model(ours, cfg.model, params)
    tpt_to_hf(ours, hf, dtype="float32")
    hf_to_tpt(hf, back)
    restored = restore_params(back, param_shapes(cfg.model))
    diff = float(jnp.abs(forward(restored, batch) - logits).max())
    print(f"demo: tpt_jax -> HF safetensors ({hf}) -> tpt_jax: max logit difference {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit("demo: the HF round trip changed the model")
