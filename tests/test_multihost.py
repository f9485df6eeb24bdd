"""Multi-process and preemption: two local JAX processes (2 CPU devices each, gloo collectives)
train like one process with 4 devices, across a checkpoint and a restore; SIGTERM saves and
exits 0, and the resumed run continues exactly; `tpt think` over 2 processes covers a corpus
exactly once."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from tpt_jax.think.driver import committed_records, shard_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = """
base: {root}/configs/models/tiny.yaml
model: {{vocab_size: 256, hidden_size: 32, mlp_dim: 64}}
train: {{steps: {steps}, global_batch: 8, seq_len: 32}}
schedule: {{kind: constant, peak_lr: 1.0e-2, warmup_steps: 2}}
checkpoint: {{output_dir: {out}, run_name: run, save_every: {save_every}, async_save: false}}
logging: {{log_every: 1}}
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices):
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["PYTHONFAULTHANDLER"] = "1"  # a hung process killed with SIGABRT prints its stacks
    return env


def _outputs(procs, timeout=600):
    """Every process's output; when one hangs past `timeout`, all are aborted and the test fails
    with every process's stacks (faulthandler) instead of a bare TimeoutExpired."""
    deadline = time.time() + timeout
    try:
        return [p.communicate(timeout=max(1.0, deadline - time.time()))[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGABRT)
        tails = [(p.communicate(timeout=60)[0] or "")[-6000:] for p in procs]
        raise AssertionError(f"hung past {timeout}s:\n" + "\n=====\n".join(tails)) from None


def _config(tmp_path, name, steps, save_every=2):
    path = tmp_path / f"{name}.yaml"
    out = tmp_path / name
    path.write_text(TRAIN.format(root=ROOT, steps=steps, out=out, save_every=save_every))
    return str(path), out / "run"


def _tpt(*args, env, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "tpt_jax", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _two_processes(*args):
    port = _free_port()
    procs = [
        _tpt(*args, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(i), env=_env(2))
        for i in range(2)
    ]  # fmt: skip
    outputs = _outputs(procs)
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _logged_steps(run_dir):
    try:
        with open(run_dir / "metrics.jsonl") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def _losses(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_two_processes_train_like_one_with_a_checkpoint_and_restore(tmp_path):
    config, single = _config(tmp_path, "single", steps=6)
    proc = _tpt("train", config, env=_env(4))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]

    first, multi = _config(tmp_path, "multi", steps=4)
    outputs = _two_processes("train", first)
    assert "mesh {'data': 4" in outputs[0]
    assert sorted(os.listdir(multi / "checkpoints")) == ["2", "4"]
    second, _ = _config(tmp_path, "multi", steps=6)  # same run: resumes from step 4
    outputs = _two_processes("train", second)
    assert "resumed from step 4" in outputs[0]
    expected, got = _losses(single), _losses(multi)
    assert sorted(got) == list(range(1, 7))
    for step in range(1, 7):
        assert abs(got[step] - expected[step]) < 1e-5, (step, got[step], expected[step])


def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path):
    config, reference = _config(tmp_path, "reference", steps=4000, save_every=1000)
    proc = _tpt("train", config, env=_env(1))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]

    config, run = _config(tmp_path, "preempted", steps=4000, save_every=1000)
    proc = _tpt("train", config, env=_env(1))
    deadline = time.time() + 300
    while time.time() < deadline and _logged_steps(run) < 50:  # well into the run
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "preempted (SIGTERM)" in out
    saved = [int(s) for s in os.listdir(run / "checkpoints")]
    assert len(saved) == 1 and 0 < saved[0] < 4000, saved  # saved where it stopped, mid-run
    proc = _tpt("train", config, env=_env(1))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    assert f"resumed from step {saved[0]}" in out
    expected, got = _losses(reference), _losses(run)
    assert sorted(got) == list(range(1, 4001))
    assert all(got[s] == expected[s] for s in expected), "the resumed run differs"


def test_think_over_two_processes_covers_the_corpus_once(tmp_path):
    config = os.path.join(ROOT, "configs", "experiments", "local", "think_qwen3-8b.yaml")
    out = tmp_path / "think"
    outputs = _two_processes("think", config, f"think.output_dir={out}")
    # Each process takes the documents whose id hashes to it: about half each, 32 in all.
    counts = [int(re.search(r"think: (\d+) documents", o).group(1)) for o in outputs]
    assert sum(counts) == 32 and min(counts) > 0, outputs
    ids = [r["id"] for i in range(2) for r in committed_records(shard_folder(str(out), i, 2))]
    with open(os.path.join(ROOT, "configs", "experiments", "local", "testbed_sample.jsonl")) as f:
        expected = [json.loads(line)["id"] for line in f]
    assert len(ids) == len(set(ids)) == 32 and set(ids) == set(expected)


