"""Remote generation backends for `tpt think`: a JetStream gRPC server (ours or MaxText's) or any
OpenAI-compatible completions server (vLLM, SGLang, `transformers serve`).

Requests run concurrently up to a limit, each with a deadline, and are retried with exponential
backoff; one that still fails raises BackendError, and the driver leaves its document pending.
A request the server refuses as malformed (HTTP 4xx other than 408/429) is a configuration error
and stops the run at once: every remaining document would fail the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import urllib.error
import urllib.request

from tpt_jax.errors import TptError


class BackendError(TptError):
    """A remote request that failed after every retry."""


@dataclasses.dataclass
class Completion:
    """One generation: token ids (JetStream), or text decoded by the server (OpenAI)."""

    tokens: list[int] | None = None
    text: str | None = None
    finish_reason: str | None = None  # as the server reports it: "stop" or "length"
    num_tokens: int | None = None


def _backoff(attempt: int, retries: int, where: str, failure: str) -> None:
    delay = min(30.0, 0.5 * 2**attempt)
    print(f"tpt think: {where}: {failure}; retry {attempt + 1}/{retries} in {delay:.1f}s",
          file=sys.stderr, flush=True)  # fmt: skip
    time.sleep(delay)


class JetStreamBackend:
    """Completions from a JetStream orchestrator over gRPC (the package's own stubs)."""

    def __init__(self, address: str, timeout_s: float, retries: int):
        import grpc
        import jax

        jax.tree_map = getattr(jax, "tree_map", jax.tree.map)  # jetstream 0.2.2 still uses it
        from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc

        self._grpc = grpc
        self._pb2 = jetstream_pb2
        self._channel = grpc.insecure_channel(address)
        self._stub = jetstream_pb2_grpc.OrchestratorStub(self._channel)
        self.address = address
        self.timeout_s = timeout_s
        self.retries = retries

    def complete(self, prompt: str, max_new_tokens: int, seed: int) -> Completion:
        """Generated token ids for a prompt text (the server tokenizes and samples; JetStream's
        protocol has no per-request sampling settings, so `seed` is not sent)."""
        del seed
        request = self._pb2.DecodeRequest(
            text_content=self._pb2.DecodeRequest.TextContent(text=prompt), max_tokens=max_new_tokens
        )
        for attempt in range(self.retries + 1):
            try:
                tokens: list[int] = []
                for response in self._stub.Decode(request, timeout=self.timeout_s):
                    for sample in response.stream_content.samples:
                        tokens.extend(sample.token_ids)
                return Completion(tokens=tokens)
            except self._grpc.RpcError as e:
                where = f"jetstream {self.address}"
                if attempt == self.retries:
                    raise BackendError(
                        f"{where}: {e.code().name} after {attempt + 1} attempts"
                    ) from None
                _backoff(attempt, self.retries, where, e.code().name)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._channel.close()


_RETRYABLE_HTTP = {408, 429}


class OpenAIBackend:
    """Completions from an OpenAI-compatible `/v1/completions` endpoint.

    The prompt is sent as raw text, already wrapped in the generator's chat template when
    `think.chat_template` is on, so every backend sees the same prompt. The API key, if any, is
    read from the environment variable `api_key_env`.
    """

    def __init__(
        self,
        address: str,
        model: str,
        timeout_s: float,
        retries: int,
        sampling: dict,
        stop: list[str],
        api_key_env: str = "OPENAI_API_KEY",
    ):
        base = address if "://" in address else f"http://{address}"
        base = base.rstrip("/")
        self.url = base + ("/completions" if base.endswith("/v1") else "/v1/completions")
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.sampling = sampling
        self.stop = stop
        self.headers = {"Content-Type": "application/json"}
        if os.environ.get(api_key_env):
            self.headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"

    def body(self, prompt: str, max_new_tokens: int, seed: int) -> dict:
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": max_new_tokens,
            "temperature": self.sampling["temperature"],
            "top_p": self.sampling["top_p"],
            "seed": seed,
        }
        if self.sampling.get("top_k"):
            body["top_k"] = self.sampling["top_k"]  # a vLLM / SGLang extension
        if self.stop:
            body["stop"] = self.stop
        return body

    def complete(self, prompt: str, max_new_tokens: int, seed: int) -> Completion:
        data = json.dumps(self.body(prompt, max_new_tokens, seed)).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url, data=data, headers=self.headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    reply = json.loads(response.read())
                choice = reply["choices"][0]
                return Completion(
                    text=choice["text"],
                    finish_reason=choice.get("finish_reason"),
                    num_tokens=(reply.get("usage") or {}).get("completion_tokens"),
                )
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code not in _RETRYABLE_HTTP:
                    detail = e.read()[:300].decode(errors="replace")
                    raise TptError(
                        f"openai {self.url}: HTTP {e.code} {e.reason}: {detail} "
                        "(check think.model_name and the sampling settings)"
                    ) from None
                failure = f"HTTP {e.code}"
            except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
                failure = str(getattr(e, "reason", e))
            except (ValueError, KeyError, IndexError, TypeError) as e:  # not a completion reply
                failure = f"malformed reply ({e!r})"
            if attempt == self.retries:
                raise BackendError(f"openai {self.url}: {failure} after {attempt + 1} attempts")
            _backoff(attempt, self.retries, f"openai {self.url}", failure)
        raise AssertionError("unreachable")

    def close(self) -> None:
        pass


class TeacherBackend:
    """The rule-based teacher of the synthetic testbed (tpt_jax.data.testbed): its prompt is the
    document itself, and it writes the correct step-by-step reasoning of a testbed problem."""

    def complete(self, prompt: str, max_new_tokens: int, seed: int) -> Completion:
        from tpt_jax.data.testbed import teacher_thinking

        thinking = teacher_thinking(prompt)
        if thinking is None:
            raise TptError(f"teacher: not a testbed problem: {prompt[:80]!r}")
        words = thinking.split()
        if len(words) > max_new_tokens:
            return Completion(text=" ".join(words[:max_new_tokens]), finish_reason="length",
                              num_tokens=max_new_tokens)  # fmt: skip
        return Completion(text=thinking, finish_reason="stop", num_tokens=len(words))

    def close(self) -> None:
        pass


def make_backend(t):
    """The backend a ThinkConfig names (all but the in-process engine)."""
    if t.backend == "teacher":
        return TeacherBackend()
    if t.backend == "jetstream":
        return JetStreamBackend(t.address, t.timeout_s, t.retries)
    if t.backend == "openai":
        model = t.model_name or os.path.basename(os.path.normpath(t.model_dir))
        sampling = {"temperature": t.temperature, "top_p": t.top_p, "top_k": t.top_k}
        return OpenAIBackend(
            t.address, model, t.timeout_s, t.retries, sampling, t.stop, t.api_key_env
        )
    raise ValueError(f"not a remote backend: {t.backend}")
