"""The demo's data: testbed documents -> teacher thinking (`tpt think`) -> vocabulary -> the
`testbed_vanilla` and `testbed_tpt` tasks packed (`tpt prepare`), for one data setting.

Settings (the paper's two regimes, at the same training-token budget):
- "abundant": more unique documents than either model can read in the budget, so neither
  repeats a document;
- "constrained": just enough documents for the TPT model to read each about once; the
  vanilla model (documents without thinking are shorter) repeats them for several epochs.
Both settings draw from the same testbed sample: a constrained corpus is a prefix of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from tpt_jax.config import Config, CorpusConfig, MixtureComponent
from tpt_jax.data import testbed

TASK = "testbed"
MODELS = ("vanilla", "tpt")
SETTINGS = ("abundant", "constrained")
VOCAB_DOCUMENTS = 2000  # the vocabulary is trained on (and token counts estimated from) these
# Every number of the testbed (0-99) is one piece in every context (see _choice.py: without
# this, "71." and "71," tokenize differently and arithmetic has to be learnt twice).
NUMBER_PIECES = tuple(str(n) for n in range(testbed.MAX_VALUE + 1))


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The documents and vocabulary shared by both settings.

    Attributes:
        records: augmented records (text, thinking, steps, question, answer) of every document.
        heldout_path: JSONL of held-out problems (`question`, `answer`), never among `records`.
        vocab_path: the SentencePiece model.
        tpt_tokens_per_document: mean tokens of one TPT sample (document + thinking + EOS).
        think_summary: `tpt think`'s summary.
    """

    records: list[dict]
    heldout_path: str
    vocab_path: str
    tpt_tokens_per_document: float
    think_summary: dict


def make_corpus(cfg: Config, out_dir: str, documents: int, heldout: int) -> Corpus:
    """Testbed sample `cfg.data.seed` of `documents` problems with the teacher's thinking, held-out
    problems from the next seed, and a vocabulary of `cfg.model.vocab_size` pieces."""
    from tpt_jax.data import vocab
    from tpt_jax.think.driver import committed_records, run_think, shard_folder

    corpus_dir = os.path.join(out_dir, "corpus")
    os.makedirs(corpus_dir, exist_ok=True)
    train_path = os.path.join(corpus_dir, "train.jsonl")
    heldout_path = os.path.join(corpus_dir, "heldout.jsonl")
    problems = testbed.make_problems(cfg.data.seed, documents)
    seen = {p.question for p in problems}
    fresh = [
        p for p in testbed.make_problems(cfg.data.seed + 1, 4 * heldout) if p.question not in seen
    ]
    testbed.write_corpus(train_path, problems)
    testbed.write_corpus(heldout_path, fresh[:heldout])

    # One thinking folder per testbed sample: ids (p0000000, ...) repeat across samples, and
    # `tpt think` resumes by id, so a rerun with another seed or size must not share a folder.
    think_dir = os.path.join(out_dir, "think", f"seed{cfg.data.seed}-{documents}")
    source = CorpusConfig(name=TASK, paths=[train_path], meta_fields=["steps"], thinking_field="")
    think_cfg = dataclasses.replace(
        cfg.think, backend="teacher", corpus=source, output_dir=think_dir, group_by="steps",
        chunk_size=2048, max_new_tokens=512,
    )  # fmt: skip
    summary = run_think(dataclasses.replace(cfg, think=think_cfg))
    by_id = {r["id"]: r for r in committed_records(shard_folder(think_dir, 0, 1))}
    # the testbed's order (a constrained corpus is a prefix), with each problem's question and
    # answer beside its document (the answer-frequency baseline counts them)
    records = [by_id[p.id] | {"question": p.question, "answer": p.answer} for p in problems]

    vocab_path = os.path.join(out_dir, "vocab.model")
    sample = records[:VOCAB_DOCUMENTS]
    texts = [t for r in sample for t in (r["text"], r["thinking"])]
    symbols = (*vocab.THINK_TAGS, *NUMBER_PIECES)
    vocab.train(texts, vocab_path, cfg.model.vocab_size, "bpe", user_defined_symbols=symbols)
    tokens = _mean_tpt_tokens(vocab_path, cfg.data.tpt_template, sample)
    return Corpus(records, heldout_path, vocab_path, tokens, summary)


def _mean_tpt_tokens(vocab_path: str, template: str, records: list[dict]) -> float:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=vocab_path)
    samples = [template.format(text=r["text"], thinking=r["thinking"]) for r in records]
    return sum(len(ids) + 1 for ids in sp.encode(samples)) / len(samples)  # + EOS


def prepare_for(setting: str, cfg: Config, out_dir: str, corpus: Corpus) -> dict:
    """prepare_setting's result for the documents of a setting: all of the sample ("abundant"),
    or as many documents as the budget's rows hold packed as TPT samples ("constrained": the TPT
    model reads each about once). Packing leaves part of a row empty, so the constrained count is
    measured: a first packing of the budget's tokens' worth of documents gives the documents per
    row, and the setting is packed again with the budget's rows' worth."""
    if setting == "abundant":
        return prepare_setting(cfg, out_dir, corpus, len(corpus.records))
    t = cfg.train
    rows = t.steps * t.global_batch
    first = min(len(corpus.records), math.ceil(rows * t.seq_len / corpus.tpt_tokens_per_document))
    probe = prepare_setting(cfg, os.path.join(out_dir, "probe"), corpus, first)
    packed = probe["tasks"][f"{TASK}_tpt"]
    count = min(len(corpus.records), round(rows * packed["documents"] / max(packed["rows"], 1)))
    return prepare_setting(cfg, out_dir, corpus, count)


def prepare_setting(cfg: Config, out_dir: str, corpus: Corpus, documents: int) -> dict:
    """Packs the first `documents` records into both tasks under out_dir/prepared; returns
    the manifest's {task: counts} and the Config whose data section points at them."""
    from tpt_jax.data.prepare import run_prepare

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "augmented.jsonl")
    with open(path, "w") as f:
        for r in corpus.records[:documents]:
            f.write(json.dumps(r) + "\n")
    augmented = CorpusConfig(name=TASK, paths=[path], meta_fields=["steps"])
    data = dataclasses.replace(
        cfg.data, source="prepared", corpora=[augmented],
        mixture=[MixtureComponent(task=f"{TASK}_{m}") for m in MODELS],
        vocab_path=corpus.vocab_path, prepared_dir=os.path.join(out_dir, "prepared"),
    )  # fmt: skip
    cfg = dataclasses.replace(cfg, data=data)
    manifest = run_prepare(cfg, ["--direct_num_workers=1"])
    return {"tasks": manifest["tasks"], "config": cfg}


DESCRIPTIONS = {
    "abundant": "Abundant data: more unique documents than the budget reads, so neither model "
    "repeats one; the TPT model reads fewer documents (each carries its thinking).",
    "constrained": "Constrained data: just enough unique documents for the TPT model to read "
    "each about once in the budget; the vanilla model repeats them for several epochs.",
}
