"""`tpt train CONFIG`: resolve the run folder, save the config, pick the data source, train."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator

import jax

from tpt_jax.config import Config, MixtureComponent, dump_yaml
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


def run_training(cfg: Config, quiet_config: bool = False) -> TrainResult:
    run_dir = run_folder(cfg)
    # The loop writes config.yaml once the resume has been checked against the checkpoint.
    if jax.process_index() == 0 and not quiet_config:
        print(dump_yaml(cfg), end="")
    if cfg.data.source == "prepared":
        batches, epochs, heldout = prepared_source(cfg)
        result = train(cfg, run_dir, batches, heldout or None, extra_metrics=epochs)
        if jax.process_index() == 0:
            seen = ", ".join(f"{k} {v:.2f}" for k, v in epochs(result.final_step).items())
            print(f"train: epochs seen per task: {seen}")
        return result
    batches, eval_batches = synthetic_sources(cfg)
    return train(cfg, run_dir, batches, eval_batches if cfg.train.eval_every else None)


def prepared_source(cfg: Config):
    """(batches(start_step), epochs_seen(step), {task: eval_batches()}) over the prepared mixture;
    the last is empty unless train.eval_every is set."""
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

    heldout = heldout_sources(cfg, data.manifest, checksum) if t.eval_every else {}
    return batches, epochs, heldout


def heldout_sources(
    cfg: Config, manifest: dict, vocab_checksum: str | None
) -> dict[str, Callable[[], Iterator[dict]]]:
    """task -> eval_batches(): this process's rows of train.eval_batches global batches of
    train.global_batch rows of the task's held-out split (the same rows at every evaluation).
    Tasks without held-out rows are left out, each said once on the console."""
    from tpt_jax.data import loader

    t, d = cfg.train, cfg.data
    tasks = list(dict.fromkeys(m.task for m in d.mixture))
    held = {
        name: manifest["tasks"].get(name, {}).get("heldout", {}).get("rows", 0) for name in tasks
    }
    if not any(held.values()):
        _say(
            f"train: no held-out loss: {d.prepared_dir} has no held-out rows (prepared with "
            "data.heldout_fraction=0), so train.eval_every evaluates nothing"
        )
        return {}
    sources = {}
    for name in tasks:
        if not held[name]:
            _say(f"train: task {name} has no held-out rows; evaluation skips it")
            continue
        needed = t.eval_batches * t.global_batch
        if needed > held[name]:
            _say(
                f"train: task {name} has {held[name]} held-out rows, fewer than the {needed} of "
                f"train.eval_batches x train.global_batch: its evaluation reads some twice"
            )
        rows = loader.MixedRows(
            d.prepared_dir, [MixtureComponent(task=name)], d.seed, t.seq_len, vocab_checksum,
            split="heldout",
        )  # fmt: skip
        sources[name] = functools.partial(_heldout_batches, rows, t.global_batch, t.eval_batches)
    return sources


def _heldout_batches(rows, global_batch: int, count: int) -> Iterator[dict]:
    from tpt_jax.data import loader

    # From row 0 every time: each evaluation scores the same rows, so the losses compare. No
    # read-ahead: nothing follows the last of the `count` batches.
    stream = loader.batches(
        rows, 0, global_batch, jax.process_index(), jax.process_count(), prefetch=0
    )
    return itertools.islice(stream, count)


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message)
