"""The CPU backend: numpy arrays and thin wrappers over the native kernels (fastllm._C). The contract it shares
with the GPU backend (fastllm.cuda: same functions, same arguments) is in fastllm/backend.py: inputs first,
outputs returned and optionally passed in (`out=`, `dx=`, ...); forward ops overwrite, backward ops ACCUMULATE
(+=) into the gradients they are given.

Validation happens once, in the native binding: a wrong dtype raises TypeError, a wrong shape, non-contiguous
array or out-of-range token id raises ValueError, each naming the argument. Float arrays must already be
float32 (no silent copies); token ids may be any integer dtype and are converted to int32 (floats raise
TypeError). bfloat16 arrays are uint16 bit patterns (numpy has no bfloat16): `to_bf16`, `from_bf16`.

>>> out, mean, rstd = layernorm_forward(np.ones((2, 4), np.float32), np.ones(4, np.float32), np.zeros(4, np.float32))
"""

from __future__ import annotations

import math

import numpy as np

from . import _C

IGNORE_INDEX = -1  # targets with this id take no loss and no gradient (both backends, the model, the loaders)

_NP = {"float32": np.float32, "bfloat16": np.uint16, "int32": np.int32}


def _np_dtype(dtype: str):
    if dtype not in _NP:
        raise TypeError(f"dtype must be one of {sorted(_NP)}, got {dtype!r}")
    return _NP[dtype]


def _ids(x, name: str) -> np.ndarray:
    """Token ids as a C-contiguous int32 array; TypeError for non-integers, ValueError if beyond int32."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    if x.dtype != np.int32:
        if x.size and (x.min() < np.iinfo(np.int32).min or x.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{name} has values outside the int32 range")
        x = x.astype(np.int32)
    return np.asarray(x, order="C")  # not np.ascontiguousarray: it turns a 0-d array into shape (1,)


def _f32(x, name: str) -> np.ndarray:
    """A numpy array as given (no copy); the binding rejects other dtypes and layouts."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy float32 array, got {type(x).__name__}")
    return x


