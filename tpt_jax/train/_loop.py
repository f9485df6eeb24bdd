"""The training loop: mesh, sharded state, one compiled step, metrics, checkpoints, resume.

`train` consumes any source of batches in the DESIGN.md format: `batches(start_step)` returns an
iterator of this process's rows of every global batch from `start_step` on. The data position
saved with each checkpoint is that step, so a resume (on any number of hosts) sees exactly the
batches the interrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from tpt_jax.config import Config, save_resolved, to_dict
from tpt_jax.errors import TptError
from tpt_jax.model import Decoder, param_count, restore_params, training_flops_per_token
from tpt_jax.parallel import batch_sharding, make_mesh, rules_from_config
from tpt_jax.preemption import PreemptionWatch
from tpt_jax.train._checkpoint import RunCheckpoints
from tpt_jax.train._metrics import MetricsWriter, format_metrics
from tpt_jax.train._optimizer import learning_rate, make_optimizer
from tpt_jax.train._resume import accept_config, restore_newest_good
from tpt_jax.train._state import (
    bytes_per_device,
    init_state,
    state_from_params,
    state_shardings,
)
from tpt_jax.train._step import BATCH_KEYS, make_eval_step, make_train_step

BatchSource = Callable[[int], Iterator[dict]]
# Held-out batches: one set (logged as eval_loss), or one per task (eval/<task>/loss, eval/loss).
EvalBatches = Callable[[], Iterable[dict]]
EvalSource = EvalBatches | Mapping[str, EvalBatches]
_BATCH_DTYPES = {"loss_weights": jnp.float32}


class TrainingDivergedError(TptError):
    """A step's loss, gradients or updates were NaN or infinite; the run stops unsaved."""


@dataclasses.dataclass
class TrainResult:
    run_dir: str
    start_step: int
    final_step: int
    last_loss: float
    eval_loss: float | None


