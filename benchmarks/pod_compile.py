"""tpt_jax vs MaxText 0.2.4 on the same pod, compiled here for TPU topologies (no TPU needed).

For each topology, both projects' real train steps for the same model (Llama-3-8B), per-chip
batch and sequence length are compiled by the same libtpu, and read the same way
(`tpt_jax.train.compile_for_topology`'s accounting, applied to both executables):
  - per-chip memory (arguments, temporaries, peak) from the compiler's memory analysis;
  - estimated step time: XLA's optimal_seconds over every layer (from 1- and 2-layer unrolled
    compiles) + splash attention kernels counted in the HLO at peak FLOP/s; collectives at ICI
    bandwidth, overlapped;
and printed as ratios tpt_jax / MaxText.

MaxText is never a dependency of tpt_jax: this script builds a throw-away virtual environment
for it (first run: a few minutes, needs PyPI), installs the maxtext 0.2.4 wheel with
--no-deps --ignore-requires-python plus the modules it imports, rewrites its two PEP 695 `type`
aliases (Python 3.12 syntax) as plain assignments, and runs MaxText's own `train_compile` there.

    python benchmarks/pod_compile.py                       # v5p-128 and v6e-256
    python benchmarks/pod_compile.py --topologies v5p-128 --maxtext-remat full
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
# Model and shape per topology: the paper's 8B run (global batch 512 x 8192).
PER_CHIP_BATCH = {"v5p-128": 8, "v6e-256": 2}
SEQ_LEN = 8192
LAYERS = 32  # Llama-3-8B
_PINS = [
    "jax==0.10.2", "jaxlib==0.10.2", "libtpu==0.0.42.1", "flax==0.12.8", "optax==0.2.8",
    "orbax-checkpoint==0.12.8", "grain==0.2.18", "array-record==0.8.6", "numpy<2.4",
]  # fmt: skip
_MAXTEXT_IMPORTS = [
    "absl-py", "aqtp", "chex", "drjax", "jaxtyping", "jsonlines", "ml-collections", "omegaconf",
    "parameterized", "pathwaysutils", "pillow", "pydantic", "sentencepiece", "tensorboardx",
    "tiktoken", "tokamax", "transformers", "qwix", "blobfile", "shortuuid", "jinja2", "sympy",
]  # fmt: skip

# Runs inside the MaxText environment: MaxText's train_compile.main, with its jit_and_compile
# wrapped to keep the executable, then the executable's analyses written as JSON + HLO text.
_DRIVER = r"""
import json, sys
import numpy as np
from maxtext.trainers.pre_train import train_compile as tc

out = sys.argv[1]
kept = {}
original = tc.jit_and_compile

def keep(*args, **kwargs):
    kept["compiled"] = compiled = original(*args, **kwargs)
    kept["mesh"] = args[3]
    return compiled

tc.jit_and_compile = keep
try:
    tc.main([None, *sys.argv[2:]])
except Exception as e:
    json.dump({"error": str(e)[:2000]}, open(out + ".json", "w"))
    sys.exit(0)
compiled, mesh = kept["compiled"], kept["mesh"]
m = compiled.memory_analysis()
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, list) else cost
ids = np.vectorize(lambda d: d.id)(mesh.devices)
order = {d.id: i for i, d in enumerate(mesh.devices.flat)}
json.dump({
    "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
    "alias": m.alias_size_in_bytes, "temp": m.temp_size_in_bytes,
    "code": m.generated_code_size_in_bytes,
    "flops": float(cost.get("flops", 0.0)), "optimal_seconds": cost.get("optimal_seconds"),
    "bytes": float(cost.get("bytes accessed", 0.0)),
    "mesh_axes": list(mesh.axis_names), "mesh_shape": list(mesh.devices.shape),
    "slice_index": [getattr(d, "slice_index", 0) or 0 for d in mesh.devices.flat],
}, open(out + ".json", "w"))
open(out + ".hlo", "w").write(compiled.as_text())
"""


def build_maxtext_venv(venv: Path) -> Path:
    """The throw-away MaxText environment (built once); returns its python."""
    python = venv / "bin" / "python"
    stamp = venv / ".maxtext-0.2.4"
    if stamp.exists():
        return python
    print(f"pod_compile: building MaxText 0.2.4 in {venv} (once; needs PyPI)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-U", "pip"], check=True)
    subprocess.run([*pip, *_PINS], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text("\n".join(_PINS) + "\n")
    subprocess.run([*pip, "-c", str(constraints), *_MAXTEXT_IMPORTS], check=True)
    with tempfile.TemporaryDirectory() as wheels:
        subprocess.run(
            [str(python), "-m", "pip", "download", "-q", "maxtext==0.2.4", "--no-deps",
             "--ignore-requires-python", "-d", wheels],
            check=True,
        )  # fmt: skip
        wheel = next(Path(wheels).glob("maxtext-*.whl"))
        subprocess.run([*pip, "--no-deps", "--ignore-requires-python", str(wheel)], check=True)
    site = _printed(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    for name in ("api.py", "common.py"):  # PEP 695 `type X = ...` -> `X = ...`
        path = Path(site) / "maxtext" / "kernels" / "mhc" / name
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(line[5:] if line.startswith("type ") else line for line in lines))
    stamp.write_text("ok\n")
    return python


def _printed(python: Path, code: str) -> str:
    """What `code` prints when run by the MaxText venv's interpreter."""
    run = subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True)
    return run.stdout.strip()


