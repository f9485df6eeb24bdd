"""Held-out accuracy of parameters in memory, at any point of training, by `tpt eval`'s own
testbed evaluations (`tpt_jax.eval.run.answer_direct` and `think_first`).

`tpt eval` scores a model folder; the demo scores dozens of checkpoints (every evaluation point
of every seed) through one `Scorer` whose parameters it swaps (`Scorer.use`): the same losses
and the same greedy generation through the engine, compiled once per model shape instead of
once per folder.
"""

from __future__ import annotations

import dataclasses
import os

from tpt_jax.config import EvalTaskConfig, ModelConfig
from tpt_jax.data import testbed, vocab
from tpt_jax.eval.run import Scorer, answer_direct, think_first
from tpt_jax.generate import GeneratorTokenizer

THINK_NEW_TOKENS = 160  # longer than any teacher thinking of the testbed (4 steps)


def heldout_tasks(heldout_path: str) -> tuple[EvalTaskConfig, EvalTaskConfig]:
    """The two measures: "direct" (the answer right after the question) and "think_first"."""
    direct = EvalTaskConfig(
        name="direct", kind="answer", path=heldout_path, answer_prefix=f" {testbed.ANSWER_PREFIX}"
    )
    thinking = EvalTaskConfig(
        name="think_first", kind="think_first", path=heldout_path, max_new_tokens=THINK_NEW_TOKENS
    )
    return direct, thinking


def make_scorer(cfg: ModelConfig, vocab_path: str, folder: str, batch_size: int) -> Scorer:
    """A scorer for models of `cfg` with the demo's vocabulary (tokenizer files go to `folder`);
    `score` gives it each checkpoint's parameters."""
    os.makedirs(folder, exist_ok=True)
    vocab.write_tokenizer_files(vocab.read_model(vocab_path), folder)
    cfg = dataclasses.replace(vocab.with_special_ids(cfg), dtype="float32")
    return Scorer(GeneratorTokenizer(folder), cfg, None, batch_size)


def score(scorer: Scorer, params: dict, heldout_path: str, tpt_template: str) -> dict:
    """{"direct": answer_direct's metrics, "think_first": think_first's} of one seed's params."""
    direct, thinking = heldout_tasks(heldout_path)
    scorer.use(params)
    return {
        "direct": answer_direct(scorer, direct),
        "think_first": think_first(scorer, thinking, tpt_template),
    }
