"""Training: optimizer and schedules, the sharded train step, the loop, checkpoints, metrics."""

from tpt_jax.train._aot import CompileReport, compile_for_topology, format_report, require_fit
from tpt_jax.train._checkpoint import RunCheckpoints
from tpt_jax.train._loop import (
    CompiledTrainer,
    TrainingDivergedError,
    TrainResult,
    compile_trainer,
    restore_latest,
    run_folder,
    train,
)
from tpt_jax.train._optimizer import decay_mask, learning_rate, make_optimizer
from tpt_jax.train._state import init_state, state_from_params, state_shardings
from tpt_jax.train._step import BATCH_KEYS, TrainState, loss_sums, make_eval_step, make_train_step

__all__ = [
    "BATCH_KEYS",
    "CompileReport",
    "CompiledTrainer",
    "RunCheckpoints",
    "TrainResult",
    "TrainState",
    "TrainingDivergedError",
    "compile_for_topology",
    "compile_trainer",
    "decay_mask",
    "format_report",
    "init_state",
    "learning_rate",
    "loss_sums",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "require_fit",
    "restore_latest",
    "run_folder",
    "state_from_params",
    "state_shardings",
    "train",
]
