"""`tpt eval CONFIG`: score a model folder on the evaluations of `eval.tasks`.

Tasks of kind "lm_eval" run through lm-evaluation-harness on our decoder (`tpt_jax.eval.lm`);
the testbed's perplexity / direct-answer / thinking-first evaluations stay beside them. Results
go to a JSON file (and lm-eval's own results JSON beside it) and a printed table; when the model
comes from a training run, the same numbers go to that run's TensorBoard at the checkpoint's step.
"""

from __future__ import annotations

import json
import math
import os
import re

import fsspec
import jax
import jax.numpy as jnp
import numpy as np

from tpt_jax.config import Config, EvalTaskConfig, ModelConfig
from tpt_jax.errors import TptError
from tpt_jax.eval import extract
from tpt_jax.generate import GeneratorTokenizer, generate, load_generator
from tpt_jax.model import unstack_layers

_FIRST_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class Scorer:
    """A model's losses by teacher forcing and greedy generation through the engine.

    Args:
        tokenizer: the model's tokenizer (a folder's tokenizer.json).
        cfg: the model's config.
        params: its stacked-layer parameters, or None until `use` gives them; `use` swaps
            them (one compiled model for many checkpoints of the same shape).
            `Scorer.from_folder` loads both from a model folder.
        batch_size: sequences per batch.
    """

    def __init__(
        self,
        tokenizer: GeneratorTokenizer,
        cfg: ModelConfig,
        params: dict | None,
        batch_size: int = 32,
    ):
        from tpt_jax.model import Decoder

        self.tokenizer = tokenizer
        self.cfg = cfg
        self.batch_size = batch_size
        model = Decoder(cfg)
        self._logits = jax.jit(
            lambda p, tokens, positions, segments: model.apply(
                {"params": p}, tokens, positions, segments
            )
        )
        self.params = self._decode_params = None
        if params is not None:
            self.use(params)

    @classmethod
    def from_folder(cls, model_dir: str, batch_size: int = 32) -> Scorer:
        """A model folder (weights + tokenizer.json), in float32."""
        cfg, params = load_generator(model_dir, "float32")
        return cls(GeneratorTokenizer(model_dir), cfg, params, batch_size)

    def use(self, params: dict) -> Scorer:
        """Scores `params` (stacked-layer parameters of this model) from now on."""
        self.params = params
        self._decode_params = unstack_layers(params)  # generation's layout, made once
        return self

    def token_losses(self, sequences: list[list[int]]) -> list[np.ndarray]:
        """Per-token NLL (nats) of tokens 1.. of each sequence given the ones before it."""
        out = []
        for start in range(0, len(sequences), self.batch_size):
            chunk = sequences[start : start + self.batch_size]
            width = 1 << max(4, (max(len(s) for s in chunk) - 1).bit_length())  # few shapes
            tokens = np.zeros((len(chunk), width), np.int32)
            segments = np.zeros_like(tokens)
            for i, s in enumerate(chunk):
                tokens[i, : len(s)], segments[i, : len(s)] = s, 1
            positions = np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape)
            logits = self._logits(self.params, tokens, positions, segments)
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
            nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
            nll = np.asarray(nll)
            out.extend(nll[i, : len(s) - 1] for i, s in enumerate(chunk))
        return out

    def greedy(self, prompts: list[str], max_new_tokens: int, stops=()) -> list[str]:
        """Greedy completions through the engine, cut at EOS and the first stop string."""
        texts = []
        for start in range(0, len(prompts), self.batch_size):
            ids = [self.tokenizer.encode(p) for p in prompts[start : start + self.batch_size]]
            outputs = generate(
                self._decode_params,
                self.cfg,
                ids,
                max_new_tokens,
                eos_id=self.tokenizer.eos_id,
                stops=[self.tokenizer.encode(stop) for stop in stops],
            )
            texts.extend(self.tokenizer.completion(tokens, stops)[0] for tokens in outputs)
        return texts


def read_jsonl(path: str, limit: int = 0) -> list[dict]:
    records = []
    try:
        with fsspec.open(path, "r") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TptError(f"{path}:{line_no}: not JSON ({e.msg})") from None
                if limit and len(records) == limit:
                    break
    except FileNotFoundError:
        raise TptError(f"eval file not found: {path}") from None
    return records


def _need(records: list[dict], path: str, fields: tuple[str, ...]) -> None:
    for i, r in enumerate(records, 1):
        missing = [f for f in fields if f not in r]
        if missing:
            raise TptError(f"{path}: record {i} has no {', '.join(missing)}")


