"""One output root: every stage's default path derives from run.root and the experiment name,
relative paths resolve against the file that set them, placeholders and impossible paths are
refused naming the key, and the shipped configs are found from any folder."""

import os
import subprocess
import sys

import pytest

from tpt_jax.config import check_paths, load_config
from tpt_jax.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_every_stage_derives_its_paths_from_one_root():
    cfg = load_config("configs/experiments/pretrain_8b_tpt.yaml", ["run.root=gs://b/tpt"])
    assert cfg.run.name == "pretrain_8b_tpt"
    assert os.path.join(cfg.checkpoint.output_dir, cfg.checkpoint.run_name) == (
        "gs://b/tpt/pretrain_8b_tpt"
    )
    assert cfg.data.vocab_path == "gs://b/tpt/data/megamath_fineweb_tpt_8k/vocab.model"
    assert cfg.data.prepared_dir == "gs://b/tpt/data/megamath_fineweb_tpt_8k/prepared"
    # The corpora are the think experiments' outputs, in the layout tpt think writes.
    assert [c.paths for c in cfg.data.corpora] == [
        ["gs://b/tpt/think_qwen3-8b/thinking/shard-*-of-*/chunk-*.jsonl"],
        ["gs://b/tpt/think_qwen3-8b_fineweb_edu/thinking/shard-*-of-*/chunk-*.jsonl"],
    ]
    think = load_config("configs/experiments/think_qwen3-8b.yaml", ["run.root=gs://b/tpt"])
    assert think.think.output_dir == "gs://b/tpt/think_qwen3-8b/thinking"
    assert think.think.model_dir == "gs://b/tpt/models/qwen3-8b"
    vanilla = load_config("configs/experiments/pretrain_8b_vanilla.yaml", ["run.root=gs://b/tpt"])
    assert vanilla.data.prepared_dir == cfg.data.prepared_dir  # one dataset, two experiments
    assert vanilla.checkpoint.run_name == "pretrain_8b_vanilla"


def test_an_explicit_path_wins_over_the_root():
    cfg = load_config(
        "configs/experiments/pretrain_8b_tpt.yaml",
        ["run.root=gs://b/tpt", "data.prepared_dir=gs://other/rows", "run.name=x"],
    )
    assert cfg.data.prepared_dir == "gs://other/rows"
    assert cfg.checkpoint.run_name == "x"


def test_relative_paths_resolve_against_the_file_that_set_them(tmp_path, monkeypatch):
    base = _write(
        tmp_path / "cfgs" / "base" / "data.yaml",
        "data:\n  corpora:\n    - {name: a, paths: [raw/a.jsonl], think_outputs: [t1, ./t2]}\n",
    )
    top = _write(
        tmp_path / "cfgs" / "exp.yaml",
        f"base: {base}\nthink:\n  model_dir: models/m\n  template: prompts/mine.txt\n"
        "run:\n  root: out\n",
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_config(top, ["checkpoint.init_from=here/ckpt"])
    cfgs = str(tmp_path / "cfgs")
    assert cfg.run.root == os.path.join(cfgs, "out")
    assert cfg.think.model_dir == os.path.join(cfgs, "models", "m")
    assert cfg.think.template == os.path.join(cfgs, "prompts", "mine.txt")
    assert cfg.data.corpora[0].paths == [
        os.path.join(cfgs, "base", "raw", "a.jsonl"),
        os.path.join(cfgs, "out", "t1", "thinking", "shard-*-of-*", "chunk-*.jsonl"),
        os.path.join(cfgs, "base", "t2", "shard-*-of-*", "chunk-*.jsonl"),
    ]
    # The command line's (and the defaults'): against the working folder.
    assert cfg.checkpoint.init_from == str(tmp_path / "here" / "ckpt")
    assert load_config(None).run.root == str(tmp_path / "runs")


def test_a_saved_config_reloads_to_the_same_paths(tmp_path, monkeypatch):
    from tpt_jax.config import save_resolved, to_dict

    monkeypatch.chdir(tmp_path)  # the default root, ./runs, is relative
    first = load_config("configs/experiments/local/pretrain_8b_tpt.yaml")
    saved = save_resolved(first, str(tmp_path / "runs" / "pretrain_8b_tpt"))
    monkeypatch.chdir("/")
    again = load_config(saved)
    assert to_dict(again) == to_dict(first)  # think outputs not added twice, nothing moved
    assert again.data.corpora[0].paths == [
        str(tmp_path / "runs" / "think_qwen3-8b" / "thinking" / "shard-*-of-*" / "chunk-*.jsonl")
    ]


def test_a_trailing_slash_or_a_tilde_in_the_root_names_the_same_folders(monkeypatch, tmp_path):
    exp = "configs/experiments/midtrain_qwen2.5-math-1.5b_tpt.yaml"
    plain = load_config(exp, ["run.root=gs://my-bucket/tpt"])
    slash = load_config(exp, ["run.root=gs://my-bucket/tpt/"])
    assert (
        slash.checkpoint.init_from
        == plain.checkpoint.init_from
        == ("gs://my-bucket/tpt/models/qwen2.5-math-1.5b")
    )
    assert slash.data.vocab_path == plain.data.vocab_path
    monkeypatch.setenv("HOME", str(tmp_path))
    tilde = load_config("configs/experiments/local/pretrain_8b_tpt.yaml", ["run.root=~/r/"])
    assert tilde.data.prepared_dir == str(
        tmp_path / "r" / "data" / "megamath_fineweb_tpt_8k" / "prepared"
    )


@pytest.mark.parametrize(
    "override",
    [
        "run.root=gs://YOUR_BUCKET/tpt",
        "think.model_dir=/path/to/Qwen3-8B",
        "think.address=http://VLLM_HOST:8000",
        "data.vocab_path=<your vocab>",
    ],
)
def test_placeholders_are_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"config key '{key}'.*placeholder"):
        load_config("configs/experiments/think_qwen3-8b_vllm.yaml", [override])


