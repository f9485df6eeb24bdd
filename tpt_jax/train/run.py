"""`tpt train CONFIG`: resolve the run folder, save the config, pick the data source, train."""

from __future__ import annotations

import itertools

import jax

from tpt_jax.config import Config, dump_yaml
from tpt_jax.data import synthetic
from tpt_jax.errors import ConfigError
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
    # The loop writes config.yaml once the resume has been checked against the checkpoint.
    if jax.process_index() == 0 and not quiet_config:
        print(dump_yaml(cfg), end="")
    if cfg.data.source == "prepared":
        batches, epochs = prepared_source(cfg)
        result = train(cfg, run_dir, batches, extra_metrics=epochs)
        if jax.process_index() == 0:
            seen = ", ".join(f"{k} {v:.2f}" for k, v in epochs(result.final_step).items())
            print(f"train: epochs seen per task: {seen}")
        return result
    batches, eval_batches = synthetic_sources(cfg)
    return train(cfg, run_dir, batches, eval_batches if cfg.train.eval_every else None)


def prepared_source(cfg: Config):
    """(batches(start_step), epochs_seen(step)) over the prepared mixture."""
    from tpt_jax.data import loader, vocab

    checksum = None
    if cfg.data.vocab_path:
        model = vocab.read_model(cfg.data.vocab_path)
        checksum = vocab.checksum(model)
        size = vocab.piece_count(model, cfg.data.vocab_path)
        if cfg.model.vocab_size < size:
            raise ConfigError(
                f"config key 'model.vocab_size': {cfg.model.vocab_size} is smaller than the "
                f"{size} pieces of {cfg.data.vocab_path} ({cfg.source_of('model.vocab_size')})"
            )
    data = loader.MixedRows(
        cfg.data.prepared_dir, cfg.data.mixture, cfg.data.seed, cfg.train.seq_len, checksum
    )
    t = cfg.train

    def batches(start):
        return loader.batches(data, start, t.global_batch, jax.process_index(), jax.process_count())

    def epochs(step):
        return {f"epochs/{k}": v for k, v in data.epochs_seen(step * t.global_batch).items()}

    return batches, epochs
