"""`tpt think CONFIG`: crash-safe offline thinking generation over a corpus (local engine).

A document belongs to shard `hash(id) % n`, so adding, removing or reordering documents or files
only adds or removes that work. Each shard writes `<output_dir>/shard-<i>-of-<n>/chunk-<c>.jsonl`,
each chunk committed atomically (written under a temporary name, then renamed) once `chunk_size`
documents are finished. A restart reads the committed ids and skips them, so after any crash the
output holds every document of the shard exactly once; with greedy decoding, with the same text
as an uninterrupted run (each document's sampling seed derives from its id, not from the order of
work). One process owns a shard folder at a time (tpt_jax.lock), and the folder records the
settings that determine its output (`settings.json`): a rerun with other settings is refused
rather than mixed in.

Decoding uses continuous batching: the engine decides EOS, stop sequences and max_new_tokens
on the device, the host pulls only the done flags and the tokens of finished documents, and a
finished slot is refilled at once.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import time
from collections.abc import Iterator

from tqdm import tqdm

from tpt_jax import storage
from tpt_jax.config import Config
from tpt_jax.data.readers import Document, read_corpus
from tpt_jax.data.rejects import RejectLog
from tpt_jax.errors import ConfigError, TptError
from tpt_jax.generate import GeneratorTokenizer, SamplingParams, cut_at_stop
from tpt_jax.lock import FolderBusyError, FolderLock
from tpt_jax.preemption import PreemptionWatch
from tpt_jax.think.backends import Completion
from tpt_jax.think.prompts import load_template, prefill_length, render

THINK_OPEN = "<think>"
STOPPING = "tpt think: SIGTERM: committing the finished documents and stopping; rerun resumes"


def document_seed(seed: int, doc_id: str) -> int:
    return int(hashlib.sha256(f"{seed}:{doc_id}".encode()).hexdigest()[:8], 16) % 2**31


def shard_folder(output_dir: str, index: int, count: int) -> str:
    return os.path.join(output_dir, f"shard-{index:05d}-of-{count:05d}")


def shard_of(doc_id: str, count: int) -> int:
    """The shard a document belongs to: a hash of its id, independent of its position."""
    digest = hashlib.sha256(doc_id.encode("utf-8", "surrogatepass")).hexdigest()
    return int(digest[:16], 16) % count


def _chunks(folder: str) -> list[str]:
    return storage.glob(os.path.join(folder, "chunk-*.jsonl"))


def _committed_lines(folder: str) -> Iterator[str]:
    for path in _chunks(folder):
        # "\n" only: str.splitlines() also splits at U+2028, U+0085 and others, which JSON
        # written with ensure_ascii=False leaves unescaped inside a record's text.
        yield from (line for line in storage.read_text(path).split("\n") if line)


def iter_committed(folder: str) -> Iterator[dict]:
    """Every committed record of a shard folder (local or gs://), in commit order."""
    return (json.loads(line) for line in _committed_lines(folder))


def committed_records(folder: str) -> list[dict]:
    return list(iter_committed(folder))


_ID_PREFIX = '{"id": '
_DECODER = json.JSONDecoder()


def _record_id(line: str) -> str:
    # Records are written with their id first: read it without parsing the text and thinking.
    if line.startswith(_ID_PREFIX):
        return _DECODER.raw_decode(line, len(_ID_PREFIX))[0]
    return json.loads(line)["id"]


def committed_ids(folders: list[str], keep=None) -> set[str]:
    """The ids committed in these shard folders (for which `keep(id)` holds, if given)."""
    ids: set[str] = set()
    for folder in folders:
        for line in _committed_lines(folder):
            doc_id = _record_id(line)
            if keep is None or keep(doc_id):
                ids.add(doc_id)
    return ids


def _next_chunk(folder: str) -> int:
    names = (os.path.basename(p) for p in _chunks(folder))
    return 1 + max((int(n[len("chunk-") : -len(".jsonl")]) for n in names), default=-1)


def _commit(folder: str, index: int, records: list[dict], lock: FolderLock) -> None:
    if lock.lost:  # a remote lease taken over while we were unresponsive: stop, write nothing
        raise FolderBusyError(f"{folder}: another process took this shard over; stopping")
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    path = os.path.join(folder, f"chunk-{index:06d}.jsonl")
    try:  # never replace a chunk: if one of this name exists, someone else writes this shard
        storage.write_bytes(path, lines.encode(), exclusive=True)
    except FileExistsError:
        raise FolderBusyError(
            f"{path} exists: another process writes this shard; stopping"
        ) from None


def output_settings(cfg: Config, template) -> dict:
    """What determines a shard's output: a rerun with other values would mix two generations."""
    t = cfg.think
    settings = {
        "think.backend": t.backend,
        "think.model_dir": _generator_name(t),  # the generator's name: the folder may move
        "think.model_name": t.model_name if t.backend == "openai" else "",
        "think.template": f"sha256:{template.sha256}",  # the content; its name may change
        "think.chat_template": t.chat_template,
        "think.max_document_tokens": t.max_document_tokens,
        "think.max_new_tokens": t.max_new_tokens,
        "think.temperature": t.temperature,
        "think.top_p": t.top_p,
        "think.top_k": t.top_k,
        "think.seed": t.seed,
        "think.stop": list(t.stop),
        "think.on_length": t.on_length,
    }
    if t.chat_template_kwargs:  # only when set: folders recorded before the key stay comparable
        settings["think.chat_template_kwargs"] = dict(t.chat_template_kwargs)
    return settings


def _generator_name(t) -> str:
    return os.path.basename(os.path.normpath(t.model_dir)) if t.model_dir else t.backend


def check_settings(folder: str, settings: dict, allow_change: bool) -> None:
    """Records `settings` in the folder; refuses (or, allowed, logs) a change against the record."""
    path = os.path.join(folder, "settings.json")
    if storage.exists(path):
        before = storage.read_json(path)
        changed = sorted(
            k for k in settings.keys() | before.keys() if before.get(k) != settings.get(k)
        )
        if not changed:
            return
        diff = ", ".join(f"{k}: {before.get(k)!r} -> {settings.get(k)!r}" for k in changed)
        if not allow_change:
            raise TptError(
                f"{folder} was generated with other settings ({diff}); use a new "
                "think.output_dir, or think.allow_settings_change=true to add to it anyway"
            )
        log = os.path.join(folder, "settings_changes.jsonl")
        entry = json.dumps({"time": time.time(), "before": before, "after": settings}) + "\n"
        storage.append_text(log, entry)
        tqdm.write(f"tpt think: settings changed in {folder} ({diff}); recorded in {log}")
    elif _chunks(folder) and not allow_change:
        # Output of a version that kept no record (and assigned shards by position): adding to
        # it could generate documents twice under other settings or in another shard.
        raise TptError(
            f"{folder} holds output without a settings.json (an older tpt_jax); use a new "
            "think.output_dir, or think.allow_settings_change=true to add to it anyway"
        )
    storage.write_bytes(path, json.dumps(settings, indent=1).encode())


def _check_inputs(patterns: list[str]) -> None:
    """Every corpus pattern must match a file: a typo would otherwise pass as 'nothing to do'."""
    from tpt_jax.data.readers import unmatched

    for pattern in unmatched(patterns):
        where = "" if "://" in pattern or os.path.isabs(pattern) else f" (from {os.getcwd()})"
        raise TptError(f"think.corpus.paths: {pattern!r} matches no file{where}")


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
        "generator": _generator_name(t),
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
    _check_inputs(list(t.corpus.paths))
    folder = shard_folder(t.output_dir, index, count)
    storage.makedirs(folder)
    with FolderLock(folder) as lock:
        return _run_shard(cfg, index, count, folder, lock)


def _run_shard(cfg: Config, index: int, count: int, folder: str, lock: FolderLock) -> dict:
    t = cfg.think
    if not storage.is_remote(folder):  # a write cut by a crash; the lock says nobody writes now
        for stale in glob.glob(os.path.join(folder, "*.tmp")):
            os.remove(stale)
    template = load_template(t.template)
    check_settings(folder, output_settings(cfg, template), t.allow_settings_change)
    done = committed_ids([folder])
    # Shards of another count (the run was resharded): their documents of this shard are done.
    others = [
        os.path.dirname(p)
        for p in storage.glob(os.path.join(t.output_dir, "shard-*-of-*", "settings.json"))
        if not os.path.dirname(p).endswith(f"-of-{count:05d}")
    ]
    if others:
        done |= committed_ids(others, keep=lambda doc_id: shard_of(doc_id, count) == index)
    # Bad documents are listed beside the output locally; on gs:// (no appends) they are counted.
    reject_file = None if storage.is_remote(folder) else os.path.join(folder, "rejects.tsv")
    rejects = RejectLog(strict=cfg.data.strict, path=reject_file)
    teacher = t.backend == "teacher"  # reads the document itself: no model, prompt or tokenizer
    tokenizer = None if teacher else GeneratorTokenizer(t.model_dir, t.chat_template_kwargs)
    seen: dict[str, str] = {}  # id -> where it was first read, for this shard's documents
    usable = 0  # documents of the whole corpus

    def pending() -> Iterator[Document]:
        nonlocal usable
        for doc in read_corpus(t.corpus, rejects):
            usable += 1
            if shard_of(doc.id, count) != index:
                continue
            if doc.id in seen:
                rejects.reject(
                    doc.source, doc.line, f"duplicate id: {doc.id!r} first read at {seen[doc.id]}"
                )
                continue
            seen[doc.id] = f"{doc.source}:{doc.line}"
            if doc.id not in done:
                yield doc

    def prompt_of(doc: Document) -> tuple[str, bool]:
        if teacher:
            return doc.text, False
        document, truncated = tokenizer.truncate(doc.text, t.max_document_tokens)
        return _prompt(tokenizer, template, document, cfg, doc.id), truncated

    produce = _local_slots if t.backend == "local" else _remote_slots
    preemption = PreemptionWatch(collective=False)  # shards stop independently

    def stop_requested() -> bool:
        return preemption.stop_requested(0)

    chunk_index = _next_chunk(folder)
    finished: list[dict] = []

    def commit() -> None:
        nonlocal chunk_index, finished
        batch = finished[: t.chunk_size]
        _commit(folder, chunk_index, batch, lock)
        finished = finished[t.chunk_size :]  # only once written: a failed write keeps them
        chunk_index += 1
        done.update(record["id"] for record in batch)

    announced = False
    bar = tqdm(desc=f"think shard {index}/{count}", unit="doc", initial=len(done))
    generated_tokens, started = 0, time.perf_counter()
    try:
        for slot in produce(cfg, pending(), prompt_of, tokenizer, stop_requested):
            if not slot.failed:  # a failed remote request stays pending for the next run
                text, reason, num_tokens = _outcome(tokenizer, slot, t.stop, t.max_new_tokens)
                generated_tokens += num_tokens
                finished.append(_finish(slot, text, reason, num_tokens, cfg, template, t.model_dir))
                bar.update(1)
                rate = generated_tokens / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(tok_s=f"{rate:,.0f}", refresh=False)
            if len(finished) >= t.chunk_size or (stop_requested() and finished):
                # On SIGTERM what is finished is committed at once: the grace may end any time.
                commit()
            if stop_requested() and not announced:
                announced = True
                tqdm.write(STOPPING)
    finally:
        # Also when the run stops on an error (a strict-mode bad record, a refused request):
        # what is finished is kept. Not when the shard was taken over: it is no longer ours.
        if not lock.lost:
            while finished:
                commit()
        preemption.close()
        bar.close()
        rejects.close()
    stopped = stop_requested()
    if stopped and not announced:  # the local engine returns at once, yielding nothing more
        tqdm.write(STOPPING)
    if not stopped and not usable:
        raise TptError(
            f"think.corpus.paths {list(t.corpus.paths)} hold no usable document "
            f"({rejects.summary()})"
        )
    from tpt_jax.think.summary import summarize_shard

    summary = summarize_shard(folder, t.group_by, rejects.summary())
    summary["left_pending"] = sum(doc_id not in done for doc_id in seen)
    summary["stopped_early"] = stopped
    if rejects.unreadable_files:  # the rest of those files was never seen: not complete
        raise TptError(
            f"shard {index}/{count}: these input files could not be read to their end: "
            f"{'; '.join(rejects.unreadable_files)}; the documents read are committed: fix the "
            "files and run again for the rest"
        )
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


def _local_slots(
    cfg: Config, docs: Iterator[Document], prompt_of, tokenizer, stop_requested
) -> Iterator[_Slot]:
    """Continuous batching over the in-process engine (`tpt_jax.generate`): a finished slot is
    refilled at once. On SIGTERM the slots in progress are abandoned (pending): a decode call
    is not interruptible."""
    from tpt_jax.generate import (
        Request,
        SlotEngine,
        continuous_batching,
        load_generator,
        local_mesh,
    )
    from tpt_jax.parallel import rules_from_config

    t = cfg.think
    model_cfg, model_params = load_generator(t.model_dir, t.dtype)
    max_prefill = prefill_length(
        load_template(t.template), tokenizer, t.max_document_tokens, t.chat_template
    )
    pool_pages = -(-t.kv_cache_tokens // t.page_size)
    max_target = max_prefill + t.max_new_tokens + 1
    if pool_pages and pool_pages * t.page_size < max_target:
        raise ConfigError(
            f"think.kv_cache_tokens={t.kv_cache_tokens} cannot hold one document at its longest "
            f"({max_prefill} prompt + {t.max_new_tokens} new tokens): raise it, or 0 for every "
            "slot at its longest"
        )
    engine = SlotEngine(
        model_cfg,
        model_params,
        max_concurrent_decodes=t.max_concurrent_decodes,
        max_prefill_length=max_prefill,
        max_target_length=max_target,
        page_size=t.page_size,
        num_pages=pool_pages,
        prefill_chunk=t.prefill_chunk,
        mesh=local_mesh(cfg),
        rules=rules_from_config(cfg.mesh.rules),
        eos_ids=() if tokenizer.eos_id is None else (tokenizer.eos_id,),
        # The canonical encoding of each stop string; a stop reached through another
        # tokenization is cut from the text when the document is finished (_outcome).
        stops=[tokenizer.encode(stop) for stop in t.stop],
    )

    def requests() -> Iterator[Request]:
        for doc in docs:
            prompt, truncated = prompt_of(doc)
            tokens = tokenizer.encode(prompt)
            sampling = SamplingParams(
                t.temperature, t.top_k, t.top_p, document_seed(t.seed, doc.id)
            )
            yield Request(tokens, t.max_new_tokens, sampling, _Slot(doc, len(tokens), truncated))

    for result in continuous_batching(
        engine, engine.load_params(), requests(), stop_requested=stop_requested
    ):
        slot = result.request.tag
        slot.tokens = result.tokens
        yield slot


def _remote_slots(
    cfg: Config, docs: Iterator[Document], prompt_of, tokenizer, stop_requested
) -> Iterator[_Slot]:
    """Concurrent requests to a remote server; a request that finally fails is yielded as failed.

    Requests run on daemon threads, so a request stuck in its timeout and retries never holds
    the process: on SIGTERM no new request starts, those that finish within
    `think.preemption_grace_s` are yielded, and the rest are abandoned (left pending).
    """
    import queue
    import threading

    from tpt_jax.think.backends import BackendError, make_backend

    t = cfg.think
    backend = make_backend(t)
    results: queue.Queue = queue.Queue()

    def run(doc: Document) -> None:
        slot = _Slot(doc, 0, False)
        try:
            prompt, slot.truncated = prompt_of(doc)
            slot.prompt_tokens = len(tokenizer.encode(prompt)) if tokenizer else 0
            reply = backend.complete(prompt, t.max_new_tokens, document_seed(t.seed, doc.id))
            slot.completion, slot.tokens = reply, reply.tokens or []
        except BackendError as e:
            tqdm.write(f"tpt think: {doc.id} left pending: {e}")
            slot.failed = True
        except TptError as e:  # a configuration error: every request would fail the same way
            results.put(e)
            return
        except Exception as e:  # never lose the run, or hang it, for one document: it stays pending
            tqdm.write(f"tpt think: {doc.id} left pending: {type(e).__name__}: {e}")
            slot.failed = True
        results.put(slot)

    in_flight, exhausted, deadline = 0, False, None
    while True:
        while not exhausted and in_flight < t.concurrency and not stop_requested():
            doc = next(docs, None)
            if doc is None:
                exhausted = True
                break
            threading.Thread(target=run, args=(doc,), daemon=True).start()
            in_flight += 1
        if not in_flight:
            break
        if stop_requested() and deadline is None:
            deadline = time.monotonic() + t.preemption_grace_s
        wait = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
        if wait <= 0:
            tqdm.write(f"tpt think: {in_flight} requests still in flight abandoned (pending)")
            return  # daemon threads: they end with the process
        try:
            item = results.get(timeout=wait)
        except queue.Empty:
            continue
        in_flight -= 1
        if isinstance(item, Exception):
            raise item
        yield item
    backend.close()


def _prompt(
    tokenizer: GeneratorTokenizer, template, document: str, cfg: Config, doc_id: str
) -> str:
    text = render(template, document, seed=document_seed(cfg.think.seed, doc_id))
    return tokenizer.chat(text) if cfg.think.chat_template else text