def perplexity(scorer: Scorer, task: EvalTaskConfig) -> dict:
    records = read_jsonl(task.path, task.limit)
    _need(records, task.path, ("text",))
    limit = scorer.cfg.max_position
    eos = [scorer.tokenizer.eos_id] if scorer.tokenizer.eos_id is not None else []
    sequences = [(scorer.tokenizer.encode(r["text"]) + eos)[:limit] for r in records]
    sequences = [[eos[0] if eos else 0, *s] for s in sequences]  # the first token is scored too
    losses = np.concatenate(scorer.token_losses(sequences))
    mean = float(losses.mean())
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": int(losses.size)}


def answer_direct(scorer: Scorer, task: EvalTaskConfig) -> dict:
    """Loss of the answer tokens right after the question, and the greedy answer's exact match."""
    records = read_jsonl(task.path, task.limit)
    _need(records, task.path, ("question", "answer"))
    tok = scorer.tokenizer
    prompts = [f"{r['question']}{task.answer_prefix}" for r in records]
    sequences, spans = [], []
    for prompt, r in zip(prompts, records, strict=True):
        head = tok.encode(prompt)
        full = tok.encode(f"{prompt} {r['answer']}")
        if full[: len(head)] != head:  # the answer merged into the prompt's last piece
            head = head[:-1]
        sequences.append(full)
        spans.append((len(head), len(full)))
    losses = scorer.token_losses(sequences)
    answer_nll = [
        float(loss[a - 1 : b - 1].sum()) for loss, (a, b) in zip(losses, spans, strict=True)
    ]
    completions = scorer.greedy(prompts, 8)
    predictions = [_first_number(c) for c in completions]
    correct = [extract.score(p, r["answer"]) for p, r in zip(predictions, records, strict=True)]
    return {
        "answer_loss": float(np.mean(answer_nll)),
        "accuracy": float(np.mean(correct)),
        "count": len(records),
        "examples": _examples(records, prompts, completions, predictions, correct),
    }


def think_first(scorer: Scorer, task: EvalTaskConfig, tpt_template: str) -> dict:
    """The question, then the opening of the thinking as training placed it; the answer is the
    one the generated reasoning concludes with (the last answer statement before the closing
    tag: a model trained on `document ; thinking` may state a guess before it reasons)."""
    records = read_jsonl(task.path, task.limit)
    _need(records, task.path, ("question", "answer"))
    opening = tpt_template.split("{thinking}")[0]
    prompts = [opening.format(text=r["question"]) for r in records]
    completions = scorer.greedy(prompts, task.max_new_tokens, ("</think>",))
    predictions = [extract.extract_gsm8k(c, last=True) for c in completions]
    correct = [extract.score(p, r["answer"]) for p, r in zip(predictions, records, strict=True)]
    return {
        "accuracy": float(np.mean(correct)),
        "extracted": float(np.mean([p is not None for p in predictions])),
        "count": len(records),
        "examples": _examples(records, prompts, completions, predictions, correct),
    }


def _first_number(text: str) -> str | None:
    match = _FIRST_NUMBER.search(text)
    return extract.normalize_number(match.group()) if match else None


def _examples(records, prompts, completions, predictions, correct, keep: int = 3) -> list[dict]:
    rows = zip(records, prompts, completions, predictions, correct, strict=True)
    return [
        {"prompt": p, "completion": c, "prediction": pred, "answer": r["answer"], "correct": ok}
        for r, p, c, pred, ok in list(rows)[:keep]
    ]


def evaluate(cfg: Config, model_dir: str) -> dict:
    """Every task of cfg.eval on the model folder: {task name: metrics}; with "lm_eval" tasks
    also "_lm_eval": lm-eval's own results dict."""
    results = {}
    own = [t for t in cfg.eval.tasks if t.kind != "lm_eval"]
    if own:
        scorer = Scorer.from_folder(model_dir, cfg.eval.batch_size)
        for task in own:
            if task.kind == "perplexity":
                results[task.name] = perplexity(scorer, task)
            elif task.kind == "answer":
                results[task.name] = answer_direct(scorer, task)
            else:
                results[task.name] = think_first(scorer, task, cfg.data.tpt_template)
    harness_tasks = [t for t in cfg.eval.tasks if t.kind == "lm_eval"]
    if harness_tasks:
        results.update(_lm_eval(cfg, model_dir, harness_tasks))
    return results


