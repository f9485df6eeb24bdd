"""Answer extraction for generation evals. An answer that cannot be extracted scores 0.

Formats (the paper's base-model evals):
  gsm8k:  "... The answer is 18." (also GSM8K's own "#### 18"); the first such statement counts.
  math:   the last \\boxed{...} (balanced braces), as MATH solutions mark their result.
"""

from __future__ import annotations

import re

_ANSWER_IS = re.compile(r"answer is\s*:?\s*\$?(-?[\d,]*\.?\d+)", re.IGNORECASE)
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


def extract_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return normalize_number(text[i:j])
    return None  # unbalanced: the generation was cut


EXTRACTORS = {"gsm8k": extract_gsm8k, "math": extract_boxed}


def score(prediction: str | None, reference) -> float:
    """1.0 when the extracted prediction equals the reference answer (both normalised), else 0."""
    if prediction is None:
        return 0.0
    return float(normalize_number(prediction) == normalize_number(str(reference)))