def _log(message: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(message)


def _memory_report(compiled, abstract_state) -> str:
    state_bytes = bytes_per_device(abstract_state)
    stats = compiled.memory_analysis()
    if stats is None:
        return f"state {state_bytes / 2**20:,.1f} MiB per device (no compiled memory analysis on this backend)"
    temp = stats.temp_size_in_bytes
    args = stats.argument_size_in_bytes
    peak = args + temp + stats.output_size_in_bytes - stats.alias_size_in_bytes
    return (
        f"per device: params+optimizer state {state_bytes / 2**20:,.1f} MiB, step arguments "
        f"{args / 2**20:,.1f} MiB, temporaries {temp / 2**20:,.1f} MiB, "
        f"peak ~{peak / 2**20:,.1f} MiB ({peak / state_bytes:.2f}x the state)"
    )


@dataclasses.dataclass
class CompiledTrainer:
    """Everything a loop or a benchmark needs: mesh, shardings and the step compiled once."""

    mesh: jax.sharding.Mesh
    rules: tuple
    tx: object
    model: Decoder
    abstract: object  # TrainState of ShapeDtypeStructs with shardings
    shardings: object  # TrainState of NamedShardings
    data_sharding: NamedSharding
    replicated: NamedSharding
    batch_shape: tuple[int, int]  # [global_batch, seq_len]
    step: Callable  # compiled (state, batch) -> (state, metrics); donates state
    compile_seconds: float
    memory_report: str

    def global_batch(self, local: dict) -> dict:
        """This process's rows -> global jax.Arrays sharded over the mesh's data axes."""
        return {
            k: jax.make_array_from_process_local_data(
                self.data_sharding, np.asarray(local[k]), self.batch_shape
            )
            for k in BATCH_KEYS
        }


@dataclasses.dataclass
class _Layout:
    mesh: jax.sharding.Mesh
    rules: tuple
    schedule: Callable
    tx: object
    abstract: object
    shardings: object


def _layout(cfg: Config, devices: list | None, training: bool = True) -> _Layout:
    """Mesh, optimizer and the train state's abstract shapes and shardings for a config
    (`training`: a mesh the training batch splits over)."""
    mesh = make_mesh(cfg, devices, training)
    rules = rules_from_config(cfg.mesh.rules)
    schedule = learning_rate(cfg.schedule, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, schedule)
    abstract, shardings = state_shardings(cfg.model, tx, mesh, rules)
    return _Layout(mesh, rules, schedule, tx, abstract, shardings)


def restore_latest(cfg: Config, run_dir: str, devices: list | None = None):
    """(state, meta) of a run's latest checkpoint, placed on cfg's mesh over `devices` (any
    number of them: restoring reads no training batch, so it need not split over them)."""
    layout = _layout(cfg, devices, training=False)
    checkpoints = RunCheckpoints(run_dir, cfg.checkpoint)
    try:
        latest = checkpoints.latest_step()
        if latest is None:
            raise TptError(f"{checkpoints.directory}: no checkpoint to restore")
        return checkpoints.restore(latest, layout.abstract)
    finally:
        checkpoints.close()


def compile_trainer(cfg: Config, devices: list | None = None) -> CompiledTrainer:
    t = cfg.train
    layout = _layout(cfg, devices)
    mesh, rules, schedule, tx = layout.mesh, layout.rules, layout.schedule, layout.tx
    abstract, shardings = layout.abstract, layout.shardings
    model = Decoder(cfg.model)
    data_sharding = batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    shape = (t.global_batch, t.seq_len)
    abstract_batch = {
        k: jax.ShapeDtypeStruct(shape, _BATCH_DTYPES.get(k, jnp.int32), sharding=data_sharding)
        for k in BATCH_KEYS
    }
    step_fn = jax.jit(
        make_train_step(model, tx, schedule, cfg.optimizer.grad_accum_steps, mesh, rules),
        in_shardings=(shardings, data_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )
    start = time.perf_counter()
    compiled = step_fn.lower(abstract, abstract_batch).compile()
    seconds = time.perf_counter() - start
    return CompiledTrainer(
        mesh=mesh,
        rules=rules,
        tx=tx,
        model=model,
        abstract=abstract,
        shardings=shardings,
        data_sharding=data_sharding,
        replicated=replicated,
        batch_shape=shape,
        step=compiled,
        compile_seconds=seconds,
        memory_report=_memory_report(compiled, abstract),
    )


def train(
    cfg: Config,
    run_dir: str,
    batches: BatchSource,
    eval_batches: EvalSource | None = None,
    devices: list | None = None,
    extra_metrics: Callable[[int], dict[str, float]] | None = None,
) -> TrainResult:
    """Trains until cfg.train.steps (or max_steps_per_run more steps), resuming if run_dir has checkpoints.

    `extra_metrics(step)` adds data-side metrics (such as epochs seen per task) to each record.
    With train.eval_every, `eval_batches` is evaluated every eval_every steps and at the last step.
    """
    t = cfg.train
    preemption = PreemptionWatch()  # first: a SIGTERM during compilation still stops cleanly
    trainer = compile_trainer(cfg, devices)
    mesh = trainer.mesh
    checkpoints = RunCheckpoints(run_dir, cfg.checkpoint)
    writer = MetricsWriter(run_dir, cfg.logging, enabled=jax.process_index() == 0)
    source = None
    try:
        removed = checkpoints.remove_unfinished()
        if removed:
            _log(f"train: removed unfinished checkpoint folders {', '.join(removed)}")
        state, last_good = _initial_state(
            cfg, run_dir, checkpoints, trainer.abstract, trainer.shardings, trainer.tx
        )
        if jax.process_index() == 0:
            save_resolved(cfg, run_dir)  # only now: a refused resume leaves the run's config
        start = int(jax.device_get(state.step))
        stop = t.steps if not t.max_steps_per_run else min(t.steps, start + t.max_steps_per_run)
        _log(
            f"train: {param_count(cfg.model):,} parameters on mesh {dict(mesh.shape)}, "
            f"steps {start} -> {stop} of {t.steps}, run folder {run_dir}"
        )
        _log(f"train: step compiled in {trainer.compile_seconds:.1f}s; {trainer.memory_report}")
        evaluate = _make_evaluator(trainer, eval_batches)
        task_every = t.eval_tasks_every or t.eval_every
        evaluate_tasks = None
        if t.eval_tasks:  # lm-eval on the current parameters, as `tpt eval` runs it
            from tpt_jax.eval.training import task_evaluator

            evaluate_tasks = task_evaluator(cfg, run_dir)

        flops_per_step = training_flops_per_token(cfg.model, t.seq_len) * t.global_batch * t.seq_len
        pending: list[tuple[int, dict]] = []
        last_loss, eval_loss = float("nan"), None
        source = batches(start)
        bar = tqdm(
            total=stop, initial=start, desc="train", unit="step", disable=jax.process_index() != 0
        )
        clock, clock_step = time.perf_counter(), start
        for step in range(start, stop):
            state, metrics = trainer.step(state, trainer.global_batch(next(source)))
            pending.append((step + 1, metrics))
            done = step + 1
            preempted = preemption.stop_requested(done)
            save = done % cfg.checkpoint.save_every == 0 or done == stop or preempted
            run_eval = (
                evaluate is not None
                and t.eval_every
                and (done % t.eval_every == 0 or done == t.steps)
            )
            run_tasks = evaluate_tasks is not None and (done % task_every == 0 or done == t.steps)
            if done % cfg.logging.log_every and not (save or run_eval or run_tasks):
                continue
            values = _check_finite(pending, last_good, checkpoints.directory)
            pending = []
            seconds = (time.perf_counter() - clock) / max(done - clock_step, 1)
            record = {
                k: float(values[k]) for k in ("loss", "grad_norm", "learning_rate", "loss_tokens")
            }
            last_loss = record["loss"]
            record["tokens_per_sec"] = t.global_batch * t.seq_len / seconds
            record["step_time_s"] = seconds
            record["tflops_per_device"] = flops_per_step / seconds / mesh.size / 1e12
            if cfg.logging.peak_flops_per_device:
                record["mfu"] = (
                    flops_per_step / seconds / (mesh.size * cfg.logging.peak_flops_per_device)
                )
            if run_eval:
                eval_loss, scores = evaluate(state.params)
                record.update(scores)
            if run_tasks:
                record.update(evaluate_tasks(done, state.params))
            if extra_metrics is not None:
                record.update(extra_metrics(done))
            writer.write(done, record)
            bar.update(done - bar.n)
            bar.set_postfix(loss=f"{last_loss:.4f}", tok_s=f"{record['tokens_per_sec']:,.0f}")
            if done % cfg.logging.log_every == 0 or done == stop or run_eval or run_tasks:
                _log(f"step {done}: {format_metrics(record)}")
            if save:
                checkpoints.save(
                    done, state, {"data_position": done, "step": done, "config": to_dict(cfg)}
                )
                last_good = done  # _check_finite above vouched for every step up to here
            if preempted:
                stop = done
                _log(f"train: preempted (SIGTERM) at step {done}; checkpoint saved, rerun resumes")
                break
            # The next interval's timing excludes this one's logging, eval and checkpointing.
            clock, clock_step = time.perf_counter(), done
        bar.close()
        return TrainResult(run_dir, start, stop, last_loss, eval_loss)
    finally:
        if hasattr(source, "close"):
            source.close()  # stops its read-ahead: an error must not wait for the queued reads
        try:
            checkpoints.close()  # awaits the last save
            writer.close()
        finally:
            # Only now: a repeated SIGTERM while the final save is awaited must stay a no-op
            # instead of killing the process half-way through writing it.
            preemption.close()


def _initial_state(
    cfg: Config, run_dir: str, checkpoints: RunCheckpoints, abstract, shardings, tx
) -> tuple[object, int | None]:
    """(state, step of the checkpoint it was restored from, or None for a fresh start)."""

    def check_config(saved: dict, step: int) -> None:  # raises on settings that alter the run
        accept_config(cfg, run_dir, step, saved, _log, record=False)

    resumed = restore_newest_good(checkpoints, abstract, _log, check_config)
    if resumed is not None:
        state, meta, step, skipped = resumed
        if int(meta["data_position"]) != step:
            raise TptError(
                f"{checkpoints.directory}/{step}: data position {meta['data_position']} != step"
            )
        accept_config(cfg, run_dir, step, meta["config"], _log)
        for bad in skipped:  # only now: a refused resume leaves the run folder as it was
            _log(f"train: set checkpoint step {bad} aside as {checkpoints.set_aside(bad)}")
        _log(f"train: resumed from step {step} ({checkpoints.directory})")
        return state, step
    if cfg.checkpoint.init_from:
        params = restore_params(cfg.checkpoint.init_from, abstract.params)
        _log(f"train: parameters from {cfg.checkpoint.init_from}, fresh optimizer state")
        return state_from_params(params, tx, shardings), None
    return init_state(cfg.model, tx, shardings, jax.random.key(cfg.train.seed)), None


def _check_finite(pending: list[tuple[int, dict]], last_good: int | None, directory: str) -> dict:
    """Fetches the pending steps' metrics; stops the run at the first step that was not finite.

    The step itself kept the old state (see make_train_step), so nothing non-finite was applied,
    and this runs before every save, so `last_good` (this run's last save, or the checkpoint it
    resumed from) holds finite state.
    """
    fetched = jax.device_get([m for _, m in pending])
    for (step, _), values in zip(pending, fetched, strict=True):
        loss, grad_norm = float(values["loss"]), float(values["grad_norm"])
        if not bool(values.get("finite", math.isfinite(loss))):
            kept = (
                f"step {last_good} in {directory}"
                if last_good is not None
                else "none was saved yet"
            )
            raise TrainingDivergedError(
                f"loss is {loss} at step {step} with gradient norm {grad_norm} (or an update "
                f"overflowed); the step was not applied and training stopped without saving. "
                f"Last good checkpoint: {kept}. Lower schedule.peak_lr or check the data, then "
                "rerun to resume."
            )
    return fetched[-1]


def _make_evaluator(trainer: CompiledTrainer, eval_batches: EvalSource | None):
    """params -> (overall loss, metrics to log), or None when there is nothing to evaluate.

    Each loss is the mean per target token; the overall loss of several sets is weighted by
    their tokens, as if they were one set.
    """
    if not eval_batches:
        return None
    eval_fn = jax.jit(
        make_eval_step(trainer.model, trainer.mesh, trainer.rules),
        in_shardings=(trainer.shardings.params, trainer.data_sharding),
        out_shardings=trainer.replicated,
    )

    def sums(params, batches: EvalBatches) -> tuple[float, float]:
        total, weight = 0.0, 0.0
        for local in batches():
            loss_sum, w = jax.device_get(eval_fn(params, trainer.global_batch(local)))
            total += float(loss_sum)
            weight += float(w)
        return total, weight

    if not isinstance(eval_batches, Mapping):

        def evaluate_one(params) -> tuple[float, dict[str, float]]:
            total, weight = sums(params, eval_batches)
            loss = total / max(weight, 1.0)
            return loss, {"eval_loss": loss}

        return evaluate_one

    def evaluate_tasks(params) -> tuple[float, dict[str, float]]:
        metrics, total, weight = {}, 0.0, 0.0
        for task, batches in eval_batches.items():
            task_total, task_weight = sums(params, batches)
            metrics[f"eval/{task}/loss"] = task_total / max(task_weight, 1.0)
            total, weight = total + task_total, weight + task_weight
        metrics["eval/loss"] = total / max(weight, 1.0)
        return metrics["eval/loss"], metrics

    return evaluate_tasks


def run_folder(cfg: Config) -> str:
    """<checkpoint.output_dir>/<checkpoint.run_name>: by default <run.root>/<run.name>."""
    return os.path.join(cfg.checkpoint.output_dir, cfg.checkpoint.run_name)
