"""Answer extraction for the testbed's thinking-first eval: "... The answer is 18." (also the
testbed documents' own "Answer: 18.", which a model trained without thinking writes, and GSM8K's
"#### 18"); by default the first such statement counts, with `last=True` the last one (the
conclusion of a chain of thought, as lm-eval's flexible extraction takes it). An answer that
cannot be extracted scores 0. (The paper's benchmarks use lm-eval's filters, and math-verify
for MATH.)
"""

from __future__ import annotations

import re

_ANSWER_IS = re.compile(r"answer(?:\s+is)?\s*:?\s*\$?(-?[\d,]*\.?\d+)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*\$?(-?[\d,]*\.?\d+)")


def normalize_number(text: str) -> str:
    """'1,234.50' -> '1234.5', '18.' -> '18', '-0' -> '0'; other text is stripped and kept."""
    text = text.strip().rstrip(".").replace(",", "").lstrip("$")
    try:
        value = float(text)
    except ValueError:
        return text
    if value == int(value):
        return str(int(value))
    return repr(value)


def extract_gsm8k(text: str, last: bool = False) -> str | None:
    matches = list(_ANSWER_IS.finditer(text)) or list(_HASHES.finditer(text))
    if not matches:
        return None
    return normalize_number(matches[-1 if last else 0].group(1))


def score(prediction: str | None, reference) -> float:
    """1.0 when the extracted prediction equals the reference answer (both normalised), else 0."""
    if prediction is None:
        return 0.0
    return float(normalize_number(prediction) == normalize_number(str(reference)))
