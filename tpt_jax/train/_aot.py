"""`tpt compile`: the config's real train step compiled ahead of time for a TPU slice, and read.

The step is the one `tpt train` runs (same model, optimizer, shardings and donation), compiled by
libtpu for the devices of a topology description, so it needs no TPU, data or bucket. The report:
  - memory per chip (arguments, temporaries, output, peak) against the chip's HBM;
  - the step's collectives per mesh axis, counted per executed step (loop trip counts applied);
  - model FLOPs per step, and an estimate of step time and MFU.

The estimate. XLA's cost analysis (`optimal_seconds`, its roofline of every XLA op) counts a
loop body once and gives custom kernels no cost. So the XLA part comes from two extra compiles
with 1 and 2 layers, every loop unrolled, at the micro-batch: cost(L) = c1 + (L - 1)(c2 - c1),
times the accumulation steps. Where libtpu reports no positive optimal_seconds (v6e, libtpu
0.0.42), the roofline max(FLOPs / peak, bytes / HBM bandwidth) of XLA's counts stands in.
Splash attention kernels are counted from the step's HLO and charged at the chip's peak FLOP/s.
Collectives are charged at the ICI (or, across slices, DCN) bandwidth and assumed to overlap
compute: step = max(compute, collectives).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import time

from tpt_jax.config import Config
from tpt_jax.errors import TptError
from tpt_jax.model import param_count, training_flops_per_token
from tpt_jax.parallel import TpuChip, topology_devices
from tpt_jax.train import _hlo
from tpt_jax.train._state import bytes_per_device

# Matmul FLOPs of each splash kernel per (query head x T^2 x head_dim), over computed blocks:
# forward S=QK^T, PV; dq recomputes S, then dP, dQ; dkv recomputes S, then dV, dP, dK.
_SPLASH_MATMULS = {"fwd": 2, "dq": 3, "dkv": 4, "bwd": 5}
_HEADROOM = 0.10


@dataclasses.dataclass
class CompileReport:
    """What `tpt compile` measured. Bytes are per chip; FLOPs and seconds per step."""

    topology: str
    slices: int
    chip: TpuChip
    mesh: dict
    parameters: int
    tokens_per_step: int
    compile_seconds: float
    error: str = ""
    state_bytes: int = 0
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    host_temp_bytes: int = 0  # activations offloaded to host memory (offload_* remat policies)
    collectives: list = dataclasses.field(default_factory=list)
    kernels: dict = dataclasses.field(default_factory=dict)
    model_flops: float = 0.0
    xla_flops: float | None = None
    xla_bytes: float | None = None
    xla_seconds: float | None = None  # XLA's optimal_seconds; None where it is not positive
    kernel_flops: float = 0.0
    collective_seconds: float = 0.0
    hlo: str = dataclasses.field(default="", repr=False)

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def peak_bytes(self) -> int:
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )

    @property
    def fits(self) -> bool:
        return not self.error and self.peak_bytes <= self.chip.hbm_bytes

    @property
    def headroom(self) -> float:
        return 1.0 - self.peak_bytes / self.chip.hbm_bytes

    @property
    def xla_op_seconds(self) -> float | None:
        """XLA's ops per step: its optimal_seconds, or (where libtpu gives none, as for v6e in
        libtpu 0.0.42) the roofline of the FLOPs and bytes it counts."""
        if self.xla_seconds is not None:
            return self.xla_seconds
        if self.xla_flops is None:
            return None
        return max(
            self.xla_flops / self.chip.peak_flops, (self.xla_bytes or 0) / self.chip.hbm_bytes_per_s
        )

    @property
    def compute_seconds(self) -> float | None:
        ops = self.xla_op_seconds
        return None if ops is None else ops + self.kernel_flops / self.chip.peak_flops

    @property
    def step_seconds(self) -> float | None:
        compute = self.compute_seconds
        return None if compute is None else max(compute, self.collective_seconds)

    @property
    def mfu(self) -> float | None:
        step = self.step_seconds
        if not step:
            return None
        return self.model_flops / self.devices / (step * self.chip.peak_flops)


def _cost(compiled) -> tuple[float, float, float | None]:
    """(flops, bytes accessed, optimal_seconds or None) of XLA's cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax: one dict per program
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    seconds = analysis.get("optimal_seconds")
    return (
        float(analysis.get("flops", 0.0)),
        float(analysis.get("bytes accessed", 0.0)),
        seconds if seconds is not None and seconds > 0 else None,
    )


