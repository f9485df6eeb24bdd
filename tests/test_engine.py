"""The JetStream engine: prefill / insert / generate with continuous batching gives the same
tokens as generating each request alone."""

import jax
import numpy as np
import pytest

from tpt_jax.config import ModelConfig
from tpt_jax.generate import SamplingParams, generate, pad_prompt
from tpt_jax.generate.jetstream import TptEngine
from tpt_jax.model import init_params

CFG = ModelConfig(
    vocab_size=128,
    hidden_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    mlp_dim=96,
    dtype="float32",
)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(3))


def _run(engine, params, requests, steps):
    """Continuous batching: requests wait for a free slot; a slot frees after its token budget."""
    state = engine.init_decode_state()
    pending = list(enumerate(requests))
    slots: dict[int, tuple[int, int]] = {}  # slot -> (request index, budget)
    out = {i: [] for i in range(len(requests))}
    for _ in range(steps):
        for slot in range(engine.max_concurrent_decodes):
            if slot not in slots and pending:
                i, (prompt, budget, sampling) = pending.pop(0)
                padded, length = pad_prompt(prompt, engine.max_prefill_length)
                prefix = engine.prefill(
                    params=params, padded_tokens=padded, true_length=length, sampling=sampling
                )
                state = engine.insert(prefix, state, slot)
                slots[slot] = (i, budget)
        if not slots:
            break
        state, result = engine.generate(params, state)
        result = result.convert_to_numpy()
        for slot, (i, budget) in list(slots.items()):
            data = result.get_result_at_slot(slot)
            assert data.valid[0, 0] == 1
            out[i].append(int(data.tokens[0, 0]))
            assert data.lengths[0] == len(out[i])
            if len(out[i]) == budget:
                del slots[slot]
    return [out[i] for i in range(len(requests))]


def test_continuous_batching_matches_generating_alone(params):
    rng = np.random.default_rng(0)
    greedy = SamplingParams()
    hot = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=5)
    requests = [
        (rng.integers(2, 128, size=int(n)).tolist(), budget, sampling)
        for n, budget, sampling in [
            (3, 6, greedy),
            (20, 9, hot),
            (7, 4, greedy),
            (12, 8, hot),
            (1, 5, greedy),
        ]
    ]
    engine = TptEngine(
        CFG, params, max_concurrent_decodes=2, max_prefill_length=32, max_target_length=64
    )
    got = _run(engine, engine.load_params(), requests, steps=100)
    for (prompt, budget, sampling), tokens in zip(requests, got, strict=True):
        assert tokens == generate(params, CFG, [prompt], budget, sampling)[0]


def test_engine_api_surface(params):
    engine = TptEngine(
        CFG, max_concurrent_decodes=4, max_prefill_length=64, tokenizer_path="/x.model"
    )
    loaded = engine.load_params(params)
    assert isinstance(loaded["layers"], list) and len(loaded["layers"]) == CFG.num_layers
    assert engine.load_params() is loaded
    assert (engine.max_concurrent_decodes, engine.samples_per_slot, engine.max_prefill_length) == (
        4,
        1,
        64,
    )
    assert engine.get_tokenizer().path == "/x.model"
    with pytest.raises(ValueError, match="exceeds max_prefill_length"):
        pad_prompt(list(range(65)), 64)
    assert pad_prompt([1, 2, 3], 64)[0].shape == (16,)


def test_sharded_kv_cache_gives_the_same_tokens(params):
    """On a data x fsdp x tensor mesh the KV pages are split over kv heads (each chip holds its
    heads' share of every page); tokens do not change."""
    from jax.sharding import Mesh, PartitionSpec

    rng = np.random.default_rng(1)
    hot = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=5)
    greedy = SamplingParams()
    shapes = [(5, 6, greedy), (17, 7, hot), (9, 5, hot), (2, 8, greedy), (11, 4, hot), (3, 6, hot)]
    requests = [(rng.integers(2, 128, size=n).tolist(), b, s) for n, b, s in shapes]
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    kwargs = dict(max_concurrent_decodes=4, max_prefill_length=32, max_target_length=64)
    sharded = TptEngine(CFG, params, mesh=mesh, **kwargs)
    loaded = sharded.load_params()
    gate = loaded["layers"][0]["mlp"]["gate"]["kernel"]
    assert gate.sharding.spec == PartitionSpec("fsdp", "tensor")
    pages = sharded.init_decode_state().pages[0][0]
    assert pages.sharding.spec == PartitionSpec("tensor", None, None, None)
    kv, num_pages, page_size, head_dim = pages.shape
    assert pages.addressable_shards[0].data.shape == (kv // 2, num_pages, page_size, head_dim)
    alone = TptEngine(CFG, params, **kwargs)
    assert _run(sharded, loaded, requests, 100) == _run(alone, alone.load_params(), requests, 100)
