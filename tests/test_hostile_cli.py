"""User mistakes and a full disk at the CLI: each prints exactly one `tpt: error:` line naming the
path or key, exits non-zero, and shows no traceback. Real `tpt` subprocesses throughout; the full
disk is real too (the kernel's /dev/full answers every write with ENOSPC)."""

import errno
import json
import os
import subprocess
import sys

import pytest
from think_fixtures import make_generator

from tpt_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "models", "tiny.yaml")
BROKEN_JINJA = "{% for m in messages %}{{ m['content'] }}"  # the for block is never closed
WORDS = ["apples", "cost", "six", "dollars", "the", "train"]
LINES = [" ".join(WORDS[(i + j) % 6] for j in range(8)) for i in range(200)]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    make_generator(str(root / "gen"))
    (root / "docs.jsonl").write_text(json.dumps({"id": "d0", "text": "three apples"}) + "\n")
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(LINES))
    )
    (root / "a_file").write_text("not a folder\n")
    return root


def _tpt(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tpt_jax", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
    )


def _one_error_line(result, *names):
    """The run failed with exactly one line on stderr, `tpt: error: ...` naming each of names."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tpt: error: "), result.stderr[-3000:]
    for name in names:
        assert str(name) in lines[0], lines[0]
    return lines[0]


def _think_config(root, name, **think):
    values = {
        "model_dir": f"{root}/gen",
        "output_dir": f"{root}/{name}",
        "corpus": {"name": "docs", "paths": [f"{root}/docs.jsonl"]},
        "max_document_tokens": 16,
        "max_new_tokens": 2,
        "max_concurrent_decodes": 1,
        **think,
    }
    path = root / f"{name}.yaml"
    path.write_text(json.dumps({"think": values}))  # JSON is YAML
    return path


def test_config_path_is_a_folder(root):
    _one_error_line(_tpt("config", root), root)


def test_config_file_is_not_utf8(root):
    bad = root / "latin1.yaml"
    bad.write_bytes(b"think:\n  template: caf\xe9\n")
    assert "UTF-8" in _one_error_line(_tpt("config", bad), bad)


def test_think_output_dir_is_a_file(root):
    config = _think_config(root, "think_out", output_dir=f"{root}/a_file")
    _one_error_line(_tpt("think", config), "think.output_dir", root / "a_file")


def test_train_checkpoint_dir_is_a_file(root):
    result = _tpt(
        "train", TINY, f"checkpoint.output_dir={root}/a_file", "train.steps=1",
        "train.global_batch=8", "train.seq_len=32",
    )  # fmt: skip
    _one_error_line(result, "checkpoint.output_dir", root / "a_file")


def test_prepare_output_is_a_file(root):
    from tpt_jax.data import vocab

    vocab.train(iter(LINES), str(root / "spm.model"), vocab_size=300)
    (root / "prep.yaml").write_text(
        f"""
train: {{seq_len: 32, global_batch: 8}}
data:
  vocab_path: {root}/spm.model
  prepared_dir: {root}/a_file
  corpora: [{{name: toy, paths: ["{root}/corpus.jsonl"]}}]
  mixture: [{{task: toy_vanilla, rate: 1.0}}]
"""
    )
    _one_error_line(_tpt("prepare", root / "prep.yaml"), "data.prepared_dir", root / "a_file")


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_chat_template_with_a_syntax_error(root, where):
    gen = root / f"gen_{where.split('.')[0]}"
    make_generator(str(gen))
    if where == "chat_template.jinja":
        (gen / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
        (gen / where).write_text(BROKEN_JINJA)
    else:
        (gen / where).write_text(
            json.dumps({"chat_template": BROKEN_JINJA, "eos_token": "<|im_end|>"})
        )
    config = _think_config(root, f"think_{gen.name}", model_dir=str(gen))
    _one_error_line(_tpt("think", config), gen / where)


@pytest.mark.parametrize(
    "content", [b"{document} and {document", b"a {document} } b", b"caf\xe9 {document}"]
)
def test_think_template_file_that_does_not_parse(root, content):
    template = root / "bad_template.txt"
    template.write_bytes(content)
    config = _think_config(root, "think_template", template=str(template))
    _one_error_line(_tpt("think", config), template)


def test_full_disk_while_writing_a_vocab(root):
    (root / "vocab.yaml").write_text(
        f'data: {{corpora: [{{name: c, paths: ["{root}/corpus.jsonl"]}}]}}\n'
    )
    result = _tpt(
        "vocab", "train", root / "vocab.yaml", "--vocab-size", "300", "--out", "/dev/full"
    )
    assert "No space left" in _one_error_line(result, "/dev/full")


def test_full_disk_names_the_output_being_written(tmp_path):
    """storage.write_bytes (chunks, configs, summaries): its temporary file is a link to
    /dev/full, so the real write gets ENOSPC, reported with the output's path."""
    from tpt_jax import storage

    target = tmp_path / "chunk-000000.jsonl"
    os.symlink("/dev/full", f"{target}.tmp")
    with pytest.raises(OSError) as info:
        storage.write_bytes(str(target), b"x" * 100)
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(target)
    assert cli._file_error(info.value) == f"{target}: No space left on device"


