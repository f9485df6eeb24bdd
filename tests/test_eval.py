"""Answer extraction and scoring, the testbed teacher, and the SentencePiece -> tokenizer.json
export that `tpt export` ships."""

import re

import pytest
import sentencepiece as spm
import tokenizers

from tpt_jax.data import testbed, vocab
from tpt_jax.eval import extract, fewshot
from tpt_jax.generate import cut_at_stop


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 12 left. The answer is 12.", "12"),
        ("so the answer is: $1,250.", "1250"),
        ("The answer is -3.50 dollars", "-3.5"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("the answer is 7. Later: the answer is 9.", "7"),  # the first statement counts
        ("I think it is 12.", None),  # no answer statement: extraction fails
        ("", None),
    ],
)
def test_gsm8k_extraction(text, expected):
    assert extract.extract_gsm8k(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $x = \\boxed{5}$.", "5"),
        ("\\boxed{2} then finally \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{3.0}", "3"),
        ("the value is \\boxed{\\frac{1}{", None),  # cut mid-answer
        ("no box here, 42", None),
    ],
)
def test_boxed_extraction(text, expected):
    assert extract.extract_boxed(text) == expected


def test_scoring_counts_failed_extraction_as_zero():
    assert extract.score(None, 18) == 0.0
    assert extract.score("18", 18) == 1.0
    assert extract.score("18.0", "18") == 1.0
    assert extract.score("1,000", 1000) == 1.0
    assert extract.score("17", 18) == 0.0


def test_few_shot_prompt_format():
    shots = [{"question": "1+1?", "solution": "1+1=2. The answer is 2."}]
    prompt = fewshot.build_prompt("gsm8k", shots, "2+3?")
    assert prompt == "Question: 1+1?\nAnswer: 1+1=2. The answer is 2.\n\nQuestion: 2+3?\nAnswer:"
    completion = " 2+3=5. The answer is 5.\n\nQuestion: 4+4?"
    cut, _ = cut_at_stop(completion, fewshot.stop_strings("gsm8k"))
    assert extract.extract_gsm8k(cut) == "5" and "4+4" not in cut


def test_teacher_reasons_every_problem_to_its_stated_answer():
    problems = testbed.make_problems(7, 2000, min_steps=1, max_steps=5)
    assert {p.steps for p in problems} == {1, 2, 3, 4, 5}
    for p in problems:
        thinking = testbed.teacher_thinking(p.text)
        assert thinking is not None, p.text
        assert extract.extract_gsm8k(thinking) == str(p.answer), (p.text, thinking)
        assert len(thinking.splitlines()) == p.steps + 2  # start, one line per step, answer
        for a, op, b, result in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", thinking):
            assert eval(f"{a} {op} {b}") == int(result)
        assert 0 <= p.answer <= testbed.MAX_VALUE
        assert str(p.answer) not in p.question.split("?")[-1]
    assert testbed.teacher_thinking("A document about something else.") is None


def test_tokenizer_json_encodes_like_sentencepiece():
    problems = testbed.make_problems(0, 1500)
    texts = [f"{p.text}\n<think>\n{testbed.teacher_thinking(p.text)}\n</think>" for p in problems]
    model = vocab.train(texts, None, vocab_size=400)
    sp = spm.SentencePieceProcessor(model_proto=model)
    tok = tokenizers.Tokenizer.from_str(vocab.tokenizer_json(model))
    probes = [
        *texts[:300],
        "What is  2+3? <think>x</think> y",
        "  leading and trailing spaces  ",
        "héllo wörld ☃ 𝔘 ß",  # byte fallback
        "a\n\nb\tc",
        "<think></think><think>",
    ]
    for text in probes:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False).ids == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == sp.decode(ids), text


def test_cot_exemplars_from_the_head_of_the_file_are_not_scored(tmp_path):
    """Without an exemplars file the first `shots` records are the exemplars; limit 0 = all."""
    import json

    from tpt_jax.config import EvalTaskConfig
    from tpt_jax.eval import run

    path = tmp_path / "gsm.jsonl"
    rows = [{"question": f"{i}+1?", "answer": i + 1, "solution": f"The answer is {i + 1}."}
            for i in range(7)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))

    class Echo:  # always answers 4: right only for the scored question 3+1
        def greedy(self, prompts, max_new_tokens, stops=()):
            return [" The answer is 4." for _ in prompts]

    task = EvalTaskConfig(name="g", kind="cot", path=str(path), shots=2, limit=0)
    result = run.few_shot_cot(Echo(), task)
    assert result["count"] == 5 and result["shots"] == 2
    assert result["accuracy"] == 0.2  # 5 scored questions (2+1 .. 6+1), one right
    assert result["examples"][0]["prompt"].startswith("Question: 0+1?\nAnswer: The answer is 1.")
    limited = run.few_shot_cot(Echo(), EvalTaskConfig(name="g", kind="cot", path=str(path),
                                                      shots=2, limit=3))  # fmt: skip
    assert limited["count"] == 3