def test_sigterm_during_think_commits_and_the_rerun_completes(tmp_path):
    from think_fixtures import make_generator

    make_generator(str(tmp_path / "gen"))
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(60):
            f.write(
                json.dumps({"id": f"d{i}", "text": "three apples cost six dollars " * (i % 5 + 1)})
                + "\n"
            )
    config = tmp_path / "think.yaml"
    config.write_text(
        f"""
think:
  model_dir: {tmp_path}/gen
  output_dir: {tmp_path}/out
  corpus: {{name: docs, paths: ["{tmp_path}/docs.jsonl"]}}
  max_document_tokens: 64
  max_new_tokens: 48
  temperature: 0.0
  chunk_size: 7
  max_concurrent_decodes: 4
"""
    )
    folder = shard_folder(str(tmp_path / "out"), 0, 1)
    proc = _tpt("think", str(config), env=_env(1))
    deadline = time.time() + 300
    while time.time() < deadline and not (
        os.path.isdir(folder) and any(n.endswith(".jsonl") for n in os.listdir(folder))
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "SIGTERM" in out
    partial = committed_records(folder)
    assert 7 <= len(partial) < 60, len(partial)
    proc = _tpt("think", str(config), env=_env(1))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    ids = [r["id"] for r in committed_records(folder)]
    assert len(ids) == len(set(ids)) == 60


def test_two_processes_agree_to_pass_over_a_damaged_checkpoint(tmp_path):
    """Both processes find the newest step unreadable, set it aside together and resume from the
    previous one: the run's losses equal a single process's uninterrupted run."""
    config, single = _config(tmp_path, "single", steps=6)
    proc = _tpt("train", config, env=_env(4))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]

    first, multi = _config(tmp_path, "multi", steps=4)
    _two_processes("train", first)
    folder = multi / "checkpoints"
    for root, _, names in os.walk(folder / "4" / "state"):
        for name in names:  # a failed upload: step 4's array chunks are empty
            if f"{os.sep}d{os.sep}" in os.path.join(root, name) + os.sep:
                open(os.path.join(root, name), "w").close()
    second, _ = _config(tmp_path, "multi", steps=6)
    outputs = _two_processes("train", second)
    out = outputs[0]  # process 0 logs for the run; both exited 0 (_two_processes)
    assert "skipped checkpoint step 4" in out and "resumed from step 2" in out, out[-3000:]
    assert sorted(n for n in os.listdir(folder) if n.isdigit()) == ["2", "4", "6"]
    assert len([n for n in os.listdir(folder) if n.startswith("4.unreadable-")]) == 1
    expected, got = _losses(single), _losses(multi)
    for step in range(1, 7):
        assert abs(got[step] - expected[step]) < 1e-5, (step, got[step], expected[step])


def test_two_processes_evaluate_the_held_out_rows_like_one(tmp_path):
    """Each process feeds its slice of every held-out batch (padding included): the per-task
    held-out losses of a two-process run equal those of one process over the same devices."""
    twins = os.path.join(ROOT, "configs", "experiments", "local")
    train = os.path.join(twins, "pretrain_8b_tpt.yaml")
    root = f"run.root={tmp_path}"
    # Short rows and a large held-out share: several global batches of held-out rows, the last
    # one padded, so a process reading another's slice would change the mean.
    data = ["data.heldout_fraction=0.6", "train.seq_len=32", "train.eval_batches=3"]
    for args in (
        ["think", os.path.join(twins, "think_qwen3-8b.yaml"), root],
        ["think", os.path.join(twins, "think_qwen3-8b_fineweb_edu.yaml"), root],
        ["vocab", "train", train, root],
        ["prepare", train, root, *data],
        ["train", train, root, "run.name=single", *data],
    ):
        proc = _tpt(*args, env=_env(4))
        out = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, out[-3000:]
    outputs = _two_processes("train", train, root, "run.name=multi", *data)
    assert re.search(r"eval of task megamath_tpt: 2\d of its \d+ held-out rows", outputs[0])

    def held_out(name):
        with open(tmp_path / name / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f]
        return {
            (r["step"], key): value
            for r in records
            for key, value in r.items()
            if key.startswith("eval/")
        }

    single, multi = held_out("single"), held_out("multi")
    assert {key for _, key in single} == {
        "eval/loss", "eval/megamath_tpt/loss", "eval/fineweb_edu_tpt/loss",
    }  # fmt: skip
    assert sorted(multi) == sorted(single)
    for key, value in single.items():
        assert abs(multi[key] - value) < 1e-5, (key, multi[key], value)
