"""`tpt train CONFIG`: resolve the run folder, save the config, pick the data source, train."""

from __future__ import annotations

import itertools

import jax

from tpt_jax.config import Config, dump_yaml, save_resolved
from tpt_jax.data import synthetic
from tpt_jax.errors import NotBuiltError
from tpt_jax.train._loop import TrainResult, run_folder, train

# Held-out synthetic batches come from steps no training run reaches.
_EVAL_STEP_OFFSET = 1 << 40


def synthetic_sources(cfg: Config):
    """(batches(start_step), eval_batches()) over the built-in token stream."""
    t, vocab = cfg.train, cfg.model.vocab_size
    proc = {"process_index": jax.process_index(), "process_count": jax.process_count()}

    def batches(start):
        return synthetic.batches(cfg.data.seed, start, t.global_batch, t.seq_len, vocab, **proc)

    def eval_batches():
        stream = synthetic.batches(
            cfg.data.seed, _EVAL_STEP_OFFSET, t.global_batch, t.seq_len, vocab, **proc
        )
        return itertools.islice(stream, t.eval_batches)

    return batches, eval_batches


def run_training(cfg: Config, config_path: str | None, quiet_config: bool = False) -> TrainResult:
    run_dir = run_folder(cfg, config_path)
    if jax.process_index() == 0:
        if not quiet_config:
            print(dump_yaml(cfg), end="")
        save_resolved(cfg, run_dir)
    if cfg.data.source != "synthetic":
        raise NotBuiltError(
            "data.source=prepared: the prepared-data loader (data milestone) is not built yet"
        )
    batches, eval_batches = synthetic_sources(cfg)
    return train(cfg, run_dir, batches, eval_batches if cfg.train.eval_every else None)
