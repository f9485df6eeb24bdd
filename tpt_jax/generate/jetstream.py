"""A JetStream `engine_api.Engine` over the tpt_jax decoder: the slot engine (slots.py) plus the
JetStream-specific surface (ResultTokens, tokenizer parameters, mesh, prefix sharding).

The same object serves through JetStream's orchestrator (`tpt serve`). Importing this module
imports JetStream (and, through it, seqio/TensorFlow); nothing on the training path does.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

# google-jetstream 0.2.2 still calls the removed jax.tree_map.
if not hasattr(jax, "tree_map"):
    jax.tree_map = jax.tree.map

from jetstream.engine import engine_api, tokenizer_pb2

from tpt_jax.generate import SlotEngine, bucket_lengths, pad_prompt

__all__ = ["TptEngine", "bucket_lengths", "pad_prompt"]


class TptEngine(SlotEngine, engine_api.Engine):
    """JetStream engine for the Llama-3 / Qwen2 / Qwen3 decoder (arguments as SlotEngine).

    tokenizer_path: reported by get_tokenizer (a SentencePiece model for JetStream's tokenizer).
    """

    def __init__(
        self, *args, tokenizer_path: str = "", mesh: jax.sharding.Mesh | None = None, **kwargs
    ):
        super().__init__(*args, mesh=mesh, **kwargs)
        self._tokenizer_path = tokenizer_path

    def generate(self, params: Any, decode_state: dict) -> tuple[dict, engine_api.ResultTokens]:
        state, data = super().generate(params, decode_state)
        result = engine_api.ResultTokens(
            data=data, tokens_idx=(0, 1), valid_idx=(1, 2), length_idx=(2, 3), samples_per_slot=1
        )
        return state, result

    def get_prefix_destination_sharding(self) -> Any:
        return None

    def get_tokenizer(self) -> tokenizer_pb2.TokenizerParameters:
        return tokenizer_pb2.TokenizerParameters(path=self._tokenizer_path, extra_ids=0)

    @property
    def samples_per_slot(self) -> int:
        return 1

    @property
    def mesh(self) -> jax.sharding.Mesh:
        return self._mesh or jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))

    @property
    def colocated_cpus(self) -> None:
        return None
