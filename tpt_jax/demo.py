"""`tpt demo`: the whole TPT pipeline on the synthetic reasoning testbed, vanilla vs TPT, on CPU.

1. testbed: arithmetic word problems (documents state the answer, not the working) + held-out ones;
2. think: the rule-based teacher writes each document's step-by-step thinking (`tpt think`);
3. vocab + prepare: a SentencePiece vocabulary, then the `testbed_vanilla` and `testbed_tpt`
   tasks packed into ArrayRecord rows (`tpt prepare`);
4. train: the same decoder twice, on the same number of training tokens, once per task;
5. export + eval: each model is exported (`tpt export`) and scored on the held-out problems
   (a) directly, the answer right after the question (loss and exact match), and (b) thinking
   first, generating its reasoning through the engine and extracting the answer;
6. report: report.md with the figures, loss and accuracy plots, and one example side by side.

Whatever the comparison shows is reported as measured; the testbed is not tuned toward a result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from tpt_jax.config import Config, CorpusConfig, MixtureComponent, load_config
from tpt_jax.data import testbed

TASK = "testbed"
MODELS = ("vanilla", "tpt")


def _stage(message: str, started: float) -> None:
    print(f"demo [{time.perf_counter() - started:5.0f}s] {message}", flush=True)


def run_demo(
    config: str, overrides: list[str], out_dir: str, documents: int = 12000, heldout: int = 200
) -> dict:
    started = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    corpus_dir = os.path.join(out_dir, "corpus")
    os.makedirs(corpus_dir, exist_ok=True)
    base = load_config(config, overrides)

    # 1. the testbed: training documents and held-out problems that never occur among them
    train_path = os.path.join(corpus_dir, "train.jsonl")
    heldout_path = os.path.join(corpus_dir, "heldout.jsonl")
    problems = testbed.make_problems(base.data.seed, documents)
    seen = {p.question for p in problems}
    fresh = [
        p for p in testbed.make_problems(base.data.seed + 1, 4 * heldout) if p.question not in seen
    ]
    testbed.write_corpus(train_path, problems)
    testbed.write_corpus(heldout_path, fresh[:heldout])
    _stage(
        f"testbed: {len(problems):,} documents, {len(fresh[:heldout])} held-out problems", started
    )

    # 2. think: the teacher writes the thinking of every document
    from tpt_jax.think.driver import run_think

    think_dir = os.path.join(out_dir, "think")
    corpus = CorpusConfig(name=TASK, paths=[train_path], meta_fields=["steps"], thinking_field="")
    think_cfg = dataclasses.replace(
        base.think, backend="teacher", corpus=corpus, output_dir=think_dir, group_by="steps",
        chunk_size=2048, max_new_tokens=512,
    )  # fmt: skip
    summary = run_think(dataclasses.replace(base, think=think_cfg))
    _stage(f"think: {summary['documents']:,} documents with thinking", started)

    # 3. vocabulary and the two tasks, packed
    from tpt_jax.data import vocab
    from tpt_jax.data.prepare import run_prepare
    from tpt_jax.think.driver import committed_records, shard_folder

    records = committed_records(shard_folder(think_dir, 0, 1))
    vocab_path = os.path.join(out_dir, "vocab.model")
    texts = [t for r in records for t in (r["text"], r["thinking"])]
    vocab.train(texts, vocab_path, vocab_size=base.model.vocab_size)
    augmented = CorpusConfig(
        name=TASK,
        paths=[os.path.join(think_dir, "shard-*", "chunk-*.jsonl")],
        meta_fields=["steps"],
    )
    mixture = [MixtureComponent(task=f"{TASK}_{m}") for m in MODELS]
    data = dataclasses.replace(
        base.data, source="prepared", corpora=[augmented], mixture=mixture,
        vocab_path=vocab_path, prepared_dir=os.path.join(out_dir, "prepared"),
    )  # fmt: skip
    cfg = dataclasses.replace(base, data=data)
    manifest = run_prepare(cfg, ["--direct_num_workers=1"])
    tasks = manifest["tasks"]
    _stage(
        "prepare: "
        + ", ".join(
            f"{k} {v['documents']:,} docs / {v['tokens']:,} tokens" for k, v in tasks.items()
        ),
        started,
    )

    # 4.-5. train each model on the same token budget, export it, evaluate it
    from tpt_jax.eval.run import evaluate
    from tpt_jax.train.export import export_run
    from tpt_jax.train.run import run_training

    results = {}
    for name in MODELS:
        run_cfg = dataclasses.replace(
            cfg,
            data=dataclasses.replace(cfg.data, mixture=[MixtureComponent(task=f"{TASK}_{name}")]),
            checkpoint=dataclasses.replace(
                cfg.checkpoint, output_dir=os.path.join(out_dir, "runs"), run_name=name
            ),
        )
        _stage(f"train {name}: {run_cfg.train.steps} steps", started)
        trained = run_training(run_cfg, quiet_config=True)
        exported = export_run(run_cfg, trained.run_dir, os.path.join(trained.run_dir, "export"))
        eval_cfg = _eval_config(run_cfg, heldout_path)
        scores = evaluate(eval_cfg, exported["model_dir"])
        results[name] = {
            "run_dir": trained.run_dir,
            "hf_dir": exported["hf_dir"],
            "metrics": _read_metrics(trained.run_dir),
            "scores": scores,
            "documents_seen": _documents_seen(run_cfg, tasks[f"{TASK}_{name}"]),
        }
        _stage(
            f"{name}: direct accuracy {scores['direct']['accuracy']:.1%}, answer loss "
            f"{scores['direct']['answer_loss']:.3f}, thinking-first accuracy "
            f"{scores['think_first']['accuracy']:.1%}",
            started,
        )

    # 6. report
    from tpt_jax.eval.report import write_report

    report = write_report(out_dir, cfg, results, tasks, summary, time.perf_counter() - started)
    _stage(f"report: {report}", started)
    return results


def _eval_config(cfg: Config, heldout_path: str) -> Config:
    from tpt_jax.config import EvalConfig, EvalTaskConfig

    tasks = [
        EvalTaskConfig(
            name="direct",
            kind="answer",
            path=heldout_path,
            answer_prefix=f" {testbed.ANSWER_PREFIX}",
        ),
        EvalTaskConfig(
            name="think_first", kind="think_first", path=heldout_path, max_new_tokens=160
        ),
    ]
    return dataclasses.replace(cfg, eval=EvalConfig(tasks=tasks, batch_size=100))


def _read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _documents_seen(cfg: Config, task: dict) -> float:
    """Documents the run trained on: rows consumed x the task's documents per row."""
    rows = cfg.train.steps * cfg.train.global_batch
    return rows * task["documents"] / max(task["rows"], 1)
