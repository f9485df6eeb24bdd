"""`tpt export CONFIG OUT`: a run's latest checkpoint as a model folder and an HF folder.

OUT/model is what `tpt sample`, `tpt eval`, `tpt serve` and `tpt think` read (think.model_dir);
OUT/hf is a transformers folder (config.json, safetensors, tokenizer.json) made from it by the
same converter as `tpt convert to-hf`. The tokenizer is the run's SentencePiece vocabulary
(data.vocab_path), written as an equivalent tokenizer.json.
"""

from __future__ import annotations

import os

import jax

from tpt_jax.config import Config
from tpt_jax.errors import TptError


def export_run(cfg: Config, run_dir: str, out_dir: str, hf_dtype: str = "float32") -> dict:
    from tpt_jax.train import restore_latest

    state, _ = restore_latest(cfg, run_dir)
    summary = export_params(cfg, jax.device_get(state.params), out_dir, hf_dtype)
    return {**summary, "step": int(jax.device_get(state.step))}


def export_params(cfg: Config, params: dict, out_dir: str, hf_dtype: str = "float32") -> dict:
    """Parameters of `cfg.model` (host arrays) as OUT/model (with the run's tokenizer) and
    OUT/hf; returns the folders and the converter's summary."""
    from tpt_jax.data import vocab
    from tpt_jax.model import save_model
    from tpt_jax.model.convert import tpt_to_hf

    model_cfg = cfg.model
    model_dir, hf_dir = os.path.join(out_dir, "model"), os.path.join(out_dir, "hf")
    if cfg.data.vocab_path:
        model_cfg = vocab.with_special_ids(model_cfg)
    elif cfg.data.source == "prepared":
        raise TptError("tpt export: data.vocab_path is empty; the model needs its tokenizer")
    save_model(model_dir, model_cfg, params)
    if cfg.data.vocab_path:
        vocab.write_tokenizer_files(vocab.read_model(cfg.data.vocab_path), model_dir)
    summary = tpt_to_hf(model_dir, hf_dir, dtype=hf_dtype)
    return {"model_dir": model_dir, "hf_dir": hf_dir, **summary}
