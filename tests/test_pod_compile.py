"""Pod scale, proven by compilation: libtpu (the real TPU compiler, no TPU needed) compiles the
train step for the slices the configs name, and the executables are read for memory per chip,
collectives and attention kernels.

- every pod config in configs/experiments fits its slice with >= 10% HBM to spare, and its step
  is FSDP: each layer's weights cross the fsdp axis every step, no collective carries activations
  of the global batch, and attention runs as splash kernels;
- tensor parallelism and multi-slice (DCN) meshes compile with collectives on the axes they name;
- `tpt compile` prints memory against HBM, the collective table and MFU, and a step that does not
  fit stops with its numbers;
- the HBM figures tpt_jax assumes per chip are the ones the compiler enforces.
"""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tpt_jax.config import load_config, to_dict
from tpt_jax.errors import TptError
from tpt_jax.model import param_shapes
from tpt_jax.parallel import CHIPS, topology_devices
from tpt_jax.train import compile_for_topology, compile_trainer, format_report

REPO = Path(__file__).resolve().parent.parent
EXPERIMENTS = REPO / "configs" / "experiments"
GATHERS = ("all-gather", "all-reduce", "reduce-scatter")


def _pod_configs() -> list[Path]:
    """The training configs that name a slice, one per distinct compiled step (vanilla and TPT
    twins share theirs). Thinking configs (think.corpus set) size generation, not training."""
    seen, unique = set(), []
    for path in sorted(EXPERIMENTS.glob("*.yaml")):
        cfg = load_config(str(path))
        if not cfg.mesh.topology or cfg.think.corpus.paths:
            continue
        step = {k: to_dict(cfg)[k] for k in ("model", "mesh", "optimizer")}
        step["train"] = (cfg.train.global_batch, cfg.train.seq_len)
        key = json.dumps(step, sort_keys=True)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _fsdp_evidence(report, cfg) -> None:
    shapes = param_shapes(cfg.model)
    layer_params = sum(x.size for x in jax.tree.leaves(shapes["layers"]))
    largest_param = max(x.size * 4 for x in jax.tree.leaves(shapes))
    over_fsdp = [c for c in report.collectives if "fsdp" in c.axes and c.kind in GATHERS]
    # Forward and backward each bring every layer's bfloat16 weights over fsdp, and the
    # gradients go back: at least twice the layers' bf16 bytes, in per-layer pieces.
    assert sum(c.bytes for c in over_fsdp) >= 2 * 2 * layer_params, format_report(report)
    assert sum(c.count for c in over_fsdp) >= 2 * cfg.model.num_layers, format_report(report)
    # Activations of the global batch never travel: no collective result is larger than the
    # largest parameter (float32).
    assert all(c.largest <= largest_param for c in report.collectives), format_report(report)
    runs = report.kernels
    assert runs.get("splash_mha_fwd_segmented_residuals", 0) >= cfg.model.num_layers, runs


@pytest.mark.parametrize("path", _pod_configs(), ids=lambda p: p.stem)
def test_pod_config_fits_its_slice_with_headroom_and_trains_fsdp(path):
    cfg = load_config(str(path))
    slices = cfg.mesh.dcn_data * cfg.mesh.dcn_fsdp
    report = compile_for_topology(cfg, cfg.mesh.topology, slices, estimate=False)
    assert not report.error, report.error
    assert report.headroom >= 0.10, format_report(report)
    per_chip_tokens = cfg.train.global_batch * cfg.train.seq_len // report.devices
    assert per_chip_tokens >= 8192  # the configs' real shapes, not a toy batch
    _fsdp_evidence(report, cfg)


SMALL = [
    "model.vocab_size=16000",
    "model.hidden_size=512",
    "model.num_layers=3",
    "model.num_heads=8",
    "model.num_kv_heads=4",
    "model.head_dim=64",
    "model.mlp_dim=2048",
    "model.remat_policy=full",
    "train.seq_len=1024",
]


def test_tensor_parallel_step_splits_heads_over_tensor():
    cfg = load_config(
        None, [*SMALL, "mesh.data=1", "mesh.fsdp=-1", "mesh.tensor=2", "train.global_batch=8"]
    )
    report = compile_for_topology(cfg, "v5p-16", estimate=False)  # 8 chips: fsdp 4 x tensor 2
    assert report.mesh["fsdp"] == 4 and report.mesh["tensor"] == 2
    assert report.fits
    assert any(c.axes == ("tensor",) for c in report.collectives), format_report(report)
    _fsdp_evidence(report, cfg)


def test_multislice_step_reduces_gradients_over_dcn():
    cfg = load_config(
        None, [*SMALL, "mesh.dcn_data=2", "mesh.data=1", "mesh.fsdp=-1", "train.global_batch=16"]
    )
    report = compile_for_topology(cfg, "v5p-8", slices=2, estimate=False)
    assert report.devices == 8 and report.fits
    across = [c for c in report.collectives if c.crosses_slices]
    assert across and all("data" in c.axes for c in across), format_report(report)
    # FSDP stays inside a slice: weights are gathered over ICI only.
    assert any(c.axes == ("fsdp",) and not c.crosses_slices for c in report.collectives)


