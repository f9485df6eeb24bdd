"""Our lm-eval model (`tpt_jax`) answers as lm-eval's own HF model does on the same checkpoint:
loglikelihoods within 1e-4 per request, identical greedy generations and rolling perplexities,
through the same `lm_eval.simple_evaluate` on task files the test writes."""

import json
import math
import os
import re
import typing

import pytest
import tokenizers
from hf_reference import make_model
from tokenizers import decoders, models, processors

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

import tpt_jax.eval.lm  # noqa: E402, F401  (registers "tpt_jax")
from tpt_jax.model.convert import hf_to_tpt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPECIAL = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny HF models' pad, bos and eos
CHARS = "\n" + "".join(chr(c) for c in range(32, 127) if chr(c) not in "`~|")  # 93: vocab 96


def save_char_tokenizer(folder, bos: bool) -> None:
    """One token per character; with bos the tokenizer.json prepends <s> as Llama-3's does."""
    vocab = {t: i for i, t in enumerate(SPECIAL + list(CHARS))}
    tok = tokenizers.Tokenizer(models.BPE(vocab, []))
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIAL])
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "pad_token": "<pad>"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


QUESTIONS = [
    ("What is 2+3?", "5", ["4", "5", "six", " 7 apples"]),
    ("Name a colour.", "red", ["red", "blue", "a very long answer, surely wrong"]),
    ("Is the sky green? Answer yes or no.", "no", ["yes", "no"]),
    ("Compute \\frac{1}{2} + \\frac{1}{2}.", "1", ["1", "\\frac{2}{2}", "0.5 + 0.5 = 1"]),
    ("Q", "A", ["A", "B"]),  # short contexts: the padded rows of a batch
]
LONG_TEXT = " ".join(
    f"Sentence {i} of a document: numbers {i * 7 % 13}, {i**2}." for i in range(40)
)


def write_tasks(root) -> None:
    """A multiple-choice task (loglikelihood, 2-shot), a generation task (generate_until,
    2-shot, stop strings) and a perplexity task (loglikelihood_rolling over texts longer than
    the model's 256 positions)."""
    rows = [
        {"question": q, "answer": a, "choices": c, "label": c.index(a)} for q, a, c in QUESTIONS
    ]
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [{"text": LONG_TEXT}, {"text": "A short one."}, {"text": LONG_TEXT[:300]}]
    (root / "docs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in texts))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root}/qa.jsonl\n"
    data += "test_split: test\nfewshot_split: test\n"
    (root / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\n{data}output_type: multiple_choice\nnum_fewshot: 2\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n'
    )
    (root / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{data}output_type: generate_until\nnum_fewshot: 2\n"
        'doc_to_text: "Q: {{question}}\\nA:"\ndoc_to_target: " {{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n\\n", "Q:", "e"]\n  max_gen_toks: 40\n'
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n"
    )
    (root / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root}/docs.jsonl\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )


def run(model: str, model_args: dict, root, batch_size: int) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["tiny_choice", "tiny_gen", "tiny_ppl"],
        batch_size=batch_size,
        task_manager=TaskManager(include_path=str(root)),
        log_samples=True,
        bootstrap_iters=0,
    )


