"""Rotary position embedding tables (RoPE, Su et al. 2021) for `ops.rope_forward` / `cuda.rope_forward`: the inverse
frequencies of a Llama/Qwen/Mistral config (`rope_theta`, partial rotary dims, `rope_scaling` "linear" and Llama 3's
"llama3") and the cos/sin tables the kernels read, computed once per model in numpy.

Everything is float32 in the order HF transformers computes it (LlamaRotaryEmbedding and
modeling_rope_utils: inv_freq = 1 / theta ** (arange(0, dim, 2) / dim), the llama3 smoothing, angle = float32(pos) *
inv_freq), so the tables equal HF's; only cos/sin themselves are taken in float64 and rounded (HF's float32
cos/sin are within an ulp of that).

>>> cos, sin = rope_tables(inv_freq(64, theta=500000.0), max_pos=2048)
>>> cos.shape
(2048, 32)
"""

from __future__ import annotations

import math

import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")


def inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict | None = None,
             partial_rotary_factor: float = 1.0) -> np.ndarray:
    """Inverse frequencies (rotary_dim // 2,) float32, rotary_dim = int(head_dim * partial_rotary_factor).

    scaling is a config's `rope_scaling` (or None): {"rope_type" (or "type"): "linear", "factor"} divides every
    frequency by factor; {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} is Llama 3.1's: wavelengths above original/low_freq_factor are divided by
    factor, those below original/high_freq_factor kept, the band between interpolated smoothly. Other types raise
    ValueError naming them.

    >>> inv_freq(8, theta=10000.0)
    array([1.   , 0.1  , 0.01 , 0.001], dtype=float32)
    """
    dim = int(head_dim * partial_rotary_factor)
    if head_dim <= 0 or dim < 2 or dim > head_dim:
        raise ValueError(f"rotary dim = int(head_dim={head_dim} * partial_rotary_factor={partial_rotary_factor}) "
                         "must be in [2, head_dim]")
    if not (theta > 0 and math.isfinite(theta)):
        raise ValueError(f"rope_theta must be a positive number, got {theta!r}")
    f32 = np.float32
    # theta^(-2i/dim) in float64, then rounded once: the nearest float32 on every machine. transformers computes it
    # in float32 (torch's pow), whose last bit depends on the CPU's vector pow (AVX-512 vs AVX2), as numpy's does:
    # each is within an ulp of this, not always of each other.
    freq = (1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(f32)
    rope_type = "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return freq
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    keys = ("factor",) if rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [k for k in keys if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs {', '.join(missing)}")
    factor = float(scaling["factor"])
    if not factor > 0:
        raise ValueError(f"rope_scaling factor must be > 0, got {factor!r}")
    if rope_type == "linear":
        return (freq / f32(factor)).astype(f32)
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_len = float(scaling["original_max_position_embeddings"])
    if not (0 < low < high) or not old_len > 0:
        raise ValueError(f"llama3 rope_scaling needs 0 < low_freq_factor < high_freq_factor and "
                         f"original_max_position_embeddings > 0, got {low}, {high}, {old_len}")
    low_wavelen, high_wavelen = old_len / low, old_len / high  # python floats, as in HF
    wavelen = f32(2 * math.pi) / freq
    scaled = np.where(wavelen > f32(low_wavelen), freq / f32(factor), freq).astype(f32)
    smooth = (f32(old_len) / wavelen - f32(low)) / f32(high - low)
    smoothed = (f32(1) - smooth) * scaled / f32(factor) + smooth * scaled
    medium = ~(wavelen < f32(high_wavelen)) & ~(wavelen > f32(low_wavelen))
    return np.where(medium, smoothed, scaled).astype(f32)


def rope_tables(freq: np.ndarray, max_pos: int, attention_scaling: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (max_pos, len(freq)) float32: row p holds cos/sin(float32(p) * freq) (times
    attention_scaling). Pass them to rope_forward / rope_backward (cuda.to_device them once for the GPU).

    >>> cos, sin = rope_tables(np.array([1.0, 0.5], np.float32), 3)
    >>> cos[2, 0] == np.float32(np.cos(2.0))
    True
    """
    freq = np.asarray(freq, np.float32)
    if freq.ndim != 1 or freq.size == 0:
        raise ValueError(f"freq must be a non-empty 1-D array, got shape {freq.shape}")
    if max_pos < 1:
        raise ValueError(f"max_pos must be >= 1, got {max_pos}")
    angle = (np.arange(max_pos, dtype=np.float32)[:, None] * freq[None, :]).astype(np.float64)
    cos, sin = np.cos(angle), np.sin(angle)
    if attention_scaling != 1.0:
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32)
