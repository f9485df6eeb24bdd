"""Remote generation backends for `tpt think`: a JetStream gRPC server (ours or MaxText's) or any
OpenAI-compatible completions server (vLLM, SGLang, `transformers serve`).

Requests run concurrently up to a limit, each with a deadline, and are retried with jittered
exponential backoff (or after the server's Retry-After); one that still fails raises BackendError,
and the driver leaves its document pending. A request the server refuses as malformed (HTTP 4xx
other than 408/429) or redirects is a configuration error and stops the run at once: every
remaining document would fail the same way. A prompt too long for the server's context is the
exception: only that document stays pending, with the server's reason.
"""

from __future__ import annotations

import dataclasses
import email.utils
import os
import random
import sys
import time

from tpt_jax.errors import MissingExtraError, TptError


class BackendError(TptError):
    """A remote request that failed after every retry."""


@dataclasses.dataclass
class Completion:
    """One generation: token ids (JetStream), or text decoded by the server (OpenAI)."""

    tokens: list[int] | None = None
    text: str | None = None
    finish_reason: str | None = None  # as the server reports it: "stop" or "length"
    num_tokens: int | None = None


def _backoff(
    attempt: int, retries: int, where: str, failure: str, retry_after: float | None = None
) -> None:
    # Jitter spreads out the retries of many workers that failed together (a server restart).
    ceiling = min(30.0, 0.5 * 2**attempt)
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    if retry_after is not None:  # the server said when: wait that long, never less
        delay = min(retry_after, 600.0) + random.uniform(0, 1)
    print(f"tpt think: {where}: {failure}; retry {attempt + 1}/{retries} in {delay:.1f}s",
          file=sys.stderr, flush=True)  # fmt: skip
    time.sleep(delay)


class JetStreamBackend:
    """Completions from a JetStream orchestrator over gRPC (the package's own stubs)."""

    def __init__(self, address: str, timeout_s: float, retries: int):
        import jax

        jax.tree_map = getattr(jax, "tree_map", jax.tree.map)  # jetstream 0.2.2 still uses it
        try:
            import grpc
            from jetstream.core.proto import jetstream_pb2, jetstream_pb2_grpc
        except ModuleNotFoundError as e:  # not in a training worker's slim install
            raise MissingExtraError("think.backend 'jetstream'", "serve", e.name) from None

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
                if e.code() == self._grpc.StatusCode.INVALID_ARGUMENT:
                    # This request (say, a prompt over the server's prefill limit) will never
                    # pass: no retry; the document stays pending with the server's reason.
                    raise BackendError(f"{where}: refused: {e.details()}") from None
                if attempt == self.retries:
                    raise BackendError(
                        f"{where}: {e.code().name} after {attempt + 1} attempts"
                    ) from None
                _backoff(attempt, self.retries, where, e.code().name)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._channel.close()


_RETRYABLE_HTTP = {408, 429}


# How vLLM ("maximum context length"), SGLang ("longer than the model's context length") and
# others word a prompt too long for the model: one document's problem, not the configuration's.
_TOO_LONG_WORDS = ("context length", "too long", "longer than", "context window")


def _too_long(code: int, body: str) -> bool:
    return code == 413 or (code in (400, 422) and any(w in body.lower() for w in _TOO_LONG_WORDS))


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), if any."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


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
        concurrency: int = 16,
    ):
        import httpx

        base = address if "://" in address else f"http://{address}"
        base = base.rstrip("/")
        self.url = base + ("/completions" if base.endswith("/v1") else "/v1/completions")
        self.model = model
        self.timeout_s = timeout_s
        self.retries = retries
        self.sampling = sampling
        self.stop = stop
        headers = {}
        if os.environ.get(api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
        # One pooled client shared by the request threads (httpx clients are thread-safe).
        # Redirects are not followed: a redirect would resend the key to another host or turn
        # the POST into a GET.
        self._httpx = httpx
        self._client = httpx.Client(
            headers=headers,
            timeout=timeout_s,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

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
        body = self.body(prompt, max_new_tokens, seed)
        where = f"openai {self.url}"
        for attempt in range(self.retries + 1):
            retry_after = None
            try:
                response = self._client.post(self.url, json=body)
            except self._httpx.RequestError as e:  # refused, reset, timed out, cut mid-reply
                failure = f"{type(e).__name__}: {e}"
            else:
                if response.is_redirect:
                    raise TptError(
                        f"{where}: the server redirects (HTTP {response.status_code}) to "
                        f"{response.headers.get('location')}; set think.address to the final "
                        "URL (redirects are not followed)"
                    )
                code = response.status_code
                if _too_long(code, response.text):
                    # This document's prompt does not fit the server's context: only it fails.
                    raise BackendError(f"{where}: refused: HTTP {code}: {response.text[:300]}")
                if 400 <= code < 500 and code not in _RETRYABLE_HTTP:
                    raise TptError(
                        f"{where}: HTTP {code} {response.reason_phrase}: "
                        f"{response.text[:300]} (check think.model_name and the sampling settings)"
                    )
                if code >= 400:
                    failure = f"HTTP {code}"
                    retry_after = _retry_after(response.headers.get("retry-after"))
                else:
                    try:
                        reply = response.json()
                        choice = reply["choices"][0]
                        if not isinstance(choice["text"], str):
                            raise TypeError(f"text is {type(choice['text']).__name__}")
                        return Completion(
                            text=choice["text"],
                            finish_reason=choice.get("finish_reason"),
                            num_tokens=(reply.get("usage") or {}).get("completion_tokens"),
                        )
                    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
                        failure = f"malformed reply ({e!r})"
            if attempt == self.retries:
                raise BackendError(f"{where}: {failure} after {attempt + 1} attempts")
            _backoff(attempt, self.retries, where, failure, retry_after)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._client.close()


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
            t.address,
            model,
            t.timeout_s,
            t.retries,
            sampling,
            t.stop,
            t.api_key_env,
            concurrency=t.concurrency,
        )
    raise ValueError(f"not a remote backend: {t.backend}")
