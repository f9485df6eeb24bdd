"""Training: optimizer and schedules, the sharded train step, the loop, checkpoints, metrics."""

from tpt_jax.train._checkpoint import RunCheckpoints
from tpt_jax.train._loop import (
    TrainingDivergedError,
    TrainResult,
    restore_latest,
    run_folder,
    train,
)
from tpt_jax.train._optimizer import decay_mask, learning_rate, make_optimizer
from tpt_jax.train._state import init_state, state_from_params, state_shardings
from tpt_jax.train._step import BATCH_KEYS, TrainState, loss_sums, make_eval_step, make_train_step

__all__ = [
    "BATCH_KEYS",
    "RunCheckpoints",
    "TrainResult",
    "TrainState",
    "TrainingDivergedError",
    "decay_mask",
    "init_state",
    "learning_rate",
    "loss_sums",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "restore_latest",
    "run_folder",
    "state_from_params",
    "state_shardings",
    "train",
]
