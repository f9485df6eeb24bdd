"""`tpt prepare` with a base model's own tokenizer.json (mid-training data in the model's ids)."""

import json

import numpy as np
from think_fixtures import make_generator

from tpt_jax.config import load_config
from tpt_jax.generate import GeneratorTokenizer


def test_prepare_with_a_tokenizer_json(tmp_path):
    from tpt_jax.data import rows
    from tpt_jax.data.prepare import run_prepare

    make_generator(str(tmp_path / "gen"))
    docs = [
        {"text": "three apples cost six dollars", "thinking": "so each step"},
        {"text": "the train speed", "thinking": "two hour"},
    ]
    with open(tmp_path / "c.jsonl", "w") as f:
        f.write("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "cfg.yaml").write_text(
        f"""
train: {{seq_len: 64}}
data:
  vocab_path: {tmp_path}/gen/tokenizer.json
  prepared_dir: {tmp_path}/prepared
  tpt_template: "{{text}} <think> {{thinking}} </think>"
  corpora: [{{name: c, paths: ["{tmp_path}/c.jsonl"]}}]
  mixture: [{{task: c_tpt, rate: 1.0}}]
"""
    )
    manifest = run_prepare(load_config(str(tmp_path / "cfg.yaml")))
    tok = GeneratorTokenizer(str(tmp_path / "gen"))
    samples = [tok.encode(f"{d['text']} <think> {d['thinking']} </think>") for d in docs]
    task = manifest["tasks"]["c_tpt"]
    assert task["documents"] == 2 and task["tokens"] == sum(len(s) + 1 for s in samples)
    reader = rows.RowsReader(str(tmp_path / "prepared" / task["files"][0]["path"]))
    fields = rows.decode(reader.read(np.array([0])))
    targets = fields["targets"][fields["segment_ids"] > 0].tolist()
    expected = [t for s in samples for t in (*s, tok.eos_id)]
    assert targets == expected  # the model's own ids, EOS after each sample
    pieces = len(json.loads((tmp_path / "gen" / "tokenizer.json").read_text())["model"]["vocab"])
    assert reader.meta["token_dtype"] == rows.token_dtype(pieces)
