"""`tpt demo --quick --all`: the figure and report of both data settings from fewer steps and
seeds; seed 0's model is the one `tpt train` trains from the same config, reloads in HF
transformers and generates what `tpt sample` generates; the curve numerics on known curves."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tpt_jax.demo import _curves

SEEDS, STEPS = 2, 40


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    args = [sys.executable, "-m", "tpt_jax", "demo", "--quick", "--all", "--out", str(out)]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_report_has_a_figure_verdicts_and_read_out_per_setting(demo):
    out, stdout = demo
    report = (out / "report.md").read_text()
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"abundant", "constrained"}
    for setting, r in results.items():
        png = out / f"accuracy_{setting}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"![{setting}](accuracy_{setting}.png)" in report
        # five evaluation points, the last at the end of the budget, per seed and model
        assert len(r["tokens"]) == 5 and r["tokens"] == sorted(r["tokens"])
        assert r["tokens"][-1] == STEPS * 4 * 256
        for model in ("vanilla", "tpt"):
            assert len(r["scores"][model]) == SEEDS
            for seed in r["scores"][model]:
                assert len(seed) == 5
                for point in seed:
                    for measure in ("direct", "think_first"):
                        assert 0 <= point[measure]["accuracy"] <= 1
                        assert point[measure]["count"] == 24
            losses = np.array(r["train_loss"][model])
            assert (
                losses.shape == (STEPS, SEEDS) and (losses[-5:].mean(0) < losses[:5].mean(0)).all()
            )
        for measure in ("thinking-first", "direct-answer"):
            sentence = next(
                line for line in report.splitlines()
                if line.startswith(f"{setting.capitalize()} data, {measure} accuracy at the full budget: ")
            )  # fmt: skip
            assert re.search(
                r"the paper's direction shows|opposite of the paper's|no clear direction", sentence
            )
            assert f"over {SEEDS} seeds each" in sentence
        assert r["verdicts"]["think_first"] in report
    # the same budget: abundant repeats nothing; constrained has TPT read each document about
    # once while vanilla (shorter documents) repeats them
    abundant, constrained = results["abundant"]["epochs"], results["constrained"]["epochs"]
    assert abundant["vanilla"] < 1 and abundant["tpt"] < 1
    assert 0.8 <= constrained["tpt"] <= 1.2 and constrained["vanilla"] > 1.5
    assert "needs" in report or "does not reach it within the budget" in report
    assert "One held-out problem, side by side" in report
    assert "answer loss (nats summed per answer)" in stdout and "report:" in stdout


def test_seed_zero_is_what_tpt_train_trains(demo, tmp_path):
    import jax

    from tpt_jax.config import load_config
    from tpt_jax.model import param_shapes, restore_params
    from tpt_jax.train import restore_latest

    out, _ = demo
    config = out / "models" / "tpt" / "config.yaml"
    overrides = [f"checkpoint.output_dir={tmp_path}", "checkpoint.run_name=seed0"]
    result = subprocess.run(
        [sys.executable, "-m", "tpt_jax", "train", str(config), *overrides],
        capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""},
    )  # one device, as the demo trains  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = load_config(str(config), overrides)
    state, _ = restore_latest(cfg, str(tmp_path / "seed0"), jax.devices()[:1])
    assert int(state.step) == STEPS
    ours = restore_params(str(out / "models" / "tpt" / "model"), param_shapes(cfg.model))
    # equal up to summation order (vmapped vs one model): another seed differs by ~100%
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(ours), strict=True
    ):
        a, b = np.asarray(a), np.asarray(b)
        assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b), path
        assert np.abs(a - b).max() < 1e-3, path

    # exported on this machine's 8 devices, more than the run's batch of 4 rows: the export
    # needs no training batch, so the device count it trained on does not matter
    export = subprocess.run(
        [sys.executable, "-m", "tpt_jax", "export", str(config), str(tmp_path / "export"),
         *overrides], capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    exported = restore_params(str(tmp_path / "export" / "model"), param_shapes(cfg.model))
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(exported), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_exported_model_generates_in_transformers_like_tpt_sample(demo):
    import torch
    import transformers

    out, _ = demo
    export = out / "models" / "tpt"
    question = json.loads((out / "corpus" / "heldout.jsonl").open().readline())["question"]
    prompt = f"{question}\n<think>\n"
    sample = subprocess.run(
        [sys.executable, "-m", "tpt_jax", "sample", str(export / "config.yaml"),
         "--prompt", prompt, "--raw", "--max-new-tokens", "24", f"think.model_dir={export}/model",
         "think.temperature=0", "think.stop=[]", "think.chat_template=false"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""},
    )  # fmt: skip
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert sample.stdout.startswith(f"=== {prompt}\n")
    ours = sample.stdout[len(f"=== {prompt}\n") :].rstrip("\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(export / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(export / "hf", dtype=torch.float32)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    generated = generated.tolist()
    if tokenizer.eos_token_id in generated:
        generated = generated[: generated.index(tokenizer.eos_token_id)]
    assert len(generated) > 0
    assert tokenizer.decode(generated) == ours


def test_eval_command_on_the_exported_model(demo, tmp_path):
    out, _ = demo
    heldout = [json.loads(x) for x in (out / "corpus" / "heldout.jsonl").open()]
    gsm = tmp_path / "gsm8k.jsonl"  # the held-out problems in GSM8K's fields
    with gsm.open("w") as f:
        for p in heldout[:6]:
            f.write(json.dumps({"question": p["question"], "answer": f"#### {p['answer']}"}) + "\n")
    config = tmp_path / "eval.yaml"
    config.write_text(
        f"""
