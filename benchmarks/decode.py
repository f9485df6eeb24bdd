"""Decode throughput of the local engine vs HF transformers `generate`, and its roofline fraction.

    python benchmarks/decode.py [--batch 16] [--prompt 64] [--new 128] [--dtype float32]

Same ~59M-parameter Llama (random weights, converted HF -> tpt_jax) for both, greedy, batch 16.
Roofline per decode step: max(FLOPs / matmul FLOP/s, bytes read (weights + KV cache) / memory
bandwidth), with both rates measured in this process; fraction = that bound / measured step time.
"""

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import torch
    import transformers

    from tpt_jax.bench import matmul_flops_per_second
    from tpt_jax.model import param_count, param_shapes
    from tpt_jax.model._store import load_model_config, restore_params
    from tpt_jax.model.convert import hf_to_tpt
    from tpt_jax.think.slots import SlotEngine, pad_prompt

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024, tie_word_embeddings=False,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(hf_cfg).eval()
    model.generation_config.eos_token_id = None
    root = tempfile.mkdtemp(prefix="tpt_decode_bench_")
    model.save_pretrained(os.path.join(root, "hf"))
    hf_to_tpt(os.path.join(root, "hf"), os.path.join(root, "ours"))
    cfg = dataclasses.replace(load_model_config(os.path.join(root, "ours")), dtype=args.dtype)
    params = restore_params(os.path.join(root, "ours"), param_shapes(cfg))
    print(
        f"model: {param_count(cfg):,} parameters, batch {args.batch}, prompt {args.prompt}, new {args.new}"
    )

    prompts = np.random.default_rng(0).integers(3, 32000, size=(args.batch, args.prompt))
    # HF reference (fp32 on CPU).
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

    engine = SlotEngine(
        cfg, params, max_concurrent_decodes=args.batch, max_prefill_length=args.prompt,
        max_target_length=args.prompt + args.new + 1,
    )  # fmt: skip
    params = engine.load_params(params)

    def run(new_tokens: int) -> tuple[float, float]:
        state = engine.init_decode_state()
        start = time.perf_counter()
        for slot, prompt in enumerate(prompts):
            padded, length = pad_prompt(prompt.tolist(), args.prompt)
            state = engine.insert(
                engine.prefill(params=params, padded_tokens=padded, true_length=length), state, slot
            )
        jax.block_until_ready(state)
        prefill_done = time.perf_counter()
        for _ in range(new_tokens):
            state, result = engine.generate(params, state)
        jax.block_until_ready(result)
        return time.perf_counter() - start, (time.perf_counter() - prefill_done) / new_tokens

    run(4)  # compile
    total, step = run(args.new)
    ours_rate = args.batch * args.new / total
    print(
        f"tpt_jax engine: {ours_rate:,.0f} new tokens/s (prefill included), {step * 1e3:.1f} ms per decode step"
    )
    print(f"ratio engine / HF: {ours_rate / hf_rate:.2f}x")

    driver_rate = driver_throughput(root, cfg, args)
    print(f"tpt think driver (local engine, continuous batching): {driver_rate:,.0f} new tokens/s")
    print(f"ratio driver / engine: {driver_rate / ours_rate:.2f}")
    print(f"driver/engine {driver_rate / ours_rate:.2f}")

    matmul = matmul_flops_per_second(args.dtype)
    bandwidth = memory_bandwidth()
    itemsize = jnp.dtype(args.dtype).itemsize
    shapes = param_shapes(cfg)
    weights = sum(x.size for x in jax.tree.leaves(shapes))
    matmul_params = (
        weights - cfg.vocab_size * cfg.hidden_size
    )  # the embedding lookup is not a matmul
    context = args.prompt + args.new / 2  # average cache length over the run
    kv_elems = 2 * cfg.num_layers * args.batch * context * cfg.num_kv_heads * cfg.resolved_head_dim
    flops = 2 * matmul_params * args.batch + 2 * kv_elems * cfg.num_heads // cfg.num_kv_heads
    bytes_read = weights * 4 + kv_elems * itemsize  # parameters are stored in float32
    bound = max(flops / matmul, bytes_read / bandwidth)
    print(
        f"roofline: {flops / 1e9:.2f} GFLOP and {bytes_read / 1e6:.0f} MB per step; matmul {matmul / 1e9:.0f} GFLOP/s, "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s -> bound {bound * 1e3:.1f} ms; fraction {bound / step:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
