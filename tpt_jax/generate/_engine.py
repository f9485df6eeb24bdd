"""The slot engine: decode slots over a paged KV cache, compiled once per shape bucket.

prefill_insert(params, state, slot, prompt) -> state: the prompt's keys and values written into
    pages given to `slot`, in chunks (so a long prompt needs no bucket of its own length), and
    its first token sampled with the request's own settings and seed;
generate_steps(params, state, n) -> (state, done): n decode steps of every slot inside one
    compiled loop, each emitted token kept in the slot's row of an on-device output buffer;
collect(state, slots) copies the rows of finished slots to the host; release(slot) returns a
    slot's pages to the pool at once.
For JetStream (`jetstream.TptEngine`): prefill(padded prompt) -> Prefix (the prompt in pages of
its own), insert(prefix, state, slot) copies those pages into the pool, generate(params, state)
runs one step.

Pages are handed out by the host (`PageAllocator`) a page at a time as sequences grow; each call
reads only the leading `live` entries of every page table row, `live` a power-of-two bucket
covering the longest live sequence, so a step costs what the live tokens cost, not the pool.

Stops are decided on the device, inside the step: a slot is done when it emits an EOS id, when it
has emitted its `max_new_tokens`, or when its last emitted tokens equal one of the stop sequences
(token ids; a stop may span several tokens; only generated tokens count, never the prompt's). A
done slot stops advancing: its count, pending token, output row and pages stay put (it writes
nothing) and what it emits is marked invalid, until a new request is inserted. Stop sequences are
the canonical encodings of the stop strings: a stop string reached through another tokenization is
not seen here; the host still cuts it from the text (`GeneratorTokenizer.completion`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpt_jax.config import ModelConfig
from tpt_jax.generate._pages import PageAllocator, pages_for
from tpt_jax.generate._sampling import SamplingParams, sample
from tpt_jax.model import Pages, abstract_params, decode_forward, empty_pages, unstack_layers

log = logging.getLogger(__name__)

_COMPILED: dict = {}
# Decode steps per `generate_steps` call of the batching loop: the host looks at the done flags
# once per call, and a slot that finishes inside a call idles for the rest of it.
STEPS_PER_CALL = 16
# A request's generation cap when `insert` is given none (JetStream stops its requests itself).
NO_LIMIT = 2**30
SMALLEST_CHUNK = (
    16  # the shortest prefill chunk compiled (a prompt's tail is padded to a power of 2)
)


@flax.struct.dataclass
class DecodeState:
    """Everything a decode step reads and writes, S slots (device arrays).

    Attributes:
        pages: the paged KV cache, per layer (keys, values) each [KV, N, P, D].
        lengths: int32 [S] positions filled (where the pending token's keys go).
        tokens: int32 [S] the token each slot emits at the next step.
        generated: int32 [S] tokens emitted since the slot's insert.
        active: bool [S] a request was inserted; done: bool [S] it reached a stop.
        max_new: int32 [S] the request's generation cap.
        temperature: float32 [S]; top_k: int32 [S]; top_p: float32 [S]; keys: [S] PRNG keys.
        recent: int32 [S, L] the last L emitted tokens (-1 before any), L the longest stop.
        output: int32 [S, T] emitted tokens by step, T = max_target_length.
    """

    pages: Pages
    lengths: jax.Array
    tokens: jax.Array
    generated: jax.Array
    active: jax.Array
    done: jax.Array
    max_new: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    keys: jax.Array
    recent: jax.Array
    output: jax.Array


@flax.struct.dataclass
class Prefix:
    """A prefilled prompt (JetStream's prefill result): its keys and values in pages of its own
    (per layer [KV, n, P, D]), its length, its first sampled token and its sampling settings."""

    pages: Pages
    length: jax.Array
    token: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    key: jax.Array


def stop_table(stops: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Stop sequences as (int32 [S, L] table, int32 [S] lengths), L the longest (at least 1).

    Each sequence is right-aligned in its row (left-padded with -1), so that a row compares
    directly with a slot's last L tokens; a row's first L - length columns are not compared.
    """
    stops = [list(stop) for stop in stops if len(stop)]
    width = max((len(stop) for stop in stops), default=1)
    table = np.full((len(stops), width), -1, np.int32)
    for row, stop in zip(table, stops, strict=True):
        row[width - len(stop) :] = stop
    return table, np.asarray([len(stop) for stop in stops], np.int32)


def _default_kernel(cfg: ModelConfig, mesh) -> str:
    """The decode attention kernel: Pallas on a TPU where it applies, else the XLA gather."""
    if jax.default_backend() != "tpu":
        return "xla"
    from tpt_jax.model import pallas_unsupported_reason

    reason = pallas_unsupported_reason(
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.resolved_head_dim,
        kv_dtype=cfg.dtype,
    )
    if reason is None:
        return "pallas"
    log.info("decode attention: the XLA gather path, not the Pallas kernel: %s", reason)
    return "xla"


def _bucket(n: int, cap: int) -> int:
    """The power of two >= n (at least 1), at most cap."""
    return min(1 << max(n - 1, 0).bit_length(), cap)


class SlotEngine:
    """Decode slots over a paged KV cache (pure JAX, no JetStream).

    Args:
        cfg: the model.
        params: parameters (or None, then `load_params` must be given them).
        max_concurrent_decodes: decode slots.
        max_prefill_length: longest prompt.
        max_target_length: prompt + generated tokens per slot.
        page_size: tokens per KV page.
        num_pages: pages in the pool; 0 = enough for every slot at max_target_length. A smaller
            pool holds more slots than that in the same memory when sequences end early; when
            the slots in flight run out of pages, the batching loop preempts the newest.
        prefill_chunk: prompt tokens written per prefill call (a multiple of page_size).
        sampling: default sampling for requests that do not bring their own.
        eos_ids: token ids that end a request (kept as its last token).
        stops: stop sequences of token ids (see the module docstring).
        mesh, rules: with a mesh, parameters are sharded by the training rules (logical axis
            names) and the pages over the `kv_heads` axis; without one, everything lives on one
            device.
        kernel: decode attention: "pallas" (TPU kernel), "xla" (gather), "pallas_interpret"
            (the kernel in interpret mode, for tests); None: pallas on a TPU where it applies.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: Any = None,
        *,
        max_concurrent_decodes: int = 16,
        max_prefill_length: int = 1024,
        max_target_length: int = 2048,
        page_size: int = 64,
        num_pages: int = 0,
        prefill_chunk: int = 512,
        sampling: SamplingParams | None = None,
        mesh: jax.sharding.Mesh | None = None,
        rules=None,
        eos_ids: Sequence[int] = (),
        stops: Sequence[Sequence[int]] = (),
        kernel: str | None = None,
    ):
        self.cfg = cfg
        self._mesh = mesh
        self._rules = rules
        self._params = params
        self._slots = max_concurrent_decodes
        self._max_prefill = max_prefill_length
        self._max_target = max_target_length
        self.page_size = page_size
        self.max_pages = pages_for(max_target_length, page_size)
        self.num_pages = num_pages or self._slots * self.max_pages
        if self.num_pages < self.max_pages:
            raise ValueError(
                f"a KV pool of {self.num_pages} pages of {page_size} tokens cannot hold one "
                f"request of max_target_length={max_target_length} ({self.max_pages} pages)"
            )
        self.prefill_chunk = max(page_size, prefill_chunk // page_size * page_size)
        self.default_sampling = sampling or SamplingParams()
        self._eos_ids = tuple(int(i) for i in eos_ids)
        self._stops = tuple(tuple(int(i) for i in stop) for stop in stops if len(stop))
        self.kernel = kernel or _default_kernel(cfg, mesh)
        self.pages = PageAllocator(self.num_pages, page_size, self._slots, self.max_pages)
        sharding = self.page_sharding()
        self._kv_axes = None if sharding is None else sharding.spec[0]
        self._table_device = (None, -1)  # (device copy of the page table, its version)
        self._reach = np.zeros(self._slots, np.int64)  # positions a slot may have filled
        self._cap = np.zeros(self._slots, np.int64)  # positions a slot can ever fill
        # Engines of the same model, slots, pool, mesh and stops share compiled steps (eval and
        # `generate` build one engine per batch); the bodies read nothing else.
        key = (cfg, self._slots, self._max_target, page_size, self.num_pages, mesh, rules)
        key += (self._eos_ids, self._stops, self.kernel)
        if key not in _COMPILED:
            body = copy.copy(self)
            body._params = body.pages = None  # the cache keeps no parameters, no host state
            _COMPILED[key] = (
                jax.jit(body._chunk_impl, static_argnums=(6,), donate_argnums=(1,)),
                jax.jit(body._activate_impl, donate_argnums=(0,)),
                jax.jit(body._insert_impl, donate_argnums=(1,)),
                jax.jit(body._generate_impl, static_argnums=(3,), donate_argnums=(1,)),
                jax.jit(body._steps_impl, static_argnums=(3, 4), donate_argnums=(1,)),
            )
        (self._chunk, self._activate, self._insert, self._generate, self._steps) = _COMPILED[key]

    # --- parameters and state ------------------------------------------------------------------

    def load_params(self, *args, **kwargs) -> Any:
        """The parameters in the engine's layout (layers unstacked): pass these to every call."""
        if args:
            self._params = args[0]
        if self._params is None:
            raise ValueError(
                "the engine has no parameters: pass them to the constructor or load_params"
            )
        if not isinstance(self._params["layers"], list):
            self._params = jax.device_put(unstack_layers(self._params), self.param_shardings())
        return self._params

    def param_shardings(self):
        """The parameters' shardings in the engine's layout (None without a mesh)."""
        if self._mesh is None:
            return None
        from tpt_jax.parallel import DEFAULT_RULES, logical_shardings

        stacked = logical_shardings(
            abstract_params(self.cfg), self._mesh, self._rules or DEFAULT_RULES
        )

        def one_layer(sharding):  # drop the leading `layers` axis of the stacked spec
            return NamedSharding(self._mesh, PartitionSpec(*tuple(sharding.spec)[1:]))

        layer = jax.tree.map(one_layer, stacked["layers"])
        return {**stacked, "layers": [layer] * self.cfg.num_layers}

    def page_sharding(self, num_pages: int | None = None) -> NamedSharding | None:
        """The pages' sharding: kv heads over the `kv_heads` mesh axes, pages replicated."""
        if self._mesh is None:
            return None
        from tpt_jax.parallel import DEFAULT_RULES, mesh_spec

        logical = ("kv_heads", None, None, "head_dim")
        shape = (
            self.cfg.num_kv_heads,
            num_pages or self.num_pages,
            self.page_size,
            self.cfg.resolved_head_dim,
        )
        rules = self._rules or DEFAULT_RULES
        return NamedSharding(self._mesh, mesh_spec(logical, shape, self._mesh, rules, "kv pages"))

    def _constrain(self, pages: Pages) -> Pages:
        sharding = self.page_sharding(pages[0][0].shape[1])
        if sharding is None:
            return pages
        return jax.lax.with_sharding_constraint(pages, [(sharding, sharding)] * len(pages))

    def init_decode_state(self, *args, **kwargs) -> DecodeState:
        """Empty slots and an empty pool (every page free)."""
        slots = self._slots
        self.pages = PageAllocator(self.num_pages, self.page_size, slots, self.max_pages)
        self._reach[:] = self._cap[:] = 0
        pages = empty_pages(self.cfg, self.num_pages, self.page_size)
        if self._mesh is not None:
            sharding = self.page_sharding()
            pages = jax.device_put(pages, [(sharding, sharding)] * len(pages))
        return DecodeState(
            pages=pages,
            lengths=jnp.zeros(slots, jnp.int32),
            tokens=jnp.zeros(slots, jnp.int32),
            generated=jnp.zeros(slots, jnp.int32),
            active=jnp.zeros(slots, bool),
            done=jnp.zeros(slots, bool),
            max_new=jnp.full(slots, NO_LIMIT, jnp.int32),
            temperature=jnp.zeros(slots, jnp.float32),
            top_k=jnp.zeros(slots, jnp.int32),
            top_p=jnp.ones(slots, jnp.float32),
            keys=jax.random.split(jax.random.key(0), slots),
            recent=jnp.full((slots, stop_table(self._stops)[0].shape[1]), -1, jnp.int32),
            output=jnp.zeros((slots, self._max_target), jnp.int32),
        )

    # --- host-side page bookkeeping ------------------------------------------------------------

    def _table(self) -> jax.Array:
        table, version = self._table_device
        if version != self.pages.version:
            table = jnp.asarray(self.pages.table)
            self._table_device = (table, self.pages.version)
        return table

    def _targets(self, steps: int) -> np.ndarray:
        """Positions each slot may fill within the next `steps` steps."""
        return np.minimum(self._reach + steps, self._cap)

    def pages_short(self, steps: int) -> int:
        """Pages missing for every live slot to take `steps` more steps (0: they fit)."""
        targets = self._targets(steps)
        need = sum(self.pages.missing(s, int(t)) for s, t in enumerate(targets) if self._cap[s])
        return max(0, need - self.pages.free_pages)

    def can_admit(self, prompt_length: int, steps: int) -> bool:
        """Whether a prompt fits beside the live slots' next `steps` steps, with a page of
        headroom per live slot (a request admitted into a full pool would be preempted at once)."""
        live = int(np.count_nonzero(self._cap))
        need = pages_for(prompt_length + steps, self.page_size) + live
        return need + self.pages_short(steps) <= self.pages.free_pages

    def release(self, slot: int) -> None:
        """Returns the slot's pages to the pool; the slot writes nothing until its next insert."""
        self.pages.release(slot)
        self._reach[slot] = self._cap[slot] = 0

    def _reserve(self, steps: int) -> int:
        """Gives every live slot pages for `steps` more steps; the live bucket of the call."""
        targets = self._targets(steps)
        for slot in np.flatnonzero(self._cap):
            if not self.pages.ensure(int(slot), int(targets[slot])):
                raise RuntimeError(
                    f"KV pool exhausted: slot {slot} needs pages for {targets[slot]} positions "
                    f"({self.pages.free_pages} pages free); release or preempt slots first"
                )
        self._reach = targets
        longest = int(targets.max(initial=1))
        return _bucket(pages_for(longest, self.page_size), self.max_pages)

    # --- requests in -----------------------------------------------------------------------------

    def _sampling_args(self, sampling: SamplingParams | None):
        s = sampling or self.default_sampling
        return (
            jnp.float32(s.temperature),
            jnp.int32(s.top_k),
            jnp.float32(s.top_p),
            jax.random.key(s.seed),
        )

    def _write_prompt(self, params, pages, table_row, tokens: Sequence[int], sampling_args):
        """Writes a prompt into the pages of `table_row` chunk by chunk; (pages, first token)."""
        tokens = np.asarray(tokens, np.int32)
        start, first = 0, None
        while start < len(tokens):
            count = min(self.prefill_chunk, len(tokens) - start)
            width = max(SMALLEST_CHUNK, _bucket(count, self.prefill_chunk))
            chunk = np.zeros(width, np.int32)
            chunk[:count] = tokens[start : start + count]
            live = _bucket(pages_for(start + count, self.page_size), self.max_pages)
            pages, first = self._chunk(
                params, pages, table_row, chunk, np.int32(start), np.int32(count), live,
                *sampling_args,
            )  # fmt: skip
            start += count
        return pages, first

    def prefill_insert(
        self,
        params: Any,
        state: DecodeState,
        slot: int,
        prompt: Sequence[int],
        sampling: SamplingParams | None = None,
        max_new_tokens: int | None = None,
    ) -> DecodeState:
        """The request `prompt` (token ids) prefilled straight into pages of `slot` and made live."""
        if not 0 < len(prompt) <= self._max_prefill:
            raise ValueError(
                f"a prompt of {len(prompt)} tokens: prompts must have 1 to "
                f"max_prefill_length={self._max_prefill} tokens"
            )
        self.release(slot)
        if not self.pages.ensure(slot, len(prompt)):
            raise RuntimeError(f"KV pool exhausted: no pages for a prompt of {len(prompt)} tokens")
        cap = NO_LIMIT if max_new_tokens is None else max_new_tokens
        self._reach[slot] = len(prompt)
        self._cap[slot] = min(len(prompt) + cap, self.max_pages * self.page_size)
        args = self._sampling_args(sampling)
        row = self._table()[slot]
        pages, first = self._write_prompt(params, state.pages, row, prompt, args)
        state = state.replace(pages=pages)
        return self._activate(
            state, jnp.int32(slot), jnp.int32(len(prompt)), first, *args, jnp.int32(cap)
        )

    def prefill(
        self,
        *,
        params: Any,
        existing_prefix: Any = None,
        padded_tokens: jax.Array,
        true_length: int,
        sampling: SamplingParams | None = None,
    ) -> Prefix:
        """The prompt's keys and values in pages of their own (JetStream's prefill)."""
        if existing_prefix is not None:
            raise NotImplementedError("prefix caching (existing_prefix) is not supported")
        tokens = np.asarray(padded_tokens, np.int32).reshape(-1)[:true_length]
        count = pages_for(len(tokens), self.page_size)
        own = _bucket(count, self.max_pages)  # few shapes of prefix
        pages = empty_pages(self.cfg, own, self.page_size)
        row = np.full(self.max_pages, own, np.int32)
        row[:own] = np.arange(own)
        args = self._sampling_args(sampling)
        pages, first = self._write_prompt(params, pages, jnp.asarray(row), tokens, args)
        return Prefix(pages, jnp.int32(true_length), first, *args)

    def insert(
        self,
        prefix: Prefix,
        decode_state: DecodeState,
        slot: int,
        max_new_tokens: int | None = None,
    ) -> DecodeState:
        """The request of `prefix` in decode slot `slot` (its pages copied into the pool), done
        after `max_new_tokens` (or at its EOS or stop; without a cap, only those end it)."""
        length = int(prefix.length)
        self.release(slot)
        if not self.pages.ensure(slot, length):
            raise RuntimeError(f"KV pool exhausted: no pages for a prompt of {length} tokens")
        cap = NO_LIMIT if max_new_tokens is None else max_new_tokens
        self._reach[slot] = length
        self._cap[slot] = min(length + cap, self.max_pages * self.page_size)
        count = pages_for(length, self.page_size)
        ids = np.full(prefix.pages[0][0].shape[1], self.pages.sentinel, np.int32)
        ids[:count] = self.pages.table[slot, :count]
        return self._insert(prefix, decode_state, jnp.int32(slot), jnp.asarray(ids), jnp.int32(cap))

    # --- decoding --------------------------------------------------------------------------------

    def generate(self, params: Any, decode_state: DecodeState) -> tuple[DecodeState, jax.Array]:
        """Every slot emits its pending token. Returns (state, int32 [slots, 3]) with columns
        (emitted token, valid: slot active and not done before this step, tokens generated)."""
        live = self._reserve(1)
        return self._generate(params, decode_state, self._table(), live)

    def generate_steps(
        self, params: Any, decode_state: DecodeState, steps: int = STEPS_PER_CALL
    ) -> tuple[DecodeState, jax.Array]:
        """`steps` decode steps in one compiled loop. Returns (state, done bool [slots]); the
        tokens stay on the device until `collect`."""
        live = self._reserve(steps)
        return self._steps(params, decode_state, self._table(), steps, live)

    def decode_call(self, params, state, table, live: int, steps: int = STEPS_PER_CALL):
        """The lowered `generate_steps` program for these (possibly abstract) arguments, for
        ahead-of-time compilation (e.g. for a TPU topology): `.compile()` it."""
        return self._steps.lower(params, state, table, steps, live)

    def collect(self, decode_state: DecodeState, slots: Sequence[int]) -> list[list[int]]:
        """The tokens emitted by these slots since their insert (a copy of their rows only)."""
        if not len(slots):
            return []
        index = jnp.asarray(slots, jnp.int32)
        rows, counts = jax.device_get((decode_state.output[index], decode_state.generated[index]))
        return [row[: min(n, len(row))].tolist() for row, n in zip(rows, counts, strict=True)]

    @property
    def max_concurrent_decodes(self) -> int:
        return self._slots

    @property
    def max_prefill_length(self) -> int:
        return self._max_prefill

    @property
    def max_target_length(self) -> int:
        return self._max_target

    # --- compiled bodies -------------------------------------------------------------------------

    def _chunk_impl(self, params, pages, table_row, tokens, start, count, live, *sampling):
        positions = start + jnp.arange(tokens.shape[0], dtype=jnp.int32)
        write = jnp.arange(tokens.shape[0]) < count
        logits, pages = decode_forward(
            params, self.cfg, tokens[None], positions[None], pages, table_row[None],
            write[None], live, logits_at=jnp.maximum(count - 1, 0)[None], kernel="xla",
        )  # fmt: skip
        return self._constrain(pages), self._first_token(logits[0], *sampling)

    @staticmethod
    def _first_token(logits, temperature, top_k, top_p, key):
        # Token i of a request is drawn with fold_in(key(seed), i).
        first_key = jax.random.fold_in(key, 0)[None]
        return sample(logits[None], first_key, temperature[None], top_k[None], top_p[None])[0]

    def _activate_impl(self, state, slot, length, token, temperature, top_k, top_p, key, max_new):
        return state.replace(
            lengths=state.lengths.at[slot].set(length),
            tokens=state.tokens.at[slot].set(token),
            generated=state.generated.at[slot].set(0),
            active=state.active.at[slot].set(True),
            done=state.done.at[slot].set(False),
            max_new=state.max_new.at[slot].set(max_new),
            temperature=state.temperature.at[slot].set(temperature),
            top_k=state.top_k.at[slot].set(top_k),
            top_p=state.top_p.at[slot].set(top_p),
            keys=state.keys.at[slot].set(key),
            recent=state.recent.at[slot].set(-1),
            output=state.output.at[slot].set(0),
        )

    def _insert_impl(self, prefix, state, slot, ids, max_new):
        pages = [
            (k.at[:, ids].set(pk, mode="drop"), v.at[:, ids].set(pv, mode="drop"))
            for (k, v), (pk, pv) in zip(state.pages, prefix.pages, strict=True)
        ]
        state = state.replace(pages=self._constrain(pages))
        return self._activate_impl(
            state, slot, prefix.length, prefix.token, prefix.temperature, prefix.top_k,
            prefix.top_p, prefix.key, max_new,
        )  # fmt: skip

    def _generate_impl(self, params, state, table, live):
        state, emitted, valid = self._step(params, state, table, live)
        data = jnp.stack([emitted, valid.astype(jnp.int32), state.generated], axis=1)
        return state, data

    def _steps_impl(self, params, state, table, steps, live):
        state = jax.lax.fori_loop(
            0, steps, lambda _, s: self._step(params, s, table, live)[0], state
        )
        return state, state.done

    def _step(self, params, state: DecodeState, table, live):
        """One decode step: (state, emitted [S], valid [S])."""
        held = state.done  # finished before this step: nothing of the slot moves
        emitted = state.tokens
        valid = state.active & ~held
        generated = jnp.where(held, state.generated, state.generated + 1)
        positions = jnp.minimum(state.lengths, self.max_pages * self.page_size - 1)
        logits, pages = decode_forward(
            params, self.cfg, emitted[:, None], positions[:, None], state.pages, table,
            valid[:, None], live, logits_at=jnp.zeros_like(emitted), kernel=self.kernel,
            mesh=self._mesh, kv_axes=self._kv_axes,
        )  # fmt: skip
        step_keys = jax.vmap(jax.random.fold_in)(state.keys, generated)
        following = sample(logits, step_keys, state.temperature, state.top_k, state.top_p)
        recent = jnp.concatenate([state.recent[:, 1:], emitted[:, None]], axis=1)
        stops, lengths = (jnp.asarray(x) for x in stop_table(self._stops))
        compared = jnp.arange(stops.shape[1])[None, :] >= stops.shape[1] - lengths[:, None]
        matches = (recent[:, None, :] == stops[None]) | ~compared[None]  # [S, stops, L]
        ended = (
            jnp.isin(emitted, jnp.asarray(self._eos_ids, jnp.int32))
            | (generated >= state.max_new)
            | jnp.any(jnp.all(matches, axis=-1), axis=-1)
        )
        column = jnp.where(valid, generated - 1, self._max_target)  # out of bounds: dropped
        rows = jnp.arange(emitted.shape[0])
        new_state = state.replace(
            pages=self._constrain(pages),
            lengths=jnp.where(valid, state.lengths + 1, state.lengths),
            tokens=jnp.where(held, emitted, following),
            generated=generated,
            done=held | (valid & ended),
            recent=jnp.where(held[:, None], state.recent, recent),
            output=state.output.at[rows, column].set(emitted, mode="drop"),
        )
        return new_state, emitted, valid


def local_mesh(cfg) -> jax.sharding.Mesh | None:
    """The config's mesh over this process's devices (None on one device): generation shards its
    parameters and KV pages over the chips of its own host; hosts work on separate shards."""
    if len(jax.local_devices()) == 1:
        return None
    from tpt_jax.parallel import make_mesh

    return make_mesh(cfg, jax.local_devices(), training=False)


def bucket_lengths(max_prefill_length: int) -> tuple[int, ...]:
    """Prefill buckets: powers of two from 16 up to max_prefill_length (inclusive)."""
    sizes, size = [], SMALLEST_CHUNK
    while size < max_prefill_length:
        sizes.append(size)
        size *= 2
    return (*sizes, max_prefill_length)


def pad_prompt(tokens: list[int], max_prefill_length: int) -> tuple[np.ndarray, int]:
    """Right-pads a prompt to its bucket; returns (padded [bucket], true length)."""
    if len(tokens) > max_prefill_length:
        raise ValueError(
            f"prompt of {len(tokens)} tokens exceeds max_prefill_length={max_prefill_length}"
        )
    bucket = next(b for b in bucket_lengths(max_prefill_length) if b >= len(tokens))
    padded = np.zeros(bucket, np.int32)
    padded[: len(tokens)] = tokens
    return padded, len(tokens)
