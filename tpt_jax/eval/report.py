"""The vanilla-vs-TPT report of `tpt demo`: report.md, loss.png and accuracy.png."""

from __future__ import annotations

import os


def _plot_losses(results: dict, tokens_per_step: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, r in results.items():
        steps = [m["step"] for m in r["metrics"] if "loss" in m]
        losses = [m["loss"] for m in r["metrics"] if "loss" in m]
        ax.plot([s * tokens_per_step for s in steps], losses, label=name)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("training loss (nats/token, on its own data)")
    ax.set_title("Training loss at the same token budget")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_accuracy(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    panels = [
        ("direct answer accuracy", lambda r: 100 * r["scores"]["direct"]["accuracy"], "%"),
        ("thinking-first accuracy", lambda r: 100 * r["scores"]["think_first"]["accuracy"], "%"),
        ("answer-token loss (lower is better)", lambda r: r["scores"]["direct"]["answer_loss"], "nats"),
        ("documents seen in training", lambda r: r["documents_seen"], "documents"),
    ]  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(14, 3.6))
    for ax, (title, value, unit) in zip(axes, panels, strict=True):
        values = [value(results[n]) for n in names]
        bars = ax.bar(names, values, color=["#888888", "#d9822b"][: len(names)])
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values])
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit)
    fig.suptitle("Held-out testbed problems: vanilla vs TPT at the same training-token budget")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    out_dir: str, cfg, results: dict, tasks: dict, think_summary: dict, seconds: float
) -> str:
    t = cfg.train
    tokens_per_step = t.global_batch * t.seq_len
    _plot_losses(results, tokens_per_step, os.path.join(out_dir, "loss.png"))
    _plot_accuracy(results, os.path.join(out_dir, "accuracy.png"))
    lines = [
        "# TPT demo: vanilla vs thinking-augmented pre-training on the synthetic testbed",
        "",
        f"Both models: {cfg.model.num_layers} layers, hidden {cfg.model.hidden_size}, "
        f"{t.steps} steps of {t.global_batch} x {t.seq_len} tokens = "
        f"{t.steps * tokens_per_step:,} training tokens each. Finished in {seconds:.0f} s.",
        "",
        "## Data",
        "",
        "| task | documents | tokens | thinking share | documents seen in training |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        task = tasks[f"testbed_{name}"]
        lines.append(
            f"| testbed_{name} | {task['documents']:,} | {task['tokens']:,} | "
            f"{task['thinking_token_share']:.1%} | {r['documents_seen']:,.0f} |"
        )
    by_steps = think_summary.get("by_group", {})
    if by_steps:
        lengths = ", ".join(f"{k} steps: {v['mean']:.1f}" for k, v in by_steps.items())
        lines += ["", f"Mean thinking length (teacher words) by reasoning steps: {lengths}."]
    lines += [
        "",
        "## Results on held-out problems",
        "",
        "| model | direct answer accuracy | answer-token loss | thinking-first accuracy | "
        "answer extracted | final training loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        d, f = r["scores"]["direct"], r["scores"]["think_first"]
        final = [m["loss"] for m in r["metrics"] if "loss" in m][-1]
        lines.append(
            f"| {name} | {d['accuracy']:.1%} | {d['answer_loss']:.3f} | {f['accuracy']:.1%} | "
            f"{f['extracted']:.1%} | {final:.3f} |"
        )
    lines += [
        "",
        "(a) *Direct*: the question, then ` Answer:`; the loss is the answer tokens' NLL (nats, "
        "summed per answer, averaged over problems), the accuracy that of the greedy answer. "
        "(b) *Thinking first*: the question, then the opening think tag; the model writes its "
        "reasoning through the engine and `answer is N` is extracted (no match scores 0). The "
        "training losses are not comparable across models: each is measured on its own data.",
        "",
        "![loss](loss.png)",
        "",
        "![accuracy](accuracy.png)",
        "",
        "## One held-out problem, side by side",
        "",
    ]
    for kind in ("direct", "think_first"):
        example = {n: r["scores"][kind]["examples"][0] for n, r in results.items()}
        first = next(iter(example.values()))
        prompt = first["prompt"].replace("\n", " / ")
        lines += [f"**{kind}** prompt: `{prompt}` (answer {first['answer']})", ""]
        for name, e in example.items():
            text = e["completion"].strip().replace("\n", " / ")
            verdict = "correct" if e["correct"] else "wrong"
            lines.append(f"- {name}: `{text}` -> {e['prediction']} ({verdict})")
        lines.append("")
    lines += [
        "## Where things are",
        "",
        *(
            f"- {n}: run {r['run_dir']} (TensorBoard, metrics.jsonl), HF export {r['hf_dir']}"
            for n, r in results.items()
        ),
    ]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
