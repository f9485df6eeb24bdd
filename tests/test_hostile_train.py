"""Run integrity of `tpt train` under hostile conditions: non-finite steps, damaged checkpoints,
changed settings on resume, and a second SIGTERM during the final save."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_train_loop import BASE as LOOP_BASE
from test_train_loop import CONFIG

from tpt_jax.config import load_config
from tpt_jax.errors import ConfigError
from tpt_jax.train import RunCheckpoints, TrainingDivergedError, restore_latest, train
from tpt_jax.train.run import synthetic_sources

BASE = [*LOOP_BASE, "logging.tensorboard=false"]
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}


def _args(tmp_path, run_name, *overrides):
    """BASE with `overrides` replacing its keys (the loader refuses a key given twice)."""
    keys = {o.partition("=")[0] for o in overrides}
    base = [o for o in BASE if o.partition("=")[0] not in keys]
    return [
        *base,
        f"checkpoint.output_dir={tmp_path}",
        f"checkpoint.run_name={run_name}",
        *overrides,
    ]


def _tpt_train(tmp_path, run_name, *overrides):
    args = [
        sys.executable,
        "-m",
        "tpt_jax",
        "train",
        CONFIG,
        *_args(tmp_path, run_name, *overrides),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)


def _error_line(result) -> str:
    """The one user-facing line of a failed `tpt` run (and no traceback)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # The progress bar's carriage returns can share the line: keep what follows the prefix.
    lines = [line for line in result.stderr.splitlines() if "tpt: error:" in line]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0][lines[0].index("tpt: error:") :]


def _saved_steps(run_dir) -> list[int]:
    folder = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(folder):
        return []
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def _all_finite(state) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(state.params))


# --- non-finite steps -----------------------------------------------------------------------


def test_config_refuses_non_finite_numbers():
    for override, key in [
        ("schedule.peak_lr=.inf", "schedule.peak_lr"),
        ("schedule.peak_lr=.nan", "schedule.peak_lr"),
        ("schedule.peak_lr=0", "schedule.peak_lr"),
        ("optimizer.grad_clip=.inf", "optimizer.grad_clip"),
        ("optimizer.eps=.nan", "optimizer.eps"),
        ("optimizer.weight_decay=.nan", "optimizer.weight_decay"),
    ]:
        with pytest.raises(ConfigError, match=rf"config key '{key}'"):
            load_config(CONFIG, _args("/tmp", "unused", override))


