"""Pure numerics of the demo's curves: spread over seeds, the data-efficiency read-out, and the
one-sentence verdict. Accuracies are fractions in [0, 1]; tokens are training tokens per model.
"""

from __future__ import annotations

import numpy as np

BOOTSTRAP_DRAWS = 2000


def spread(acc: np.ndarray) -> dict:
    """acc [S seeds, P points] -> {"mean", "std", "low", "high"}, each [P] (low/high: min/max)."""
    acc = np.asarray(acc, np.float64)
    return {
        "mean": acc.mean(0),
        "std": acc.std(0, ddof=1) if acc.shape[0] > 1 else np.zeros(acc.shape[1]),
        "low": acc.min(0),
        "high": acc.max(0),
    }


def tokens_to_reach(tokens: np.ndarray, curve: np.ndarray, target: float) -> float:
    """First training-token count at which `curve` [P] (measured at `tokens` [P], increasing)
    reaches `target`, linearly interpolated between evaluation points; nan if it never does."""
    above = np.flatnonzero(curve >= target)
    if above.size == 0:
        return float("nan")
    i = int(above[0])
    if i == 0:
        return float(tokens[0])
    t0, t1, a0, a1 = tokens[i - 1], tokens[i], curve[i - 1], curve[i]
    return float(t0 + (target - a0) / (a1 - a0) * (t1 - t0))


def reference_index(tokens: np.ndarray) -> int:
    """The evaluation point nearest a third of the budget: a 3x advantage (the paper's) would
    still be visible within the budget."""
    return int(np.argmin(np.abs(np.asarray(tokens) - tokens[-1] / 3)))


def efficiency(tokens: np.ndarray, vanilla: np.ndarray, tpt: np.ndarray, seed: int = 0) -> dict:
    """Tokens the vanilla model needs to reach the TPT model's mean accuracy at the reference
    point, from the seeds' mean curves; the uncertainty by a bootstrap over seeds (each model's
    seeds resampled with replacement).

    Args:
        tokens: [P] evaluation points; vanilla, tpt: [S, P] accuracies per seed.

    Returns:
        {"reference_tokens", "target" (TPT's mean accuracy there), "vanilla_tokens" (nan: not
        reached), "ratio" (vanilla_tokens / reference_tokens), "ratio_low"/"ratio_high" (10th
        and 90th percentile of the reached draws), "reached_share" (draws in which vanilla
        reaches the target within the budget)}.
    """
    tokens = np.asarray(tokens, np.float64)
    ref = reference_index(tokens)
    target = float(np.mean(tpt[:, ref]))
    needed = tokens_to_reach(tokens, np.mean(vanilla, 0), target)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(BOOTSTRAP_DRAWS):
        v = vanilla[rng.integers(len(vanilla), size=len(vanilla))].mean(0)
        t = tpt[rng.integers(len(tpt), size=len(tpt)), ref].mean()
        draws.append(tokens_to_reach(tokens, v, t) / tokens[ref])
    draws = np.asarray(draws)
    reached = draws[np.isfinite(draws)]
    return {
        "reference_tokens": float(tokens[ref]),
        "target": target,
        "vanilla_tokens": needed,
        "ratio": needed / tokens[ref],
        "ratio_low": float(np.percentile(reached, 10)) if reached.size else float("nan"),
        "ratio_high": float(np.percentile(reached, 90)) if reached.size else float("nan"),
        "reached_share": float(reached.size / draws.size),
    }


def above_chance(accuracy: float, chance: float, problems: int) -> bool:
    """Clearly above `chance` (always giving the most frequent answer): by more than two binomial
    standard errors of `chance` over `problems` held-out problems."""
    return accuracy > chance + 2 * np.sqrt(chance * (1 - chance) / max(problems, 1))


def verdict(
    measure: str, setting: str, vanilla: np.ndarray, tpt: np.ndarray, chance: float, problems: int
) -> str:
    """One sentence: does the paper's direction (TPT above vanilla at equal tokens) show at the
    end of training, given the seeds' spread, and is either model above chance at all?
    vanilla, tpt: [S, P] accuracies; chance: the most-frequent-answer accuracy."""
    v, t = vanilla[:, -1], tpt[:, -1]
    gap = 100 * (t.mean() - v.mean())
    ranges = (
        f"TPT {100 * t.mean():.1f}% (seeds {100 * t.min():.1f}-{100 * t.max():.1f}%) vs vanilla "
        f"{100 * v.mean():.1f}% ({100 * v.min():.1f}-{100 * v.max():.1f}%) over {len(t)} seeds each"
    )
    if t.min() > v.max():
        read = f"the paper's direction shows: TPT is ahead by {gap:.1f} points and every TPT seed beats every vanilla seed"
    elif v.min() > t.max():
        read = f"the opposite of the paper's direction shows: vanilla is ahead by {-gap:.1f} points and every vanilla seed beats every TPT seed"
    else:
        lead = "TPT" if gap > 0 else "vanilla"
        means = (
            f"{lead} ahead by {abs(gap):.1f} points on the mean" if round(gap, 1) else "equal means"
        )
        read = f"no clear direction: the seeds' ranges overlap ({means})"
    if not above_chance(max(t.mean(), v.mean()), chance, problems):
        ranges += (
            f"; but neither mean is clearly above always giving the most frequent answer "
            f"({100 * chance:.1f}%), so this does not test the paper's claim"
        )
    return f"{setting.capitalize()} data, {measure} at the full budget: {read}; {ranges}."