def _out(x, name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    """An output buffer: allocated (zeros) when None, else checked to be a C-contiguous array of `shape` (a strided
    output would be reshaped into a copy that the kernel writes and the caller never sees)."""
    if x is None:
        return np.zeros(shape, dtype)
    _f32(x, name)
    if x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {x.shape}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (an output is written in place)")
    return x


def _row_weights(w, targets: np.ndarray):
    """Optional per-row gradient weights shaped like targets, flattened for the kernel (which checks dtype)."""
    if w is None:
        return None
    w = _f32(w, "row_weights")
    if w.shape != targets.shape:
        raise ValueError(f"row_weights must have the shape of targets {targets.shape}, got {w.shape}")
    return w.reshape(-1)


# ---- arrays --------------------------------------------------------------------------------------------


def empty(shape, dtype: str = "float32") -> np.ndarray:
    return np.empty(shape, _np_dtype(dtype))


def zeros(shape, dtype: str = "float32") -> np.ndarray:
    return np.zeros(shape, _np_dtype(dtype))


def carve(specs: dict[str, tuple[tuple[int, ...], str]], align: int = 64) -> dict[str, np.ndarray]:
    """One allocation for many buffers: {name: (shape, dtype)} -> {name: array view}, each starting at a multiple of
    `align` bytes (a cache line, so rows of different buffers never share one)."""
    offsets, total = {}, 0
    for name, (shape, dtype) in specs.items():
        offsets[name] = total
        nbytes = math.prod(shape) * np.dtype(_np_dtype(dtype)).itemsize
        total += -(-nbytes // align) * align
    arena = np.empty(total + align, np.uint8)
    base = -arena.ctypes.data % align
    out = {}
    for name, (shape, dtype) in specs.items():
        dt = np.dtype(_np_dtype(dtype))
        b = base + offsets[name]
        out[name] = arena[b:b + math.prod(shape) * dt.itemsize].view(dt).reshape(shape)
    return out


def view(x: np.ndarray, offset: int, shape) -> np.ndarray:
    """The elements x.flat[offset : offset + prod(shape)] as an array of `shape`, sharing x's memory."""
    if not x.flags.c_contiguous:
        raise ValueError("view needs a C-contiguous array")
    n = math.prod(shape)
    if offset < 0 or offset + n > x.size:
        raise ValueError(f"view [{offset}, {offset + n}) is outside the array's {x.size} elements")
    return x.reshape(-1)[offset:offset + n].reshape(shape)


def to_device(array, dtype: str | None = None) -> np.ndarray:
    """A C-contiguous copy of a numpy array (float -> float32, integers -> int32 checked; dtype="bfloat16" rounds
    float32 to bf16 bit patterns), like cuda.to_device."""
    a = np.asarray(array)
    if a.dtype.kind in "iub" and dtype in (None, "int32"):
        return _ids(a, "array").copy()
    a = np.array(a, np.float32, order="C")
    return to_bf16(a) if dtype == "bfloat16" else a


def to_numpy(x: np.ndarray) -> np.ndarray:
    """x itself on the CPU (no copy); a copy from the GPU."""
    return x


def copy_(dst: np.ndarray, src) -> None:
    """dst = src (same shape); float32 <-> bfloat16 (uint16 bit patterns) converts, like cuda.copy_."""
    src = np.asarray(src)
    if src.shape != dst.shape:
        raise ValueError(f"copy_: shapes differ, dst {dst.shape} and src {src.shape}")
    if dst.dtype == np.uint16 and src.dtype != np.uint16:
        src = to_bf16(np.asarray(src, np.float32))
    elif src.dtype == np.uint16 and dst.dtype != np.uint16:
        src = from_bf16(src)
    dst[...] = src


def zero_(x: np.ndarray) -> None:
    x.fill(0)


def add_(dst: np.ndarray, src: np.ndarray) -> None:
    """dst += src (same shape, float32)."""
    _C.residual_forward(dst, dst, src)


def synchronize() -> None:
    """Nothing to wait for on the CPU (the kernels return when done)."""


def sum_squares(x) -> float:
    return float(_C.sum_squares(x))


def global_norm(*arrays) -> float:
    """sqrt of the sum of squares over all arrays (float32 in, double accumulation)."""
    return float(np.sqrt(sum(sum_squares(a) for a in arrays)))


def to_bf16(x) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16, same shape), rounded to nearest even."""
    x = np.ascontiguousarray(_f32(x, "x"))
    out = np.empty(x.shape, np.uint16)
    _C.float_to_bf16(out, x)
    return out


def from_bf16(x) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(x, np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---- matmul --------------------------------------------------------------------------------------------


def matmul_forward(inp, weight, bias=None, out=None, pre_gelu=None) -> np.ndarray:
    """out (..., OC) = inp (..., C) @ weight (OC, C)^T + bias (OC); with pre_gelu (..., OC): pre_gelu = that
    product and out = gelu(pre_gelu) (the MLP's first layer). weight may be bf16 (uint16 from to_bf16; inference):
    inp is then rounded to bf16 too, products are exact and sums fp32 (AVX-512 BF16 dot products where the CPU
    has them).

    >>> matmul_forward(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)).shape
    (2, 4)
    """
    inp = _f32(inp, "inp")
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"weight must be a numpy array, got {type(weight).__name__}")
    lead, C = inp.shape[:-1], inp.shape[-1] if inp.ndim else 0
    OC = weight.shape[0] if weight.ndim == 2 else 0
    out = np.empty((*lead, OC), np.float32) if out is None else _out(out, "out", (*lead, OC))
    pg = None if pre_gelu is None else _out(pre_gelu, "pre_gelu", (*lead, OC)).reshape(-1, OC)
    kernel = _C.matmul_forward_bf16w if weight.dtype == np.uint16 else _C.matmul_forward
    kernel(out.reshape(-1, OC), inp.reshape(-1, C), weight, bias, pg)
    return out


def matmul_backward(dout, inp, weight, dinp=None, dweight=None, dbias=None, need_dinp=True, need_bias=True):
    """Gradients of matmul_forward, accumulated: returns (dinp, dweight, dbias); need_dinp/need_bias=False skip
    those (returned as None)."""
    dout, inp, weight = _f32(dout, "dout"), _f32(inp, "inp"), _f32(weight, "weight")
    C, OC = inp.shape[-1], weight.shape[0]
    dinp = _out(dinp, "dinp", inp.shape) if need_dinp else None
    dweight = _out(dweight, "dweight", weight.shape)
    dbias = _out(dbias, "dbias", (OC,)) if need_bias else None
    _C.matmul_backward(None if dinp is None else dinp.reshape(-1, C), dweight, dbias, dout.reshape(-1, OC),
                       inp.reshape(-1, C), weight)
    return dinp, dweight, dbias


# ---- attention -----------------------------------------------------------------------------------------


def attention_forward(qkv, n_head: int, out=None, lse=None):
    """Causal self-attention on packed qkv (B, T, 3C) -> (out (B, T, C), lse (B, NH, T): the logsumexp of each
    query's scaled scores, saved for backward)."""
    qkv = _f32(qkv, "qkv")
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be (B, T, 3C), got shape {qkv.shape}")
    B, T, C3 = qkv.shape
    out = np.empty((B, T, C3 // 3), np.float32) if out is None else out
    lse = np.empty((B, int(n_head), T), np.float32) if lse is None else lse
    _C.attention_forward(out, lse, qkv, int(n_head))
    return out, lse


def attention_backward(dout, qkv, out, lse, n_head: int, dqkv=None) -> np.ndarray:
    """Gradient w.r.t. qkv (B, T, 3C), accumulated into dqkv."""
    dqkv = _out(dqkv, "dqkv", _f32(qkv, "qkv").shape)
    _C.attention_backward(dqkv, dout, qkv, out, lse, int(n_head))
    return dqkv


def attention_kv_forward(qkv, kcache, vcache, pos, out=None) -> np.ndarray:
    """Inference attention with a KV cache: qkv (B, Tn, 3C) of Tn new tokens per sequence; their keys and values
    are written into kcache/vcache (B, NH, max_T, hs) at positions pos[b] .. pos[b]+Tn-1, then each new query
    attends causally to its sequence's cache. Returns out (B, Tn, C). pos is not advanced."""
    qkv = _f32(qkv, "qkv")
    out = np.empty((*qkv.shape[:2], qkv.shape[2] // 3), np.float32) if out is None else out
    _C.attention_kv_forward(out, kcache, vcache, qkv, _ids(pos, "pos"))
    return out


# ---- softmax + cross-entropy ---------------------------------------------------------------------------


def softmax_ce(logits, targets, grad_scale: float = 1.0, ignore_index: int = IGNORE_INDEX, backward: bool = True,
               inplace: bool = False, losses=None, row_weights=None):
    """Per-row loss and dlogits = (softmax - onehot) * grad_scale for logits (..., V), targets (...).

    Rows whose target equals `ignore_index` get loss 0 and zero gradient. With inplace=True dlogits
    overwrites logits (no extra N x V buffer). row_weights (float32, shaped like targets) scales each row's
    gradient (grad_scale * row_weights[n]: the gradient of sum_n w[n] * loss[n]); losses are unchanged.
    Returns (losses, dlogits or None); dlogits is written (=), not accumulated.
    """
    logits = _f32(logits, "logits")
    targets = _ids(targets, "targets")
    rw = _row_weights(row_weights, targets)
    V = logits.shape[-1]
    losses = np.empty(targets.shape, np.float32) if losses is None else losses
    dlogits = None
    if backward:
        dlogits = logits if inplace else np.empty_like(logits)
    _C.softmax_ce(losses.reshape(-1), None if dlogits is None else dlogits.reshape(-1, V), logits.reshape(-1, V),
                  targets.reshape(-1), float(grad_scale), int(ignore_index), rw)
    return losses, dlogits


def lmhead_chunk_rows(n_rows: int, vocab_size: int, dtype: str = "float32") -> int:
    """Rows of lmhead_ce's default scratch for n_rows rows (what the CPU kernel uses when none is given)."""
    _np_dtype(dtype)
    return int(_C.lmhead_chunk_rows(int(n_rows), int(vocab_size)))


def lmhead_ce(hidden, weight, targets, grad_scale: float = 1.0, ignore_index: int = IGNORE_INDEX,
              backward: bool = True, dhidden=None, dweight=None, row_weights=None, scratch=None, losses=None):
    """Fused lm-head + cross-entropy: logits = hidden (..., C) @ weight (V, C)^T, computed in chunks of rows into
    `scratch` (rows, V) (allocated per call if None: pass one, of lmhead_chunk_rows rows, to reuse it) and never
    materialised whole. Returns (losses (...), dhidden (..., C) or None, dweight (V, C) or None); gradients
    accumulate. With row_weights (float32, shaped like targets) the gradients are those of
    grad_scale * sum_n w[n] * loss[n]."""
    hidden, weight = _f32(hidden, "hidden"), _f32(weight, "weight")
    targets = _ids(targets, "targets")
    rw = _row_weights(row_weights, targets)
    C = hidden.shape[-1]
    losses = np.empty(targets.shape, np.float32) if losses is None else losses
    if backward:
        dhidden = _out(dhidden, "dhidden", hidden.shape)
        dweight = _out(dweight, "dweight", weight.shape)
    else:
        dhidden = dweight = None
    _C.lmhead_ce(losses.reshape(-1), None if dhidden is None else dhidden.reshape(-1, C), dweight,
                 hidden.reshape(-1, C), weight, targets.reshape(-1), float(grad_scale), int(ignore_index), scratch, rw)
    return losses, dhidden, dweight


# ---- layernorm, gelu, residual -------------------------------------------------------------------------


def layernorm_forward(x, weight, bias, eps: float = 1e-5, out=None, mean=None, rstd=None):
    """LayerNorm over the last axis: x (..., C) -> (out, mean (...), rstd (...))."""
    x = _f32(x, "x")
    C = x.shape[-1]
    out = np.empty_like(x) if out is None else out
    mean = np.empty(x.shape[:-1], np.float32) if mean is None else mean
    rstd = np.empty(x.shape[:-1], np.float32) if rstd is None else rstd
    _C.layernorm_forward(out.reshape(-1, C), mean.reshape(-1), rstd.reshape(-1), x.reshape(-1, C), weight, bias,
                         float(eps))
    return out, mean, rstd


def layernorm_backward(dout, x, weight, mean, rstd, dx=None, dweight=None, dbias=None):
    """Gradients of layernorm_forward, accumulated: returns (dx, dweight, dbias)."""
    x = _f32(x, "x")
    C = x.shape[-1]
    dx = _out(dx, "dx", x.shape)
    dweight = _out(dweight, "dweight", (C,))
    dbias = _out(dbias, "dbias", (C,))
    _C.layernorm_backward(dx.reshape(-1, C), dweight, dbias, _f32(dout, "dout").reshape(-1, C), x.reshape(-1, C),
                          weight, mean.reshape(-1), rstd.reshape(-1))
    return dx, dweight, dbias


def gelu_forward(x, out=None) -> np.ndarray:
    """GELU with the tanh approximation (GPT-2), element-wise; out may be x itself."""
    out = np.empty_like(_f32(x, "x")) if out is None else out
    _C.gelu_forward(out, x)
    return out


def gelu_backward(dout, x, dx=None) -> np.ndarray:
    """dx += gelu'(x) * dout."""
    dx = _out(dx, "dx", _f32(x, "x").shape)
    _C.gelu_backward(dx, dout, x)
    return dx


def residual_forward(a, b, out=None) -> np.ndarray:
    """out = a + b (the skip connection); out may be a or b itself."""
    out = np.empty_like(_f32(a, "inp1")) if out is None else out
    _C.residual_forward(out, a, b)
    return out


def residual_backward(dout, dinp1=None, dinp2=None):
    """dinp1 += dout, dinp2 += dout (the gradients of both inputs of residual_forward)."""
    dout = _f32(dout, "dout")
    dinp1, dinp2 = _out(dinp1, "dinp1", dout.shape), _out(dinp2, "dinp2", dout.shape)
    _C.residual_backward(dinp1, dinp2, dout)
    return dinp1, dinp2


# ---- embedding -----------------------------------------------------------------------------------------


def embedding_forward(tokens, wte, wpe, out=None) -> np.ndarray:
    """out (B, T, C) = wte[tokens] + wpe[:T] for tokens (B, T)."""
    tokens = _ids(tokens, "tokens")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tokens.shape}")
    out = np.empty((*tokens.shape, _f32(wte, "wte").shape[-1]), np.float32) if out is None else out
    _C.embedding_forward(out, tokens, wte, wpe)
    return out


def embedding_backward(dout, tokens, dwte, dwpe):
    """Scatter-add dout (B, T, C) into dwte (V, C) and dwpe (max_T, C), deterministically; returns them."""
    _C.embedding_backward(dwte, dwpe, dout, _ids(tokens, "tokens"))
    return dwte, dwpe


# ---- optimizer -----------------------------------------------------------------------------------------


def adamw_step(params, grads, m, v, lr: float, t: int, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
               weight_decay: float = 0.0, grad_scale: float = 1.0, params_copy=None) -> None:
    """One AdamW step in place on float32 params, m, v (step t >= 1) with grads * grad_scale; params_copy
    (optional: float32, or bf16 bit patterns) receives the updated parameters."""
    _C.adamw_step(params, m, v, grads, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                  int(t), float(grad_scale))
    if params_copy is not None:
        if params_copy.dtype == np.uint16:
            _C.float_to_bf16(params_copy, params)
        else:
            copy_(params_copy, params)
