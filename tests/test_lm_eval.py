"""Our lm-eval model (`tpt_jax`) answers as lm-eval's own HF model does on the same checkpoint:
loglikelihoods within 1e-4 per request, identical greedy generations and rolling perplexities,
through the same `lm_eval.simple_evaluate` on task files the test writes."""

import json
import math

import pytest
import tokenizers
from hf_reference import make_model
from tokenizers import decoders, models, processors

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.tasks import TaskManager  # noqa: E402

import tpt_jax.eval.lm  # noqa: E402, F401  (registers "tpt_jax")
from tpt_jax.model.convert import hf_to_tpt  # noqa: E402

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
