"""A training worker's install has no TensorFlow, and the logs carry no library noise.

- The commands of the base install (train on prepared shards, export, eval, sample, config,
  think with the teacher and the local engine) never import TensorFlow, SeqIO, Beam or
  JetStream: each runs in a fresh `tpt` process that then lists what it imported.
- pyproject's base dependencies name none of them, and neither does anything they depend on
  (the installed metadata, and pip's resolver where an index is reachable).
- A missing extra is one line naming it; `tpt prepare` and `tpt serve` print no DEBUG lines and
  no CUDA probes, and `--verbose` brings them back.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import tomllib
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from think_fixtures import WORDS, make_generator

from tpt_jax.data import testbed, vocab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What a training worker must never load (2 GB of TensorFlow, through seqio and JetStream).
HEAVY_MODULES = ("tensorflow", "seqio", "apache_beam", "jetstream")
HEAVY_DISTRIBUTIONS = {"tensorflow", "tensorflow-text", "seqio", "apache-beam", "google-jetstream"}

# Runs `tpt ARGS...` in this process, then reports the heavy modules it imported.
PROBE = r"""
import json, sys
from tpt_jax.cli import main
code = main(sys.argv[1:])
heavy = sorted(m for m in sys.modules if m.split(".")[0].startswith(HEAVY))
print("PROBE " + json.dumps({"code": code, "heavy": heavy}))
""".replace("HEAVY", repr(HEAVY_MODULES))


def _env(**extra):
    # One CPU device: the 8 fake devices of conftest only slow these runs down.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL")}
    return {**env, **extra}


def _probe(cwd, *args):
    """(exit code, heavy modules imported) of `tpt ARGS` in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)],
        capture_output=True, text=True, timeout=600, cwd=cwd, env=_env(),
    )  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("PROBE ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads(lines[-1][len("PROBE ") :])
    assert report["code"] == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return report["heavy"]


def _tpt(cwd, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "tpt_jax", *map(str, args)],
        capture_output=True, text=True, timeout=600, cwd=cwd, env=env or _env(),
    )  # fmt: skip


