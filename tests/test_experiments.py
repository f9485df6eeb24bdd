"""The paper's experiment configs: every one validates on its own TPU topology, and its
local-debug variant runs here (one training step, or the teacher over the bundled sample)."""

import glob
import os
import subprocess
import sys

import pytest

from tpt_jax.config import load_config, topology_chips, validate_for_devices

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, "configs", "experiments", "*.yaml")))
NAMES = [os.path.splitext(os.path.basename(p))[0] for p in EXPERIMENTS]


def test_the_paper_settings_are_all_there():
    assert {
        "pretrain_8b_tpt", "pretrain_8b_vanilla", "constrained_8b_tpt", "constrained_8b_vanilla",
        "midtrain_qwen2.5-math-1.5b_tpt", "midtrain_llama3.2-3b_tpt", "midtrain_qwen2.5-math-7b_tpt",
        "think_qwen3-8b", "think_r1-distill-qwen-7b", "think_r1-distill-qwen-1.5b",
        "think_random_focus", "think_back_thinking",
    } <= set(NAMES)  # fmt: skip


@pytest.mark.parametrize("name", NAMES)
def test_config_validates_on_its_topology(name):
    cfg = load_config(os.path.join(ROOT, "configs", "experiments", f"{name}.yaml"))
    if name.endswith("_vllm"):
        assert cfg.think.backend == "openai"
        return
    chips = topology_chips(cfg.mesh.topology) * cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp
    validate_for_devices(cfg, chips)
    if name.startswith("think"):
        assert cfg.think.temperature == 0.6 and cfg.think.top_p == 0.9
        assert cfg.think.max_document_tokens == 2048 and cfg.think.stop == ["</think>"]
    else:
        assert cfg.train.seq_len == 8192
        tokens = cfg.train.steps * cfg.train.global_batch * cfg.train.seq_len
        budget = 40e9 if name.startswith("constrained") else 100e9
        assert abs(tokens / budget - 1) < 0.1, tokens  # the paper's token budget


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("think")])
def test_local_training_variant_runs_one_step(name, tmp_path):
    from tpt_jax.train.run import run_training

    config = os.path.join(ROOT, "configs", "experiments", "local", f"{name}.yaml")
    # The prepared data these twins read is made by the walkthrough (tests/test_walkthrough.py);
    # here each one's model, mesh and schedule take a step on the built-in stream.
    cfg = load_config(config, [f"run.root={tmp_path}", "train.steps=1", "data.source=synthetic"])
    result = run_training(cfg, quiet_config=True)
    assert result.final_step == 1 and result.last_loss > 0


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("think")])
def test_local_thinking_variant_runs(name, tmp_path):
    config = os.path.join(ROOT, "configs", "experiments", "local", f"{name}.yaml")
    args = [sys.executable, "-m", "tpt_jax", "think", config, f"run.root={tmp_path}"]
    # From another folder: the twin's bundled corpus resolves against the config file.
    result = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert glob.glob(str(tmp_path / name / "thinking" / "shard-*" / "chunk-*.jsonl"))
    assert "think: 32 documents" in result.stdout, result.stdout