def extrapolate(costs: list[tuple], layers: int, repeats: int = 1) -> tuple:
    """Per-step costs from those of 1- and 2-layer compiles: c1 + (layers - 1)(c2 - c1), times
    `repeats` (gradient accumulation). None stays None."""
    (f1, b1, s1), (f2, b2, s2) = costs
    line = lambda a, b: repeats * (a + (layers - 1) * (b - a))  # noqa: E731
    seconds = None if s1 is None or s2 is None or s2 <= s1 else line(s1, s2)
    return line(f1, f2), line(b1, b2), seconds


def _splash_flops(kernels: collections.Counter, cfg: Config, mesh: dict) -> float:
    """Matmul FLOPs per chip per step of the splash kernels the step runs."""
    m, t = cfg.model, cfg.train
    dp = mesh["data"] * mesh["fsdp"] * mesh["dcn_data"] * mesh["dcn_fsdp"]
    batch = t.global_batch // cfg.optimizer.grad_accum_steps // dp
    heads = m.num_heads // mesh["tensor"] if m.num_heads % mesh["tensor"] == 0 else m.num_heads
    block = min(max(m.splash_block_q, m.splash_block_kv), t.seq_len)
    blocks = math.ceil(t.seq_len / block)
    causal = (blocks + 1) / (2 * blocks)  # computed blocks of a causal mask
    per_matmul = 2.0 * batch * heads * t.seq_len**2 * m.resolved_head_dim * causal
    total = 0.0
    for name, runs in kernels.items():
        found = re.match(r"splash_mha_(fwd|dq|dkv|bwd)", name)
        if found:
            total += runs * _SPLASH_MATMULS[found.group(1)] * per_matmul
    return total


def _collective_seconds(items: list, chip: TpuChip) -> float:
    return sum(
        _hlo.traffic_bytes(c) / (chip.dcn_bytes_per_s if c.crosses_slices else chip.ici_bytes_per_s)
        for c in items
    )


