"""Decode throughput of the local engine (paged KV cache) against HF transformers `generate` and
an older revision's engine, side by side in one run on one model.

    python benchmarks/decode.py [--batch 16] [--prompt 64] [--new 128] [--dtype float32]
        [--paper-docs 32] [--max-think 4096] [--baseline-rev 32f9b3f] [--skip-paper]

Same ~59M-parameter Llama (random weights, converted HF -> tpt_jax) everywhere, greedy. Printed,
each ratio on a line of its own:
- `engine/HF R`: new tokens/s of the engine (continuous batching, prefill included) over HF
  `generate`, batch x prompt x new uniform;
- `driver/engine R`: `tpt think` end to end (local engine) over the raw engine;
- `roofline R`: max(FLOPs / matmul FLOP/s, bytes read / memory bandwidth) of a decode step, both
  rates measured in this process, over the measured step time;
- `capacity ratio R`: decode step time at a live length of 256 with a cache capacity of 8k tokens
  per slot over the same with 512;
- the paper's shape, scaled: prompts of 512-2048 tokens, thinking lengths drawn from a
  long-tailed (log-normal) distribution capped at --max-think, through the batching loop (per
  request caps stand in for where a real generator's EOS falls) on this engine, on the engine of
  --baseline-rev (a subprocess over `git archive` of that revision) and HF `generate` (static
  batches of --batch in document order, each run to its longest, counting only each
  document's own tokens): `paper-shape vs old engine R` and `paper-shape vs HF R`.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def memory_bandwidth(size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    x = jnp.ones(size_bytes // 4, jnp.float32)
    reduce = jax.jit(lambda a: a.sum())
    reduce(x).block_until_ready()
    best = min(_timed(lambda: reduce(x).block_until_ready()) for _ in range(repeats))
    return size_bytes / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def driver_throughput(root: str, model_cfg, args) -> float:
    """End-to-end `tpt think` tokens/s on the same model: prompts of ~args.prompt tokens. A first
    run over one batch of other documents compiles the driver's steps (the engine's rate is also
    measured warm), then the timed run covers 4 batches."""
    import json

    import tokenizers

    from tpt_jax.config import load_config
    from tpt_jax.think.driver import run_think

    folder = os.path.join(root, "ours")
    vocab = {f"w{i}": i for i in range(model_cfg.vocab_size - 2)}
    vocab.update({"<unk>": model_cfg.vocab_size - 2, "<eos>": model_cfg.vocab_size - 1})
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<eos>"}, f)
    with open(os.path.join(root, "template.txt"), "w") as f:
        f.write("{document}")
    rng = np.random.default_rng(1)

    def config(name: str, docs: int):
        with open(os.path.join(root, f"{name}.jsonl"), "w") as f:
            for i in range(docs):
                words = " ".join(f"w{j}" for j in rng.integers(0, 30000, 40))
                f.write(json.dumps({"id": f"{name}{i}", "text": words}) + "\n")
        with open(os.path.join(root, f"{name}.yaml"), "w") as f:
            f.write(
                f"""
think:
  model_dir: {folder}
  output_dir: {root}/{name}_out
  corpus: {{name: {name}, paths: ["{root}/{name}.jsonl"]}}
  template: "{os.path.join(root, "template.txt")}"
  chat_template: false
  max_document_tokens: {args.prompt}
  max_new_tokens: {args.new}
  dtype: {model_cfg.dtype}
  temperature: 0.0
  stop: []
  max_concurrent_decodes: {args.batch}
  chunk_size: {args.batch}
