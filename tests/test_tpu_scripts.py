"""tpu_scripts: shellcheck-clean; --dry-run prints the exact gcloud commands for a single host
(v6e-8), a pod slice (v5p-128: 16 workers) and a multi-slice queued resource (2 x v5p-128);
relaunch's decisions, driven by a fake `gcloud` on PATH; missing options are named."""

import glob
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tpu_scripts")
BASE = ["--project", "proj", "--zone", "us-east5-a", "--name", "tpt"]
WHERE = "--project=proj --zone=us-east5-a"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TMP = "/tmp/tpt-scripts-test"  # TMPDIR given to setup.sh: where its tarball would be written
INSTALL = (
    'export PATH="$HOME/.local/bin:$PATH"; cd ~/tpt_jax; if ! command -v uv >/dev/null; then '
    "python3 -m pip --version >/dev/null 2>&1 || { sudo apt-get update -qq && sudo apt-get "
    "install -y -qq -o DPkg::Lock::Timeout=300 python3-pip; }; python3 -m pip install --user --quiet uv || python3 -m pip "
    'install --user --quiet --break-system-packages uv; fi; .venv/bin/python -c "import sys; '
    'assert sys.version_info[:2] == (3, 11)" 2>/dev/null || { rm -rf .venv; uv venv --quiet '
    '--python 3.11 .venv; }; uv pip install --quiet --python .venv/bin/python -e ".[tpu]"'
)
STOP_PREVIOUS = (
    'if [ -f "$f.pid" ] && read -r p c < "$f.pid"; then [ -f "$f.exit" ] || kill "$p" 2>/dev/null; if grep -qa tpt '
    '"/proc/$c/cmdline" 2>/dev/null; then kill "$c"; i=0; while grep -qa tpt "/proc/$c/cmdline" '
    '2>/dev/null && [ $i -lt 300 ]; do sleep 1; i=$((i + 1)); done; kill -9 "$c" 2>/dev/null; fi; fi; '
    'rm -f "$f.exit" "$f.pid"'
)


def _sh(word):
    """A word the way the scripts' --dry-run quotes it (single quotes, ' as '\\'')."""
    return "'" + word.replace("'", "'\\''") + "'"


def _ssh(node, command, worker="all"):
    return f"gcloud compute tpus tpu-vm ssh {node} {WHERE} --worker={worker} " + _sh(
        f"--command={command}"
    )


def _launch_command(run, env_and_args, subcommand="train"):
    return (
        f"mkdir -p ~/tpt_logs; cd ~/tpt_jax; f=~/tpt_logs/{run}; {STOP_PREVIOUS}; "
        f"printf '%s\\n' {subcommand} > \"$f.cmd\"; ( trap '' HUP; "
        f'env{env_and_args} > "$f.log" 2>&1 & echo "$BASHPID $!" > "$f.pid"; wait $!; '
        'echo $? > "$f.exit" ) > /dev/null 2>&1 &'
    )


