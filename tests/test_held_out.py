"""The held-out split: `prepare` keeps a share of each corpus's documents out of training (by a
hash of the document id), and `train.eval_every` reports the loss on it per task."""

import hashlib
import json
import os
import struct

import jax
import numpy as np
import pytest
import sentencepiece as spm

from tpt_jax.config import MixtureComponent, load_config
from tpt_jax.data import loader, vocab
from tpt_jax.data import rows as rows_file
from tpt_jax.errors import ConfigError

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
SEQ = 96
FRACTION = 0.25
FILES, DOCS_PER_FILE = 3, 60
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _signature(n: int) -> str:
    """Three words naming document n (0..999): a row segment's first words tell its document."""
    return " ".join(WORDS[int(d)] for d in f"{n:03d}")


def _write_corpus(root):
    """FILES files of DOCS_PER_FILE documents; every fifth has no thinking (not in the tpt task)."""
    rng = np.random.default_rng(0)
    docs = {}  # signature -> (id, has thinking)
    for f in range(FILES):
        with open(root / f"c{f}.jsonl", "w") as fh:
            for i in range(DOCS_PER_FILE):
                n = f * DOCS_PER_FILE + i
                record = {
                    "id": f"doc-{n}",
                    "text": _signature(n) + " " + " ".join(rng.choice(WORDS, rng.integers(2, 12))),
                }
                if i % 5:
                    record["thinking"] = " ".join(rng.choice(WORDS, int(rng.integers(2, 20))))
                docs[_signature(n)] = (record["id"], "thinking" in record)
                fh.write(json.dumps(record) + "\n")
    vocab.train((" ".join(rng.choice(WORDS, 20)) for _ in range(300)), str(root / "spm.model"), 300)
    return docs


def _config(root, prepared, paths, *overrides):
    (root / f"{prepared}.yaml").write_text(
        f"""
base: {REPO}/configs/models/tiny.yaml
model: {{vocab_size: 320}}
train: {{seq_len: {SEQ}, global_batch: 8}}
data:
  source: prepared
  heldout_fraction: {FRACTION}
  long_docs: truncate
  vocab_path: {root}/spm.model
  prepared_dir: {root}/{prepared}
  corpora: [{{name: toy, paths: {json.dumps([str(root / p) for p in paths])}}}]
  mixture: [{{task: toy_tpt, rate: 1.0}}, {{task: toy_vanilla, rate: 0.5}}]
"""
    )
    return load_config(str(root / f"{prepared}.yaml"), list(overrides))


def _expected_heldout(doc_id: str) -> bool:
    # Written out here rather than imported: the rule the issue fixes, checked independently.
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64 < FRACTION


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from tpt_jax.data.prepare import run_prepare

    root = tmp_path_factory.mktemp("held_out")
    docs = _write_corpus(root)
    cfg = _config(root, "prepared", ["c0.jsonl", "c1.jsonl", "c2.jsonl"])
    return root, docs, cfg, run_prepare(cfg)


def _all_rows(cfg, task: str, split: str, count: int) -> np.ndarray:
    """Every row of a task's split, once each, read through the loader (stored records)."""
    data = loader.MixedRows(
        cfg.data.prepared_dir, [MixtureComponent(task=task)], 0, SEQ, split=split
    )
    return data.rows(np.arange(count))


def _documents(rows: np.ndarray, sp) -> list[str]:
    """The signature of the document at the start of every segment of the rows."""
    fields = rows_file.decode(rows)
    found = []
    for targets, segments in zip(fields["targets"], fields["segment_ids"], strict=True):
        for s in range(1, segments.max() + 1):
            tokens = [int(t) for t in targets[segments == s] if t != sp.eos_id()]
            found.append(" ".join(sp.decode(tokens).split()[:3]))
    return found


def _splits(cfg, manifest, task, sp) -> tuple[list[str], list[str]]:
    entry = manifest["tasks"][task]
    train = _documents(_all_rows(cfg, task, "train", entry["rows"]), sp)
    held = _documents(_all_rows(cfg, task, "heldout", entry["heldout"]["rows"]), sp)
    return train, held


