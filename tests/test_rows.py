"""The prepared-rows format: lossless against packing's rows, fixed stride, ranged reads only."""

import os

import numpy as np
import pytest

from tpt_jax.data import rows
from tpt_jax.data.packing import Packer, pack, row_to_batch_fields

SEQ = 16


def _packed(long_docs):
    """Rows of the real Packer over samples that exercise every case: one-token samples, samples
    filling a row exactly, samples split over several rows (ending exactly at a row's end, or
    not), padding at the end of rows, and (truncate) samples cut to seq_len."""
    rng = np.random.default_rng(7)
    lengths = [1, 1, SEQ, 3, SEQ - 3, 2 * SEQ, 1, 40, 5, SEQ + 1, 1, 3 * SEQ - 4, 7, 1, 9, 70]
    lengths += [int(n) for n in rng.integers(1, 3 * SEQ, 200)]
    samples = [rng.integers(1, 300, n).astype(np.int32) for n in lengths]
    packed, stats = pack(samples, SEQ, long_docs)
    return np.stack(packed), stats


@pytest.mark.parametrize("long_docs", ["split", "truncate"])
def test_decoded_rows_equal_the_packers_batch_fields(long_docs):
    packed, stats = _packed(long_docs)
    segment_ids = packed[:, 2]
    # The cases are really there: full rows, padded rows, continuations, one-token segments.
    assert (segment_ids[:, -1] > 0).any() and (segment_ids[:, -1] == 0).any()
    assert (long_docs == "split") == (stats.split_samples > 0) and (packed[:, 0, 0] > 0).any() == (
        long_docs == "split"
    )
    one_token = (np.diff(segment_ids, axis=1, prepend=0, append=0) != 0).sum()
    assert one_token > 0
    expected = row_to_batch_fields(packed)
    got = rows.decode(rows.encode(packed, "uint16"))
    assert set(got) == set(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_a_row_stores_tokens_starts_and_count_only():
    assert rows.row_dtype(2048, "uint16").itemsize == 2 * 2049 + 256 + 4
    assert rows.row_dtype(16, "uint8").itemsize == 17 + 2 + 4
    assert rows.row_dtype(2048, "uint32").itemsize == 4 * 2049 + 256 + 4


@pytest.mark.parametrize(
    ("vocab_size", "dtype"),
    [(2, "uint8"), (256, "uint8"), (257, "uint16"), (65536, "uint16"), (65537, "uint32"),
     (151_936, "uint32")],
)  # fmt: skip
def test_token_dtype_is_the_narrowest_that_holds_the_vocabulary(vocab_size, dtype):
    assert rows.token_dtype(vocab_size) == dtype


def test_a_token_outside_the_dtype_is_refused():
    packer = Packer(SEQ)
    packed = np.stack([*packer.add(np.array([5, 300, 7], np.int32)), *packer.finish()])
    with pytest.raises(ValueError, match=r"outside 0\.\.255"):
        rows.encode(packed, "uint8")


def test_rows_not_in_packings_convention_are_refused():
    packer = Packer(SEQ)
    packed = np.stack(
        [
            *packer.add(np.arange(1, 5, dtype=np.int32)),
            *packer.add(np.arange(1, 4, dtype=np.int32)),
            *packer.finish(),
        ]
    )
    packed[0, 0, 4] = 9  # a later segment's first input must be 0
    with pytest.raises(ValueError, match="inputs differ"):
        rows.encode(packed, "uint16")


def _counting_pread(monkeypatch):
    calls = []
    real = os.pread

    def pread(fd, size, offset):
        calls.append((offset, size))
        return real(fd, size, offset)

    monkeypatch.setattr(rows.os, "pread", pread)
    return calls


def test_reader_reads_only_the_byte_ranges_of_the_rows_asked(tmp_path, monkeypatch):
    packed, _ = _packed("split")
    encoded = rows.encode(packed, "uint16")
    path = str(tmp_path / "t" / "a.rows")
    rows.write(path, encoded)
    size = rows.row_dtype(SEQ, "uint16").itemsize
    assert os.path.getsize(path) == rows.HEADER_BYTES + len(packed) * size
    assert not os.path.exists(path + ".tmp")
    calls = _counting_pread(monkeypatch)
    reader = rows.RowsReader(path, rows=len(packed))
    assert len(reader) == len(packed) and calls == []  # opened lazily
    wanted = np.array([9, 3, 4, 5, 3, len(packed) - 1])
    got = reader.read(wanted)
    assert got.tobytes() == encoded[wanted].tobytes()
    assert calls[0] == (0, rows.HEADER_BYTES)
    # rows 3-5 are one range; repeats are read once.
    H = rows.HEADER_BYTES
    assert sorted(calls[1:]) == [
        (H + 3 * size, 3 * size), (H + 9 * size, size), (H + (len(packed) - 1) * size, size),
    ]  # fmt: skip
    calls.clear()
    reader.read(np.array([0]))
    assert calls == [(H, size)]  # the header only once
    assert reader.meta == {
        "version": 1, "seq_len": SEQ, "token_dtype": "uint16", "row_bytes": size,
        "rows": len(packed),
    }  # fmt: skip


def test_bad_files_are_refused_naming_the_file(tmp_path):
    old = tmp_path / "old.rows"
    old.write_bytes(b"\x00" * 5000)
    with pytest.raises(rows.RowsFileError, match=r"old\.rows is not a prepared-rows file"):
        rows.RowsReader(str(old)).read(np.array([0]))
    packed, _ = _packed("split")
    path = tmp_path / "cut.rows"
    rows.write(str(path), rows.encode(packed, "uint16"))
    path.write_bytes(path.read_bytes()[:-10])
    reader = rows.RowsReader(str(path))
    reader.read(np.array([0]))
    with pytest.raises(rows.RowsFileError, match=r"cut\.rows is shorter than its header says"):
        reader.read(np.array([len(packed) - 1]))
    with pytest.raises(rows.RowsFileError, match=r"holds \d+ rows but the manifest says 3"):
        rows.RowsReader(str(path), rows=3).read(np.array([0]))
    newer = tmp_path / "newer.rows"
    newer.write_bytes(path.read_bytes().replace(b'"version": 1', b'"version": 9', 1))
    with pytest.raises(rows.RowsFileError, match="format version 9"):
        rows.RowsReader(str(newer)).read(np.array([0]))
    with pytest.raises(rows.RowsFileError, match=r"none\.rows not found"):
        rows.RowsReader(str(tmp_path / "none.rows")).read(np.array([0]))


def test_reading_more_shards_than_the_open_file_limit(tmp_path):
    """Thousands of shards (one per input file per task, and their held-out ones) must not each
    hold an open file: read every shard of 3x the process's file limit, twice, one by one and all
    in one read, in a process whose limit is lowered."""
    import subprocess
    import sys
    import textwrap

    packed, _ = _packed("split")
    encoded = rows.encode(packed[:4], "uint16")
    for i in range(150):
        rows.write(str(tmp_path / f"s{i:03d}.rows"), encoded[[i % 4]])
    script = textwrap.dedent(
        f"""
        import glob, resource
        import numpy as np
        from tpt_jax.data import loader, rows
        paths = sorted(glob.glob({str(tmp_path)!r} + "/*.rows"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (50, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        readers = [rows.RowsReader(p, 1) for p in paths]
        for _ in range(2):
            got = [r.read(np.array([0]))["used"][0] for r in readers]
        task = loader.TaskRows({str(tmp_path)!r}, [{{"path": p, "rows": 1}} for p in paths])
        both = task.read(np.arange(len(paths)))
        print("read", len(got), len(both))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[:2000]
    assert result.stdout.split() == ["read", "150", "150"]
