"""Answer extraction for the testbed's thinking-first eval: "... The answer is 18." (also the
testbed documents' own "Answer: 18.", which a model trained without thinking writes, and GSM8K's
"#### 18"); the first such statement counts. An answer that cannot be extracted
scores 0. (The paper's benchmarks use lm-eval's filters, and math-verify for MATH.)
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


def extract_gsm8k(text: str) -> str | None:
    match = _ANSWER_IS.search(text) or _HASHES.search(text)
    return normalize_number(match.group(1)) if match else None


def score(prediction: str | None, reference) -> float:
    """1.0 when the extracted prediction equals the reference answer (both normalised), else 0."""
    if prediction is None:
        return 0.0
    return float(normalize_number(prediction) == normalize_number(str(reference)))
