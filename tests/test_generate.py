"""Generation over the key/value cache: greedy equals HF transformers `generate` token for token,
and sampling follows its settings."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_reference import make_model

from tpt_jax.generate import SamplingParams, filter_logits, generate, sample
from tpt_jax.model import param_shapes
from tpt_jax.model._store import load_model_config, restore_params
from tpt_jax.model.convert import hf_to_tpt

PROMPTS = [[5, 17, 3], [9, 4, 22, 61, 7, 7, 30, 2, 11], [40, 41, 42, 43, 44]]
NEW_TOKENS = 12


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_greedy_matches_hf_generate(family, tmp_path):
    model = make_model(family)
    model.save_pretrained(tmp_path / "hf")
    hf_to_tpt(str(tmp_path / "hf"), str(tmp_path / "ours"))
    cfg = dataclasses.replace(
        load_model_config(str(tmp_path / "ours")), dtype="float32", attention_block=4
    )
    params = restore_params(str(tmp_path / "ours"), param_shapes(cfg))
    ours = generate(params, cfg, PROMPTS, NEW_TOKENS)
    model.generation_config.eos_token_id = None
    for prompt, got in zip(PROMPTS, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
        assert got == out[0, len(prompt) :].tolist(), f"{family}: prompt {prompt}"


def test_generation_stops_at_eos(tmp_path):
    model = make_model("llama")
    model.save_pretrained(tmp_path / "hf")
    hf_to_tpt(str(tmp_path / "hf"), str(tmp_path / "ours"))
    cfg = dataclasses.replace(load_model_config(str(tmp_path / "ours")), dtype="float32")
    params = restore_params(str(tmp_path / "ours"), param_shapes(cfg))
    free = generate(params, cfg, PROMPTS, NEW_TOKENS)
    eos = free[1][3]
    stopped = generate(params, cfg, PROMPTS, NEW_TOKENS, eos_id=eos)
    assert stopped[1] == free[1][: free[1].index(eos) + 1]


def test_sampling_is_reproducible_by_seed_and_follows_softmax():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]], jnp.float32))
    n = 20_000
    keys = jax.random.split(jax.random.key(7), n)
    draw = jax.jit(
        jax.vmap(
            lambda k: sample(logits, k[None], jnp.ones(1), jnp.zeros(1, jnp.int32), jnp.ones(1))[0]
        )
    )
    tokens = np.asarray(draw(keys))
    np.testing.assert_array_equal(tokens, np.asarray(draw(keys)))
    counts = np.bincount(tokens, minlength=4)
    expected = n * np.array([0.5, 0.3, 0.15, 0.05])
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 16.27, (counts, chi2)  # p = 0.001 with 3 degrees of freedom


def test_top_k_and_top_p_exclude_tokens():
    logits = jnp.log(jnp.array([[0.4, 0.3, 0.2, 0.1], [0.4, 0.3, 0.2, 0.1]], jnp.float32))
    kept = filter_logits(logits, jnp.array([2, 0]), jnp.array([1.0, 0.65]))
    assert np.isfinite(np.asarray(kept)).tolist() == [
        [True, True, False, False],
        [True, True, False, False],
    ]
    keys = jax.random.split(jax.random.key(0), 2000)
    draws = jax.vmap(
        lambda k: sample(
            logits, jnp.stack([k, k]), jnp.ones(2), jnp.array([2, 0]), jnp.array([1.0, 0.65])
        )
    )(keys)
    assert set(np.unique(np.asarray(draws))) <= {0, 1}
    assert SamplingParams().temperature == 0.0


def test_filter_falls_back_to_a_full_sort_when_candidates_are_not_enough():
    from tpt_jax.generate import _sampling as sampling

    flat = jnp.zeros((2, 1000), jnp.float32)  # uniform: the top 256 hold 25.6% of the mass
    kept = filter_logits(flat, jnp.array([0, 300]), jnp.array([0.5, 1.0]))
    counts = np.isfinite(np.asarray(kept)).sum(axis=1)
    # Ties keep every equal logit; what matters is that nothing is cut at the 256 candidates.
    assert counts.tolist() == [1000, 1000]
    decreasing = -0.002 * jnp.arange(1000, dtype=jnp.float32)[None]  # distinct logits
    kept = filter_logits(decreasing, jnp.array([300]), jnp.array([1.0]))
    assert int(np.isfinite(np.asarray(kept)).sum()) == 300 > sampling.CANDIDATES
    probs = np.exp(np.asarray(decreasing[0])) / np.exp(np.asarray(decreasing[0])).sum()
    nucleus = int(np.searchsorted(np.cumsum(probs), 0.9) + 1)  # tokens needed to reach 0.9
    kept = filter_logits(decreasing, jnp.array([0]), jnp.array([0.9]))
    assert int(np.isfinite(np.asarray(kept)).sum()) == nucleus > sampling.CANDIDATES
