"""Generation: the slot engine over a paged KV cache, sampling, the one continuous-batching
loop, the generator's tokenizer and chat template; `tpt sample` and `tpt serve` (JetStream, in
`jetstream.py` and `serve.py`, imported only by those who serve).

Thinking generation (`tpt_jax.think`), evaluation and the benchmarks all decode through here.
"""

from tpt_jax.generate._chat_template import ChatTemplate, ChatTemplateError
from tpt_jax.generate._engine import (
    NO_LIMIT,
    STEPS_PER_CALL,
    DecodeState,
    Prefix,
    SlotEngine,
    bucket_lengths,
    local_mesh,
    pad_prompt,
    stop_table,
)
from tpt_jax.generate._generate import generate, load_generator
from tpt_jax.generate._loop import Finished, LoopStats, Request, continuous_batching
from tpt_jax.generate._pages import PageAllocator, pages_for
from tpt_jax.generate._sampling import SamplingParams, filter_logits, sample
from tpt_jax.generate._tokenizer import GeneratorTokenizer, TokenizerError, cut_at_stop

__all__ = [
    "NO_LIMIT",
    "STEPS_PER_CALL",
    "ChatTemplate",
    "ChatTemplateError",
    "DecodeState",
    "Finished",
    "GeneratorTokenizer",
    "LoopStats",
    "PageAllocator",
    "Prefix",
    "Request",
    "SamplingParams",
    "SlotEngine",
    "TokenizerError",
    "bucket_lengths",
    "continuous_batching",
    "cut_at_stop",
    "filter_logits",
    "generate",
    "load_generator",
    "local_mesh",
    "pad_prompt",
    "pages_for",
    "sample",
    "stop_table",
]
