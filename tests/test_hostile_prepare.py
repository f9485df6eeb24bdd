"""`tpt prepare` reruns under hostile conditions: a vocabulary rewritten in place, inputs that
change or arrive truncated, reruns that must neither double the reject reports nor redo work,
and rows that must be on disk before their stats say the shard is done."""

import gzip
import json
import os

import numpy as np
import pytest
import sentencepiece as spm
import zstandard

from tpt_jax import cli
from tpt_jax.config import MixtureComponent
from tpt_jax.data import loader, rows, vocab
from tpt_jax.data.prepare import shard_name

SEQ = 32
WORDS = ["apples", "dollars", "train", "travels", "hour", "speed", "each", "cost", "number"]
MIXTURE = [MixtureComponent(task="toy_vanilla", rate=1.0)]


def _docs(seed: int, n: int = 12) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, int(rng.integers(2, 12)))) for _ in range(n)]


def _jsonl(texts: list[str], bad_lines: int = 0) -> bytes:
    lines = [json.dumps({"id": str(i), "text": t}) for i, t in enumerate(texts)]
    return ("\n".join(lines + ["{not json"] * bad_lines) + "\n").encode()


def _train_vocab(path, size: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return vocab.train((" ".join(rng.choice(WORDS, 15)) for _ in range(200)), str(path), size)


def _setup(root, pattern="c[0-9]*"):
    """A config over `root/<pattern>` (vanilla task only: fast) and a vocabulary; returns its path."""
    _train_vocab(root / "spm.model", 280, 0)
    (root / "cfg.yaml").write_text(
        f"""
train: {{seq_len: {SEQ}, global_batch: 8}}
data:
  vocab_path: {root}/spm.model
  prepared_dir: {root}/prepared
  corpora: [{{name: toy, paths: ["{root}/{pattern}"]}}]
  mixture: [{{task: toy_vanilla, rate: 1.0}}]
"""
    )
    return str(root / "cfg.yaml")


def _prepare(config, capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = cli.main(["prepare", config])
    return code, capsys.readouterr().err


def _decoded_documents(root) -> list[str]:
    """Every document in the prepared rows, decoded with the vocabulary at data.vocab_path."""
    manifest = json.loads((root / "prepared" / "manifest.json").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    texts = []
    for f in manifest["tasks"]["toy_vanilla"]["files"]:
        reader = rows.RowsReader(str(root / "prepared" / f["path"]), f["rows"])
        fields = rows.decode(reader.read(np.arange(len(reader))))
        tokens = fields["targets"][fields["segment_ids"] > 0].tolist()
        while tokens:  # one document per EOS-terminated run of tokens
            end = tokens.index(vocab.EOS_ID)
            texts.append(sp.decode(tokens[:end]))
            tokens = tokens[end + 1 :]
    return texts


def _shard(root, input_name: str) -> str:
    """The file name of the vanilla task's shard of one input file."""
    return os.path.basename(shard_name("toy_vanilla", str(root / input_name)))


def _mtimes(root) -> dict[str, int]:
    folder = root / "prepared" / "toy_vanilla"
    return {p.name: p.stat().st_mtime_ns for p in sorted(folder.iterdir())}


def _prepared_from_two_files(root, capsys) -> tuple[str, list[list[str]]]:
    """A config over c0.jsonl and c1.jsonl, prepared once; (config path, each file's texts)."""
    config = _setup(root)
    docs = [_docs(0), _docs(1)]
    for i, texts in enumerate(docs):
        (root / f"c{i}.jsonl").write_bytes(_jsonl(texts))
    assert _prepare(config, capsys)[0] == 0
    return config, docs


def test_vocab_rewritten_in_place_rebuilds_the_shards(tmp_path, capsys):
    config, docs = _prepared_from_two_files(tmp_path, capsys)
    old = vocab.checksum((tmp_path / "spm.model").read_bytes())

    new = _train_vocab(tmp_path / "spm.model", 300, 1)  # `tpt vocab train` to the same path
    assert new != old
    code, err = _prepare(config, capsys)
    assert code == 0, err
    assert _decoded_documents(tmp_path) == docs[0] + docs[1]
    manifest = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert manifest["vocab_checksum"] == new
    for stats in (tmp_path / "prepared" / "toy_vanilla").glob("*.json"):
        assert json.loads(stats.read_text())["vocab_checksum"] == new
    # The loader accepts the rebuilt data with the new vocabulary...
    loader.MixedRows(str(tmp_path / "prepared"), MIXTURE, 0, SEQ, new)


def test_changed_input_rebuilds_only_its_shard(tmp_path, capsys):
    config, docs = _prepared_from_two_files(tmp_path, capsys)
    first = _mtimes(tmp_path)
    manifest = (tmp_path / "prepared" / "manifest.json").read_text()

    assert _prepare(config, capsys)[0] == 0  # nothing changed: nothing rebuilt
    assert _mtimes(tmp_path) == first
    assert (tmp_path / "prepared" / "manifest.json").read_text() == manifest

    docs[1] = docs[1] + ["each train travels one hour"]
    (tmp_path / "c1.jsonl").write_bytes(_jsonl(docs[1]))
    code, err = _prepare(config, capsys)
    assert code == 0, err
    after = _mtimes(tmp_path)
    kept = (_shard(tmp_path, "c0.jsonl"), _shard(tmp_path, "c0.jsonl") + ".json")
    rebuilt = (_shard(tmp_path, "c1.jsonl"), _shard(tmp_path, "c1.jsonl") + ".json")
    assert all(after[name] == first[name] for name in kept)
    assert all(after[name] != first[name] for name in rebuilt)
    assert _decoded_documents(tmp_path) == docs[0] + docs[1]


def test_a_second_folder_of_files_adds_only_its_shards(tmp_path, capsys):
    """Shards are named by their input, not its position: a new folder (with a file of the same
    name) builds only its own shard, and a removed file leaves the manifest with it."""
    config = _setup(tmp_path, pattern="*/c0.jsonl")
    old, new = _docs(0), _docs(1)
    os.makedirs(tmp_path / "2024-01")
    (tmp_path / "2024-01" / "c0.jsonl").write_bytes(_jsonl(old))
    assert _prepare(config, capsys)[0] == 0
    first = _mtimes(tmp_path)
    os.makedirs(tmp_path / "2024-02")
    (tmp_path / "2024-02" / "c0.jsonl").write_bytes(_jsonl(new))
    code, err = _prepare(config, capsys)
    assert code == 0, err
    after = _mtimes(tmp_path)
    assert all(after[name] == stamp for name, stamp in first.items())  # nothing rebuilt
    assert len(after) == 2 * len(first)
    assert sorted(_decoded_documents(tmp_path)) == sorted(old + new)
    os.remove(tmp_path / "2024-01" / "c0.jsonl")
    assert _prepare(config, capsys)[0] == 0
    assert sorted(_decoded_documents(tmp_path)) == sorted(new)
    # Another path in the config: its files are added; the data prepared so far is kept.
    extra = ["the train travels each hour"] * 3
    os.makedirs(tmp_path / "extra")
    (tmp_path / "extra" / "e.jsonl").write_bytes(_jsonl(extra))
    text = (tmp_path / "cfg.yaml").read_text()
    (tmp_path / "cfg.yaml").write_text(
        text.replace('*/c0.jsonl"]', f'*/c0.jsonl", "{tmp_path}/extra/e.jsonl"]')
    )
    kept = {
        n: t
        for n, t in _mtimes(tmp_path).items()
        if n.startswith(_shard(tmp_path, "2024-02/c0.jsonl"))
    }
    code, err = _prepare(config, capsys)
    assert code == 0, err
    assert all(_mtimes(tmp_path)[n] == t for n, t in kept.items()) and len(kept) == 2
    assert sorted(_decoded_documents(tmp_path)) == sorted(new + extra)


def _truncated(suffix: str, data: bytes, scratch) -> tuple[bytes, bytes]:
    """(whole, truncated) bytes of the JSONL `data` in the format of `suffix`."""
    if suffix == "jsonl.gz":
        whole = gzip.compress(data)
    elif suffix == "jsonl.zst":
        whole = zstandard.ZstdCompressor().compress(data)
    else:
        from array_record.python import array_record_module

        writer = array_record_module.ArrayRecordWriter(str(scratch), "group_size:1")
        for line in data.splitlines():
            writer.write(line)
        writer.close()
        whole = scratch.read_bytes()
    return whole, whole[: len(whole) * 2 // 3]


@pytest.mark.parametrize("suffix", ["jsonl.gz", "jsonl.zst", "array_record"])
def test_truncated_input_is_never_done_and_is_built_once_fixed(tmp_path, capsys, suffix):
    config = _setup(tmp_path)
    docs = [_docs(0), _docs(1, n=400)]  # enough text that the cut lands inside the stream
    (tmp_path / "c0.jsonl").write_bytes(_jsonl(docs[0]))
    whole, cut = _truncated(suffix, _jsonl(docs[1]), tmp_path / "scratch")
    bad = tmp_path / f"c1.{suffix}"
    bad.write_bytes(cut)

    code, err = _prepare(config, capsys)
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("tpt: error:")]
    assert len(errors) == 1 and str(bad) in errors[0], err
    assert "Traceback" not in err
    shards = tmp_path / "prepared" / "toy_vanilla"
    assert (shards / (_shard(tmp_path, "c0.jsonl") + ".json")).exists()  # the rest is done
    assert not (shards / (_shard(tmp_path, bad.name) + ".json")).exists()
    assert not (tmp_path / "prepared" / "manifest.json").exists()

    assert _prepare(config, capsys)[0] != 0  # still broken: still not done
    bad.write_bytes(whole)
    code, err = _prepare(config, capsys)
    assert code == 0, err
    assert _decoded_documents(tmp_path) == docs[0] + docs[1]


def test_rejects_are_rewritten_not_appended(tmp_path, capsys):
    config = _setup(tmp_path)
    texts = _docs(0)
    (tmp_path / "c0.jsonl").write_bytes(_jsonl(texts, bad_lines=2))
    assert _prepare(config, capsys)[0] == 0
    name = "toy_vanilla-" + _shard(tmp_path, "c0.jsonl").replace(".rows", ".tsv")
    report = tmp_path / "prepared" / "rejects" / name
    first = report.read_text()
    assert first.count("malformed JSON") == 2

    stats = tmp_path / "prepared" / "toy_vanilla" / (_shard(tmp_path, "c0.jsonl") + ".json")
    os.remove(stats)  # as if the run died before the stats were written: the shard is redone
    assert _prepare(config, capsys)[0] == 0
    assert report.read_text() == first

    (tmp_path / "c0.jsonl").write_bytes(_jsonl(texts))  # input fixed: no rejects left
    assert _prepare(config, capsys)[0] == 0
    assert not report.exists() or report.read_text() == ""


def test_rows_are_durable_before_the_stats_mark_the_shard_done(tmp_path, capsys, monkeypatch):
    config = _setup(tmp_path)
    for i in range(2):
        (tmp_path / f"c{i}.jsonl").write_bytes(_jsonl(_docs(i)))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        events.append(("replace", os.fspath(dst)))
        return real_replace(src, dst, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    code, err = _prepare(config, capsys)
    assert code == 0, err
    folder = str(tmp_path / "prepared" / "toy_vanilla")
    for i in range(2):
        shard = os.path.join(folder, _shard(tmp_path, f"c{i}.jsonl"))
        synced = events.index(("fsync", shard + ".tmp"))
        renamed = events.index(("replace", shard))
        folder_synced = events.index(("fsync", folder), renamed)
        done = events.index(("replace", shard + ".json"))
        assert synced < renamed < folder_synced < done


def test_train_refuses_data_prepared_with_another_vocab(tmp_path, capsys):
    config = _setup(tmp_path)
    (tmp_path / "c0.jsonl").write_bytes(_jsonl(_docs(0)))
    assert _prepare(config, capsys)[0] == 0
    prepared_with = vocab.checksum((tmp_path / "spm.model").read_bytes())
    other = _train_vocab(tmp_path / "other.model", 300, 1)
    capsys.readouterr()
    code = cli.main(
        [
            "train",
            config,
            "data.source=prepared",
            f"data.vocab_path={tmp_path}/other.model",
            "model.vocab_size=320",
            "train.steps=1",
            f"checkpoint.output_dir={tmp_path}/runs",
            "logging.tensorboard=false",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert prepared_with in err[0] and other in err[0] and str(tmp_path / "prepared") in err[0]


def test_train_refuses_a_folder_prepared_in_the_older_format(tmp_path, capsys):
    """A folder of ArrayRecord shards (no "format" in its manifest): one line, prepare again."""
    config = _setup(tmp_path)
    (tmp_path / "c0.jsonl").write_bytes(_jsonl(_docs(0)))
    assert _prepare(config, capsys)[0] == 0
    path = tmp_path / "prepared" / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["format"]
    path.write_text(json.dumps(manifest))
    capsys.readouterr()
    code = cli.main(
        ["train", config, "data.source=prepared", "model.vocab_size=320", "train.steps=1",
         f"checkpoint.output_dir={tmp_path}/runs", "logging.tensorboard=false"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(tmp_path / "prepared") in err[0] and "run `tpt prepare` again" in err[0]


def test_a_shard_of_another_rows_format_is_rebuilt(tmp_path, capsys):
    config, docs = _prepared_from_two_files(tmp_path, capsys)
    first = _mtimes(tmp_path)
    stats_path = tmp_path / "prepared" / "toy_vanilla" / (_shard(tmp_path, "c1.jsonl") + ".json")
    stats = json.loads(stats_path.read_text())
    stats["format"] = "tpt-rows-v0"  # as if written by another version of the format
    stats_path.write_text(json.dumps(stats))
    code, err = _prepare(config, capsys)
    assert code == 0, err
    after = _mtimes(tmp_path)
    assert after[_shard(tmp_path, "c0.jsonl")] == first[_shard(tmp_path, "c0.jsonl")]
    assert after[_shard(tmp_path, "c1.jsonl")] != first[_shard(tmp_path, "c1.jsonl")]
    assert json.loads(stats_path.read_text())["format"] == "tpt-rows-v1"
    assert _decoded_documents(tmp_path) == docs[0] + docs[1]


def test_shards_of_different_vocabularies_make_no_manifest(tmp_path):
    from tpt_jax.config import load_config
    from tpt_jax.data.prepare import PreparedDataError, write_manifest

    cfg = load_config(_setup(tmp_path))
    stats = [
        {"task": "toy_vanilla", "file": f"toy_vanilla/0000{i}-of-00002.rows", "rows": 1,
         "tokens": 3, "documents": 1, "thinking_tokens": 0, "rejected": {},
         "vocab_checksum": f"sha256:{i}"}
        for i in range(2)
    ]  # fmt: skip
    with pytest.raises(PreparedDataError, match=r"sha256:0.*sha256:1"):
        write_manifest(cfg, stats)
    assert not (tmp_path / "prepared" / "manifest.json").exists()


def test_a_folder_prepared_with_another_config_is_one_line(tmp_path, capsys):
    import subprocess
    import sys

    config = _setup(tmp_path)
    (tmp_path / "c0.jsonl").write_bytes(_jsonl(_docs(0)))
    assert _prepare(config, capsys)[0] == 0
    result = subprocess.run(
        [sys.executable, "-m", "tpt_jax", "prepare", config, "train.seq_len=64"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("tpt: error: ")
    assert "prepared with another config" in result.stderr


@pytest.mark.parametrize(
    ("override", "key"),
    [("data.long_docs=truncate", "data.long_docs"),
     ("data.heldout_fraction=0.5", "data.heldout_fraction"),
     ("data.tpt_template={text} {thinking}", "data.tpt_template")],
)  # fmt: skip
def test_train_refuses_a_folder_prepared_with_other_data_settings(tmp_path, capsys, override, key):
    """Rows packed, split or templated otherwise than the config says are not silently used:
    one line naming the folder and the settings that differ."""
    config = _setup(tmp_path)
    (tmp_path / "c0.jsonl").write_bytes(_jsonl(_docs(0)))
    assert _prepare(config, capsys)[0] == 0
    capsys.readouterr()
    code = cli.main(
        ["train", config, "data.source=prepared", override, "model.vocab_size=320",
         "train.steps=1", f"checkpoint.output_dir={tmp_path}/runs", "logging.tensorboard=false"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert str(tmp_path / "prepared") in err[0] and key in err[0], err[0]
    assert "data.prepared_dir" in err[0] and not (tmp_path / "runs").exists()


def test_prepare_refuses_a_folder_of_the_older_array_record_format(tmp_path, capsys):
    """A folder prepared before the rows format (ArrayRecord shards, `*.array_record.json`
    stats): one line, never a rebuild beside the old files."""
    config = _setup(tmp_path)
    (tmp_path / "c0.jsonl").write_bytes(_jsonl(_docs(0)))
    old = tmp_path / "prepared" / "toy_vanilla"
    old.mkdir(parents=True)
    (old / "c0-0123.array_record").write_bytes(b"old rows")
    (old / "c0-0123.array_record.json").write_text(json.dumps({"config_hash": "sha256:old"}))
    code, err = _prepare(config, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert str(tmp_path / "prepared") in lines[0]
    assert "prepared by an older tpt_jax (ArrayRecord rows)" in lines[0]
    assert "use a new data.prepared_dir or delete it" in lines[0]
    assert sorted(p.name for p in old.iterdir()) == ["c0-0123.array_record",
                                                     "c0-0123.array_record.json"]  # fmt: skip