eval:
  model_dir: {out}/models/tpt/model
  output: {tmp_path}/eval.json
  tasks:
    - {{name: heldout_ppl, kind: perplexity, path: {out}/corpus/heldout.jsonl, limit: 8}}
    - {{name: gsm8k, kind: lm_eval, task: gsm8k_cot, path: {gsm}, shots: 2, max_new_tokens: 48}}
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "tpt_jax", "eval", str(config)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert results["heldout_ppl"]["tokens"] > 8 and 1 < results["heldout_ppl"]["perplexity"] < 512
    assert 0 <= results["gsm8k"]["exact_match,strict-match"] <= 1
    samples = [json.loads(x) for x in (tmp_path / "eval.samples_gsm8k.jsonl").open()]
    assert {s["doc_id"] for s in samples} == set(range(6))  # (one row per filter)
    prompt = next(s for s in samples if s["doc_id"] == 0)["arguments"][0][0]
    assert prompt.count("Q: ") == 3  # lm-eval's two worked exemplars, then the held-out question
    assert prompt.endswith(f"Q: {heldout[0]['question']}\nA:")
    assert "heldout_ppl  perplexity" in result.stdout


def test_a_killed_demo_keeps_the_models_it_finished_and_reruns_only_the_rest(demo, tmp_path):
    """kill -9 while the TPT model trains; the rerun into the same folder reuses the vanilla
    model's curves (it never retrains them) and ends with the results of an uninterrupted run.
    A rerun with other settings retrains."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "tpt_jax", "demo", "--quick", "--all", "--out", str(out)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen = []
    for line in first.stdout:
        seen.append(line)
        if "abundant tpt step" in line:  # the vanilla model is done, the TPT model is training
            first.kill()
            break
    first.wait(timeout=60)
    assert first.returncode == -9, "".join(seen)[-2000:]

    rerun = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "abundant vanilla: reusing" in rerun.stdout
    assert "abundant vanilla step" not in rerun.stdout  # neither trained nor scored again
    assert "abundant tpt step" in rerun.stdout and "constrained vanilla step" in rerun.stdout
    reference, _ = demo
    ours = json.loads((out / "results.json").read_text())
    theirs = json.loads((reference / "results.json").read_text())
    for setting in ("abundant", "constrained"):  # (the prepared files' paths differ)
        for key in ("tokens", "scores", "train_loss", "verdicts", "efficiency", "epochs"):
            assert ours[setting][key] == theirs[setting][key], (setting, key)
    assert (out / "models" / "vanilla" / "hf" / "config.json").exists()

    again = subprocess.run(
        [*args[:-3], "--seeds", "1", "--out", str(out)], capture_output=True, text=True, timeout=900
    )  # the abundant setting alone, with one seed: nothing to reuse
    assert again.returncode == 0, again.stderr[-3000:]
    assert "reusing" not in again.stdout and "abundant vanilla step" in again.stdout
    assert len(json.loads((out / "results.json").read_text())["abundant"]["scores"]["tpt"]) == 1


# --- the read-out's numerics on curves whose answer is known ---------------------------------

TOKENS = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])


def test_tokens_to_reach_interpolates_between_points_and_says_never():
    curve = np.array([0.0, 0.1, 0.2, 0.4, 0.5, 0.6])
    assert _curves.tokens_to_reach(TOKENS, curve, 0.3) == pytest.approx(3.5)
    assert _curves.tokens_to_reach(TOKENS, curve, 0.0) == 1.0
    assert _curves.tokens_to_reach(TOKENS, curve, 0.6) == 6.0
    assert np.isnan(_curves.tokens_to_reach(TOKENS, curve, 0.61))


def test_efficiency_reads_a_threefold_advantage_and_a_plateau():
    vanilla = np.array([[0.0, 0.1, 0.2, 0.3, 0.4, 0.5]] * 3)  # 0.1 per token
    tpt = np.array([[0.1, 0.3, 0.5, 0.6, 0.6, 0.6]] * 3)
    e = _curves.efficiency(TOKENS, vanilla, tpt)
    assert e["reference_tokens"] == 2.0 and e["target"] == pytest.approx(0.3)  # a third of 6
    assert e["vanilla_tokens"] == pytest.approx(4.0) and e["ratio"] == pytest.approx(2.0)
    assert e["reached_share"] == 1.0 and e["ratio_low"] == pytest.approx(2.0)
    plateau = np.array([[0.0, 0.1, 0.2, 0.2, 0.2, 0.2]] * 3)
    e = _curves.efficiency(TOKENS, plateau, tpt)
    assert np.isnan(e["vanilla_tokens"]) and e["reached_share"] == 0.0


def test_verdict_says_which_way_and_whether_the_seeds_overlap():
    low = np.array([[0.1] * 6, [0.12] * 6, [0.11] * 6])
    high = low + 0.2
    text = _curves.verdict("direct", "abundant", low, high, 0.05, 200)
    assert "the paper's direction shows" in text and "most frequent" not in text
    assert "opposite of the paper's direction" in _curves.verdict(
        "direct", "abundant", high, low, 0.05, 200
    )
    mixed = np.array([[0.1] * 6, [0.35] * 6, [0.2] * 6])
    text = _curves.verdict("direct", "constrained", low + 0.05, mixed, 0.05, 200)
    assert "no clear direction" in text and "TPT ahead by" in text
    assert text.startswith("Constrained data, direct at the full budget: ")
    # TPT ahead of vanilla, but at the level of always giving the most frequent answer (7%):
    # 0.08 is within two standard errors of 0.07 over 100 problems
    text = _curves.verdict("direct", "abundant", low * 0, low * 0 + 0.08, 0.07, 100)
    assert "the paper's direction shows" in text
    assert text.endswith("neither mean is clearly above always giving the most frequent answer "
                         "(7.0%), so this does not test the paper's claim.")  # fmt: skip


def test_a_rerun_with_another_sample_pairs_each_document_with_its_own_thinking(tmp_path):
    """`tpt demo data.seed=1` into the folder of a `data.seed=0` run: the documents' ids repeat
    (p0000000, ...) with other texts; each must get its own thinking, not the earlier run's."""
    from tpt_jax.config import load_config
    from tpt_jax.data import testbed
    from tpt_jax.demo import _data

    for seed in (0, 1):
        cfg = load_config("configs/demo.yaml", [f"data.seed={seed}"])
        corpus = _data.make_corpus(cfg, str(tmp_path), 300, 8)
        for r in corpus.records:
            assert r["thinking"] == testbed.teacher_thinking(r["text"]), (seed, r["id"])
        assert [r["text"] for r in corpus.records] == [
            p.text for p in testbed.make_problems(seed, 300)
        ]
