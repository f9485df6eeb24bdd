"""The demo's figure (held-out accuracy against training tokens, vanilla vs TPT, mean and spread
over seeds) and report.md: one section per data setting, each with its verdicts."""

from __future__ import annotations

import os

import numpy as np

from tpt_jax.demo import _curves

MEASURES = (("think_first", "thinking-first accuracy"), ("direct", "direct-answer accuracy"))
COLORS = {"vanilla": "#555555", "tpt": "#d9822b"}
LABELS = {"vanilla": "vanilla", "tpt": "TPT (with thinking)"}


def accuracies(setting: dict, model: str, measure: str) -> np.ndarray:
    """[S seeds, P points] accuracies of one model on one measure."""
    return np.array(
        [[point[measure]["accuracy"] for point in seed] for seed in setting["scores"][model]]
    )


def plot(setting: dict, title: str, path: str) -> None:
    """One PNG, two panels (thinking-first, direct): per model the seeds' mean (line), their
    min-max band and each seed (thin lines); the majority-answer baseline dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = np.asarray(setting["tokens"]) / 1e6
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=False)
    for ax, (measure, name) in zip(axes, MEASURES, strict=True):
        for model in ("vanilla", "tpt"):
            acc = 100 * accuracies(setting, model, measure)
            s = _curves.spread(acc)
            ax.fill_between(tokens, s["low"], s["high"], color=COLORS[model], alpha=0.2, lw=0)
            for row in acc:
                ax.plot(tokens, row, color=COLORS[model], lw=0.6, alpha=0.5)
            ax.plot(tokens, s["mean"], "o-", color=COLORS[model], lw=2, ms=4,
                    label=f"{LABELS[model]}, mean of {len(acc)} seeds")  # fmt: skip
        ax.axhline(100 * setting["majority_accuracy"], color="#999999", ls="--", lw=1,
                   label="always the most frequent answer")  # fmt: skip
        ax.set_title(f"held-out {name}", fontsize=10)
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("% correct")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _efficiency_line(measure_name: str, e: dict, chance: float, problems: int) -> str:
    ref = f"{e['reference_tokens'] / 1e6:.2f}M tokens"
    head = f"- {measure_name}: TPT reaches {_pct(e['target'])} (mean over seeds) at {ref}; vanilla "
    if np.isfinite(e["vanilla_tokens"]):
        head += f"needs {e['vanilla_tokens'] / 1e6:.2f}M tokens, {e['ratio']:.1f}x as many"
    else:
        head += "does not reach it within the budget"
    spread = f"bootstrap over seeds: vanilla reaches it in {_pct(e['reached_share'])} of draws"
    if e["reached_share"] > 0:
        spread += f", needing {e['ratio_low']:.1f}x-{e['ratio_high']:.1f}x (10th-90th percentile)"
    line = f"{head} ({spread})."
    if not _curves.above_chance(e["target"], chance, problems):
        line += (
            " TPT's accuracy there is not clearly above chance: this read-out means nothing yet."
        )
    return line


def setting_section(name: str, setting: dict, png: str) -> list[str]:
    tasks, seen = setting["tasks"], setting["epochs"]
    lines = [
        f"## {name.capitalize()} data",
        "",
        setting["description"],
        "",
        "| model | unique documents | tokens of one pass | epochs in the budget |",
        "|---|---|---|---|",
    ]
    for model in ("vanilla", "tpt"):
        task = tasks[f"testbed_{model}"]
        lines.append(
            f"| {model} | {task['documents']:,} | {task['tokens']:,} | {seen[model]:.2f} |"
        )
    lines += ["", f"![{name}]({png})", ""]
    lines += [setting["verdicts"][m] for m, _ in MEASURES]
    lines += ["", "Data efficiency (the paper reports about 3x):", ""]
    lines += [
        _efficiency_line(
            n, setting["efficiency"][m], setting["majority_accuracy"], setting["heldout"]
        )
        for m, n in MEASURES
    ]
    lines += [
        "",
        "| training tokens | " + " | ".join(
            f"{model} {short}" for short in ("thinking-first", "direct", "answer loss")
            for model in ("vanilla", "TPT")
        ) + " |",
        "|---" * 7 + "|",
    ]  # fmt: skip
    cells = {}
    for model in ("vanilla", "tpt"):
        for measure, _ in MEASURES:
            cells[model, measure] = _curves.spread(accuracies(setting, model, measure))
        cells[model, "loss"] = _curves.spread(
            np.array(
                [[p["direct"]["answer_loss"] for p in seed] for seed in setting["scores"][model]]
            )
        )
    for i, tokens in enumerate(setting["tokens"]):
        row = [f"{tokens / 1e6:.2f}M"]
        for key in ("think_first", "direct"):
            for model in ("vanilla", "tpt"):
                s = cells[model, key]
                row.append(f"{_pct(s['mean'][i])} ± {_pct(s['std'][i])}")
        for model in ("vanilla", "tpt"):
            s = cells[model, "loss"]
            row.append(f"{s['mean'][i]:.2f} ± {s['std'][i]:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "(mean ± standard deviation over seeds; the answer loss is the NLL of the answer's "
        "tokens right after ` Answer:`, in nats summed over the answer's tokens, averaged over "
        f"problems. Held-out problems: {setting['heldout']}; always answering the most frequent "
        f"training answer scores {_pct(setting['majority_accuracy'])}.)",
        "",
        "One held-out problem, side by side (seed 0, end of training):",
        "",
    ]
    for measure, measure_name in MEASURES:
        examples = {
            m: setting["scores"][m][0][-1][measure]["examples"][0] for m in ("vanilla", "tpt")
        }
        first = examples["vanilla"]
        prompt = first["prompt"].replace("\n", " / ")
        lines += [f"**{measure_name}** prompt: `{prompt}` (answer {first['answer']})", ""]
        for model, e in examples.items():
            text = e["completion"].strip().replace("\n", " / ")
            verdict = "correct" if e["correct"] else "wrong"
            lines.append(f"- {model}: `{text}` -> {e['prediction']} ({verdict})")
        lines.append("")
    return lines


def write(out_dir: str, header: list[str], settings: dict, footer: list[str]) -> str:
    """report.md (and one PNG per setting) in out_dir; returns the report's path."""
    lines = list(header)
    for name, setting in settings.items():
        png = f"accuracy_{name}.png"
        title = (
            f"TPT vs vanilla pre-training, {name} data: held-out accuracy of the synthetic "
            f"testbed\n({setting['model_line']}, {len(setting['scores']['tpt'])} seeds per model)"
        )
        plot(setting, title, os.path.join(out_dir, png))
        lines += setting_section(name, setting, png)
    lines += footer
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