def _xla_cost(cfg: Config, devices: list) -> tuple:
    """(flops, bytes, optimal_seconds or None) of XLA's ops per chip per step, every layer and
    loop iteration counted."""
    from tpt_jax.train._loop import compile_trainer

    accum = cfg.optimizer.grad_accum_steps
    costs = []
    for layers in (1, 2):
        model = dataclasses.replace(cfg.model, num_layers=layers, scan_unroll=1 << 20)
        variant = dataclasses.replace(
            cfg,
            model=model,
            train=dataclasses.replace(cfg.train, global_batch=cfg.train.global_batch // accum),
            optimizer=dataclasses.replace(cfg.optimizer, grad_accum_steps=1),
        )
        costs.append(_cost(compile_trainer(variant, devices).step))
    return extrapolate(costs, cfg.model.num_layers, accum)


def _oom(message: str) -> str:
    found = re.search(r"(Ran out of memory[^\n]*|[^\n]*exceeds available HBM[^\n]*)", message)
    return (found.group(1) if found else message.strip().splitlines()[0]).strip()


def compile_for_topology(
    cfg: Config, topology: str, slices: int = 1, estimate: bool = True
) -> CompileReport:
    """Compiles cfg's train step for `slices` slices of `topology` and reads the executable."""
    from tpt_jax.config import validate_for_devices
    from tpt_jax.train._loop import compile_trainer

    chip, devices = topology_devices(topology, slices)
    mesh = validate_for_devices(cfg, len(devices))
    t = cfg.train
    report = CompileReport(
        topology=topology,
        slices=slices,
        chip=chip,
        mesh=mesh,
        parameters=param_count(cfg.model),
        tokens_per_step=t.global_batch * t.seq_len,
        compile_seconds=0.0,
        model_flops=training_flops_per_token(cfg.model, t.seq_len) * t.global_batch * t.seq_len,
    )
    start = time.perf_counter()
    try:
        trainer = compile_trainer(cfg, devices)
    except Exception as e:  # the TPU compiler reports a step that does not fit as an error
        if "RESOURCE_EXHAUSTED" not in str(e) and "exceeds available HBM" not in str(e):
            raise
        report.error = _oom(str(e))
        report.compile_seconds = time.perf_counter() - start
        return report
    report.compile_seconds = time.perf_counter() - start
    stats = trainer.step.memory_analysis()
    report.argument_bytes = stats.argument_size_in_bytes
    report.output_bytes = stats.output_size_in_bytes
    report.alias_bytes = stats.alias_size_in_bytes
    report.temp_bytes = stats.temp_size_in_bytes
    report.code_bytes = stats.generated_code_size_in_bytes
    report.host_temp_bytes = stats.host_temp_size_in_bytes
    report.state_bytes = bytes_per_device(trainer.abstract)
    report.hlo = trainer.step.as_text()
    program = _hlo.parse(report.hlo)
    report.collectives = _hlo.collectives(program, trainer.mesh)
    report.kernels = dict(_hlo.custom_call_runs(program, "splash_mha"))
    report.kernel_flops = _splash_flops(collections.Counter(report.kernels), cfg, mesh)
    report.collective_seconds = _collective_seconds(report.collectives, chip)
    if estimate:
        report.xla_flops, report.xla_bytes, report.xla_seconds = _xla_cost(cfg, devices)
    return report


def _size(n: float) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{n:,.0f} B"


def format_report(r: CompileReport) -> str:
    where = f"{r.topology}" + (f" x {r.slices} slices" if r.slices > 1 else "")
    mesh = " x ".join(f"{k}={v}" for k, v in r.mesh.items() if v != 1) or "1 device"
    lines = [
        f"compile: {r.parameters / 1e9:,.2f}B parameters, {r.tokens_per_step:,} tokens per step, "
        f"{where} ({r.devices} chips, {r.chip.generation}), mesh {mesh}; compiled in "
        f"{r.compile_seconds:.0f} s",
    ]
    hbm = _size(r.chip.hbm_bytes)
    if r.error:
        lines.append(f"memory per chip: does NOT fit in {hbm} HBM: {r.error}")
        return "\n".join(lines)
    verdict = "fits" if r.fits else "does NOT fit"
    lines += [
        f"memory per chip ({verdict} in {hbm} HBM, headroom {r.headroom:.0%}):",
        f"  arguments    {_size(r.argument_bytes):>12}   (params + optimizer state "
        f"{_size(r.state_bytes)}, batch)",
        f"  temporaries  {_size(r.temp_bytes):>12}",
        f"  output       {_size(r.output_bytes - r.alias_bytes):>12}   (not aliased to a donated "
        "argument)",
        f"  peak         {_size(r.peak_bytes):>12}   ({r.peak_bytes / r.chip.hbm_bytes:.0%} of HBM)",
        *(
            [f"  host memory  {_size(r.host_temp_bytes):>12}   (offloaded activations)"]
            if r.host_temp_bytes
            else []
        ),
        "collectives per step (bytes: each chip's results; time: traffic / ICI or DCN bandwidth):",
        f"  {'kind':<19}{'mesh axes':<18}{'count':>7}{'bytes':>14}{'largest':>13}{'time':>10}",
    ]
    for c in r.collectives:
        axes = ",".join(c.axes) or "-"
        if c.crosses_slices:
            axes += " (DCN)"
        seconds = _collective_seconds([c], r.chip)
        lines.append(
            f"  {c.kind:<19}{axes:<18}{c.count:>7}{_size(c.bytes):>14}{_size(c.largest):>13}"
            f"{seconds * 1e3:>8.1f}ms"
        )
    if not r.collectives:
        lines.append("  (none)")
    per_chip = r.model_flops / r.devices
    lines.append(
        f"model FLOPs per step: {r.model_flops:.3e} ({per_chip:.3e} per chip; 6 x matmul "
        "parameters + attention per token)"
    )
    if r.kernels:
        runs = ", ".join(f"{k} x{v}" for k, v in sorted(r.kernels.items()))
        lines.append(f"attention kernels per step: {runs} ({r.kernel_flops:.3e} FLOPs per chip)")
    if r.step_seconds is None:
        lines.append("estimate: skipped (--no-estimate)")
        return "\n".join(lines)
    tokens_per_chip = r.tokens_per_step / r.devices / r.step_seconds
    method = "XLA optimal_seconds" if r.xla_seconds is not None else "roofline of XLA's counts"
    lines += [
        f"estimate per step: XLA ops {r.xla_op_seconds:.2f} s ({method}, "
        f"{r.xla_flops:.3e} FLOPs per chip) + attention kernels at peak "
        f"{r.kernel_flops / r.chip.peak_flops:.2f} s; collectives {r.collective_seconds:.2f} s "
        "(overlapped)",
        f"estimated step time {r.step_seconds:.2f} s, {tokens_per_chip:,.0f} tokens/s per chip, "
        f"MFU {r.mfu:.1%} (peak {r.chip.peak_flops / 1e12:.0f} TFLOP/s per chip)",
    ]
    return "\n".join(lines)


def require_fit(report: CompileReport, headroom: float = _HEADROOM) -> None:
    """Raises TptError unless the step fits with `headroom` of HBM to spare."""
    if report.error or report.headroom < headroom:
        detail = report.error or (
            f"peak {_size(report.peak_bytes)} of {_size(report.chip.hbm_bytes)}, headroom "
            f"{report.headroom:.0%} < {headroom:.0%}"
        )
        raise TptError(f"the train step does not fit {report.topology}: {detail}")
