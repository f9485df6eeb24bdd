"""Tiny random HF transformers models (torch CPU) used as the numerical reference."""

from __future__ import annotations

import torch
import transformers

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}

# One variant per family, each exercising a different corner: Llama-3.1 RoPE scaling and an
# untied head; Qwen2 biases with tied embeddings; Qwen3 q/k norm with head_dim != hidden/heads.
VARIANTS = {
    "llama": dict(
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        rms_norm_eps=1e-5,
    ),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1000000.0, rms_norm_eps=1e-6),
    "qwen3": dict(tie_word_embeddings=False, head_dim=32, rope_theta=1000000.0, rms_norm_eps=1e-6),
}


def make_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model with every weight random (norm scales near 1, biases non-zero)."""
    config_cls, model_cls = FAMILIES[family]
    config = config_cls(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        **VARIANTS[family],
    )
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def logits(model: torch.nn.Module, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float()
