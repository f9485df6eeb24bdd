"""`tpt prepare` with a base model's own tokenizer.json (mid-training data in the model's ids)."""

import json

import numpy as np
from think_fixtures import make_generator

from tpt_jax.config import load_config
from tpt_jax.think.tokenizer import GeneratorTokenizer


def test_prepare_with_a_tokenizer_json(tmp_path):
    from array_record.python import array_record_module

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
    reader = array_record_module.ArrayRecordReader(
        str(tmp_path / "prepared" / task["files"][0]["path"])
    )
    row = np.frombuffer(reader.read(), np.int32).reshape(3, 64)  # inputs, targets, segments
    targets = row[1][row[2] > 0].tolist()
    expected = [t for s in samples for t in (*s, tok.eos_id)]
    assert targets == expected  # the model's own ids, EOS after each sample
