"""HF transformers <-> tpt_jax: config.json fields and the parameter layout of each family.

Our kernels keep heads as their own axis ([E, H, D]) and stack layers ([L, ...]); HF stores
torch Linear weights [out, in] per layer. `_layout` lists, for every parameter, its HF name and
how one layer slice maps across, so import and export are the same table read both ways.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from tpt_jax.config import ModelConfig
from tpt_jax.errors import CheckpointError
from tpt_jax.model._safetensors import SafetensorsFolder

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# HF tensors that carry no parameter of ours (buffers some older checkpoints saved).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# transform: "copy" (same shape), "flatten" (HF flattens heads), or n_in (int): our kernel
# [*in, *out] with n_in input axes <-> HF weight [prod(out), prod(in)].
_LAYER = (
    (("input_norm", "scale"), "input_layernorm.weight", "copy"),
    (("post_attn_norm", "scale"), "post_attention_layernorm.weight", "copy"),
    (("attn", "q", "kernel"), "self_attn.q_proj.weight", 1),
    (("attn", "k", "kernel"), "self_attn.k_proj.weight", 1),
    (("attn", "v", "kernel"), "self_attn.v_proj.weight", 1),
    (("attn", "o", "kernel"), "self_attn.o_proj.weight", 2),
    (("attn", "q", "bias"), "self_attn.q_proj.bias", "flatten"),
    (("attn", "k", "bias"), "self_attn.k_proj.bias", "flatten"),
    (("attn", "v", "bias"), "self_attn.v_proj.bias", "flatten"),
    (("attn", "q_norm", "scale"), "self_attn.q_norm.weight", "copy"),
    (("attn", "k_norm", "scale"), "self_attn.k_norm.weight", "copy"),
    (("mlp", "gate", "kernel"), "mlp.gate_proj.weight", 1),
    (("mlp", "up", "kernel"), "mlp.up_proj.weight", 1),
    (("mlp", "down", "kernel"), "mlp.down_proj.weight", 1),
)
_GLOBAL = (
    (("embedding",), "model.embed_tokens.weight", "copy"),
    (("final_norm", "scale"), "model.norm.weight", "copy"),
    (("lm_head",), "lm_head.weight", 1),
)


def model_config_from_hf(hf: dict, where: str, param_dtype: str = "float32") -> ModelConfig:
    """Reads an HF config.json (transformers 4.x or 5.x field names) into a ModelConfig."""

    def need(key):
        if key not in hf:
            raise CheckpointError(f"{where}: missing field '{key}'")
        return hf[key]

    model_type = hf.get("model_type")
    if model_type not in _ARCHITECTURES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported (supported: {', '.join(_ARCHITECTURES)})"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(
            f"{where}: hidden_act {hf['hidden_act']!r} is not supported (silu only)"
        )
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(flag):
            raise CheckpointError(
                f"{where}: '{flag}: true' is not supported by the tpt_jax decoder"
            )

    # transformers 5 nests theta and scaling in rope_parameters; 4.x uses rope_theta/rope_scaling.
    rope = dict(hf.get("rope_scaling") or {})
    rope.update(hf.get("rope_parameters") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        raise CheckpointError(
            f"{where}: rope type {rope_type!r} is not supported (default, linear, llama3)"
        )

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    eos = hf.get("eos_token_id")
    bos = hf.get("bos_token_id")
    return ModelConfig(
        family=model_type,
        vocab_size=need("vocab_size"),
        hidden_size=hidden,
        num_layers=need("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        mlp_dim=need("intermediate_size"),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling={"default": "none"}.get(rope_type, rope_type),
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
        max_position=int(hf.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2",
        qk_norm=model_type == "qwen3",
        param_dtype=param_dtype,
        bos_token_id=_first_id(bos),
        eos_token_id=_first_id(eos),
    )


def _first_id(value) -> int:
    if isinstance(value, list):
        value = value[0] if value else None
    return -1 if value is None else int(value)


def check_exportable(cfg: ModelConfig) -> None:
    """HF's classes fix the flags per family; refuse a combination HF cannot represent."""
    expected = {"llama": (False, False), "qwen2": (True, False), "qwen3": (False, True)}[cfg.family]
    if (cfg.qkv_bias, cfg.qk_norm) != expected:
        raise CheckpointError(
            f"model.family={cfg.family} needs model.qkv_bias={expected[0]} and model.qk_norm="
            f"{expected[1]} to match HF's {_ARCHITECTURES[cfg.family]}"
        )