@pytest.mark.parametrize(
    "bug", [KeyError("a bug, not a user mistake"), ConnectionResetError(errno.ECONNRESET, "reset")]
)
def test_a_real_bug_keeps_its_traceback(monkeypatch, bug):
    def broken(args):
        raise bug

    monkeypatch.setattr(cli, "_cmd_config", broken)
    with pytest.raises(type(bug)):
        cli.main(["config", TINY])


# --- tpu_scripts: values that reach the remote shell -------------------------------------------

SCRIPTS = os.path.join(ROOT, "tpu_scripts")
RESOURCE = ["--project", "proj", "--zone", "z", "--name", "tpt"]
# Spaces, both quotes, `;`, `$(...)`, backquotes, a glob and a variable: each would run or change
# something if the remote shell read it as code rather than as a name.
HOSTILE_NAMES = [
    "run x'y\"z;touch canary1;$(touch canary2)`touch canary3`*$HOME",
    "run;touch canary6;$(touch canary7)",  # no quote to unbalance: unquoted, this one runs
]
hostile = pytest.mark.parametrize("name", HOSTILE_NAMES)

# A stand-in for gcloud: records each call's argv (one JSON list per line), reports the queued
# resource ACTIVE and, where a test wrote probes.json, answers each run-state probe (relaunch.sh's
# `tpt-state:` query) with its next entry (the last one repeated), one `tpt-state:` line a worker.
FAKE_GCLOUD = """\
import json, os, sys
folder, args = os.path.dirname(os.path.dirname(os.path.abspath(__file__))), sys.argv[1:]
with open(os.path.join(folder, "gcloud_calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\\n")
command = next((a for a in args if a.startswith("--command=")), "")
if args[:3] == ["compute", "tpus", "queued-resources"] and "describe" in args:
    print("ACTIVE")
elif "tpt-state:" in command and os.path.exists(os.path.join(folder, "probes.json")):
    with open(os.path.join(folder, "probes.json")) as f:
        probes = json.load(f)
    counter = os.path.join(folder, "probes.count")
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    for line in probes[min(n, len(probes) - 1)]:
        print("tpt-state: " + line)
"""


