"""`train.eval_tasks`: the lm-eval tasks of `tpt eval`, run on a training run's current
parameters; the training loop calls the evaluator every train.eval_tasks_every steps.

The model is the same `TptLM` as `tpt eval` uses, made once with the run's tokenizer (data.
vocab_path written as tokenizer files into <run>/eval_tokenizer, as `tpt export` writes them)
and given new parameters at each evaluation, so nothing compiles twice.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax

from tpt_jax.config import Config


def _host_params(params):
    """`params` where this process can read them all: as they are where it can already; a
    leaf sharded over several hosts' chips gathered whole to host memory (every process the
    whole tree: the evaluation then places it on its own chips)."""
    from jax.experimental import multihost_utils

    def readable(x):
        if getattr(x, "is_fully_addressable", True):
            return x
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(readable, params)


def task_evaluator(cfg: Config, run_dir: str) -> Callable[[int, dict], dict[str, float]]:
    """evaluate(step, params) -> {"lm_eval/<task>/<metric>": value} over cfg.train.eval_tasks.

    params: the decoder's parameters (stacked layers) as training holds them.
    """
    from tpt_jax import extras

    extras.load("eval", "train.eval_tasks", modules=("lm_eval", "math_verify"))
    from tpt_jax.data import vocab
    from tpt_jax.eval.hosts import eval_mesh
    from tpt_jax.eval.lm import TptLM
    from tpt_jax.eval.run import check_task_files, run_lm_eval
    from tpt_jax.parallel import rules_from_config

    tasks = cfg.train.eval_tasks
    check_task_files(tasks)
    tokenizer_dir = os.path.join(run_dir, "eval_tokenizer")
    if jax.process_index() == 0:
        vocab.write_tokenizer_files(vocab.read_model(cfg.data.vocab_path), tokenizer_dir)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("tpt eval_tokenizer written")
    model_cfg = vocab.with_special_ids(cfg.model)  # as `tpt export` describes the model
    lm = None

    def evaluate(step: int, params: dict) -> dict[str, float]:
        nonlocal lm
        params = _host_params(params)
        if lm is None:
            lm = TptLM(
                tokenizer_dir,
                batch_size=cfg.eval.batch_size,
                mesh=eval_mesh(cfg),
                rules=rules_from_config(cfg.mesh.rules),
                model=(model_cfg, params),
            )
        else:
            lm.load_params(params)
        results = run_lm_eval(lm, tasks, cfg.eval.limit)
        results.pop("_lm_eval")
        return {
            f"lm_eval/{task}/{metric}": float(value)
            for task, metrics in results.items()
            for metric, value in metrics.items()
        }

    return evaluate
