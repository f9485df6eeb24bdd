"""A synthetic reasoning testbed: arithmetic word problems whose stated answer needs several steps,
and the rule-based teacher that writes their correct step-by-step thinking.

A document reads like a worked exercise with the working left out:

    Mia has 7 coins. Then she finds 5 more coins. Then she loses 3 coins. Then she doubles her
    coins. How many coins does Mia have? Answer: 18.

The teacher (`think.backend: teacher`) parses that grammar back and writes the reasoning a model
would need to get from the question to the answer, one operation per line. The whole TPT pipeline
(think -> prepare -> train -> eval) then runs offline, on CPU, with thinking that carries real
information: the intermediate results appear nowhere in the document.
"""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np

NAMES = ("Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ivy", "Tom", "Eli", "Ada", "Kai", "Una")
PRONOUN = {n: ("she", "her") if n in ("Mia", "Ava", "Zoe", "Ivy", "Ada", "Una") else ("he", "his")
           for n in NAMES}  # fmt: skip
ITEMS = ("apples", "coins", "stamps", "marbles", "cards", "books", "shells", "pens")
MAX_VALUE = 99

# (operation, the sentence after "Then <pronoun> ", how the thinking states it)
_ADD = ("+", ("finds {k} more {item}", "buys {k} more {item}", "gets {k} more {item}"))
_SUB = ("-", ("loses {k} {item}", "gives away {k} {item}", "sells {k} {item}"))
_MUL = ("*", ("doubles {poss} {item}", "triples {poss} {item}"))
_DIV = ("/", ("splits {poss} {item} into {k} equal piles and keeps one pile",))

QUESTION = "How many {item} does {name} have?"
ANSWER_PREFIX = "Answer:"


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    question: str  # the story and the question, without the answer
    answer: int
    steps: int

    @property
    def text(self) -> str:
        """The document: question followed by its stated answer."""
        return f"{self.question} {ANSWER_PREFIX} {self.answer}."


def make_problem(rng: np.random.Generator, index: int, min_steps: int, max_steps: int) -> Problem:
    name = NAMES[rng.integers(len(NAMES))]
    item = ITEMS[rng.integers(len(ITEMS))]
    subject, poss = PRONOUN[name]
    value = int(rng.integers(2, 20))
    sentences = [f"{name} has {value} {item}."]
    steps = int(rng.integers(min_steps, max_steps + 1))
    for _ in range(steps):
        options = []
        if value + 1 <= MAX_VALUE - 1:
            options.append(_ADD)
        if value >= 2:
            options.append(_SUB)
        if value * 2 <= MAX_VALUE:
            options.append(_MUL)
        if any(value % k == 0 for k in (2, 3, 4, 5)) and value >= 4:
            options.append(_DIV)
        op, phrases = options[rng.integers(len(options))]
        phrase = phrases[rng.integers(len(phrases))]
        if op == "+":
            k = int(rng.integers(1, min(20, MAX_VALUE - value) + 1))
            value += k
        elif op == "-":
            k = int(rng.integers(1, min(20, value - 1) + 1))
            value -= k
        elif op == "*":
            k = 3 if phrase.startswith("triples") and value * 3 <= MAX_VALUE else 2
            phrase = "triples {poss} {item}" if k == 3 else "doubles {poss} {item}"
            value *= k
        else:
            divisors = [k for k in (2, 3, 4, 5) if value % k == 0]
            k = divisors[rng.integers(len(divisors))]
            value //= k
        sentences.append(f"Then {subject} " + phrase.format(k=k, item=item, poss=poss) + ".")
    sentences.append(QUESTION.format(item=item, name=name))
    return Problem(f"p{index:07d}", " ".join(sentences), value, steps)


def make_problems(seed: int, count: int, min_steps: int = 2, max_steps: int = 4) -> list[Problem]:
    rng = np.random.default_rng(seed)
    return [make_problem(rng, i, min_steps, max_steps) for i in range(count)]


def write_corpus(path: str, problems: list[Problem]) -> None:
    """JSONL documents (`id`, `text`, `steps` as metadata, `question` and `answer` for eval)."""
    with open(path, "w") as f:
        for p in problems:
            record = {"id": p.id, "text": p.text, "steps": p.steps}
            record |= {"question": p.question, "answer": p.answer}
            f.write(json.dumps(record) + "\n")


# --- the teacher: parse a document back and reason through it --------------------------------

_START = re.compile(r"(?P<name>[A-Z][a-z]+) has (?P<k>\d+) (?P<item>[a-z]+)\.")
_STEP = re.compile(r"Then (?:he|she) (?P<verb>[a-z]+(?: away)?) (?P<rest>[^.]*)\.")
_VERBS = {"finds": "+", "buys": "+", "gets": "+", "loses": "-", "sells": "-", "gives away": "-"}


def teacher_thinking(document: str) -> str | None:
    """Step-by-step reasoning from a testbed document's story to its answer; None when the
    document is not a testbed problem."""
    start = _START.search(document)
    if start is None:
        return None
    name, value, item = start["name"], int(start["k"]), start["item"]
    lines = [f"{name} starts with {value} {item}."]
    for step in _STEP.finditer(document, start.end()):
        verb, rest = step["verb"], step["rest"]
        number = re.search(r"\d+", rest)
        if verb in _VERBS and number:
            k = int(number.group())
            new = value + k if _VERBS[verb] == "+" else value - k
            lines.append(f"{name} {verb} {k}, so {value} {_VERBS[verb]} {k} = {new}.")
        elif verb in ("doubles", "triples"):
            k = 2 if verb == "doubles" else 3
            new = value * k
            lines.append(f"{name} {verb} them, so {value} * {k} = {new}.")
        elif verb == "splits" and number:
            k = int(number.group())
            new = value // k
            lines.append(f"{name} keeps one of {k} equal piles, so {value} / {k} = {new}.")
        else:
            return None
        value = new
    if len(lines) == 1:
        return None
    lines.append(f"So the answer is {value}.")
    return "\n".join(lines)
