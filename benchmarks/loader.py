"""Loader throughput: our Grain loader vs seqio's own tf.data pipeline, on the same corpus.

    python benchmarks/loader.py [--docs N] [--batches N]

Builds a synthetic corpus, trains a vocabulary, runs `tpt prepare` (timed: prepare tokens/s),
then reads batches of 64 x 2048 tokens after warm-up from (a) tpt_jax's MixedRows loader and
(b) seqio.get_dataset with the packing DecoderFeatureConverter, and prints tokens/s of each and
the ratio. Single process; goal: >= 5M tokens/s and >= 2x seqio.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from tpt_jax.config import load_config

SEQ, BATCH = 2048, 64


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


def time_batches(next_batch, count: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        next_batch()
    start = time.perf_counter()
    for _ in range(count):
        next_batch()
    return count * BATCH * SEQ / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=3000)
    parser.add_argument("--batches", type=int, default=50)
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

    from tpt_jax.data import loader

    data = loader.MixedRows(cfg.data.prepared_dir, cfg.data.mixture, 0, SEQ)
    stream = loader.batches(data, 0, BATCH)
    ours = time_batches(lambda: next(stream), args.batches)
    print(f"tpt_jax loader: {ours:,.0f} tokens/s")

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
