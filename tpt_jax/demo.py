"""`tpt demo`: the smallest end-to-end job that exists so far, on the packaged demo config.

Until the data, think and experiment milestones land, the demo trains the demo decoder on the
built-in synthetic token stream (with held-out evaluation, checkpoints and metrics), then
exports the trained parameters to an HF safetensors folder and converts that back, checking
that the model's logits survive the round trip.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from tpt_jax.config import load_config
from tpt_jax.data import synthetic
from tpt_jax.model import Decoder, param_shapes
from tpt_jax.model._store import restore_params, save_model
from tpt_jax.model.convert import hf_to_tpt, tpt_to_hf
from tpt_jax.train import restore_latest
from tpt_jax.train.run import run_training


def run_demo(config: str, overrides: list[str], out_dir: str) -> None:
    overrides = [
        f"checkpoint.output_dir={os.path.join(out_dir, 'runs')}",
        "train.eval_every=50",
        *overrides,
    ]
    cfg = load_config(config, overrides)
    result = run_training(cfg, config, quiet_config=True)

    with open(os.path.join(result.run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    first, last = records[0], records[-1]
    print(
        f"demo: trained steps {result.start_step} -> {result.final_step}: train loss "
        f"{first['loss']:.3f} (step {first['step']}) -> {last['loss']:.3f}, held-out loss {result.eval_loss}"
    )

    params = jax.device_get(restore_latest(cfg, result.run_dir)[0].params)
    ours, hf, back = (os.path.join(out_dir, name) for name in ("model", "hf", "model_from_hf"))
    save_model(ours, cfg.model, params)
    tpt_to_hf(ours, hf, dtype="float32")
    hf_to_tpt(hf, back)
    restored = restore_params(back, param_shapes(cfg.model))
    batch = synthetic.global_batch(cfg.data.seed, 0, 2, cfg.train.seq_len, cfg.model.vocab_size)
    forward = jax.jit(
        lambda p: Decoder(cfg.model).apply(
            {"params": p}, batch["inputs"], batch["positions"], batch["segment_ids"]
        )
    )
    diff = float(jnp.abs(forward(restored) - forward(params)).max())
    print(
        f"demo: trained model -> HF safetensors ({hf}) -> tpt_jax: max logit difference {diff:.2e}"
    )
    print(
        f"demo: metrics in {result.run_dir}/metrics.jsonl, TensorBoard: tensorboard --logdir {result.run_dir}"
    )
    if not np.isfinite(diff) or diff > 1e-5:
        raise SystemExit("demo: the HF round trip changed the model")
