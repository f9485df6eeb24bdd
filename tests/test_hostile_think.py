"""`tpt think` under what users do: reruns over a changed corpus, same-named files in two folders,
duplicate ids, a second process on the same shard, an empty glob, changed settings, and SIGTERM
while remote requests hang. Real `tpt think` subprocesses against a real local HTTP server
(tests/completions_server.py), which logs every document it answers, so regeneration is counted.
"""

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from think_fixtures import make_generator

from tpt_jax.think.driver import committed_records, shard_folder

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ["three apples cost six dollars", "the train speed", "so each step"]


def _doc_text(k: int) -> str:
    return f"mark{k} " + " ".join(WORDS[k % 3] for _ in range(1 + k % 4))


def _write(path, records) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    return make_generator(str(tmp_path_factory.mktemp("gen") / "gen"))


class Server:
    """tests/completions_server.py in its own process; `answered()` counts answers per marker."""

    def __init__(self, root, slow: str = ""):
        self.log = root / f"answered-{time.time_ns()}.log"
        port_file = root / f"port-{time.time_ns()}"
        script = os.path.join(HERE, "completions_server.py")
        self.proc = subprocess.Popen([sys.executable, script, str(self.log), str(port_file), slow])
        deadline = time.time() + 30
        while not port_file.exists():
            assert time.time() < deadline and self.proc.poll() is None, "server did not start"
            time.sleep(0.05)
        self.address = f"127.0.0.1:{port_file.read_text()}"

    def answered(self) -> collections.Counter:
        lines = self.log.read_text().split() if self.log.exists() else []
        return collections.Counter(lines)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    yield s
    s.stop()


def _config(tmp_path, generator, address, paths, out="out", extra="") -> str:
    path = tmp_path / f"{out}-{time.time_ns()}.yaml"
    path.write_text(
        f"""
think:
  model_dir: {generator}
  output_dir: {tmp_path / out}
  corpus: {{name: docs, paths: {json.dumps([str(p) for p in paths])}}}
  max_document_tokens: 256
  max_new_tokens: 16
  temperature: 0.0
  chunk_size: 3
  backend: openai
  address: {address}
  model_name: gen
  concurrency: 4
  retries: 1
  timeout_s: 300
{extra}"""
    )
    return str(path)