def _noise(text):
    """Lines of library noise: DEBUG records and the GPU probes of TensorFlow and XLA."""
    pattern = re.compile(r"DEBUG|cuda|cuInit|TF-TRT|cudnn|oneDNN", re.IGNORECASE)
    return [line for line in text.splitlines() if pattern.search(line)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A corpus, its SentencePiece vocab, prepared shards, a generator folder and configs."""
    root = tmp_path_factory.mktemp("install")
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(4 + i % 9)) for i in range(80)]
    with open(root / "corpus.jsonl", "w") as f:
        for i, text in enumerate(lines):
            f.write(json.dumps({"id": str(i), "text": text, "thinking": lines[-i - 1]}) + "\n")
    vocab.train(iter(lines * 4), str(root / "spm.model"), vocab_size=300)
    make_generator(str(root / "gen"))
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:4]))
    (root / "train.yaml").write_text(f"""
model: {{family: llama, vocab_size: 320, hidden_size: 32, num_layers: 2, num_heads: 4,
        num_kv_heads: 2, mlp_dim: 64, max_position: 64, dtype: float32}}
train: {{steps: 2, global_batch: 2, seq_len: 32}}
schedule: {{warmup_steps: 1}}
checkpoint: {{output_dir: {root}/runs, run_name: slim, save_every: 2}}
logging: {{log_every: 1}}
data:
  source: prepared
  vocab_path: {root}/spm.model
  prepared_dir: {root}/prepared
  corpora: [{{name: toy, paths: ["{root}/corpus.jsonl"]}}]
  mixture: [{{task: toy_tpt, rate: 1.0}}]
eval:
  tasks: [{{name: heldout, kind: perplexity, path: {root}/heldout.jsonl}}]
""")
    think = {
        "model_dir": f"{root}/gen",
        "corpus": {"name": "docs", "paths": [f"{root}/corpus.jsonl"]},
        "max_document_tokens": 16,
        "max_new_tokens": 2,
        "max_concurrent_decodes": 2,
        "temperature": 0.0,
    }
    testbed.write_corpus(str(root / "problems.jsonl"), testbed.make_problems(0, 8))
    for backend in ("teacher", "local"):
        values = {**think, "backend": backend, "output_dir": f"{root}/think_{backend}"}
        if backend == "teacher":  # it reasons about the testbed's problems only
            values["corpus"] = {"name": "problems", "paths": [f"{root}/problems.jsonl"]}
        (root / f"think_{backend}.yaml").write_text(json.dumps({"think": values}))
    prepared = _tpt(root, "prepare", root / "train.yaml")
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    return root, prepared


@pytest.fixture(scope="module")
def trained(work):
    root, _ = work
    assert _probe(root, "train", root / "train.yaml") == []
    return root


def test_training_on_prepared_shards_imports_no_tensorflow(trained):
    assert (trained / "runs" / "slim").is_dir()


@pytest.mark.parametrize(
    "command",
    [
        ["config", "train.yaml", "--devices", "1"],
        ["export", "train.yaml", "exported"],
        ["eval", "train.yaml"],
        ["sample", "train.yaml", "think.model_dir={root}/gen", "--prompt", "three apples", "--max-new-tokens", "2"],
        ["think", "think_teacher.yaml"],
        ["think", "think_local.yaml"],
    ],
    ids=["config", "export", "eval", "sample", "think-teacher", "think-local"],
)  # fmt: skip
def test_worker_commands_import_no_tensorflow(trained, command):
    assert _probe(trained, *(arg.format(root=trained) for arg in command)) == []


def test_the_probe_sees_tensorflow_where_it_is_imported(work, tmp_path):
    root, _ = work
    heavy = _probe(root, "prepare", "train.yaml", f"data.prepared_dir={tmp_path}/p")
    assert {"tensorflow", "seqio", "apache_beam"} <= set(heavy)


def test_base_dependencies_name_no_tensorflow():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    base = {Requirement(r).name.lower() for r in project["dependencies"]}
    assert base & HEAVY_DISTRIBUTIONS == set()
    extras = project["optional-dependencies"]
    named = {e: {Requirement(r).name.lower() for r in extras[e]} for e in extras}
    assert {"seqio", "apache-beam"} <= named["prepare"]
    assert "google-jetstream" in named["serve"]
    assert named["all"] == {"tpt_jax"} and "[prepare,serve,tpu]" in extras["all"][0]


def _closure(requirements):
    """Names of the installed distributions that `requirements` pull in, transitively, with the
    markers of this interpreter (python_version, sys_platform, the extras asked for)."""
    seen, todo = set(), [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (req.name.lower().replace("_", "-"), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(key[0]) or []
        except metadata.PackageNotFoundError:  # its own requirements cannot be read: listed only
            continue
        for text in requires:
            dep = Requirement(text)
            if dep.marker is None or any(
                dep.marker.evaluate({"extra": e}) for e in ["", *sorted(req.extras)]
            ):
                todo.append(dep)
    return {name for name, _ in seen}


def test_base_dependencies_pull_in_no_tensorflow():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        base = tomllib.load(f)["project"]["dependencies"]
    closure = _closure(base)
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain"} <= closure
    assert closure & HEAVY_DISTRIBUTIONS == set(), sorted(closure)
    # The check sees through an extra: the prepare extra's seqio does bring TensorFlow.
    assert "tensorflow" in _closure(["seqio==0.0.20"])


def test_pip_resolves_the_base_without_tensorflow(tmp_path):
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        base = tomllib.load(f)["project"]["dependencies"]
    (tmp_path / "base.txt").write_text("\n".join(base) + "\n")
    report = tmp_path / "report.json"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
             "--quiet", "--report", str(report), "-r", str(tmp_path / "base.txt")],
            capture_output=True, text=True, timeout=170,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.skip("pip could not resolve within 170 s (no package index reachable?)")
    assert "ResolutionImpossible" not in result.stderr, result.stderr[-3000:]
    if result.returncode != 0:
        pytest.skip(f"pip could not resolve (no package index reachable?): {result.stderr[-300:]}")
    names = {
        i["metadata"]["name"].lower().replace("_", "-")
        for i in json.loads(report.read_text())["install"]
    }
    assert {"jax", "flax", "optax", "orbax-checkpoint", "grain"} <= names
    assert names & HEAVY_DISTRIBUTIONS == set(), sorted(names)


# Makes `import seqio` fail as it does where the 'prepare' extra is not installed.
WITHOUT_SEQIO = r"""
import sys
sys.modules["seqio"] = None
from tpt_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_prepare_without_its_extra_is_one_line(work, tmp_path):
    root, _ = work
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_SEQIO, "prepare", str(root / "train.yaml"),
         f"data.prepared_dir={tmp_path}/prepared"],
        capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "tpt: error: tpt prepare needs the 'prepare' extra: pip install 'tpt_jax[prepare]' "
        "(no module named 'seqio')"
    ], result.stderr[-3000:]
    assert not (tmp_path / "prepared").exists()


