"""Stops decided on the device: EOS, max length and stop sequences (one or several tokens) end a
slot inside the compiled step, a done slot stays put, and the tokens equal a free run's up to and
including the stop."""

import jax
import numpy as np
import pytest

from tpt_jax.config import ModelConfig
from tpt_jax.generate import SamplingParams, SlotEngine, generate, pad_prompt, stop_table
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
PROMPTS = [[5, 17, 99, 3], [42, 8, 8, 120, 7, 64, 2]]
NEW = 24
HOT = SamplingParams(temperature=0.9, top_k=30, top_p=0.95, seed=11)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(7))


@pytest.fixture(scope="module")
def free(params):
    """Greedy and sampled runs of every prompt with no stop at all."""
    return {
        "greedy": generate(params, CFG, PROMPTS, NEW),
        "sampled": generate(params, CFG, PROMPTS, NEW, HOT),
    }


def _cut(tokens, cap, eos=None, stops=()):
    """Where a host that reads the tokens one by one would stop."""
    for i in range(min(cap, len(tokens))):
        if tokens[i] == eos:
            return tokens[: i + 1]
        if any(i + 1 >= len(s) and tokens[i + 1 - len(s) : i + 1] == list(s) for s in stops):
            return tokens[: i + 1]
    return tokens[:cap]


def _engine(params, slots=2, **kwargs):
    engine = SlotEngine(
        CFG, params, max_concurrent_decodes=slots, max_prefill_length=16, max_target_length=48,
        **kwargs,
    )  # fmt: skip
    return engine, engine.load_params()


def _insert(engine, params, state, slot, prompt, cap, sampling=None):
    padded, length = pad_prompt(prompt, engine.max_prefill_length)
    prefix = engine.prefill(
        params=params, padded_tokens=padded, true_length=length, sampling=sampling
    )
    return engine.insert(prefix, state, slot, cap)


def test_stop_table_right_aligns_sequences():
    table, lengths = stop_table([[4], [], [1, 2, 3]])
    assert table.tolist() == [[-1, -1, 4], [1, 2, 3]]
    assert lengths.tolist() == [1, 3]
    assert stop_table([])[0].shape == (0, 1)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_eos_ends_each_row_at_its_first_eos(params, free, mode):
    sampling = HOT if mode == "sampled" else None
    eos = free[mode][1][5]
    got = generate(params, CFG, PROMPTS, NEW, sampling, eos_id=eos)
    assert got == [_cut(row, NEW, eos=eos) for row in free[mode]]
    assert got[1][-1] == eos and len(got[1]) <= 6


def test_max_length_per_slot(params, free):
    assert generate(params, CFG, PROMPTS, 5) == [row[:5] for row in free["greedy"]]
    engine, p = _engine(params)
    state = engine.init_decode_state()
    state = _insert(engine, p, state, 0, PROMPTS[0], 3)
    state = _insert(engine, p, state, 1, PROMPTS[1], 7)
    state, done = engine.generate_steps(p, state, 4)
    assert np.asarray(done).tolist() == [True, False]
    state, done = engine.generate_steps(p, state, 4)
    assert np.asarray(done).tolist() == [True, True]
    assert engine.collect(state, [1, 0]) == [free["greedy"][1][:7], free["greedy"][0][:3]]


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_single_token_stop(params, free, mode):
    sampling = HOT if mode == "sampled" else None
    stop = [free[mode][0][6]]
    got = generate(params, CFG, PROMPTS, NEW, sampling, stops=[stop])
    assert got == [_cut(row, NEW, stops=[stop]) for row in free[mode]]
    assert got[0][-1] == stop[0]


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_stop_spanning_three_tokens(params, free, mode):
    sampling = HOT if mode == "sampled" else None
    stop = free[mode][1][7:10]
    got = generate(params, CFG, PROMPTS, NEW, sampling, stops=[stop])
    assert got == [_cut(row, NEW, stops=[stop]) for row in free[mode]]
    assert got[1][-3:] == stop and len(got[1]) <= 10


def test_stop_across_the_prompt_boundary_does_not_stop(params, free):
    """Only generated tokens count: the prompt's last token and the first generated token
    together form the stop, yet generation goes on."""
    first = free["greedy"][0][0]
    stop = [PROMPTS[0][-1], first]
    got = generate(params, CFG, PROMPTS[:1], NEW, stops=[stop])[0]
    assert got == _cut(free["greedy"][0], NEW, stops=[stop])
    assert len(got) > 1


def test_two_stops_of_different_lengths(params, free):
    row = free["greedy"][1]
    long, short = row[2:5], [row[8]]
    got = generate(params, CFG, PROMPTS, NEW, stops=[long, short])
    assert got == [_cut(r, NEW, stops=[long, short]) for r in free["greedy"]]
    assert len(got[1]) <= 5
    # The short stop ends a row the long one does not reach.
    late = generate(params, CFG, PROMPTS, NEW, stops=[row[12:15], short])
    assert late == [_cut(r, NEW, stops=[row[12:15], short]) for r in free["greedy"]]
    assert late[1][-1] == short[0] and len(late[1]) <= 9


def test_a_refilled_slot_starts_afresh(params, free):
    """A slot that finished (at a stop) is refilled: its count, recent tokens, done flag and
    output row are reset, so the new request runs as if alone."""
    a, b = free["greedy"]
    # The first request ends at its 4th token; a stop made of that token and the second
    # request's first token must not end the second request at once.
    stops = [a[3:4], [a[3], b[0]]]
    engine, p = _engine(params, slots=1, stops=stops)
    state = engine.init_decode_state()
    state = _insert(engine, p, state, 0, PROMPTS[0], NEW)
    state, done = engine.generate_steps(p, state, 8)
    assert bool(done[0]) and engine.collect(state, [0]) == [_cut(a, NEW, stops=stops)]
    state = _insert(engine, p, state, 0, PROMPTS[1], 6)
    assert not bool(state.done[0])
    while not bool(done[0]) or engine.collect(state, [0])[0][:1] != b[:1]:
        state, done = engine.generate_steps(p, state, 8)
    assert engine.collect(state, [0]) == [_cut(b, 6, stops=stops)]


def test_a_done_slot_does_not_advance(params, free):
    engine, p = _engine(params)
    state = engine.init_decode_state()
    state = _insert(engine, p, state, 0, PROMPTS[0], 3)  # done at its 3rd token
    state = _insert(engine, p, state, 1, PROMPTS[1], NEW)
    state, done = engine.generate_steps(p, state, 3)
    assert np.asarray(done).tolist() == [True, False]

    def row(s, slot):  # the slot's fields and the pages it owns
        ids = engine.pages.table[slot, : engine.pages.owned[slot]].copy()
        fields = ("lengths", "tokens", "generated", "recent", "output")
        out = {k: np.asarray(getattr(s, k)[slot]) for k in fields}
        out["pages"] = [np.asarray(pool[:, ids]) for layer in s.pages for pool in layer]
        return out

    before, other = row(state, 0), row(state, 1)
    state, done = engine.generate_steps(p, state, 5)
    state, data = engine.generate(p, state)  # the one-step form marks it invalid
    data = np.asarray(data)
    assert data[0, 1] == 0 and data[1, 1] == 1
    after = row(state, 0)
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, y)
    assert int(row(state, 1)["generated"]) == int(other["generated"]) + 6
    assert engine.collect(state, [0, 1]) == [free["greedy"][0][:3], free["greedy"][1][:9]]
