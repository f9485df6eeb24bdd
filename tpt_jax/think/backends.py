"""Remote generation backends for `tpt think`: a JetStream gRPC server (ours or MaxText's).

Requests run concurrently up to a limit, each with a deadline, and are retried with exponential
backoff; one that still fails raises BackendError, and the driver leaves its document pending.
"""

from __future__ import annotations

import time

from tpt_jax.errors import TptError


class BackendError(TptError):
    """A remote request that failed after every retry."""


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

    def complete(self, prompt: str, max_new_tokens: int) -> list[int]:
        """Generated token ids for a prompt text (the server tokenizes and samples)."""
        request = self._pb2.DecodeRequest(
            text_content=self._pb2.DecodeRequest.TextContent(text=prompt), max_tokens=max_new_tokens
        )
        for attempt in range(self.retries + 1):
            try:
                tokens: list[int] = []
                for response in self._stub.Decode(request, timeout=self.timeout_s):
                    for sample in response.stream_content.samples:
                        tokens.extend(sample.token_ids)
                return tokens
            except self._grpc.RpcError as e:
                if attempt == self.retries:
                    raise BackendError(
                        f"jetstream {self.address}: {e.code().name} after {attempt + 1} attempts"
                    ) from None
                time.sleep(min(30.0, 0.5 * 2**attempt))
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._channel.close()
