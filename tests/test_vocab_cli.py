"""`tpt vocab train` from a config's corpora; the think tags are single pieces."""

import json
import subprocess
import sys

import sentencepiece as spm


def test_vocab_train_cli(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    with open(tmp_path / "c.jsonl", "w") as f:
        for i in range(200):
            f.write(
                json.dumps(
                    {
                        "text": " ".join(words[(i + j) % 6] for j in range(12)),
                        "thinking": "zeta " * 3,
                    }
                )
                + "\n"
            )
        f.write("not json\n")
    (tmp_path / "cfg.yaml").write_text(
        f'data: {{corpora: [{{name: c, paths: ["{tmp_path}/c.jsonl"]}}]}}\n'
    )
    out = tmp_path / "v.model"
    args = [
        sys.executable,
        "-m",
        "tpt_jax",
        "vocab",
        "train",
        str(tmp_path / "cfg.yaml"),
        "--vocab-size",
        "300",
    ]
    result = subprocess.run([*args, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "sha256:" in result.stdout and "1 records skipped: 1 malformed JSON" in result.stdout
    sp = spm.SentencePieceProcessor(model_file=str(out))
    assert "<think>" in sp.encode("a <think> b", out_type=str)
    assert "</think>" in sp.encode("b </think>", out_type=str)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2)
    strict = subprocess.run(
        [*args, "--out", str(tmp_path / "strict.model"), "data.strict=true"],
        capture_output=True,
        text=True,
    )
    assert strict.returncode == 2 and "c.jsonl:201: malformed JSON" in strict.stderr
    assert not (tmp_path / "strict.model").exists()
