"""Packing: no token lost or duplicated, consistent segment ids and positions, no loss on padding."""

import numpy as np
import pytest

from tpt_jax.data.packing import pack, row_to_batch_fields

SEQ = 16


def _samples(seed=0, n=60, longest=40):
    rng = np.random.default_rng(seed)
    return [
        rng.integers(2, 1000, size=int(rng.integers(1, longest)), dtype=np.int32) for _ in range(n)
    ]


def _segments(rows):
    """Each segment's targets, in order, with its segment id and positions."""
    fields = row_to_batch_fields(np.stack(rows))
    out = []
    for r in range(len(rows)):
        seg = fields["segment_ids"][r]
        for s in range(1, seg.max() + 1):
            where = np.flatnonzero(seg == s)
            assert np.all(np.diff(where) == 1), "a segment must be contiguous"
            np.testing.assert_array_equal(fields["positions"][r, where], np.arange(len(where)))
            out.append((fields["inputs"][r, where], fields["targets"][r, where]))
        padding = seg == 0
        assert np.all(fields["loss_weights"][r, padding] == 0) and np.all(
            fields["loss_weights"][r, ~padding] == 1
        )
        assert np.all(fields["targets"][r, padding] == 0)
        if padding.any():  # padding only at the end of a row
            assert np.all(padding[np.argmax(padding) :])
    return out


def test_split_packing_reproduces_every_sample():
    samples = _samples()
    rows, stats = pack(samples, SEQ, "split")
    segments = _segments(rows)
    np.testing.assert_array_equal(np.concatenate([t for _, t in segments]), np.concatenate(samples))
    assert (
        stats.tokens == len(np.concatenate(samples))
        and stats.rows == len(rows)
        and stats.samples == len(samples)
    )
    assert stats.split_samples == sum(len(s) > SEQ for s in samples)
    # Inputs are targets shifted right from 0; a continuation starts with the previous token.
    pieces = iter(segments)
    for sample in samples:
        taken, first_input = 0, 0
        while taken < len(sample):
            inputs, targets = next(pieces)
            np.testing.assert_array_equal(targets, sample[taken : taken + len(targets)])
            assert inputs[0] == first_input
            np.testing.assert_array_equal(inputs[1:], targets[:-1])
            taken += len(targets)
            first_input = targets[-1]


def test_short_samples_never_straddle_rows():
    samples = _samples(n=100, longest=SEQ)
    rows, _ = pack(samples, SEQ)
    segments = _segments(rows)
    assert len(segments) == len(samples)
    for (inputs, targets), sample in zip(segments, samples, strict=True):
        np.testing.assert_array_equal(targets, sample)
        assert inputs[0] == 0


def test_truncate_keeps_the_first_seq_len_tokens():
    samples = _samples(seed=3)
    rows, stats = pack(samples, SEQ, "truncate")
    targets = [t for _, t in _segments(rows)]
    assert len(targets) == len(samples)
    for got, sample in zip(targets, samples, strict=True):
        np.testing.assert_array_equal(got, sample[:SEQ])
    assert stats.truncated_tokens == sum(max(0, len(s) - SEQ) for s in samples)


def test_bad_policy():
    with pytest.raises(ValueError, match="split or truncate"):
        pack([], SEQ, "drop")
