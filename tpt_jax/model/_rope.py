"""Rotary position embeddings in the "rotate half" layout used by Llama, Qwen2 and Qwen3 on HF."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from tpt_jax.config import ModelConfig


def inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies, float64 [head_dim // 2], with the configured scaling.

    "llama3" scaling (Llama 3.1+) keeps high frequencies (wavelength shorter than
    original_max / high_freq_factor), divides low frequencies (wavelength longer than
    original_max / low_freq_factor) by `factor`, and blends linearly in between.
    """
    dim = cfg.resolved_head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if cfg.rope_scaling == "linear":
        return inv / cfg.rope_factor
    if cfg.rope_scaling != "llama3":
        return inv
    wavelength = 2 * math.pi / inv
    long_wave = cfg.rope_original_max_position / cfg.rope_low_freq_factor
    short_wave = cfg.rope_original_max_position / cfg.rope_high_freq_factor
    blend = (cfg.rope_original_max_position / wavelength - cfg.rope_low_freq_factor) / (
        cfg.rope_high_freq_factor - cfg.rope_low_freq_factor
    )
    blended = (1 - blend) * inv / cfg.rope_factor + blend * inv
    out = np.where(wavelength > long_wave, inv / cfg.rope_factor, blended)
    return np.where(wavelength < short_wave, inv, out)


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, inv_freq: np.ndarray) -> jnp.ndarray:
    """Rotates query or key heads.

    Args:
        x: [B, T, heads, head_dim].
        positions: int [B, T], restarting at 0 in every packed segment.
        inv_freq: [head_dim // 2] from `inverse_frequencies`.

    Returns:
        [B, T, heads, head_dim] in x's dtype; the angles are computed in float32.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return x * cos + rotated * sin