def _run(script, *args, env=None, timeout=60):
    return subprocess.run(
        ["bash", os.path.join(SCRIPTS, script), *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip


def _dry(script, *args):
    result = _run(script, "--dry-run", *BASE, *args, env={**os.environ, "TMPDIR": TMP})
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_shellcheck_clean():
    shellcheck = os.path.join(os.path.dirname(sys.executable), "shellcheck")
    scripts = sorted(glob.glob(os.path.join(SCRIPTS, "*.sh")))
    result = subprocess.run([shellcheck, "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", sorted(set(os.listdir(SCRIPTS)) - {"common.sh", "README.md"}))
def test_help(script):
    result = _run(script, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr


@pytest.mark.parametrize(
    "accelerator, runtime, hosts",
    [
        ("v4-8", "tpu-ubuntu2204-base", 1),
        ("v4-32", "tpu-ubuntu2204-base", 4),
        ("v5litepod-8", "v2-alpha-tpuv5-lite", 1),
        ("v5litepod-16", "v2-alpha-tpuv5-lite", 4),
        ("v5litepod-256", "v2-alpha-tpuv5-lite", 64),
        ("v5p-8", "v2-alpha-tpuv5", 1),
        ("v5p-128", "v2-alpha-tpuv5", 16),
        ("v5p-256", "v2-alpha-tpuv5", 32),
        ("v6e-1", "v2-alpha-tpuv6e", 1),
        ("v6e-8", "v2-alpha-tpuv6e", 1),
        ("v6e-16", "v2-alpha-tpuv6e", 4),
        ("v6e-256", "v2-alpha-tpuv6e", 64),
    ],
)
def test_runtime_and_hosts_follow_the_accelerator_type(accelerator, runtime, hosts):
    script = (
        f"source {SCRIPTS}/common.sh; runtime_for_accelerator {accelerator}; "
        f"hosts_for_accelerator {accelerator}"
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == [runtime, str(hosts)], result.stderr


def test_setup_ships_the_checkout_and_builds_python_311(tmp_path):
    head = subprocess.run(
        ["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    tarball = f"{TMP}/tpt_jax-{head}.tar.gz"
    assert _dry("setup.sh") == [
        f"git -C {ROOT} archive --format=tar.gz --output={tarball} {head}",
        f"gcloud compute tpus tpu-vm scp {tarball} tpt:tpt_jax.tar.gz {WHERE} --worker=all",
        _ssh(
            "tpt",
            "set -e; mkdir -p ~/tpt_jax; find ~/tpt_jax -mindepth 1 -maxdepth 1 ! -name .venv "
            "-exec rm -rf {} +; tar -xzf ~/tpt_jax.tar.gz -C ~/tpt_jax; rm ~/tpt_jax.tar.gz; "
            + INSTALL,
        ),
    ]
    # What setup.sh ships is what `git archive` of that commit holds: the package and its build file.
    result = subprocess.run(
        ["git", "-C", ROOT, "archive", "--format=tar", head], capture_output=True, check=True
    )
    listing = subprocess.run(
        ["tar", "-t"], input=result.stdout, capture_output=True, check=True
    ).stdout.decode()
    assert "pyproject.toml" in listing.split() and "tpt_jax/cli.py" in listing.split()


def test_setup_from_a_pushed_commit():
    url = "https://github.com/o/tpt_jax.git"
    assert _dry("setup.sh", "--repo", url, "--commit", COMMIT) == [
        _ssh(
            "tpt",
            "set -e; mkdir -p ~/tpt_jax; cd ~/tpt_jax; [ -d .git ] || git init --quiet; "
            f"if git remote get-url origin >/dev/null 2>&1; then git remote set-url origin {url}; "
            f"else git remote add origin {url}; fi; git fetch --quiet origin; "
            f"git checkout --quiet --force {COMMIT}; " + INSTALL,
        )
    ]


def _git(folder, *args):
    return subprocess.run(
        ["git", "-C", str(folder), "-c", "user.name=t", "-c", "user.email=t@t", *args],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip


def _repo_with_one_file(folder, text):
    """A git repository holding a.txt = `text` in one commit; returns the commit's hash."""
    folder.mkdir()
    _git(folder, "init", "--quiet")
    (folder / "a.txt").write_text(text)
    _git(folder, "add", "a.txt")
    _git(folder, "commit", "--quiet", "-m", text)
    return _git(folder, "rev-parse", "HEAD")


def test_setup_from_a_repo_over_a_shipped_checkout_and_after_the_url_changed(tmp_path):
    """setup.sh --repo, run by bash in a worker's home: a checkout shipped earlier (files and a
    .venv, no .git) becomes a clone at the commit, the .venv kept; a later --repo with another URL
    fetches from that URL."""
    first = _repo_with_one_file(tmp_path / "first", "one")
    second = _repo_with_one_file(tmp_path / "second", "two")
    home = tmp_path / "home"
    (home / "tpt_jax/.venv/bin").mkdir(parents=True)
    (home / "tpt_jax/a.txt").write_text("shipped")
    (home / ".local/bin").mkdir(parents=True)
    for stub in (home / "tpt_jax/.venv/bin/python", home / ".local/bin/uv"):  # install: no-ops
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    env = {**os.environ, "HOME": str(home)}

    def setup(url, commit):
        (line,) = _dry("setup.sh", "--repo", url, "--commit", commit)
        result = subprocess.run(["bash", "-c", _remote(line)], env=env, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr

    setup(str(tmp_path / "first"), first)
    assert _git(home / "tpt_jax", "rev-parse", "HEAD") == first
    assert (home / "tpt_jax/a.txt").read_text() == "one"
    assert (home / "tpt_jax/.venv/bin/python").exists()
    setup(str(tmp_path / "second"), second)
    assert _git(home / "tpt_jax", "rev-parse", "HEAD") == second
    assert _git(home / "tpt_jax", "remote", "get-url", "origin") == str(tmp_path / "second")
    assert (home / "tpt_jax/a.txt").read_text() == "two"


def test_setup_and_relaunch_resolve_the_commit_first(tmp_path):
    """--commit takes any revision of the checkout: a branch with '/' names the tarball by its
    hash (the archive is written), HEAD still warns of uncommitted changes, and relaunch.sh ships
    the hash it resolved at the start to every recreation."""
    checkout = tmp_path / "checkout"
    (checkout / "tpu_scripts").mkdir(parents=True)
    for script in glob.glob(os.path.join(SCRIPTS, "*.sh")):
        with open(script) as f:
            (checkout / "tpu_scripts" / os.path.basename(script)).write_text(f.read())
    _git(checkout, "init", "--quiet")
    _git(checkout, "add", ".")
    _git(checkout, "commit", "--quiet", "-m", "scripts")
    _git(checkout, "branch", "team/feature")
    head = _git(checkout, "rev-parse", "HEAD")
    bin_dir, tmp = tmp_path / "bin", tmp_path / "tmp"
    bin_dir.mkdir()
    tmp.mkdir()
    (bin_dir / "gcloud").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "gcloud").chmod(0o755)
    env = {**os.environ, "TMPDIR": str(tmp), "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def script(name, *args):
        return subprocess.run(["bash", str(checkout / "tpu_scripts" / name), *BASE, *args],
                              capture_output=True, text=True, env=env, timeout=60)  # fmt: skip

    dry = script("setup.sh", "--dry-run", "--commit", "team/feature")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == (
        f"git -C {checkout} archive --format=tar.gz --output={tmp}/tpt_jax-{head}.tar.gz {head}"
    )
    shipped = script("setup.sh", "--commit", "team/feature")  # git archive really writes it
    assert shipped.returncode == 0, shipped.stderr
    assert os.listdir(tmp) == []  # and the tarball is removed once copied
    (checkout / "tpu_scripts/teardown.sh").write_text("# changed\n")
    assert "uncommitted changes are not shipped" in script("setup.sh", "--dry-run").stderr
    assert (
        "uncommitted changes are not shipped"
        in script("setup.sh", "--dry-run", "--commit", "HEAD").stderr
    )
    lines = script("relaunch.sh", "--dry-run", "--accelerator-type", "v5p-8", "--repo", "r",
                   "--commit", "team/feature", "--", "train", "c.yaml").stdout.splitlines()  # fmt: skip
    assert f"git checkout --quiet --force {head};" in lines[3]
    missing = script("setup.sh", "--dry-run", "--commit", "no-such-branch")
    assert missing.returncode == 2 and "--commit 'no-such-branch' is not a commit" in missing.stderr


def test_setup_can_mount_a_bucket():
    (line,) = _dry("setup.sh", "--repo", "r", "--commit", COMMIT, "--gcsfuse", "my-bucket")
    assert line.endswith(
        'sudo mkdir -p /mnt/gcs/my-bucket; sudo chown "$USER" /mnt/gcs/my-bucket; '
        "mountpoint -q /mnt/gcs/my-bucket || gcsfuse --implicit-dirs my-bucket /mnt/gcs/my-bucket'"
    )
    assert "https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" in line
    result = _run("setup.sh", "--dry-run", *BASE, "--gcsfuse", "gs://b")
    assert result.returncode == 2 and "--gcsfuse takes a bucket name" in result.stderr


def _remote(line):
    """The shell text a dry-run line sends to the workers (its --command=...)."""
    return subprocess.run(
        ["bash", "-c", f"set -- {line}; for a; do case $a in --command=*) echo -n \"${{a#--command=}}\";; esac; done"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip


def _is_tpt(pid):
    """Whether process `pid` runs tpt (a zombie, awaiting its reaper, has an empty cmdline)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"tpt" in f.read()
    except FileNotFoundError:
        return False


def _worker(tmp_path):
    """A worker's environment for running the scripts' remote commands here with bash: HOME with
    a fake ~/tpt_jax/.venv/bin/tpt (prints its arguments; `long` runs until SIGTERM, then exits
    0; `train X sigterm` exits 0 as a SIGTERM-stopped run does; `train` otherwise prints the
    completion line; exit status $CODE) and no metadata server. Returns (home, env)."""
    home = tmp_path / "home"
    (home / "tpt_jax/.venv/bin").mkdir(parents=True)
    tpt = home / "tpt_jax/.venv/bin/tpt"
    tpt.write_text(
        '#!/bin/bash\necho "args: $*"\n'
        "if [ \"$1\" = long ]; then trap 'echo stopped; exit 0' TERM; "
        "while :; do sleep 0.05; done; fi\n"
        '[ "$3" = sigterm ] && exit 0\n'
        '[ "$1" = train ] && echo \'tpt: run complete\'\nexit "${CODE:-0}"\n'
    )
    tpt.chmod(0o755)
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "curl").write_text("#!/bin/sh\nexit 7\n")  # no metadata server here
    (fake_bin / "curl").chmod(0o755)
    return home, {**os.environ, "HOME": str(home), "PATH": f"{fake_bin}:{os.environ['PATH']}"}


def _launch_on(env, run, *args):
    (line,) = _dry("launch.sh", "--run", run, *args)
    subprocess.run(["bash", "-c", _remote(line)], env=env, check=True, timeout=60)


def _settled_state(env, probe):
    """The probe's line once the run has started and ended (neither running nor none)."""
    for _ in range(200):
        out = subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True)
        if "running" not in out.stdout and "none" not in out.stdout:
            return out.stdout.strip()
        time.sleep(0.05)
    return out.stdout.strip()


def test_worker_side_launch_records_exit_status_and_replaces_a_running_run(tmp_path):
    """launch.sh's and relaunch.sh's worker commands, run here by bash with a fake tpt: the exit
    status lands in ~/tpt_logs/RUN.exit, the probe reads it, and a new launch stops the old run."""
    home, env = _worker(tmp_path)
    # relaunch's probe for `train`: exit 0 is done only with "tpt: run complete" in the log.
    probe = _remote(_dry("relaunch.sh", "--accelerator-type", "v5p-8", "--run", "r", "--commit",
                         COMMIT, "--repo", "u", "--", "train", "c.yaml")[1])  # fmt: skip

    def launch(*args):
        _launch_on(env, "r", *args)

    def state():
        return _settled_state(env, probe)

    launch("--env", "CODE=3", "--", "eval", "a b")
    assert state() == "tpt-state: failed 3 ?"
    assert (home / "tpt_logs/r.log").read_text() == "args: eval a b\n"
    launch("--", "eval")  # exit 0 without the line: a SIGTERM stop, to be resumed
    assert state() == "tpt-state: stopped 0 ?"
    launch("--", "long")
    for _ in range(200):  # until the wrapper has written its pid file
        running = subprocess.run(["bash", "-c", probe], env=env, capture_output=True, text=True)
        if "none" not in running.stdout:
            break
        time.sleep(0.05)
    assert running.stdout.strip() == "tpt-state: running - ?"
    old_tpt = int((home / "tpt_logs/r.pid").read_text().split()[1])
    launch("--", "train", "c.yaml")  # stops `long` (SIGTERM) before starting
    assert state() == "tpt-state: done 0 ?"
    assert not _is_tpt(old_tpt)
    assert (home / "tpt_logs/r.log").read_text() == "args: train c.yaml\ntpt: run complete\n"


def test_a_new_launch_leaves_alone_the_pid_of_a_run_that_ended(tmp_path):
    """The previous run's wrapper wrote RUN.exit and ended; its pid may be another process now."""
    home, env = _worker(tmp_path)
    _launch_on(env, "r", "--", "eval")
    for _ in range(200):
        if (home / "tpt_logs/r.exit").exists():
            break
        time.sleep(0.05)
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        (home / "tpt_logs/r.pid").write_text(f"{bystander.pid} {bystander.pid}\n")
        _launch_on(env, "r", "--", "eval")
        time.sleep(0.5)
        assert bystander.poll() is None  # not killed
    finally:
        bystander.kill()


def test_status_tells_a_train_run_stopped_by_sigterm_from_a_finished_one(tmp_path):
    """status.sh's probe knows the run's sub-command from launch.sh's ~/tpt_logs/RUN.cmd, whatever
    the run is called: a `train` exiting 0 without "tpt: run complete" was stopped, not done."""
    home, env = _worker(tmp_path)

    def status(run):
        return _settled_state(env, _remote(_dry("status.sh", "--run", run)[-1]))

    _launch_on(env, "pretrain", "--", "train", "c.yaml", "sigterm")
    assert status("pretrain") == "tpt-state: stopped 0 ?"
    assert (home / "tpt_logs/pretrain.cmd").read_text() == "train\n"
    _launch_on(env, "pretrain", "--", "train", "c.yaml")
    assert status("pretrain") == "tpt-state: done 0 ?"
    _launch_on(env, "heldout", "--", "eval", "c.yaml")  # eval prints no completion line
    assert status("heldout") == "tpt-state: done 0 ?"
    (home / "tpt_logs/heldout.cmd").unlink()  # launched before launch.sh wrote .cmd: unknown,
    assert status("heldout") == "tpt-state: stopped 0 ?"  # so done only with the line


def test_single_host():
    assert _dry("create.sh", "--accelerator-type", "v6e-8") == [
        f"gcloud compute tpus tpu-vm create tpt {WHERE} --accelerator-type=v6e-8 "
        "--version=v2-alpha-tpuv6e"
    ]
    assert _dry("launch.sh", "--", "think", "configs/experiments/think_qwen3-8b.yaml") == [
        _ssh("tpt", _launch_command("think", " .venv/bin/tpt think "
                                    "configs/experiments/think_qwen3-8b.yaml", "think"))
    ]  # fmt: skip
    assert _dry("logs.sh", "--collect", "out", "--accelerator-type", "v6e-8") == [
        "mkdir -p out/tpt",
        f"gcloud compute tpus tpu-vm scp 'tpt:~/tpt_logs/train.log' out/tpt/worker-0.log {WHERE} "
        "--worker=0",
    ]
    assert _dry("logs.sh", "--run", "think", "--worker", "0") == [
        _ssh("tpt", "tail -n 200 -f ~/tpt_logs/think.log", worker="0")
    ]
    assert _dry("teardown.sh") == [f"gcloud compute tpus tpu-vm delete tpt {WHERE} --quiet"]


def test_pod_slice_on_spot_capacity():
    assert _dry("create.sh", "--accelerator-type", "v5p-128", "--spot") == [
        f"gcloud compute tpus queued-resources create tpt {WHERE} --accelerator-type=v5p-128 "
        "--runtime-version=v2-alpha-tpuv5 --node-id=tpt --spot"
    ]
    launch = _dry("launch.sh", "--run", "pretrain", "--env", "TPT_X=1", "--", "train", "c.yaml",
                  "train.steps=10")  # fmt: skip
    assert launch == [
        _ssh("tpt", _launch_command("pretrain", " TPT_X=1 .venv/bin/tpt train c.yaml "
                                    "train.steps=10"))
    ]  # fmt: skip
    # gcloud copies from one worker per call towards this machine: 16 calls, one per host.
    assert _dry("logs.sh", "--collect", "out", "--accelerator-type", "v5p-128") == [
        "mkdir -p out/tpt",
        *(
            f"gcloud compute tpus tpu-vm scp 'tpt:~/tpt_logs/train.log' out/tpt/worker-{w}.log "
            f"{WHERE} --worker={w}"
            for w in range(16)
        ),
    ]
    assert _dry("logs.sh", "--collect", "out", "--workers", "16") == _dry(
        "logs.sh", "--collect", "out", "--accelerator-type", "v5p-128"
    )
    assert _dry("teardown.sh", "--queued") == [
        f"gcloud compute tpus queued-resources delete tpt {WHERE} --force --quiet"
    ]


def test_logs_without_a_worker_count_asks_gcloud():
    result = _run("logs.sh", "--dry-run", *BASE, "--collect", "out")
    assert result.stdout.splitlines() == [
        f"gcloud compute tpus tpu-vm describe tpt {WHERE} '--format=value(acceleratorType)'"
    ]
    assert result.returncode == 2 and "needs --accelerator-type or --workers" in result.stderr


def test_multi_slice():
    assert _dry("create.sh", "--accelerator-type", "v5p-128", "--slices", "2",
                "--reservation") == [
        f"gcloud compute tpus queued-resources create tpt {WHERE} --accelerator-type=v5p-128 "
        "--runtime-version=v2-alpha-tpuv5 --node-count=2 --node-prefix=tpt --reserved"
    ]  # fmt: skip
    setup = _dry("setup.sh", "--slices", "2", "--repo", "r", "--commit", COMMIT)
    assert [line.split(f" {WHERE}")[0] for line in setup] == [
        "gcloud compute tpus tpu-vm ssh tpt-0",
        "gcloud compute tpus tpu-vm ssh tpt-1",
    ]
    launch = _dry("launch.sh", "--slices", "2", "--", "train", "c.yaml")
    assert launch == [
        f"gcloud compute tpus tpu-vm describe tpt-0 {WHERE} "
        "'--format=value(networkEndpoints[0].ipAddress)'",
        *(
            _ssh(f"tpt-{s}", _launch_command(
                "train", " MEGASCALE_COORDINATOR_ADDRESS=\\<ip\\ of\\ worker\\ 0\\ of\\ tpt-0\\>:8080 "
                f"MEGASCALE_NUM_SLICES=2 MEGASCALE_SLICE_ID={s} MEGASCALE_PORT=8080 "
                ".venv/bin/tpt train c.yaml"))
            for s in range(2)
        ),
    ]  # fmt: skip
    collect = _dry("logs.sh", "--slices", "2", "--collect", "out", "--accelerator-type", "v5p-128")
    assert collect == [
        line
        for s in range(2)
        for line in [
            f"mkdir -p out/tpt-{s}",
            *(
                f"gcloud compute tpus tpu-vm scp 'tpt-{s}:~/tpt_logs/train.log' "
                f"out/tpt-{s}/worker-{w}.log {WHERE} --worker={w}"
                for w in range(16)
            ),
        ]
    ]
    assert _dry("logs.sh", "--slices", "2", "--slice", "1", "--worker", "15") == [
        _ssh("tpt-1", "tail -n 200 -f ~/tpt_logs/train.log", worker="15")
    ]
    assert _dry("teardown.sh", "--slices", "2") == [
        f"gcloud compute tpus queued-resources delete tpt {WHERE} --force --quiet"
    ]
    status = _dry("status.sh", "--slices", "2")
    assert [line.split(f" {WHERE}")[0] for line in status] == [
        "gcloud compute tpus queued-resources describe tpt",
        "gcloud compute tpus tpu-vm describe tpt-0",
        "gcloud compute tpus tpu-vm describe tpt-1",
        "gcloud compute tpus tpu-vm ssh tpt-0",
        "gcloud compute tpus tpu-vm ssh tpt-1",
    ]
    assert all("tpt-state: running" in line for line in status[3:])


def test_create_passes_network_and_identity_flags():
    flags = ["--network", "net", "--subnetwork", "sub", "--service-account", "sa@p.iam",
             "--scopes", "cloud-platform", "--tags", "a,b", "--metadata", "k=v",
             "--labels", "team=x", "--internal-ips"]  # fmt: skip
    expected = (
        "--network=net --subnetwork=sub --service-account=sa@p.iam --scopes=cloud-platform "
        "--tags=a,b --metadata=k=v --labels=team=x --internal-ips"
    )
    assert _dry("create.sh", "--accelerator-type", "v5litepod-16", *flags) == [
        f"gcloud compute tpus tpu-vm create tpt {WHERE} --accelerator-type=v5litepod-16 "
        f"--version=v2-alpha-tpuv5-lite {expected}"
    ]
    assert _dry(
        "create.sh", "--accelerator-type", "v4-32", "--queued", "--version", "x", *flags
    ) == [
        f"gcloud compute tpus queued-resources create tpt {WHERE} --accelerator-type=v4-32 "
        f"--runtime-version=x --node-id=tpt {expected}"
    ]


def test_relaunch_round():
    lines = _dry("relaunch.sh", "--accelerator-type", "v5p-128", "--spot", "--repo", "r",
                 "--commit", COMMIT, "--network", "net", "--internal-ips", "--", "train",
                 "c.yaml")  # fmt: skip
    assert [line.split(" tpt ")[0] for line in lines] == [
        "gcloud compute tpus queued-resources describe",
        "gcloud compute tpus tpu-vm ssh",  # each worker's run state
        "gcloud compute tpus queued-resources create",
        "gcloud compute tpus tpu-vm ssh",  # setup
        "gcloud compute tpus tpu-vm ssh",  # launch
    ]
    assert "tpt-state:" in lines[1] and "tpt train c.yaml" in lines[4]
    assert lines[2].endswith(" --spot --network=net --internal-ips")  # kept for every recreation


# A stand-in for gcloud: answers `queued-resources describe`, `tpu-vm describe` (NOT_FOUND unless
# scripted), the run-state ssh and the setup ssh's exit status (0 unless scripted) from scripted
# lists (one entry per call, the last one repeated), `tail` with two log lines, anything else with
# nothing; records every call's arguments, and warns on stderr of an update, as gcloud does.
FAKE_GCLOUD = textwrap.dedent(
    """\
    import json, os, sys
    folder = os.environ["FAKE_GCLOUD"]
    args = sys.argv[1:]
    with open(os.path.join(folder, "calls.jsonl"), "a") as f:
        f.write(json.dumps(args) + "\\n")
    command = next((a for a in args if a.startswith("--command=")), "")
    print("WARNING: Some update is available; run gcloud components update", file=sys.stderr)

    def answer(kind, default):
        if not os.path.exists(os.path.join(folder, kind + ".json")):
            return default
        with open(os.path.join(folder, kind + ".json")) as f:
            script = json.load(f)
        counter = os.path.join(folder, kind + ".count")
        n = int(open(counter).read()) if os.path.exists(counter) else 0
        open(counter, "w").write(str(n + 1))
        return script[min(n, len(script) - 1)]

    if args[:2] == ["compute", "tpus"] and args[3] == "describe":
        state = answer("describe" if args[2] == "queued-resources" else "vm", "NOT_FOUND")
        if state in ("NOT_FOUND", "UNREACHABLE"):
            print(f"ERROR: (gcloud.compute.tpus.{args[2]}.describe) {state}", file=sys.stderr)
            sys.exit(1)
        print(state)
    elif "tpt-state:" in command:
        for line in answer("probe", []):
            print("tpt-state: " + line)
    elif "uv pip install" in command:
        sys.exit(answer("setup", 0))
    elif command.startswith("--command=tail"):
        print("step 7: loss nan")
        print("tpt: error: the loss is not finite")
    """
)


def _relaunch(tmp_path, describe, probe, *extra, vm=None, setup=None):
    """Runs relaunch.sh (v5p-16: 2 workers, poll 0 s) against the fake gcloud: its result and the
    gcloud calls it made, each reduced to its kind. `vm` scripts `tpu-vm describe`, `setup` the
    setup ssh's exit statuses."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "gcloud").write_text(f"#!{sys.executable}\n" + FAKE_GCLOUD)
    (bin_dir / "gcloud").chmod(0o755)
    (tmp_path / "describe.json").write_text(json.dumps(describe))
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    for kind, script in (("vm", vm), ("setup", setup)):
        if script is not None:
            (tmp_path / f"{kind}.json").write_text(json.dumps(script))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD": str(tmp_path)}
    result = _run("relaunch.sh", *BASE, "--accelerator-type", "v5p-16", "--spot", "--repo", "r",
                  "--commit", COMMIT, "--poll", "0", *extra, "--", "train", "c.yaml",
                  env=env, timeout=120)  # fmt: skip
    calls = []
    for line in (tmp_path / "calls.jsonl").read_text().splitlines():
        args = json.loads(line)
        command = next((a for a in args if a.startswith("--command=")), "")
        if "tpt-state:" in command:
            calls.append("probe")
        elif "uv pip install" in command:
            calls.append("setup")
        elif ".venv/bin/tpt" in command:
            calls.append("launch")
        elif command.startswith("--command=tail"):
            calls.append("tail " + next(a for a in args if a.startswith("--worker=")))
        else:
            calls.append(" ".join(args[2:4]))
    return result, calls


def test_relaunch_reads_the_state_apart_from_gcloud_warnings(tmp_path):
    """gcloud's warnings on stderr are not part of the queued resource's state: ACTIVE is seen."""
    result, calls = _relaunch(
        tmp_path, ["ACTIVE"], [["none - 0", "none - 1"], ["done 0 0", "done 0 1"]]
    )
    assert result.returncode == 0, result.stderr
    assert "WARNING: Some update is available" in result.stderr  # the fake did warn
    assert "is ACTIVE; setting up and launching train" in result.stdout
    assert calls[:4] == ["queued-resources describe", "probe", "setup", "launch"]


def test_relaunch_refuses_a_tpu_vm_without_a_queued_resource(tmp_path):
    """A TPU VM created without a queued resource is named and refused at the start, never
    clashed with by `queued-resources create`; a queued resource's VM still being deleted after
    the resource is gone is waited for."""
    result, calls = _relaunch(tmp_path, ["NOT_FOUND"], [], vm=["READY"])
    assert result.returncode == 2
    assert calls == ["queued-resources describe", "tpu-vm describe"]
    assert result.stderr.strip().splitlines()[-1] == (
        "relaunch.sh: error: tpt is a TPU VM without a queued resource (create.sh without "
        "--spot, --queued or --slices); relaunch.sh watches queued resources: delete it "
        "(teardown.sh) and create it with create.sh --queued, or watch it with status.sh"
    )
    result, calls = _relaunch(
        tmp_path / "later",
        ["SUSPENDED", "NOT_FOUND", "NOT_FOUND", "ACTIVE"],
        [["none - 0", "none - 1"], ["done 0 0", "done 0 1"]],
        vm=["DELETING", "NOT_FOUND"],
    )
    assert result.returncode == 0, result.stderr
    assert calls[:8] == [
        "queued-resources describe", "queued-resources delete", "queued-resources create",
        "queued-resources describe", "tpu-vm describe",  # its VM is still there: wait
        "queued-resources describe", "tpu-vm describe", "queued-resources create",
    ]  # fmt: skip
    assert "its TPU VM is still there (DELETING); waiting" in result.stdout


def test_relaunch_stops_at_once_on_a_user_error(tmp_path):
    """tpt exits 2 on a user error (a config key, a checkpoint of other settings): relaunching
    cannot help, so relaunch.sh stops at the first one (even beside another worker's failure),
    with the reason and that worker's log tail."""
    result, calls = _relaunch(
        tmp_path, ["ACTIVE"], [["none - 0", "none - 1"], ["failed 1 0", "failed 2 1"]]
    )
    assert result.returncode == 1
    assert calls == [
        "queued-resources describe", "probe", "setup", "launch",
        "queued-resources describe", "probe", "tail --worker=1",
    ]  # fmt: skip
    assert (
        "relaunch.sh: error: train exited with status 2 on tpt worker 1: a user error (config or "
        "checkpoint settings); not relaunching" in result.stderr
    )
    assert "tpt: error: the loss is not finite" in result.stderr


def test_relaunch_sets_up_again_when_tpt_is_missing_without_using_restarts(tmp_path):
    """Exit 127 (no ~/tpt_jax/.venv/bin/tpt: setup did not finish) runs setup again before the
    launch, and is no restart: even with --max-restarts 0 the run goes on."""
    result, calls = _relaunch(
        tmp_path,
        ["ACTIVE"],
        [["none - 0", "none - 1"], ["failed 127 0", "failed 127 1"], ["running - 0", "running - 1"],
         ["done 0 0", "done 0 1"]],
        "--max-restarts", "0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert calls == [
        "queued-resources describe", "probe", "setup", "launch",
        "queued-resources describe", "probe", "setup", "launch",
        "queued-resources describe", "probe",
        "queued-resources describe", "probe",
    ]  # fmt: skip
    assert "tpt is not installed on tpt worker 0 (exit 127)" in result.stdout


def test_relaunch_retries_a_failed_setup_before_launching(tmp_path):
    """A setup that failed is retried at the next round, and nothing is launched on a half-set-up
    slice; three failed setups in a row stop relaunch.sh."""
    result, calls = _relaunch(
        tmp_path, ["ACTIVE"], [["none - 0", "none - 1"], ["none - 0", "none - 1"],
                               ["done 0 0", "done 0 1"]], setup=[1, 0],
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert calls == [
        "queued-resources describe", "probe", "setup",
        "queued-resources describe", "probe", "setup", "launch",
        "queued-resources describe", "probe",
    ]  # fmt: skip
    assert "relaunch: setup.sh failed; setting up again at the next round" in result.stderr
    result, calls = _relaunch(tmp_path / "never", ["ACTIVE"], [["none - 0", "none - 1"]], setup=[1])
    assert result.returncode == 1 and calls.count("setup") == 3 and "launch" not in calls
    assert "train did not start after 3 setups in a row" in result.stderr


def test_relaunch_resets_the_restart_count_after_progress(tmp_path):
    """A run seen running at two polls in a row (a full poll interval) has made progress: its
    earlier restarts no longer count against --max-restarts."""
    result, calls = _relaunch(
        tmp_path,
        ["ACTIVE"],
        [["none - 0", "none - 1"], ["failed 1 0", "running - 1"], ["running - 0", "running - 1"],
         ["running - 0", "running - 1"], ["running - 0", "failed 1 1"],
         ["running - 0", "running - 1"], ["done 0 0", "done 0 1"]],
        "--max-restarts", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert calls.count("launch") == 3 and calls.count("setup") == 1
    assert result.stdout.count("launching again (restart 1 of 1)") == 2


def test_relaunch_stops_with_success_when_every_worker_finished(tmp_path):
    result, calls = _relaunch(
        tmp_path,
        ["ACTIVE"],
        [["none - 0", "none - 1"], ["running - 0", "running - 1"], ["done 0 0", "done 0 1"]],
    )
    assert result.returncode == 0, result.stderr
    assert "relaunch: train finished on all 2 workers" in result.stdout
    assert calls == [
        "queued-resources describe", "probe", "setup", "launch",
        "queued-resources describe", "probe",
        "queued-resources describe", "probe",
    ]  # fmt: skip


def test_relaunch_restarts_a_failed_run_then_gives_up(tmp_path):
    result, calls = _relaunch(
        tmp_path,
        ["ACTIVE"],
        [["none - 0", "none - 1"], ["running - 0", "failed 1 1"]],
        "--max-restarts", "2",
    )  # fmt: skip
    assert result.returncode == 1
    assert calls == [
        "queued-resources describe", "probe", "setup", "launch",
        "queued-resources describe", "probe", "launch",  # restart 1: no new setup
        "queued-resources describe", "probe", "launch",  # restart 2
        "queued-resources describe", "probe", "tail --worker=1",
    ]  # fmt: skip
    assert result.stdout.count("exited with status 1 on tpt worker 1; launching again") == 2
    assert (
        "relaunch.sh: error: train exited with status 1 on tpt worker 1; stopping after 2 restarts"
        in result.stderr
    )
    assert "tpt: error: the loss is not finite" in result.stderr


def test_relaunch_relaunches_a_run_stopped_early_on_a_healthy_slice(tmp_path):
    result, calls = _relaunch(
        tmp_path,
        ["ACTIVE"],
        [["none - 0", "none - 1"], ["stopped 0 0", "stopped 0 1"], ["done 0 0", "done 0 1"]],
    )
    assert result.returncode == 0, result.stderr
    assert calls.count("launch") == 2 and calls.count("setup") == 1
    assert "stopped early" in result.stdout


def test_relaunch_recreates_a_preempted_queued_resource(tmp_path):
    result, calls = _relaunch(
        tmp_path,
        ["ACTIVE", "SUSPENDED", "NOT_FOUND", "UNREACHABLE", "ACTIVE"],
        [["running - 0", "running - 1"], ["none - 0", "none - 1"], ["done 0 0", "done 0 1"]],
    )
    assert result.returncode == 0, result.stderr
    assert calls == [
        "queued-resources describe", "probe",  # already running: watched, not launched again
        "queued-resources describe", "queued-resources delete", "queued-resources create",
        "queued-resources describe", "tpu-vm describe",  # gone, and its VM too:
        "queued-resources create",  # created again
        "queued-resources describe",  # the API did not answer: wait, never recreate
        "queued-resources describe", "probe", "setup", "launch",
        "queued-resources describe", "probe",
    ]  # fmt: skip
    assert "queued resource tpt is SUSPENDED; recreating (recreation 1 of 20)" in result.stdout


def test_relaunch_waits_while_a_worker_does_not_answer(tmp_path):
    result, calls = _relaunch(tmp_path, ["ACTIVE"], [["done 0 0"], ["done 0 0", "done 0 1"]])
    assert result.returncode == 0, result.stderr
    assert "1 of 2 workers answered; waiting" in result.stdout
    assert "launch" not in calls


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zone", "z", "--name", "n", "--accelerator-type", "v5p-8"], "missing --project"),
        (["--project", "p", "--name", "n", "--accelerator-type", "v5p-8"], "missing --zone"),
        (["--project", "p", "--zone", "z", "--accelerator-type", "v5p-8"], "missing --name"),
        (["--project", "p", "--zone", "z", "--name", "n"], "missing --accelerator-type"),
        ([*BASE, "--accelerator-type", "v5p-8", "--slices", "0"], "--slices must be"),
        ([*BASE, "--accelerator-type", "v5p-8", "--bogus"], "unknown argument: --bogus"),
        ([*BASE, "--accelerator-type", "v9x-8"], "no default TPU software version"),
        ([*BASE, "--accelerator-type", "v5p-8", "--network"], "--network needs a value"),
    ],
)
def test_missing_or_bad_options_are_named(args, message):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPT_")}
    result = subprocess.run(
        ["bash", os.path.join(SCRIPTS, "create.sh"), *args, "--dry-run"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stdout == ""