def test_huge_learning_rate_is_stopped_before_anything_is_saved(tmp_path):
    # 1e39 is a finite Python float but overflows float32: the first update is inf/nan while the
    # first loss (computed before the update) is finite.
    result = _tpt_train(
        tmp_path,
        "huge",
        "schedule.kind=constant",
        "schedule.peak_lr=1e39",
        "schedule.warmup_steps=0",
        "checkpoint.save_every=1",
        "train.steps=4",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    line = _error_line(result)
    assert "step 1" in line and "none was saved yet" in line, line
    assert _saved_steps(tmp_path / "huge") == []


def _poison_gradients(monkeypatch):
    """Makes the gradients infinite, not the loss, on batches whose loss_weights are 2.0.

    The loss is a weighted mean, so doubling every weight leaves it unchanged; the backward pass
    multiplies by inf (a broken loss scale), as a real overflow in the backward pass would.
    """
    import tpt_jax.train._step as step_module

    real = step_module.loss_sums

    @jax.custom_vjp
    def scaled(total, scale):
        return total

    def forward(total, scale):
        return total, scale

    def backward(scale, g):
        return g * scale, jnp.zeros_like(scale)

    scaled.defvjp(forward, backward)

    def poisoned(model, params, batch):
        total, weight = real(model, params, batch)
        scale = jnp.where(jnp.max(batch["loss_weights"]) > 1.5, jnp.inf, 1.0)
        return scaled(total, scale), weight

    monkeypatch.setattr(step_module, "loss_sums", poisoned)


def test_non_finite_gradients_are_never_applied_or_saved(tmp_path, monkeypatch):
    _poison_gradients(monkeypatch)
    cfg = load_config(
        CONFIG, _args(tmp_path, "grads", "train.steps=10", "logging.log_every=100", "mesh.data=1")
    )
    clean, _ = synthetic_sources(cfg)

    def poisoned(start):
        for step, batch in enumerate(clean(start), start=start):
            if step == 4:  # the 5th step: finite loss, infinite gradients
                batch = {**batch, "loss_weights": batch["loss_weights"] * 2.0}
            yield batch

    run_dir = str(tmp_path / "grads")
    with pytest.raises(TrainingDivergedError, match=r"step 5 .*Last good checkpoint: step 4"):
        train(cfg, run_dir, poisoned, devices=jax.devices()[:1])
    assert _saved_steps(run_dir) == [2, 4]
    checkpoints = RunCheckpoints(run_dir, cfg.checkpoint)
    try:
        for step in checkpoints.all_steps():
            state, _ = checkpoints.restore(step, _abstract(cfg))
            assert _all_finite(state), step
    finally:
        checkpoints.close()


def test_a_non_finite_step_returns_the_state_it_was_given(monkeypatch):
    """The select inside the jitted step itself (the loop's check is the second line)."""
    from tpt_jax.model import Decoder
    from tpt_jax.train._loop import _layout
    from tpt_jax.train._state import init_state
    from tpt_jax.train._step import make_train_step

    _poison_gradients(monkeypatch)
    cfg = load_config(CONFIG, [*BASE, "mesh.data=1"])
    layout = _layout(cfg, jax.devices()[:1])
    step = jax.jit(make_train_step(Decoder(cfg.model), layout.tx, layout.schedule, 1))
    batch = next(synthetic_sources(cfg)[0](0))
    state = init_state(cfg.model, layout.tx, layout.shardings, jax.random.key(0))
    before = [np.asarray(x) for x in jax.tree.leaves(state)]
    poisoned = {**batch, "loss_weights": batch["loss_weights"] * 2.0}
    after, metrics = step(state, poisoned)
    assert not bool(metrics["finite"]) and np.isfinite(float(metrics["loss"]))
    for x, y in zip(before, jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(x, np.asarray(y))
    moved, metrics = step(state, batch)  # the same state and a clean batch: a real step
    assert bool(metrics["finite"]) and int(moved.step) == int(state.step) + 1


def _abstract(cfg):
    from tpt_jax.train._loop import _layout

    return _layout(cfg, jax.devices()[:1]).abstract


# --- damaged checkpoints --------------------------------------------------------------------


def _records_by_step(run_dir) -> dict[int, dict]:
    """The last record of every step (a resume from an older checkpoint repeats steps)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    straight = _tpt_train(tmp_path, "straight", "train.steps=8")
    assert straight.returncode == 0, straight.stderr[-3000:]
    first = _tpt_train(tmp_path, "broken", "train.steps=8", "train.max_steps_per_run=6")
    assert first.returncode == 0, first.stderr[-3000:]
    folder = tmp_path / "broken" / "checkpoints"
    assert _saved_steps(tmp_path / "broken") == [2, 4, 6]
    # A disk or upload failure: step 6's array data is truncated to nothing.
    arrays = [
        os.path.join(root, name)
        for root, _, names in os.walk(folder / "6" / "state")
        for name in names
        if os.sep + "d" + os.sep in os.path.join(root, name) + os.sep
    ]
    assert arrays
    for path in arrays:
        open(path, "w").close()
    # A save killed half-way leaves its folder under orbax's temporary name (orbax 0.12.8).
    shutil.copytree(folder / "4", folder / "7.orbax-checkpoint-tmp")

    second = _tpt_train(tmp_path, "broken", "train.steps=8")
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    skipped = [line for line in output.splitlines() if "skipped checkpoint step 6" in line]
    assert len(skipped) == 1, output[-3000:]
    assert "resumed from step 4" in output
    assert not (folder / "7.orbax-checkpoint-tmp").exists()
    aside = [n for n in os.listdir(folder) if n.startswith("6.unreadable-")]
    assert len(aside) == 1  # set aside, not deleted: a storage hiccup would be recoverable

    a, b = _records_by_step(tmp_path / "straight"), _records_by_step(tmp_path / "broken")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in range(1, 9):
        for key in ("loss", "grad_norm", "learning_rate"):
            assert a[step][key] == b[step][key], (step, key)
    cfg = load_config(CONFIG, [*BASE, "train.steps=8"])
    state_a, _ = restore_latest(cfg, str(tmp_path / "straight"), jax.devices()[:1])
    state_b, meta_b = restore_latest(cfg, str(tmp_path / "broken"), jax.devices()[:1])
    assert meta_b["step"] == 8
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_a_read_error_that_passes_does_not_pass_over_a_checkpoint(tmp_path, monkeypatch):
    from tpt_jax.train._checkpoint import CheckpointUnreadableError

    cfg = load_config(CONFIG, _args(tmp_path, "flaky", "train.steps=6", "mesh.data=1"))
    sources, _ = synthetic_sources(cfg)
    run_dir = str(tmp_path / "flaky")
    first = load_config(
        CONFIG,
        _args(tmp_path, "flaky", "train.steps=6", "train.max_steps_per_run=4", "mesh.data=1"),
    )
    train(first, run_dir, sources, devices=jax.devices()[:1])
    assert _saved_steps(run_dir) == [2, 4]
    failed = []
    real = RunCheckpoints.restore

    def flaky(self, step, abstract):  # a GCS 503 on the first read, then all is well
        if not failed:
            failed.append(step)
            raise CheckpointUnreadableError(f"{step}: HttpError: 503 Service Unavailable")
        return real(self, step, abstract)

    monkeypatch.setattr(RunCheckpoints, "restore", flaky)
    monkeypatch.setattr("tpt_jax.train._resume.time.sleep", lambda s: None)
    result = train(cfg, run_dir, sources, devices=jax.devices()[:1])
    assert failed == [4] and result.start_step == 4 and result.final_step == 6
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["2", "4", "6"]


def test_a_changed_optimizer_is_a_settings_error_not_damage(tmp_path):
    first = _tpt_train(tmp_path, "opt", "train.steps=6", "train.max_steps_per_run=2")
    assert first.returncode == 0, first.stderr[-3000:]
    again = _tpt_train(tmp_path, "opt", "train.steps=6", "optimizer.grad_clip=0")
    line = _error_line(again)
    assert "optimizer.grad_clip" in line and "allow_config_change" in line
    assert sorted(os.listdir(tmp_path / "opt" / "checkpoints")) == ["2"]  # nothing set aside


# --- changed settings on resume -------------------------------------------------------------


def test_resume_with_changed_run_settings_is_refused_unless_allowed(tmp_path):
    run_dir = tmp_path / "run"
    first = _tpt_train(tmp_path, "run", "train.steps=4", "train.max_steps_per_run=2")
    assert first.returncode == 0, first.stderr[-3000:]
    with open(run_dir / "config.yaml") as f:
        saved_config = f.read()

    # log_every does not alter the run; global_batch and peak_lr do.
    changed = ["train.steps=4", "logging.log_every=2", "train.global_batch=16"]
    refused = _tpt_train(tmp_path, "run", *changed, "schedule.peak_lr=1e-3")
    assert refused.returncode == 2, refused.stderr[-3000:]
    line = _error_line(refused)
    assert "train.global_batch" in line and "schedule.peak_lr" in line, line
    assert "checkpoint.allow_config_change" in line and "log_every" not in line, line
    with open(run_dir / "config.yaml") as f:
        assert f.read() == saved_config
    assert _saved_steps(run_dir) == [2]

    allowed = _tpt_train(tmp_path, "run", *changed, "checkpoint.allow_config_change=true")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert "resumed from step 2" in allowed.stdout + allowed.stderr
    with open(run_dir / "config_changes.jsonl") as f:
        changes = [json.loads(line) for line in f]
    assert changes == [{"step": 2, "key": "train.global_batch", "old": 8, "new": 16}]
    cfg = load_config(CONFIG, _args(tmp_path, "run", *changed))
    checkpoints = RunCheckpoints(str(run_dir), cfg.checkpoint)
    try:
        metas = {s: checkpoints.restore(s, _abstract(cfg))[1] for s in checkpoints.all_steps()}
    finally:
        checkpoints.close()
    assert metas[2]["config"]["train"]["global_batch"] == 8  # earlier steps keep their config
    assert metas[4]["config"]["train"]["global_batch"] == 16


# --- preemption -----------------------------------------------------------------------------

# `tpt train` with the final save slowed down (as a large checkpoint's would be), so that a
# second SIGTERM reliably arrives while it is being awaited.
_SLOW_FINAL_SAVE = """
import sys, time
import tpt_jax.train._checkpoint as checkpoint
from tpt_jax.cli import main

real_close = checkpoint.RunCheckpoints.close

def slow_close(self):
    print("TEST: awaiting the final save", flush=True)
    time.sleep(3)
    real_close(self)

checkpoint.RunCheckpoints.close = slow_close
sys.exit(main(sys.argv[1:]))
"""


def test_second_sigterm_does_not_cut_the_final_save(tmp_path):
    args = [
        "train",
        CONFIG,
        *_args(tmp_path, "pre", "train.steps=100000", "schedule.kind=constant"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_FINAL_SAVE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**ENV, "PYTHONUNBUFFERED": "1"},
    )
    lines = []
    try:
        deadline = time.monotonic() + 240
        sent = 0
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if sent == 0 and "step 3:" in line:
                proc.send_signal(signal.SIGTERM)
                sent = 1
            elif sent == 1 and "TEST: awaiting the final save" in line:
                proc.send_signal(signal.SIGTERM)
                sent = 2
        returncode = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines)
    assert sent == 2, output[-3000:]
    assert returncode == 0, output[-3000:]
    preempted = [line for line in output.splitlines() if "preempted (SIGTERM) at step" in line]
    assert len(preempted) == 1, output[-3000:]
    step = int(preempted[0].split("at step ")[1].split(";")[0])
    assert _saved_steps(tmp_path / "pre")[-1] == step
    cfg = load_config(
        CONFIG, _args(tmp_path, "pre", "train.steps=100000", "schedule.kind=constant")
    )
    state, meta = restore_latest(cfg, str(tmp_path / "pre"), jax.devices()[:1])
    assert meta["step"] == step and int(state.step) == step and _all_finite(state)
