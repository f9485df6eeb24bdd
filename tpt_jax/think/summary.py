"""The summary of a `tpt think` shard: counts, finish reasons, thinking lengths (overall and by a
metadata field such as domain), saved as JSON with a PNG plot of length by group."""

from __future__ import annotations

import collections
import io
import json
import os

import numpy as np

from tpt_jax import storage


def _stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"documents": 0}
    a = np.asarray(lengths)
    return {
        "documents": len(a),
        "mean": float(a.mean()),
        "p10": float(np.percentile(a, 10)),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "max": int(a.max()),
    }


def summarize_shard(folder: str, group_by: str, rejects: str) -> dict:
    from tpt_jax.think.driver import iter_committed

    # One pass over the records, keeping only their lengths: a shard's texts need not fit in memory.
    lengths: list[int] = []
    prompt_tokens, without_thinking = 0, 0
    reasons: collections.Counter[str] = collections.Counter()
    groups: dict[str, list[int]] = collections.defaultdict(list)
    for r in iter_committed(folder):
        meta = r["meta"]
        lengths.append(meta["thinking_tokens"])
        prompt_tokens += meta["prompt_tokens"]
        without_thinking += r["thinking"] is None
        reasons[meta["finish_reason"]] += 1
        if group_by:
            groups[str(meta.get(group_by, "(none)"))].append(meta["thinking_tokens"])
    summary = {
        "documents": len(lengths),
        "prompt_tokens": prompt_tokens,
        "thinking_tokens": sum(lengths),
        "finish_reasons": dict(reasons),
        "without_thinking": without_thinking,
        "thinking_length": _stats(lengths),
        "by_group": {g: _stats(v) for g, v in sorted(groups.items())},
        "group_by": group_by,
        "input": rejects,
    }
    storage.write_bytes(
        os.path.join(folder, "summary.json"), json.dumps(summary, indent=1).encode()
    )
    _plot(
        groups or {"all": lengths},
        group_by or "all documents",
        os.path.join(folder, "thinking_length.png"),
    )
    return summary


def _plot(groups: dict[str, list[int]], label: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [g for g, v in groups.items() if v]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(names) + 2), 4))
    if names:
        ax.boxplot([groups[g] for g in names], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    ax.set_ylabel("thinking tokens")
    ax.set_title(f"Thinking length by {label}")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())


def format_summary(summary: dict) -> str:
    s = summary["thinking_length"]
    lines = [
        f"think: {summary['documents']:,} documents, {summary['thinking_tokens']:,} thinking tokens, "
        f"finish reasons {summary['finish_reasons']}; input: {summary['input']}",
    ]
    if s.get("documents"):
        lines.append(
            f"  thinking length: mean {s['mean']:.0f}, median {s['median']:.0f}, p90 {s['p90']:.0f}"
        )
    for group, g in summary["by_group"].items():
        if g.get("documents"):
            lines.append(
                f"  {summary['group_by']}={group}: {g['documents']} documents, mean {g['mean']:.0f} tokens"
            )
    return "\n".join(lines)
