"""MATH answers scored by math-verify: the final answer of a generation and the reference
solution's, compared as mathematical objects (1/2 = 0.5 = \\dfrac12, x=5 ~ 5, [2,5) as an
interval), not as strings. An answer math-verify cannot read scores 0."""

from __future__ import annotations


def verdict(solution: str, generation: str) -> bool:
    """math-verify's verdict: does the generation's answer equal the solution's?

    Args:
        solution: the reference solution (its \\boxed{} answer, or any text math-verify parses).
        generation: the model's text.
    """
    from math_verify import parse, verify

    gold = parse(solution)
    return bool(gold) and bool(verify(gold, parse(generation)))


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """lm-eval's per-document metric for MATH-style tasks: {"math_verify": 0 or 1}."""
    return {"math_verify": int(verdict(doc["solution"], results[0]))}
