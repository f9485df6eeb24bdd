"""`tpt serve CONFIG`: the engine behind JetStream's orchestrator and gRPC server.

Any JetStream client (ours in the `jetstream` backend, MaxText's benchmarking scripts, the
package's own `jetstream_pb2_grpc.OrchestratorStub`) can then request text or token completions.
Requests use the server's default sampling (`think.temperature`, `think.top_p`, `think.top_k`).

It listens on `--host` (default 127.0.0.1: this machine only; 0.0.0.0 or :: serves others).

Too-long and invalid requests: every request is checked before it is queued. A prompt longer
than the prefill limit, an empty prompt, a token id outside the vocabulary, max_tokens <= 0, a
prompt plus max_tokens beyond the KV cache, or a request without content is answered with gRPC
status INVALID_ARGUMENT and a one-line reason, and the server goes on serving. Prompts are never
truncated: a cut prompt would silently answer a different question. (Unchecked, JetStream's
prefill thread raises on such a prompt and its thread guard kills the whole process.)

The prefill limit defaults to the smallest power of two that holds a prompt as `tpt think` builds
it: think.max_document_tokens of document plus the prompt template and chat template around it.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

import grpc
import numpy as np

from tpt_jax.config import Config
from tpt_jax.errors import ConfigError, TptError
from tpt_jax.generate import GeneratorTokenizer, SamplingParams, pad_prompt
from tpt_jax.generate.jetstream import TptEngine

from jetstream.core import orchestrator  # isort: skip  (after engine: jax.tree_map)
from jetstream.core.proto import jetstream_pb2_grpc  # isort: skip
from jetstream.engine import tokenizer_api  # isort: skip

# JetStream pads token requests to these buckets and fails on a prefill limit outside them.
JETSTREAM_PREFILL_BUCKETS = tuple(1 << k for k in range(4, 16))  # 16 ... 32768 tokens


class JetStreamTokenizer(tokenizer_api.Tokenizer):
    """The generator's tokenizer as JetStream's orchestrator uses it (padding, stop tokens)."""

    def __init__(self, tokenizer: GeneratorTokenizer):
        self._tok = tokenizer

    def encode(self, s: str, **kwargs) -> tuple[np.ndarray, int]:
        return pad_prompt(self._tok.encode(s), kwargs.get("max_prefill_length", 1024))

    def decode(self, token_ids: list[int], **kwargs) -> str:
        return self._tok.decode(list(token_ids))

    @property
    def pad_id(self) -> int:
        # JetStream stops a sample at the pad or EOS id, so padding reuses EOS rather than
        # stealing a real token.
        return self.eos_id

    @property
    def eos_id(self) -> int:
        return self._tok.eos_id if self._tok.eos_id is not None else -1

    @property
    def bos_id(self) -> int:
        return self.eos_id


class ServingEngine(TptEngine):
    """TptEngine with the generator's own tokenizer for JetStream's detokenization."""

    def __init__(self, *args, tokenizer: GeneratorTokenizer, **kwargs):
        super().__init__(*args, **kwargs)
        self._generator_tokenizer = tokenizer

    def build_tokenizer(self, metadata) -> JetStreamTokenizer:
        return JetStreamTokenizer(self._generator_tokenizer)


def request_problem(
    request, tokenizer: GeneratorTokenizer, engine: TptEngine, bos: bool = True
) -> str | None:
    """Why a DecodeRequest cannot be served (one line), or None if it can.

    `bos`: JetStream prepends the BOS id to token content that starts a conversation.
    """
    which = request.WhichOneof("content")
    if which == "text_content":
        tokens = tokenizer.encode(request.text_content.text)
    elif which == "token_content":
        tokens = list(request.token_content.token_ids)
        vocab = engine.cfg.vocab_size
        outside = [t for t in tokens if not 0 <= t < vocab]
        if outside:
            return f"token id {outside[0]} is outside the vocabulary (0 to {vocab - 1})"
    else:
        return "the request has no prompt: set text_content or token_content"
    if not tokens:
        return "empty prompt: it has no tokens"
    length = len(tokens) + (which == "token_content" and bos)
    if length > engine.max_prefill_length:
        return (
            f"prompt of {length} tokens exceeds the server's max prefill length of "
            f"{engine.max_prefill_length} tokens (tpt serve --max-prefill-length); shorten it"
        )
    if request.max_tokens <= 0:
        return f"max_tokens must be positive, got {request.max_tokens}"
    # The KV cache holds the prompt and every generated token; past it, decoding would
    # overwrite the cache's last position and produce garbage instead of an error.
    if length + request.max_tokens + 1 > engine.max_target_length:
        room = engine.max_target_length - length - 1
        return (
            f"max_tokens {request.max_tokens} does not fit the KV cache after a prompt of "
            f"{length} tokens: at most {room} (set by think.max_new_tokens)"
        )
    return None


class CheckedOrchestrator(orchestrator.LLMOrchestrator):
    """JetStream's servicer, refusing requests the engine cannot serve (see the module doc)."""

    def __init__(self, driver, tokenizer: GeneratorTokenizer, engine: TptEngine):
        super().__init__(driver=driver)
        self._tokenizer = tokenizer
        self._engine = engine

    async def Decode(self, request, context=None):  # the gRPC method, named by JetStream
        problem = request_problem(
            request, self._tokenizer, self._engine, bos=not request.session_cache
        )
        if problem is not None:
            if context is None:  # JetStream's in-process (test) mode has no gRPC context
                raise ValueError(problem)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        async for response in super().Decode(request, context):
            yield response


