"""`tpt think`: crash safety under SIGKILL, exactly-once output, bad documents, summary and plot."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from think_fixtures import make_generator

from tpt_jax.generate import GeneratorTokenizer
from tpt_jax.think.driver import committed_records, shard_folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("think")
    make_generator(str(root / "gen"))
    with open(root / "docs.jsonl", "wb") as f:
        for i in range(40):
            words = " ".join(
                ["three apples cost six dollars", "the train speed", "so each step"][i % 3]
                for _ in range(1 + i % 7)
            )
            f.write(
                json.dumps(
                    {"id": f"d{i}", "text": words, "domain": ["math", "physics"][i % 2]}
                ).encode()
                + b"\n"
            )
        f.write(b'{"id": "empty", "text": "   "}\n')
        f.write(b'{"id": "bytes", "text": "caf\xe9"}\n')
        long_text = " ".join(["apples"] * 500)
        f.write(json.dumps({"id": "long", "text": long_text, "domain": "math"}).encode() + b"\n")
    return root


def _config(root, out, extra=""):
    path = root / f"{out}.yaml"
    path.write_text(
        f"""
think:
  model_dir: {root}/gen
  output_dir: {root}/{out}
  corpus: {{name: docs, paths: ["{root}/docs.jsonl"], meta_fields: [domain]}}
  max_document_tokens: 64
  max_new_tokens: 24
  temperature: 0.0
  chunk_size: 4
  max_concurrent_decodes: 4
  group_by: domain
{extra}"""
    )
    return str(path)


def _think(config, *args):
    return [sys.executable, "-m", "tpt_jax", "think", config, *args]


def test_chat_template_and_truncation(setup):
    tok = GeneratorTokenizer(str(setup / "gen"))
    assert (
        tok.chat("three apples")
        == "<|im_start|>user\nthree apples<|im_end|>\n<|im_start|>assistant\n"
    )
    text, cut = tok.truncate("the train speed so each step", 3)
    assert (text, cut) == ("the train speed", True)
    assert tok.eos_id == tok.encode("<|im_end|>")[0]


def test_sigkill_and_restart_give_every_document_once_with_the_same_text(setup):
    reference = subprocess.run(
        _think(_config(setup, "straight")), capture_output=True, text=True, timeout=600
    )
    assert reference.returncode == 0, reference.stderr
    expected = {r["id"]: r for r in committed_records(shard_folder(str(setup / "straight"), 0, 1))}
    assert len(expected) == 41  # 43 records: the empty and the non-UTF-8 one are rejected

    # The resumed run also shares a KV cache too small for its 4 slots at their longest, in
    # other pages and prefill chunks: documents wait for pages or are preempted and recomputed,
    # and no text changes.
    small_cache = "  page_size: 16\n  prefill_chunk: 32\n  kv_cache_tokens: 320"
    config = _config(setup, "killed", small_cache)
    folder = shard_folder(str(setup / "killed"), 0, 1)
    proc = subprocess.Popen(_think(config), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300

    def chunks():
        return (
            [n for n in os.listdir(folder) if n.endswith(".jsonl")] if os.path.isdir(folder) else []
        )

    while time.time() < deadline and not chunks():  # kill right after the first commit
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = committed_records(folder)
    assert 0 < len(partial) < 41, "the kill should land mid-run"
    resumed = subprocess.run(_think(config), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    records = committed_records(folder)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)) == 41 and set(ids) == set(expected)
    for r in records:
        assert r["thinking"] == expected[r["id"]]["thinking"], r["id"]
        assert r["meta"]["finish_reason"] == expected[r["id"]]["meta"]["finish_reason"]


def test_summary_plot_and_bad_documents(setup):
    folder = shard_folder(str(setup / "straight"), 0, 1)
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    assert summary["documents"] == 41 and set(summary["by_group"]) == {"math", "physics"}
    assert sum(summary["finish_reasons"].values()) == 41
    assert os.path.getsize(os.path.join(folder, "thinking_length.png")) > 1000
    with open(os.path.join(folder, "rejects.tsv")) as f:
        rejects = f.read()
    assert "empty document" in rejects and "non-UTF-8" in rejects
    long = next(r for r in committed_records(folder) if r["id"] == "long")
    assert long["meta"]["document_truncated"] and long["text"].count("apples") == 500
    assert long["meta"]["template"] == "default" and len(long["meta"]["template_sha256"]) == 64


def test_shards_split_the_corpus(setup):
    for i in range(2):
        result = subprocess.run(
            _think(_config(setup, "sharded"), "--shard", f"{i}/2"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr
    ids = [
        r["id"]
        for i in range(2)
        for r in committed_records(shard_folder(str(setup / "sharded"), i, 2))
    ]
    assert len(ids) == len(set(ids)) == 41


def test_sample_command(setup):
    args = [
        sys.executable,
        "-m",
        "tpt_jax",
        "sample",
        _config(setup, "sample"),
        "--prompt",
        "three apples",
    ]
    result = subprocess.run(
        [*args, "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("=== three apples\n")
    again = subprocess.run(
        [*args, "--max-new-tokens", "5"], capture_output=True, text=True, timeout=300
    )
    assert again.stdout == result.stdout  # think.temperature is 0 in this config: greedy
    missing = subprocess.run(args[:5], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "--prompt TEXT or --prompts-file" in missing.stderr


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(setup):
    """`tpt serve` on a free localhost port (greedy: think.temperature is 0 in the config)."""
    port = _free_port()
    log = setup / "serve.log"  # a file, not a pipe: the server logs a lot and must never block
    args = [sys.executable, "-m", "tpt_jax", "serve", _config(setup, "serve"), "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [*args, "--max-prefill-length", "256"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.time() + 120
        while "JetStream gRPC on port" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_serve_answers_a_jetstream_grpc_client(setup, server):
    import grpc
    import jax

    jax.tree_map = jax.tree.map  # google-jetstream 0.2.2 still calls it
    from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc

    from tpt_jax.generate import generate
    from tpt_jax.model import param_shapes
    from tpt_jax.model._store import load_model_config, restore_params

    tok = GeneratorTokenizer(str(setup / "gen"))
    prompt = tok.encode("three apples cost six dollars")
    with grpc.insecure_channel(f"localhost:{server}") as channel:
        grpc.channel_ready_future(channel).result(timeout=60)
        stub = jetstream_pb2_grpc.OrchestratorStub(channel)
        request = jetstream_pb2.DecodeRequest(
            token_content=jetstream_pb2.DecodeRequest.TokenContent(token_ids=prompt), max_tokens=6
        )
        served = []
        for response in stub.Decode(request, timeout=120):
            for sample in response.stream_content.samples:
                served.extend(sample.token_ids)
    cfg = load_model_config(str(setup / "gen"))
    # JetStream prepends the BOS id to token content of a new conversation; this model has
    # no BOS token, so the server reports EOS as BOS (as many decoder-only models do).
    params = restore_params(str(setup / "gen"), param_shapes(cfg))
    expected = generate(params, cfg, [[tok.eos_id, *prompt]], 6)[0]
    if tok.eos_id in expected:
        expected = expected[: expected.index(tok.eos_id)]
    assert served and served == expected[:6]


def test_jetstream_backend_completes_the_corpus_and_keeps_failures_pending(setup, server):
    dead = _config(
        setup,
        "remote",
        f"  backend: jetstream\n  address: localhost:{_free_port()}\n  retries: 0\n  timeout_s: 2",
    )
    result = subprocess.run(_think(dead), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    folder = shard_folder(str(setup / "remote"), 0, 1)
    assert committed_records(folder) == []  # every request failed: nothing written, all pending
    live = _config(
        setup, "remote", f"  backend: jetstream\n  address: localhost:{server}\n  concurrency: 3"
    )
    result = subprocess.run(_think(live), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    remote = {r["id"]: r for r in committed_records(folder)}
    local = {r["id"]: r for r in committed_records(shard_folder(str(setup / "straight"), 0, 1))}
    assert set(remote) == set(local) and len(remote) == 41
    for doc_id, record in remote.items():
        assert record["thinking"] == local[doc_id]["thinking"], doc_id
        assert record["meta"]["finish_reason"] == local[doc_id]["meta"]["finish_reason"]


def _start_transformers_serve(folder, port, log):
    """`transformers serve` (HF's own OpenAI-compatible server) on the exported generator."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = [os.path.join(os.path.dirname(sys.executable), "transformers"), "serve", folder]
    args += ["--port", str(port), "--device", "cpu", "--dtype", "float32"]
    with open(log, "a") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 120
    while "Uvicorn running" not in log.read_text() and time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-2000:]
        time.sleep(0.2)
    return proc


