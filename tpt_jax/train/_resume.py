"""Resuming a run safely: the newest checkpoint that restores, with the settings it was trained with.

A damaged newest checkpoint (a truncated upload, a deleted file) is skipped for the previous one;
the steps after it are repeated exactly, since the data position is the step. A resume whose
config changes what the run computes is refused unless `checkpoint.allow_config_change=true`;
then the change is appended to `<run>/config_changes.jsonl`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import jax
import numpy as np

from tpt_jax import storage
from tpt_jax.config import Config, to_dict
from tpt_jax.errors import CheckpointError, ConfigError
from tpt_jax.train._checkpoint import CheckpointUnreadableError, RunCheckpoints

# Dotted keys (or whole sections) that may change between invocations of one run because they
# change how or where it runs, or what it reports, never the numbers it trains. Everything else
# (model, optimizer, schedule, data, batch and sequence shape, seed) makes a different run.
FREE_KEYS = (
    "train.steps",  # extend or shorten a run; refused where the schedule depends on it, below
    "train.max_steps_per_run",
    "train.eval_every",
    "train.eval_batches",
    "train.seed",  # draws the initial parameters only: a resumed run restores them
    "checkpoint",  # where and how often state is saved (and this very switch)
    "logging",
    "mesh",  # the same global batch on another layout: DESIGN.md's elastic resume
    "optimizer.grad_accum_steps",  # memory only: the loss is the mean over the whole batch
    "model.remat_policy",  # the remaining model keys choose kernels and memory, not the math
    "model.attention",
    "model.attention_block",
    "model.splash_block_q",
    "model.splash_block_kv",
    "model.splash_block_kv_compute",
    "model.splash_fused_bwd",
    "model.scan_unroll",
    "model.loss_chunk",
    "data.strict",  # used by `tpt prepare` only
    "data.name",  # names the dataset's folder; the rows are checked by their manifest
    "run",  # where outputs live: the run folder itself
    "think",  # other pipeline stages
    "eval",
)

CHANGES_FILE = "config_changes.jsonl"
READ_RETRY_PAUSES_S = (1.0, 4.0)  # before a checkpoint that cannot be read is passed over


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value  # lists (corpora, mixture, mesh rules) compare as one value
    return flat


def _schedule_uses_steps(flat: dict) -> bool:
    # learning_rate(): wsd places its decay at the end of train.steps, and cosine without
    # decay_steps decays until train.steps, so there train.steps changes the learning rate.
    kind = flat.get("schedule.kind")
    return kind == "wsd" or (kind == "cosine" and not flat.get("schedule.decay_steps"))


def changed_settings(saved: dict, cfg: Config) -> dict[str, tuple]:
    """Keys whose change alters the run: dotted key -> (saved value, new value).

    `saved` is the config stored with a checkpoint; keys it lacks (added to the schema later)
    count as their defaults.
    """
    old = {**_flatten(to_dict(Config())), **_flatten(saved)}
    new = _flatten(json.loads(json.dumps(to_dict(cfg))))  # tuples -> lists, as in `saved`
    free = FREE_KEYS
    if _schedule_uses_steps(old) or _schedule_uses_steps(new):
        free = tuple(k for k in FREE_KEYS if k != "train.steps")
    return {
        key: (old.get(key), value)
        for key, value in new.items()
        if old.get(key) != value and not any(key == f or key.startswith(f + ".") for f in free)
    }


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _everywhere(good: bool) -> bool:
    """Whether every process found the checkpoint good: all must resume from the same step."""
    if jax.process_count() == 1:
        return good
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.array(good))))


def _finite_here(params) -> bool:
    """Whether this process's shards of `params` are all finite. Local on purpose: a check that
    ran a computation over every host's shards would be a collective that only the processes
    which could read the step enter, and a process that could not would wait in `_everywhere`
    for ever."""
    return all(
        bool(np.isfinite(np.asarray(shard.data)).all())
        for x in jax.tree.leaves(params)
        for shard in x.addressable_shards
    )


def _read(what: Callable, log) -> object:
    """`what()`, tried again after a pause when it cannot read the files: a storage error may pass
    (a 503 from GCS), and a checkpoint must not be passed over for one."""
    for attempt, pause in enumerate(READ_RETRY_PAUSES_S):
        try:
            return what()
        except CheckpointUnreadableError as e:
            log(
                f"train: {e}; reading again in {pause:.0f}s ({attempt + 1}/{len(READ_RETRY_PAUSES_S)})"
            )
            time.sleep(pause)
    return what()


def restore_newest_good(
    checkpoints: RunCheckpoints, abstract, log: Callable[[str], None], check_config
):
    """(state, meta, step, skipped steps) of the newest checkpoint that restores with finite
    parameters, or None when there is none.

    Each step's settings pass `check_config(saved config, step)` (which raises to refuse them)
    before its arrays are read. Steps that cannot be read (after retries) or hold non-finite
    parameters are skipped; the caller sets them aside once it goes ahead (the run saves those
    steps again, and Orbax refuses to write a step that exists). Raises CheckpointError when
    steps exist but none is good.
    """
    steps = sorted(checkpoints.all_steps(), reverse=True)
    skipped = []
    for step in steps:
        found = None
        try:
            meta = _read(lambda s=step: checkpoints.read_meta(s), log)
            check_config(meta["config"], step)
            state, meta = _read(lambda s=step: checkpoints.restore(s, abstract), log)
            if _finite_here(state.params):
                found = (state, meta, step, skipped)
            else:
                reason = "its parameters are not finite"
        except CheckpointUnreadableError as e:
            reason = str(e)
        if _everywhere(found is not None):
            return found
        if found is not None:
            reason = "another process could not read it"
        log(f"train: skipped checkpoint step {step} (set aside once the run goes on): {reason}")
        skipped.append(step)
    if skipped:
        raise CheckpointError(
            f"{checkpoints.directory}: no checkpoint restores (steps {', '.join(map(str, steps))}); "
            "check the storage, or move the folder away to start the run again"
        )
    return None


def accept_config(
    cfg: Config, run_dir: str, step: int, saved: dict, log, record: bool = True
) -> None:
    """Refuses a resume that changes the run, or (`record`) records the change when the config
    allows it."""
    changes = changed_settings(saved, cfg)
    if not changes:
        return
    listed = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, (a, b) in changes.items())
    if not cfg.checkpoint.allow_config_change:
        raise ConfigError(
            f"{run_dir}: checkpoint step {step} was trained with other settings ({listed}); "
            "rerun with the run's settings, or set checkpoint.allow_config_change=true to "
            "continue with the new ones"
        )
    if not record:
        return
    if jax.process_index() == 0:
        lines = (
            json.dumps({"step": step, "key": key, "old": old, "new": new}) + "\n"
            for key, (old, new) in changes.items()
        )
        storage.append_text(os.path.join(run_dir, CHANGES_FILE), "".join(lines))
        # config.yaml is about to describe the new settings; keep the one that made these steps.
        previous = os.path.join(run_dir, "config.yaml")
        if storage.exists(previous):
            kept = os.path.join(run_dir, f"config-until-step-{step}.yaml")
            storage.write_bytes(kept, storage.read_text(previous).encode())
    log(f"train: continuing from step {step} with changed settings: {listed} (see {CHANGES_FILE})")
