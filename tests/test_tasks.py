"""SeqIO tasks: the expected token ids for a known SentencePiece model, and the TPT join template."""

import json

import numpy as np
import pytest
import sentencepiece as spm

from tpt_jax.config import load_config
from tpt_jax.data import vocab

DOCS = [
    {
        "id": "1",
        "text": "Three apples cost 6 dollars.",
        "thinking": "Each apple costs 6 / 3 = 2 dollars.",
    },
    {
        "id": "2",
        "text": "A train travels 60 km in 1 hour.",
        "thinking": "Its speed is 60 km per hour.",
    },
    {"id": "3", "text": "No thinking here."},
]
WORDS = [
    "apples",
    "dollars",
    "train",
    "travels",
    "hour",
    "speed",
    "each",
    "cost",
    "think",
    "thinking",
    "document",
    "number",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tasks")
    rng = np.random.default_rng(0)
    sample = [" ".join(rng.choice(WORDS, 12)) + f" {i} / = ." for i in range(400)]
    model = tmp / "spm.model"
    vocab.train(sample + [d["text"] for d in DOCS], str(model), vocab_size=400)
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    config = tmp / "data.yaml"
    config.write_text(
        f"""
data:
  vocab_path: {model}
  tpt_template: "{{text}}\\n\\n<think>\\n{{thinking}}\\n</think>"
  corpora:
    - {{name: toy, paths: ["{corpus}"]}}
  mixture:
    - {{task: toy_tpt, rate: 1.0}}
    - {{task: toy_vanilla, rate: 0.25}}
"""
    )
    cfg = load_config(str(config))
    from tpt_jax.data import tasks

    registered, mixture = tasks.register(cfg.data)
    return (
        cfg,
        {t.name: t for t in registered},
        mixture,
        spm.SentencePieceProcessor(model_file=str(model)),
    )


def _ids(task):
    return [
        list(ex["targets"])
        for ex in task.get_dataset(sequence_length=None, shuffle=False).as_numpy_iterator()
    ]


def test_vanilla_task_token_ids(setup):
    _, tasks, _, sp = setup
    expected = [[*sp.encode(d["text"]), vocab.EOS_ID] for d in DOCS]
    assert _ids(tasks["toy_vanilla"]) == expected


def test_tpt_task_follows_the_join_template(setup):
    _, tasks, _, sp = setup
    source = tasks["toy_tpt"].source
    before = source.rejects.counts["no thinking"]
    ids = _ids(tasks["toy_tpt"])
    texts = [d["text"] + "\n\n<think>\n" + d["thinking"] + "\n</think>" for d in DOCS[:2]]
    assert ids == [[*sp.encode(t), vocab.EOS_ID] for t in texts]
    # The think tags are single tokens; the record without thinking is reported, not dropped silently.
    assert sp.piece_to_id("<think>") in ids[0] and sp.piece_to_id("</think>") in ids[0]
    assert source.rejects.counts["no thinking"] - before == 1


def test_mixture_rates(setup):
    _, _, mixture, _ = setup
    rates = {t.name: mixture.get_rate(t) for t in mixture.tasks}
    assert rates == {"toy_tpt": 1.0, "toy_vanilla": 0.25}


def test_bad_template():
    from tpt_jax.data.tasks import template_parts

    assert template_parts("{text} | {thinking}") == ["{text}", " | ", "{thinking}"]
    with pytest.raises(ValueError, match="only use"):
        template_parts("{text} {answer}")
