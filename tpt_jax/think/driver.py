"""`tpt think CONFIG`: crash-safe offline thinking generation over a corpus (local engine).

Documents are split over shards by position (document k goes to shard k % n). Each shard writes
`<output_dir>/shard-<i>-of-<n>/chunk-<c>.jsonl`, each chunk committed atomically (written under a
temporary name, then renamed) once `chunk_size` documents are finished. A restart reads the
committed chunks and skips their ids, so after any crash the output holds every document of the
shard exactly once; with greedy decoding, with the same text as an uninterrupted run (each
document's sampling seed derives from its id, not from the order of work).

Decoding uses continuous batching: a finished slot is refilled at once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from tpt_jax import storage
from tpt_jax.config import Config
from tpt_jax.data.readers import Document, read_corpus
from tpt_jax.data.rejects import RejectLog
from tpt_jax.preemption import PreemptionWatch
from tpt_jax.think.backends import Completion
from tpt_jax.think.generate import SamplingParams
from tpt_jax.think.prompts import load_template, render
from tpt_jax.think.tokenizer import GeneratorTokenizer, cut_at_stop

THINK_OPEN = "<think>"


def document_seed(seed: int, doc_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[:8], 16) % 2**31


def shard_folder(output_dir: str, index: int, count: int) -> str:
    return os.path.join(output_dir, f"shard-{index:05d}-of-{count:05d}")


def _chunks(folder: str) -> list[str]:
    return storage.glob(os.path.join(folder, "chunk-*.jsonl"))


def committed_records(folder: str) -> list[dict]:
    """Every committed record of a shard folder (local or gs://), in commit order."""
    records = []
    for path in _chunks(folder):
        records.extend(json.loads(line) for line in storage.read_text(path).splitlines())
    return records


def _commit(folder: str, index: int, records: list[dict]) -> None:
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    storage.write_bytes(os.path.join(folder, f"chunk-{index:06d}.jsonl"), lines.encode())


@dataclasses.dataclass
class _Slot:
    doc: Document
    prompt_tokens: int
    truncated: bool
    tokens: list[int] = dataclasses.field(default_factory=list)
    failed: bool = False  # a remote request that failed after its retries: stays pending
    completion: Completion | None = None  # a remote server's reply


def _finish(
    slot: _Slot, text: str, reason: str, num_tokens: int, cfg: Config, template, generator: str
) -> dict:
    t = cfg.think
    thinking = text
    if thinking.lstrip().startswith(THINK_OPEN):  # reasoning models open their own think block
        thinking = thinking.lstrip()[len(THINK_OPEN) :]
    thinking = thinking.strip()
    if reason == "length" and t.on_length == "drop":
        thinking = None
    elif reason == "length" and t.on_length == "truncate":
        thinking = thinking.rsplit("\n", 1)[0].strip() if "\n" in thinking else thinking
    meta = {
        **slot.doc.meta,
        "generator": os.path.basename(os.path.normpath(t.model_dir)) if t.model_dir else t.backend,
        "generator_dir": generator,
        "template": template.name,
        "template_sha256": template.sha256,
        "sampling": {"temperature": t.temperature, "top_p": t.top_p, "top_k": t.top_k},
        "seed": document_seed(t.seed, slot.doc.id),
        "prompt_tokens": slot.prompt_tokens,
        "document_truncated": slot.truncated,
        "thinking_tokens": num_tokens,
        "finish_reason": reason,
        "length_policy": t.on_length if reason == "length" else None,
    }
    return {"id": slot.doc.id, "text": slot.doc.text, "thinking": thinking, "meta": meta}


def run_think(cfg: Config, shard: tuple[int, int] = (0, 1)) -> dict:
    """Generates thinking for this shard's documents that are not committed yet; returns a summary."""
    t = cfg.think
    index, count = shard
    folder = shard_folder(t.output_dir, index, count)
    storage.makedirs(folder)
    done = {r["id"] for r in committed_records(folder)}
    chunk_index = len(_chunks(folder))
    # Bad documents are listed beside the output locally; on gs:// (no appends) they are counted.
    reject_file = None if storage.is_remote(folder) else os.path.join(folder, "rejects.tsv")
    rejects = RejectLog(strict=cfg.data.strict, path=reject_file)
    teacher = t.backend == "teacher"  # reads the document itself: no model, prompt or tokenizer
    tokenizer = None if teacher else GeneratorTokenizer(t.model_dir)
    template = load_template(t.template)

    def pending() -> Iterator[Document]:
        for k, doc in enumerate(read_corpus(t.corpus, rejects)):
            if k % count == index and doc.id not in done:
                yield doc

    def prompt_of(doc: Document) -> tuple[str, bool]:
        if teacher:
            return doc.text, False
        document, truncated = tokenizer.truncate(doc.text, t.max_document_tokens)
        return _prompt(tokenizer, template, document, cfg, doc.id), truncated

    produce = _local_slots if t.backend == "local" else _remote_slots
    preemption = PreemptionWatch(collective=False)  # shards stop independently
    stopped = False
    finished: list[dict] = []
    failed = 0
    bar = tqdm(desc=f"think shard {index}/{count}", unit="doc", initial=len(done))
    generated_tokens, started = 0, time.perf_counter()
    for slot in produce(cfg, pending(), prompt_of, tokenizer):
        if slot.failed:
            failed += 1
            continue
        text, reason, num_tokens = _outcome(tokenizer, slot, t.stop, t.max_new_tokens)
        generated_tokens += num_tokens
        finished.append(_finish(slot, text, reason, num_tokens, cfg, template, t.model_dir))
        bar.update(1)
        rate = generated_tokens / max(time.perf_counter() - started, 1e-9)
        bar.set_postfix(tok_s=f"{rate:,.0f}", refresh=False)
        if len(finished) >= t.chunk_size:
            _commit(folder, chunk_index, finished[: t.chunk_size])
            chunk_index, finished = chunk_index + 1, finished[t.chunk_size :]
        stopped = preemption.stop_requested(bar.n)
        if stopped:
            tqdm.write(
                "tpt think: SIGTERM: committing the finished documents and stopping; rerun resumes"
            )
            break
    if finished:
        _commit(folder, chunk_index, finished)
    preemption.close()
    bar.close()
    rejects.close()
    from tpt_jax.think.summary import summarize_shard

    summary = summarize_shard(folder, t.group_by, rejects.summary())
    summary["left_pending"] = failed
    summary["stopped_early"] = stopped
    return summary


def _outcome(
    tokenizer: GeneratorTokenizer, slot: _Slot, stops: list[str], cap: int
) -> tuple[str, str, int]:
    """(thinking text, finish reason, generated tokens) of a finished generation, cut at EOS or
    the first stop string."""
    reply = slot.completion
    if reply is not None and reply.text is not None:  # decoded by an OpenAI-compatible server
        text, cut = cut_at_stop(reply.text, stops)
        num_tokens = (
            reply.num_tokens if reply.num_tokens is not None else len(tokenizer.encode(reply.text))
        )
        return text, "stop" if cut else (reply.finish_reason or "stop"), num_tokens
    text, ended = tokenizer.completion(slot.tokens, stops)
    return text, "stop" if ended or len(slot.tokens) < cap else "length", len(slot.tokens)


def _local_slots(cfg: Config, docs: Iterator[Document], prompt_of, tokenizer) -> Iterator[_Slot]:
    """Continuous batching over the in-process engine: a finished slot is refilled at once."""
    from tpt_jax.parallel import rules_from_config
    from tpt_jax.think.generate import load_generator
    from tpt_jax.think.slots import SlotEngine, local_mesh, pad_prompt

    t = cfg.think
    model_cfg, model_params = load_generator(t.model_dir, t.dtype)
    overhead = len(tokenizer.encode(prompt_of(Document("", "", None, {}, "", 0))[0]))
    max_prefill = 1 << (overhead + t.max_document_tokens + 16).bit_length()
    engine = SlotEngine(
        model_cfg,
        model_params,
        max_concurrent_decodes=t.max_concurrent_decodes,
        max_prefill_length=max_prefill,
        max_target_length=max_prefill + t.max_new_tokens + 1,
        mesh=local_mesh(cfg),
        rules=rules_from_config(cfg.mesh.rules),
    )
    params = engine.load_params()
    state = engine.init_decode_state()
    slots: dict[int, _Slot] = {}
    exhausted = False
    while True:
        for slot_index in range(engine.max_concurrent_decodes):
            if slot_index in slots or exhausted:
                continue
            doc = next(docs, None)
            if doc is None:
                exhausted = True
                break
            prompt, truncated = prompt_of(doc)
            padded, length = pad_prompt(tokenizer.encode(prompt), engine.max_prefill_length)
            sampling = SamplingParams(
                t.temperature, t.top_k, t.top_p, document_seed(t.seed, doc.id)
            )
            prefix = engine.prefill(
                params=params, padded_tokens=padded, true_length=length, sampling=sampling
            )
            state = engine.insert(prefix, state, slot_index)
            slots[slot_index] = _Slot(doc, length, truncated)
        if not slots:
            return
        state, result = engine.generate(params, state)
        tokens = np.asarray(result)[:, 0]
        for slot_index, slot in list(slots.items()):
            slot.tokens.append(int(tokens[slot_index]))
            if _stopped(tokenizer, slot.tokens, t.stop, t.max_new_tokens):
                del slots[slot_index]
                yield slot


def _stopped(tokenizer: GeneratorTokenizer, tokens: list[int], stops: list[str], cap: int) -> bool:
    if len(tokens) >= cap or (tokenizer.eos_id is not None and tokens[-1] == tokenizer.eos_id):
        return True
    if not stops:
        return False
    tail = tokenizer.decode(tokens[-16:])  # stop strings span a few tokens at most
    return any(s in tail for s in stops)


def _remote_slots(cfg: Config, docs: Iterator[Document], prompt_of, tokenizer) -> Iterator[_Slot]:
    """Concurrent requests to a remote server; a request that finally fails is yielded as failed."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    from tpt_jax.think.backends import BackendError, make_backend

    t = cfg.think
    backend = make_backend(t)

    def run(doc: Document) -> _Slot:
        prompt, truncated = prompt_of(doc)
        slot = _Slot(doc, len(tokenizer.encode(prompt)) if tokenizer else 0, truncated)
        try:
            reply = backend.complete(prompt, t.max_new_tokens, document_seed(t.seed, doc.id))
        except BackendError as e:
            tqdm.write(f"tpt think: {doc.id} left pending: {e}")
            slot.failed = True
            return slot
        slot.completion, slot.tokens = reply, reply.tokens or []
        return slot

    with ThreadPoolExecutor(max_workers=t.concurrency) as pool:
        in_flight = set()
        for doc in docs:
            in_flight.add(pool.submit(run, doc))
            if len(in_flight) >= t.concurrency:
                finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in finished)
        for future in in_flight:
            yield future.result()
    backend.close()


def _prompt(
    tokenizer: GeneratorTokenizer, template, document: str, cfg: Config, doc_id: str
) -> str:
    text = render(template, document, seed=document_seed(cfg.think.seed, doc_id))
    return tokenizer.chat(text) if cfg.think.chat_template else text