"""
            )
        return load_config(os.path.join(root, f"{name}.yaml"))

    run_think(config("warm", args.batch))
    cfg = config("docs", 4 * args.batch)
    start = time.perf_counter()
    summary = run_think(cfg)
    return summary["thinking_tokens"] / (time.perf_counter() - start)


def engine_run(cfg, params, requests, batch: int, max_prefill: int, max_new: int):
    """(generated tokens, seconds) of the batching loop over (prompt, cap) requests (timed on
    a second pass, so that every shape is compiled)."""
    from tpt_jax.generate import Request, SlotEngine, continuous_batching

    engine = SlotEngine(
        cfg, params, max_concurrent_decodes=batch, max_prefill_length=max_prefill,
        max_target_length=max_prefill + max_new + 1,
    )  # fmt: skip
    loaded = engine.load_params()

    def run():
        work = [Request(list(p), n) for p, n in requests]
        return sum(len(d.tokens) for d in continuous_batching(engine, loaded, work))

    run()
    start = time.perf_counter()
    tokens = run()
    return tokens, time.perf_counter() - start


def step_time(cfg, params, batch: int, live: int, capacity: int) -> float:
    """Seconds per decode step with every slot at `live` tokens (on average over the 16 timed
    steps) and `capacity` per slot."""
    from tpt_jax.generate import SlotEngine

    engine = SlotEngine(
        cfg, params, max_concurrent_decodes=batch, max_prefill_length=live,
        max_target_length=capacity,
    )  # fmt: skip
    loaded = engine.load_params()
    rng = np.random.default_rng(0)
    state = engine.init_decode_state()
    for slot in range(batch):
        prompt = rng.integers(3, cfg.vocab_size, live - 8).tolist()
        state = engine.prefill_insert(loaded, state, slot, prompt, max_new_tokens=32)
    # Compiles the very call timed below (same positions, so the same live-pages bucket).
    state, _ = engine.generate_steps(loaded, state, 16)
    jax.block_until_ready(state)
    state = engine.init_decode_state()
    for slot in range(batch):
        prompt = rng.integers(3, cfg.vocab_size, live - 8).tolist()
        state = engine.prefill_insert(loaded, state, slot, prompt, max_new_tokens=32)
    jax.block_until_ready(state)
    start = time.perf_counter()
    state, _ = engine.generate_steps(loaded, state, 16)
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / 16


def old_engine_run(root: str, rev: str, spec: dict) -> tuple[int, float] | None:
    """The paper-shape run on revision `rev`'s engine, in a subprocess; None if unavailable."""
    tree = os.path.join(root, f"rev-{rev}")
    os.makedirs(tree, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", os.path.dirname(HERE), "archive", rev, "tpt_jax"],
        capture_output=True,
        check=False,
    )
    if archive.returncode:
        print(f"baseline revision {rev}: git archive failed: {archive.stderr.decode().strip()}")
        return None
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    with open(os.path.join(root, "spec.json"), "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, PYTHONPATH=tree)
    out = subprocess.run(
        [sys.executable, os.path.join(HERE, "_old_engine.py"), os.path.join(root, "spec.json")],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if out.returncode:
        print(f"baseline revision {rev} failed:\n{out.stderr[-2000:]}")
        return None
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["tokens"], result["seconds"]


def hf_paper_run(model, requests, batch: int) -> tuple[int, float]:
    """HF generate over static batches (left-padded, each run to its longest cap)."""
    import torch

    tokens, start = 0, time.perf_counter()
    for i in range(0, len(requests), batch):
        group = requests[i : i + batch]
        width = max(len(p) for p, _ in group)
        ids = torch.zeros((len(group), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (prompt, _) in enumerate(group):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        with torch.no_grad():
            model.generate(
                ids, attention_mask=mask, max_new_tokens=max(n for _, n in group),
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        tokens += sum(n for _, n in group)
    return tokens, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--paper-docs", type=int, default=32)
    parser.add_argument("--max-think", type=int, default=4096)
    parser.add_argument("--baseline-rev", default="32f9b3f")
    parser.add_argument("--skip-paper", action="store_true")
    args = parser.parse_args()

    import torch
    import transformers

    from tpt_jax.bench import matmul_flops_per_second
    from tpt_jax.model import load_model_config, param_count, param_shapes, restore_params
    from tpt_jax.model.convert import hf_to_tpt

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192,
        tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.generation_config.eos_token_id = None
    root = tempfile.mkdtemp(prefix="tpt_decode_bench_")
    model.save_pretrained(os.path.join(root, "hf"))
    hf_to_tpt(os.path.join(root, "hf"), os.path.join(root, "ours"))
    cfg = dataclasses.replace(load_model_config(os.path.join(root, "ours")), dtype=args.dtype)
    params = restore_params(os.path.join(root, "ours"), param_shapes(cfg))
    print(
        f"model: {param_count(cfg):,} parameters, batch {args.batch}, prompt {args.prompt}, "
        f"new {args.new}, {jax.devices()[0].device_kind}"
    )

    prompts = np.random.default_rng(0).integers(3, 32000, size=(args.batch, args.prompt))
    torch.set_num_threads(os.cpu_count() or 1)
    with torch.no_grad():
        model.generate(torch.tensor(prompts), max_new_tokens=4, do_sample=False, pad_token_id=0)
        seconds = _timed(
            lambda: model.generate(
                torch.tensor(prompts), max_new_tokens=args.new, do_sample=False, pad_token_id=0
            )
        )
    hf_rate = args.batch * args.new / seconds
    print(f"HF transformers generate: {hf_rate:,.0f} new tokens/s")

    uniform = [(p.tolist(), args.new) for p in prompts]
    tokens, seconds = engine_run(cfg, params, uniform, args.batch, args.prompt, args.new)
    ours_rate = tokens / seconds
    step = step_time(
        cfg, params, args.batch, args.prompt + args.new // 2, args.prompt + args.new + 1
    )
    print(f"tpt_jax engine: {ours_rate:,.0f} new tokens/s (prefill included)")
    print(f"engine/HF {ours_rate / hf_rate:.2f}")

    driver_rate = driver_throughput(root, cfg, args)
    print(f"tpt think driver (local engine, continuous batching): {driver_rate:,.0f} new tokens/s")
    print(f"driver/engine {driver_rate / ours_rate:.2f}")

    matmul = matmul_flops_per_second(args.dtype)
    bandwidth = memory_bandwidth()
    itemsize = jnp.dtype(args.dtype).itemsize
    weights = sum(x.size for x in jax.tree.leaves(param_shapes(cfg)))
    matmul_params = weights - cfg.vocab_size * cfg.hidden_size  # the lookup is not a matmul
    context = args.prompt + args.new / 2  # the live length of the timed step
    kv_elems = 2 * cfg.num_layers * args.batch * context * cfg.num_kv_heads * cfg.resolved_head_dim
    flops = 2 * matmul_params * args.batch + 2 * kv_elems * cfg.num_heads // cfg.num_kv_heads
    bytes_read = weights * 4 + kv_elems * itemsize  # parameters are stored in float32
    bound = max(flops / matmul, bytes_read / bandwidth)
    print(
        f"decode step {step * 1e3:.1f} ms; {flops / 1e9:.2f} GFLOP and {bytes_read / 1e6:.0f} MB "
        f"per step; matmul {matmul / 1e9:.0f} GFLOP/s, bandwidth {bandwidth / 1e9:.1f} GB/s "
        f"-> bound {bound * 1e3:.1f} ms"
    )
    print(f"roofline {bound / step:.2f}")

    short = step_time(cfg, params, args.batch, 256, 512)
    long = step_time(cfg, params, args.batch, 256, 8192)
    print(f"decode step at live 256: {short * 1e3:.1f} ms (capacity 512), {long * 1e3:.1f} ms (8k)")
    print(f"capacity ratio {long / short:.2f}")

    if args.skip_paper:
        return 0
    rng = np.random.default_rng(7)
    lengths = np.minimum(rng.lognormal(np.log(600), 0.8, args.paper_docs), args.max_think)
    requests = [
        (rng.integers(3, 32000, int(rng.integers(512, 2049))).tolist(), max(1, int(n)))
        for n in lengths
    ]
    print(
        f"paper shape: {len(requests)} documents, prompts 512-2048, thinking median "
        f"{int(np.median(lengths))} max {int(lengths.max())} tokens"
    )
    tokens, seconds = engine_run(cfg, params, requests, args.batch, 2048, args.max_think)
    paper_rate = tokens / seconds
    print(f"  this engine: {paper_rate:,.0f} tokens/s ({tokens} in {seconds:.0f} s)")
    spec = {
        "model": os.path.join(root, "ours"), "dtype": args.dtype, "batch": args.batch,
        "max_prefill": 2048, "max_new": args.max_think, "requests": requests,
    }  # fmt: skip
    old = old_engine_run(root, args.baseline_rev, spec)
    if old is not None:
        print(f"  engine of {args.baseline_rev}: {old[0] / old[1]:,.0f} tokens/s")
        print(f"paper-shape vs old engine {paper_rate / (old[0] / old[1]):.2f}")
    hf_tokens, hf_seconds = hf_paper_run(model, requests, args.batch)
    print(f"  HF generate: {hf_tokens / hf_seconds:,.0f} tokens/s")
    print(f"paper-shape vs HF {paper_rate / (hf_tokens / hf_seconds):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
