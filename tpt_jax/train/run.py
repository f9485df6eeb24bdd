"""`tpt train CONFIG`: resolve the run folder, save the config, pick the data source, train."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator

import jax
import numpy as np

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
    from tpt_jax.data import loader, prepare, vocab

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
    prepare.check_prepared_with(cfg, data.manifest)
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
    """task -> eval_batches(): this process's rows of up to train.eval_batches global batches of
    the task's held-out split, each held-out row at most once (the same rows at every
    evaluation). Tasks without held-out rows are left out, each said once on the console, as
    is how many rows and tokens each task's evaluation scores."""
    from tpt_jax.data import loader

    t, d = cfg.train, cfg.data
    tasks = list(dict.fromkeys(m.task for m in d.mixture))
    held = {name: manifest["tasks"].get(name, {}).get("heldout", {}) for name in tasks}
    if not any(h.get("rows") for h in held.values()):
        _say(
            f"train: no held-out loss: {d.prepared_dir} has no held-out rows (prepared with "
            "data.heldout_fraction=0), so train.eval_every evaluates nothing"
        )
        return {}
    sources = {}
    for name in tasks:
        if not held[name].get("rows"):
            _say(f"train: task {name} has no held-out rows; evaluation skips it")
            continue
        rows = loader.MixedRows(
            d.prepared_dir, [MixtureComponent(task=name)], d.seed, t.seq_len, vocab_checksum,
            split="heldout",
        )  # fmt: skip
        used = min(held[name]["rows"], t.eval_batches * t.global_batch)
        if jax.process_index() == 0:
            tokens = (
                held[name]["tokens"]
                if used == held[name]["rows"]
                else int(rows.rows(np.arange(used))["used"].sum())  # one read, once per run
            )
            _say(
                f"train: eval of task {name}: {used} of its {held[name]['rows']} held-out rows "
                f"({tokens:,} tokens), each once"
            )
        sources[name] = functools.partial(
            _heldout_batches, rows, t.global_batch, t.eval_batches, jax.process_index(),
            jax.process_count(),
        )  # fmt: skip
    return sources


def _heldout_batches(
    rows, global_batch: int, count: int, process_index: int, process_count: int
) -> Iterator[dict]:
    """This process's rows of the first ceil(used / global_batch) global batches of the task's
    held-out stream (rows.lengths[0] rows: one pass over them reads each once), where `used` is
    at most `count` batches' rows. Rows past `used` fill the last batch with loss weight 0, so
    the loss is the exact token-weighted mean over the rows used. From row 0 every time: each
    evaluation scores the same rows, so the losses compare. No read-ahead: nothing follows."""
    from tpt_jax.data import loader
    from tpt_jax.data import rows as rows_file

    used = min(rows.lengths[0], count * global_batch)
    for step in range(-(-used // global_batch)):
        wanted = loader.process_rows(step, global_batch, process_index, process_count)
        real = wanted < used
        # Padding repeats stream row 0 (read once per batch at most): real tokens, weight 0.
        batch = rows_file.decode(rows.rows(np.where(real, wanted, 0)))
        batch["loss_weights"] = batch["loss_weights"] * real[:, None]
        yield batch


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message)