def test_shipped_configs_hold_no_placeholders():
    import glob

    for path in glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True):
        load_config(path)  # raises on a placeholder


def test_tpt_config_refuses_paths_that_cannot_exist(tmp_path):
    exp = "configs/experiments/local/pretrain_8b_tpt.yaml"
    with pytest.raises(ConfigError, match=r"'run.root'.*bucket"):
        check_paths(load_config(exp, ["run.root=gs://My_Bucket/tpt"]))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"'checkpoint.output_dir'.*is a file"):
        check_paths(load_config(exp, [f"checkpoint.output_dir={blocker}/runs"]))
    with pytest.raises(ConfigError, match=r"'think.corpus.paths'.*matches no file"):
        check_paths(
            load_config(
                "configs/experiments/local/think_qwen3-8b.yaml",
                [f"think.corpus.paths=[{tmp_path}/raw/*.jsonl]"],
            )
        )
    with pytest.raises(ConfigError, match=r"'checkpoint.init_from'.*does not exist"):
        check_paths(load_config(exp, [f"checkpoint.init_from={tmp_path}/nope"]))
    check_paths(load_config(exp, ["run.root=gs://my-bucket/tpt"]))  # outputs not made yet: fine


def test_a_pod_run_needs_a_shared_root(tmp_path):
    exp = "configs/experiments/pretrain_8b_tpt.yaml"  # v5p-128: 16 hosts
    with pytest.raises(ConfigError, match=r"'run.root': \S*/runs is a local folder.*16 hosts"):
        check_paths(load_config(exp))
    single = load_config(
        "configs/experiments/think_qwen3-8b.yaml",
        [
            f"run.root={tmp_path}",
            f"think.model_dir={tmp_path}",
            f"think.corpus.paths=[{ROOT}/*.md]",
        ],
    )
    check_paths(single)  # v6e-8: one host


def test_tpt_config_names_the_key_on_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "tpt_jax", "config", "configs/experiments/pretrain_8b_tpt.yaml",
         "run.root=gs://YOUR_BUCKET/x"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "tpt: error: config key 'run.root': 'gs://YOUR_BUCKET/x' is a placeholder (override "
        "'run.root=gs://YOUR_BUCKET/x'); set it, e.g. run.root=... on the command line, or set "
        "run.root and leave the path empty to derive it"
    ]


def test_shipped_configs_are_found_from_any_folder(tmp_path):
    # cwd is not the repository: `configs/...` names the configs inside the package.
    result = subprocess.run(
        [sys.executable, "-m", "tpt_jax", "config", "configs/demo.yaml", "--devices", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "hidden_size: 128" in result.stdout


def test_prepare_names_a_think_output_that_is_not_there(tmp_path):
    from tpt_jax.data import vocab
    from tpt_jax.data.prepare import PreparedDataError, work_items

    vocab.train(("alpha beta gamma delta" for _ in range(50)), str(tmp_path / "v.model"), 290)
    cfg = load_config(
        "configs/experiments/local/pretrain_8b_tpt.yaml",
        [f"run.root={tmp_path}", f"data.vocab_path={tmp_path}/v.model",
         "data.corpora=[{name: megamath, think_outputs: [think_qwen3-8bb]}]",
         "data.mixture=[{task: megamath_tpt}]"],
    )  # fmt: skip
    with pytest.raises(PreparedDataError) as error:
        work_items(cfg)
    assert str(error.value).startswith(
        "task megamath_tpt: data.corpora[0].think_outputs ['think_qwen3-8bb'] hold no `tpt think` "
        f"output yet (looked for {tmp_path}/think_qwen3-8bb/thinking/shard-*-of-*/chunk-*.jsonl)"
    )
