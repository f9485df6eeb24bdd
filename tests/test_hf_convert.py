"""Our decoder against HF transformers on CPU, and the HF <-> tpt_jax converter round trip."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from hf_reference import logits, make_model

from tpt_jax.errors import CheckpointError
from tpt_jax.model import Decoder, param_shapes
from tpt_jax.model._store import load_model_config, restore_params
from tpt_jax.model.convert import hf_to_tpt, tpt_to_hf

TOLERANCE = 1e-4


def _convert(model, tmp_path, shard_size="1GB"):
    hf_dir, ours_dir = tmp_path / "hf", tmp_path / "ours"
    model.save_pretrained(hf_dir, max_shard_size=shard_size)
    hf_to_tpt(str(hf_dir), str(ours_dir))
    # Query blocks of 16 so that every test row spans several blocks, one of them partial.
    cfg = dataclasses.replace(load_model_config(str(ours_dir)), dtype="float32", attention_block=16)
    params = restore_params(str(ours_dir), param_shapes(cfg))
    return cfg, params, ours_dir


def _ours(cfg, params, tokens, positions=None, segment_ids=None):
    def as_jnp(x):
        return None if x is None else jnp.asarray(x)

    out = Decoder(cfg).apply(
        {"params": params}, as_jnp(tokens), as_jnp(positions), as_jnp(segment_ids)
    )
    return np.asarray(out)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_logits_match_hf(family, tmp_path):
    model = make_model(family)
    # A small shard size forces the sharded index path of the reader.
    cfg, params, _ = _convert(model, tmp_path, shard_size="50KB")
    assert cfg.family == family
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(3, 40))
    diff = np.abs(_ours(cfg, params, tokens) - logits(model, tokens).numpy()).max()
    assert diff <= TOLERANCE, f"{family}: max abs logit diff {diff}"


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_packed_row_matches_segments_run_alone(family, tmp_path):
    model = make_model(family)
    cfg, params, _ = _convert(model, tmp_path)
    rng = np.random.default_rng(1)
    lengths = [7, 12, 5]
    pad = 4
    docs = [rng.integers(0, cfg.vocab_size, size=n) for n in lengths]
    tokens = np.concatenate([*docs, np.zeros(pad, np.int64)])[None]
    segment_ids = np.concatenate(
        [np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)]
    )[None]
    positions = np.concatenate([np.arange(n) for n in lengths] + [np.arange(pad)])[None]
    packed = _ours(cfg, params, tokens, positions.astype(np.int32), segment_ids.astype(np.int32))
    start = 0
    for doc in docs:
        alone = logits(model, doc[None]).numpy()[0]
        diff = np.abs(packed[0, start : start + len(doc)] - alone).max()
        assert diff <= TOLERANCE, f"{family}: segment at {start} differs by {diff}"
        start += len(doc)
    assert np.isfinite(packed).all()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_export_reloads_in_transformers(family, tmp_path):
    model = make_model(family)
    _, _, ours_dir = _convert(model, tmp_path)
    out_dir = tmp_path / "exported"
    summary = tpt_to_hf(str(ours_dir), str(out_dir), dtype="float32", max_shard_bytes=60_000)
    assert summary["shards"] > 1 and (out_dir / "model.safetensors.index.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out_dir).float().eval()
    assert type(reloaded) is type(model)
    tokens = np.random.default_rng(2).integers(0, 96, size=(2, 24))
    diff = np.abs(logits(reloaded, tokens).numpy() - logits(model, tokens).numpy()).max()
    assert diff <= TOLERANCE, f"{family}: exported model differs by {diff}"


def test_bfloat16_export_keeps_config(tmp_path):
    model = make_model("llama")
    _, _, ours_dir = _convert(model, tmp_path)
    tpt_to_hf(str(ours_dir), str(tmp_path / "bf16"), dtype="bfloat16")
    exported = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert exported["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert reloaded.config.rope_parameters["rope_type"] == "llama3"
    assert reloaded.model.embed_tokens.weight.dtype.__str__() == "torch.bfloat16"


def test_unsupported_hf_model_is_refused(tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["model_type"] = "mistral"
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'mistral' is not supported"):
        hf_to_tpt(str(tmp_path / "hf"), str(tmp_path / "out"))


def test_shape_mismatch_names_the_tensor(tmp_path):
    model = make_model("qwen2")
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["intermediate_size"] = 88
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError, match=r"model.layers.0.mlp.gate_proj.weight' has shape \[80, 64\]"
    ):
        hf_to_tpt(str(tmp_path / "hf"), str(tmp_path / "out"))


def test_restore_refuses_other_shapes(tmp_path):
    cfg, _, ours_dir = _convert(make_model("qwen3"), tmp_path)
    wider = dataclasses.replace(cfg, mlp_dim=cfg.mlp_dim * 2)
    with pytest.raises(
        CheckpointError, match=r"\['layers'\]\['mlp'\]\['down'\]\['kernel'\] has shape"
    ):
        restore_params(str(ours_dir), param_shapes(wider))
    assert os.path.exists(ours_dir / "model.yaml")


def test_cli_round_trip(tmp_path):
    import subprocess
    import sys

    make_model("qwen3").save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text("{}")

    def tpt(*args):
        return subprocess.run(
            [sys.executable, "-m", "tpt_jax", *args], capture_output=True, text=True, timeout=300
        )

    result = tpt("convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ours"))
    assert result.returncode == 0, result.stderr
    assert "converted qwen3" in result.stdout and "tokenizer_config.json" in result.stdout
    result = tpt(
        "convert", "to-hf", str(tmp_path / "ours"), str(tmp_path / "back"), "--dtype", "float32"
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "back" / "tokenizer_config.json").exists()
    result = tpt("convert", "from-hf", str(tmp_path / "missing"), str(tmp_path / "x"))
    assert (
        result.returncode == 2
        and result.stderr.count("\n") == 1
        and "no config.json" in result.stderr
    )
