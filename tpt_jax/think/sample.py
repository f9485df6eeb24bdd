"""`tpt sample`: completions for a few prompts from a model folder, with think.* sampling settings."""

from __future__ import annotations

from tpt_jax.config import Config
from tpt_jax.errors import TptError
from tpt_jax.think.generate import SamplingParams, generate
from tpt_jax.think.tokenizer import GeneratorTokenizer


def run_sample(
    cfg: Config, prompts: list[str], max_new_tokens: int, raw: bool = False
) -> list[str]:
    """Completion text of each prompt (generation stops at EOS or a think.stop string)."""
    from tpt_jax.think.generate import load_generator

    t = cfg.think
    if not t.model_dir:
        raise TptError(
            "tpt sample needs think.model_dir (a folder written by `tpt convert from-hf`)"
        )
    tokenizer = GeneratorTokenizer(t.model_dir)
    model_cfg, params = load_generator(t.model_dir, t.dtype)
    texts = [
        p if raw or not (t.chat_template and tokenizer.has_chat_template) else tokenizer.chat(p)
        for p in prompts
    ]
    ids = [tokenizer.encode(text) for text in texts]
    sampling = [
        SamplingParams(t.temperature, t.top_k, t.top_p, t.seed + i) for i in range(len(prompts))
    ]
    outputs = generate(params, model_cfg, ids, max_new_tokens, sampling, eos_id=tokenizer.eos_id)
    return [tokenizer.completion(tokens, t.stop)[0] for tokens in outputs]