def _think(config, *args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "tpt_jax", "think", config, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ids(output_dir, count=1):
    return [
        r["id"]
        for i in range(count)
        for r in committed_records(shard_folder(str(output_dir), i, count))
    ]


def _one_error_line(result) -> str:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("tpt: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "run complete" not in result.stdout
    return errors[0]


def test_same_file_names_in_two_folders_are_two_sets_of_documents(tmp_path, generator, server):
    # No ids in the records: the fallback id must not come from the file's base name.
    for month, first in (("2024-01", 0), ("2024-02", 10)):
        _write(tmp_path / "corpus" / month / "part-0.jsonl",
               [{"text": _doc_text(k)} for k in range(first, first + 10)])  # fmt: skip
    config = _config(tmp_path, generator, server.address, [tmp_path / "corpus/*/part-0.jsonl"])
    result = _think(config)
    assert result.returncode == 0 and "tpt: run complete" in result.stdout, result.stderr[-2000:]
    records = committed_records(shard_folder(str(tmp_path / "out"), 0, 1))
    assert len(records) == len({r["id"] for r in records}) == 20
    assert sorted(r["text"].split()[0] for r in records) == sorted(f"mark{k}" for k in range(20))
    again = _think(config)  # a rerun finds everything committed and generates nothing
    assert again.returncode == 0 and "tpt: run complete" in again.stdout, again.stderr[-2000:]
    assert sum(server.answered().values()) == 20


def test_duplicate_ids_are_reported_and_generated_once(tmp_path, generator, server):
    records = [{"id": f"d{k}", "text": _doc_text(k)} for k in range(6)]
    records.append({"id": "d2", "text": _doc_text(99)})  # the same id again, other text
    _write(tmp_path / "docs.jsonl", records)
    config = _config(tmp_path, generator, server.address, [tmp_path / "docs.jsonl"])
    result = _think(config)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(_ids(tmp_path / "out")) == [f"d{k}" for k in range(6)]
    assert server.answered()["mark99"] == 0 and server.answered()["mark2"] == 1
    rejects = (tmp_path / "out" / "shard-00000-of-00001" / "rejects.tsv").read_text()
    assert f"{tmp_path / 'docs.jsonl'}:7\tduplicate id: 'd2' first read at" in rejects


def test_prepending_a_document_only_adds_that_document(tmp_path, generator, server):
    docs = [{"id": f"d{k}", "text": _doc_text(k)} for k in range(24)]
    _write(tmp_path / "docs.jsonl", docs)
    config = _config(tmp_path, generator, server.address, [tmp_path / "docs.jsonl"])
    for i in range(3):
        assert _think(config, "--shard", f"{i}/3").returncode == 0
    assert sorted(_ids(tmp_path / "out", 3)) == sorted(d["id"] for d in docs)
    # One new document at the top of the file, and the files' order of lines changes.
    _write(tmp_path / "docs.jsonl", [{"id": "new", "text": _doc_text(50)}, *reversed(docs)])
    for i in range(3):
        result = _think(config, "--shard", f"{i}/3")
        assert result.returncode == 0 and "tpt: run complete" in result.stdout
    ids = _ids(tmp_path / "out", 3)
    assert len(ids) == len(set(ids)) == 25
    answered = server.answered()
    assert answered["mark50"] == 1 and sum(answered.values()) == 25  # nothing regenerated


def test_a_second_process_on_the_same_shard_is_refused(tmp_path, generator):
    slow = Server(tmp_path, slow="mark3")  # one document hangs: the first process stays busy
    try:
        _write(tmp_path / "docs.jsonl", [{"id": f"d{k}", "text": _doc_text(k)} for k in range(8)])
        config = _config(tmp_path, generator, slow.address, [tmp_path / "docs.jsonl"])
        first = subprocess.Popen(
            [sys.executable, "-m", "tpt_jax", "think", config],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.time() + 120
        while sum(slow.answered().values()) < 7:  # all but the hanging one are answered
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.1)
        second = _think(config)
        line = _one_error_line(second)
        assert f"in use by pid {first.pid}" in line and "shard-00000-of-00001" in line
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    finally:
        slow.stop()
    assert sorted(_ids(tmp_path / "out")) == [f"d{k}" for k in range(8) if k != 3]


def test_a_glob_that_matches_nothing_is_an_error(tmp_path, generator, server):
    _write(tmp_path / "docs.jsonl", [{"text": _doc_text(1)}])
    typo = _config(tmp_path, generator, server.address, [tmp_path / "doc*.jsonll"])
    line = _one_error_line(_think(typo))
    assert "think.corpus.paths" in line and "doc*.jsonll" in line and "matches no file" in line
    # One good pattern does not excuse a bad one: its files would be silently skipped.
    mixed = _config(
        tmp_path, generator, server.address, [tmp_path / "docs.jsonl", tmp_path / "nope/*.jsonl"]
    )
    assert "nope/*.jsonl" in _one_error_line(_think(mixed))
    _write(tmp_path / "blank.jsonl", [{"text": "  "}, {"text": ""}])
    blank = _config(tmp_path, generator, server.address, [tmp_path / "blank.jsonl"])
    assert "no usable document" in _one_error_line(_think(blank))
    assert not server.answered()


def test_a_run_stopped_by_a_bad_record_keeps_what_it_finished(tmp_path, generator, server):
    with open(tmp_path / "docs.jsonl", "w") as f:
        for k in range(10):
            f.write(json.dumps({"id": f"d{k}", "text": _doc_text(k)}) + "\n")
        f.write("{not json\n")
    extra = "  chunk_size: 100\ndata: {strict: true}"  # nothing would be committed before the end
    config = _config(tmp_path, generator, server.address, [tmp_path / "docs.jsonl"], extra=extra)
    line = _one_error_line(_think(config))
    assert f"{tmp_path / 'docs.jsonl'}:11: malformed JSON" in line
    committed = _ids(tmp_path / "out")
    assert committed and len(committed) == len(set(committed))  # finished ones were committed


def test_changed_settings_are_refused_unless_allowed(tmp_path, generator, server):
    _write(tmp_path / "docs.jsonl", [{"id": f"d{k}", "text": _doc_text(k)} for k in range(4)])
    config = _config(tmp_path, generator, server.address, [tmp_path / "docs.jsonl"])
    assert _think(config).returncode == 0
    _write(tmp_path / "docs.jsonl", [{"id": f"d{k}", "text": _doc_text(k)} for k in range(6)])
    line = _one_error_line(_think(config, "think.temperature=0.7", "think.max_new_tokens=32"))
    assert "think.temperature: 0.0 -> 0.7" in line and "think.max_new_tokens: 16 -> 32" in line
    template = tmp_path / "mine.txt"
    template.write_text("Think about this document:\n{document}\n")
    assert "think.template" in _one_error_line(_think(config, f"think.template={template}"))
    assert sum(server.answered().values()) == 4  # nothing generated with the other settings
    allowed = _think(config, "think.temperature=0.7", "think.allow_settings_change=true")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    folder = tmp_path / "out" / "shard-00000-of-00001"
    change = json.loads((folder / "settings_changes.jsonl").read_text().splitlines()[0])
    assert (change["before"]["think.temperature"], change["after"]["think.temperature"]) == (0, 0.7)
    assert sorted(_ids(tmp_path / "out")) == [f"d{k}" for k in range(6)]


def test_sigterm_commits_finished_documents_at_once(tmp_path, generator):
    """Two documents hang at the server; SIGTERM must commit the others at once and exit within
    the grace period, not after the hanging requests' timeout; a SIGKILL right after the grace
    period loses nothing that was finished."""
    slow = Server(tmp_path, slow="slowdoc")
    docs = [{"id": f"d{k}", "text": _doc_text(k)} for k in range(10)]
    docs += [{"id": f"s{k}", "text": f"slowdoc {_doc_text(k)}"} for k in range(2)]
    _write(tmp_path / "docs.jsonl", docs)
    extra = "  preemption_grace_s: 2\n  chunk_size: 100"  # one chunk would hold everything
    config = _config(tmp_path, generator, slow.address, [tmp_path / "docs.jsonl"], extra=extra)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tpt_jax", "think", config],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.time() + 120
        while sum(slow.answered().values()) < 10:
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)  # the driver has received the answers
        sent = time.time()
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail("tpt think did not stop within 20 s of SIGTERM (requests hang 120 s)")
        assert time.time() - sent < 15
    finally:
        slow.stop()
    assert proc.returncode == 0 and "run complete" not in out, err[-2000:]
    assert sorted(_ids(tmp_path / "out")) == sorted(f"d{k}" for k in range(10))
    fast = Server(tmp_path)  # the rerun completes the pending ones
    try:
        config = _config(tmp_path, generator, fast.address, [tmp_path / "docs.jsonl"], extra=extra)
        result = _think(config)
        assert result.returncode == 0 and "tpt: run complete" in result.stdout
        ids = _ids(tmp_path / "out")
        assert len(ids) == len(set(ids)) == 12
        assert sum(fast.answered().values()) == 2
        straight = _config(
            tmp_path, generator, fast.address, [tmp_path / "docs.jsonl"], "straight", extra
        )
        assert _think(straight).returncode == 0  # an uninterrupted run, for the texts
    finally:
        fast.stop()
    resumed = {r["id"]: r for r in committed_records(shard_folder(str(tmp_path / "out"), 0, 1))}
    reference = committed_records(shard_folder(str(tmp_path / "straight"), 0, 1))
    assert len(reference) == 12
    for r in reference:
        assert (resumed[r["id"]]["text"], resumed[r["id"]]["thinking"]) == (
            r["text"],
            r["thinking"],
        )


# -- a remote peer that misbehaves (the OpenAI backend against real local HTTP servers) --------


class _Peer:
    """A local HTTP server whose handler is `respond(handler, n)` for the n-th request (from 1)."""

    def __init__(self, respond):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                peer.requests.append(dict(self.headers))
                respond(self, len(peer.requests))

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()


def _reply(handler, status=200, body=None, headers=()):
    payload = json.dumps(
        body or {"choices": [{"text": "so step", "finish_reason": "stop"}]}
    ).encode()
    handler.send_response(status)
    for key, value in headers:
        handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def _backend(address, retries=3):
    from tpt_jax.think.backends import OpenAIBackend

    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": 0}
    return OpenAIBackend(address, "m", 5.0, retries, sampling, [], "TPT_TEST_KEY")


@pytest.mark.parametrize("status", [302, 307])
def test_a_redirect_is_not_followed_with_the_api_key(monkeypatch, status):
    from tpt_jax.errors import TptError

    monkeypatch.setenv("TPT_TEST_KEY", "secret")
    other = _Peer(lambda h, n: _reply(h))
    location = [("Location", f"http://{other.address}/v1/completions")]
    redirecting = _Peer(lambda h, n: _reply(h, status, {}, location))
    try:
        with pytest.raises(TptError, match=r"redirects.*set think\.address"):
            _backend(redirecting.address).complete("p", 4, seed=0)
        assert redirecting.requests[0]["Authorization"] == "Bearer secret"
        assert other.requests == []  # neither the key nor a GET reached the other host
    finally:
        other.close()
        redirecting.close()


def test_a_reply_cut_mid_body_is_retried(monkeypatch):
    monkeypatch.setattr("tpt_jax.think.backends.time.sleep", lambda s: None)

    def respond(handler, n):
        if n == 1:  # promises 1000 bytes, sends 10, hangs up: http.client's IncompleteRead
            handler.send_response(200)
            handler.send_header("Content-Length", "1000")
            handler.end_headers()
            handler.wfile.write(b'{"choices"')
            handler.wfile.flush()
            handler.close_connection = True
            return
        if n == 2:  # a proxy's HTML error page with status 200
            payload = b"<html>bad gateway</html>"
            handler.send_response(200)
            handler.send_header("Content-Length", str(len(payload)))
            handler.end_headers()
            handler.wfile.write(payload)
            return
        _reply(handler)

    peer = _Peer(respond)
    try:
        assert _backend(peer.address).complete("p", 4, seed=0).text == "so step"
        assert len(peer.requests) == 3
    finally:
        peer.close()


def test_retries_honour_retry_after_and_are_jittered(monkeypatch):
    delays = []
    monkeypatch.setattr("tpt_jax.think.backends.time.sleep", delays.append)
    peer = _Peer(lambda h, n: _reply(h, 429, {}, [("Retry-After", "7")]) if n == 1 else _reply(h))
    try:
        assert _backend(peer.address).complete("p", 4, seed=0).text == "so step"
    finally:
        peer.close()
    assert 7 <= delays[0] <= 8  # waited what the server asked, never less
    delays.clear()
    busy = _Peer(lambda h, n: _reply(h, 503, {}))
    try:
        for _ in range(2):
            with pytest.raises(Exception, match="HTTP 503 after 4 attempts"):
                _backend(busy.address).complete("p", 4, seed=0)
    finally:
        busy.close()
    first, second = delays[:3], delays[3:]
    assert first != second  # two workers failing together do not retry in lockstep
    for attempt, (a, b) in enumerate(zip(first, second, strict=True)):
        ceiling = min(30.0, 0.5 * 2**attempt)
        assert ceiling / 2 <= min(a, b) and max(a, b) <= ceiling


def test_line_separators_inside_a_text_survive_commit_and_resume(tmp_path, generator, server):
    # json.dumps(ensure_ascii=False) leaves U+2028/U+0085 as they are: lines split only at "\n".
    texts = [_doc_text(0) + " cost\u2028six", _doc_text(1) + " \u0085 \u2029 end", _doc_text(2)]
    _write(tmp_path / "docs.jsonl", [{"id": f"d{k}", "text": t} for k, t in enumerate(texts)])
    config = _config(tmp_path, generator, server.address, [tmp_path / "docs.jsonl"])
    for _ in range(2):
        result = _think(config)
        assert result.returncode == 0 and "tpt: run complete" in result.stdout, result.stderr
    records = committed_records(shard_folder(str(tmp_path / "out"), 0, 1))
    assert sorted(r["text"] for r in records) == sorted(texts)


def test_a_document_that_cannot_be_prompted_never_hangs_the_run(tmp_path, generator, server):
    import shutil

    records = [{"id": f"d{k}", "text": _doc_text(k)} for k in range(3)]
    _write(tmp_path / "docs.jsonl", records)
    with open(tmp_path / "docs.jsonl", "a") as f:  # a lone surrogate, as JSON may escape it
        f.write('{"id": "bad", "text": "mark9 apples \\ud83d cost"}\n')
    config = _config(tmp_path, generator, server.address, [tmp_path / "docs.jsonl"])
    result = _think(config, timeout=120)
    assert result.returncode == 0 and "tpt: run complete" in result.stdout, result.stderr[-2000:]
    assert sorted(_ids(tmp_path / "out")) == ["d0", "d1", "d2"]
    rejects = (tmp_path / "out" / "shard-00000-of-00001" / "rejects.tsv").read_text()
    assert "docs.jsonl:4\tinvalid Unicode: 'text' has a lone surrogate" in rejects
    # A generator without a chat template (think.chat_template is on): every prompt fails.
    plain = tmp_path / "plain"
    shutil.copytree(generator, plain)
    (plain / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    config = _config(tmp_path, plain, server.address, [tmp_path / "docs.jsonl"], "out2")
    assert "chat template" in _one_error_line(_think(config, timeout=120))


def test_a_truncated_input_file_is_not_a_complete_run(tmp_path, generator, server):
    import gzip

    lines = b"".join(
        json.dumps({"id": f"d{k}", "text": _doc_text(k) + " so" * 40}).encode() + b"\n"
        for k in range(200)
    )
    whole = gzip.compress(lines)
    (tmp_path / "docs.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    config = _config(tmp_path, generator, server.address, [tmp_path / "docs.jsonl.gz"])
    line = _one_error_line(_think(config))
    assert "could not be read to their end" in line and "docs.jsonl.gz" in line
    read = _ids(tmp_path / "out")
    assert 0 < len(read) < 200  # what was read is committed
    (tmp_path / "docs.jsonl.gz").write_bytes(whole)
    result = _think(config)
    assert result.returncode == 0 and "tpt: run complete" in result.stdout, result.stderr[-2000:]
    assert sorted(_ids(tmp_path / "out")) == sorted(f"d{k}" for k in range(200))
    assert sum(server.answered().values()) == 200


def test_output_of_an_older_version_is_not_added_to(tmp_path, generator, server):
    _write(tmp_path / "docs.jsonl", [{"id": f"d{k}", "text": _doc_text(k)} for k in range(4)])
    folder = tmp_path / "out" / "shard-00000-of-00002"
    _write(folder / "chunk-000000.jsonl", [{"id": "d0", "text": _doc_text(0), "thinking": "x"}])
    config = _config(tmp_path, generator, server.address, [tmp_path / "docs.jsonl"])
    assert "without a settings.json" in _one_error_line(_think(config, "--shard", "0/2"))
    assert not server.answered()


def test_a_shard_without_documents_of_its_own_completes(tmp_path, generator, server):
    _write(tmp_path / "docs.jsonl", [{"id": f"d{k}", "text": _doc_text(k)} for k in range(3)])
    config = _config(tmp_path, generator, server.address, [tmp_path / "docs.jsonl"])
    for i in range(8):  # 3 documents over 8 shards: most shards have none
        result = _think(config, "--shard", f"{i}/8")
        assert result.returncode == 0 and "tpt: run complete" in result.stdout, result.stderr
    assert sorted(_ids(tmp_path / "out", 8)) == ["d0", "d1", "d2"]


def test_a_prompt_too_long_for_the_server_stays_pending_alone():
    from tpt_jax.errors import TptError
    from tpt_jax.think.backends import BackendError

    vllm = "This model's maximum context length is 2048 tokens. However, you requested 9000"
    peer = _Peer(lambda h, n: _reply(h, 400, {"message": vllm}))
    try:
        with pytest.raises(BackendError, match="maximum context length"):
            _backend(peer.address).complete("p", 4, seed=0)
        assert len(peer.requests) == 1  # not retried: it would be refused again
    finally:
        peer.close()
    wrong_model = _Peer(lambda h, n: _reply(h, 404, {"message": "The model `m` does not exist."}))
    try:
        with pytest.raises(TptError, match="does not exist") as info:
            _backend(wrong_model.address).complete("p", 4, seed=0)
        assert not isinstance(info.value, BackendError)  # every request would fail: stop
    finally:
        wrong_model.close()
