"""`tpt prepare` (Beam, SeqIO, packing, rows files) and the Grain loader on top of it."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tpt_jax.config import MixtureComponent, load_config
from tpt_jax.data import loader, rows, vocab
from tpt_jax.data.prepare import shard_name

WORDS = [
    "apples",
    "dollars",
    "train",
    "travels",
    "hour",
    "speed",
    "each",
    "cost",
    "number",
    "total",
]
SEQ = 64


def _write_corpus(root):
    rng = np.random.default_rng(0)
    for f in range(3):
        with open(root / f"c{f}.jsonl", "w") as fh:
            for i in range(120):
                record = {
                    "id": f"{f}-{i}",
                    "text": " ".join(rng.choice(WORDS, int(rng.integers(3, 60)))),
                }
                if i % 7:
                    record["thinking"] = " ".join(rng.choice(WORDS, int(rng.integers(3, 120))))
                fh.write(json.dumps(record) + "\n")
            fh.write("{not json\n")
    vocab.train(
        (" ".join(rng.choice(WORDS, 20)) for _ in range(300)),
        str(root / "spm.model"),
        vocab_size=300,
    )


def _config(root, prepared="prepared", seq_len=SEQ, extra=()):
    (root / "cfg.yaml").write_text(
        f"""
train: {{seq_len: {seq_len}, global_batch: 8}}
data:
  vocab_path: {root}/spm.model
  prepared_dir: {root}/{prepared}
  corpora: [{{name: toy, paths: ["{root}/c*.jsonl"]}}]
  mixture: [{{task: toy_tpt, rate: 1.0}}, {{task: toy_vanilla, rate: 0.5}}]