class GrpcServer:
    """JetStream's gRPC server (`server_lib.JetStreamServer`) on a chosen host and servicer:
    JetStream's own listens on every interface and serves requests unchecked."""

    def __init__(self, driver, servicer, address: str, threads: int):
        self._driver = driver
        executor = futures.ThreadPoolExecutor(max_workers=threads)
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(executor)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def start():  # grpc.aio objects must be made inside their event loop
            server = grpc.aio.server(executor)
            jetstream_pb2_grpc.add_OrchestratorServicer_to_server(servicer, server)
            server.add_insecure_port(address)
            await server.start()
            return server

        try:
            self._server = self._run(start())
        except RuntimeError as e:  # grpc's "Failed to bind to address ..."
            self._server = None
            self.stop()
            raise TptError(
                f"tpt serve: cannot listen on {address} ({e}); check --host and --port"
            ) from None

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def wait_for_termination(self) -> None:
        try:
            self._run(self._server.wait_for_termination())
        finally:
            self.stop()

    def stop(self) -> None:
        self._driver.stop()
        if self._server is not None:
            self._run(self._server.stop(grace=10))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


def default_prefill_length(cfg: Config, tokenizer: GeneratorTokenizer) -> int:
    """What `tpt think` provisions for a prompt of a full-length document (prompts.prefill_length)."""
    from tpt_jax.think.prompts import load_template, prefill_length

    t = cfg.think
    length = prefill_length(
        load_template(t.template), tokenizer, t.max_document_tokens, t.chat_template
    )
    if length > JETSTREAM_PREFILL_BUCKETS[-1]:
        raise ConfigError(
            f"config key 'think.max_document_tokens': {t.max_document_tokens} tokens and the "
            f"template need a prefill of {length} tokens, over JetStream's longest "
            f"({JETSTREAM_PREFILL_BUCKETS[-1]}); lower it or pass --max-prefill-length"
        )
    return length


def check_prefill_length(length: int) -> int:
    if length not in JETSTREAM_PREFILL_BUCKETS:
        raise TptError(
            f"--max-prefill-length {length}: must be one of JetStream's prefill buckets, a power "
            f"of two from {JETSTREAM_PREFILL_BUCKETS[0]} to {JETSTREAM_PREFILL_BUCKETS[-1]}"
        )
    return length


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def start_server(
    cfg: Config, port: int, max_prefill_length: int | None = None, host: str = "127.0.0.1"
) -> tuple[GrpcServer, int]:
    """Loads think.model_dir and serves it on host:port (the engine sharded over this host's
    devices). Returns the server and its prefill limit (None: `default_prefill_length`)."""
    from tpt_jax.generate import load_generator, local_mesh
    from tpt_jax.parallel import rules_from_config

    t = cfg.think
    tokenizer = GeneratorTokenizer(t.model_dir, t.chat_template_kwargs)
    if max_prefill_length is None:
        max_prefill_length = default_prefill_length(cfg, tokenizer)
    check_prefill_length(max_prefill_length)
    model_cfg, params = load_generator(t.model_dir, t.dtype)
    engine = ServingEngine(
        model_cfg,
        params,
        tokenizer=tokenizer,
        max_concurrent_decodes=t.max_concurrent_decodes,
        max_prefill_length=max_prefill_length,
        max_target_length=max_prefill_length + t.max_new_tokens + 1,
        # JetStream never says when a slot's request ends (a slot's pages are returned when the
        # orchestrator refills it), so the pool holds every slot at its longest.
        page_size=t.page_size,
        prefill_chunk=t.prefill_chunk,
        sampling=SamplingParams(t.temperature, t.top_k, t.top_p, t.seed),
        mesh=local_mesh(cfg),
        rules=rules_from_config(cfg.mesh.rules),
    )
    params = engine.load_params()
    # One engine both prefills and generates (JetStream's interleaved mode).
    driver = orchestrator.Driver(
        prefill_engines=[engine],
        generate_engines=[engine],
        prefill_params=[params],
        generate_params=[params],
        interleaved_mode=True,
        jax_padding=False,
    )
    threads = max(driver.get_total_concurrent_requests(), 64)  # as JetStream's server_lib
    servicer = CheckedOrchestrator(driver, tokenizer, engine)
    return GrpcServer(driver, servicer, grpc_address(host, port), threads), max_prefill_length
