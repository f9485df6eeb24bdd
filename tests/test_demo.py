"""`tpt demo` (shortened) runs end to end: training, held-out eval, HF export round trip."""

import json
import subprocess
import sys


def test_short_demo(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tpt_jax",
            "demo",
            "--out",
            str(out),
            "train.steps=30",
            "schedule.warmup_steps=5",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    assert "max logit difference 0.00e+00" in result.stdout
    records = [
        json.loads(line)
        for line in (out / "runs" / "demo" / "metrics.jsonl").read_text().splitlines()
    ]
    assert records[-1]["step"] == 30 and records[-1]["loss"] < records[0]["loss"]
    assert (out / "hf" / "model.safetensors").exists() and (out / "hf" / "config.json").exists()
