"""GPT-2 in fastllm's own kernels: a sequence of `ops.*` calls on preallocated numpy buffers.

Architecture (GPT-2): token + position embedding, n_layer pre-LN blocks of causal multi-head attention and a 4x
GELU MLP, final layernorm, lm-head tied to the token embedding. All parameters live in one flat float32 buffer
(and all gradients in another) with named views; activations are allocated once per (B, T).

>>> model = GPT(GPTConfig.preset("tiny", vocab_size=100))
>>> loss = model.forward(np.zeros((2, 8), np.int64), np.zeros((2, 8), np.int64))
>>> model.zero_grad(); model.backward()
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from . import ops

PRESETS: dict[str, dict[str, int]] = {
    # name: n_layer, n_head, n_embd, block_size (vocab_size comes from the tokenizer, 50257 for GPT-2)
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),  # 1558M
    # small models for CPU
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=64),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length (rows of the position embedding)
    vocab_size: int = 50257  # number of token ids (tokenizer.n_vocab)
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads per block
    n_embd: int = 768  # channels C; head size is n_embd // n_head
    layernorm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")

    @classmethod
    def preset(cls, name: str, **overrides) -> GPTConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {sorted(unknown)}")
        return cls(**d)


def param_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter tensor, stacked over layers (llm.c layout), in flat-buffer order."""
    V, Tm, L, C = cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd
    return {
        "wte": (V, C),  # token embedding, also the lm-head (tied)
        "wpe": (Tm, C),  # position embedding
        "ln_1.weight": (L, C),
        "ln_1.bias": (L, C),
        "attn.c_attn.weight": (L, 3 * C, C),  # qkv projection, (out, in) like nn.Linear
        "attn.c_attn.bias": (L, 3 * C),
        "attn.c_proj.weight": (L, C, C),
        "attn.c_proj.bias": (L, C),
        "ln_2.weight": (L, C),
        "ln_2.bias": (L, C),
        "mlp.c_fc.weight": (L, 4 * C, C),
        "mlp.c_fc.bias": (L, 4 * C),
        "mlp.c_proj.weight": (L, C, 4 * C),
        "mlp.c_proj.bias": (L, C),
        "ln_f.weight": (C,),
        "ln_f.bias": (C,),
    }


