"""Held-out accuracy of parameters in memory, at any point of training, by `tpt eval`'s own
testbed evaluations (`tpt_jax.eval.run.answer_direct` and `think_first`).

`tpt eval` scores a model folder; the demo scores dozens of checkpoints (every evaluation point
of every seed), so `ParamsScorer` is that evaluation's `Scorer` over parameters held in memory:
the same losses and the same greedy generation through the engine, compiled once per model
shape instead of once per folder.
"""

from __future__ import annotations

import os

import jax

from tpt_jax.config import EvalTaskConfig, ModelConfig
from tpt_jax.data import testbed, vocab
from tpt_jax.eval.run import Scorer, answer_direct, think_first
from tpt_jax.generate import GeneratorTokenizer
from tpt_jax.model import Decoder, unstack_layers

THINK_NEW_TOKENS = 160  # longer than any teacher thinking of the testbed (4 steps)


class ParamsScorer(Scorer):
    """`Scorer` of `tpt_jax.eval.run` over in-memory parameters; `use(params)` swaps them.

    Args:
        cfg: the model's config (float32 compute, as `tpt eval` loads a folder).
        tokenizer_dir: a folder with the vocabulary's tokenizer.json (vocab.write_tokenizer_files).
        batch_size: prompts per batch.
    """

    def __init__(self, cfg: ModelConfig, tokenizer_dir: str, batch_size: int):
        # Scorer.__init__ reads a folder; the attributes it sets are set here instead.
        self.tokenizer = GeneratorTokenizer(tokenizer_dir)
        self.cfg = cfg
        self.batch_size = batch_size
        model = Decoder(cfg)
        self._logits = jax.jit(lambda p, t, pos, seg: model.apply({"params": p}, t, pos, seg))
        self.params = self._decode_params = None

    def use(self, params: dict) -> ParamsScorer:
        """Scores `params` (one seed's stacked-layer parameters) from now on."""
        self.params = params
        self._decode_params = unstack_layers(params)
        return self


def heldout_tasks(heldout_path: str) -> tuple[EvalTaskConfig, EvalTaskConfig]:
    """The two measures: "direct" (the answer right after the question) and "think_first"."""
    direct = EvalTaskConfig(
        name="direct", kind="answer", path=heldout_path, answer_prefix=f" {testbed.ANSWER_PREFIX}"
    )
    thinking = EvalTaskConfig(
        name="think_first", kind="think_first", path=heldout_path, max_new_tokens=THINK_NEW_TOKENS
    )
    return direct, thinking


def make_scorer(cfg: ModelConfig, vocab_path: str, folder: str, batch_size: int) -> ParamsScorer:
    """A scorer for models of `cfg` with the demo's vocabulary (tokenizer files go to `folder`)."""
    import dataclasses

    os.makedirs(folder, exist_ok=True)
    vocab.write_tokenizer_files(vocab.read_model(vocab_path), folder)
    cfg = dataclasses.replace(cfg, dtype="float32", eos_token_id=vocab.EOS_ID, bos_token_id=-1)
    return ParamsScorer(cfg, folder, batch_size)


def score(scorer: ParamsScorer, params: dict, heldout_path: str, tpt_template: str) -> dict:
    """{"direct": answer_direct's metrics, "think_first": think_first's} of one seed's params."""
    direct, thinking = heldout_tasks(heldout_path)
    scorer.use(params)
    return {
        "direct": answer_direct(scorer, direct),
        "think_first": think_first(scorer, thinking, tpt_template),
    }