def test_jetstream_backend_without_its_extra_is_one_line(work):
    root, _ = work
    code = WITHOUT_SEQIO.replace('"seqio"', '"jetstream"')
    result = subprocess.run(
        [sys.executable, "-c", code, "think", str(root / "think_teacher.yaml"),
         "think.backend=jetstream", f"think.output_dir={root}/think_js"],
        capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "tpt: error: think.backend 'jetstream' needs the 'serve' extra: "
        "pip install 'tpt_jax[serve]' (no module named 'jetstream')"
    ], result.stderr[-3000:]


def test_prepare_logs_no_tensorflow_noise(work):
    _, prepared = work
    assert "prepared 1 task(s)" in prepared.stdout
    assert _noise(prepared.stderr) == [], prepared.stderr[-3000:]
    assert prepared.stderr == ""


def test_prepare_verbose_keeps_the_noise(work, tmp_path):
    root, _ = work
    result = _tpt(root, "prepare", "train.yaml", f"data.prepared_dir={tmp_path}/p", "--verbose")
    assert result.returncode == 0, result.stderr[-3000:]
    assert any("DEBUG" in line for line in _noise(result.stderr)), result.stderr[-3000:]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_start_up(root, *flags):
    """Everything `tpt serve` writes (stdout, stderr) until it listens, then it is stopped."""
    config = root / "serve.yaml"
    config.write_text(f"think:\n  model_dir: {root}/gen\n  max_new_tokens: 4\n")
    out, err = root / f"serve{len(flags)}.out", root / f"serve{len(flags)}.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tpt_jax", "serve", str(config), "--port", str(_free_port()),
             *flags],
            stdout=o, stderr=e, env=_env(),
        )  # fmt: skip
    try:
        deadline = time.time() + 180
        while "JetStream gRPC on port" not in out.read_text():
            assert proc.poll() is None and time.time() < deadline, err.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(1)  # what the orchestrator's threads log once it serves
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out.read_text(), err.read_text()


def test_serve_start_up_is_quiet_and_verbose_brings_debug_back(work):
    root, _ = work
    stdout, stderr = _serve_start_up(root)
    assert stdout.splitlines() == [
        line for line in stdout.splitlines() if line.startswith("serve:")
    ]
    assert _noise(stdout + stderr) == [], (stdout + stderr)[-3000:]
    stdout, stderr = _serve_start_up(root, "--verbose")
    debug = [line for line in stderr.splitlines() if line.startswith("DEBUG ")]
    assert len(debug) > 50, stderr[-3000:]  # JAX's compile log, as JetStream's set-up had it
    assert [line for line in stdout.splitlines() if "DEBUG" in line] == []  # results only