def responses(results: dict, task: str) -> list:
    """Every request's raw answer, by document and request, in document order."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [r[0] for s in samples for r in s["resps"]]  # one answer per request (no repeats)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_lm_eval_answers_equal_hf_model(family, tmp_path):
    hf_dir, ours_dir = tmp_path / "hf", tmp_path / "ours"
    make_model(family, seed=3).save_pretrained(hf_dir)
    save_char_tokenizer(hf_dir, bos=family == "llama")
    hf_to_tpt(str(hf_dir), str(ours_dir))
    write_tasks(tmp_path)
    # transformers picks the tokenizer class by the model's type where a folder has config.json
    # (Qwen2Tokenizer re-splits text its own way, which a character vocabulary does not
    # survive); from a folder without one it loads tokenizer.json as written, as we do.
    (tmp_path / "tok").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "tok" / name).write_bytes((hf_dir / name).read_bytes())

    hf_args = {"pretrained": str(hf_dir), "tokenizer": str(tmp_path / "tok"), "dtype": "float32",
               "device": "cpu"}  # fmt: skip
    hf = run("hf", hf_args, tmp_path, 1)  # one prompt at a time: no left padding
    ours = run("tpt_jax", {"pretrained": str(ours_dir), "dtype": "float32"}, tmp_path, 4)

    choice_hf, choice_ours = responses(hf, "tiny_choice"), responses(ours, "tiny_choice")
    assert len(choice_ours) == sum(len(c) for _, _, c in QUESTIONS)
    for (lp_hf, greedy_hf), (lp_ours, greedy_ours) in zip(choice_hf, choice_ours, strict=True):
        assert abs(lp_ours - lp_hf) < 1e-4, (lp_ours, lp_hf)
        assert greedy_ours == greedy_hf
    gen_hf, gen_ours = responses(hf, "tiny_gen"), responses(ours, "tiny_gen")
    assert gen_ours == gen_hf
    assert any(len(g) > 0 for g in gen_ours)  # something was generated
    ppl_hf, ppl_ours = responses(hf, "tiny_ppl"), responses(ours, "tiny_ppl")
    for hf_value, ours_value in zip(ppl_hf, ppl_ours, strict=True):
        # ~1,800 tokens sum to -8,000 nats, where float32's own spacing is 1e-3: compare per token
        assert math.isclose(ours_value, hf_value, rel_tol=1e-6), (ours_value, hf_value)
    for task in ("tiny_choice", "tiny_gen", "tiny_ppl"):
        assert ours["results"][task].keys() == hf["results"][task].keys()
    assert ours["results"]["tiny_choice"]["acc,none"] == hf["results"]["tiny_choice"]["acc,none"]


# (reference solution, generation): fractions vs decimals, \dfrac, x=5, units, intervals,
# percentages, a wrong answer and answers math-verify cannot read.
MATH_PAIRS = [
    ("So it is $\\boxed{\\frac{1}{2}}$.", "Halving gives $\\boxed{0.5}$."),
    ("$\\boxed{\\dfrac{3}{4}}$", "The final answer is $\\boxed{\\frac34}$."),
    ("$\\boxed{5}$", "Solving, $\\boxed{x=5}$."),
    ("$\\boxed{10\\text{ cm}}$", "The side is $\\boxed{10}$."),
    ("$\\boxed{[2,5)}$", "The domain is $\\boxed{[2, 5)}$."),
    ("$\\boxed{(2,5)}$", "The domain is $\\boxed{[2,5]}$."),
    ("$\\boxed{50\\%}$", "The rate is $\\boxed{50}$."),
    ("$\\boxed{0.5}$", "So $\\boxed{\\frac{1}{3}}$."),
    ("$\\boxed{7}$", "I do not know."),
    ("$\\boxed{\\frac{1}{2}}$", "We get $\\boxed{\\frac{1}{"),  # cut mid-answer
]


class CannedAnswers(lm_eval.api.model.LM):
    """Answers each MATH problem with its generation from MATH_PAIRS (by the problem's text)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.answers = {f"Problem {i}": gen for i, (_, gen) in enumerate(MATH_PAIRS)}

    def generate_until(self, requests, disable_tqdm=False):
        problems = [r.args[0].rsplit("Problem:\n", 1)[1].split("\n")[0] for r in requests]
        return [self.answers[p] for p in problems]

    def loglikelihood(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


def test_math_scores_of_tpt_eval_are_math_verify_verdicts(tmp_path, monkeypatch):
    from math_verify import parse, verify

    from tpt_jax.config import load_config
    from tpt_jax.eval.run import run_eval

    rows = [{"problem": f"Problem {i}", "solution": sol} for i, (sol, _) in enumerate(MATH_PAIRS)]
    (tmp_path / "math.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shots = [{"problem": f"Shot {i}", "solution": f"$\\boxed{{{i}}}$"} for i in range(5)]
    (tmp_path / "shots.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shots))
    (tmp_path / "eval.yaml").write_text(
        f"eval:\n  model_dir: {tmp_path}\n  output: {tmp_path}/out/eval.json\n  tasks:\n"
        f"    - {{name: math, kind: lm_eval, task: tpt_minerva_math, path: {tmp_path}/math.jsonl,"
        f" fewshot_path: {tmp_path}/shots.jsonl}}\n"
    )
    monkeypatch.setattr("tpt_jax.eval.lm.TptLM", CannedAnswers)
    results = run_eval(load_config(str(tmp_path / "eval.yaml")))

    expected = [int(bool(verify(parse(sol), parse(gen)))) for sol, gen in MATH_PAIRS]
    assert expected[:3] == [1, 1, 1] and expected[7:] == [0, 0, 0]  # what a string match misses
    samples = [json.loads(x) for x in (tmp_path / "out" / "eval.samples_math.jsonl").open()]
    by_doc = {s["doc_id"]: s for s in samples}
    assert [by_doc[i]["math_verify"] for i in range(len(MATH_PAIRS))] == expected
    assert results["math"]["math_verify,none"] == pytest.approx(sum(expected) / len(expected))
    prompt = by_doc[0]["arguments"][0][0]  # (context, generation settings) of its one request
    assert prompt.count("Problem:\n") == 5 and prompt.startswith("Problem:\nShot 0\n")  # 4-shot
    lm_eval_json = json.loads((tmp_path / "out" / "eval.lm_eval.json").read_text())
    assert (
        lm_eval_json["results"]["math"]["math_verify,none"] == results["math"]["math_verify,none"]
    )


class KeyedAnswers(lm_eval.api.model.LM):
    """Answers by the "[key]" of the document a prompt ends with: canned generations, and for
    loglikelihoods -1 for the canned continuation, -2 for any other."""

    answers: typing.ClassVar[dict] = {}

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.prompts = []

    def _key(self, context):
        keys = [k for k in self.answers if k in context]
        assert len(keys) == 1, (keys, context[-300:])
        self.prompts.append(context)
        return keys[0]

    def generate_until(self, requests, disable_tqdm=False):
        return [self.answers[self._key(r.args[0])] for r in requests]

    def loglikelihood(self, requests, disable_tqdm=False):
        return [
            (-1.0 if self.answers[self._key(c)] == cont else -2.0, False)
            for c, cont in (r.args for r in requests)
        ]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_paper_suite_reads_local_files_in_the_public_formats(tmp_path, monkeypatch):
    """tpt_jax/configs/evals/paper.yaml over small files in the public sets' own formats (as
    the README fetches them): every task loads, builds its few-shot prompt and scores the
    canned answers by its regex; MMLU and MMLU-Pro run per subject and aggregate as a group."""
    from tpt_jax.config import load_config
    from tpt_jax.eval import harness
    from tpt_jax.eval.run import run_eval

    ev, answers = tmp_path / "evals", {}
    # GSM8K (openai/gsm8k, main): one right, one without an answer statement (scores 0).
    _jsonl(ev / "gsm8k/test.jsonl", [
        {"question": "[G0] Ann has 70 apples and buys 2.", "answer": "70 + 2 = 72\n#### 72"},
        {"question": "[G1] Bob has 3 pears.", "answer": "#### 3"},
    ])  # fmt: skip
    answers |= {"[G0]": " Ann buys 2 more: 70 + 2 = 72. The answer is 72.", "[G1]": " Pears."}
    # MATH (hendrycks_math) and Minerva's 4 exemplars.
    _jsonl(
        ev / "math/test.jsonl", [{"problem": "[M0] Halve 1.", "solution": "$\\boxed{\\frac12}$"}]
    )
    _jsonl(ev / "math/minerva_prompt.jsonl",
           [{"problem": f"Shot {i}", "solution": f"$\\boxed{{{i}}}$"} for i in range(4)])  # fmt: skip
    answers["[M0]"] = "It is $\\boxed{0.5}$."
    # BoolQ (super_glue): passage, question, label (1 = yes).
    _jsonl(ev / "boolq/validation.jsonl", [
        {"question": "[B0] is the sky blue", "passage": "The sky is blue.", "idx": 0, "label": 1},
        {"question": "[B1] is snow black", "passage": "Snow is white.", "idx": 1, "label": 0},
    ])  # fmt: skip
    answers |= {"[B0]": " yes", "[B1]": " yes"}
    # MMLU (cais/mmlu, "all"): one record per subject, answer (B) for the first 20 subjects.
    manager = harness.task_manager([])
    leaves = harness.leaf_tasks(manager, "mmlu_flan_cot_fewshot")
    subjects = [manager.task_index[leaf].cfg["dataset_name"] for leaf in leaves]
    assert len(subjects) == 57
    _jsonl(ev / "mmlu/test.jsonl", [
        {"question": f"[U-{s}] Pick one.", "subject": s, "choices": ["w", "x", "y", "z"],
         "answer": 1 if i < 20 else 2}
        for i, s in enumerate(subjects)
    ])  # fmt: skip
    answers |= {f"[U-{s}]": " Let's see. The answer is (B)." for s in subjects}
    # MMLU-Pro (TIGER-Lab/MMLU-Pro): test and validation, exemplars from the same category.
    categories = ["biology", "business", "chemistry", "computer science", "economics",
                  "engineering", "health", "history", "law", "math", "other", "philosophy",
                  "physics", "psychology"]  # fmt: skip
    options = [f"option {c}" for c in "ABCDEFGHIJ"]

    def pro(question, category, cot=""):
        return {"question_id": 0, "question": question, "options": options, "answer": "C",
                "answer_index": 2, "cot_content": cot, "category": category, "src": "x"}  # fmt: skip

    _jsonl(ev / "mmlu_pro/test.jsonl", [pro(f"[P-{c}] Which?", c) for c in categories])
    _jsonl(ev / "mmlu_pro/validation.jsonl", [
        pro(f"Shot {c} {i}", c, f"A: Let's think step by step. Example {c} {i}. The answer is (A).")
        for c in categories for i in range(3)
    ])  # fmt: skip
    answers |= {f"[P-{c}]": f"The answer is ({'C' if i % 2 else 'D'})."
                for i, c in enumerate(categories)}  # fmt: skip

    KeyedAnswers.answers = answers
    made = []
    monkeypatch.setattr(
        "tpt_jax.eval.lm.TptLM", lambda *a, **k: made.append(KeyedAnswers()) or made[-1]
    )
    config = os.path.join(ROOT, "tpt_jax", "configs", "evals", "paper.yaml")
    cfg = load_config(
        config, [f"run.root={tmp_path}", f"eval.model_dir={tmp_path}",
                 f"eval.output={tmp_path}/out/eval.json"],
    )  # fmt: skip
    results = run_eval(cfg)

    assert results["gsm8k_cot_5shot"]["exact_match,strict-match"] == 0.5
    assert results["minerva_math_4shot"]["math_verify,none"] == 1.0
    assert results["boolq_0shot"]["acc,none"] == 0.5
    assert results["mmlu_cot_2shot"]["exact_match,get-answer"] == pytest.approx(20 / 57)
    assert results["mmlu_cot_2shot_abstract_algebra"]["exact_match,get-answer"] == 1.0
    assert results["mmlu_pro_cot_2shot"]["exact_match,custom-extract"] == 0.5
    assert results["mmlu_pro_cot_2shot_biology"]["exact_match,custom-extract"] == 0.0
    assert results["mmlu_pro_cot_2shot_business"]["exact_match,custom-extract"] == 1.0

    prompts = {next(k for k in answers if k in p): p for p in made[0].prompts}
    assert prompts["[G0]"].count("Q: ") == 6  # 5 exemplars, then the question
    assert prompts["[M0]"].count("Problem:\n") == 5
    assert prompts["[B0]"] == "The sky is blue.\nQuestion: [B0] is the sky blue?\nAnswer:"
    algebra = prompts["[U-abstract_algebra]"]
    assert algebra.count("Q: ") == 3 and "about abstract algebra" in algebra
    law = prompts["[P-law]"]
    assert "Example law 0" in law and "Example law 1" in law  # 2-shot, from its category
    assert "Example law 2" not in law and "Example math" not in law
    lm_eval_json = json.loads((tmp_path / "out" / "eval.lm_eval.json").read_text())
    assert lm_eval_json["n-shot"]["mmlu_pro_cot_2shot_law"] == 2


def _tiny_model(tmp_path):
    hf_dir, ours_dir = tmp_path / "hf", tmp_path / "ours"
    make_model("llama", seed=3).save_pretrained(hf_dir)
    save_char_tokenizer(hf_dir, bos=True)
    hf_to_tpt(str(hf_dir), str(ours_dir))
    return ours_dir


def _eval_config(tmp_path, name, model_dir, extra=""):
    """boolq (loglikelihood), MATH (generation) and wikitext (rolling) on small files."""
    ev = tmp_path / "evals"
    if not ev.exists():
        _jsonl(ev / "boolq.jsonl", [
            {"question": q, "passage": p, "idx": i, "label": i % 2}
            for i, (q, p, *_) in enumerate(QUESTIONS)
        ])  # fmt: skip
        _jsonl(ev / "math.jsonl", [{"problem": q, "solution": f"$\\boxed{{{a}}}$"}
                                   for q, a, _ in QUESTIONS])  # fmt: skip
        _jsonl(ev / "shots.jsonl", [{"problem": "1+1?", "solution": "$\\boxed{2}$"}])
        _jsonl(ev / "wiki.jsonl", [{"page": LONG_TEXT}, {"page": "A short page."}])
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"eval:\n  model_dir: {model_dir}\n  output: {tmp_path}/{name}/eval.json\n"
        f"  batch_size: 2\n  tasks:\n"
        f"    - {{name: boolq, kind: lm_eval, task: boolq, path: {ev}/boolq.jsonl, shots: 2}}\n"
        f"    - {{name: math, kind: lm_eval, task: tpt_minerva_math, path: {ev}/math.jsonl,"
        f" fewshot_path: {ev}/shots.jsonl, shots: 1, max_new_tokens: 24}}\n"
        f"    - {{name: wiki, kind: lm_eval, task: wikitext, path: {ev}/wiki.jsonl}}\n{extra}"
    )
    return str(path)


def _tpt(*args, devices):
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen(
        [sys.executable, "-m", "tpt_jax", *args], env=env, cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _answers(folder):
    """{task: [(doc_id, raw answers)]} of a `tpt eval` output folder."""
    out = {}
    for task in ("boolq", "math", "wiki"):
        rows = [json.loads(x) for x in (folder / f"eval.samples_{task}.jsonl").open()]
        out[task] = sorted((r["doc_id"], r["resps"]) for r in rows)
    return out


def _same_answers(got, expected):
    assert got.keys() == expected.keys()
    for task in expected:
        assert [d for d, _ in got[task]] == [d for d, _ in expected[task]]
        for (_, a), (_, b) in zip(got[task], expected[task], strict=True):
            flat_a, flat_b = [x[0] for x in a], [x[0] for x in b]
            if task == "math":
                assert flat_a == flat_b  # the same greedy generations
            elif task == "boolq":
                for (lp_a, g_a), (lp_b, g_b) in zip(flat_a, flat_b, strict=True):
                    assert abs(lp_a - lp_b) < 1e-5 and g_a == g_b
            else:
                for x, y in zip(flat_a, flat_b, strict=True):
                    assert math.isclose(x, y, rel_tol=1e-6)


def test_two_processes_evaluate_like_one(tmp_path):
    """`tpt eval` over two JAX processes (2 CPU devices each): each answers about half of the
    requests, process 0 writes, and the answers and scores equal one process's."""
    import socket

    model = _tiny_model(tmp_path)
    single = _eval_config(tmp_path, "single", model)
    proc = _tpt("eval", single, devices=2)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]

    multi = _eval_config(tmp_path, "multi", model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        _tpt("eval", multi, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
             "--process-id", str(i), devices=2)
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    shares = [re.search(r"answered (\d+) of (\d+) model requests", o).groups() for o in outputs]
    (a, total), (b, total_b) = [tuple(map(int, s)) for s in shares]
    assert total == total_b and a + b == total and 0 < a < total, shares
    assert "eval: results in" in outputs[0] and "eval: results in" not in outputs[1]
    _same_answers(_answers(tmp_path / "multi"), _answers(tmp_path / "single"))
    single_json = json.loads((tmp_path / "single" / "eval.json").read_text())["results"]
    multi_json = json.loads((tmp_path / "multi" / "eval.json").read_text())["results"]
    assert multi_json.keys() == single_json.keys()
    for task in single_json:
        for key, value in single_json[task].items():
            assert multi_json[task][key] == pytest.approx(value, rel=1e-6), (task, key)


MESH_SCRIPT = """
import json, sys
import jax
import lm_eval
from lm_eval.tasks import TaskManager
from tpt_jax.config import load_config
from tpt_jax.eval.hosts import eval_mesh
from tpt_jax.eval.lm import TptLM
from tpt_jax.parallel import rules_from_config

model, root, out = sys.argv[1:4]
assert jax.device_count() == 8
cfg = load_config(None, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
answers = {}
for name, mesh in (("one", None), ("mesh", eval_mesh(cfg))):
    lm = TptLM(model, batch_size=4, dtype="float32", mesh=mesh, rules=rules_from_config([]))
    if mesh is not None:
        wq = lm._scorer.params["layers"]["attn"]["q"]["kernel"]
        answers["wq_shards"] = len(wq.sharding.device_set), str(wq.sharding.spec)
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["tiny_choice", "tiny_gen", "tiny_ppl"],
        task_manager=TaskManager(include_path=root), log_samples=True, bootstrap_iters=0,
    )
    answers[name] = {
        task: [r[0] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])
               for r in s["resps"]]
        for task in ("tiny_choice", "tiny_gen", "tiny_ppl")
    }
json.dump(answers, open(out, "w"))
"""


def test_the_model_on_a_mesh_of_eight_devices_answers_as_on_one(tmp_path):
    """Parameters sharded as in training over data=2 x fsdp=2 x tensor=2 (8 CPU devices):
    the same loglikelihoods (1e-5), greedy generations and rolling perplexities as on one
    device."""
    model = _tiny_model(tmp_path)
    write_tasks(tmp_path)
    script = tmp_path / "mesh.py"
    script.write_text(MESH_SCRIPT)
    proc = _tpt_python(str(script), str(model), str(tmp_path), str(tmp_path / "out.json"))
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    answers = json.loads((tmp_path / "out.json").read_text())
    shards, spec = answers["wq_shards"]
    assert shards == 8 and "tensor" in spec and "fsdp" in spec, (shards, spec)
    one, mesh = answers["one"], answers["mesh"]
    for (lp_a, g_a), (lp_b, g_b) in zip(one["tiny_choice"], mesh["tiny_choice"], strict=True):
        assert abs(lp_a - lp_b) < 1e-5 and g_a == g_b
    assert one["tiny_gen"] == mesh["tiny_gen"] and any(one["tiny_gen"])
    for a, b in zip(one["tiny_ppl"], mesh["tiny_ppl"], strict=True):
        assert math.isclose(a, b, rel_tol=1e-6)


def _tpt_python(*args, devices=8):
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen(
        [sys.executable, *args], env=env, cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _train_config(tmp_path, name):
    """A 4-step tiny run on the synthetic stream with train.eval_tasks (wikitext, rolling
    perplexity) every 2 steps, tokenized by a SentencePiece vocabulary trained here."""
    from tpt_jax.data import testbed, vocab

    if not (tmp_path / "spm.model").exists():
        texts = [p.text for p in testbed.make_problems(0, 600)]
        vocab.train(texts, str(tmp_path / "spm.model"), vocab_size=400)
        _jsonl(tmp_path / "wiki.jsonl", [{"page": t} for t in texts[:3]])
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        f"base: {ROOT}/configs/models/tiny.yaml\n"
        f"train:\n  steps: 4\n  global_batch: 8\n  seq_len: 32\n  eval_tasks_every: 2\n"
        f"  eval_tasks:\n    - {{name: wiki, kind: lm_eval, task: wikitext, path: {tmp_path}/wiki.jsonl}}\n"
        f"data: {{vocab_path: {tmp_path}/spm.model}}\n"
        f"schedule: {{kind: constant, peak_lr: 1.0e-2, warmup_steps: 1}}\n"
        f"eval: {{batch_size: 4}}\n"
        f"checkpoint: {{output_dir: {tmp_path}, run_name: {name}, save_every: 4, async_save: false}}\n"
        f"logging: {{log_every: 1}}\n"
    )  # fmt: skip
    return str(config)


WIKI_PPL = "lm_eval/wiki/word_perplexity,none"


def _scored(run_dir) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").open()]
    return {r["step"]: r[WIKI_PPL] for r in records if WIKI_PPL in r}


def test_train_eval_tasks_score_the_current_parameters_as_tpt_eval_does(tmp_path):
    """train.eval_tasks every 2 steps of a tiny run: the scores reach metrics.jsonl (and the
    console and TensorBoard) at steps 2 and 4, and step 4's equal lm-eval on the exported
    step-4 checkpoint through `tpt eval`'s model."""
    from tpt_jax.config import load_config
    from tpt_jax.eval.lm import TptLM
    from tpt_jax.eval.run import run_lm_eval
    from tpt_jax.train.export import export_run
    from tpt_jax.train.run import run_training

    cfg = load_config(_train_config(tmp_path, "run"))
    run_training(cfg, quiet_config=True)
    scored = _scored(tmp_path / "run")
    assert sorted(scored) == [2, 4] and scored[2] != scored[4]
    assert any(n.startswith("events") for n in os.listdir(tmp_path / "run" / "tensorboard"))

    exported = export_run(cfg, str(tmp_path / "run"), str(tmp_path / "export"))
    lm = TptLM(exported["model_dir"], batch_size=4)
    again = run_lm_eval(lm, list(cfg.train.eval_tasks))
    assert math.isclose(again["wiki"]["word_perplexity,none"], scored[4], rel_tol=1e-5)


def test_train_eval_tasks_over_two_processes_score_like_one(tmp_path):
    """The same run over two JAX processes (2 CPU devices each, parameters sharded over both
    hosts): the parameters are gathered, each process answers its share, and the logged
    scores equal a one-process run's on 4 devices."""
    import socket

    single = _train_config(tmp_path, "single")
    proc = _tpt("train", single, "mesh.fsdp=4", "mesh.data=1", devices=4)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    multi = _train_config(tmp_path, "multi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        _tpt("train", multi, "mesh.fsdp=4", "mesh.data=1", "--coordinator", f"127.0.0.1:{port}",
             "--num-processes", "2", "--process-id", str(i), devices=2)
        for i in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]
    expected, got = _scored(tmp_path / "single"), _scored(tmp_path / "multi")
    assert sorted(got) == sorted(expected) == [2, 4]
    for step in expected:
        assert math.isclose(got[step], expected[step], rel_tol=1e-5), (step, got, expected)
