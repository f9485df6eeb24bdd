"""`tpt prepare CONFIG`: materialise every task of the mixture as packed rows files (rows.py).

An Apache Beam pipeline with one work item per (task, input file): run the SeqIO task's
preprocessors on that file, pack the token stream into `train.seq_len` rows, write
`<prepared_dir>/<task>/<file>-<hash of its path>.rows` and its stats atomically (named by
the input, so adding or removing input files builds or drops only theirs). The stats record the
vocabulary checksum and a fingerprint of the input file, and are written only after the rows are
on disk. A rerun skips items whose stats match the current vocabulary and input, and rebuilds the
others, so a crash loses at most the items in flight. An input that cannot be read to its end is
never marked done. The manifest is written last, with the vocabulary the shards were built with.

Here it runs on Beam's DirectRunner. Beyond one machine, the same pipeline runs on Dataflow:

    tpt prepare CONFIG --runner=DataflowRunner --project=P --region=R \\
        --temp_location=gs://B/tmp --requirements_file=requirements.txt --max_num_workers=64

with data.prepared_dir, the corpora and the vocabulary on gs://.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence

import fsspec
import numpy as np

from tpt_jax import storage
from tpt_jax.config import Config, to_dict
from tpt_jax.data import rows as rows_file
from tpt_jax.data import vocab
from tpt_jax.data.packing import Packer
from tpt_jax.data.rejects import BadInputError, RejectLog
from tpt_jax.errors import TptError

MANIFEST = "manifest.json"
# The manifest's "format": the loader refuses a folder prepared in another (older) layout.
PREPARED_FORMAT = f"tpt-rows-v{rows_file.FORMAT_VERSION}"


class PreparedDataError(TptError):
    """Prepared data that is missing, incomplete or prepared with another config or vocabulary."""


def hashed_settings(cfg: Config) -> dict:
    """What the prepared rows depend on: {"data": the data section minus loader settings and
    input paths, "seq_len": train.seq_len}. Recorded in the manifest, so a mismatch names keys."""
    data = to_dict(cfg.data)
    # The vocabulary's contents (not its path) are each shard's own record, as are its inputs.
    for key in ("source", "seed", "strict", "prepared_dir", "mixture", "vocab_path", "name"):
        data.pop(key, None)
    if not data.get("heldout_fraction"):
        data.pop("heldout_fraction", None)  # none held out: folders prepared before it existed
    for corpus in data.get("corpora", []):
        # Which files a corpus has is each shard's own record (its input and fingerprint), so
        # adding a path or a folder builds only the new shards instead of refusing the folder.
        corpus.pop("paths", None)
        corpus.pop("think_outputs", None)  # more paths, in the layout tpt think writes
    return {"data": data, "seq_len": cfg.train.seq_len}


def config_hash(cfg: Config) -> str:
    """A short hash of hashed_settings(cfg) (import-light: no TensorFlow, no SeqIO)."""
    payload = json.dumps(hashed_settings(cfg), sort_keys=True)
    return "sha256:" + hashlib.sha256(payload.encode()).hexdigest()[:16]


def changed_settings(recorded: dict | None, cfg: Config) -> list[str]:
    """The config keys (data.long_docs, train.seq_len, ...) whose values differ from the
    settings a folder was prepared with (a manifest's "settings"); [] if none are recorded."""
    if not recorded:
        return []
    now = hashed_settings(cfg)
    changed = [f"data.{k}" for k in sorted(set(now["data"]) | set(recorded.get("data", {})))
               if now["data"].get(k) != recorded.get("data", {}).get(k)]  # fmt: skip
    if now["seq_len"] != recorded.get("seq_len"):
        changed.append("train.seq_len")
    return changed


def check_prepared_with(cfg: Config, manifest: dict) -> None:
    """Refuses, in one line, a prepared folder whose manifest says it was prepared with other
    data settings than `cfg` (its rows are packed, split or templated otherwise)."""
    recorded = manifest.get("config_hash")
    if recorded is None or recorded == config_hash(cfg):
        return
    changed = changed_settings(manifest.get("settings"), cfg)
    which = f" ({', '.join(changed)} differ)" if changed else f" ({recorded} != {config_hash(cfg)})"
    raise PreparedDataError(
        f"{cfg.data.prepared_dir} was prepared with other data settings{which}: run `tpt prepare` "
        "into another data.prepared_dir (or data.name), or restore the settings it was prepared with"
    )


def shard_name(task: str, input_path: str) -> str:
    """A task's shard of one input file: named by the file, not by its position in the list, so
    another file added to the corpus leaves every existing shard's name (and rows) as they are."""
    stem = os.path.basename(input_path).split(".")[0] or "input"
    digest = hashlib.sha256(input_path.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"{task}/{stem}-{digest}{rows_file.SUFFIX}"


def heldout_name(task: str, input_path: str) -> str:
    """The held-out rows of a task's shard of one input file: `<task>/heldout/<its file name>`."""
    return shard_name(task, input_path).replace(f"{task}/", f"{task}/heldout/", 1)


def is_heldout(doc_id: str, fraction: float) -> bool:
    """Whether a document belongs to the held-out split: a function of its id alone (a sha256,
    stable across processes and runs, unlike hash()), so it is held out of every task of its
    corpus, whatever the file order or worker."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def input_fingerprint(path: str) -> dict:
    """What identifies one version of an input file: size and mtime locally, the object's
    generation (or etag) on an object store."""
    if not storage.is_remote(path):
        st = os.stat(path)
        # ctime too: `cp -p`, `rsync -t` and `tar x` restore an old mtime, but no tool can set
        # the ctime, which any write or replacement of the file moves.
        return {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns}  # fmt: skip
    fs, inner = fsspec.core.url_to_fs(path)
    fs.invalidate_cache(inner)  # a listing cached earlier in this process may predate a rewrite
    info = fs.info(inner)
    keys = ("generation", "etag", "ETag", "mtime", "updated", "LastModified")
    version = next((info[k] for k in keys if info.get(k)), None)
    return {"path": path, "size": info.get("size"), "version": str(version)}


def _pinned_vocab(path: str) -> tuple[str, str]:
    """(vocabulary path to tokenize with, its checksum), both of one and the same model bytes."""
    if vocab.is_tokenizer_json(path):  # loaded fresh each time; read beside its tokenizer_config
        return path, vocab.checksum(vocab.read_model(path))
    return vocab.pinned_copy(path)


def _fsync(path: str) -> None:
    """Flushes a file's data, or a folder's entries (a rename), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    fs, inner = fsspec.core.url_to_fs(path)
    with contextlib.suppress(FileNotFoundError):  # absent, or another worker removed it first
        fs.rm(inner)


def _write_rows(path: str, packed: list[np.ndarray], vocab_size: int, seq_len: int) -> None:
    """Stores packed rows in the narrowest token dtype of the vocabulary (see rows.py)."""
    stacked = np.stack(packed) if packed else np.zeros((0, 3, seq_len), np.int32)
    rows_file.write(path, rows_file.encode(stacked, rows_file.token_dtype(vocab_size)))
    if not storage.is_remote(path):
        # The stats written next mark the shard done, so the rows' rename must be on the disk
        # before them: a power cut must not leave stats over missing rows.
        _fsync(os.path.dirname(path))


def prepare_shard(cfg: Config, task_name: str, index: int, count: int, input_path: str) -> dict:
    """Tokenizes, packs and writes one (task, input file); returns its stats. Skips a finished one
    whose vocabulary and input are unchanged."""
    root = cfg.data.prepared_dir
    name = shard_name(task_name, input_path)
    stats_path = os.path.join(root, name + ".json")
    expected_hash = config_hash(cfg)
    # Read once: the checksum recorded is that of the very bytes this item tokenizes with.
    vocab_path, vocab_checksum = _pinned_vocab(cfg.data.vocab_path)
    # Taken before reading, so a file that changes while it is read is rebuilt by the next run.
    inputs = [input_fingerprint(input_path)]
    if storage.exists(stats_path):
        stats = storage.read_json(stats_path)
        if stats.get("config_hash") != expected_hash:
            raise PreparedDataError(
                f"{stats_path} was prepared with another config ({stats.get('config_hash')} != {expected_hash}); "
                "use a new data.prepared_dir"
            )
        same_format = stats.get("format") == PREPARED_FORMAT  # else rebuilt in this one
        if (
            same_format
            and stats.get("vocab_checksum") == vocab_checksum
            and stats.get("inputs") == inputs
        ):
            return {**stats, "skipped": True}
        _remove(stats_path)  # its vocabulary or input changed: not done until rebuilt
    # The manifest vouches for every shard; while one is rebuilt, none must be vouched for.
    _remove(os.path.join(root, MANIFEST))
    import seqio

    from tpt_jax.data import tasks

    task = tasks.private_task(dataclasses.replace(cfg.data, vocab_path=vocab_path), task_name)
    files = task.source.list_shards("train")[index::count]
    if files != [input_path]:  # reported by the driver in one line, like an unreadable input
        message = f"the input files of task {task_name} changed during `tpt prepare` ({input_path} is now {files}); run it again"
        storage.write_bytes(os.path.join(root, name + ".error"), message.encode())
        return {"error": message}
    rejects_path = _rejects_path(root, name)
    if rejects_path and os.path.exists(rejects_path):
        os.remove(rejects_path)  # an earlier build's report; this build writes its own, if any
    task.source.rejects = RejectLog(strict=cfg.data.strict, path=rejects_path)
    processor = vocab.seqio_vocabulary(vocab_path)
    packer = Packer(cfg.train.seq_len, cfg.data.long_docs)
    rows: list[np.ndarray] = []
    fraction = cfg.data.heldout_fraction
    heldout = Packer(cfg.train.seq_len, cfg.data.long_docs) if fraction else None
    heldout_rows: list[np.ndarray] = []
    thinking_tokens = 0
    dataset = task.get_dataset(
        sequence_length=None, shuffle=False, shard_info=seqio.ShardInfo(index, count)
    )
    for example in dataset.as_numpy_iterator():
        targets = example["targets"]
        if heldout is not None and is_heldout(example["id"].decode("utf-8"), fraction):
            heldout_rows.extend(heldout.add(targets))
            continue
        if task_name.endswith("_tpt"):
            # Template text, thinking and EOS: everything after the document's own tokens.
            thinking_tokens += len(targets) - len(
                processor.encode(example["document"].decode("utf-8"))
            )
        rows.extend(packer.add(targets))
    rows.extend(packer.finish())
    if heldout is not None:
        heldout_rows.extend(heldout.finish())
    task.source.rejects.close()
    if task.source.rejects.first_error:
        # Strict mode: no rows, no stats; the driver reports this and stops.
        storage.write_bytes(
            os.path.join(root, name + ".error"), task.source.rejects.first_error.encode()
        )
        return {"error": task.source.rejects.first_error}
    if input_fingerprint(input_path) != inputs[0]:  # rewritten while it was read
        task.source.rejects.unreadable_files.append(f"{input_path} (changed while it was read)")
    if task.source.rejects.unreadable_files:
        # Its rows would hold only part of the file: no rows, no stats, so a rerun retries it.
        message = "; ".join(task.source.rejects.unreadable_files)
        storage.write_bytes(os.path.join(root, name + ".error"), message.encode())
        return {"error": message}
    if heldout is not None:  # before the training rows: their stats mark both done
        held_path = os.path.join(root, heldout_name(task_name, input_path))
        _write_rows(held_path, heldout_rows, processor.vocab_size, cfg.train.seq_len)
    _write_rows(os.path.join(root, name), rows, processor.vocab_size, cfg.train.seq_len)
    stats = {
        "task": task_name,
        "file": name,
        "input": input_path,
        "inputs": inputs,
        "vocab_checksum": vocab_checksum,
        **dataclasses.asdict(packer.stats),
        "documents": packer.stats.samples,
        "thinking_tokens": thinking_tokens,
        "rejected": dict(task.source.rejects.counts),
        "config_hash": expected_hash,
        "format": PREPARED_FORMAT,
    }
    if heldout is not None:
        stats["heldout"] = {
            "file": heldout_name(task_name, input_path),
            **dataclasses.asdict(heldout.stats),
            "documents": heldout.stats.samples,
        }
    storage.write_bytes(stats_path, json.dumps(stats, indent=1).encode())
    return {**stats, "skipped": False}


def _rejects_path(root: str, name: str) -> str | None:
    if "://" in root:
        return None  # reject reports are local files; counts still go to the stats and manifest
    return os.path.join(root, "rejects", name.replace("/", "-").replace(rows_file.SUFFIX, ".tsv"))


def work_items(cfg: Config) -> tuple[list[tuple[str, int, int, str]], list[str]]:
    """(task, input file index, input file count, input file) for every task of the mixture, and
    the input paths that match no file (skipped; with data.strict the run stops)."""
    from tpt_jax.data import readers, tasks

    registered = {t.name: t for t in tasks.register(cfg.data)[0]}
    items, missing = [], []
    for task_name in dict.fromkeys(m.task for m in cfg.data.mixture):
        source = registered[task_name].source
        for pattern in readers.unmatched(source.corpus.paths):
            if pattern not in missing:
                RejectLog(strict=cfg.data.strict).reject(
                    pattern, None, "missing file: no file matches this path"
                )
                missing.append(pattern)
        files = source.list_shards("train")
        if not files:
            raise PreparedDataError(_no_files(cfg, source.corpus, task_name))
        items.extend((task_name, i, len(files), path) for i, path in enumerate(files))
    return items, missing


def _no_files(cfg: Config, corpus, task_name: str) -> str:
    """Which key gave a task no input, and where it looked."""
    index = next((i for i, c in enumerate(cfg.data.corpora) if c.name == corpus.name), 0)
    key = f"data.corpora[{index}]"
    if corpus.think_outputs:
        return (
            f"task {task_name}: {key}.think_outputs {corpus.think_outputs} hold no `tpt think` "
            f"output yet (looked for {', '.join(corpus.paths)}); run tpt think for them first, "
            f"or fix the name ({cfg.source_of(key + '.think_outputs')})"
        )
    return f"task {task_name}: {key}.paths match no file: {', '.join(corpus.paths)}"


def run_prepare(cfg: Config, beam_args: Sequence[str] = ()) -> dict:
    """Runs the Beam pipeline over every work item, then writes and returns the manifest."""
    import apache_beam as beam
    from apache_beam.options.pipeline_options import PipelineOptions

    if not cfg.data.prepared_dir:
        raise PreparedDataError("data.prepared_dir is empty: set where prepared shards go")
    items, missing = work_items(cfg)
    _check_not_array_record(cfg.data.prepared_dir)
    _check_config_hash(cfg)
    options = PipelineOptions(list(beam_args) or ["--runner=DirectRunner"])
    _take_errors(cfg, items)  # stale reports of an earlier run
    with beam.Pipeline(options=options) as pipeline:
        _ = (
            pipeline
            | "work items" >> beam.Create(items)
            | "reshuffle" >> beam.Reshuffle()
            | "prepare shard" >> beam.MapTuple(lambda *item: prepare_shard(cfg, *item))
        )
    errors = _take_errors(cfg, items)
    if errors and cfg.data.strict:  # report the first bad record found
        raise BadInputError(errors[0])
    if errors:
        raise BadInputError(
            f"not prepared, as these input files could not be read to their end: {'; '.join(errors)}. "
            "Fix or remove them and run `tpt prepare` again (the finished shards are kept)"
        )
    # Every shard's stats file is the record of its completion, whichever runner ran it.
    stats = [
        storage.read_json(
            os.path.join(cfg.data.prepared_dir, shard_name(item[0], item[3]) + ".json")
        )
        for item in items
    ]
    return write_manifest(cfg, stats, missing)


def _check_not_array_record(root: str) -> None:
    """Refuses a folder of the ArrayRecord layout (before the rows format): its shards and stats
    (`*.array_record`, `*.array_record.json`) are invisible to the checks and the rebuild below,
    which would build the new shards beside them."""
    if storage.glob(os.path.join(root, "*", "*.array_record*")):
        raise PreparedDataError(
            f"{root} was prepared by an older tpt_jax (ArrayRecord rows): use a new "
            "data.prepared_dir or delete it"
        )


def _check_config_hash(cfg: Config) -> None:
    """Refuses, before the pipeline starts, a folder prepared with another config (inside the
    pipeline the same refusal would come wrapped in the runner's traceback)."""
    expected = config_hash(cfg)
    pattern = os.path.join(cfg.data.prepared_dir, "*", f"*{rows_file.SUFFIX}.json")
    for stats_path in storage.glob(pattern):
        found = storage.read_json(stats_path).get("config_hash")
        if found != expected:
            raise PreparedDataError(
                f"{stats_path} was prepared with another config ({found} != {expected}); "
                "use a new data.prepared_dir"
            )
        return  # one shard tells: every work item checks its own again


def _take_errors(cfg: Config, items: list[tuple[str, int, int, str]]) -> list[str]:
    """Reads and removes the error reports of the work items (a strict-mode bad record, or an
    unreadable input file), in item order."""
    messages = []
    for item in items:
        path = os.path.join(cfg.data.prepared_dir, shard_name(item[0], item[3]) + ".error")
        if storage.exists(path):
            with fsspec.open(path, "r") as f:
                messages.append(f.read())
            fs, inner = fsspec.core.url_to_fs(path)
            fs.rm(inner)
    return messages


def write_manifest(
    cfg: Config, shard_stats: list[dict], missing_inputs: Sequence[str] = ()
) -> dict:
    """Writes the manifest of finished shards, stamped with the vocabulary they were built with."""
    checksums = sorted({stats.get("vocab_checksum") or "none recorded" for stats in shard_stats})
    if len(checksums) != 1:
        raise PreparedDataError(
            f"{cfg.data.prepared_dir}: its shards were tokenized with different vocabularies "
            f"({', '.join(checksums)}); run `tpt prepare` again"
        )
    per_task: dict[str, dict] = {}
    for stats in sorted(shard_stats, key=lambda s: s["file"]):
        entry = per_task.setdefault(
            stats["task"],
            {
                "files": [],
                "rows": 0,
                "tokens": 0,
                "documents": 0,
                "thinking_tokens": 0,
                "rejected": 0,
            },
        )
        entry["files"].append({"path": stats["file"], "rows": stats["rows"]})
        for key in ("rows", "tokens", "documents", "thinking_tokens"):
            entry[key] += stats[key]
        entry["rejected"] += sum(stats["rejected"].values())
        if "heldout" in stats:  # the same shape as the training rows' entry
            held = entry.setdefault(
                "heldout", {"files": [], "rows": 0, "tokens": 0, "documents": 0}
            )
            held["files"].append(
                {"path": stats["heldout"]["file"], "rows": stats["heldout"]["rows"]}
            )
            for key in ("rows", "tokens", "documents"):
                held[key] += stats["heldout"][key]
    for entry in per_task.values():
        entry["thinking_token_share"] = entry["thinking_tokens"] / max(entry["tokens"], 1)
    manifest = {
        "format": PREPARED_FORMAT,
        "seq_len": cfg.train.seq_len,
        "vocab_checksum": checksums[0],
        "config_hash": config_hash(cfg),
        "settings": hashed_settings(cfg),  # so a train run prepared otherwise names what differs
        "tasks": per_task,
        "missing_inputs": list(missing_inputs),
    }
    storage.write_bytes(
        os.path.join(cfg.data.prepared_dir, MANIFEST), json.dumps(manifest, indent=1).encode()
    )
    return manifest


def summarize(manifest: dict) -> str:
    lines = [
        f"prepared {len(manifest['tasks'])} task(s), seq_len {manifest['seq_len']}, vocab {manifest['vocab_checksum'][:19]}"
    ]
    for path in manifest.get("missing_inputs", []):
        lines.append(f"  skipped input path matching no file: {path}")
    for name, t in manifest["tasks"].items():
        lines.append(
            f"  {name}: {t['documents']:,} documents, {t['rows']:,} rows, {t['tokens']:,} tokens, "
            f"thinking share {t['thinking_token_share']:.1%}, {t['rejected']:,} rejected"
        )
        if "heldout" in t:
            h = t["heldout"]
            lines.append(
                f"    held out: {h['documents']:,} documents, {h['rows']:,} rows, {h['tokens']:,} tokens"
            )
    return "\n".join(lines)
