"""Several seeds of one model trained together: one compiled step over a leading seed axis.

On a small CPU a single tiny model leaves the matmul units idle between small ops; `jax.vmap`
over the seed axis of (state, batch) turns S small steps into one step of S-times larger
batched matmuls, so S seeds cost far less than S runs. Each seed has its own initialisation
(`train.seed + s`) and its own data order (the loader's seed `data.seed + s`), and the step is
the train package's own `make_train_step`, so a seed's trajectory is the one `tpt train` would
take (up to floating-point summation order).

State shapes: every leaf of the stacked `TrainState` has a leading axis of size S (seeds).
Batch: dict of [S, global_batch, seq_len] arrays (DESIGN.md's batch with a seed axis in front).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from tpt_jax.config import Config, MixtureComponent
from tpt_jax.data import loader
from tpt_jax.model import Decoder, init_params
from tpt_jax.train import TrainState, learning_rate, make_optimizer, make_train_step


@dataclasses.dataclass(frozen=True)
class SeedsTrainer:
    """The compiled seed-stacked step and a fresh stacked state.

    Attributes:
        seeds: S, the size of every leaf's leading axis.
        step: (stacked state, stacked batch) -> (stacked state, {metric: [S]}); donates the state.
        init: () -> the stacked initial TrainState.
    """

    seeds: int
    step: Callable
    init: Callable[[], TrainState]


def make_seeds_trainer(cfg: Config, seeds: int) -> SeedsTrainer:
    """Seeds `cfg.train.seed`, ..., `+ seeds - 1` of the model and optimizer of `cfg`."""
    model = Decoder(cfg.model)
    schedule = learning_rate(cfg.schedule, cfg.train.steps)
    tx = make_optimizer(cfg.optimizer, schedule)
    one_step = make_train_step(model, tx, schedule, cfg.optimizer.grad_accum_steps)

    def fresh(key: jax.Array) -> TrainState:
        params = init_params(cfg.model, key)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    keys = jnp.stack(
        [jax.random.key_data(jax.random.key(cfg.train.seed + s)) for s in range(seeds)]
    )
    init = jax.jit(jax.vmap(lambda k: fresh(jax.random.wrap_key_data(k))))
    step = jax.jit(jax.vmap(one_step), donate_argnums=0)
    return SeedsTrainer(seeds=seeds, step=step, init=lambda: init(keys))


def seed_batches(cfg: Config, prepared_dir: str, task: str, seeds: int) -> Iterator[dict]:
    """Stacked batches [S, global_batch, seq_len]: seed s reads `task` in the order of data
    seed `cfg.data.seed + s`, from step 0 on."""
    streams = [
        loader.batches(
            loader.MixedRows(
                prepared_dir, [MixtureComponent(task=task)], cfg.data.seed + s, cfg.train.seq_len
            ),
            0,
            cfg.train.global_batch,
            prefetch=2,
        )
        for s in range(seeds)
    ]
    try:
        while True:
            parts = [next(stream) for stream in streams]
            yield {k: np.stack([p[k] for p in parts]) for k in parts[0]}
    finally:
        for stream in streams:
            stream.close()


def train_seeds(
    cfg: Config,
    prepared_dir: str,
    task: str,
    seeds: int,
    eval_steps: set[int],
    on_eval: Callable[[int, dict], None],
    log: Callable[[str], None] = print,
) -> dict:
    """Trains `seeds` seeds of `cfg.model` on `task` for `cfg.train.steps` steps; after each
    step in `eval_steps` calls `on_eval(step, stacked params)` (host arrays, leading axis S).

    Returns {"loss": [steps, S] training loss (nats/token), "tokens_per_second": of all seeds
    together, measured over the steps after the first (which compiles)}.
    """
    trainer = make_seeds_trainer(cfg, seeds)
    state = trainer.init()
    losses = []
    timed_tokens, timed_seconds = 0, 0.0
    tokens_per_step = seeds * cfg.train.global_batch * cfg.train.seq_len
    batches = seed_batches(cfg, prepared_dir, task, seeds)
    try:
        for step in range(1, cfg.train.steps + 1):
            batch = next(batches)
            started = time.perf_counter()
            state, metrics = trainer.step(state, batch)
            loss = np.asarray(metrics["loss"])  # waits for the step
            if step > 1:
                timed_seconds += time.perf_counter() - started
                timed_tokens += tokens_per_step
            if not np.all(np.asarray(metrics["finite"])):
                raise FloatingPointError(f"{task}: a non-finite step at step {step}")
            losses.append(loss)
            if step % max(cfg.logging.log_every, 1) == 0:
                log(f"{task} step {step}: loss " + " ".join(f"{x:.3f}" for x in loss))
            if step in eval_steps:
                on_eval(step, jax.device_get(state.params))
    finally:
        batches.close()
    return {
        "loss": np.stack(losses),
        "tokens_per_second": timed_tokens / timed_seconds if timed_seconds else float("nan"),
    }