def _lm_eval(cfg: Config, model_dir: str, tasks: list[EvalTaskConfig]) -> dict:
    from tpt_jax import extras

    extras.load("eval", "tpt eval (kind: lm_eval)", modules=("lm_eval", "math_verify"))
    from tpt_jax.eval.hosts import eval_mesh
    from tpt_jax.eval.lm import TptLM
    from tpt_jax.parallel import rules_from_config

    check_task_files(tasks)
    lm = TptLM(
        model_dir,
        batch_size=cfg.eval.batch_size,
        mesh=eval_mesh(cfg),
        rules=rules_from_config(cfg.mesh.rules),
    )
    results = run_lm_eval(lm, tasks, cfg.eval.limit)
    if jax.process_count() > 1:
        mine, total = lm.answered
        print(
            f"eval: process {jax.process_index()} of {jax.process_count()} answered {mine} of "
            f"{total} model requests"
        )
    return results


def check_task_files(tasks: list[EvalTaskConfig]) -> None:
    from tpt_jax import storage

    for task in tasks:
        for path in filter(None, (task.path, task.fewshot_path)):
            if not storage.exists(path):
                raise TptError(f"eval.tasks {task.name}: data file not found: {path}")


def run_lm_eval(lm, tasks: list[EvalTaskConfig], limit: int = 0) -> dict:
    """{task or group name: its numbers} of the lm-eval tasks on `lm`, and "_lm_eval": lm-eval's
    own results dict."""
    from tpt_jax.eval import harness

    try:
        raw = harness.evaluate(lm, tasks, limit)
    except KeyError as e:
        raise TptError(f"eval.tasks: lm-eval knows no task {e}") from None
    out = {name: _numbers(metrics) for name, metrics in raw["results"].items()}
    out["_lm_eval"] = raw
    return out


def _numbers(metrics: dict) -> dict:
    """lm-eval's metrics of one task ("exact_match,strict-match": 0.5, ...), numbers only."""
    return {
        k: v for k, v in metrics.items()
        if isinstance(v, float | int) and not isinstance(v, bool) and not k.endswith("_stderr,none")
        and "_stderr," not in k
    }  # fmt: skip


def format_table(results: dict) -> str:
    rows = [("task", "metric", "value")]
    for name, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, float | int) and not isinstance(value, bool):
                rows.append((name, key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def run_eval(cfg: Config) -> dict:
    """Resolves the model (a folder, or the run's latest checkpoint exported), scores it, writes
    JSON (and TensorBoard for a run), prints the table."""
    if not cfg.eval.tasks:
        raise TptError("tpt eval: eval.tasks is empty; nothing to evaluate")
    run_dir, step = None, None
    model_dir = cfg.eval.model_dir
    if not model_dir:
        from tpt_jax.train import run_folder
        from tpt_jax.train.export import export_run

        run_dir = run_folder(cfg)
        exported = export_run(cfg, run_dir, os.path.join(run_dir, "export"))
        model_dir, step = exported["model_dir"], exported["step"]
    output = cfg.eval.output or os.path.join(run_dir or model_dir, "eval.json")
    results = evaluate(cfg, model_dir)
    raw = results.pop("_lm_eval", None)
    if jax.process_index() != 0:
        return results  # every process holds the same results; process 0 writes them
    with fsspec.open(output, "w", auto_mkdir=True) as f:
        json.dump({"model_dir": model_dir, "step": step, "results": results}, f, indent=1)
    if raw is not None:
        _write_lm_eval(raw, output)
    if run_dir is not None and cfg.logging.tensorboard:
        from tensorboardX import SummaryWriter

        with SummaryWriter(os.path.join(run_dir, "tensorboard")) as writer:
            for name, metrics in results.items():
                for key, value in metrics.items():
                    if isinstance(value, float):
                        writer.add_scalar(f"eval/{name}/{key}", value, step)
    print(format_table(results))
    if raw is not None:
        from lm_eval.utils import make_table

        print(make_table(raw))
    print(f"eval: results in {output}")
    return results


def _write_lm_eval(raw: dict, output: str) -> None:
    """lm-eval's results JSON (as its CLI writes it) beside `output`, each task's samples
    (prompt, response, filtered answer, score) as JSONL."""
    from lm_eval.utils import handle_non_serializable

    stem = os.path.splitext(output)[0]
    samples = raw.pop("samples", {})
    with fsspec.open(f"{stem}.lm_eval.json", "w") as f:
        json.dump(raw, f, indent=1, default=handle_non_serializable, ensure_ascii=False)
    for task, rows in samples.items():
        with fsspec.open(f"{stem}.samples_{task}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n")