def maxtext_compile(python: Path, work: Path, topology: str, args: list[str]) -> dict:
    """MaxText's train_compile for `topology` with `args`; its analyses and HLO text.

    Results are kept in `work` by their arguments: MaxText and libtpu are pinned, so the same
    arguments compile the same program (pass --fresh to compile again).
    """
    key = hashlib.sha256(json.dumps([topology, *args]).encode()).hexdigest()[:16]
    out = work / f"maxtext-{topology}-{key}"
    cached = Path(str(out) + ".json")
    if cached.exists():
        result = json.loads(cached.read_text())
        hlo = Path(str(out) + ".hlo")
        result["hlo"] = hlo.read_text() if hlo.exists() else ""
        return result
    driver = work / "driver.py"
    driver.write_text(_DRIVER)
    base = _printed(python, "import maxtext, os; print(os.path.dirname(maxtext.__file__))")
    argv = [
        f"{base}/configs/base.yml",
        f"compile_topology={topology}",
        "compile_topology_num_slices=1",
        "dataset_type=synthetic",
        "enable_checkpointing=false",
        "skip_jax_distributed_system=true",
        "run_name=pod_compile",
        f"base_output_directory={work}/maxtext_out",
        "jax_cache_dir=",
        *args,
    ]
    env = {
        **os.environ,
        "DECOUPLE_GCLOUD": "TRUE",
        "TPU_SKIP_MDS_QUERY": "1",
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",  # this process holds libtpu too
    }
    env.pop("XLA_FLAGS", None)
    start = time.perf_counter()
    run = subprocess.run(
        [str(python), str(driver), str(out), *argv], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    result = json.loads(Path(str(out) + ".json").read_text()) if run.returncode == 0 else {}
    error = result.get("error", "")
    if not result or (error and "RESOURCE_EXHAUSTED" not in error and "HBM" not in error):
        tail = "\n".join((run.stdout + run.stderr).splitlines()[-30:])
        raise RuntimeError(f"MaxText train_compile failed ({run.returncode}): {error}\n{tail}")
    result["seconds"] = seconds
    cached.write_text(json.dumps(result))
    hlo = Path(str(out) + ".hlo")
    result["hlo"] = hlo.read_text() if hlo.exists() else ""
    return result


class _Device:
    def __init__(self, slice_index: int):
        self.slice_index = slice_index


@dataclasses.dataclass
class _Mesh:
    """What tpt_jax's HLO reader needs of a mesh: device grid (in logical-id order) and names."""

    devices: np.ndarray
    axis_names: tuple


def maxtext_report(python: Path, work: Path, topology: str, per_chip: int, remat: str):
    """A CompileReport of MaxText's step, read with tpt_jax's accounting."""
    from tpt_jax.parallel import parse_topology
    from tpt_jax.train import _hlo
    from tpt_jax.train._aot import CompileReport, _collective_seconds, _splash_flops, extrapolate

    chip, _, chips = parse_topology(topology)
    common = [
        "model_name=llama3-8b",
        f"per_device_batch_size={per_chip}",
        f"max_target_length={SEQ_LEN}",
        f"remat_policy={remat}",
    ]
    full = maxtext_compile(python, work, topology, common)
    cfg = _tpt_config(topology, per_chip, "full")
    report = CompileReport(
        topology=topology,
        slices=1,
        chip=chip,
        mesh={"data": 1, "fsdp": chips, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1},
        parameters=0,
        tokens_per_step=per_chip * chips * SEQ_LEN,
        compile_seconds=full["seconds"],
        model_flops=0.0,
    )
    if "error" in full:
        report.error = full["error"].splitlines()[0]
        return report
    report.argument_bytes, report.output_bytes = full["argument"], full["output"]
    report.alias_bytes, report.temp_bytes, report.code_bytes = (
        full["alias"],
        full["temp"],
        full["code"],
    )
    devices = np.array([_Device(i) for i in full["slice_index"]], dtype=object)
    mesh = _Mesh(devices.reshape(full["mesh_shape"]), tuple(full["mesh_axes"]))
    program = _hlo.parse(full["hlo"])
    report.collectives = _hlo.collectives(program, mesh)
    report.collective_seconds = _collective_seconds(report.collectives, chip)
    kernels = _hlo.custom_call_runs(program, "splash_mha")
    report.kernels = dict(kernels)
    report.kernel_flops = _splash_flops(kernels, cfg, report.mesh)
    costs = []
    for layers in (1, 2):
        variant = maxtext_compile(
            python,
            work,
            topology,
            [*common, "scan_layers=false", "override_model_config=true",
             f"base_num_decoder_layers={layers}"],
        )  # fmt: skip
        if "error" in variant:
            raise RuntimeError(f"MaxText {layers}-layer compile failed: {variant['error'][:500]}")
        seconds = variant["optimal_seconds"]
        costs.append(
            (variant["flops"], variant["bytes"], seconds if seconds and seconds > 0 else None)
        )
    report.xla_flops, report.xla_bytes, report.xla_seconds = extrapolate(costs, LAYERS)
    return report


def _tpt_config(topology: str, per_chip: int, remat: str):
    from tpt_jax.config import load_config
    from tpt_jax.parallel import parse_topology

    _, _, chips = parse_topology(topology)
    overrides = [
        f"mesh.topology={topology}",
        f"train.global_batch={per_chip * chips}",
        f"train.seq_len={SEQ_LEN}",
    ]
    if remat:
        overrides.append(f"model.remat_policy={remat}")
    return load_config(str(REPO / "configs/experiments/pretrain_8b_tpt.yaml"), overrides)


def _row(name: str, r) -> str:
    gib = 1 << 30
    if r.error:
        return f"  {name:<26} does not compile: {r.error[:120]}"
    step = r.step_seconds
    return (
        f"  {name:<26}{r.argument_bytes / gib:>9.2f}{r.temp_bytes / gib:>9.2f}"
        f"{r.peak_bytes / gib:>9.2f}{r.xla_op_seconds:>9.2f}{r.kernel_flops / r.chip.peak_flops:>9.2f}"
        f"{r.collective_seconds:>8.2f}{step:>8.2f}{r.tokens_per_step / r.devices / step:>10,.0f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topologies", default="v5p-128,v6e-256")
    parser.add_argument(
        "--venv", default=str(Path.home() / ".cache" / "tpt_jax" / "maxtext-0.2.4-venv")
    )
    parser.add_argument("--maxtext-remat", default="full", help="MaxText remat_policy")
    parser.add_argument("--fresh", action="store_true", help="compile MaxText again (no cache)")
    parser.add_argument(
        "--tpt-remat", default="", help="tpt_jax model.remat_policy (default: the config's)"
    )
    args = parser.parse_args()
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

    from tpt_jax.train import compile_for_topology

    python = build_maxtext_venv(Path(args.venv))
    work = Path(args.venv) / "results"
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(exist_ok=True)
    for topology in args.topologies.split(","):
        per_chip = PER_CHIP_BATCH.get(topology, 2)
        cfg = _tpt_config(topology, per_chip, args.tpt_remat)
        ours = compile_for_topology(cfg, topology)
        theirs = maxtext_report(python, work, topology, per_chip, args.maxtext_remat)
        print(
            f"\n{topology}: Llama-3-8B, {per_chip} x {SEQ_LEN} tokens per chip "
            f"(tpt_jax remat {cfg.model.remat_policy}, MaxText remat {args.maxtext_remat})"
        )
        print(
            f"  {'':<26}{'args GiB':>9}{'temp GiB':>9}{'peak GiB':>9}{'XLA s':>9}"
            f"{'attn s':>9}{'coll s':>8}{'step s':>8}{'tok/s/chip':>10}"
        )
        print(_row("tpt_jax", ours))
        print(_row("MaxText 0.2.4", theirs))
        for name, r in (("tpt_jax", ours), ("MaxText", theirs)):
            collectives = ", ".join(
                f"{c.kind} over {','.join(c.axes) or '-'} x{c.count} ({c.bytes / (1 << 30):.1f} GiB)"
                for c in r.collectives
            )
            print(f"  {name} collectives per step: {collectives or 'none'}")
        if not (ours.error or theirs.error):
            print(
                f"  ratios tpt_jax / MaxText: peak memory {ours.peak_bytes / theirs.peak_bytes:.2f}, "
                f"estimated step time {ours.step_seconds / theirs.step_seconds:.3f}, "
                f"XLA ops {ours.xla_op_seconds / theirs.xla_op_seconds:.3f}"
            )


if __name__ == "__main__":
    main()
