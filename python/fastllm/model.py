"""The transformer in fastllm's own kernels -- GPT-2 and the Llama/Qwen/Mistral/nanochat family -- written once
for the CPU and the GPU.

The model is a sequence of calls to its backend `bk` -- fastllm.ops (numpy, CPU kernels) or fastllm.cuda
(DeviceArrays, CUDA kernels), which expose the same ops with the same arguments (fastllm/backend.py) -- on
preallocated buffers. The device is a constructor argument and a method, as in PyTorch:
GPT(config, device="cuda"), model.to("cuda"), model.to("cpu").

Architecture: token embedding (+ a learned position embedding, GPT-2), n_layer pre-norm blocks of causal
attention and an MLP, a final norm, an lm-head (tied to the token embedding or its own matrix). The config picks,
inside the one block (no per-architecture copies): the norm (layernorm | rmsnorm), positions (learned | rope, with
HF's rope_scaling, partial rotary dims, layers without RoPE), grouped-query attention (n_kv_head; the KV cache holds
only the kv heads), QK-norm per head (Qwen3) or over all heads (OLMo 2), the MLP (gelu | gelu_erf | swiglu | geglu |
relu2, its own width), biases per projection group, attention and MLP in sequence or side by side (parallel_residual:
GPT-NeoX, Pythia), Gemma 2 / nanochat logit soft-capping, and Gemma's choices: scaled token
embeddings, norms after each branch too (post_norms; OLMo 2: instead of before it), the scores' scale and soft cap,
sliding-window layers (also Mistral's, Phi-3's, OLMo 3's) with a RoPE base of their own.
GPTConfig's defaults are GPT-2; GPTConfig.preset("gpt2") is GPT-2 124M, "nano"/"micro" modern models for a CPU.
Memory: all parameters live in one flat float32 buffer `params` (the master weights) with named views `p`, and
all gradients in another (`grads`, `g`, allocated on first use). Where the compute dtype is not float32 (bf16 on
the GPU) a compute copy `cparams` (views `pc`) is what the kernels read; the optimizer writes both (a CPU model in
bf16 has none: its matmuls round the fp32 weights as they pack them). Activations of a (B, T) batch are views of
one allocation, made once per shape.
LoRA (fastllm.lora, add_lora): adapters beside the blocks' linear layers (`linears`), the only thing that trains then;
backward skips the gradients of everything frozen.
A training step: forward with targets (embedding, blocks, final norm, then the fused lm-head +
cross-entropy, which also computes the lm-head's gradient into a scratch buffer), backward (adds that gradient,
then the blocks in reverse and the embedding), an optimizer step. Only the per-token losses come back to the
host (B*T floats).

>>> model = GPT(GPTConfig.preset("tiny", vocab_size=100))
>>> loss = model.forward(np.zeros((2, 8), np.int64), np.zeros((2, 8), np.int64))
>>> model.zero_grad(); model.backward()
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from . import backend, checks, ops, rope
from .lora import Lora, LoraConfig, LoraRuns
from .ops import IGNORE_INDEX, softcap_logits

# the Llama family's choices (Llama 3, SmolLM2, Mistral without biases; nanochat's modern GPT)
MODERN = dict(positions="rope", norm="rmsnorm", qkv_bias=False, proj_bias=False, mlp_bias=False)

PRESETS: dict[str, dict] = {
    # name: n_layer, n_head, n_embd, block_size (vocab_size comes from the tokenizer, 50257 for GPT-2)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
    # small models for CPU
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
    # modern small models for CPU (the sizes of mini and small; see benchmarks/bench_train.py --arch)
    "nano": dict(n_layer=4, n_head=4, n_kv_head=2, n_embd=128, block_size=128, mlp="swiglu", mlp_hidden=352,
                 **MODERN),
    "micro": dict(n_layer=6, n_head=6, n_kv_head=2, n_embd=384, block_size=256, mlp="swiglu", mlp_hidden=1024,
                  **MODERN),
}

POSITIONS, NORMS = ("learned", "rope"), ("layernorm", "rmsnorm")
MLPS = ("gelu", "gelu_erf", "swiglu", "geglu", "relu2")
GATED = ("swiglu", "geglu")  # MLPs whose c_fc has 2H rows [gate | up]: act(gate) * up
LAYER_TYPES = ("full_attention", "sliding_attention")  # transformers' names
QK_NORMS = ("head", "all")  # what QK-norm normalises: each head, or all q (k) channels at once


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length (rows of the position embedding or of the RoPE tables)
    vocab_size: int = 50257  # number of token ids (tokenizer.n_vocab)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # query heads per block
    n_embd: int = 768  # channels C of the residual stream
    layernorm_eps: float = 1e-5  # epsilon of every norm (layernorm or rmsnorm)
    n_kv_head: int | None = None  # key/value heads, dividing n_head (GQA; 1: MQA); None = n_head (MHA)
    head_dim: int | None = None  # channels per head; None = n_embd // n_head (Qwen3 sets others)
    positions: str = "learned"  # "learned" (the wpe table, GPT-2) | "rope" (rotary, HF's rotate-half layout)
    rope_theta: float = 10000.0  # RoPE base (Llama 3: 500000)
    rope_scaling: dict | None = None  # HF's rope_scaling: None, {"rope_type": "linear" | "llama3" | "yarn", ...}
    norm: str = "layernorm"  # "layernorm" (weight + bias) | "rmsnorm" (weight only)
    mlp: str = "gelu"  # "gelu" (tanh approx.) | "gelu_erf" (exact GELU: GPT-NeoX) | "swiglu" (silu(gate) * up) |
    # "geglu" (gelu(gate) * up, Gemma) | "relu2" (relu(x)^2)
    mlp_hidden: int | None = None  # MLP width H (HF intermediate_size); None = 4 * n_embd
    qkv_bias: bool = True  # bias of the q/k/v projection (GPT-2, Qwen2: yes; Llama, Mistral, Qwen3: no)
    proj_bias: bool = True  # bias of the attention output projection
    mlp_bias: bool = True  # biases of the MLP's two projections
    qk_norm: bool = False  # RMSNorm on the queries and keys (before RoPE), over qk_norm_over:
    qk_norm_over: str = "head"  # "head": each q and k head's head_dim channels (Qwen3, Gemma 3) | "all": all
    # n_head * head_dim q channels, all n_kv_head * head_dim k channels at once (OLMo 2)
    tie_embeddings: bool = True  # the lm-head is wte; False: its own lm_head.weight
    logit_softcap: float | None = None  # logits = c * tanh(logits / c) (Gemma 2, nanochat); None: no cap
    embed_scale: float | None = None  # token embeddings times this (Gemma: sqrt(n_embd)); None: 1
    pre_norms: bool = True  # a norm on each branch's input (ln_1, ln_2); False: the branch reads the residual stream
    # (OLMo 2, with post_norms)
    post_norms: bool = False  # Gemma 2/3, OLMo 2: a norm on each branch's output, before it joins the residual stream
    attn_scale: float | None = None  # attention scores q.k times this; None: 1/sqrt(head_size) (Gemma 2/3 differ)
    attn_softcap: float | None = None  # scores = c * tanh(scores / c) (Gemma 2: 50); None: no cap
    sliding_window: int | None = None  # a sliding layer's query sees itself and the window - 1 keys before it
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention"; None: every layer
    # slides when sliding_window is set (Mistral v0.1), else none does
    rope_local_theta: float | None = None  # Gemma 3: sliding layers' RoPE base (no scaling); None: rope_theta's
    partial_rotary_factor: float = 1.0  # RoPE turns the first int(head_size * this) dims of each head (Phi-4-mini:
    # 0.75), the rest pass through
    nope_layers: list[int] | None = None  # layers whose attention has no RoPE (SmolLM3: every fourth); None: none
    residual_scale: float | None = None  # each branch joins the residual stream times this (Granite's
    # residual_multiplier); None: 1
    logits_scaling: float | None = None  # the logits are divided by this (Granite); None: 1
    parallel_residual: bool = False  # attention and MLP side by side, x + attn(ln_1(x)) + mlp(ln_2(x)) (GPT-NeoX,
    # Pythia); False: in sequence, x' = x + attn(ln_1(x)), then x' + mlp(ln_2(x'))

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "n_kv_head", "head_dim",
                     "mlp_hidden"):
            v = getattr(self, name)
            if v is None and name in ("n_kv_head", "head_dim", "mlp_hidden"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head} (or set "
                             "head_dim)")
        if self.n_head % self.kv_heads:
            raise ValueError(f"GPTConfig.n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        for name, allowed in (("positions", POSITIONS), ("norm", NORMS), ("mlp", MLPS), ("qk_norm_over", QK_NORMS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("qkv_bias", "proj_bias", "mlp_bias", "qk_norm", "tie_embeddings", "pre_norms", "post_norms",
                     "parallel_residual"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"GPTConfig.{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("layernorm_eps", "rope_theta", "logit_softcap", "embed_scale", "attn_scale", "attn_softcap",
                     "rope_local_theta", "residual_scale", "logits_scaling"):
            v = getattr(self, name)
            if v is None and name not in ("layernorm_eps", "rope_theta"):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or \
                    not (math.isfinite(v) and v > 0):
                raise ValueError(f"GPTConfig.{name} must be a finite number > 0, got {v!r}")
        if self.parallel_residual and not self.pre_norms:
            raise ValueError("GPTConfig.parallel_residual needs pre_norms (each branch reads its own norm of the "
                             "block's input)")
        w = self.sliding_window
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1):
            raise ValueError(f"GPTConfig.sliding_window must be None or a positive integer, got {w!r}")
        if self.layer_types is not None:
            kinds = self.layer_types
            if not isinstance(kinds, (list, tuple)) or len(kinds) != self.n_layer or \
                    any(k not in LAYER_TYPES for k in kinds):
                raise ValueError(f"GPTConfig.layer_types must be None or n_layer={self.n_layer} of {LAYER_TYPES}, "
                                 f"got {kinds!r}")
            self.layer_types = list(kinds)
            if "sliding_attention" in kinds and w is None:
                raise ValueError("GPTConfig.layer_types has sliding_attention layers but sliding_window is None")
        for name, off in (("rope_local_theta", None), ("partial_rotary_factor", 1.0), ("nope_layers", None)):
            if getattr(self, name) != off and self.positions != "rope":
                raise ValueError(f"GPTConfig.{name} is set but positions is 'learned' (it applies to rope only)")
        f = self.partial_rotary_factor
        if isinstance(f, bool) or not isinstance(f, (int, float, np.integer, np.floating)) or not 0 < f <= 1:
            raise ValueError(f"GPTConfig.partial_rotary_factor must be a number in (0, 1], got {f!r}")
        if self.nope_layers is not None:
            nope = self.nope_layers
            if not isinstance(nope, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, (int, np.integer))
                                                          or not 0 <= i < self.n_layer for i in nope) or \
                    len(set(nope)) != len(nope):
                raise ValueError(f"GPTConfig.nope_layers must be None or distinct layer indices in [0, n_layer="
                                 f"{self.n_layer}), got {nope!r}")
            self.nope_layers = sorted(int(i) for i in nope)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ValueError(f"GPTConfig.rope_scaling must be None or a dict, got {self.rope_scaling!r}")
        if self.positions == "rope":
            try:
                rope.inv_freq(self.head_size, self.rope_theta, self.rope_scaling, self.partial_rotary_factor)
                rope.attention_scaling(self.rope_scaling)
            except ValueError as e:
                raise ValueError(f"GPTConfig.rope_scaling / rope_theta / head_dim / partial_rotary_factor: {e}") \
                    from None
            if self.head_size % 2:
                raise ValueError(f"GPTConfig: rope needs an even head size, got {self.head_size}")
        elif self.rope_scaling is not None:
            raise ValueError("GPTConfig.rope_scaling is set but positions is 'learned' (it applies to rope only)")

    # ---- derived sizes (not fields: None keeps meaning "the default" in saved configs)

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else int(self.n_kv_head)

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head if self.head_dim is None else int(self.head_dim)

    @property
    def mlp_width(self) -> int:
        """H, the MLP's hidden width (swiglu's c_fc has 2H rows: gate, then up)."""
        return 4 * self.n_embd if self.mlp_hidden is None else int(self.mlp_hidden)

    @property
    def fc_width(self) -> int:
        """Rows of c_fc: 2H for the gated MLPs ([gate | up]), else H."""
        return 2 * self.mlp_width if self.mlp in GATED else self.mlp_width

    @property
    def rotary_dims(self) -> int:
        """Channels of each q/k head that RoPE turns (the first ones): int(head_size * partial_rotary_factor)."""
        return int(self.head_size * self.partial_rotary_factor)

    def has_rope(self, layer: int) -> bool:
        """Whether layer `layer` rotates its queries and keys (RoPE, not a NoPE layer)."""
        return self.positions == "rope" and layer not in (self.nope_layers or ())

    def qk_norm_width(self, heads: int) -> int:
        """Channels of a QK-norm weight for `heads` heads (n_head: q, kv_heads: k): head_dim, or all of them."""
        return self.head_size if self.qk_norm_over == "head" else heads * self.head_size

    def window(self, layer: int) -> int | None:
        """Layer `layer`'s attention window (None: full causal attention)."""
        if self.layer_types is None or self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    @property
    def qkv_width(self) -> int:
        """Rows of c_attn: (n_head + 2 * kv_heads) * head_size = [q | k | v]."""
        return (self.n_head + 2 * self.kv_heads) * self.head_size

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}")
        return cls(**d)


