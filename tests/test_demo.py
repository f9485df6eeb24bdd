"""`tpt demo` (shortened) runs the whole pipeline and writes the report; its exported model
reloads in HF transformers and generates greedily exactly what `tpt sample` generates."""

import json
import re
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    args = [sys.executable, "-m", "tpt_jax", "demo", "--out", str(out)]
    args += ["--documents", "1500", "--heldout", "24", "train.steps=40", "schedule.warmup_steps=5"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_report_has_every_section_and_both_plots(demo):
    out, stdout = demo
    report = (out / "report.md").read_text()
    for section in (
        "## Data",
        "## Results on held-out problems",
        "## One held-out problem, side by side",
        "![loss](loss.png)",
        "![accuracy](accuracy.png)",
    ):
        assert section in report, section
    for name in ("vanilla", "tpt"):
        row = re.search(rf"^\| {name} \| ([\d.]+)% \| ([\d.]+) \| ([\d.]+)% \|", report, re.M)
        assert row, name
        assert 0 <= float(row.group(1)) <= 100 and float(row.group(2)) > 0
        assert f"- {name}: `" in report  # its side-by-side output
    # the same training-token budget, so the TPT model sees fewer documents
    seen = dict(re.findall(r"^\| testbed_(\w+) \| [\d,]+ \| [\d,]+ \| [\d.]+% \| ([\d,]+) \|$",
                           report, re.M))  # fmt: skip
    assert int(seen["tpt"].replace(",", "")) < int(seen["vanilla"].replace(",", ""))
    for plot in ("loss.png", "accuracy.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / plot).stat().st_size > 10_000
    for name in ("vanilla", "tpt"):
        metrics = [json.loads(x) for x in (out / "runs" / name / "metrics.jsonl").open()]
        assert metrics[-1]["step"] == 40 and metrics[-1]["loss"] < metrics[0]["loss"]
    assert "report:" in stdout


def test_exported_model_generates_in_transformers_like_tpt_sample(demo):
    import torch
    import transformers

    out, _ = demo
    export = out / "runs" / "tpt" / "export"
    question = json.loads((out / "corpus" / "heldout.jsonl").open().readline())["question"]
    prompt = f"{question}\n<think>\n"
    sample = subprocess.run(
        [sys.executable, "-m", "tpt_jax", "sample", str(out / "runs" / "tpt" / "config.yaml"),
         "--prompt", prompt, "--raw", "--max-new-tokens", "24", f"think.model_dir={export}/model",
         "think.temperature=0", "think.stop=[]", "think.chat_template=false"],
        capture_output=True, text=True, timeout=300,
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
  model_dir: {out}/runs/tpt/export/model
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
