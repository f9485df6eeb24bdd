"""tpu_scripts: shellcheck-clean; --dry-run prints the exact gcloud commands for a single host,
a pod slice and a multi-slice queued resource; missing options are named."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(ROOT, "tpu_scripts")
BASE = ["--project", "proj", "--zone", "us-east5-a", "--name", "tpt"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _run(script, *args):
    return subprocess.run(
        ["bash", os.path.join(SCRIPTS, script), *args], capture_output=True, text=True, timeout=60
    )


def _dry(script, *args):
    result = _run(script, "--dry-run", *BASE, *args)
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


def test_single_host():
    assert _dry("create.sh", "--accelerator-type", "v6e-8") == [
        "gcloud compute tpus tpu-vm create tpt --project=proj --zone=us-east5-a "
        "--accelerator-type=v6e-8 --version=v2-alpha-tpuv5"
    ]
    setup = _dry("setup.sh", "--repo", "https://github.com/o/tpt_jax.git", "--commit", COMMIT)
    assert len(setup) == 1
    assert setup[0].startswith(
        "gcloud compute tpus tpu-vm ssh tpt --project=proj --zone=us-east5-a --worker=all '--command="
    )
    assert f"git checkout --quiet {COMMIT}" in setup[0] and ".venv/bin/pip install" in setup[0]
    launch = _dry("launch.sh", "--", "think", "configs/experiments/think_qwen3-8b.yaml")
    assert launch == [
        "gcloud compute tpus tpu-vm ssh tpt --project=proj --zone=us-east5-a --worker=all "
        "'--command=mkdir -p ~/tpt_logs; cd ~/tpt_jax; nohup env .venv/bin/tpt think "
        "configs/experiments/think_qwen3-8b.yaml > ~/tpt_logs/think.log 2>&1 &'"
    ]
    assert _dry("teardown.sh") == [
        "gcloud compute tpus tpu-vm delete tpt --project=proj --zone=us-east5-a --quiet"
    ]


def test_pod_slice_on_spot_capacity():
    assert _dry("create.sh", "--accelerator-type", "v5p-128", "--spot") == [
        "gcloud compute tpus queued-resources create tpt --project=proj --zone=us-east5-a "
        "--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 --node-id=tpt --spot"
    ]
    launch = _dry("launch.sh", "--run", "pretrain", "--env", "TPT_X=1", "--", "train", "c.yaml",
                  "train.steps=10")  # fmt: skip
    assert launch == [
        "gcloud compute tpus tpu-vm ssh tpt --project=proj --zone=us-east5-a --worker=all "
        "'--command=mkdir -p ~/tpt_logs; cd ~/tpt_jax; nohup env TPT_X=1 .venv/bin/tpt train "
        "c.yaml train.steps=10 > ~/tpt_logs/pretrain.log 2>&1 &'"
    ]
    assert _dry("teardown.sh", "--queued") == [
        "gcloud compute tpus queued-resources delete tpt --project=proj --zone=us-east5-a "
        "--force --quiet"
    ]


def test_multi_slice():
    assert _dry("create.sh", "--accelerator-type", "v5p-256", "--slices", "2",
                "--reservation") == [
        "gcloud compute tpus queued-resources create tpt --project=proj --zone=us-east5-a "
        "--accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5 --node-count=2 "
        "--node-prefix=tpt --reserved"
    ]  # fmt: skip
    setup = _dry("setup.sh", "--slices", "2", "--repo", "r", "--commit", COMMIT)
    assert [line.split(" --project")[0] for line in setup] == [
        "gcloud compute tpus tpu-vm ssh tpt-0",
        "gcloud compute tpus tpu-vm ssh tpt-1",
    ]
    launch = _dry("launch.sh", "--slices", "2", "--", "train", "c.yaml")
    assert launch[0] == (
        "gcloud compute tpus tpu-vm describe tpt-0 --project=proj --zone=us-east5-a "
        "'--format=value(networkEndpoints[0].ipAddress)'"
    )
    for slice_id, line in enumerate(launch[1:]):
        assert line.startswith(f"gcloud compute tpus tpu-vm ssh tpt-{slice_id} ")
        assert f"MEGASCALE_NUM_SLICES=2 MEGASCALE_SLICE_ID={slice_id} " in line
    assert _dry("teardown.sh", "--slices", "2")[0].startswith(
        "gcloud compute tpus queued-resources delete tpt "
    )
    status = _dry("status.sh", "--slices", "2")
    assert status[0].startswith("gcloud compute tpus queued-resources describe tpt ")
    assert len(status) == 5  # queued resource, 2 VMs, 2 process listings


def test_relaunch_round():
    lines = _dry("relaunch.sh", "--accelerator-type", "v5p-128", "--spot", "--repo", "r",
                 "--commit", COMMIT, "--", "train", "c.yaml")  # fmt: skip
    assert [line.split(" tpt ")[0] for line in lines] == [
        "gcloud compute tpus queued-resources describe",
        "gcloud compute tpus queued-resources create",
        "gcloud compute tpus tpu-vm ssh",
        "gcloud compute tpus tpu-vm ssh",
    ]
    assert "--spot" in lines[1] and "train c.yaml" in lines[3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--zone", "z", "--name", "n", "--accelerator-type", "v5p-8"], "missing --project"),
        (["--project", "p", "--name", "n", "--accelerator-type", "v5p-8"], "missing --zone"),
        (["--project", "p", "--zone", "z", "--accelerator-type", "v5p-8"], "missing --name"),
        (["--project", "p", "--zone", "z", "--name", "n"], "missing --accelerator-type"),
        ([*BASE, "--accelerator-type", "v5p-8", "--slices", "0"], "--slices must be"),
        ([*BASE, "--accelerator-type", "v5p-8", "--bogus"], "unknown argument: --bogus"),
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
