"""The OpenAI backend's HTTP behaviour against a real local HTTP server: retries through 5xx and
refused connections, stops the run on a malformed-request 4xx, sends the per-document seed."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tpt_jax.errors import TptError
from tpt_jax.think.backends import BackendError, OpenAIBackend

SAMPLING = {"temperature": 0.6, "top_p": 0.9, "top_k": 0}


@pytest.fixture
def server():
    script = []  # (status, body) answered in order; the last one repeats
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            seen.append(
                (self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            )
            status, body = script[min(len(seen), len(script)) - 1]
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{httpd.server_address[1]}", script, seen
    httpd.shutdown()


def _backend(address, retries=3):
    return OpenAIBackend(address, "m", 5.0, retries, SAMPLING, ["</think>"])


def test_retries_server_errors_then_succeeds(server, monkeypatch):
    monkeypatch.setattr("tpt_jax.think.backends.time.sleep", lambda s: None)
    address, script, seen = server
    reply = {"choices": [{"text": "step one", "finish_reason": "stop"}],
             "usage": {"completion_tokens": 2}}  # fmt: skip
    script += [(503, {"error": "busy"}), (500, {"error": "oops"}), (200, reply)]
    completion = _backend(address).complete("prompt", 16, seed=7)
    assert (completion.text, completion.finish_reason, completion.num_tokens) == (
        "step one",
        "stop",
        2,
    )
    assert len(seen) == 3 and seen[0][0] == "/v1/completions"
    body = seen[0][1]
    assert body == {"model": "m", "prompt": "prompt", "max_tokens": 16, "temperature": 0.6,
                    "top_p": 0.9, "seed": 7, "stop": ["</think>"]}  # fmt: skip


def test_gives_up_after_the_retries(server, monkeypatch):
    monkeypatch.setattr("tpt_jax.think.backends.time.sleep", lambda s: None)
    address, script, _ = server
    script.append((503, {"error": "busy"}))
    with pytest.raises(BackendError, match="HTTP 503 after 3 attempts"):
        _backend(address, retries=2).complete("p", 4, seed=0)
    with pytest.raises(BackendError, match="after 2 attempts"):  # nothing listening
        _backend("127.0.0.1:9", retries=1).complete("p", 4, seed=0)


def test_a_malformed_request_stops_at_once(server):
    address, script, seen = server
    script.append((400, {"error": {"message": "unknown model m"}}))
    with pytest.raises(TptError, match=r"HTTP 400.*unknown model m") as info:
        _backend(address).complete("p", 4, seed=0)
    assert not isinstance(info.value, BackendError) and len(seen) == 1