def test_openai_backend_survives_a_server_restart(setup):
    """A real OpenAI-compatible server (`transformers serve`) is killed and restarted mid-run.

    Stop strings stay off here (HF's stop-string matcher fails on this word-level tokenizer). The
    reference is HF `generate` itself: near-ties of this random model's logits may break
    differently in our engine, which tests/test_generate.py compares with HF on its own."""
    hf = setup / "gen_hf"
    subprocess.run(
        [sys.executable, "-m", "tpt_jax", "convert", "to-hf", str(setup / "gen"), str(hf)],
        check=True,
        capture_output=True,
    )
    port, log = _free_port(), setup / "openai.log"
    extra = f"  stop: []\n  backend: openai\n  address: 127.0.0.1:{port}\n  model_name: {hf}\n"
    config = _config(setup, "openai", extra + "  concurrency: 2\n  retries: 8\n  timeout_s: 30")
    folder = shard_folder(str(setup / "openai"), 0, 1)
    server = _start_transformers_serve(str(hf), port, log)
    driver = subprocess.Popen(
        _think(config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not glob.glob(os.path.join(folder, "chunk-*.jsonl")):
            time.sleep(0.05)
        server.kill()  # mid-run: requests in flight fail and are retried with backoff
        server.wait()
        assert driver.poll() is None, "the driver should still be running"
        server = _start_transformers_serve(str(hf), port, log)
        output, _ = driver.communicate(timeout=600)
    finally:
        server.kill()
        driver.kill()
    assert driver.returncode == 0, output[-3000:]
    records = committed_records(folder)
    remote = {r["id"]: r for r in records}
    assert len(records) == len(remote) == 41
    reference = _hf_greedy(config, hf, records)
    for doc_id, record in remote.items():
        assert record["thinking"] == reference[doc_id], doc_id
        capped = record["meta"]["thinking_tokens"] >= 24
        assert record["meta"]["finish_reason"] == ("length" if capped else "stop"), doc_id
    assert "retry" in output  # the kill landed mid-run


def _hf_greedy(config, hf, records):
    """What the server should answer: HF `generate` (greedy) on the driver's prompt of each record."""
    import torch
    import transformers

    from tpt_jax.config import load_config
    from tpt_jax.think.driver import _prompt
    from tpt_jax.think.prompts import load_template

    cfg = load_config(config)
    tokenizer = GeneratorTokenizer(cfg.think.model_dir)
    template = load_template(cfg.think.template)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    reference = {}
    for record in records:
        document, _ = tokenizer.truncate(record["text"], cfg.think.max_document_tokens)
        prompt = _prompt(tokenizer, template, document, cfg, record["id"])
        ids = torch.tensor([hf_tok(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
        reference[record["id"]] = hf_tok.decode(out, skip_special_tokens=True).strip()
    return reference
