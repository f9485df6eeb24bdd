"""The continuous-batching loop over the paged engine: the tokens of every request equal those
of generating it alone, whatever the pool size, preemptions and prompt chunking; pages come back
as requests finish."""

import jax
import numpy as np
import pytest

from tpt_jax.config import ModelConfig
from tpt_jax.generate import (
    LoopStats,
    Request,
    SamplingParams,
    SlotEngine,
    continuous_batching,
    generate,
)
from tpt_jax.model import init_params

CFG = ModelConfig(
    vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96,
    dtype="float32",
)  # fmt: skip
HOT = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, seed=11)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(5))


def _requests(count: int, seed: int = 0) -> list[Request]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        prompt = rng.integers(2, 128, size=int(rng.integers(3, 40))).tolist()
        sampling = HOT if i % 2 else SamplingParams(seed=i)
        out.append(Request(prompt, int(rng.integers(4, 40)), sampling, tag=i))
    return out


def _alone(params, request: Request) -> list[int]:
    return generate(params, CFG, [list(request.prompt)], request.max_new_tokens, request.sampling)[
        0
    ]


def _batched(params, requests, stats=None, **engine_kwargs) -> list[list[int]]:
    kwargs = dict(max_concurrent_decodes=6, max_prefill_length=64, max_target_length=112)
    engine = SlotEngine(CFG, params, page_size=8, **{**kwargs, **engine_kwargs})
    out = {}
    for done in continuous_batching(engine, engine.load_params(), requests, stats=stats):
        out[done.request.tag] = done.tokens
    assert engine.pages.free_pages == engine.num_pages  # every page came back
    return [out[r.tag] for r in requests]


def test_a_small_pool_preempts_and_every_request_still_equals_generating_alone(params):
    """18 pages (one request at its longest takes 14) shared by 6 slots: the
    newest slots are preempted and recomputed, and no token changes, greedy or sampled."""
    requests = _requests(10)
    stats = LoopStats()
    batched = _batched(params, requests, stats, num_pages=18)
    assert stats.preemptions > 0 and stats.prompts == len(requests) + stats.preemptions
    assert batched == [_alone(params, r) for r in requests]
    assert _batched(params, requests) == batched  # the full pool: no preemption, same tokens


def test_long_prompts_are_prefilled_in_chunks_with_the_same_tokens(params):
    """Prompts of up to 60 tokens in chunks of 16 (pages of 8) give what one chunk gives."""
    rng = np.random.default_rng(2)
    requests = [
        Request(rng.integers(2, 128, size=n).tolist(), 12, HOT if n % 2 else SamplingParams(), n)
        for n in (60, 17, 33, 48)
    ]
    chunked = _batched(params, requests, prefill_chunk=16)
    assert chunked == _batched(params, requests, prefill_chunk=64)


def test_the_pool_must_hold_one_request_at_its_longest(params):
    with pytest.raises(ValueError, match="cannot hold one request"):
        SlotEngine(CFG, params, max_target_length=112, page_size=8, num_pages=13)


def test_the_loop_pulls_requests_lazily_and_stops_when_asked(params):
    """Requests are drawn only as slots free up, and a stop request abandons those in flight."""
    pulled = []

    def source():
        for r in _requests(30, seed=4):
            pulled.append(r.tag)
            yield r

    engine = SlotEngine(CFG, params, max_concurrent_decodes=3, max_prefill_length=64,
                        max_target_length=112, page_size=8)  # fmt: skip
    finished = []
    loop = continuous_batching(
        engine, engine.load_params(), source(), stop_requested=lambda: len(finished) >= 4
    )
    for done in loop:
        finished.append(done.request.tag)
    assert len(finished) >= 4 and len(pulled) < 30
    assert len(pulled) <= len(finished) + 3 + 1  # in flight, plus one drawn and waiting
