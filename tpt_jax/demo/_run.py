"""`tpt demo`: the paper's headline figure at toy scale, on CPU.

For each data setting (abundant, constrained): the testbed corpus with the teacher's thinking,
packed as the vanilla and the TPT task; then several seeds of each model trained together
(`_seeds.py`) on the same token budget, each seed scored on held-out problems at evaluation
points during training (`_heldout.py`); then the curves, their spread over seeds, the
data-efficiency read-out and one verdict per setting and measure (`_curves.py`), in one figure
per setting and report.md (`_report.py`). Whatever the numbers are is what the report says.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import time

import jax
import numpy as np

from tpt_jax import storage
from tpt_jax.config import Config, MixtureComponent, dump_yaml, load_config, save_resolved, to_dict
from tpt_jax.demo import _choice, _curves, _data, _heldout, _report, _seeds

EVAL_POINTS = 5
SCORE_BATCH = 128  # held-out problems scored at once (memory grows with it)
QUICK = {"steps": 40, "global_batch": 4, "seeds": 2, "heldout": 24, "warmup": 4}
ABUNDANT_DOCS_PER_MTOKEN = 40_000  # a vanilla document has over 25 tokens: none repeats


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    """Attributes:
    settings: data settings to run, from ("abundant", "constrained").
    seeds: seeds per model (0: the default, 3; 2 with quick).
    heldout: held-out problems scored at every evaluation point (0: 100; 24 with quick).
    documents: abundant corpus size (0: enough that no model repeats a document).
    quick: fewer steps, seeds and held-out problems, the same figure and report (for CI).
    """

    settings: tuple[str, ...] = ("abundant",)
    seeds: int = 0
    heldout: int = 0
    documents: int = 0
    quick: bool = False


def _stage(message: str, started: float) -> None:
    print(f"demo [{time.perf_counter() - started:5.0f}s] {message}", flush=True)


def _quick(cfg: Config) -> Config:
    train = dataclasses.replace(cfg.train, steps=QUICK["steps"], global_batch=QUICK["global_batch"])
    schedule = dataclasses.replace(cfg.schedule, warmup_steps=QUICK["warmup"])
    return dataclasses.replace(cfg, train=train, schedule=schedule)


def eval_steps(steps: int, points: int = EVAL_POINTS) -> list[int]:
    """`points` evaluation steps spread evenly over the run, the last one its end."""
    return sorted({max(1, round(steps * (i + 1) / points)) for i in range(points)})


def run_demo(config: str, overrides: list[str], out_dir: str, options: DemoOptions) -> dict:
    started = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    cfg = load_config(config, overrides)
    if options.quick:
        cfg = _quick(cfg)
    seeds = options.seeds or (QUICK["seeds"] if options.quick else 3)
    heldout = options.heldout or (QUICK["heldout"] if options.quick else 100)
    t = cfg.train
    budget = t.steps * t.global_batch * t.seq_len
    documents = options.documents or math.ceil(budget / 1e6 * ABUNDANT_DOCS_PER_MTOKEN)

    corpus = _data.make_corpus(cfg, out_dir, documents, heldout)
    _stage(
        f"corpus: {len(corpus.records):,} documents with the teacher's thinking, {heldout} "
        f"held-out problems, a vocabulary of up to {cfg.model.vocab_size} pieces; a TPT sample is "
        f"{corpus.tpt_tokens_per_document:.0f} tokens",
        started,
    )
    scorer = _heldout.make_scorer(
        cfg.model, corpus.vocab_path, os.path.join(out_dir, "tokenizer"), min(heldout, SCORE_BATCH)
    )
    steps = eval_steps(t.steps)
    corpus_files = [_sha256(corpus.heldout_path), _sha256(corpus.vocab_path)]
    results, speeds = {}, {}
    for setting in options.settings:
        prepared = _data.prepare_for(setting, cfg, os.path.join(out_dir, setting), corpus)
        setting_cfg, tasks = prepared["config"], prepared["tasks"]
        _stage(
            f"{setting}: " + ", ".join(
                f"{k} {v['documents']:,} docs / {v['tokens']:,} tokens" for k, v in tasks.items()
            ),
            started,
        )  # fmt: skip
        scores, losses = {}, {}
        for model in _data.MODELS:
            task = f"{_data.TASK}_{model}"
            run_cfg = dataclasses.replace(
                setting_cfg,
                data=dataclasses.replace(setting_cfg.data, mixture=[MixtureComponent(task=task)]),
            )
            # Each model's seeds, once trained and scored, are kept so that a rerun of a killed or
            # finished demo into this folder trains only what it lacks; any change in what they
            # were made from (the key) and the model trains again.
            kept_path = os.path.join(out_dir, setting, f"results_{model}.json")
            inputs = [to_dict(run_cfg), seeds, heldout, steps, _jsonable(tasks), corpus_files]
            key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
            exported = setting != options.settings[0] or _exported(run_cfg, out_dir, model)
            done = _kept(kept_path, key) if exported else None
            if done is not None:
                scores[model], losses[model] = done["scores"], done["loss"]
                speeds[f"{setting} {model}"] = done["tokens_per_second"]
                _stage(
                    f"{setting} {model}: reusing the {seeds} seeds of an earlier run of the same "
                    f"config ({kept_path}; delete it to train again)",
                    started,
                )
                continue
            per_seed = collections.defaultdict(list)

            def on_eval(
                step, stacked, model=model, per_seed=per_seed, setting=setting, run_cfg=run_cfg
            ):
                for s in range(seeds):
                    params = jax.tree.map(lambda x, s=s: x[s], stacked)
                    per_seed[s].append(
                        _heldout.score(scorer, params, corpus.heldout_path, cfg.data.tpt_template)
                    )
                last = [per_seed[s][-1] for s in range(seeds)]
                _stage(
                    f"{setting} {model} step {step}/{t.steps}: thinking-first "
                    + " ".join(f"{r['think_first']['accuracy']:.0%}" for r in last)
                    + ", direct "
                    + " ".join(f"{r['direct']['accuracy']:.0%}" for r in last)
                    + ", answer loss (nats summed per answer) "
                    + " ".join(f"{r['direct']['answer_loss']:.2f}" for r in last),
                    started,
                )
                if step == t.steps and setting == options.settings[0]:
                    _export(run_cfg, stacked, os.path.join(out_dir, "models", model))

            trained = _seeds.train_seeds(
                run_cfg, setting_cfg.data.prepared_dir, task, seeds, set(steps), on_eval,
                log=lambda m: _stage(m, started),
            )  # fmt: skip
            scores[model] = [per_seed[s] for s in range(seeds)]
            losses[model] = trained["loss"].tolist()
            speeds[f"{setting} {model}"] = trained["tokens_per_second"]
            result = {"scores": scores[model], "loss": losses[model],
                      "tokens_per_second": speeds[f"{setting} {model}"]}  # fmt: skip
            kept = json.dumps({"key": key, "result": result}, default=_plain)
            storage.write_bytes(kept_path, kept.encode())  # whole or not at all
            _stage(
                f"{setting} {model}: {seeds} seeds trained together at "
                f"{trained['tokens_per_second']:,.0f} tokens/s (all seeds)",
                started,
            )
        results[setting] = _summarize(setting, cfg, corpus, tasks, scores, losses, steps, heldout)
    elapsed = time.perf_counter() - started
    header = _header(cfg, seeds, budget, elapsed, speeds)
    report = _report.write(out_dir, header, results, _footer(out_dir))
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({k: _jsonable(v) for k, v in results.items()}, f, indent=1)
    _stage(f"report: {report}", started)
    return results


def _summarize(setting, cfg, corpus, tasks, scores, losses, steps, heldout) -> dict:
    t = cfg.train
    tokens = [s * t.global_batch * t.seq_len for s in steps]
    rows = t.steps * t.global_batch
    count = tasks[f"{_data.TASK}_tpt"]["documents"]
    answers = collections.Counter(str(r["answer"]) for r in corpus.records[:count])
    common = answers.most_common(1)[0][0]
    with open(corpus.heldout_path) as f:
        truth = [str(json.loads(line)["answer"]) for line in f]
    out = {
        "tokens": tokens,
        "scores": scores,
        "train_loss": losses,
        "tasks": tasks,
        "heldout": heldout,
        "epochs": {m: rows / max(tasks[f"{_data.TASK}_{m}"]["rows"], 1) for m in _data.MODELS},
        "majority_accuracy": float(np.mean([a == common for a in truth])),
        "model_line": _model_line(cfg),
        "description": _data.DESCRIPTIONS[setting],
    }
    out["verdicts"], out["efficiency"] = {}, {}
    for measure, name in _report.MEASURES:
        v = _report.accuracies(out, "vanilla", measure)
        p = _report.accuracies(out, "tpt", measure)
        out["verdicts"][measure] = _curves.verdict(
            name, setting, v, p, out["majority_accuracy"], heldout
        )
        out["efficiency"][measure] = _curves.efficiency(np.array(tokens), v, p)
    return out


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _kept(path: str, key: str) -> dict | None:
    """The result kept at `path` by an earlier run, if it was made from the same inputs (`key`)."""
    try:
        with open(path) as f:
            kept = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(kept, dict) or kept.get("key") != key:
        return None  # another config's, or not ours: train again
    return kept.get("result")


def _model_line(cfg: Config) -> str:
    from tpt_jax.model import param_count

    m = cfg.model
    return (
        f"{param_count(m) / 1e6:.2f}M parameters: {m.num_layers} layers, hidden {m.hidden_size}, "
        f"vocabulary {m.vocab_size}"
    )


def _header(cfg: Config, seeds: int, budget: int, elapsed: float, speeds: dict) -> list[str]:
    t = cfg.train
    speed = ", ".join(f"{k} {v:,.0f}" for k, v in speeds.items())
    return [
        "# TPT demo: held-out accuracy against training tokens, vanilla vs thinking-augmented",
        "",
        f"Both models: {_model_line(cfg)}; {t.steps} steps of {t.global_batch} x {t.seq_len} "
        f"tokens = {budget:,} training tokens per model and seed, {seeds} seeds per model "
        f"(seed s: initialisation train.seed + s, data order data.seed + s). Evaluated on "
        f"held-out problems (never among the training documents) at {EVAL_POINTS} points. "
        f"Finished in {elapsed:.0f} s; training speed (tokens/s, all seeds together): {speed}.",
        "",
        "*Direct*: the question, then ` Answer:`; the greedy answer's exact match. *Thinking "
        "first*: the question, then the opening think tag; the model writes its reasoning "
        "through the engine up to the closing tag, and the answer its reasoning concludes with "
        "(the last `answer is N`, or the documents' own `Answer: N`, which a model trained "
        "without thinking writes) is extracted; no match scores 0. Both are "
        "`tpt eval`'s testbed evaluations (kinds `answer` and `think_first`).",
        "",
        "## Why this model, vocabulary and budget",
        "",
        _choice.WHY,
        "",
    ]


def _footer(out_dir: str) -> list[str]:
    return [
        "## Where things are",
        "",
        f"- per-point scores of every seed, training losses: {out_dir}/results.json",
        f"- seed 0 of each model at the end of the first setting: {out_dir}/models/<model>/model "
        "(tpt_jax folder: `tpt sample`, `tpt eval`) and .../hf (transformers)",
    ]


def _export(cfg: Config, stacked: dict, out: str) -> None:
    """Seed 0's parameters as `tpt export` writes a run (model and HF folders), and config.yaml."""
    from tpt_jax.train.export import export_params

    export_params(cfg, jax.tree.map(lambda x: np.asarray(x[0]), stacked), out)
    save_resolved(cfg, out)


def _exported(cfg: Config, out_dir: str, model: str) -> bool:
    """Whether models/<model> holds the export of a run of `cfg` (its config is written last)."""
    try:
        with open(os.path.join(out_dir, "models", model, "config.yaml")) as f:
            return f.read() == dump_yaml(cfg)
    except OSError:
        return False


def _plain(value):
    """numpy values as JSON's (NaN kept: a kept result reads back as it was)."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"not JSON: {type(value)}")


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
