"""Config loading: inheritance, overrides, and one-line errors for every kind of bad config."""

import subprocess
import sys
import textwrap

import pytest

from tpt_jax.config import load_config, validate_for_devices
from tpt_jax.errors import ConfigError


def _write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_base_inheritance_and_overrides(tmp_path):
    _write(tmp_path / "model.yaml", "model: {hidden_size: 128, num_heads: 8, num_kv_heads: 4}\n")
    _write(
        tmp_path / "sched.yaml", "schedule: {kind: cosine, peak_lr: 1.0e-3}\ntrain: {steps: 500}\n"
    )
    path = _write(
        tmp_path / "run.yaml",
        """
        base: [model.yaml, sched.yaml]
        model: {num_layers: 3}
        train: {global_batch: 16}
        """,
    )
    cfg = load_config(
        path, ["schedule.peak_lr=3e-4", "checkpoint.run_name=123", "model.tie_embeddings=true"]
    )
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_layers) == (128, 8, 3)
    assert cfg.schedule.kind == "cosine" and cfg.schedule.peak_lr == pytest.approx(3e-4)
    assert cfg.train.steps == 500 and cfg.train.global_batch == 16
    assert cfg.checkpoint.run_name == "123" and cfg.model.tie_embeddings is True
    assert cfg.source_of("model.num_layers").endswith("run.yaml")
    assert cfg.source_of("model.hidden_size").endswith("model.yaml")
    assert cfg.source_of("schedule.peak_lr") == "override 'schedule.peak_lr=3e-4'"


def test_mesh_fill_and_device_checks(tmp_path):
    cfg = load_config(None, ["mesh.fsdp=4", "train.global_batch=16"])
    assert validate_for_devices(cfg, 8) == {
        "dcn_data": 1,
        "dcn_fsdp": 1,
        "data": 2,
        "fsdp": 4,
        "tensor": 1,
    }
    with pytest.raises(ConfigError, match="not divisible by the data-parallel size 8"):
        validate_for_devices(load_config(None, ["train.global_batch=12"]), 8)


def test_packaged_configs_validate():
    import glob

    paths = sorted(glob.glob("configs/**/*.yaml", recursive=True))
    assert any(p.endswith("demo.yaml") for p in paths)
    for path in paths:
        load_config(path)


def _tpt(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tpt_jax", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


BAD = {
    "unknown key": (
        "model:\n  hiden_size: 64\n",
        [],
        ["'model.hiden_size'", "did you mean 'model.hidden_size'"],
    ),
    "wrong type": (
        "model:\n  num_layers: two\n",
        [],
        ["'model.num_layers' must be int", "str 'two'"],
    ),
    "wrong type override": (
        "{}\n",
        ["train.steps=1.5"],
        ["'train.steps' must be int", "override 'train.steps=1.5'"],
    ),
    "heads vs kv heads": (
        "model: {num_heads: 6, num_kv_heads: 4, head_dim: 16}\n",
        [],
        ["num_heads=6 is not divisible by model.num_kv_heads=4"],
    ),
    "mesh vs devices": (
        "mesh: {data: 3}\n",
        ["--devices", "8"],
        ["mesh data=3 has 3 devices but 8 are available"],
    ),
    "batch vs data parallel": (
        "mesh: {fsdp: 8, data: 1}\ntrain: {global_batch: 12}\n",
        ["--devices", "8"],
        ["'train.global_batch'", "not divisible by the data-parallel size 8"],
    ),
    "bad choice": (
        "model: {family: gpt2}\n",
        [],
        ["'model.family'", "'gpt2' is not one of llama, qwen2, qwen3"],
    ),
    "schedule longer than run": (
        "train: {steps: 10}\nschedule: {kind: cosine, warmup_steps: 5, decay_steps: 10}\n",
        [],
        ["'schedule.decay_steps'", "exceeds train.steps=10"],
    ),
    "invalid yaml": ("model:\n  hidden_size: [64\n", [], [":3: invalid YAML"]),
    "double override": (
        "{}\n",
        ["train.steps=5", "train.steps=6"],
        ["'train.steps' is given twice"],
    ),
    "section not a mapping": ("model: 7\n", [], ["model must be a mapping, got int 7"]),
    "splash tile": ("model: {splash_block_q: 100}\n", [], ["'model.splash_block_q'", "of 128"]),
    "residual split over a mesh axis": (
        "mesh: {rules: [[activation_embed, tensor]]}\n",
        [],
        ["'mesh.rules'", "activation_embed must stay null"],
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_one_line_error(case, tmp_path):
    text, extra, fragments = BAD[case]
    path = _write(tmp_path / "bad.yaml", text)
    args = [a for a in extra if a.startswith("--") or a.isdigit()]
    overrides = [a for a in extra if "=" in a]
    result = _tpt("config", path, *overrides, *args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("tpt: error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    if case not in ("double override",):
        assert "bad.yaml" in lines[0] or "override" in lines[0]


def test_missing_file_and_base_loop(tmp_path):
    result = _tpt("config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr
    _write(tmp_path / "a.yaml", "base: b.yaml\n")
    _write(tmp_path / "b.yaml", "base: a.yaml\n")
    result = _tpt("config", str(tmp_path / "a.yaml"))
    assert (
        result.returncode == 2
        and "loops back" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_config_command_prints_resolved(tmp_path):
    result = _tpt(
        "config", "configs/demo.yaml", "train.steps=700", "train.global_batch=8", "--devices", "4"
    )
    assert result.returncode == 0, result.stderr
    assert "steps: 700" in result.stdout and "mesh data=4" in result.stdout


def test_only_commands_that_train_check_the_training_batch_against_the_devices():
    """configs/demo.yaml trains batches of 2 rows on one device; evaluating its model (or
    sampling, thinking, serving) on a host with 8 devices must not stop on train.global_batch;
    training must."""
    result = _tpt("eval", "configs/demo.yaml")
    assert result.returncode == 2 and "eval.tasks is empty" in result.stderr, result.stderr
    result = _tpt("train", "configs/demo.yaml")
    assert result.returncode == 2 and "train.global_batch" in result.stderr
    assert "not divisible by the data-parallel size 8" in result.stderr


def test_eval_without_tasks_and_bad_eval_keys_say_so(tmp_path):
    result = _tpt("eval", "configs/demo.yaml")
    assert result.returncode == 2 and "eval.tasks is empty" in result.stderr
    result = _tpt("eval", "configs/demo.yaml", "model.num_heads=3")
    assert result.returncode == 2 and "model.num_heads" in result.stderr
    result = _tpt("eval", "configs/demo.yaml", "eval.tasks=[{name: x, kind: mmlu, path: a}]")
    assert result.returncode == 2 and "eval.tasks[0].kind" in result.stderr


def test_pod_config_is_checked_against_its_topology():
    result = _tpt(
        "config", "configs/experiments/pretrain_8b_tpt.yaml", "run.root=gs://my-bucket/tpt"
    )
    assert result.returncode == 0, result.stderr
    assert "valid for 64 devices; mesh fsdp=64" in result.stdout
    result = _tpt("config", "configs/experiments/pretrain_8b_tpt.yaml", "mesh.topology=v5p-100x")
    assert result.returncode == 2 and "mesh.topology" in result.stderr
