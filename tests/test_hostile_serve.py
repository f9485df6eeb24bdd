"""`tpt serve` against hostile clients: it listens on localhost unless told otherwise, answers a
too-long or otherwise invalid request with a gRPC INVALID_ARGUMENT error, and keeps serving.

One real `tpt serve` subprocess per module; every request comes from a separate client process
that uses only JetStream's own stubs (`jetstream_pb2`, `jetstream_pb2_grpc`), as a foreign
client would.
"""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from think_fixtures import make_generator

from tpt_jax.generate import GeneratorTokenizer
from tpt_jax.think.prompts import load_template, render

# Reads a JSON list of requests on stdin, prints one JSON result per request.
CLIENT = r"""
import json, sys
import grpc
from jetstream.core.proto import jetstream_pb2 as pb, jetstream_pb2_grpc as pb_grpc

address, requests = sys.argv[1], json.load(sys.stdin)
with grpc.insecure_channel(address) as channel:
    grpc.channel_ready_future(channel).result(timeout=60)
    stub = pb_grpc.OrchestratorStub(channel)
    for spec in requests:
        request = pb.DecodeRequest(max_tokens=spec.get("max_tokens", 4))
        if "text" in spec:
            request.text_content.text = spec["text"]
        if "tokens" in spec:
            request.token_content.token_ids.extend(spec["tokens"])
        try:
            tokens, text = [], ""
            for response in stub.Decode(request, timeout=120):
                for sample in response.stream_content.samples:
                    tokens.extend(sample.token_ids)
                    text += sample.text
            result = {"ok": True, "tokens": tokens, "text": text}
        except grpc.RpcError as e:
            result = {"ok": False, "code": e.code().name, "details": e.details()}
        print(json.dumps(result), flush=True)
"""

MAX_DOCUMENT_TOKENS = 2048  # the schema's default: above the old fixed prefill limit of 1024


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    make_generator(str(root / "gen"))
    config = root / "serve.yaml"
    config.write_text(
        f"think:\n  model_dir: {root}/gen\n  max_document_tokens: {MAX_DOCUMENT_TOKENS}\n"
        "  max_new_tokens: 8\n  temperature: 0.0\n  max_concurrent_decodes: 2\n"
    )
    port = _free_port()
    # One CPU device: the 8 fake devices of conftest would only slow the server down here.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    log = root / "serve.log"  # a file, not a pipe: the server logs a lot and must never block
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tpt_jax", "serve", str(config), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.time() + 120
        while "JetStream gRPC on port" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        yield {"port": port, "proc": proc, "log": log, "gen": str(root / "gen")}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _ask(served, *requests):
    """Sends the requests in order from a separate client process; returns their results."""
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, f"127.0.0.1:{served['port']}"],
        input=json.dumps(list(requests)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def _assert_alive(served):
    assert served["proc"].poll() is None, served["log"].read_text()[-3000:]
    (normal,) = _ask(served, {"text": "three apples cost six dollars"})
    assert normal["ok"] and normal["tokens"], normal


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as the kernel lists them) of the TCP sockets listening on port."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(address)
    return found


def test_listens_on_localhost_only_by_default(served):
    loopback = {
        "0100007F",  # 127.0.0.1
        "00000000000000000000000001000000",  # ::1
        "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
    }
    addresses = _listening_addresses(served["port"])
    assert addresses and addresses <= loopback, addresses


def test_too_long_prompt_is_refused_and_the_server_keeps_serving(served):
    too_long, after = _ask(
        served, {"text": " ".join(["apples"] * 20000)}, {"text": "three apples cost six dollars"}
    )
    assert not too_long["ok"] and too_long["code"] == "INVALID_ARGUMENT", too_long
    assert "20000 tokens" in too_long["details"] and "prefill" in too_long["details"]
    assert after["ok"] and after["tokens"], after
    _assert_alive(served)


@pytest.mark.parametrize(
    "request_, words",
    [
        ({"text": ""}, "empty"),
        ({"text": "   "}, "empty"),
        ({"text": "three apples", "max_tokens": 0}, "max_tokens"),
        ({"text": "three apples", "max_tokens": -3}, "max_tokens"),
        ({"text": "three apples", "max_tokens": 100000}, "max_tokens"),
        ({"tokens": []}, "empty"),
        ({"tokens": [5, 9999]}, "9999"),
        ({"tokens": [5, -1]}, "-1"),
        ({"tokens": list(range(5, 50)) * 200}, "prefill"),
        ({}, "text_content or token_content"),
    ],
)
def test_invalid_request_gets_an_error(served, request_, words):
    (result,) = _ask(served, request_)
    assert not result["ok"] and result["code"] == "INVALID_ARGUMENT", result
    assert words in result["details"], result
    _assert_alive(served)


def test_default_prefill_limit_fits_a_full_document(served):
    """A prompt as `tpt think` builds it (template + chat template around a document of
    think.max_document_tokens tokens) fits the server's default prefill limit."""
    tok = GeneratorTokenizer(served["gen"])
    document, cut = tok.truncate(" ".join(["apples"] * (MAX_DOCUMENT_TOKENS + 100)), 2048)
    assert cut and len(tok.encode(document)) == MAX_DOCUMENT_TOKENS
    prompt = tok.chat(render(load_template("default"), document))
    assert len(tok.encode(prompt)) > 1024
    (result,) = _ask(served, {"text": prompt})
    assert result["ok"] and result["tokens"], result
    _assert_alive(served)


def test_jetstream_backend_leaves_a_refused_document_pending_at_once(served, monkeypatch):
    """`tpt think`'s JetStream backend: a request the server refuses is not retried (it would be
    refused again); its document stays pending with the server's reason."""
    from tpt_jax.think.backends import BackendError, JetStreamBackend

    slept = []
    monkeypatch.setattr("tpt_jax.think.backends.time.sleep", slept.append)
    backend = JetStreamBackend(f"127.0.0.1:{served['port']}", timeout_s=120, retries=3)
    try:
        with pytest.raises(BackendError, match=r"refused: .*prefill"):
            backend.complete(" ".join(["apples"] * 20000), 4, seed=0)
        assert slept == []
        assert backend.complete("three apples cost six dollars", 4, seed=0).tokens
    finally:
        backend.close()