def test_held_out_documents_never_reach_training_rows_and_match_across_tasks(prepared):
    from tpt_jax.data.prepare import summarize

    root, docs, cfg, manifest = prepared
    sp = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    expected = {sig for sig, (doc_id, _) in docs.items() if _expected_heldout(doc_id)}
    assert 0.1 * len(docs) < len(expected) < 0.4 * len(docs)  # the test holds something out
    held_by_task = {}
    for task, members in (
        ("toy_vanilla", set(docs)),
        ("toy_tpt", {sig for sig, (_, thinking) in docs.items() if thinking}),
    ):
        train, held = _splits(cfg, manifest, task, sp)
        # Every document of the task exactly once, in exactly one of the two splits.
        assert len(train) == len(set(train)) and len(held) == len(set(held))
        assert not set(train) & set(held)
        assert set(train) | set(held) == members
        assert set(held) == expected & members
        held_by_task[task] = set(held)
        entry = manifest["tasks"][task]
        assert entry["documents"] == len(train)
        assert entry["heldout"]["documents"] == len(held)
        assert entry["heldout"]["rows"] == sum(f["rows"] for f in entry["heldout"]["files"])
        assert len(entry["heldout"]["files"]) == len(entry["files"]) == FILES
        assert all(f["path"].startswith(f"{task}/heldout/") for f in entry["heldout"]["files"])
        targets = rows_file.decode(_all_rows(cfg, task, "heldout", entry["heldout"]["rows"]))
        assert entry["heldout"]["tokens"] == int(targets["loss_weights"].sum())
    # One document is held out of the vanilla and the tpt task alike.
    assert held_by_task["toy_tpt"] == held_by_task["toy_vanilla"] & {
        sig for sig, (_, thinking) in docs.items() if thinking
    }
    text = summarize(manifest)
    for task in ("toy_tpt", "toy_vanilla"):
        h = manifest["tasks"][task]["heldout"]
        assert f"held out: {h['documents']:,} documents, {h['rows']:,} rows" in text


def test_held_out_split_is_the_same_on_a_rerun_with_files_in_another_order(prepared):
    from tpt_jax.data.prepare import run_prepare

    root, _, cfg, manifest = prepared
    other = _config(root, "reordered", ["c2.jsonl", "c0.jsonl", "c1.jsonl"])
    again = run_prepare(other)
    sp = spm.SentencePieceProcessor(model_file=str(root / "spm.model"))
    for task in ("toy_tpt", "toy_vanilla"):
        assert again["tasks"][task]["heldout"] == manifest["tasks"][task]["heldout"]
        assert _splits(other, again, task, sp)[1] == _splits(cfg, manifest, task, sp)[1]
    assert run_prepare(cfg) == manifest  # a rerun skips every finished item


def test_held_out_fraction_is_validated_and_in_the_config_hash(prepared, tmp_path):
    from tpt_jax.data.prepare import config_hash

    root, _, cfg, _ = prepared
    for bad in ("1", "-0.1", "nan"):
        with pytest.raises(ConfigError, match=r"^config key 'data.heldout_fraction': must be >= 0"):
            load_config(str(root / "prepared.yaml"), [f"data.heldout_fraction={bad}"])
    none = load_config(str(root / "prepared.yaml"), ["data.heldout_fraction=0"])
    other = load_config(str(root / "prepared.yaml"), ["data.heldout_fraction=0.5"])
    assert len({config_hash(cfg), config_hash(none), config_hash(other)}) == 3


def test_no_held_out_rows_is_said_once_not_an_error(prepared, capsys):
    from tpt_jax.train.run import heldout_sources

    _, _, cfg, manifest = prepared
    bare = {**manifest, "tasks": {k: {**v} for k, v in manifest["tasks"].items()}}
    del bare["tasks"]["toy_tpt"]["heldout"]
    sources = heldout_sources(cfg, bare, None)
    assert list(sources) == ["toy_vanilla"]
    assert "task toy_tpt has no held-out rows; evaluation skips it" in capsys.readouterr().out
    del bare["tasks"]["toy_vanilla"]["heldout"]
    assert heldout_sources(cfg, bare, None) == {}
    assert "no held-out loss" in capsys.readouterr().out


def _scalars(folder) -> dict[tuple[str, int], float]:
    """(tag, step) -> value of every scalar in a TensorBoard events folder."""
    from tensorboardX.proto import event_pb2

    found = {}
    for name in os.listdir(folder):
        data = (folder / name).read_bytes()
        offset = 0
        while offset < len(data):  # TFRecord framing: length, its crc, the event, its crc
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                found[value.tag, event.step] = value.simple_value
    return found


def _forward_loss(cfg, params, rows: np.ndarray) -> tuple[float, float]:
    """(sum of target-token losses, target tokens) of the rows: a plain forward and softmax."""
    from tpt_jax.model import Decoder

    batch = rows_file.decode(rows)
    logits = Decoder(cfg.model).apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    picked = np.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0]
    weights = batch["loss_weights"]
    return float(((logz - picked) * weights).sum()), float(weights.sum())