@pytest.fixture
def gcloud(tmp_path, monkeypatch):
    """The fake `gcloud` above, first on PATH. Returns the calls made so far; a test that runs
    relaunch.sh first writes its probe answers with _answer_probes."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "gcloud_calls.jsonl"
    bin_dir.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def recorded():
        if not calls.exists():
            return []
        return [json.loads(line) for line in calls.read_text().splitlines()]

    return recorded


def _answer_probes(tmp_path, *rounds):
    """The fake gcloud's answers to relaunch's run-state probes: one list of lines per round."""
    (tmp_path / "probes.json").write_text(json.dumps(rounds))


@pytest.fixture
def worker(tmp_path):
    """A TPU worker's home: ~/tpt_jax/.venv/bin/tpt prints its arguments and $K as one JSON line;
    `tail` prints its arguments; `curl` fails at once (no metadata server here). Evaluates a remote
    command there with a real `bash -c`."""
    home = tmp_path / "worker"
    venv_bin = home / "tpt_jax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    tools = home / "tools"
    tools.mkdir()
    fakes = {
        venv_bin / "tpt": 'print(json.dumps({"args": sys.argv[1:], "K": os.environ.get("K")}))',
        tools / "tail": "print(json.dumps(sys.argv[1:]))",
        tools / "curl": "sys.exit(7)",
    }
    for path, body in fakes.items():
        path.write_text(f"#!{sys.executable}\nimport json, os, sys\n{body}\n")
        path.chmod(0o755)

    def remote(command):
        env = {**os.environ, "HOME": str(home), "PATH": f"{tools}:{os.environ['PATH']}"}
        return subprocess.run(
            ["bash", "-c", command], cwd=home, env=env, stdin=subprocess.DEVNULL,
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    return home, remote


def _script(name, *args):
    return subprocess.run(
        ["bash", os.path.join(SCRIPTS, name), *args], capture_output=True, text=True, timeout=60
    )


def _remote_commands(calls):
    return [a.split("=", 1)[1] for call in calls for a in call if a.startswith("--command=")]


def _no_canary(home):
    found = [os.path.join(d, f) for d, _, fs in os.walk(home) for f in fs if f.startswith("canary")]
    found += [f for f in os.listdir(".") if f.startswith("canary")]
    assert not found, f"the remote shell ran injected code: {found}"


def _wait_for(path, timeout=30):
    """The text of `path` once something is written there (the launch runs in the background)."""
    import time

    deadline = time.time() + timeout
    while not (path.exists() and path.read_text()) and time.time() < deadline:
        time.sleep(0.02)
    return path.read_text() if path.exists() else ""


def _launched(home, run):
    """The launched run's record once it has ended: what tpt printed (its last log line, as JSON),
    the sub-command launch.sh recorded and tpt's exit status. Nothing else is named after the run
    than its .log, .cmd, .pid and .exit."""
    files = home / "tpt_logs"
    status = _wait_for(files / f"{run}.exit")
    assert set(os.listdir(files)) == {f"{run}.{x}" for x in ("cmd", "exit", "log", "pid")}
    wrapper, tpt = (files / f"{run}.pid").read_text().split()
    assert wrapper.isdigit() and tpt.isdigit()
    printed = json.loads((files / f"{run}.log").read_text().splitlines()[-1])
    return printed, (files / f"{run}.cmd").read_text(), status


def _status_probe(gcloud, run):
    """The run-state probe status.sh sends to every worker for `run`."""
    before = len(gcloud())
    assert _script("status.sh", *RESOURCE, "--run", run).returncode == 0
    (probe,) = _remote_commands(gcloud()[before:])
    return probe


@hostile
def test_launch_passes_a_hostile_run_name_literally(name, gcloud, worker):
    home, remote = worker
    result = _script("launch.sh", *RESOURCE, "--run", name, "--env", "K=$(touch canary4)",
                     "--", "train", "c y.yaml", "x=$(touch canary5)")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (command,) = _remote_commands(gcloud())
    assert remote(command).returncode == 0
    printed, subcommand, status = _launched(home, name)
    _no_canary(home)
    assert printed == {"args": ["train", "c y.yaml", "x=$(touch canary5)"], "K": "$(touch canary4)"}
    assert (subcommand, status) == ("train\n", "0\n")
    # status.sh finds the run's files: a train that exited 0 without "tpt: run complete" stopped.
    assert remote(_status_probe(gcloud, name)).stdout == "tpt-state: stopped 0 ?\n"
    _no_canary(home)


@hostile
def test_logs_streams_and_collects_a_hostile_run_name_literally(name, gcloud, worker, tmp_path):
    home, remote = worker
    (home / "tpt_logs").mkdir()
    (home / "tpt_logs" / f"{name}.log").write_text("the log\n")
    assert _script("logs.sh", *RESOURCE, "--run", name).returncode == 0
    (command,) = _remote_commands(gcloud())
    streamed = remote(command)
    assert json.loads(streamed.stdout)[-1] == f"{home}/tpt_logs/{name}.log", streamed.stderr
    # v5p-16: two hosts, copied one at a time.
    result = _script("logs.sh", *RESOURCE, "--run", name, "--collect", str(tmp_path / "c"),
                     "--accelerator-type", "v5p-16")  # fmt: skip
    assert result.returncode == 0, result.stderr
    scps = [call for call in gcloud() if "scp" in call]
    assert [next(a for a in scp if a.startswith("--worker=")) for scp in scps] == [
        "--worker=0",
        "--worker=1",
    ]
    for scp in scps:
        # scp's remote path is read by the remote shell (`scp -f PATH`): it must name the file.
        remote_path = next(a for a in scp if a.startswith("tpt:")).split(":", 1)[1]
        assert remote(f"cat {remote_path}").stdout == "the log\n"
    _no_canary(home)


def _relaunch(*args):
    """relaunch.sh on one host (v5p-8) against the fake gcloud, polling without a pause."""
    return _script("relaunch.sh", *RESOURCE, "--accelerator-type", "v5p-8", "--repo", "r",
                   "--commit", "c", "--poll", "0", "--max-restarts", "0", *args)  # fmt: skip


@hostile
def test_relaunch_passes_a_hostile_command_literally(name, gcloud, worker, tmp_path):
    """The hostile word is the tpt sub-command, hence also the run name (the default)."""
    home, remote = worker
    _answer_probes(tmp_path, ["none - 0"], ["done 0 0"])
    result = _relaunch("--", name, "c.yaml")
    assert result.returncode == 0 and f"{name} finished on all 1 workers" in result.stdout, (
        result.stdout + result.stderr
    )
    probe, setup, launch, probe_again = _remote_commands(gcloud())
    assert "git checkout" in setup and probe == probe_again
    # On the worker, the probe reads the run's own files: nothing yet, then tpt's exit status.
    assert remote(probe).stdout == "tpt-state: none - ?\n"
    assert remote(launch).returncode == 0
    printed, subcommand, status = _launched(home, name)
    _no_canary(home)
    assert printed == {"args": [name, "c.yaml"], "K": None}
    assert (subcommand, status) == (f"{name}\n", "0\n")
    # Not train or think: exit 0 is done, for relaunch's probe and for status.sh's, which reads
    # the sub-command from the worker's RUN.cmd.
    assert remote(probe).stdout == "tpt-state: done 0 ?\n"
    assert remote(_status_probe(gcloud, name)).stdout == "tpt-state: done 0 ?\n"
    _no_canary(home)


@hostile
def test_relaunch_reads_and_reports_a_hostile_run_name_literally(name, gcloud, worker, tmp_path):
    """A hostile --run of `train`: the probe finds its log and exit status, and giving up (a
    failure, --max-restarts 0) shows the tail of that log."""
    home, remote = worker
    _answer_probes(tmp_path, ["none - 0"], ["failed 3 0"])
    result = _relaunch("--run", name, "--", "train", "c y.yaml", "x=$(touch canary5)")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"{name} exited with status 3 on tpt worker 0; stopping after 0 restarts" in (
        result.stderr
    )
    probe, _, launch, _, tail = _remote_commands(gcloud())
    assert "--worker=0" in gcloud()[-1]  # the tail comes from the worker that failed
    assert remote(launch).returncode == 0
    printed, subcommand, status = _launched(home, name)
    _no_canary(home)
    assert printed == {"args": ["train", "c y.yaml", "x=$(touch canary5)"], "K": None}
    assert (subcommand, status) == ("train\n", "0\n")
    # exit 0 without "tpt: run complete" in the log: stopped early (a SIGTERM), to be resumed.
    assert remote(probe).stdout == "tpt-state: stopped 0 ?\n"
    with open(home / "tpt_logs" / f"{name}.log", "a") as log:
        log.write("tpt: run complete\n")
    assert remote(probe).stdout == "tpt-state: done 0 ?\n"
    (home / "tpt_logs" / f"{name}.exit").write_text("3\n")
    assert remote(probe).stdout == "tpt-state: failed 3 ?\n"
    assert json.loads(remote(tail).stdout) == ["-n", "30", f"{home}/tpt_logs/{name}.log"]
    _no_canary(home)


def test_a_run_name_with_a_slash_is_refused(gcloud):
    result = _script("launch.sh", *RESOURCE, "--run", "../x", "--", "train", "c.yaml")
    assert result.returncode == 2 and "--run" in result.stderr and gcloud() == []


@pytest.mark.parametrize(
    "flag, value", [("--seeds", "-1"), ("--heldout", "-5"), ("--heldout", "100000"),
                    ("--documents", "-3"), ("--seeds", "two")],
)  # fmt: skip
def test_demo_counts_out_of_range_stop_at_the_command_line(flag, value, tmp_path):
    result = _tpt("demo", "--quick", flag, value, "--out", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"argument {flag}:" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()  # nothing was started
