"""A tiny generator for `tpt think` tests: a word-level tokenizer.json with a chat template and a
random 2-layer decoder saved as a converted model folder."""

from __future__ import annotations

import json
import os

import jax
import tokenizers

from tpt_jax.config import ModelConfig
from tpt_jax.model import init_params
from tpt_jax.model._store import save_model

WORDS = [
    "the",
    "a",
    "apples",
    "cost",
    "dollars",
    "each",
    "three",
    "six",
    "two",
    "train",
    "hour",
    "speed",
    "think",
    "step",
    "so",
    "because",
]
SPECIAL = ["<unk>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_generator(folder: str, seed: int = 0) -> str:
    vocab = {t: i for i, t in enumerate(SPECIAL + WORDS + list("0123456789.,?:-\n"))}
    model = tokenizers.models.WordLevel(vocab, unk_token="<unk>")
    tok = tokenizers.Tokenizer(model)
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True) for t in SPECIAL])
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [tokenizers.pre_tokenizers.WhitespaceSplit(), tokenizers.pre_tokenizers.Punctuation()]
    )
    tok.decoder = tokenizers.decoders.WordPiece(prefix="##")  # joins words with spaces
    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
        dtype="float32", eos_token_id=vocab["<|im_end|>"],
    )  # fmt: skip
    save_model(folder, cfg, init_params(cfg, jax.random.key(seed)))
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": CHAT_TEMPLATE, "eos_token": "<|im_end|>"}, f)
    return folder