def test_held_out_loss_is_logged_per_task_and_equals_a_forward_on_the_held_out_rows(
    prepared, tmp_path, capsys
):
    from tpt_jax.train import restore_latest
    from tpt_jax.train.run import run_training

    root, _, _, manifest = prepared
    cfg = _config(
        root, "prepared", ["c0.jsonl", "c1.jsonl", "c2.jsonl"],
        "train.steps=3", "train.eval_every=2", "train.eval_batches=2", "logging.log_every=10",
        "schedule.warmup_steps=1", "checkpoint.save_every=10",
        f"checkpoint.output_dir={tmp_path}", "checkpoint.run_name=run",
    )  # fmt: skip
    result = run_training(cfg, quiet_config=True)
    out = capsys.readouterr().out
    run_dir = tmp_path / "run"
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").open())}
    keys = ("eval/toy_tpt/loss", "eval/toy_vanilla/loss", "eval/loss")
    assert [s for s, r in records.items() if "eval/loss" in r] == [2, 3]  # every 2, and the end
    scalars = _scalars(run_dir / "tensorboard")
    for step in (2, 3):
        for key in keys:
            assert scalars[key, step] == pytest.approx(records[step][key], rel=1e-6)
        # The console line of an evaluation step carries it, even off the log_every steps.
        assert f"step {step}: " in out and "eval/toy_tpt/loss=" in out
    held = manifest["tasks"]["toy_tpt"]["heldout"]
    assert held["rows"] < 2 * 8  # fewer than eval_batches x global_batch: each is read once
    assert (
        f"train: eval of task toy_tpt: {held['rows']} of its {held['rows']} held-out rows "
        f"({held['tokens']:,} tokens), each once" in out
    )

    # The same loss from the final checkpoint's parameters, outside the training code.
    state, _ = restore_latest(cfg, str(run_dir))
    params = jax.device_get(state.params)
    total, weight = 0.0, 0.0
    for task in ("toy_tpt", "toy_vanilla"):
        # The evaluation scores the first 2 batches of the task's held-out stream, each row at
        # most once: all of them when there are fewer (the last batch padded with weight 0).
        count = min(2 * 8, manifest["tasks"][task]["heldout"]["rows"])
        rows = _all_rows(cfg, task, "heldout", count)
        task_total, task_weight = _forward_loss(cfg, params, rows)
        assert records[3][f"eval/{task}/loss"] == pytest.approx(task_total / task_weight, abs=1e-5)
        total, weight = total + task_total, weight + task_weight
    assert records[3]["eval/loss"] == pytest.approx(total / weight, abs=1e-5)
    assert result.eval_loss == records[3]["eval/loss"]
    assert records[3]["eval/loss"] != records[2]["eval/loss"]  # trained in between


@pytest.mark.parametrize(("batches", "processes"), [(2, 1), (2, 2), (100, 2), (1, 4)])
def test_each_held_out_row_is_evaluated_at_most_once(prepared, batches, processes):
    """The processes' eval batches together hold rows 0.. of the held-out stream once each (up
    to eval_batches x global_batch rows), every other row with loss weight 0, and no batch
    of padding only."""
    from tpt_jax.train.run import _heldout_batches

    _, _, cfg, manifest = prepared
    held = manifest["tasks"]["toy_vanilla"]["heldout"]["rows"]
    data = loader.MixedRows(
        cfg.data.prepared_dir, [MixtureComponent(task="toy_vanilla")], 0, SEQ, split="heldout"
    )
    per_process = [list(_heldout_batches(data, 8, batches, p, processes)) for p in range(processes)]
    steps = min(batches, -(-held // 8))
    assert [len(b) for b in per_process] == [steps] * processes
    weighted, padding = [], 0
    for step in range(steps):
        for p in range(processes):
            batch = per_process[p][step]
            assert batch["inputs"].shape == (8 // processes, SEQ)
            for r in range(8 // processes):
                if batch["loss_weights"][r].any():
                    weighted.append(tuple(batch["targets"][r]))
                else:
                    padding += 1
    used = min(held, 8 * batches)
    expected = rows_file.decode(_all_rows(cfg, "toy_vanilla", "heldout", used))["targets"]
    assert sorted(weighted) == sorted(tuple(t) for t in expected)
    assert padding == 8 * steps - used < 8