def _views(flat: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out, off = {}, 0
    for name, shape in shapes.items():
        n = math.prod(shape)
        out[name] = flat[off:off + n].reshape(shape)
        off += n
    return out


def check_token_ids(x, name: str, config: GPTConfig, check_range: bool = False) -> np.ndarray:
    """x as a C-contiguous int32 (B, T) array with 0 < T <= block_size (TypeError/ValueError naming `name`);
    with check_range, every id also in [0, vocab_size) (the CPU kernels check ids themselves, the GPU cannot)."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be integer token ids, got dtype {x.dtype}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be (B, T), got shape {x.shape}")
    if x.shape[1] > config.block_size:
        raise ValueError(f"{name} has T={x.shape[1]} > block_size={config.block_size}")
    if x.shape[1] == 0 or x.shape[0] == 0:
        raise ValueError(f"{name} must be non-empty, got shape {x.shape}")
    if check_range and (x.min() < 0 or x.max() >= config.vocab_size):
        raise ValueError(f"{name} holds token ids outside [0, {config.vocab_size})")
    return np.ascontiguousarray(x, np.int32)


def cache_length(config: GPTConfig, batch_size: int, max_len: int | None) -> int:
    """The checked length of a KV cache (KVCache, CudaKVCache): max_len, or block_size when None."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = config.block_size if max_len is None else int(max_len)
    if not 1 <= n <= config.block_size:
        raise ValueError(f"max_len must be in [1, block_size={config.block_size}], got {max_len}")
    return n


def decays(name: str) -> bool:
    """Weight decay applies to matrices (embeddings and linear weights), not to biases and layernorm gains."""
    return name in ("wte", "wpe") or name.endswith("c_attn.weight") or name.endswith("c_proj.weight") or \
        name.endswith("c_fc.weight")


class GPT:
    """GPT-2 with a flat parameter buffer `params`, gradients `grads`, and named views `p`, `g`."""

    def __init__(self, config: GPTConfig, seed: int = 0, init: bool = True):
        self.config = config
        self.shapes = param_shapes(config)
        self.num_parameters = sum(math.prod(s) for s in self.shapes.values())
        self.params = np.zeros(self.num_parameters, np.float32)
        self.grads = np.zeros(self.num_parameters, np.float32)
        self.p = _views(self.params, self.shapes)
        self.g = _views(self.grads, self.shapes)
        self.training = True
        self._acts: dict[str, np.ndarray] | None = None
        self._BT: tuple[int, int] | None = None
        self._ready_for_backward = False  # a forward with targets saved the lm-head gradient
        self._trunk_ready = False  # the trunk's activations are saved (training mode)
        if init:
            self.init_weights(seed)

    # ---- Hugging Face format (fastllm.hf) ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path) -> GPT:
        """Load a transformers GPT-2 folder (config.json + model.safetensors, or shards); see fastllm.hf."""
        from .hf import from_pretrained

        return from_pretrained(path, cls)

    def save_pretrained(self, path, tokenizer=None, max_shard_bytes: int | None = None):
        """Write a folder transformers' GPT2LMHeadModel.from_pretrained loads (plus tokenizer.json if given)."""
        from .hf import save_pretrained

        return save_pretrained(self, path, tokenizer=tokenizer, max_shard_bytes=max_shard_bytes)

    # ---- parameters -----------------------------------------------------------------------------------

    def init_weights(self, seed: int = 0) -> None:
        """GPT-2 init: normal(0, 0.02) for weights and embeddings, residual projections scaled by
        1/sqrt(2 n_layer), zeros for biases, ones for layernorm gains."""
        rng = np.random.default_rng(seed)
        std, L = 0.02, self.config.n_layer
        for name, arr in self.p.items():
            if name.endswith(".bias"):
                arr[...] = 0.0
            elif name.startswith("ln_"):
                arr[...] = 1.0
            else:
                s = std / math.sqrt(2 * L) if name.endswith("c_proj.weight") else std
                arr[...] = rng.standard_normal(arr.shape, np.float32) * s

    def named_parameters(self):
        """(name, array view) per tensor with per-layer names like 'h.3.attn.c_attn.weight'."""
        for name, arr in self.p.items():
            if name in ("wte", "wpe") or name.startswith("ln_f"):
                yield name, arr
            else:
                for layer in range(self.config.n_layer):
                    yield f"h.{layer}.{name}", arr[layer]

    def zero_grad(self) -> None:
        self.grads.fill(0.0)

    def grad_norm(self) -> float:
        """Global L2 norm of the gradients."""
        return ops.global_norm(self.grads)

    device = "cpu"  # where params, grads and activations live (see to())
    dtype = "float32"  # the compute dtype of the weights and activations

    def to(self, device: str, dtype: str | None = None) -> GPT:
        """Move the model to `device` ("cpu" or "cuda") in place and return it, like torch's Module.to."""
        if device != "cpu" or dtype not in (None, "float32"):
            raise NotImplementedError("GPT.to: only device='cpu', dtype='float32' so far")
        return self

    def state_dict(self) -> dict[str, np.ndarray]:
        """{name: float32 numpy array} of every parameter tensor (named like GPT.p), on the host."""
        return dict(self.p)

    def load_state_dict(self, tensors: dict, where: str = "state_dict") -> GPT:
        """Copy parameter tensors in: every name of GPT.p must be present with its exact shape and a float dtype
        (ValueError naming `where` and the tensor otherwise). Returns self."""
        for name, arr in self.p.items():
            if name not in tensors:
                raise ValueError(f"{where}: missing tensor {name!r}")
            t = np.asarray(tensors[name])
            if t.dtype.kind != "f":
                raise ValueError(f"{where}: tensor {name!r} has dtype {t.dtype}; parameters must be floating point")
            if t.shape != arr.shape:
                raise ValueError(f"{where}: tensor {name!r} has shape {t.shape}, the config needs {arr.shape}")
            arr[...] = t
        return self

    def train(self, mode: bool = True) -> GPT:
        self.training = mode
        return self

    def eval(self) -> GPT:
        return self.train(False)

    # ---- activations ------------------------------------------------------------------------------------

    def _activations(self, B: int, T: int) -> dict[str, np.ndarray]:
        if self._BT == (B, T) and self._acts is not None:
            return self._acts
        cfg = self.config
        L, C, NH = cfg.n_layer, cfg.n_embd, cfg.n_head
        f = np.float32
        a = {
            "encoded": np.empty((B, T, C), f),
            "ln1": np.empty((L, B, T, C), f), "ln1_mean": np.empty((L, B, T), f), "ln1_rstd": np.empty((L, B, T), f),
            "qkv": np.empty((L, B, T, 3 * C), f),
            "atty": np.empty((L, B, T, C), f), "att_lse": np.empty((L, B, NH, T), f),
            "attproj": np.empty((B, T, C), f),  # scratch: only needed until the residual add
            "residual2": np.empty((L, B, T, C), f),
            "ln2": np.empty((L, B, T, C), f), "ln2_mean": np.empty((L, B, T), f), "ln2_rstd": np.empty((L, B, T), f),
            "fch": np.empty((L, B, T, 4 * C), f), "fch_gelu": np.empty((L, B, T, 4 * C), f),
            "fcproj": np.empty((B, T, C), f),  # scratch
            "residual3": np.empty((L, B, T, C), f),
            "lnf": np.empty((B, T, C), f), "lnf_mean": np.empty((B, T), f), "lnf_rstd": np.empty((B, T), f),
            # gradient scratch, reused by every layer
            "dres": np.empty((B, T, C), f), "dlnf": np.empty((B, T, C), f),
            "dfch_gelu": np.empty((B, T, 4 * C), f), "dfch": np.empty((B, T, 4 * C), f),
            "dln": np.empty((B, T, C), f), "datty": np.empty((B, T, C), f), "dqkv": np.empty((B, T, 3 * C), f),
            "dwte_head": np.empty((cfg.vocab_size, C), f),
        }
        self._acts, self._BT = a, (B, T)
        return a

    def _check_ids(self, x, name: str) -> np.ndarray:
        return check_token_ids(x, name, self.config)

    # ---- forward ----------------------------------------------------------------------------------------

    def forward(self, idx, targets=None, weights=None):
        """idx (B, T) token ids -> logits (B, T, V) if targets is None, else the mean loss (float) over
        targets != -1 (ignore index). In training mode a forward with targets also computes the gradient of
        the fused lm-head + cross-entropy, which backward() then uses.

        weights (B, T) float (optional, with targets): the objective becomes the weighted SUM
        sum_{b,t} weights[b, t] * CE[b, t] over targets != -1 (no 1/n), and that is what is returned and
        backpropagated. Policy gradients use it: with weights = -A_t the gradient is that of
        -sum_t A_t log p(a_t). After any forward with targets, self.token_losses (B, T) holds the per-token
        CE = -log p(target) (0 where ignored)."""
        a = self._trunk(idx)
        p = self.p
        B, T = self._idx.shape
        self._ready_for_backward = False
        if targets is None:
            return ops.matmul_forward(a["lnf"], p["wte"])  # (B, T, V)
        targets = np.asarray(targets)
        if targets.shape != (B, T):
            raise ValueError(f"targets must have the shape of idx {(B, T)}, got {targets.shape}")
        if weights is None:
            n_valid = int(np.count_nonzero(targets != ops.IGNORE_INDEX))
            scale = 1.0 / max(n_valid, 1)
        else:
            weights = np.asarray(weights)
            if weights.shape != (B, T):
                raise ValueError(f"weights must have the shape of idx {(B, T)}, got {weights.shape}")
            if not np.isfinite(weights).all():
                raise ValueError("weights must be finite")
            weights = np.ascontiguousarray(weights, np.float32)
            scale = 1.0
        if self.training:
            a["dlnf"].fill(0.0)
            a["dwte_head"].fill(0.0)
            losses, _, _ = ops.lmhead_cross_entropy(a["lnf"], p["wte"], targets, grad_scale=scale,
                                                    dhidden=a["dlnf"], dweight=a["dwte_head"], row_weights=weights)
            self._ready_for_backward = True
        else:
            losses, _, _ = ops.lmhead_cross_entropy(a["lnf"], p["wte"], targets, backward=False)
        self.token_losses = losses
        if weights is None:
            return float(losses.sum(dtype=np.float64) * scale)
        return float(np.dot(losses.astype(np.float64).ravel(), weights.astype(np.float64).ravel()))

    def hidden_states(self, idx) -> np.ndarray:
        """Final hidden states (B, T, C) (after ln_f, before the lm-head) -- a view of the activation buffer,
        valid until the next forward. In training mode, backward(dhidden=...) can follow (heads of your own,
        e.g. the reward model's scalar head in rl.py)."""
        a = self._trunk(idx)
        self._ready_for_backward = False
        return a["lnf"]

    __call__ = forward

    def _trunk(self, idx) -> dict[str, np.ndarray]:
        """Embedding, blocks and final layernorm: fills the activations up to lnf (B, T, C)."""
        cfg, p = self.config, self.p
        idx = self._check_ids(idx, "idx")
        B, T = idx.shape
        NH, L = cfg.n_head, cfg.n_layer
        if idx.max() >= cfg.vocab_size or idx.min() < 0:
            raise ValueError(f"idx holds token ids outside [0, {cfg.vocab_size})")
        a = self._activations(B, T)
        self._idx = idx
        self._trunk_ready = self.training  # activations saved for a backward(dhidden=...)

        ops.embedding_forward(idx, p["wte"], p["wpe"], out=a["encoded"])  # (B, T, C)
        residual = a["encoded"]
        for l in range(L):
            ops.layernorm_forward(residual, p["ln_1.weight"][l], p["ln_1.bias"][l], cfg.layernorm_eps,
                                  out=a["ln1"][l], mean=a["ln1_mean"][l], rstd=a["ln1_rstd"][l])
            ops.matmul_forward(a["ln1"][l], p["attn.c_attn.weight"][l], p["attn.c_attn.bias"][l],
                               out=a["qkv"][l])  # (B, T, 3C)
            ops.attention_forward(a["qkv"][l], NH, out=a["atty"][l], lse=a["att_lse"][l])  # (B, T, C)
            ops.matmul_forward(a["atty"][l], p["attn.c_proj.weight"][l], p["attn.c_proj.bias"][l],
                               out=a["attproj"])
            ops.residual_forward(residual, a["attproj"], out=a["residual2"][l])
            ops.layernorm_forward(a["residual2"][l], p["ln_2.weight"][l], p["ln_2.bias"][l], cfg.layernorm_eps,
                                  out=a["ln2"][l], mean=a["ln2_mean"][l], rstd=a["ln2_rstd"][l])
            ops.matmul_forward(a["ln2"][l], p["mlp.c_fc.weight"][l], p["mlp.c_fc.bias"][l],
                               out=a["fch"][l])  # (B, T, 4C)
            ops.gelu_forward(a["fch"][l], out=a["fch_gelu"][l])
            ops.matmul_forward(a["fch_gelu"][l], p["mlp.c_proj.weight"][l], p["mlp.c_proj.bias"][l],
                               out=a["fcproj"])
            ops.residual_forward(a["residual2"][l], a["fcproj"], out=a["residual3"][l])
            residual = a["residual3"][l]
        ops.layernorm_forward(residual, p["ln_f.weight"], p["ln_f.bias"], cfg.layernorm_eps,
                              out=a["lnf"], mean=a["lnf_mean"], rstd=a["lnf_rstd"])
        return a

    # ---- backward ---------------------------------------------------------------------------------------

    def backward(self, dhidden=None) -> None:
        """Accumulate (+=) the gradient of the last forward's loss into self.grads.

        dhidden (B, T, C): instead start from this gradient on the final hidden states of the last
        forward / hidden_states() (i.e. backpropagate sum(dhidden * hidden)); the lm-head is not involved."""
        cfg, p, g, a = self.config, self.p, self.g, self._acts
        if dhidden is None:
            if not self._ready_for_backward:
                raise RuntimeError("backward() needs a forward(idx, targets) in training mode first")
        else:
            if not self._trunk_ready:
                raise RuntimeError("backward(dhidden=...) needs hidden_states(idx) in training mode first")
            dhidden = np.asarray(dhidden)
            if dhidden.shape != a["dlnf"].shape:
                raise ValueError(f"dhidden must have shape {a['dlnf'].shape}, got {dhidden.shape}")
            a["dlnf"][...] = dhidden
        self._ready_for_backward = self._trunk_ready = False
        assert a is not None
        L, NH = cfg.n_layer, cfg.n_head
        if dhidden is None:
            g["wte"] += a["dwte_head"]
        dres = a["dres"]  # gradient of the residual stream, flowing down through the layers
        dres.fill(0.0)
        ops.layernorm_backward(a["dlnf"], a["residual3"][L - 1], p["ln_f.weight"], a["lnf_mean"], a["lnf_rstd"],
                               dx=dres, dweight=g["ln_f.weight"], dbias=g["ln_f.bias"])
        for l in reversed(range(L)):
            residual = a["encoded"] if l == 0 else a["residual3"][l - 1]
            # MLP half: residual3 = residual2 + c_proj(gelu(c_fc(ln2(residual2))))
            for k in ("dfch_gelu", "dfch", "dln"):
                a[k].fill(0.0)
            ops.matmul_backward(dres, a["fch_gelu"][l], p["mlp.c_proj.weight"][l], dinp=a["dfch_gelu"],
                                dweight=g["mlp.c_proj.weight"][l], dbias=g["mlp.c_proj.bias"][l])
            ops.gelu_backward(a["dfch_gelu"], a["fch"][l], dx=a["dfch"])
            ops.matmul_backward(a["dfch"], a["ln2"][l], p["mlp.c_fc.weight"][l], dinp=a["dln"],
                                dweight=g["mlp.c_fc.weight"][l], dbias=g["mlp.c_fc.bias"][l])
            ops.layernorm_backward(a["dln"], a["residual2"][l], p["ln_2.weight"][l], a["ln2_mean"][l],
                                   a["ln2_rstd"][l], dx=dres, dweight=g["ln_2.weight"][l], dbias=g["ln_2.bias"][l])
            # attention half: residual2 = residual + c_proj(attn(c_attn(ln1(residual))))
            for k in ("datty", "dqkv", "dln"):
                a[k].fill(0.0)
            ops.matmul_backward(dres, a["atty"][l], p["attn.c_proj.weight"][l], dinp=a["datty"],
                                dweight=g["attn.c_proj.weight"][l], dbias=g["attn.c_proj.bias"][l])
            ops.attention_backward(a["datty"], a["qkv"][l], a["atty"][l], a["att_lse"][l], NH, dqkv=a["dqkv"])
            ops.matmul_backward(a["dqkv"], a["ln1"][l], p["attn.c_attn.weight"][l], dinp=a["dln"],
                                dweight=g["attn.c_attn.weight"][l], dbias=g["attn.c_attn.bias"][l])
            ops.layernorm_backward(a["dln"], residual, p["ln_1.weight"][l], a["ln1_mean"][l], a["ln1_rstd"][l],
                                   dx=dres, dweight=g["ln_1.weight"][l], dbias=g["ln_1.bias"][l])
        ops.embedding_backward(dres, self._idx, g["wte"], g["wpe"])

    # ---- inference --------------------------------------------------------------------------------------

    def kv_cache(self, batch_size: int, weights: str | dict = "float32", max_len: int | None = None) -> KVCache:
        """A key/value cache for `batch_size` sequences of up to max_len (default block_size) tokens (see
        KVCache). weights: "float32", or "bfloat16" to decode with a bf16 snapshot of the matrices (see
        bf16_weights)."""
        return KVCache(self, batch_size, weights, max_len)

    def bf16_weights(self) -> dict[str, np.ndarray]:
        """A bf16 snapshot (uint16 bit patterns, nearest-even) of the weight matrices a decode step streams: the
        four linear layers of every block and wte (the lm-head). Half the bytes of float32; taken now, so it does
        not follow later changes of the parameters. Reuse it across caches: model.kv_cache(B, weights=w16)."""
        names = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight", "wte")
        return {n: ops.to_bf16(self.p[n]) for n in names}


class KVCacheBase:
    """prefill/decode shared by the CPU cache (KVCache) and the GPU one (cuda_model.CudaKVCache). A subclass sets
    model, B, pos (host int32 (B,)), max_len, and runs the model in _forward(idx (b, Tn) int32, r0) for the cache
    rows r0 .. r0+b-1, returning the float32 logits (b, V) of each row's last token."""

    model: GPT  # or a cuda_model.CudaGPT
    B: int
    pos: np.ndarray
    max_len: int

    def prefill(self, rows: list[list[int]]) -> np.ndarray:
        """Batched: the first min(len) tokens of every prompt run in one pass (all prompts, when they have the same
        length), then each longer prompt's remaining tokens on its own."""
        if len(rows) != self.B:
            raise ValueError(f"prefill needs {self.B} prompts, got {len(rows)}")
        rows = [np.asarray(r, np.int32).reshape(-1) for r in rows]
        if min(len(r) for r in rows) == 0:
            raise ValueError("prefill needs non-empty prompts")
        cfg = self.model.config
        for b, r in enumerate(rows):  # check everything before the cache changes
            if r.min() < 0 or r.max() >= cfg.vocab_size:
                raise ValueError(f"prompt {b}: token ids outside [0, {cfg.vocab_size})")
            if int(self.pos[b]) + len(r) > self.max_len:
                raise ValueError(f"prompt {b} would exceed the cache length max_len={self.max_len}")
        common = min(len(r) for r in rows)
        logits = self._forward(np.stack([r[:common] for r in rows]), 0)
        for b, r in enumerate(rows):
            if len(r) > common:
                logits[b] = self._forward(r[None, common:], b)[0]
        return logits

    def decode(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens, np.int32).reshape(self.B, 1)
        return self._forward(tokens, 0)

    # ---- single rows, for a server's continuous batching (fastllm.serve): sequences come and go, the active
    # ones are kept in rows 0 .. n-1 (copy_row fills the hole a finished one leaves) and decode_rows runs only those

    def reset_row(self, row: int) -> None:
        """Forget what row `row` holds (its keys/values are overwritten by the next prefill_row)."""
        self.pos[row] = 0

    def prefill_row(self, row: int, ids) -> np.ndarray:
        """Run the prompt `ids` in row `row` alone, after what it holds (reset_row first for a new sequence);
        the logits (V,) of its last token."""
        ids = np.asarray(ids, np.int32).reshape(1, -1)
        if not 0 <= row < self.B or ids.size == 0:
            raise ValueError(f"prefill_row needs a row in [0, {self.B}) and a non-empty prompt, got row {row}, "
                             f"{ids.size} tokens")
        return self._forward(ids, row)[0]

    def copy_row(self, src: int, dst: int) -> None:
        """Row dst becomes a copy of row src: its cached keys/values and length."""
        n = int(self.pos[src])
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.pos[dst] = n

    def decode_rows(self, tokens, r0: int = 0) -> np.ndarray:
        """decode for the rows r0 .. r0+n-1 only (one token each, n = len(tokens)); their logits (n, V)."""
        tokens = np.asarray(tokens, np.int32).reshape(-1, 1)
        if not (0 <= r0 and 0 < len(tokens) <= self.B - r0):
            raise ValueError(f"decode_rows: {len(tokens)} tokens from row {r0} do not fit the {self.B} rows")
        return self._forward(tokens, r0)

    def _forward(self, idx: np.ndarray, r0: int) -> np.ndarray:
        raise NotImplementedError


class KVCache(KVCacheBase):
    """Keys and values of every layer for B sequences, so generation runs the model on new tokens only.

    prefill(rows) runs the prompts (rows may differ in length) batched; decode(tokens) appends one token per
    sequence. Both return the logits (B, V) of each sequence's last token.
    Memory: 2 * n_layer * B * max_len * n_embd floats (max_len defaults to block_size; generate sizes it to the
    longest prompt + max_new_tokens, so a short generation does not zero a full-context cache).
    """

    BF16_MAX_ROWS = 32  # token rows per pass up to which bf16 weights (if any) are used

    def __init__(self, model: GPT, batch_size: int, weights: str | dict = "float32", max_len: int | None = None):
        cfg = model.config
        self.model, self.B = model, batch_size
        self.max_len = cache_length(cfg, batch_size, max_len)
        # bf16 matrices for decode steps (<= BF16_MAX_ROWS tokens at once, where streaming the weights is the cost);
        # longer prefills keep the float32 GEMM
        if isinstance(weights, dict):
            self.w16 = weights
        elif weights == "bfloat16":
            self.w16 = model.bf16_weights()
        elif weights == "float32":
            self.w16 = None
        else:
            raise ValueError(f"weights must be 'float32', 'bfloat16' or model.bf16_weights(), got {weights!r}")
        hs = cfg.n_embd // cfg.n_head
        shape = (cfg.n_layer, batch_size, cfg.n_head, self.max_len, hs)
        self.k = np.zeros(shape, np.float32)
        self.v = np.zeros(shape, np.float32)
        self.pos = np.zeros(batch_size, np.int32)  # tokens cached per sequence

    def _forward(self, idx: np.ndarray, r0: int) -> np.ndarray:
        """Run idx (b, Tn) for the cache rows r0 .. r0+b-1, appending their keys/values; logits of the last token."""
        m, cfg = self.model, self.model.config
        p, eps = m.p, cfg.layernorm_eps
        b, Tn = idx.shape
        rows = slice(r0, r0 + b)
        pos = self.pos[rows]
        if idx.min() < 0 or idx.max() >= cfg.vocab_size:
            raise ValueError(f"token ids outside [0, {cfg.vocab_size})")
        if int(pos.max()) + Tn > self.max_len:
            raise ValueError(f"the sequence would exceed the cache length max_len={self.max_len}")
        w16 = self.w16 if b * Tn <= self.BF16_MAX_ROWS else None

        def linear(x, name, l=None, bias=True):
            w = (w16 if w16 is not None else p)[name]
            w = w if l is None else w[l]
            bb = p[name[:-len("weight")] + "bias"][l] if bias else None
            return ops.matmul_forward(x, w, bb) if w16 is None else ops.matmul_forward_bf16w(x, w, bb)

        x = p["wte"][idx] + p["wpe"][pos[:, None] + np.arange(Tn)]  # (b, Tn, C)
        for l in range(cfg.n_layer):
            h, _, _ = ops.layernorm_forward(x, p["ln_1.weight"][l], p["ln_1.bias"][l], eps)
            qkv = linear(h, "attn.c_attn.weight", l)  # (b, Tn, 3C)
            y = ops.attention_kv_forward(qkv, self.k[l, rows], self.v[l, rows], pos)  # (b, Tn, C)
            x = x + linear(y, "attn.c_proj.weight", l)
            h, _, _ = ops.layernorm_forward(x, p["ln_2.weight"][l], p["ln_2.bias"][l], eps)
            h = ops.gelu_forward(linear(h, "mlp.c_fc.weight", l))
            x = x + linear(h, "mlp.c_proj.weight", l)
        last = np.ascontiguousarray(x[:, -1])
        h, _, _ = ops.layernorm_forward(last, p["ln_f.weight"], p["ln_f.bias"], eps)
        self.pos[rows] += Tn
        return linear(h, "wte", bias=False)  # (b, V)
