"""Few-shot chain-of-thought prompts in the paper's formats (GSM8K 5-shot, MATH 4-shot).

Records are JSONL with `question` and `answer` (the final answer); exemplars also carry a
`solution` (the worked reasoning, ending in the answer statement the extractor looks for).
"""

from __future__ import annotations

FORMATS = {
    # (exemplar, query, stop strings)
    "gsm8k": ("Question: {question}\nAnswer: {solution}\n\n", "Question: {question}\nAnswer:",
              ("\n\nQuestion:", "\n\n\n")),
    "math": ("Problem:\n{question}\n\nSolution:\n{solution}\n\n", "Problem:\n{question}\n\nSolution:",
             ("\n\nProblem:", "\n\n\n")),
}  # fmt: skip


def build_prompt(style: str, exemplars: list[dict], question: str) -> str:
    shot, query, _ = FORMATS[style]
    return "".join(shot.format(**e) for e in exemplars) + query.format(question=question)


def stop_strings(style: str) -> tuple[str, ...]:
    return FORMATS[style][2]
