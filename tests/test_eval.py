"""The testbed's answer extraction and scoring, the testbed teacher, and the SentencePiece -> tokenizer.json
export that `tpt export` ships."""

import re

import pytest
import sentencepiece as spm
import tokenizers

from tpt_jax.data import testbed, vocab
from tpt_jax.eval import extract


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She has 12 left. The answer is 12.", "12"),
        ("so the answer is: $1,250.", "1250"),
        ("The answer is -3.50 dollars", "-3.5"),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
        ("the answer is 7. Later: the answer is 9.", "7"),  # the first statement counts
        ("Then he loses 3 coins. Answer: 18.", "18"),  # the testbed documents' own format
        ("I think it is 12.", None),  # no answer statement: extraction fails
        ("", None),
    ],
)
def test_gsm8k_extraction(text, expected):
    assert extract.extract_gsm8k(text) == expected


def test_gsm8k_extraction_of_the_last_statement():
    assert extract.extract_gsm8k("the answer is 7. Later: the answer is 9.", last=True) == "9"
    assert extract.extract_gsm8k("Answer: 8. <think> So the answer is 3.", last=True) == "3"
    assert extract.extract_gsm8k("48/2 = 24.\n#### 72", last=True) == "72"
    assert extract.extract_gsm8k("no statement", last=True) is None


def test_scoring_counts_failed_extraction_as_zero():
    assert extract.score(None, 18) == 0.0
    assert extract.score("18", 18) == 1.0
    assert extract.score("18.0", "18") == 1.0
    assert extract.score("1,000", 1000) == 1.0
    assert extract.score("17", 18) == 0.0


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


@pytest.mark.parametrize(
    "model_type, symbols",
    [
        ("unigram", vocab.THINK_TAGS),
        ("bpe", vocab.THINK_TAGS),
        ("bpe", (*vocab.THINK_TAGS, *map(str, range(100)))),  # the demo's: every number a piece
    ],
)
def test_tokenizer_json_encodes_like_sentencepiece(model_type, symbols):
    problems = testbed.make_problems(0, 1500)
    texts = [f"{p.text}\n<think>\n{testbed.teacher_thinking(p.text)}\n</think>" for p in problems]
    model = vocab.train(texts, None, 400 if model_type == "unigram" else 1024, model_type,
                        user_defined_symbols=symbols)  # fmt: skip
    sp = spm.SentencePieceProcessor(model_proto=model)
    tok = tokenizers.Tokenizer.from_str(vocab.tokenizer_json(model))
    probes = [
        *texts[:300],
        "What is  2+3? <think>x</think> y",
        "  leading and trailing spaces  ",
        "héllo wörld ☃ 𝔘 ß",  # byte fallback
        "a\n\nb\tc",
        "<think></think><think>",
        "Zoe sells 12 stamps, so 123 - 45 = 78. Ivy triples them. 1999 apples",
        "unseen words: quokka, fjord, xylophone, rhythm; THE ANSWER IS 7",
    ]
    for text in probes:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False).ids == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == sp.decode(ids), text


def test_thinking_first_scores_the_conclusion_of_the_reasoning_not_a_guess_before_it(tmp_path):
    """A TPT model was trained on `document (with "Answer: N.") <think> reasoning </think>`, so
    given a question and the think tag it often guesses an answer first and then reasons: the
    thinking-first measure scores what the reasoning concludes (the completion ends at
    </think>), as lm-eval's flexible extraction of a chain of thought takes its last answer."""
    from tpt_jax.config import EvalTaskConfig
    from tpt_jax.eval.run import think_first

    path = tmp_path / "heldout.jsonl"
    path.write_text(
        '{"question": "Mia has 7 coins. How many coins does Mia have?", "answer": 3}\n' * 2
    )
    completions = [
        "Answer: 8. <think> Mia starts with 7 coins. Mia loses 4, so 7 - 4 = 3. "
        "So the answer is 3.",
        "Mia starts with 7 coins. So the answer is 7. Answer: 7.",
    ]

    class CannedModel:  # the scorer's generation, replaced by fixed completions
        def greedy(self, prompts, max_new_tokens, stops=()):
            assert stops == ("</think>",) and len(prompts) == 2
            return completions

    task = EvalTaskConfig(name="t", kind="think_first", path=str(path), max_new_tokens=64)
    result = think_first(CannedModel(), task, "{text}\n<think>\n{thinking}\n</think>")
    assert [e["prediction"] for e in result["examples"]] == ["3", "7"]
    assert result["accuracy"] == 0.5