def param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter tensor, stacked over layers (llm.c layout), in flat-buffer order; a tensor whose option is off
    is absent (no wpe with rope, no biases where disabled, no lm_head.weight when tied)."""
    V, Tm, L, C = cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd
    NH, hd, H = cfg.n_head, cfg.head_size, cfg.mlp_width
    layernorm, pre = cfg.norm == "layernorm", cfg.pre_norms
    shapes = {
        "wte": (V, C),  # token embedding (and the lm-head when tied)
        "wpe": (Tm, C) if cfg.positions == "learned" else None,  # position embedding
        "ln_1.weight": (L, C) if pre else None,  # the attention's pre-norm
        "ln_1.bias": (L, C) if layernorm and pre else None,
        "attn.c_attn.weight": (L, cfg.qkv_width, C),  # [q | k | v] projection, (out, in) like nn.Linear
        "attn.c_attn.bias": (L, cfg.qkv_width) if cfg.qkv_bias else None,
        "attn.q_norm.weight": (L, cfg.qk_norm_width(NH)) if cfg.qk_norm else None,
        "attn.k_norm.weight": (L, cfg.qk_norm_width(cfg.kv_heads)) if cfg.qk_norm else None,
        "attn.c_proj.weight": (L, C, NH * hd),
        "attn.c_proj.bias": (L, C) if cfg.proj_bias else None,
        "attn.post_norm.weight": (L, C) if cfg.post_norms else None,  # of the attention's output (Gemma 2/3)
        "attn.post_norm.bias": (L, C) if cfg.post_norms and layernorm else None,
        "ln_2.weight": (L, C) if pre else None,  # the MLP's pre-norm
        "ln_2.bias": (L, C) if layernorm and pre else None,
        "mlp.c_fc.weight": (L, cfg.fc_width, C),  # gated MLPs: [gate | up] rows
        "mlp.c_fc.bias": (L, cfg.fc_width) if cfg.mlp_bias else None,
        "mlp.c_proj.weight": (L, C, H),
        "mlp.c_proj.bias": (L, C) if cfg.mlp_bias else None,
        "mlp.post_norm.weight": (L, C) if cfg.post_norms else None,  # of the MLP's output
        "mlp.post_norm.bias": (L, C) if cfg.post_norms and layernorm else None,
        "ln_f.weight": (C,),
        "ln_f.bias": (C,) if layernorm else None,
        "lm_head.weight": None if cfg.tie_embeddings else (V, C),
    }
    return {name: shape for name, shape in shapes.items() if shape is not None}


def _views(bk, flat, shapes: dict[str, tuple[int, ...]]) -> dict:
    """Named views of a flat array (either backend), in the order of `shapes`."""
    out, off = {}, 0
    for name, shape in shapes.items():
        out[name] = bk.view(flat, off, shape)
        off += math.prod(shape)
    return out


def _layers(bk, views: dict) -> dict:
    """name -> list of per-layer views for the tensors stacked over layers (L, ...); the others map to themselves."""
    out = {}
    for name, v in views.items():
        if _per_layer(name):
            per = math.prod(v.shape[1:])
            out[name] = [bk.view(v, l * per, tuple(v.shape[1:])) for l in range(v.shape[0])]
        else:
            out[name] = v
    return out


def _snapshot_layers(snap: dict) -> dict:
    """_layers of a CPU weight snapshot: bf16 arrays, ops.Bf16Panels, ops.Int8Weight or ops.Int8Panels, stacked over
    layers."""
    def split(v):
        if isinstance(v, ops.Int8Weight):
            return [ops.Int8Weight(q, s) for q, s in zip(v.q, v.scale)]
        if isinstance(v, ops.Int8Panels):
            return [ops.Int8Panels(d, s, w, v.cols) for d, s, w in zip(v.data, v.scale, v.wsum)]
        return [ops.Bf16Panels(d, v.rows) for d in v.data] if isinstance(v, ops.Bf16Panels) else list(v)

    return {n: split(v) if _per_layer(n) else v for n, v in snap.items()}


def _per_layer(name: str) -> bool:
    return name not in ("wte", "wpe", "lm_head.weight", TOKEN_TABLE) and not name.startswith("ln_f")


def check_token_ids(x, name: str, config: GPTConfig) -> np.ndarray:
    """x as a C-contiguous int32 (B, T) array with 0 < T <= block_size and every id in [0, vocab_size)
    (TypeError/ValueError naming `name`)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be integer token ids, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be (B, T), got shape {x.shape}")
    if x.shape[1] > config.block_size:
        raise ValueError(f"{name} has T={x.shape[1]} > block_size={config.block_size}")
    if x.shape[1] == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {x.shape}")
    if x.min() < 0 or x.max() >= config.vocab_size:
        raise ValueError(f"{name} holds token ids outside [0, {config.vocab_size})")
    return np.ascontiguousarray(x, np.int32)


