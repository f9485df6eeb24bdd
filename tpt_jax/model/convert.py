"""`tpt convert`: HF folder <-> tpt_jax converted-model folder (model.yaml + Orbax params)."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
import numpy as np

from tpt_jax import storage
from tpt_jax.errors import CheckpointError
from tpt_jax.model._hf import hf_config_from_model, hf_tensors, load_hf_params, model_config_from_hf
from tpt_jax.model._params import param_shapes
from tpt_jax.model._safetensors import write_sharded
from tpt_jax.model._store import load_model_config, restore_params, save_model

# Tokenizer and generation files travel with the weights both ways.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def _copy_side_files(src: str, dst: str) -> list[str]:
    copied = []
    for name in SIDE_FILES:  # either folder local or gs://
        if storage.exists(os.path.join(src, name)):
            storage.write_bytes(
                os.path.join(dst, name), storage.read_bytes(os.path.join(src, name))
            )
            copied.append(name)
    return copied


def hf_to_tpt(src: str, dst: str, param_dtype: str = "float32") -> dict:
    """Converts an HF folder to a tpt_jax folder. Returns a summary for the CLI."""
    config_path = os.path.join(src, "config.json")
    try:
        with open(config_path) as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{src}: no config.json; is this an HF model folder?") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_path}:{e.lineno}: invalid JSON ({e.msg})") from None
    cfg = model_config_from_hf(hf, config_path, param_dtype)
    params = load_hf_params(src, cfg, param_shapes(cfg))
    save_model(dst, cfg, params)
    copied = _copy_side_files(src, dst)
    count = sum(x.size for x in jax.tree.leaves(params))
    return {"family": cfg.family, "parameters": count, "copied": copied}


def tpt_to_hf(src: str, dst: str, dtype: str = "bfloat16", max_shard_bytes: int = 5 << 30) -> dict:
    """Converts a tpt_jax folder back to an HF folder that transformers loads."""
    if dtype not in _NP_DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} is not one of {', '.join(_NP_DTYPES)}")
    cfg = load_model_config(src)
    hf_config = hf_config_from_model(cfg, dtype)
    # Restore in the stored dtype: casting happens tensor by tensor while the shards are written.
    params = restore_params(src, param_shapes(cfg))
    with storage.staged_folder(dst) as local:  # safetensors writes local files
        shards = write_sharded(hf_tensors(cfg, params, _NP_DTYPES[dtype]), local, max_shard_bytes)
        with open(os.path.join(local, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        copied = _copy_side_files(src, local)
    return {"family": cfg.family, "shards": len(shards), "copied": copied}
