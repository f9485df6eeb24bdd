"""The one continuous-batching loop: requests in, finished generations out, as slots free up.

The offline driver (`tpt think`), `generate` (eval, `tpt sample`) and the benchmarks all decode
through `continuous_batching`. A finished slot is refilled at once; pages come and go with the
sequences. When the slots in flight would need more pages than the pool has free, the newest is
preempted: its pages return to the pool and its request starts again later from its prompt
(recomputed: token i of a request depends only on its seed and i, so the result is unchanged).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from tpt_jax.generate._engine import STEPS_PER_CALL, DecodeState, SlotEngine
from tpt_jax.generate._sampling import SamplingParams


@dataclasses.dataclass
class Request:
    """A prompt (token ids) to generate for; `tag` is the caller's, returned with the result."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    tag: Any = None


@dataclasses.dataclass
class Finished:
    """A request's generated tokens (ending with its EOS or stop sequence when it reached one)."""

    request: Request
    tokens: list[int]


@dataclasses.dataclass
class LoopStats:
    """Counters of one `continuous_batching` run."""

    prompts: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    decode_calls: int = 0
    preemptions: int = 0


def continuous_batching(
    engine: SlotEngine,
    params: Any,
    requests: Iterable[Request],
    *,
    stop_requested: Callable[[], bool] = lambda: False,
    steps: int = STEPS_PER_CALL,
    stats: LoopStats | None = None,
) -> Iterator[Finished]:
    """Generates for `requests` (pulled lazily, as slots and pages free up) and yields each as
    it finishes. When `stop_requested()` turns true, the loop returns at the next call boundary
    and the requests in flight are abandoned (never yielded)."""
    stats = stats if stats is not None else LoopStats()
    pending = iter(requests)
    waiting: collections.deque[Request] = collections.deque()  # preempted ones first
    running: dict[int, Request] = {}
    admitted: list[int] = []  # slots in admission order: the last is preempted first
    state: DecodeState = engine.init_decode_state()
    exhausted = False
    while not stop_requested():
        for slot in range(engine.max_concurrent_decodes):
            if slot in running:
                continue
            if not waiting and not exhausted:
                request = next(pending, None)
                if request is None:
                    exhausted = True
                else:
                    waiting.append(request)
            if not waiting or (running and not engine.can_admit(len(waiting[0].prompt), steps)):
                break
            request = waiting.popleft()
            state = engine.prefill_insert(
                params, state, slot, request.prompt, request.sampling, request.max_new_tokens
            )
            running[slot] = request
            admitted.append(slot)
            stats.prompts += 1
            stats.prompt_tokens += len(request.prompt)
        if not running:
            return
        while len(running) > 1 and engine.pages_short(steps):
            slot = admitted.pop()
            engine.release(slot)
            waiting.appendleft(running.pop(slot))
            stats.preemptions += 1
        state, done = engine.generate_steps(params, state, steps)
        stats.decode_calls += 1
        done = np.asarray(done)
        finished = [slot for slot in running if done[slot]]
        for slot, tokens in zip(finished, engine.collect(state, finished), strict=True):
            engine.release(slot)
            admitted.remove(slot)
            stats.generated_tokens += len(tokens)
            yield Finished(running.pop(slot), tokens)