def cache_length(config: GPTConfig, batch_size: int, max_len: int | None) -> int:
    """The checked length of a KV cache: max_len, or block_size when None."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = config.block_size if max_len is None else int(max_len)
    if not 1 <= n <= config.block_size:
        raise ValueError(f"max_len must be in [1, block_size={config.block_size}], got {max_len}")
    return n


def kv_chunk(config: GPTConfig) -> int | None:
    """The longest chunk a KV cache pass runs when the config has sliding layers: their smallest window (None:
    none slides). A ring of window + chunk - 1 rows is then enough (kv_rows_fit, csrc/common.h); a chunk of the
    window's length keeps the ring under twice the window while a chunk's matmuls still have window rows (for
    Gemma 3's 512: 1023 rows instead of 32k; attention per token is the same, each query sees <= window keys)."""
    windows = [config.window(l) for l in range(config.n_layer) if config.window(l) is not None]
    return min(windows) if windows else None


def kv_rows(config: GPTConfig, max_len: int) -> list[int]:
    """Cache rows of each layer for sequences of up to max_len tokens: max_len for a full layer, a ring of
    min(max_len, window + kv_chunk - 1) for a sliding one (KVCache, serve's kv_slot_bytes)."""
    chunk = kv_chunk(config)
    return [max_len if config.window(l) is None else min(max_len, config.window(l) + chunk - 1)
            for l in range(config.n_layer)]


MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")  # per block
WEIGHT_FORMS = ("bfloat16", "int8", "w8a8")  # the forms of a decode snapshot (GPT.decode_weights)
TOKEN_TABLE = "wte.bf16"  # a held snapshot's token embedding in bf16 (from a BF16 file: fastllm.hf), if it has one


def _aligned(n: int, like: np.ndarray) -> np.ndarray:
    """An uninitialised (n, *like.shape) array of like's dtype starting at a multiple of 64 bytes."""
    raw = ops.carve({"a": ((-(-n * like.nbytes // 4),), "int32")})["a"].view(np.uint8)[:n * like.nbytes]
    return raw.view(like.dtype).reshape(n, *like.shape)


def snapshot_convert(weights: str):
    """float32 matrices (..., OC, C) -> a decode snapshot's form: "bfloat16" (ops.Bf16Panels where the CPU's bf16
    GEMM wants them and C is even, else bf16 bits), "int8" (ops.Int8Weight) or "w8a8" (ops.Int8Panels)."""
    if weights == "bfloat16":  # (bf16 bits, uint16, are taken as they are)
        def bf16(w):
            bits = w if w.dtype == np.uint16 else ops.to_bf16(w)
            return ops.pack_bf16(bits) if ops.bf16_panels_preferred() and w.shape[-1] % 2 == 0 else bits

        return bf16
    return {"int8": ops.quantize_int8, "w8a8": ops.pack_int8}[weights]


def stacked_snapshot(convert, n: int, shape: tuple[int, ...], fill):
    """convert (snapshot_convert's) of n float32 matrices of `shape`, each written by fill(i, scratch) into one
    reused scratch, stacked on a leading axis of n as GPT._snapshot makes them from a stacked tensor: the peak is
    the result plus one float32 matrix (a model loaded with weights=, fastllm.hf), never a float32 copy of all n."""
    scratch = np.empty(shape, np.float32)
    out, part = None, None
    for i in range(n):
        fill(i, scratch)
        part = convert(scratch)
        fields = part if isinstance(part, tuple) else (part,)
        if out is None:  # 64-byte aligned, as the kernels' packers allocate theirs
            out = [_aligned(n, f) if isinstance(f, np.ndarray) else f for f in fields]
        for o, f in zip(out, fields):
            if isinstance(f, np.ndarray):
                o[i] = f
    return type(part)(*out) if isinstance(part, tuple) else out[0]


def decays(name: str) -> bool:
    """Weight decay applies to matrices (embeddings, linear weights, the lm-head, LoRA's A and B), not to biases and
    norm gains."""
    return name in ("wte", "wpe", "lm_head.weight") or name.endswith((*MATRICES, ".lora_A", ".lora_B"))


def norm_forward(bk, cfg: GPTConfig, x, weight, bias, out, mean, rstd) -> None:
    """The config's norm of x (N, C) into out: layernorm (weight, bias; saves mean, rstd) or rmsnorm (weight; saves
    rstd, mean unused)."""
    if cfg.norm == "rmsnorm":
        bk.rmsnorm_forward(x, weight, cfg.layernorm_eps, out=out, rstd=rstd)
    else:
        bk.layernorm_forward(x, weight, bias, cfg.layernorm_eps, out=out, mean=mean, rstd=rstd)


def norm_backward(bk, cfg: GPTConfig, dout, x, weight, mean, rstd, dx, dweight, dbias) -> None:
    """Gradients of norm_forward, accumulated into dx, dweight (and dbias for layernorm)."""
    if cfg.norm == "rmsnorm":
        bk.rmsnorm_backward(dout, x, weight, rstd, dx=dx, dweight=dweight)
    else:
        bk.layernorm_backward(dout, x, weight, mean, rstd, dx=dx, dweight=dweight, dbias=dbias)


def linears(bk, w: dict, pl: dict, lora, l: int, saved: dict | None = None):
    """Layer l's linear layers as one function linear(name, x, out, pre_gelu=None): out = x @ W^T + b, W from `w`
    (the model's matrices or a snapshot's), b from `pl`, plus scale * (x @ A^T) @ B^T where `lora` (a fastllm.lora
    Lora, or None) adapts the matrix (x @ A^T kept in saved["lora." + name][l] for the backward, when saved is
    given); lora may also be a LoraRuns (inference: an adapter per range of rows). pre_gelu: pre_gelu = that sum
    and out = gelu(it) (GELU fused into the GEMM when there is no adapter)."""
    def linear(name: str, x, out, pre_gelu=None) -> None:
        bias = _at(pl, name[:-len("weight")] + "bias", l)
        if lora is None or not lora.adapts(name):
            bk.matmul_forward(x, w[name][l], bias, out=out, pre_gelu=pre_gelu)
            return
        if isinstance(lora, LoraRuns):  # the base product over every row, then each adapter on its own rows
            bk.matmul_forward(x, w[name][l], bias, out=out, pre_gelu=pre_gelu)
            lora.forward(bk, name, l, x, out, pre_gelu)
            return
        raw = out if pre_gelu is None else pre_gelu
        bk.matmul_forward(x, w[name][l], bias, out=raw)
        lora.forward(bk, name, l, x, raw, None if saved is None else saved["lora." + name][l])
        if pre_gelu is not None:
            bk.gelu_forward(raw, out=out)

    return linear


def mlp_forward(bk, cfg: GPTConfig, linear, x, fch, fch_act, out) -> None:
    """out = c_proj(act(c_fc(x))) with `linear` (see linears); saves fch (the c_fc output: (N, 2H) [gate | up] for
    swiglu, else (N, H)) and fch_act (N, H). GELU runs fused into the matmul (its epilogue on the GPU)."""
    if cfg.mlp == "gelu":
        linear("mlp.c_fc.weight", x, fch_act, pre_gelu=fch)
    else:
        linear("mlp.c_fc.weight", x, fch)
        getattr(bk, f"{cfg.mlp}_forward")(fch, out=fch_act)
    linear("mlp.c_proj.weight", fch_act, out)


def post_norm_forward(bk, cfg: GPTConfig, layers: dict, branch: str, l: int, raw, out, mean, rstd) -> None:
    """Gemma 2/3: out = the norm of a branch's output raw (branch "attn" or "mlp", layer l), before the residual
    add."""
    norm_forward(bk, cfg, raw, layers[f"{branch}.post_norm.weight"][l], _at(layers, f"{branch}.post_norm.bias", l),
                 out, mean, rstd)


def pre_norm(bk, cfg: GPTConfig, layers: dict, name: str, l: int, x, out, mean, rstd):
    """A branch's input: the norm `name` ("ln_1" or "ln_2") of layer l applied to x, into out; x itself where the
    config has no pre-norms (OLMo 2: out, mean, rstd are then None)."""
    if not cfg.pre_norms:
        return x
    norm_forward(bk, cfg, x, layers[f"{name}.weight"][l], _at(layers, f"{name}.bias", l), out, mean, rstd)
    return out


def qk_norm_stats(cfg: GPTConfig, B: int, T: int) -> tuple[tuple, tuple]:
    """The shapes of QK-norm's q and k statistics (rstd) for a (B, T) batch: per head, or one per token."""
    if cfg.qk_norm_over == "head":
        return (B, T, cfg.n_head), (B, T, cfg.kv_heads)
    return (B, T), (B, T)


def _qk_norm_parts(cfg: GPTConfig) -> list[tuple[str, dict]]:
    """(weight name, rmsnorm's heads= or cols=) of QK-norm's q and k parts of the packed qkv (B, T, W)."""
    NH, NKV, hd = cfg.n_head, cfg.kv_heads, cfg.head_size
    if cfg.qk_norm_over == "head":  # the head rows of qkv viewed as (B, T, NH + 2 NKV, hd)
        return [("attn.q_norm.weight", dict(heads=(0, NH))), ("attn.k_norm.weight", dict(heads=(NH, NH + NKV)))]
    q, k = NH * hd, NKV * hd  # all q channels, then all k channels
    return [("attn.q_norm.weight", dict(cols=(0, q))), ("attn.k_norm.weight", dict(cols=(q, q + k)))]


def _qk_view(cfg: GPTConfig, x):
    """qkv (B, T, W) as QK-norm's kernels take it: (B, T, NH + 2 NKV, hd) per head, itself for "all"."""
    B, T, W = x.shape
    return x.reshape((B, T, W // cfg.head_size, cfg.head_size)) if cfg.qk_norm_over == "head" else x


def qk_norm_forward(bk, cfg: GPTConfig, layers: dict, l: int, raw, out, rstds) -> None:
    """Layer l's QK-norm of the packed qkv raw (B, T, W) into out (raw itself, or a copy of it: the v rows are not
    written); rstds: the q and k statistics (qk_norm_stats' shapes)."""
    for (name, part), rstd in zip(_qk_norm_parts(cfg), rstds):
        bk.rmsnorm_forward(_qk_view(cfg, raw), layers[name][l], cfg.layernorm_eps, out=_qk_view(cfg, out),
                           rstd=rstd, **part)


def qk_norm_backward(bk, cfg: GPTConfig, layers: dict, grads: dict, l: int, raw, dqkv, rstds) -> None:
    """In place: the q and k rows of dqkv (B, T, W) become the gradients of the raw projection (the v rows pass);
    the norms' weight gradients accumulate into grads."""
    for (name, part), rstd in zip(_qk_norm_parts(cfg), rstds):
        d = _qk_view(cfg, dqkv)
        bk.rmsnorm_backward(d, _qk_view(cfg, raw), layers[name][l], rstd, dx=d, dweight=grads[name][l], **part)


def _at(layers: dict, name: str, l: int):
    """Layer l's view of a per-layer tensor, or None when the config has no such tensor (a disabled bias)."""
    v = layers.get(name)
    return None if v is None else v[l]


class GPT:
    """The transformer on one device, with a flat parameter buffer `params`, gradients `grads`, and named views `p`,
    `g` (names in param_shapes).

    device: "cpu" (numpy) or "cuda"; dtype: the compute dtype, "float32" or "bfloat16" (the default on the GPU),
    with fp32 master weights, gradients and optimizer state either way. On the GPU bfloat16 means bf16 weights
    (a compute copy) and activations; on the CPU it means bf16 matmuls (backend.CpuBf16: operands rounded to bf16
    inside the GEMM, fp32 everywhere else). The weights are initialised on the host with `seed` (the same numbers
    on every device), then placed."""

    def __init__(self, config: GPTConfig, seed: int = 0, init: bool = True, device: str = "cpu",
                 dtype: str | None = None):
        self.config = config
        self.shapes = param_shapes(config)
        self.num_parameters = sum(math.prod(s) for s in self.shapes.values())
        self.training = True
        self.lora = None  # LoRA adapters (fastllm.lora.Lora; add_lora): then they train and the rest is frozen
        self.lora_off = False  # inside without_lora()
        host = np.zeros(self.num_parameters, np.float32)
        if init:
            init_weights(_views(ops, host, self.shapes), config, seed)
        self._place(host, device, dtype)

    def _place(self, host: np.ndarray, device: str, dtype: str | None) -> None:
        """Allocate the parameters on `device` from the flat float32 host array; gradients and activations are
        allocated on first use."""
        self.device, self.dtype = device, backend.check_dtype(device, dtype)
        self.bk = backend.get(device, self.dtype)
        self.act_dtype = backend.storage_dtype(device, self.dtype)  # of the compute copy and the activations
        self.params = self.bk.to_device(host) if device != "cpu" else host
        self.cparams = self.params if self.act_dtype == "float32" else self.bk.to_device(host, self.act_dtype)
        self.p = _views(self.bk, self.params, self.shapes)  # float32 master weights
        self.pc = _views(self.bk, self.cparams, self.shapes)  # the compute copy the kernels read
        self._pl = _layers(self.bk, self.pc)
        self.rope = None  # (cos, sin) tables (block_size, rotary dims // 2) for positions="rope", on the device
        self.ropes: list = [None] * self.config.n_layer  # each layer's tables (Gemma 3's sliding layers have their
        # own); None: no RoPE (learned positions, NoPE layers)
        cfg = self.config
        if cfg.positions == "rope":
            def tables(theta: float, scaling: dict | None) -> tuple:
                freq = rope.inv_freq(cfg.head_size, theta, scaling, cfg.partial_rotary_factor)
                cos, sin = rope.rope_tables(freq, cfg.block_size, rope.attention_scaling(scaling))
                return self.bk.to_device(cos), self.bk.to_device(sin)

            self.rope = tables(cfg.rope_theta, cfg.rope_scaling)
            local = self.rope if cfg.rope_local_theta is None else tables(cfg.rope_local_theta, None)
            self.ropes = [None if not cfg.has_rope(l) else self.rope if cfg.window(l) is None else local
                          for l in range(cfg.n_layer)]
        # each layer's attention options (the kernels' keyword arguments)
        self.attn_options = [dict(scale=cfg.attn_scale, softcap=cfg.attn_softcap, window=cfg.window(l))
                             for l in range(cfg.n_layer)]
        self.grads = None
        self._g: dict = {}
        self._gl: dict = {}
        self._acts: dict | None = None
        self._BT: tuple[int, int] | None = None
        self._ready_for_backward = False  # a training forward with targets computed the lm-head gradient
        self._trunk_ready = False  # the trunk's activations are saved (training mode)
        self.token_losses: np.ndarray | None = None
        self._decoding: tuple[dict, dict] | None = None  # (snapshot, its per-layer views) inside decoding()
        self.weights_only: str | None = None  # "bfloat16" | "int8" | "w8a8": the matrices are held in that form
        # alone (hold_weights: inference only)
        self._frozen_grads: tuple[dict, dict] | None = None  # where a frozen base's norm gradients go (backward)
        if self.lora is not None:  # (moved with the model)
            self.lora._place(self, self.lora.host_params())

    # ---- Hugging Face format (fastllm.hf) ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, device: str = "cpu", dtype: str | None = None, weights: str | None = None) -> GPT:
        """Load a transformers folder (config.json + model.safetensors, or shards); see fastllm.hf. weights
        ("bfloat16", "int8", "w8a8"; CPU): hold the matrices in that decode form alone, for inference in half the
        memory or less (fastllm.hf.from_pretrained)."""
        from .hf import from_pretrained  # hf imports this module

        return from_pretrained(path, cls, weights).to(device, dtype)

    def save_pretrained(self, path, tokenizer=None, max_shard_bytes: int | None = None,
                        max_shard_size: int | str | None = None):
        """Write a folder transformers' from_pretrained loads (plus tokenizer.json if given); max_shard_size as in
        transformers ("5GB"; default: one file); see fastllm.hf."""
        from .hf import save_pretrained

        return save_pretrained(self, path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes,
                               max_shard_size=max_shard_size)

    # ---- parameters and devices -------------------------------------------------------------------------

    def to(self, device: str, dtype: str | None = None) -> GPT:
        """Move the model to `device` ("cpu" or "cuda") and compute dtype, in place, and return it (like torch's
        Module.to). Parameters are copied; gradients and activations are not (make the optimizer after)."""
        dtype = backend.check_dtype(device, dtype)
        if (device, dtype) == (self.device, self.dtype):
            return self
        if self.weights_only is not None and device == "cpu":  # matrices held in a decode form: the compute dtype
            held = self._decoding, self.weights_only  # alone changes (a CPU model's arrays are float32 either way)
            self._place(self.params, device, dtype)
            self._decoding, self.weights_only = held
        else:
            self._place(self._host_params(), device, dtype)
        return self

    def _host_params(self) -> np.ndarray:
        """The flat float32 master parameters as a numpy array (the array itself on the CPU)."""
        self._check_float32(".to(), state_dict(), saving")
        return self.params if self.device == "cpu" else self.bk.to_numpy(self.params)

    def _check_float32(self, what: str) -> None:
        """ValueError where the model holds its matrices in a decode form only (hold_weights): `what` needs them."""
        if self.weights_only is not None:
            raise ValueError(f"{what}: this model holds its matrices in {self.weights_only} only (loaded with "
                             f"weights={self.weights_only!r}: inference only); load it without weights= for this")

    def _token_table(self):
        """The token embedding the kernels read: wte, or the bf16 copy a held snapshot has of it (TOKEN_TABLE)."""
        return self.pc["wte"] if self._decoding is None else self._decoding[0].get(TOKEN_TABLE, self.pc["wte"])

    def hold_weights(self, snapshot: dict, weights: str) -> GPT:
        """From now on every pass runs on `snapshot` (a decode snapshot of form `weights`, as
        bf16_weights / int8_weights / w8a8_weights make, or fastllm.hf builds while loading), and the float32
        matrices are not kept (their part of `params` is never read again: loading with weights= never writes it,
        so those pages are never touched; nor the token embedding's where the snapshot has it as bf16 bits,
        TOKEN_TABLE). Training the weights, saving, state_dict() and .to() another device raise ValueError naming it;
        LoRA adapters (add_lora) train over the held matrices."""
        if weights not in WEIGHT_FORMS or self.device != "cpu":
            raise ValueError(f"hold_weights needs a CPU model and weights in {WEIGHT_FORMS}, got {weights!r} on "
                             f"{self.device}")
        self.weights_only, self.training = weights, False
        self._decoding = (snapshot, _snapshot_layers(snapshot))
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """{name: float32 numpy array} of every parameter tensor (named like GPT.p), on the host (views of the
        parameters on the CPU, copies from the GPU)."""
        return _views(ops, self._host_params(), self.shapes)

    def load_state_dict(self, tensors: dict, where: str = "state_dict") -> GPT:
        """Copy parameter tensors in: every name of GPT.p must be present with its exact shape, a float dtype and
        finite values, and no other name (ValueError naming `where` and the tensor otherwise). Returns self."""
        self._check_float32("load_state_dict")
        unexpected = sorted(set(tensors) - set(self.shapes))
        if unexpected:
            raise ValueError(f"{where}: tensors {unexpected} are not parameters of this config "
                             f"(expected {list(self.shapes)})")
        host = np.empty(self.num_parameters, np.float32)
        checks.fill_tensors(_views(ops, host, self.shapes), tensors, where)
        self.bk.copy_(self.params, host)
        self._sync_compute_copy()
        return self

    def _sync_compute_copy(self) -> None:
        if self.cparams is not self.params:
            self.bk.copy_(self.cparams, self.params)  # float32 -> bfloat16, round to nearest even

    def named_parameters(self):
        """(name, array view) per tensor with per-layer names like 'h.3.attn.c_attn.weight'."""
        self._check_float32("named_parameters()")
        per = _layers(self.bk, self.p)
        for name, arr in per.items():
            if isinstance(arr, list):
                for layer, a in enumerate(arr):
                    yield f"h.{layer}.{name}", a
            else:
                yield name, arr

    def _ensure_grads(self):
        """The flat gradient buffer, allocated (zeroed) on first use: inference needs none."""
        self._check_float32("gradients")
        if self.grads is None:
            self.grads = self.bk.zeros((self.num_parameters,), "float32")
            self._g = _views(self.bk, self.grads, self.shapes)
            self._gl = _layers(self.bk, self._g)
        return self.grads

    @property
    def g(self) -> dict:
        """Named views of the gradients."""
        self._ensure_grads()
        return self._g

    def zero_grad(self) -> None:
        """Zero the gradients of what trains (trainable())."""
        t = self.trainable()
        t.bk.zero_(t._ensure_grads())

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients of what trains (trainable())."""
        t = self.trainable()
        return t.bk.global_norm(t._ensure_grads())

    def trainable(self):
        """What backward() computes gradients for and an optimizer updates: the model itself, or its LoRA adapters
        when it has them (the base is frozen then). Both have params, grads, shapes, num_parameters."""
        return self if self.lora is None else self.lora

    # ---- LoRA (fastllm.lora) -----------------------------------------------------------------------------

    def add_lora(self, config=None, seed: int = 0, ranks: dict | None = None, rows: dict | None = None, **kw):
        """Give the model LoRA adapters (a fastllm.lora.LoraConfig, or its fields: r=16, alpha=32, targets=("all",),
        rslora=False) and freeze everything else: from now on backward() computes the adapters' gradients only and
        an optimizer made after this trains them. ranks, rows: as fastllm.lora.Lora's (an adapter read from a file:
        fastllm.hf.load_adapter). Returns the Lora (model.lora). On a model holding its matrices in a decode form
        (hold_weights) the adapters stay float32 beside them, and train over them (the held matrices frozen as
        they are: LoRA over a bf16 or int8 base, as peft over a bf16 or 8-bit model)."""
        if self.lora is not None:
            raise ValueError("the model has LoRA adapters already (merge_lora() first to add new ones)")
        if config is None:
            config = LoraConfig(**kw)
        elif kw:
            raise TypeError("add_lora takes a LoraConfig or its fields, not both")
        self.lora = Lora(self, config, seed, ranks, rows)
        self.lora.base = getattr(self, "checkpoint_dir", None)  # the folder of the frozen weights (checkpoints name it)
        self._acts, self._BT = None, None  # the adapters' activations, and no lm-head gradient any more
        return self.lora

    @contextlib.contextmanager
    def without_lora(self):
        """Within: inference passes run the base model alone, its adapters left out (GRPO's reference policy is the
        model before fine-tuning: no second copy of its weights). Inference only: eval mode inside."""
        prev = self.lora_off, self.training
        self.lora_off, self.training = True, False
        try:
            yield self
        finally:
            self.lora_off, self.training = prev

    @contextlib.contextmanager
    def with_lora(self, lora):
        """Within: inference passes run with `lora` -- a Lora made for this model but not attached to it
        (fastllm.hf.load_adapter(..., attach=False)), or None -- in place of the model's own adapters (a server's
        adapter per request, fastllm.serve). Inference only: eval mode inside."""
        prev = self.lora, self.training
        self.lora, self.training, self._acts, self._BT = lora, False, None, None  # (activations sized for its ranks)
        try:
            yield self
        finally:
            self.lora, self.training = prev
            self._acts, self._BT = None, None

    def merge_lora(self) -> GPT:
        """Fold the adapters into the weights (W += scale * B @ A, in float32) and drop them: a plain model again,
        computing what it computed with them (up to float32 rounding). Returns self."""
        if self.lora is None:
            raise ValueError("merge_lora: the model has no LoRA adapters")
        self._check_float32("merge_lora")
        host = self._host_params().copy() if self.device != "cpu" else self.params
        p = _views(ops, host, self.shapes)
        for m in self.lora.ranks:
            for l in range(self.config.n_layer):
                p[m][l] += self.lora.delta(m, l)
        self.lora, self._acts, self._BT = None, None, None
        if host is not self.params:
            self.bk.copy_(self.params, host)
        self._sync_compute_copy()
        return self

    def train(self, mode: bool = True) -> GPT:
        if mode and self.lora is None:  # (adapters train over matrices held in bf16 or int8 too)
            self._check_float32("training")
        self.training = mode
        return self

    def eval(self) -> GPT:
        return self.train(False)

    # ---- activations ------------------------------------------------------------------------------------

    def _activations(self, B: int, T: int) -> dict:
        """Buffers for a (B, T) batch, views of one allocation; per-layer tensors come as lists of (B*T, X) views
        of an (L, B*T, X) region."""
        if self._BT == (B, T) and self._acts is not None:
            return self._acts
        self._acts = None  # free the old set before allocating the new one
        cfg, bk = self.config, self.bk
        L, C, NH, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.vocab_size
        W, A, H, F = cfg.qkv_width, NH * cfg.head_size, cfg.mlp_width, cfg.fc_width  # F: c_fc's output width
        N, dt, f32 = B * T, self.act_dtype, "float32"
        per_layer = {  # name: (width, dtype)
            "qkv": (W, dt), "atty": (A, dt), "att_lse": (NH, f32), "residual2": (C, dt), "fch": (F, dt),
            "fch_act": (H, dt), "residual3": (C, dt),
        }
        if cfg.pre_norms:  # each branch's normed input and the norm's statistics
            for n in ("ln1", "ln2"):
                per_layer.update({n: (C, dt), f"{n}_mean": (1, f32), f"{n}_rstd": (1, f32)})
        q_stats, k_stats = qk_norm_stats(cfg, B, T)
        if cfg.qk_norm:  # the q/k/v projection before the norm (the backward's input), the norms' statistics
            per_layer.update(qkv_raw=(W, dt), q_rstd=(math.prod(q_stats) // N, f32),
                             k_rstd=(math.prod(k_stats) // N, f32))
        if cfg.post_norms:  # each branch's output before its post-norm, and the norm's statistics
            for branch in ("attn", "mlp"):
                per_layer.update({f"{branch}_raw": (C, dt), f"{branch}_post_mean": (1, f32),
                                  f"{branch}_post_rstd": (1, f32)})
        if self.lora is not None:
            per_layer.update({f"lora.{m}": (r, dt) for m, r in self.lora.ranks.items()})
        specs = {k: ((L, N * w), d) for k, (w, d) in per_layer.items()}
        specs.update({
            "idx": ((B, T), "int32"), "targets": ((N,), "int32"), "row_weights": ((N,), f32),
            "encoded": ((N, C), dt), "attproj": ((N, C), dt), "fcproj": ((N, C), dt),  # scratch until the add
            "lnf": ((N, C), dt), "lnf_mean": ((N,), f32), "lnf_rstd": ((N,), f32), "losses": ((N,), f32),
            "lm_scratch": ((bk.lmhead_chunk_rows(N, V, dt), V), dt),
            # gradient scratch, reused by every layer
            "dres": ((N, C), dt), "dlnf": ((N, C), dt), "dfch_act": ((N, H), dt), "dfch": ((N, F), dt),
            "dln": ((N, C), dt), "datty": ((N, A), dt), "dqkv": ((N, W), dt), "dpost": ((N, C), dt),
        })
        if self.lora is None:  # the lm-head's gradient, added to g[self.head] by backward() (frozen with LoRA)
            specs["dhead"] = ((V, C), f32)
        else:  # each adapted matrix's x @ A^T (per layer, above), and the gradient scratch for it
            specs["lora_dt"] = ((N, max(self.lora.ranks.values())), dt)
        if cfg.residual_scale:  # a branch's output gradient: the stream's times the scale (Granite)
            specs["dbranch"] = ((N, C), dt)
        if cfg.parallel_residual:  # the MLP's input gradient, added to the stream's after the attention half
            specs["dres_mlp"] = ((N, C), dt)
        a = bk.carve(specs)
        shapes = {k: (N, w) for k, (w, _) in per_layer.items()}
        shapes.update({k: (N,) for k in per_layer if k.endswith(("_mean", "_rstd"))}, att_lse=(B, NH, T))
        if cfg.qk_norm:
            shapes.update(q_rstd=q_stats, k_rstd=k_stats)
        for k in per_layer:  # per-layer views, shaped as the kernels take them
            a[k] = [bk.view(a[k], l * math.prod(shapes[k]), shapes[k]) for l in range(L)]
        self._acts, self._BT = a, (B, T)
        return a

    @property
    def head(self) -> str:
        """The name of the lm-head's weight: "wte" (tied) or "lm_head.weight"."""
        return "wte" if self.config.tie_embeddings else "lm_head.weight"

    # ---- forward ----------------------------------------------------------------------------------------

    def forward(self, idx, targets=None, weights=None, temperature: float = 1.0):
        """idx (B, T) token ids -> logits (B, T, V) (a float32 numpy array; soft-capped if the config says so) if
        targets is None, else the mean loss (float) over targets != -1 (ignore index). In training mode a forward
        with targets also computes the gradient of the fused lm-head + cross-entropy, which backward() then uses.

        weights (B, T) float (optional, with targets): the objective becomes the weighted SUM
        sum_{b,t} weights[b, t] * CE[b, t] over targets != -1 (no 1/n), and that is what is returned and
        backpropagated. Policy gradients use it: with weights = -A_t the gradient is that of
        -sum_t A_t log p(a_t). After any forward with targets, self.token_losses (B, T) holds the per-token
        CE = -log p(target) (0 where ignored). weights may also be a function of those token losses (float32 (B, T))
        returning the weights: objectives whose per-token weights depend on the sequence's own log-probs (DPO) --
        the lm-head then runs twice (losses, then the weighted gradient), the trunk once.

        temperature T (> 0; 1: none): the logits (after the soft cap and the config's logits_scaling) are divided by
        T, as fastllm.sample does before it draws: the logits returned, the losses, token_losses and the gradient
        are those of softmax(logits / T), the distribution sampling at T draws from (RL's log-probs, rl.py)."""
        bk, pc, V, cap = self.bk, self.pc, self.config.vocab_size, self.config.logit_softcap
        temperature = ops.temperature_arg(temperature) * (self.config.logits_scaling or 1.0)  # (Granite's divisor)
        a = self._trunk(idx)
        B, T = self._BT
        N = B * T
        self._ready_for_backward = False
        head = pc[self.head] if self._decoding is None else self._decoding[0][self.head]
        if targets is None:
            logits = bk.matmul_forward(a["lnf"], head, out=bk.empty((N, V), "float32"))
            logits = softcap_logits(bk.to_numpy(logits), cap)
            if temperature != 1.0:
                logits = logits / np.float32(temperature)
            return logits.reshape(B, T, V)
        targets = np.asarray(targets)
        if not np.issubdtype(targets.dtype, np.integer):
            raise TypeError(f"targets must be integer token ids, got dtype {targets.dtype}")
        if targets.shape != (B, T):
            raise ValueError(f"targets must have the shape of idx {(B, T)}, got {targets.shape}")
        valid = targets != IGNORE_INDEX
        if ((targets < 0) | (targets >= V))[valid].any():
            raise ValueError(f"targets hold ids outside [0, {V}) (other than the ignore index {IGNORE_INDEX})")
        bk.copy_(a["targets"], targets.reshape(N).astype(np.int32))
        rw = None
        head_args = dict(scratch=a["lm_scratch"], losses=a["losses"], softcap=cap, temperature=temperature)
        if callable(weights):  # the weights of this forward's own token losses: read them first
            bk.lmhead_ce(a["lnf"], head, a["targets"], backward=False, **head_args)
            weights = weights(np.array(bk.to_numpy(a["losses"]), np.float32).reshape(B, T))
        if weights is None:
            scale = 1.0 / max(int(np.count_nonzero(valid)), 1)
        else:
            weights = np.asarray(weights)
            if weights.shape != (B, T):
                raise ValueError(f"weights must have the shape of idx {(B, T)}, got {weights.shape}")
            if not np.isfinite(weights).all():
                raise ValueError("weights must be finite")
            weights = np.ascontiguousarray(weights, np.float32)
            rw, scale = a["row_weights"], 1.0
            bk.copy_(rw, weights.reshape(N))
        dhead = a.get("dhead")  # (None: the lm-head is frozen, LoRA)
        if self.training:
            bk.zero_(a["dlnf"])
            if dhead is not None:
                bk.zero_(dhead)
        if self._decoding is None or self.training:  # (training: the frozen lm-head of a held model too)
            bk.lmhead_ce(a["lnf"], head, a["targets"], grad_scale=scale, backward=self.training,
                         dhidden=a["dlnf"], dweight=dhead, row_weights=rw, need_weight=dhead is not None, **head_args)
        else:  # a snapshot's lm-head (inference): its logits, then the loss
            logits = bk.matmul_forward(a["lnf"], head, out=bk.empty((N, V), "float32"))
            bk.softmax_ce(logits, a["targets"], backward=False, losses=a["losses"], softcap=cap,
                          temperature=temperature)
        self._ready_for_backward = self.training
        losses = np.array(bk.to_numpy(a["losses"]), np.float32).reshape(B, T)  # the step's one readback
        self.token_losses = losses
        if weights is None:
            return float(losses.sum(dtype=np.float64) * scale)
        return float(np.dot(losses.astype(np.float64).ravel(), weights.astype(np.float64).ravel()))

    __call__ = forward

    def hidden_states(self, idx) -> np.ndarray:
        """Final hidden states (B, T, C) (after ln_f, before the lm-head) as float32 numpy (on the CPU a view of the
        activation buffer, valid until the next forward). In training mode, backward(dhidden=...) can follow
        (heads of your own, e.g. the reward model's scalar head in rl.py)."""
        a = self._trunk(idx)
        self._ready_for_backward = False
        B, T = self._BT
        return self.bk.to_numpy(a["lnf"]).reshape(B, T, self.config.n_embd)

    def _trunk(self, idx) -> dict:
        """Embedding, blocks and final norm: fills the activations up to lnf (B*T, C). Inside decoding() the four
        matrices of each block are the snapshot's."""
        cfg, bk, pc, pl = self.config, self.bk, self.pc, self._pl
        if self._decoding is not None and self.training and self.weights_only is None:
            raise RuntimeError("model.decoding(...) is for inference: the snapshot has no gradient (call eval())")
        w = pl if self._decoding is None else self._decoding[1]
        idx = check_token_ids(idx, "idx", cfg)
        B, T = idx.shape
        C, NH, NKV, hd, W = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.qkv_width
        a = self._activations(B, T)
        bk.copy_(a["idx"], idx)
        self._trunk_ready = self.training  # activations saved for a backward(dhidden=...)

        bk.embedding_forward(a["idx"], self._token_table(), pc.get("wpe"), out=a["encoded"].reshape((B, T, C)),
                             scale=cfg.embed_scale or 1.0)
        residual = a["encoded"]
        for l in range(cfg.n_layer):
            h = pre_norm(bk, cfg, pl, "ln_1", l, residual, *(_at(a, k, l) for k in ("ln1", "ln1_mean", "ln1_rstd")))
            # qkv = [q | k | v] = h @ W^T (+ b), then QK-norm (Qwen3, OLMo 2) and RoPE on the q and k heads
            linear = linears(bk, w, pl, None if self.lora_off else self.lora, l, a)
            qkv = a["qkv"][l]
            raw = a["qkv_raw"][l] if cfg.qk_norm else qkv  # QK-norm's input, kept for the backward
            linear("attn.c_attn.weight", h, raw)
            if cfg.qk_norm:
                bk.copy_(qkv, raw)  # the v rows; the norms below overwrite the q and k rows
                qk_norm_forward(bk, cfg, pl, l, raw.reshape((B, T, W)), qkv.reshape((B, T, W)),
                                (a["q_rstd"][l], a["k_rstd"][l]))
            if self.ropes[l] is not None:
                bk.rope_forward(qkv.reshape((B, T, W)), *self.ropes[l], NH, out=qkv.reshape((B, T, W)),
                                n_kv_head=NKV)
            bk.attention_forward(qkv.reshape((B, T, W)), NH, out=a["atty"][l].reshape((B, T, NH * hd)),
                                 lse=a["att_lse"][l], n_kv_head=NKV, **self.attn_options[l])
            linear("attn.c_proj.weight", a["atty"][l], a["attn_raw"][l] if cfg.post_norms else a["attproj"])
            if cfg.post_norms:
                post_norm_forward(bk, cfg, pl, "attn", l, a["attn_raw"][l], a["attproj"], a["attn_post_mean"][l],
                                  a["attn_post_rstd"][l])
            bk.residual_forward(residual, a["attproj"], out=a["residual2"][l], scale=cfg.residual_scale or 1.0)
            # the MLP reads residual2, or (parallel residual) the block's input as the attention did
            h = pre_norm(bk, cfg, pl, "ln_2", l, residual if cfg.parallel_residual else a["residual2"][l],
                         *(_at(a, k, l) for k in ("ln2", "ln2_mean", "ln2_rstd")))
            mlp_forward(bk, cfg, linear, h, a["fch"][l], a["fch_act"][l],
                        a["mlp_raw"][l] if cfg.post_norms else a["fcproj"])
            if cfg.post_norms:
                post_norm_forward(bk, cfg, pl, "mlp", l, a["mlp_raw"][l], a["fcproj"], a["mlp_post_mean"][l],
                                  a["mlp_post_rstd"][l])
            bk.residual_forward(a["residual2"][l], a["fcproj"], out=a["residual3"][l], scale=cfg.residual_scale or 1.0)
            residual = a["residual3"][l]
        norm_forward(bk, cfg, residual, pc["ln_f.weight"], pc.get("ln_f.bias"), a["lnf"], a["lnf_mean"],
                     a["lnf_rstd"])
        return a

    # ---- backward ---------------------------------------------------------------------------------------

    def backward(self, dhidden=None) -> None:
        """Accumulate (+=) the gradient of the last forward's loss into self.grads.

        dhidden (B, T, C): instead start from this gradient on the final hidden states of the last
        forward / hidden_states() (i.e. backpropagate sum(dhidden * hidden)); the lm-head is not involved."""
        cfg, bk, pc, pl, a = self.config, self.bk, self.pc, self._pl, self._acts
        w = pl if self._decoding is None else self._decoding[1]  # the matrices (held in bf16/int8: frozen, LoRA)
        if dhidden is None:
            if not self._ready_for_backward:
                raise RuntimeError("backward() needs a forward(idx, targets) in training mode first")
        else:
            if not self._trunk_ready:
                raise RuntimeError("backward(dhidden=...) needs hidden_states(idx) in training mode first")
            B, T = self._BT
            dhidden = np.asarray(dhidden)
            if dhidden.shape != (B, T, cfg.n_embd):
                raise ValueError(f"dhidden must have shape {(B, T, cfg.n_embd)}, got {dhidden.shape}")
            bk.copy_(a["dlnf"], np.ascontiguousarray(dhidden, np.float32).reshape(B * T, cfg.n_embd))
        self._ready_for_backward = self._trunk_ready = False
        g, gl = (self.g, self._gl) if self.lora is None else self._norm_sinks()  # (LoRA: only norms', discarded)
        B, T = self._BT
        L, NH, NKV, C, hd = cfg.n_layer, cfg.n_head, cfg.kv_heads, cfg.n_embd, cfg.head_size
        W, A = cfg.qkv_width, NH * hd
        act_backward = getattr(bk, f"{cfg.mlp}_backward")

        def linear_backward(dout, inp, name, l, dinp):  # a linear layer's gradients: its weight's and bias's where
            # they train, its adapter's where it has one
            weight, bias = gl.get(name), gl.get(name[:-len("weight")] + "bias")
            bk.matmul_backward(dout, inp, w[name][l], dinp=dinp, dweight=None if weight is None else weight[l],
                               dbias=None if bias is None else bias[l], need_bias=bias is not None,
                               need_weight=weight is not None)
            if self.lora is not None and self.lora.adapts(name):
                r = self.lora.ranks[name]
                self.lora.backward(bk, name, l, dout, inp, dinp, a["lora." + name][l],
                                   bk.view(a["lora_dt"], 0, (B * T, r)))

        def branch_grad(branch, l):  # the gradient of a branch's output (before its post-norm: Gemma 2/3, OLMo 2)
            d = dres
            if cfg.residual_scale:  # (Granite: the branch joined the stream times the scale)
                bk.zero_(a["dbranch"])
                bk.residual_forward(a["dbranch"], dres, out=a["dbranch"], scale=cfg.residual_scale)
                d = a["dbranch"]
            if not cfg.post_norms:
                return d
            bk.zero_(a["dpost"])
            norm_backward(bk, cfg, d, a[f"{branch}_raw"][l], pl[f"{branch}.post_norm.weight"][l],
                          a[f"{branch}_post_mean"][l], a[f"{branch}_post_rstd"][l], a["dpost"],
                          gl[f"{branch}.post_norm.weight"][l], _at(gl, f"{branch}.post_norm.bias", l))
            return a["dpost"]

        if dhidden is None and self.head in g:
            bk.add_(g[self.head], a["dhead"])
        dres = a["dres"]  # gradient of the residual stream, flowing down through the layers
        bk.zero_(dres)
        norm_backward(bk, cfg, a["dlnf"], a["residual3"][L - 1], pc["ln_f.weight"], a["lnf_mean"], a["lnf_rstd"],
                      dres, g["ln_f.weight"], g.get("ln_f.bias"))
        for l in reversed(range(L)):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            # MLP half: residual3 = residual2 + c_proj(act(c_fc(ln2(mlp_in)))), mlp_in = residual2 or (parallel
            # residual) the block's input, whose gradient dmlp_in is then kept apart: dres, the gradient of residual2,
            # is also that of the attention's output, and the MLP's input gradient is no part of it
            mlp_in, dmlp_in = (residual, a["dres_mlp"]) if cfg.parallel_residual else (a["residual2"][l], dres)
            for k in ("dfch_act", "dfch", "dln", *(("dres_mlp",) if cfg.parallel_residual else ())):
                bk.zero_(a[k])
            linear_backward(branch_grad("mlp", l), a["fch_act"][l], "mlp.c_proj.weight", l, a["dfch_act"])
            act_backward(a["dfch_act"], a["fch"][l], a["dfch"])
            if cfg.pre_norms:
                linear_backward(a["dfch"], a["ln2"][l], "mlp.c_fc.weight", l, a["dln"])
                norm_backward(bk, cfg, a["dln"], mlp_in, pl["ln_2.weight"][l], a["ln2_mean"][l],
                              a["ln2_rstd"][l], dmlp_in, gl["ln_2.weight"][l], _at(gl, "ln_2.bias", l))
            else:  # the branch read the residual stream: its input gradient adds to the stream's
                linear_backward(a["dfch"], mlp_in, "mlp.c_fc.weight", l, dmlp_in)
            # attention half: residual2 = residual + c_proj(attn(rope(qk_norm(c_attn(ln1(residual))))))
            for k in ("datty", "dqkv", "dln"):
                bk.zero_(a[k])
            linear_backward(branch_grad("attn", l), a["atty"][l], "attn.c_proj.weight", l, a["datty"])
            dqkv = a["dqkv"].reshape((B, T, W))
            bk.attention_backward(a["datty"].reshape((B, T, A)), a["qkv"][l].reshape((B, T, W)),
                                  a["atty"][l].reshape((B, T, A)), a["att_lse"][l], NH, dqkv=dqkv, n_kv_head=NKV,
                                  **self.attn_options[l])
            if self.ropes[l] is not None:  # rotate the q, k gradients back, in place
                bk.rope_backward(dqkv, *self.ropes[l], NH, dqkv=dqkv, n_kv_head=NKV)
            if cfg.qk_norm:  # in place: the q and k rows become the gradients of the raw projection, v passes
                qk_norm_backward(bk, cfg, pl, gl, l, a["qkv_raw"][l].reshape((B, T, W)), dqkv,
                                 (a["q_rstd"][l], a["k_rstd"][l]))
            if cfg.pre_norms:
                linear_backward(a["dqkv"], a["ln1"][l], "attn.c_attn.weight", l, a["dln"])
                norm_backward(bk, cfg, a["dln"], residual, pl["ln_1.weight"][l], a["ln1_mean"][l],
                              a["ln1_rstd"][l], dres, gl["ln_1.weight"][l], _at(gl, "ln_1.bias", l))
            else:
                linear_backward(a["dqkv"], residual, "attn.c_attn.weight", l, dres)
            if cfg.parallel_residual:  # the MLP's input was the block's input too
                bk.add_(dres, a["dres_mlp"])
        if "wte" in g:
            bk.embedding_backward(dres.reshape((B, T, C)), a["idx"], g["wte"], g.get("wpe"),
                                  scale=cfg.embed_scale or 1.0)

    def _norm_sinks(self) -> tuple[dict, dict]:
        """(g, gl) for a frozen base: the norms' gradients only (the norm backward kernels compute them along with
        the input's), into a buffer nothing reads; no entry for any other parameter, so none is computed."""
        if self._frozen_grads is None:
            shapes = {n: s for n, s in self.shapes.items() if n.startswith("ln_") or "norm" in n}
            views = _views(self.bk, self.bk.zeros((sum(math.prod(s) for s in shapes.values()),), "float32"), shapes)
            self._frozen_grads = (views, _layers(self.bk, views))
        return self._frozen_grads

    # ---- inference --------------------------------------------------------------------------------------

    def kv_cache(self, batch_size: int, weights: str | dict = "float32", max_len: int | None = None) -> KVCache:
        """A key/value cache for `batch_size` sequences of up to max_len (default block_size) tokens (see
        KVCache). weights (CPU): "float32", "bfloat16" to decode with a bf16 snapshot of the matrices (see
        bf16_weights), "int8" with an int8 one (int8_weights) or "w8a8" with int8 weights and int8 activations
        (w8a8_weights); on the GPU the model's compute dtype decides ("bfloat16" is ignored there, "int8" and
        "w8a8" refused)."""
        return KVCache(self, batch_size, weights, max_len)

    def bf16_weights(self) -> dict[str, np.ndarray | ops.Bf16Panels]:
        """A bf16 snapshot (nearest-even) of the weight matrices a decode step streams: the four linear layers of
        every block and the lm-head (wte when tied). Half the bytes of float32; taken now, so it does not follow
        later changes of the parameters. Reuse it across caches: model.kv_cache(B, weights=w16). Each matrix is
        uint16 bit patterns (OC, C), or, where the CPU's bf16 GEMM is avx512_bf16 (ops.bf16_panels_preferred) and C
        is even, those bits packed once for it (ops.Bf16Panels; ops.unpack_bf16 gives the bits back)."""
        return self._snapshot(snapshot_convert("bfloat16"), "bf16_weights")

    def int8_weights(self) -> dict[str, ops.Int8Weight]:
        """An int8 snapshot of the same matrices as bf16_weights (weight-only quantization, one fp32 scale per
        output row: ops.quantize_int8): a quarter of the bytes of float32, for decoding where reading the weights
        is the cost. Activations stay float32. Reuse it across caches: model.kv_cache(B, weights=w8)."""
        return self._snapshot(snapshot_convert("int8"), "int8_weights")

    def w8a8_weights(self) -> dict[str, ops.Int8Panels]:
        """The int8 snapshot of int8_weights packed for integer products (ops.pack_int8): every matmul then quantizes
        its input rows to int8 too, one scale per row at each call (dynamic quantization, as torch's
        quantize_dynamic), and sums exactly in int32 (AVX512-VNNI where the CPU has it: info()["w8a8"]). The same
        bytes streamed as int8_weights, products 2-4x faster than bf16/fp32 where they are the cost (batches,
        prompts); coarser activations (measured: benchmarks/RESULTS.md). Reuse it: model.kv_cache(B, weights=w)."""
        return self._snapshot(snapshot_convert("w8a8"), "w8a8_weights")

    def decode_weights(self, weights: str | dict = "float32") -> dict | None:
        """The weight snapshot a KV cache with `weights` streams (see kv_cache): the dict given, one taken now
        (bf16_weights, int8_weights, w8a8_weights; a CPU model in bfloat16 takes the bf16 one by itself), or None
        for the model's own matrices. Take it once and pass it on to reuse it across caches."""
        if isinstance(weights, dict):
            return weights
        if weights == "float32" and self._decoding is not None:  # the default, inside decoding(): its snapshot
            return self._decoding[0]
        if self.weights_only is not None:  # (its own form, asked by name: the snapshot it holds)
            if weights != self.weights_only:
                self._check_float32(f"weights={weights!r}")
            return self._decoding[0]
        if weights not in ("float32", "bfloat16", "int8", "w8a8"):
            raise ValueError("weights must be 'float32', 'bfloat16', 'int8', 'w8a8', model.bf16_weights(), "
                             f"model.int8_weights() or model.w8a8_weights(), got {weights!r}")
        if weights in ("int8", "w8a8"):
            return self.int8_weights() if weights == "int8" else self.w8a8_weights()  # raise on a GPU model
        # a CPU model in bfloat16 rounds its matmuls' operands to bf16 anyway: it decodes with the snapshot
        bf16 = weights == "bfloat16" or self.dtype == "bfloat16"
        return self.bf16_weights() if bf16 and self.device == "cpu" else None

    @contextlib.contextmanager
    def decoding(self, weights: str | dict):
        """Within: every inference pass -- forward (logits or losses), hidden_states, and each KV cache made with
        the default weights (generate, eval's generation) -- runs on the weight snapshot a KV cache with `weights`
        streams ("float32", "bfloat16", "int8", "w8a8" or a snapshot dict; see kv_cache), taken once: the numbers
        decoding computes, for all tokens of a batch at once -- e.g. a quantized model's perplexity
        (`fastllm eval --dtype w8a8`). Inference only: a forward in training mode inside raises RuntimeError.

        >>> with model.eval().decoding("w8a8"):
        ...     loss = model.forward(idx, targets)
        """
        snap = self.decode_weights(weights)
        prev = self._decoding
        self._decoding = None if snap is None else (snap, _snapshot_layers(snap))
        try:
            yield self
        finally:
            self._decoding = prev

    def _snapshot(self, convert, what: str) -> dict:
        if self.device != "cpu":
            raise ValueError(f"{what} is for CPU decoding; on the GPU give the model dtype='bfloat16'")
        self._check_float32(what)
        return {n: convert(self.p[n]) for n in (*MATRICES, self.head)}

    def generate(self, prompt_ids, max_new_tokens: int, **kw):
        """Prompt plus generated ids (see fastllm.sample.generate for the keyword arguments: temperature, top_k,
        top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty, stop_tokens, seed, weights).

        >>> model.generate([50256], 20, temperature=0.8, top_k=40, seed=0)
        """
        from .sample import generate  # sample imports nothing of the model; this method is its front door

        return generate(self, prompt_ids, max_new_tokens, **kw)


def init_weights(p: dict[str, np.ndarray], config: GPTConfig, seed: int = 0) -> None:
    """GPT-2 init of the numpy views `p`: normal(0, 0.02) for weights and embeddings (and an untied lm-head),
    residual projections scaled by 1/sqrt(2 n_layer), zeros for biases, ones for norm gains."""
    rng = np.random.default_rng(seed)
    std, L = 0.02, config.n_layer
    for name, arr in p.items():
        if name.endswith(".bias"):
            arr[...] = 0.0
        elif name.startswith("ln_") or name.endswith("_norm.weight"):
            arr[...] = 1.0
        else:
            s = std / math.sqrt(2 * L) if name.endswith("c_proj.weight") else std
            arr[...] = rng.standard_normal(arr.shape, np.float32) * s


class KVCache:
    """Keys and values of every layer for B sequences, so generation runs the model on new tokens only.

    prefill(rows) runs the prompts (rows may differ in length) batched; decode(tokens) appends one token per
    sequence. Both return the float32 numpy logits (B, V) of each sequence's last token (soft-capped if the config
    says so). Only the kv heads are stored (grouped-query attention: n_kv_head of them), after QK-norm and RoPE.
    Sliding-window layers (Mistral v0.1, Gemma 2/3) attend to the last window of positions only: their cache is a
    ring of R = min(max_len, window + kv_chunk - 1) rows (position p at row p % R), so passes over more than
    kv_chunk tokens (= the smallest window) run in chunks of kv_chunk tokens. Full layers keep max_len rows.
    k, v: the full layers' keys/values (n_full, B, n_kv_head, max_len, head_size); k_ring, v_ring the sliding
    layers' (n_sliding, B, n_kv_head, R, head_size); `rows` the rows of each layer (kv_rows).
    Memory: 2 * B * n_kv_head * head_size * sum(rows) elements of the compute dtype, sum(rows) = n_full * max_len +
    n_sliding * R (max_len defaults to block_size; generate sizes it to the longest prompt + max_new_tokens, so a
    short generation does not zero a full-context cache).
    On the CPU, weights="bfloat16" streams bf16 copies of the matrices in decode steps (<= BF16_MAX_ROWS token rows at
    once, where reading the weights is the cost); longer prefills run the bf16 GEMM (CpuBf16) on the
    float32 weights, which rounds them to the same bf16 numbers as it packs them, on a CPU with AMX or AVX512_BF16
    (elsewhere the float32 GEMM, faster there: 6L-384, 256 tokens on a Zen 3: 137 vs 184 ms) -- except where the
    snapshot is packed for the bf16 GEMM already (ops.Bf16Panels, AVX512_BF16 without AMX): every pass runs on it,
    with nothing to pack. weights="int8" runs
    every pass on int8 copies of the matrices (model.int8_weights; long prefills dequantize them blockwise for the
    float32 GEMM), so prompt and decode see the same quantized model; weights="w8a8" likewise on
    model.w8a8_weights (int8 activations too, quantized per row: the same numbers for a row in a prompt or a step).
    """

    BF16_MAX_ROWS = 32

    def __init__(self, model: GPT, batch_size: int, weights: str | dict = "float32", max_len: int | None = None):
        cfg, bk = model.config, model.bk
        self.model, self.B = model, batch_size
        self.max_len = cache_length(cfg, batch_size, max_len)
        self.snapshot = model.decode_weights(weights)
        # a snapshot for every pass: int8 (the quantized model throughout), bf16 panels (nothing to pack per call)
        head = None if self.snapshot is None else self.snapshot[model.head]
        self._all_passes = isinstance(head, (ops.Int8Weight, ops.Int8Panels, ops.Bf16Panels)) or \
            (model.weights_only is not None and self.snapshot is model._decoding[0])  # (no float32 matrices)
        self._snapl = None if self.snapshot is None else _snapshot_layers(self.snapshot)
        # bf16 weights (on the CPU): a prefill's attention products in bf16 too (backend.CpuBf16)
        self._bf16 = isinstance(head, ops.Bf16Panels) or (isinstance(head, np.ndarray) and head.dtype == np.uint16)
        self.hs = cfg.head_size
        self.rows, self.chunk = kv_rows(cfg, self.max_len), kv_chunk(cfg)
        sliding = [l for l in range(cfg.n_layer) if cfg.window(l) is not None]
        full = [l for l in range(cfg.n_layer) if cfg.window(l) is None]
        ring = self.rows[sliding[0]] if sliding else 0  # they share config.sliding_window: one ring length

        def stack(n: int, rows: int):
            return bk.zeros((n, batch_size, cfg.kv_heads, rows, self.hs), model.act_dtype)

        self.k, self.v = stack(len(full), self.max_len), stack(len(full), self.max_len)
        self.k_ring, self.v_ring = stack(len(sliding), ring), stack(len(sliding), ring)
        # layer l -> (keys, values, index in them)
        self._layer = {l: (self.k, self.v, i) for i, l in enumerate(full)}
        self._layer.update({l: (self.k_ring, self.v_ring, i) for i, l in enumerate(sliding)})
        self.pos = np.zeros(batch_size, np.int32)  # tokens cached per sequence (host; copied to _pos per call)
        self._pos = bk.zeros((batch_size,), "int32")
        self._bufs: dict[tuple[int, int], dict] = {}

    def prefill(self, rows: list[list[int]]) -> np.ndarray:
        """Batched: the first min(len) tokens of every prompt run in one pass (all prompts, when they have the same
        length), then each longer prompt's remaining tokens on its own."""
        if len(rows) != self.B:
            raise ValueError(f"prefill needs {self.B} prompts, got {len(rows)}")
        rows = [np.asarray(r, np.int32).reshape(-1) for r in rows]
        common = min(len(r) for r in rows)
        if common == 0:
            raise ValueError("prefill needs non-empty prompts")
        cfg = self.model.config
        for b, r in enumerate(rows):  # check everything before the cache changes
            if r.min() < 0 or r.max() >= cfg.vocab_size:
                raise ValueError(f"prompt {b}: token ids outside [0, {cfg.vocab_size})")
            if int(self.pos[b]) + len(r) > self.max_len:
                raise ValueError(f"prompt {b} would exceed the cache length max_len={self.max_len}")
        logits = self._forward(np.stack([r[:common] for r in rows]), 0)
        for b, r in enumerate(rows):
            if len(r) > common:
                logits[b] = self._forward(r[None, common:], b)[0]
        return logits

    def decode(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, np.int32).reshape(self.B, 1)
        return self._forward(tokens, 0)

    # ---- single rows, for a server's continuous batching (fastllm.serve): sequences come and go, the active
    # ones are kept in rows 0 .. n-1 (copy_row fills the hole a finished one leaves) and decode_rows runs only those.
    # loras (multi-LoRA serving): the adapter of each row (a fastllm.lora.Lora made for this model, or None: the base
    # alone), in place of the model's own; rows with the same adapter should be adjacent (one run each: LoraRuns)
    # for the fewest small products. None instead of the list: the model's own adapters, if any, for every row

    def reset_row(self, row: int) -> None:
        """Forget what row `row` holds (its keys/values are overwritten by the next prefill_row)."""
        self.pos[row] = 0

    def prefill_row(self, row: int, ids, lora=None) -> np.ndarray:
        """Run the prompt `ids` in row `row` alone, after what it holds (reset_row first for a new sequence);
        the logits (V,) of its last token. lora: that row's adapter (see above; None: the model's own, if any)."""
        ids = np.asarray(ids, np.int32).reshape(1, -1)
        if not 0 <= row < self.B or ids.size == 0:
            raise ValueError(f"prefill_row needs a row in [0, {self.B}) and a non-empty prompt, got row {row}, "
                             f"{ids.size} tokens")
        return self._forward(ids, row, None if lora is None else [lora])[0]

    def copy_row(self, src: int, dst: int) -> None:
        """Row dst becomes a copy of row src: its cached keys/values (the rows holding its pos[src] positions in
        every layer and head: all of a ring once it is full) and length."""
        bk, cfg, n, hs = self.model.bk, self.model.config, int(self.pos[src]), self.hs
        for l in range(cfg.n_layer) if n else ():
            rows = self.rows[l]
            live = min(n, rows)  # position p at row p % rows, in src and dst alike
            for cache in self._layer[l][:2]:
                for h in range(cfg.kv_heads):
                    at_src, at_dst = self._at(l, src) + h * rows * hs, self._at(l, dst) + h * rows * hs
                    bk.copy_(bk.view(cache, at_dst, (live, hs)), bk.view(cache, at_src, (live, hs)))
        self.pos[dst] = n

    def _at(self, l: int, row: int) -> int:
        """Offset of sequence `row`'s keys (values) of layer l in its stack."""
        per_seq = self.model.config.kv_heads * self.rows[l] * self.hs
        return (self._layer[l][2] * self.B + row) * per_seq

    def decode_rows(self, tokens, r0: int = 0, loras=None) -> np.ndarray:
        """decode for the rows r0 .. r0+n-1 only (one token each, n = len(tokens)); their logits (n, V). loras: the
        adapter of each of those rows (see above; default: the model's own for all)."""
        tokens = np.asarray(tokens, np.int32).reshape(-1, 1)
        if not (0 <= r0 and 0 < len(tokens) <= self.B - r0):
            raise ValueError(f"decode_rows: {len(tokens)} tokens from row {r0} do not fit the {self.B} rows")
        if loras is not None and len(loras) != len(tokens):
            raise ValueError(f"decode_rows: {len(loras)} loras for {len(tokens)} rows")
        return self._forward(tokens, r0, loras)

    def _buffers(self, b: int, Tn: int) -> dict:
        key = (b, Tn)
        if key not in self._bufs:
            if len(self._bufs) >= 4:  # prompts of many lengths: keep the decode buffers, drop the others
                self._bufs = {k: v for k, v in self._bufs.items() if k[1] == 1}
            cfg, dt, f32 = self.model.config, self.model.act_dtype, "float32"
            C, N, H, A, F = cfg.n_embd, b * Tn, cfg.mlp_width, cfg.n_head * cfg.head_size, cfg.fc_width
            self._bufs[key] = self.model.bk.carve({
                "idx": ((b, Tn), "int32"), "x": ((N, C), dt), "h": ((N, C), dt), "mean": ((N,), f32),
                "rstd": ((N,), f32), "qkv": ((N, cfg.qkv_width), dt), "y": ((N, A), dt), "tmp": ((N, C), dt),
                "post": ((N, C), dt),
                "qk_rstd": ((N * cfg.n_head,), f32), "fch": ((N, F), dt), "fch_act": ((N, H), dt),
                "last": ((b, C), dt), "lnf": ((b, C), dt), "lnf_mean": ((b,), f32), "lnf_rstd": ((b,), f32),
                "logits": ((b, cfg.vocab_size), f32),
            })
        return self._bufs[key]

    def _forward(self, idx: np.ndarray, r0: int, loras=None) -> np.ndarray:
        """Run idx (b, Tn) for the cache rows r0 .. r0+b-1, appending their keys/values, in passes of at most
        self.chunk tokens where the sliding layers' rings need that; float32 numpy logits (b, V) of the last token
        of each row. loras: each row's adapter (None: the model's own)."""
        V, Tm = self.model.config.vocab_size, self.max_len
        if idx.min() < 0 or idx.max() >= V:
            raise ValueError(f"token ids outside [0, {V})")
        if int(self.pos[r0:r0 + len(idx)].max()) + idx.shape[1] > Tm:
            raise ValueError(f"the sequence would exceed the cache length max_len={Tm}")
        step = idx.shape[1] if self.chunk is None else self.chunk
        for t in range(0, idx.shape[1], step):
            logits = self._pass(idx[:, t:t + step], r0, loras)
        return logits

    def _pass(self, idx: np.ndarray, r0: int, loras=None) -> np.ndarray:
        m, cfg, bk = self.model, self.model.config, self.model.bk
        pc, pl = m.pc, m._pl
        b, Tn = idx.shape
        C, NH, NKV, hs, W = cfg.n_embd, cfg.n_head, cfg.kv_heads, self.hs, cfg.qkv_width
        pos = self.pos[r0:r0 + b]
        u = self._buffers(b, Tn)
        bk.copy_(u["idx"], np.ascontiguousarray(idx, np.int32))
        pos_dev = bk.view(self._pos, r0, (b,))
        bk.copy_(pos_dev, np.ascontiguousarray(pos))
        snap = self._snapl if self._all_passes or b * Tn <= self.BF16_MAX_ROWS else None
        w = pl if snap is None else snap  # the matrices this pass streams
        if self._snapl is not None and snap is None and backend.cpu_bf16_hardware():
            bk = backend.get("cpu", "bfloat16")  # a long prefill: the bf16 GEMM on the fp32 weights (rounded as the
            # snapshot: the same numbers) where the CPU has bf16 hardware; elsewhere fp32 is faster (measured)
        abk = backend.get("cpu", "bfloat16") if self._bf16 else bk  # attention (a prefill's products in bf16)
        x = u["x"]
        # token (+ position) embedding; learned position rows start at each sequence's pos (a view of wpe)
        if cfg.positions == "learned" and not (pos == pos[0]).all():  # rows at different positions: one call per row
            for i in range(b):
                wpe_i = bk.view(pc["wpe"], int(pos[i]) * C, (Tn, C))
                bk.embedding_forward(bk.view(u["idx"], i * Tn, (1, Tn)), pc["wte"], wpe_i,
                                     out=bk.view(x, i * Tn * C, (1, Tn, C)), scale=cfg.embed_scale or 1.0)
        else:
            wpe = None if cfg.positions == "rope" else bk.view(pc["wpe"], int(pos[0]) * C, (Tn, C))
            bk.embedding_forward(u["idx"], m._token_table(), wpe, out=x.reshape((b, Tn, C)),
                                 scale=cfg.embed_scale or 1.0)
        def add_branch(branch: str, l: int) -> None:  # x += the branch's output u["tmp"] (post-normed: Gemma 2/3)
            if cfg.post_norms:
                post_norm_forward(bk, cfg, pl, branch, l, u["tmp"], u["post"], u["mean"], u["rstd"])
            bk.residual_forward(x, u["post"] if cfg.post_norms else u["tmp"], out=x, scale=cfg.residual_scale or 1.0)

        # the model's adapters, or each row's own (its Tn token rows): one Lora for all runs the single-adapter path
        adapters = (None if m.lora_off else m.lora) if loras is None else LoraRuns.of(loras, Tn)
        qkv = u["qkv"].reshape((b, Tn, W))
        for l in range(cfg.n_layer):
            kc, vc = (bk.view(c, self._at(l, r0), (b, NKV, self.rows[l], hs)) for c in self._layer[l][:2])
            linear = linears(bk, w, pl, adapters, l)
            h = pre_norm(bk, cfg, pl, "ln_1", l, x, u["h"], u["mean"], u["rstd"])
            linear("attn.c_attn.weight", h, u["qkv"])
            if cfg.qk_norm:  # in place on the q and k rows
                stats = [bk.view(u["qk_rstd"], 0, shape) for shape in qk_norm_stats(cfg, b, Tn)]  # (not kept)
                qk_norm_forward(bk, cfg, pl, l, qkv, qkv, stats)
            if m.ropes[l] is not None:
                bk.rope_forward(qkv, *m.ropes[l], NH, pos=pos_dev, out=qkv, n_kv_head=NKV)
            abk.attention_kv_forward(qkv, kc, vc, pos_dev, out=u["y"].reshape((b, Tn, NH * hs)), n_kv_head=NKV,
                                     **m.attn_options[l])
            linear("attn.c_proj.weight", u["y"], u["tmp"])
            if cfg.parallel_residual:  # the MLP reads the block's input: its norm before the attention joins x
                h = pre_norm(bk, cfg, pl, "ln_2", l, x, u["h"], u["mean"], u["rstd"])
            add_branch("attn", l)
            if not cfg.parallel_residual:
                h = pre_norm(bk, cfg, pl, "ln_2", l, x, u["h"], u["mean"], u["rstd"])
            mlp_forward(bk, cfg, linear, h, u["fch"], u["fch_act"], u["tmp"])
            add_branch("mlp", l)
        last = x  # the last token of each row
        if Tn > 1:
            last = u["last"]
            for i in range(b):
                bk.copy_(bk.view(last, i * C, (1, C)), bk.view(x, ((i + 1) * Tn - 1) * C, (1, C)))
        norm_forward(bk, cfg, last, pc["ln_f.weight"], pc.get("ln_f.bias"), u["lnf"], u["lnf_mean"], u["lnf_rstd"])
        bk.matmul_forward(u["lnf"], w[m.head], out=u["logits"])  # (b, V) float32 = lnf @ head^T
        self.pos[r0:r0 + b] += Tn
        logits = softcap_logits(np.array(bk.to_numpy(u["logits"])), cfg.logit_softcap)
        return logits if cfg.logits_scaling is None else logits / np.float32(cfg.logits_scaling)
