"""The training loop: exact resume in a new process, cross-mesh restore, NaN stop, mid-training init."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tpt_jax.config import load_config
from tpt_jax.data import synthetic
from tpt_jax.model import Decoder, init_params
from tpt_jax.model._store import save_model
from tpt_jax.train import RunCheckpoints, TrainingDivergedError, loss_sums, restore_latest, train
from tpt_jax.train.run import synthetic_sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "models", "tiny.yaml")  # small and stable: not the demo
BASE = [
    "train.global_batch=8",
    "train.seq_len=32",
    "schedule.kind=cosine",
    "schedule.peak_lr=3e-3",
    "schedule.warmup_steps=2",
    "checkpoint.save_every=2",
    "logging.log_every=1",
]


def _tpt_train(tmp_path, run_name, *overrides):
    args = [sys.executable, "-m", "tpt_jax", "train", CONFIG]
    args += [
        *BASE,
        f"checkpoint.output_dir={tmp_path}",
        f"checkpoint.run_name={run_name}",
        *overrides,
    ]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_params(cfg, run_dir, devices):
    return restore_latest(cfg, run_dir, devices)


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    straight = _tpt_train(tmp_path, "straight", "train.steps=8")
    assert straight.returncode == 0, straight.stderr
    first = _tpt_train(tmp_path, "split", "train.steps=8", "train.max_steps_per_run=4")
    assert first.returncode == 0, first.stderr
    second = _tpt_train(tmp_path, "split", "train.steps=8")
    assert second.returncode == 0, second.stderr
    assert "resumed from step 4" in second.stderr + second.stdout

    a, b = _records(tmp_path / "straight"), _records(tmp_path / "split")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for key in ("loss", "grad_norm", "learning_rate"):
        assert [r[key] for r in a] == [r[key] for r in b], key

    cfg = load_config(CONFIG, [*BASE, "train.steps=8"])
    devices = jax.devices()[:1]
    state_a, meta_a = _final_params(cfg, str(tmp_path / "straight"), devices)
    state_b, meta_b = _final_params(cfg, str(tmp_path / "split"), devices)
    assert meta_a["data_position"] == meta_b["data_position"] == 8
    assert meta_b["config"]["train"]["steps"] == 8
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert os.path.exists(tmp_path / "split" / "config.yaml")
    assert any(
        name.startswith("events.out.tfevents")
        for name in os.listdir(tmp_path / "split" / "tensorboard")
    )


def test_checkpoint_of_other_shapes_is_refused(tmp_path):
    assert _tpt_train(tmp_path, "run", "train.steps=2").returncode == 0
    result = _tpt_train(tmp_path, "run", "train.steps=4", "model.mlp_dim=96")
    assert result.returncode == 2  # a changed model is refused as a changed setting first
    assert "model.mlp_dim 192 -> 96" in result.stderr.strip().splitlines()[-1]
    allowed = ("train.steps=4", "model.mlp_dim=96", "checkpoint.allow_config_change=true")
    result = _tpt_train(tmp_path, "run", *allowed)
    assert result.returncode == 2  # allowed, it still cannot restore other shapes
    message = result.stderr.strip().splitlines()[-1]
    assert (
        "['layers']['mlp']['down']['kernel'] has shape [2, 192, 64] in the checkpoint but [2, 96, 64]"
        in message
    )


def _cfg(tmp_path, *overrides):
    keys = {o.partition("=")[0] for o in overrides}
    base = [o for o in BASE if o.partition("=")[0] not in keys]
    return load_config(
        CONFIG,
        [*base, f"checkpoint.output_dir={tmp_path}", "logging.tensorboard=false", *overrides],
    )


def test_restore_onto_a_smaller_mesh(tmp_path):
    run_dir = str(tmp_path / "run")
    eight = _cfg(
        tmp_path, "mesh.data=1", "mesh.fsdp=8", "train.steps=4", "train.max_steps_per_run=2"
    )
    batches, _ = synthetic_sources(eight)
    train(eight, run_dir, batches)
    saved, _ = _final_params(eight, run_dir, jax.devices())

    four = _cfg(tmp_path, "mesh.data=1", "mesh.fsdp=4", "train.steps=4")
    restored, meta = _final_params(four, run_dir, jax.devices()[:4])
    assert meta["step"] == 2
    for x, y in zip(jax.tree.leaves(saved.params), jax.tree.leaves(restored.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        assert len(y.sharding.device_set) == 4
    result = train(four, run_dir, batches, devices=jax.devices()[:4])
    assert (result.start_step, result.final_step) == (2, 4)

    straight = _cfg(tmp_path, "mesh.data=1", "mesh.fsdp=8", "train.steps=4")
    reference = train(straight, str(tmp_path / "straight"), batches)
    assert result.last_loss == pytest.approx(reference.last_loss, rel=1e-5)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, "train.steps=10", "logging.log_every=100")
    clean, _ = synthetic_sources(cfg)

    def poisoned(start):
        for step, batch in enumerate(clean(start), start=start):
            if step == 4:  # the 5th step
                batch = {**batch, "loss_weights": np.full_like(batch["loss_weights"], np.nan)}
            yield batch

    run_dir = str(tmp_path / "nan")
    with pytest.raises(
        TrainingDivergedError, match=r"loss is nan at step 5.*Last good checkpoint: step 4"
    ):
        train(cfg, run_dir, poisoned)
    checkpoints = RunCheckpoints(run_dir, cfg.checkpoint)
    assert checkpoints.all_steps() == [2, 4]
    checkpoints.close()


def test_mid_training_starts_from_converted_parameters(tmp_path):
    cfg = _cfg(
        tmp_path,
        "train.steps=2",
        "train.max_steps_per_run=1",
        f"checkpoint.init_from={tmp_path / 'converted'}",
    )
    params = init_params(cfg.model, jax.random.key(123))
    save_model(str(tmp_path / "converted"), cfg.model, params)
    batch = synthetic.global_batch(cfg.data.seed, 0, 8, 32, cfg.model.vocab_size)
    loss_sum, weight = loss_sums(Decoder(cfg.model), params, batch)
    batches, _ = synthetic_sources(cfg)
    result = train(cfg, str(tmp_path / "mid"), batches)
    assert result.last_loss == pytest.approx(float(loss_sum / weight), rel=1e-6)
    state, _ = _final_params(cfg, str(tmp_path / "mid"), jax.devices()[:1])
    assert int(state.step) == 1
    assert int(state.opt_state[1][0].count) == 1  # a fresh optimizer: one update so far
