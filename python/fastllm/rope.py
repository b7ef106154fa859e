"""Rotary position embedding tables (RoPE, Su et al. 2021) for `ops.rope_forward` / `cuda.rope_forward`: the inverse
frequencies of a Llama/Qwen/Mistral config (`rope_theta`, partial rotary dims, `rope_scaling` "linear", Llama 3's
"llama3", "yarn" with its attention factor, "dynamic") and the cos/sin tables the kernels read, computed once per
model in numpy.

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

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")
_NEEDS = {"linear": ("factor",), "dynamic": ("factor",), "yarn": ("factor", "original_max_position_embeddings"),
          "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
          "longrope": ("factor", "short_factor", "original_max_position_embeddings")}


def _rope_type(scaling: dict | None) -> str:
    return "default" if not scaling else scaling.get("rope_type", scaling.get("type", "default"))


def inv_freq(head_dim: int, theta: float = 10000.0, scaling: dict | None = None,
             partial_rotary_factor: float = 1.0) -> np.ndarray:
    """Inverse frequencies (rotary_dim // 2,) float32, rotary_dim = int(head_dim * partial_rotary_factor).

    scaling is a config's `rope_scaling` (or None): {"rope_type" (or "type"): "linear", "factor"} divides every
    frequency by factor; {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    "original_max_position_embeddings"} is Llama 3.1's: wavelengths above original/low_freq_factor are divided by
    factor, those below original/high_freq_factor kept, the band between interpolated smoothly. {"rope_type":
    "yarn", "factor", "original_max_position_embeddings", optional "beta_fast", "beta_slow", "truncate"} is YaRN's
    (see _yarn; its cos/sin scale is attention_scaling). {"rope_type": "dynamic", "factor"} is the default RoPE:
    transformers rescales theta only for positions past max_position_embeddings, where a model's context
    (block_size) ends. {"rope_type": "longrope", "factor", "short_factor", "original_max_position_embeddings"}
    (Phi-3-128k, Phi-3.5) is LongRoPE within the original context (fastllm.hf makes that the model's context):
    each frequency divided by its short factor; past it transformers switches to long_factor, which fastllm does
    not run. Other types raise ValueError naming them.

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
    rope_type = _rope_type(scaling)
    if rope_type == "default":
        return freq
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    missing = [k for k in _NEEDS[rope_type] if k not in scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} needs {', '.join(missing)}")
    factor = float(scaling["factor"])
    if not factor > 0:
        raise ValueError(f"rope_scaling factor must be > 0, got {factor!r}")
    if rope_type == "dynamic":
        return freq
    if rope_type == "linear":
        return (freq / f32(factor)).astype(f32)
    if rope_type == "yarn":
        return _yarn(freq, dim, float(theta), scaling, factor)
    if rope_type == "longrope":  # the short factors: a context within original_max_position_embeddings
        ext = np.asarray(scaling["short_factor"], np.float64)
        if ext.shape != (dim // 2,) or not (np.isfinite(ext).all() and (ext > 0).all()):
            raise ValueError(f"longrope short_factor must be {dim // 2} positive numbers, got {ext.shape[0]}")
        return (1.0 / (ext * float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(f32)
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


def _yarn(freq: np.ndarray, dim: int, theta: float, scaling: dict, factor: float) -> np.ndarray:
    """YaRN's frequencies (Peng et al. 2023), in transformers' order (_compute_yarn_parameters): the dimensions whose
    frequency turns fewer than beta_slow (1) times over original_max_position_embeddings are interpolated (divided
    by factor), those turning more than beta_fast (32) times kept, a linear ramp over the dimensions between."""
    old_len = float(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)
    if not (old_len > 0 and beta_fast > 0 and beta_slow > 0):
        raise ValueError(f"yarn rope_scaling needs original_max_position_embeddings, beta_fast, beta_slow > 0, got "
                         f"{old_len}, {beta_fast}, {beta_slow}")

    def dim_of(turns: float) -> float:  # the dimension whose frequency turns `turns` times over old_len positions
        return dim * math.log(old_len / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # (as transformers: no division by zero)
    f32 = np.float32
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1)
    keep = f32(1) - ramp  # the share of the unscaled frequency
    return ((freq / f32(factor)) * (f32(1) - keep) + freq * keep).astype(f32)


def attention_scaling(scaling: dict | None) -> float:
    """The factor transformers multiplies cos and sin by (so q.k by its square): YaRN's attention temperature
    (attention_factor, else 0.1 * ln(factor) + 1, or DeepSeek's mscale / mscale_all_dim ratio of that), LongRoPE's
    (attention_factor, else sqrt(1 + ln(factor) / ln(original_max_position_embeddings))), 1.0 for the other rope
    types. Pass it to rope_tables.

    >>> round(attention_scaling({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}), 4)
    1.1386
    """
    kind = _rope_type(scaling)
    if kind not in ("yarn", "longrope"):
        return 1.0
    if scaling.get("attention_factor") is not None:
        a = float(scaling["attention_factor"])
        if not (math.isfinite(a) and a > 0):
            raise ValueError(f"{kind} rope_scaling attention_factor must be a finite number > 0, got {a!r}")
        return a
    factor = float(scaling["factor"])
    if kind == "longrope":  # (LongRoPE's: transformers' _compute_longrope_parameters)
        old_len = float(scaling["original_max_position_embeddings"])
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_len))

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    return float(mscale(m) / mscale(m_all)) if m and m_all else mscale()


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