def test_remat_policies_keep_what_they_name():
    """Offloading policies move saved activations to host memory; keeping the attention output
    also keeps splash attention's residuals, so its forward kernel is not run again."""
    reports = {}
    for policy in ("full", "save_dot_except_mlp", "offload_dot_except_mlp"):
        cfg = load_config(
            None,
            [*SMALL[:-2], f"model.remat_policy={policy}", "train.seq_len=1024", "mesh.data=1",
             "mesh.fsdp=-1", "train.global_batch=8"],
        )  # fmt: skip
        reports[policy] = compile_for_topology(cfg, "v5p-8", estimate=False)
    forward = {p: r.kernels["splash_mha_fwd_segmented_residuals"] for p, r in reports.items()}
    assert forward["full"] == 2 * 3 and forward["save_dot_except_mlp"] == 3, forward
    assert reports["offload_dot_except_mlp"].host_temp_bytes > 0
    assert reports["full"].host_temp_bytes == 0
    assert reports["offload_dot_except_mlp"].temp_bytes < reports["save_dot_except_mlp"].temp_bytes


def _tpt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tpt_jax", *args], capture_output=True, text=True, timeout=900
    )


def test_tpt_compile_prints_memory_collectives_and_mfu(tmp_path):
    """...and its estimate counts every layer: the XLA FLOPs it extrapolates from 1- and 2-layer
    compiles equal XLA's count for the same 3-layer step compiled with its loops unrolled."""
    config = tmp_path / "small.yaml"
    config.write_text("mesh: {topology: v5p-8, data: 1, fsdp: -1}\ntrain: {global_batch: 8}\n")
    run = _tpt("compile", str(config), *SMALL)
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    assert "fits in 95.74 GiB HBM" in out, out
    for word in ("temporaries", "peak", "all-", "fsdp", "MFU", "estimated step time"):
        assert word in out, out
    mfu = float(re.search(r"MFU ([\d.]+)%", out).group(1))
    assert 0 < mfu < 100
    estimated = float(re.search(r"XLA optimal_seconds, ([\d.]+e[+-]\d+) FLOPs", out).group(1))
    cfg = load_config(str(config), [*SMALL, "model.scan_unroll=1000"])
    _, devices = topology_devices("v5p-8")
    counted = compile_trainer(cfg, devices).step.cost_analysis()["flops"]
    assert math.isclose(estimated, counted, rel_tol=0.02), (estimated, counted)


def test_tpt_compile_reports_a_step_that_does_not_fit(tmp_path):
    config = tmp_path / "big.yaml"
    config.write_text("mesh: {data: 1, fsdp: -1}\n")
    run = _tpt(
        "compile", str(config), "--topology", "v5litepod-4", "--no-estimate", *SMALL[:-2],
        "model.remat_policy=none", "train.seq_len=8192", "train.global_batch=64",
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert "does NOT fit" in run.stdout and "15.75 GiB" in run.stdout, run.stdout
    assert re.search(r"\d+(\.\d+)?[GT]", run.stdout)  # the memory it would need
    assert "Traceback" not in run.stderr


def test_tpt_compile_without_a_topology_or_libtpu_says_what_to_do(tmp_path, monkeypatch):
    config = tmp_path / "cpu.yaml"
    config.write_text("train: {steps: 1}\n")
    run = _tpt("compile", str(config))
    assert run.returncode == 2 and "--topology" in run.stderr and "Traceback" not in run.stderr
    monkeypatch.setitem(sys.modules, "libtpu", None)  # as if libtpu were not installed
    with pytest.raises(TptError, match=r'pip install "jax\[tpu\]'):
        topology_devices("v5p-8")


@pytest.mark.parametrize("generation", sorted(CHIPS))
def test_chip_hbm_is_what_the_compiler_enforces(generation):
    chip = CHIPS[generation]
    shape = "2x2x1" if chip.dims == 3 else "2x2"
    _, devices = topology_devices(f"{generation}:{shape}")
    mesh = Mesh(np.asarray(devices[:1]), ("x",))
    one = NamedSharding(mesh, PartitionSpec())
    too_big = jax.jit(lambda a: jnp.sort(jnp.outer(a, a), axis=0)[::7].sum(0), out_shardings=one)
    with pytest.raises(Exception, match="exceeds available HBM") as error:
        too_big.lower(jax.ShapeDtypeStruct((300_000,), jnp.float32, sharding=one)).compile()
    available = re.search(r"available HBM \(([\d.]+)G\)", str(error.value)).group(1)
    assert math.isclose(float(available), chip.hbm_bytes / 2**30, abs_tol=0.01)
