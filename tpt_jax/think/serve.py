"""`tpt serve CONFIG`: the engine behind JetStream's orchestrator and gRPC server.

Any JetStream client (ours in the `jetstream` backend, MaxText's benchmarking scripts, the
package's own `jetstream_pb2_grpc.OrchestratorStub`) can then request text or token completions.
Requests use the server's default sampling (`think.temperature`, `think.top_p`, `think.top_k`).
"""

from __future__ import annotations

import numpy as np

from tpt_jax.config import Config
from tpt_jax.think.engine import TptEngine, pad_prompt
from tpt_jax.think.generate import SamplingParams
from tpt_jax.think.tokenizer import GeneratorTokenizer

from jetstream.core import config_lib, server_lib  # isort: skip  (after engine: jax.tree_map)
from jetstream.engine import tokenizer_api  # isort: skip


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


def start_server(
    cfg: Config, port: int, max_prefill_length: int = 1024
) -> server_lib.JetStreamServer:
    """Loads think.model_dir and serves it on localhost:port (the engine sharded over this host's devices)."""
    import jax

    from tpt_jax.parallel import rules_from_config
    from tpt_jax.think.generate import load_generator
    from tpt_jax.think.slots import local_mesh

    t = cfg.think
    model_cfg, params = load_generator(t.model_dir, t.dtype)
    engine = ServingEngine(
        model_cfg,
        params,
        tokenizer=GeneratorTokenizer(t.model_dir),
        max_concurrent_decodes=t.max_concurrent_decodes,
        max_prefill_length=max_prefill_length,
        max_target_length=max_prefill_length + t.max_new_tokens + 1,
        sampling=SamplingParams(t.temperature, t.top_k, t.top_p, t.seed),
        mesh=local_mesh(cfg),
        rules=rules_from_config(cfg.mesh.rules),
    )
    devices = jax.local_devices()
    server_config = config_lib.ServerConfig(
        interleaved_slices=(f"{devices[0].platform}={len(devices)}",),
        interleaved_engine_create_fns=(lambda _: engine,),
    )
    return server_lib.run(port=port, config=server_config, devices=devices, jax_padding=False)