"""
    )
    return load_config(str(root / "cfg.yaml"), list(extra))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from tpt_jax.data.prepare import run_prepare

    root = tmp_path_factory.mktemp("prep")
    _write_corpus(root)
    cfg = _config(root)
    manifest = run_prepare(cfg)
    return root, cfg, manifest


def _stored_rows(root, manifest, task):
    """Every stored record of a task, file after file (rows.row_dtype)."""
    parts = []
    for f in manifest["tasks"][task]["files"]:
        reader = rows.RowsReader(str(root / "prepared" / f["path"]), f["rows"])
        parts.append(reader.read(np.arange(len(reader))))
    return np.concatenate(parts)


def test_manifest_counts_and_rejects(prepared):
    root, _, manifest = prepared
    tpt, vanilla = manifest["tasks"]["toy_tpt"], manifest["tasks"]["toy_vanilla"]
    assert vanilla["documents"] == 360 and vanilla["rejected"] == 3  # 3 malformed lines
    assert (
        tpt["documents"] == 360 - 3 * 18 and tpt["rejected"] == 3 + 3 * 18
    )  # + records without thinking
    assert 0.5 < tpt["thinking_token_share"] < 0.95 and vanilla["thinking_token_share"] == 0
    assert manifest["vocab_checksum"] == vocab.checksum((root / "spm.model").read_bytes())
    name = shard_name("toy_tpt", str(root / "c0.jsonl"))
    rejects = (
        (root / "prepared" / "rejects" / name.replace("/", "-").replace(".rows", ".tsv"))
        .read_text()
        .splitlines()
    )
    assert any("no thinking" in line for line in rejects) and any(
        "malformed JSON" in line for line in rejects
    )


def test_rows_hold_exactly_the_task_tokens(prepared):
    import seqio

    root, _, manifest = prepared
    for task_name in ("toy_tpt", "toy_vanilla"):
        expected = [
            ex["targets"]
            for ex in seqio.get_mixture_or_task(task_name)
            .get_dataset(sequence_length=None, shuffle=False)
            .as_numpy_iterator()
        ]
        fields = rows.decode(_stored_rows(root, manifest, task_name))
        got = fields["targets"][fields["segment_ids"] > 0]
        np.testing.assert_array_equal(got, np.concatenate(expected))
        assert manifest["tasks"][task_name]["tokens"] == len(got)


def test_rerun_skips_and_redoes_only_missing_shards(prepared):
    from tpt_jax.data.prepare import run_prepare

    root, cfg, manifest = prepared
    shard = root / "prepared" / shard_name("toy_tpt", str(root / "c1.jsonl"))
    other = root / "prepared" / shard_name("toy_tpt", str(root / "c0.jsonl"))
    before = shard.read_bytes()
    stamp = os.path.getmtime(other)
    os.remove(str(shard) + ".json")  # as if the run died after writing rows but before its stats
    assert run_prepare(cfg) == manifest
    assert shard.read_bytes() == before
    assert os.path.getmtime(other) == stamp


def test_other_config_is_refused(prepared):
    from tpt_jax.data.prepare import PreparedDataError, run_prepare

    root, _, _ = prepared
    other = _config(root, seq_len=32)
    with pytest.raises(PreparedDataError, match="prepared with another config"):
        run_prepare(other)
    _config(root)  # restore cfg.yaml for later tests


def _mixed(root, seed=0, mixture=None):
    mixture = mixture or [
        MixtureComponent(task="toy_tpt", rate=1.0),
        MixtureComponent(task="toy_vanilla", rate=0.5),
    ]
    return loader.MixedRows(str(root / "prepared"), mixture, seed, SEQ)


def _global_batch(data, step, batch, processes):
    parts = [next(loader.batches(data, step, batch, p, processes)) for p in range(processes)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_same_seed_same_batches_other_seed_other_batches(prepared):
    root, _, _ = prepared
    a, b, c = _mixed(root, 0), _mixed(root, 0), _mixed(root, 1)
    for step in (0, 5, 123):
        x, y, z = (_global_batch(d, step, 8, 1) for d in (a, b, c))
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
        assert not np.array_equal(x["targets"], z["targets"])


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_one_epoch_covers_every_row_exactly_once(prepared, processes):
    root, _, manifest = prepared
    data = _mixed(root, mixture=[MixtureComponent(task="toy_vanilla", rate=1.0)])
    stored = sorted(r.tobytes() for r in _stored_rows(root, manifest, "toy_vanilla"))
    batch = 8
    seen = []
    for step in range(-(-len(stored) // batch)):
        for p in range(processes):
            for g, row in zip(
                loader.process_rows(step, batch, p, processes),
                data.rows(loader.process_rows(step, batch, p, processes)),
                strict=True,
            ):
                if g < len(stored):
                    seen.append(row.tobytes())
    assert sorted(seen) == stored
    assert data.epochs_seen(len(stored)) == {"toy_vanilla": 1.0}


def test_resume_on_another_process_count_gives_the_same_global_batches(prepared):
    root, _, _ = prepared
    data = _mixed(root)
    k = 7
    for processes in (1, 4):
        resumed = _mixed(root)
        for step in (k, k + 1, k + 5):
            x, y = _global_batch(data, step, 8, 2), _global_batch(resumed, step, 8, processes)
            for key in x:
                np.testing.assert_array_equal(x[key], y[key])


def test_mixture_rates_within_two_percent(prepared):
    root, _, manifest = prepared
    owner = {
        r.tobytes(): t for t in ("toy_tpt", "toy_vanilla") for r in _stored_rows(root, manifest, t)
    }
    mixed = _mixed(root).rows(np.arange(10_000))
    share = np.mean([owner[r.tobytes()] == "toy_tpt" for r in mixed])
    assert abs(share - 2 / 3) <= 0.02 * 2 / 3


def _take(stream, count):
    return [next(stream) for _ in range(count)]


@pytest.mark.parametrize("processes", [1, 2])
def test_prefetched_batches_equal_unprefetched_ones_and_resume_is_exact(prepared, processes):
    root, _, _ = prepared
    data = _mixed(root)
    for p in range(processes):
        plain = _take(loader.batches(data, 0, 8, p, processes, prefetch=0), 12)
        ahead = _take(loader.batches(data, 0, 8, p, processes, prefetch=4), 12)
        resumed = _take(loader.batches(_mixed(root), 5, 8, p, processes), 7)
        for a, b in zip(plain, ahead, strict=True):
            assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
        for a, b in zip(plain[5:], resumed, strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in a)
        assert plain[0]["inputs"].shape == (8 // processes, SEQ)
        assert {k: v.dtype.name for k, v in plain[0].items()} == {
            "inputs": "int32", "targets": "int32", "segment_ids": "int32", "positions": "int32",
            "loss_weights": "float32",
        }  # fmt: skip


def test_stored_bytes_per_token_under_2_2_for_a_16_bit_vocabulary(tmp_path):
    """Rows of 1024 tokens of a 300-piece vocabulary: uint16 tokens, a bitmask, a count. (Every
    document is longer than a row, so only the last row of a shard has padding.)"""
    from tpt_jax.data.prepare import run_prepare

    rng = np.random.default_rng(1)
    with open(tmp_path / "c0.jsonl", "w") as f:
        for i in range(40):  # long documents (split over rows): few padded rows
            text = " ".join(rng.choice(WORDS, int(rng.integers(1100, 3000))))
            f.write(json.dumps({"id": str(i), "text": text, "thinking": "each hour"}) + "\n")
    vocab.train(
        (" ".join(rng.choice(WORDS, 20)) for _ in range(300)), str(tmp_path / "spm.model"), 300
    )
    cfg = _config(tmp_path, seq_len=1024)
    manifest = run_prepare(cfg)
    stored = sum(p.stat().st_size for p in (tmp_path / "prepared").rglob("*.rows"))
    tokens = sum(t["tokens"] for t in manifest["tasks"].values())
    assert tokens > 100_000 and stored / tokens <= 2.2, stored / tokens
    assert (
        rows.RowsReader(str(next((tmp_path / "prepared").rglob("*.rows")))).meta["token_dtype"]
        == "uint16"
    )


def test_a_missing_shard_is_one_line_naming_it_even_from_a_prefetch_thread(prepared, tmp_path):
    import shutil

    root, _, manifest = prepared
    shutil.copytree(root / "prepared", tmp_path / "prepared")
    gone = manifest["tasks"]["toy_vanilla"]["files"][0]["path"]
    os.remove(tmp_path / "prepared" / gone)
    data = _mixed(tmp_path)  # shards are opened on first read
    with pytest.raises(rows.RowsFileError, match=re.escape(gone) + " not found"):
        _take(loader.batches(data, 0, 64, prefetch=4), 3)


def test_a_folder_in_the_older_format_is_refused(prepared, tmp_path):
    from tpt_jax.data.prepare import MANIFEST, PreparedDataError

    _, _, manifest = prepared
    old = {k: v for k, v in manifest.items() if k != "format"}  # ArrayRecord-era manifests
    (tmp_path / MANIFEST).write_text(json.dumps(old))
    with pytest.raises(
        PreparedDataError,
        match=r"prepared by an older tpt_jax \(format ArrayRecord.*run `tpt prepare` again",
    ):
        loader.MixedRows(str(tmp_path), [MixtureComponent(task="toy_tpt")], 0, SEQ)


def test_vocab_and_length_mismatch_refused(prepared):
    from tpt_jax.data.prepare import PreparedDataError

    root, _, _ = prepared
    mixture = [MixtureComponent(task="toy_tpt", rate=1.0)]
    with pytest.raises(
        PreparedDataError,
        match=r"prepared with vocabulary sha256:.* but data\.vocab_path is sha256:0000",
    ):
        loader.MixedRows(str(root / "prepared"), mixture, 0, SEQ, "sha256:0000")
    with pytest.raises(PreparedDataError, match=r"rows of 64 tokens but train\.seq_len is 128"):
        loader.MixedRows(str(root / "prepared"), mixture, 0, 128)


def test_train_on_prepared_data(prepared, tmp_path):
    root, _, _ = prepared
    args = [
        sys.executable,
        "-m",
        "tpt_jax",
        "train",
        str(root / "cfg.yaml"),
        "data.source=prepared",
    ]
    args += [
        "model.vocab_size=320",
        "train.steps=4",
        "schedule.warmup_steps=1",
        "logging.log_every=2",
    ]
    args += [
        f"checkpoint.output_dir={tmp_path}",
        "checkpoint.run_name=prep",
        "logging.tensorboard=false",
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr
    assert "epochs seen per task: epochs/toy_tpt" in result.stdout
    records = [
        json.loads(x) for x in (tmp_path / "prep" / "metrics.jsonl").read_text().splitlines()
    ]
    assert records[-1]["step"] == 4 and records[-1]["epochs/toy_tpt"] > 0
    small = [a if a != "model.vocab_size=320" else "model.vocab_size=100" for a in args]
    result = subprocess.run(small, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "'model.vocab_size': 100 is smaller than the" in result.stderr
    bad = subprocess.run(
        [*args, "data.vocab_path=" + str(tmp_path / "none.model")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "none.model" in bad.stderr


def test_strict_prepare_stops_naming_file_and_line(tmp_path):
    root = tmp_path
    _write_corpus(root)
    args = [sys.executable, "-m", "tpt_jax", "prepare", str(root / "cfg.yaml")]
    _config(root, prepared="strict")
    result = subprocess.run(
        [*args, "data.strict=true"], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert re.search(r"c\d\.jsonl:(1: no thinking|121: malformed JSON)", last), last
    assert "Traceback" not in result.stderr
    lenient = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert lenient.returncode == 0, lenient.stderr
    assert "toy_tpt: 306 documents" in lenient.stdout and "57 rejected" in lenient.stdout


def test_missing_input_path_is_reported(prepared, tmp_path):
    from tpt_jax.data.prepare import run_prepare
    from tpt_jax.data.rejects import BadInputError

    root, _, _ = prepared
    nowhere = str(tmp_path / "nowhere" / "*.jsonl")
    cfg = _config(root, prepared="with_missing")
    corpus = {"name": "toy", "paths": [f"{root}/c0.jsonl", nowhere]}
    cfg = load_config(str(root / "cfg.yaml"), [f"data.corpora=[{json.dumps(corpus)}]"])
    manifest = run_prepare(cfg)
    assert manifest["missing_inputs"] == [nowhere]
    assert manifest["tasks"]["toy_vanilla"]["documents"] == 120
    strict = load_config(
        str(root / "cfg.yaml"), [f"data.corpora=[{json.dumps(corpus)}]", "data.strict=true"]
    )
    with pytest.raises(BadInputError, match=r"nowhere.*missing file"):
        run_prepare(strict)
    _config(root)


def test_a_failing_train_loop_does_not_wait_for_the_queued_reads(prepared, tmp_path):
    """An exception in the loop stops the prefetch: the process exits after at most the read in
    flight, not after the PREFETCH_STEPS reads queued behind it (here 1.5 s each, one thread)."""
    import textwrap
    import time

    root, _, _ = prepared
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    (tmp_path / "cfg.yaml").write_text(
        f"base: {repo}/configs/models/tiny.yaml\nmodel: {{vocab_size: 320}}\n"
        f"train: {{seq_len: {SEQ}, global_batch: 8, steps: 20}}\n"
    )
    script = textwrap.dedent(
        f"""
        import time
        from tpt_jax.config import MixtureComponent, load_config
        from tpt_jax.data import loader
        from tpt_jax.train import train

        cfg = load_config({str(tmp_path / "cfg.yaml")!r}, ["logging.log_every=1",
            "logging.tensorboard=false", "checkpoint.output_dir={tmp_path}"])
        data = loader.MixedRows({str(root / "prepared")!r}, [MixtureComponent(task="toy_tpt")],
            0, {SEQ})
        loader.PREFETCH_THREADS = 1
        fast = data.rows

        def slow(global_rows):
            if global_rows[0] >= 8:  # every step after the first
                time.sleep(1.5)
            return fast(global_rows)

        def fail(step):
            print("raised", time.time(), flush=True)
            raise RuntimeError("a bug in the loop")

        data.rows = slow
        train(cfg, "{tmp_path}/run", lambda start: loader.batches(data, start, 8),
              extra_metrics=fail)
        """
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env
    )
    ended = time.time()
    assert result.returncode == 1 and "a bug in the loop" in result.stderr, result.stderr[-2000:]
    raised = float(result.stdout.split("raised ")[1].split()[0])
    assert ended - raised < 5.0, ended - raised  # 8 queued reads take 12 s
