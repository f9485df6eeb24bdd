"""Corpus readers: every format gives the same documents; bad input is counted and skipped with a
reject report, or stops the run (strict) naming file and line."""

import gzip
import hashlib
import json

import pytest
import zstandard

from tpt_jax.config import CorpusConfig
from tpt_jax.data.readers import read_corpus
from tpt_jax.data.rejects import BadInputError, RejectLog

GOOD = [
    {"id": "a", "text": "First document.", "thinking": "Why first?", "domain": "math"},
    {"id": 7, "text": "Second document.", "domain": "physics"},
    {"text": "Third, no id.", "thinking": "  "},
]


def _jsonl_bytes(records):
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def _corpus(*paths):
    return CorpusConfig(name="c", paths=[str(p) for p in paths], meta_fields=["domain"])


def _write_all_formats(tmp_path):
    (tmp_path / "plain.jsonl").write_bytes(_jsonl_bytes(GOOD))
    (tmp_path / "zipped.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes(GOOD)))
    (tmp_path / "packed.jsonl.zst").write_bytes(
        zstandard.ZstdCompressor().compress(_jsonl_bytes(GOOD))
    )
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [
        {
            "id": str(r.get("id", "")) or None,
            "text": r["text"],
            "thinking": r.get("thinking"),
            "domain": r.get("domain"),
        }
        for r in GOOD
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "table.parquet")
    from array_record.python import array_record_module

    writer = array_record_module.ArrayRecordWriter(
        str(tmp_path / "records.array_record"), "group_size:1"
    )
    for r in GOOD:
        writer.write(json.dumps(r).encode())
    writer.close()


@pytest.mark.parametrize(
    "name",
    ["plain.jsonl", "zipped.jsonl.gz", "packed.jsonl.zst", "table.parquet", "records.array_record"],
)
def test_every_format_reads_the_same_documents(tmp_path, name):
    _write_all_formats(tmp_path)
    rejects = RejectLog()
    docs = list(read_corpus(_corpus(tmp_path / name), rejects))
    assert rejects.total == 0
    assert [d.text for d in docs] == [r["text"] for r in GOOD]
    assert [d.thinking for d in docs] == ["Why first?", None, None]  # whitespace thinking = none
    assert docs[0].meta == {"domain": "math"} and docs[0].id == "a" and docs[0].line == 1
    if not name.endswith("parquet"):
        assert docs[1].id == "7"
        # A record without an id is named by its content: the same in every format and folder.
        assert docs[2].id == f"c:{hashlib.sha256(docs[2].text.encode()).hexdigest()[:20]}"


def test_glob_and_file_list(tmp_path):
    _write_all_formats(tmp_path)
    rejects = RejectLog()
    docs = list(read_corpus(_corpus(tmp_path / "*.jsonl*"), rejects))
    assert len(docs) == 9 and rejects.total == 0


BAD_LINES = [
    (b'{"text": "ok one"}', None),
    (b'{"text": "broken', "malformed JSON"),
    (b'{"text": 42}', "wrong field type"),
    (b'{"text": "   \\n "}', "empty document"),
    (b'{"text": "caf\xe9"}', "non-UTF-8 bytes"),
    (b'{"body": "no text field"}', "missing field"),
    (b'["a", "list"]', "not a JSON object"),
    (b'{"text": "thinking of the wrong type", "thinking": ["x"]}', "wrong field type"),
    (b'{"text": "ok two"}', None),
]


def test_bad_records_are_counted_skipped_and_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n")
    report = tmp_path / "rejects.tsv"
    rejects = RejectLog(path=str(report))
    docs = list(read_corpus(_corpus(path, tmp_path / "missing.jsonl"), rejects))
    rejects.close()
    assert [d.text for d in docs] == ["ok one", "ok two"]
    lines = report.read_text().splitlines()
    expected = [(i + 1, reason) for i, (_, reason) in enumerate(BAD_LINES) if reason]
    assert len(lines) == len(expected) + 1
    # Paths are expanded first, so the missing file is reported before any record.
    assert "missing.jsonl\tmissing file" in lines[0]
    for text, (number, reason) in zip(lines[1:], expected, strict=True):
        assert text.startswith(f"{path}:{number}\t{reason}")
    assert rejects.counts["wrong field type"] == 2 and rejects.total == 8
    assert "8 records skipped" in rejects.summary()


@pytest.mark.parametrize("index", [i for i, (_, reason) in enumerate(BAD_LINES) if reason])
def test_strict_mode_stops_at_the_first_bad_record(tmp_path, index):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(BAD_LINES[0][0] + b"\n" + BAD_LINES[index][0] + b"\n")
    with pytest.raises(BadInputError, match=f"{path}:2: {BAD_LINES[index][1]}"):
        list(read_corpus(_corpus(path), RejectLog(strict=True)))


def test_strict_missing_file(tmp_path):
    with pytest.raises(BadInputError, match=r"missing\.jsonl: missing file"):
        list(read_corpus(_corpus(tmp_path / "missing.jsonl"), RejectLog(strict=True)))


def test_truncated_gzip_keeps_what_was_read(tmp_path):
    data = gzip.compress(_jsonl_bytes(GOOD * 200))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    rejects = RejectLog()
    docs = list(read_corpus(_corpus(tmp_path / "cut.jsonl.gz"), rejects))
    assert 0 < len(docs) < 600
    assert rejects.counts["unreadable file"] == 1
