"""`tpt bench`: how fast is a config's train step on this machine, against its own matmul rate.

The reference is a large square matmul in the same process and dtype, so the ratio
"model FLOP/s / matmul FLOP/s" means the same on a laptop CPU and on a TPU; with a configured
peak (logging.peak_flops_per_device) MFU is printed too.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from tpt_jax.config import Config
from tpt_jax.data import synthetic
from tpt_jax.model import param_count, training_flops_per_token
from tpt_jax.train import compile_trainer, init_state


def matmul_flops_per_second(dtype: str, size: int = 2048, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of a [size, size] x [size, size] matmul on every device at once."""
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("d",))
    a = jax.random.normal(jax.random.key(0), (len(devices), size, size), jnp.float32).astype(dtype)
    a = jax.device_put(a, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d")))
    matmul = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x))
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 * len(devices) / best


def benchmark_train_step(cfg: Config, steps: int = 3, warmup: int = 1) -> dict:
    """Compiles the config's train step, runs `warmup` then `steps` timed steps on synthetic data."""
    trainer = compile_trainer(cfg)
    state = init_state(cfg.model, trainer.tx, trainer.shardings, jax.random.key(0))
    t = cfg.train
    batch = trainer.global_batch(
        synthetic.global_batch(0, 0, t.global_batch, t.seq_len, cfg.model.vocab_size)
    )
    for _ in range(warmup):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.step(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / steps
    tokens = t.global_batch * t.seq_len
    flops = training_flops_per_token(cfg.model, t.seq_len) * tokens / seconds
    matmul = matmul_flops_per_second(cfg.model.dtype)
    result = {
        "parameters": param_count(cfg.model),
        "dtype": cfg.model.dtype,
        "devices": trainer.mesh.size,
        "step_seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "model_flops_per_second": flops,
        "matmul_flops_per_second": matmul,
        "ratio_to_matmul": flops / matmul,
        "compile_seconds": trainer.compile_seconds,
        "memory": trainer.memory_report,
        "loss": float(metrics["loss"]),
    }
    if cfg.logging.peak_flops_per_device:
        result["mfu"] = flops / (trainer.mesh.size * cfg.logging.peak_flops_per_device)
    return result


def format_result(r: dict) -> str:
    lines = [
        f"{r['parameters'] / 1e6:,.1f}M parameters, {r['dtype']}, {r['devices']} device(s), "
        f"step compiled in {r['compile_seconds']:.1f}s",
        f"  step time      {r['step_seconds']:.2f} s   tokens/s {r['tokens_per_second']:,.1f}",
        f"  model FLOP/s   {r['model_flops_per_second'] / 1e9:,.1f} G   matmul FLOP/s "
        f"{r['matmul_flops_per_second'] / 1e9:,.1f} G   ratio {r['ratio_to_matmul']:.3f}",
        f"  memory         {r['memory']}",
    ]
    if "mfu" in r:
        lines.append(f"  MFU            {r['mfu']:.3f}")
    return "\n".join(lines)
