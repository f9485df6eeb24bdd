"""The decode-slot engine: a KV cache with one slot per request, driven by prefill / insert /
generate, compiled once per shape.

prefill(padded prompt) -> prefix: the prompt's keys/values, its true length and its first sampled
    token (sampled with the request's own settings and seed);
insert(prefix, state, slot) -> state with that request in decode slot `slot`;
generate(params, state) -> (state, tokens): every slot emits its pending token and computes the
    next one, in one compiled step over all slots;
generate_steps(params, state, n) -> (state, done): n such steps inside one compiled loop, each
    emitted token written to the slot's row of an on-device output buffer; `collect` copies the
    rows of finished slots to the host.

Stops are decided on the device, inside the step: a slot is done when it emits an EOS id, when it
has emitted its `max_new_tokens`, or when its last emitted tokens equal one of the stop sequences
(token ids, a stop may span several tokens; only generated tokens count, never the prompt's). A
done slot stops advancing: its count, pending token, output row and KV cache stay put (its key and
value are written out of bounds, which the scatter drops) and what it emits is marked invalid,
until `insert` refills it. Stop sequences are the canonical encodings of the stop strings: a stop
string reached through another tokenization is not seen here; the host still cuts it from the
text when the sequence is finished (`GeneratorTokenizer.completion`).

`TptEngine` (engine.py) adapts it to JetStream's Engine API; the offline driver and `generate`
use it directly, without importing JetStream.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from tpt_jax.config import ModelConfig
from tpt_jax.think.generate import SamplingParams, decode, empty_cache, prefill, unstack_layers
from tpt_jax.think.sampling import sample

_COMPILED: dict = {}
# Decode steps per `generate_steps` call of the offline driver and `generate`: the host looks at
# the done flags once per call, and a slot that finishes inside a call idles for the rest of it.
STEPS_PER_CALL = 16
# A request's generation cap when `insert` is given none (JetStream stops its requests itself).
NO_LIMIT = 2**30


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


class SlotEngine:
    """Decode slots over the decoder's KV cache: prefill, insert, generate (pure JAX, no JetStream).

    Args:
        cfg: the model.
        params: parameters (or None, then `load_params` must be given them).
        max_concurrent_decodes: decode slots.
        max_prefill_length: longest prompt (prompts are padded to this bucket or a smaller power of 2).
        max_target_length: prompt + generated tokens per slot (the KV cache length).
        sampling: default sampling for requests that do not bring their own.
        eos_ids: token ids that end a request (kept as its last token).
        stops: stop sequences of token ids (canonical encodings of the stop strings), each
            ending a request at its last token; see the module docstring.
        mesh, rules: with a mesh, parameters are sharded by the training rules (logical axis
            names) and the KV cache [slots, kv_heads, length, head_dim] over the `batch` axes
            (slots) and the `kv_heads` axis; without one, everything lives on one device.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        params: Any = None,
        *,
        max_concurrent_decodes: int = 16,
        max_prefill_length: int = 1024,
        max_target_length: int = 2048,
        sampling: SamplingParams | None = None,
        mesh: jax.sharding.Mesh | None = None,
        rules=None,
        eos_ids: Sequence[int] = (),
        stops: Sequence[Sequence[int]] = (),
    ):
        self.cfg = cfg
        self._mesh = mesh
        self._rules = rules
        self._params = params
        self._slots = max_concurrent_decodes
        self._max_prefill = max_prefill_length
        self._max_target = max_target_length
        self.default_sampling = sampling or SamplingParams()
        self._eos_ids = tuple(int(i) for i in eos_ids)
        self._stops = tuple(tuple(int(i) for i in stop) for stop in stops if len(stop))
        # Engines of the same model, slots, cache length, mesh and stops share compiled steps
        # (eval and `generate` build one engine per batch); the bodies read nothing else.
        key = (cfg, max_concurrent_decodes, max_target_length, mesh, rules)
        key += (self._eos_ids, self._stops)
        if key not in _COMPILED:
            body = copy.copy(self)
            body._params = None  # the cache must not keep any model's parameters alive
            _COMPILED[key] = (
                jax.jit(body._prefill_impl),
                jax.jit(body._insert_impl, donate_argnums=(1,)),
                jax.jit(body._generate_impl, donate_argnums=(1,)),
                jax.jit(body._generate_steps_impl, static_argnums=(2,), donate_argnums=(1,)),
            )
        self._prefill, self._insert, self._generate, self._generate_steps = _COMPILED[key]

    def load_params(self, *args, **kwargs) -> Any:
        """The parameters in the engine's layout (layers unstacked): pass these to prefill/generate."""
        if args:
            self._params = args[0]
        if self._params is None:
            raise ValueError(
                "the engine has no parameters: pass them to the constructor or load_params"
            )
        if not isinstance(self._params["layers"], list):
            self._params = jax.device_put(unstack_layers(self._params), self._param_shardings())
        return self._params

    def _param_shardings(self):
        if self._mesh is None:
            return None
        from tpt_jax.model._params import abstract_params
        from tpt_jax.parallel import DEFAULT_RULES, logical_shardings

        stacked = logical_shardings(
            abstract_params(self.cfg), self._mesh, self._rules or DEFAULT_RULES
        )

        def one_layer(sharding):  # drop the leading `layers` axis of the stacked spec
            return NamedSharding(self._mesh, PartitionSpec(*tuple(sharding.spec)[1:]))

        layer = jax.tree.map(one_layer, stacked["layers"])
        return {**stacked, "layers": [layer] * self.cfg.num_layers}

    def cache_sharding(self) -> NamedSharding | None:
        """The KV cache's sharding: slots over the `batch` mesh axes, kv heads over `kv_heads`."""
        if self._mesh is None:
            return None
        from tpt_jax.parallel import DEFAULT_RULES, mesh_spec

        logical = ("batch", "kv_heads", "length", "head_dim")
        shape = (self._slots, self.cfg.num_kv_heads, self._max_target, self.cfg.resolved_head_dim)
        rules = self._rules or DEFAULT_RULES
        return NamedSharding(self._mesh, mesh_spec(logical, shape, self._mesh, rules, "kv cache"))

    def _constrain(self, cache: list) -> list:
        sharding = self.cache_sharding()
        if sharding is None:
            return cache
        return jax.lax.with_sharding_constraint(cache, [(sharding, sharding)] * len(cache))

    def init_decode_state(self, *args, **kwargs) -> dict:
        """Per slot: the KV cache [S, KV, T, D] per layer, the filled length, the pending token,
        tokens emitted, active, sampling settings and key, and for stops: max_new_tokens, done,
        the last L emitted tokens `recent` [S, L] (-1 before any) and the emitted tokens
        `output` [S, T] (T = max_target_length)."""
        slots = self._slots
        cache = empty_cache(self.cfg, slots, self._max_target)  # per layer (k, v) [S, KV, T, D]
        if self._mesh is not None:
            sharding = self.cache_sharding()
            cache = jax.device_put(cache, [(sharding, sharding)] * len(cache))
        return {
            "cache": cache,
            "lengths": jnp.zeros(slots, jnp.int32),  # cache positions filled
            "tokens": jnp.zeros(slots, jnp.int32),  # the token each slot emits next
            "generated": jnp.zeros(slots, jnp.int32),
            "active": jnp.zeros(slots, bool),
            "temperature": jnp.zeros(slots, jnp.float32),
            "top_k": jnp.zeros(slots, jnp.int32),
            "top_p": jnp.ones(slots, jnp.float32),
            "keys": jax.random.split(jax.random.key(0), slots),
            "max_new": jnp.full(slots, NO_LIMIT, jnp.int32),
            "done": jnp.zeros(slots, bool),
            "recent": jnp.full((slots, stop_table(self._stops)[0].shape[1]), -1, jnp.int32),
            "output": jnp.zeros((slots, self._max_target), jnp.int32),
        }

    def prefill(
        self,
        *,
        params: Any,
        existing_prefix: Any = None,
        padded_tokens: jax.Array,
        true_length: int,
        sampling: SamplingParams | None = None,
    ) -> dict:
        if existing_prefix is not None:
            raise NotImplementedError("prefix caching (existing_prefix) is not supported")
        s = sampling or self.default_sampling
        tokens = jnp.asarray(padded_tokens, jnp.int32)
        if tokens.ndim == 1:
            tokens = tokens[None]
        return self._prefill(
            params,
            tokens,
            jnp.asarray([true_length], jnp.int32),
            jnp.float32(s.temperature),
            jnp.int32(s.top_k),
            jnp.float32(s.top_p),
            jax.random.key(s.seed),
        )

    def insert(
        self, prefix: dict, decode_state: dict, slot: int, max_new_tokens: int | None = None
    ) -> dict:
        """The request of `prefix` in decode slot `slot`, done after `max_new_tokens` (or at its
        EOS or stop; without a cap, only those end it)."""
        cap = NO_LIMIT if max_new_tokens is None else max_new_tokens
        return self._insert(prefix, decode_state, jnp.int32(slot), jnp.int32(cap))

    def generate(self, params: Any, decode_state: dict) -> tuple[dict, jax.Array]:
        """Every slot emits its pending token. Returns (state, int32 [slots, 3]) with columns
        (emitted token, valid: slot active and not done before this step, tokens generated)."""
        return self._generate(params, decode_state)

    def generate_steps(
        self, params: Any, decode_state: dict, steps: int = STEPS_PER_CALL
    ) -> tuple[dict, jax.Array]:
        """`steps` decode steps in one compiled loop. Returns (state, done bool [slots]); the
        tokens stay on the device until `collect`."""
        return self._generate_steps(params, decode_state, steps)

    def collect(self, decode_state: dict, slots: Sequence[int]) -> list[list[int]]:
        """The tokens emitted by these slots since their insert (a copy of their rows only)."""
        if not len(slots):
            return []
        index = jnp.asarray(slots, jnp.int32)
        rows, counts = jax.device_get(
            (decode_state["output"][index], decode_state["generated"][index])
        )
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

    # --- compiled bodies -----------------------------------------------------------------------

    def _prefill_impl(self, params, tokens, length, temperature, top_k, top_p, key):
        last, kv = prefill(params, self.cfg, tokens, length)
        # Token i of a request is drawn with fold_in(key(seed), i), as in `generate`.
        first = sample(
            last, jax.random.fold_in(key, 0)[None], temperature[None], top_k[None], top_p[None]
        )[0]
        return {
            "kv": [(k[0], v[0]) for k, v in kv],  # per layer, [KV, T, D] each
            "length": length[0],
            "token": first,
            "temperature": temperature,
            "top_k": top_k,
            "top_p": top_p,
            "key": key,
        }

    def _insert_impl(self, prefix, state, slot, max_new):
        def place(cache, new):  # the slot's old contents are cleared, then the prompt written
            return cache.at[slot].set(jnp.zeros_like(cache[slot]).at[:, : new.shape[1]].set(new))

        return {
            "cache": self._constrain(
                [
                    (place(k, new_k), place(v, new_v))
                    for (k, v), (new_k, new_v) in zip(state["cache"], prefix["kv"], strict=True)
                ]
            ),
            "lengths": state["lengths"].at[slot].set(prefix["length"]),
            "tokens": state["tokens"].at[slot].set(prefix["token"]),
            "generated": state["generated"].at[slot].set(0),
            "active": state["active"].at[slot].set(True),
            "temperature": state["temperature"].at[slot].set(prefix["temperature"]),
            "top_k": state["top_k"].at[slot].set(prefix["top_k"]),
            "top_p": state["top_p"].at[slot].set(prefix["top_p"]),
            "keys": state["keys"].at[slot].set(prefix["key"]),
            "max_new": state["max_new"].at[slot].set(max_new),
            "done": state["done"].at[slot].set(False),
            "recent": state["recent"].at[slot].set(-1),
            "output": state["output"].at[slot].set(0),
        }

    def _generate_impl(self, params, state):
        state, emitted, valid = self._step(params, state)
        data = jnp.stack([emitted, valid.astype(jnp.int32), state["generated"]], axis=1)
        return state, data

    def _generate_steps_impl(self, params, state, steps):
        state = jax.lax.fori_loop(0, steps, lambda _, s: self._step(params, s)[0], state)
        return state, state["done"]

    def _step(self, params, state):
        """One decode step: (state, emitted [S], valid [S])."""
        held = state["done"]  # finished before this step: nothing of the slot moves
        emitted = state["tokens"]
        valid = state["active"] & ~held
        generated = jnp.where(held, state["generated"], state["generated"] + 1)
        # Inactive slots still compute (fixed shapes); their position is clamped into the cache.
        # A done slot writes out of bounds, which the cache's scatter drops: its row stays put.
        positions = jnp.minimum(state["lengths"], self._max_target - 1)
        positions = jnp.where(held, self._max_target, positions)
        logits, cache = decode(params, self.cfg, state["cache"], positions, emitted)
        step_keys = jax.vmap(jax.random.fold_in)(state["keys"], generated)
        following = sample(logits, step_keys, state["temperature"], state["top_k"], state["top_p"])
        recent = jnp.concatenate([state["recent"][:, 1:], emitted[:, None]], axis=1)
        table, lengths = (jnp.asarray(x) for x in stop_table(self._stops))
        compared = jnp.arange(table.shape[1])[None, :] >= table.shape[1] - lengths[:, None]
        matches = (recent[:, None, :] == table[None]) | ~compared[None]  # [S, stops, L]
        ended = (
            jnp.isin(emitted, jnp.asarray(self._eos_ids, jnp.int32))
            | (generated >= state["max_new"])
            | jnp.any(jnp.all(matches, axis=-1), axis=-1)
        )
        column = jnp.where(valid, generated - 1, self._max_target)  # out of bounds: dropped
        rows = jnp.arange(emitted.shape[0])
        new_state = dict(
            state,
            cache=self._constrain(cache),
            lengths=jnp.where(held, state["lengths"], state["lengths"] + 1),
            tokens=jnp.where(held, emitted, following),
            generated=generated,
            done=held | (valid & ended),
            recent=jnp.where(held[:, None], state["recent"], recent),
            output=state["output"].at[rows, column].set(emitted, mode="drop"),
        )
        return new_state, emitted, valid


def local_mesh(cfg) -> jax.sharding.Mesh | None:
    """The config's mesh over this process's devices (None on one device): generation shards its
    parameters and KV cache over the chips of its own host; hosts work on separate shards."""
    if len(jax.local_devices()) == 1:
        return None
    from tpt_jax.parallel import make_mesh

    return make_mesh(cfg, jax.local_devices())


@functools.cache
def bucket_lengths(max_prefill_length: int) -> tuple[int, ...]:
    """Prefill buckets: powers of two from 16 up to max_prefill_length (inclusive)."""
    sizes, size = [], 16
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