def hf_config_from_model(cfg: ModelConfig, torch_dtype: str) -> dict:
    """An HF config.json dict that transformers loads as the same architecture."""
    check_exportable(cfg)
    rope_scaling = None
    if cfg.rope_scaling == "linear":
        rope_scaling = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        rope_scaling = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_position,
        }
    out = {
        "architectures": [_ARCHITECTURES[cfg.family]],
        "model_type": cfg.family,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": cfg.max_position,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
        "use_cache": True,
    }
    if cfg.family == "llama":
        out["mlp_bias"] = False
    else:
        out["use_sliding_window"] = False
    for key, value in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id)):
        if value >= 0:
            out[key] = value
    return out


def _layout(
    cfg: ModelConfig, shapes: dict
) -> Iterator[tuple[tuple[str, ...], str, object, int | None]]:
    """(our path, HF name, transform, layer index or None) for every parameter present."""
    for path, hf_name, transform in _GLOBAL:
        if _lookup(shapes, path) is not None:
            yield path, hf_name, transform, None
    for i in range(cfg.num_layers):
        for path, suffix, transform in _LAYER:
            full = ("layers", *path)
            if _lookup(shapes, full) is not None:
                yield full, f"model.layers.{i}.{suffix}", transform, i


def _lookup(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _to_hf(ours: np.ndarray, transform) -> np.ndarray:
    if transform == "copy":
        return ours
    if transform == "flatten":
        return ours.reshape(-1)
    n_in = int(transform)
    return ours.reshape(math.prod(ours.shape[:n_in]), -1).T


def _hf_shape(ours_shape: tuple[int, ...], transform) -> tuple[int, ...]:
    if transform == "copy":
        return ours_shape
    if transform == "flatten":
        return (math.prod(ours_shape),)
    n_in = int(transform)
    return (math.prod(ours_shape[n_in:]), math.prod(ours_shape[:n_in]))


def _from_hf(hf: np.ndarray, ours_shape: tuple[int, ...], transform) -> np.ndarray:
    if transform in ("copy", "flatten"):
        return hf.reshape(ours_shape)
    return hf.T.reshape(ours_shape)


def load_hf_params(folder: str, cfg: ModelConfig, shapes: dict) -> dict:
    """Builds our parameter tree from an HF folder, one layer slice at a time.

    Args:
        folder: an HF model folder with safetensors weights.
        cfg: its ModelConfig (from `model_config_from_hf`).
        shapes: tree of ShapeDtypeStruct (`tpt_jax.model.param_shapes(cfg)`).

    Returns:
        tree of numpy arrays in cfg.param_dtype. The HF files are memory-mapped, so peak memory is
        one copy of the model in our layout.
    """
    source = SafetensorsFolder(folder)
    out: dict = {}
    used = set()
    for path, hf_name, transform, layer in _layout(cfg, shapes):
        spec = _lookup(shapes, path)
        target = _lookup(out, path)
        if target is None:
            target = np.empty(spec.shape, dtype=spec.dtype)
            node = out
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = target
        slice_shape = spec.shape[1:] if layer is not None else spec.shape
        tensor = source.get(hf_name)
        expected = _hf_shape(slice_shape, transform)
        if tuple(tensor.shape) != expected:
            raise CheckpointError(
                f"{folder}: tensor '{hf_name}' has shape {list(tensor.shape)} but config.json "
                f"implies {list(expected)}"
            )
        value = _from_hf(tensor, slice_shape, transform).astype(spec.dtype)
        if layer is None:
            target[...] = value
        else:
            target[layer] = value
        used.add(hf_name)
    unused = [
        n
        for n in source.names()
        if n not in used
        and not n.endswith(_IGNORED_SUFFIXES)
        and not (cfg.tie_embeddings and n == "lm_head.weight")
    ]
    if unused:
        raise CheckpointError(
            f"{folder}: {len(unused)} tensors have no place in a {cfg.family} decoder "
            f"(first: '{unused[0]}'); check config.json"
        )
    return out


def hf_tensors(cfg: ModelConfig, params: dict, dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array in `dtype`) for every parameter, produced lazily layer by layer."""
    for path, hf_name, transform, layer in _layout(cfg, params):
        value = np.asarray(_lookup(params, path))
        if layer is not None:
            value = value[layer]
        yield hf_name, np.ascontiguousarray(_to_hf(value, transform), dtype=dtype)
