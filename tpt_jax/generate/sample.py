"""`tpt sample`: completions for a few prompts from a model folder, with think.* sampling settings."""

from __future__ import annotations

import os

from tpt_jax.config import Config
from tpt_jax.errors import TptError
from tpt_jax.generate import GeneratorTokenizer, SamplingParams, generate


def run_sample(
    cfg: Config, prompts: list[str], max_new_tokens: int, raw: bool = False
) -> list[str]:
    """Completion text of each prompt (generation stops at EOS or a think.stop string)."""
    from tpt_jax.generate import load_generator

    t = cfg.think
    model_dir = t.model_dir or _exported_model(cfg)
    tokenizer = GeneratorTokenizer(model_dir, t.chat_template_kwargs)
    model_cfg, params = load_generator(model_dir, t.dtype)
    texts = [
        p if raw or not (t.chat_template and tokenizer.has_chat_template) else tokenizer.chat(p)
        for p in prompts
    ]
    ids = [tokenizer.encode(text) for text in texts]
    sampling = [
        SamplingParams(t.temperature, t.top_k, t.top_p, t.seed + i) for i in range(len(prompts))
    ]
    stops = [tokenizer.encode(stop) for stop in t.stop]  # stop on device; cut from the text
    outputs = generate(
        params, model_cfg, ids, max_new_tokens, sampling, eos_id=tokenizer.eos_id, stops=stops
    )
    return [tokenizer.completion(tokens, t.stop)[0] for tokens in outputs]


def _exported_model(cfg: Config) -> str:
    """The run's model as `tpt export` writes it by default (<run>/export/model)."""
    from tpt_jax import storage

    run_dir = os.path.join(cfg.checkpoint.output_dir, cfg.checkpoint.run_name)
    model_dir = os.path.join(run_dir, "export", "model")
    if not storage.exists(os.path.join(model_dir, "model.yaml")):
        raise TptError(
            f"tpt sample needs think.model_dir (a folder written by `tpt convert from-hf`), or "
            f"a run exported by `tpt export` ({model_dir} has no model)"
        )
    return model_dir
