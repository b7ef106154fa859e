"""Thin numpy wrappers over the native kernels (fastllm._C): each one allocates its outputs (or takes
`out=` buffers so a training step allocates nothing), reshapes to the kernel's 2-D view, and calls.

Validation happens once, in the native binding: a wrong dtype raises TypeError, a wrong shape,
non-contiguous array or out-of-range token id raises ValueError, each naming the argument.
Float arrays must already be float32 (no silent copies); token ids may be any integer dtype and are
converted to int32 (floats raise TypeError).

Backward functions ACCUMULATE (+=) into the gradient buffers they are given (zero them first), like
llm.c; when a gradient buffer is not given, a zeroed one is allocated and returned.
"""

from __future__ import annotations

import numpy as np

from . import _C

IGNORE_INDEX = -1


def _ids(x, name: str) -> np.ndarray:
    """Token ids as a C-contiguous int32 array; TypeError for non-integers, ValueError if beyond int32."""
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
    if x.dtype != np.int32:
        if x.size and (x.min() < np.iinfo(np.int32).min or x.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{name} has values outside the int32 range")
        x = x.astype(np.int32)
    return np.ascontiguousarray(x)


def _f32(x, name: str) -> np.ndarray:
    """A float32 ndarray as given (no copy); the binding rejects other dtypes and layouts."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy float32 array, got {type(x).__name__}")
    return x


def _view(a, n: int | None = None):
    """a as the kernel's (rows, n) matrix, or flat vector when n is None: always a view. What cannot be viewed so
    (not an ndarray, not C-contiguous, last axis not n) goes to the kernel unchanged, which rejects it naming the
    argument; reshape would copy a strided output (the kernel would fill the copy) or fail (reshape(-1, 0))."""
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous or a.ndim == 0 or n not in (None, a.shape[-1]):
        return a
    return a.reshape(-1) if n is None else a.reshape(a.size // n if n else int(np.prod(a.shape[:-1])), n)


def _row_weights(w, targets: np.ndarray):
    """Optional per-row gradient weights shaped like targets, flattened for the kernel (which checks dtype)."""
    if w is None:
        return None
    w = _f32(w, "row_weights")
    if w.shape != targets.shape:
        raise ValueError(f"row_weights must have the shape of targets {targets.shape}, got {w.shape}")
    return w.reshape(-1)


def _zeros_like_or(buf, like: np.ndarray) -> np.ndarray:
    return np.zeros(like.shape, np.float32) if buf is None else buf


# ---- matmul --------------------------------------------------------------------------------------------


def matmul_forward(inp, weight, bias=None, out=None) -> np.ndarray:
    """out (..., OC) = inp (..., C) @ weight (OC, C)^T + bias (OC).

    >>> matmul_forward(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)).shape
    (2, 4)
    """
    inp, weight = _f32(inp, "inp"), _f32(weight, "weight")
    lead, C = inp.shape[:-1], inp.shape[-1] if inp.ndim else 0
    OC = weight.shape[0] if weight.ndim == 2 else 0
    if out is None:
        out = np.empty((*lead, OC), np.float32)
    _C.matmul_forward(_view(out, OC), _view(inp, C), weight, bias)
    return out


def to_bf16(x) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16, same shape), rounded to nearest even."""
    x = np.ascontiguousarray(_f32(x, "x"))
    out = np.empty(x.shape, np.uint16)
    _C.float_to_bf16(out, x)
    return out


def from_bf16(x) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32 (exact)."""
    return (np.asarray(x, np.uint16).astype(np.uint32) << 16).view(np.float32)


def matmul_forward_bf16w(inp, weight16, bias=None, out=None) -> np.ndarray:
    """matmul_forward with bf16 weights (uint16 bit patterns from to_bf16, shape (OC, C)) for inference: inp is
    rounded to bf16 too, products are exact and sums fp32 (AVX-512 BF16 dot products where the CPU has them)."""
    inp = _f32(inp, "inp")
    lead, C = inp.shape[:-1], inp.shape[-1] if inp.ndim else 0
    OC = weight16.shape[0] if getattr(weight16, "ndim", 0) == 2 else 0
    if out is None:
        out = np.empty((*lead, OC), np.float32)
    _C.matmul_forward_bf16w(_view(out, OC), _view(np.ascontiguousarray(inp), C), weight16, bias)
    return out


def matmul_backward(dout, inp, weight, dinp=None, dweight=None, dbias=None, need_dinp=True, need_bias=True):
    """Gradients of matmul_forward, accumulated: returns (dinp, dweight, dbias)."""
    dout, inp, weight = _f32(dout, "dout"), _f32(inp, "inp"), _f32(weight, "weight")
    C, OC = inp.shape[-1], weight.shape[0]
    if need_dinp:
        dinp = _zeros_like_or(dinp, inp)
    dweight = _zeros_like_or(dweight, weight)
    if need_bias and dbias is None:
        dbias = np.zeros(OC, np.float32)
    _C.matmul_backward(
        None if dinp is None else _view(dinp, C), dweight, dbias, _view(dout, OC), _view(inp, C),
        weight,
    )
    return dinp, dweight, dbias


# ---- attention -----------------------------------------------------------------------------------------


def attention_forward(qkv, n_head: int, out=None, lse=None):
    """Causal self-attention on packed qkv (B, T, 3C) -> (out (B, T, C), lse (B, NH, T))."""
    qkv = _f32(qkv, "qkv")
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be (B, T, 3C), got shape {qkv.shape}")
    B, T, C3 = qkv.shape
    n_head = int(n_head)
    if out is None:
        out = np.empty((B, T, C3 // 3), np.float32)
    if lse is None:  # (for an impossible n_head, a placeholder: the kernel names the problem)
        lse = np.empty((B, n_head, T) if 0 < n_head <= C3 // 3 else 0, np.float32)
    _C.attention_forward(out, lse, qkv, n_head)
    return out, lse


def attention_backward(dout, qkv, out, lse, n_head: int, dqkv=None) -> np.ndarray:
    """Gradient w.r.t. qkv (B, T, 3C), accumulated into dqkv."""
    dqkv = _zeros_like_or(dqkv, _f32(qkv, "qkv"))
    _C.attention_backward(dqkv, dout, qkv, out, lse, int(n_head))
    return dqkv


# ---- softmax + cross-entropy ---------------------------------------------------------------------------


def softmax_cross_entropy(logits, targets, grad_scale: float = 1.0, ignore_index: int = IGNORE_INDEX,
                          backward: bool = True, inplace: bool = False, losses=None, row_weights=None):
    """Per-row loss and dlogits = (softmax - onehot) * grad_scale for logits (..., V), targets (...).

    Rows whose target equals `ignore_index` get loss 0 and zero gradient. With inplace=True dlogits
    overwrites logits (no extra N x V buffer). row_weights (float32, shaped like targets) scales each row's
    gradient (grad_scale * row_weights[n]: the gradient of sum_n w[n] * loss[n]); losses are unchanged.
    Returns (losses, dlogits or None).
    """
    logits = _f32(logits, "logits")
    targets = _ids(targets, "targets")
    rw = _row_weights(row_weights, targets)
    V = logits.shape[-1]
    if losses is None:
        losses = np.empty(targets.shape, np.float32)
    dlogits = None
    if backward:
        dlogits = logits if inplace else np.empty_like(logits)
    _C.softmax_ce(
        _view(losses), None if dlogits is None else _view(dlogits, V), _view(logits, V),
        _view(targets), float(grad_scale), int(ignore_index), rw,
    )
    return losses, dlogits


def lmhead_cross_entropy(hidden, weight, targets, grad_scale: float = 1.0, ignore_index: int = IGNORE_INDEX,
                         backward: bool = True, dhidden=None, dweight=None, chunk_rows: int = 256,
                         row_weights=None):
    """Fused lm-head + cross-entropy: logits = hidden (..., C) @ weight (V, C)^T, never materialised whole.

    Returns (losses (...), dhidden (..., C) or None, dweight (V, C) or None); gradients accumulate. With
    row_weights (float32, shaped like targets) the gradients are those of grad_scale * sum_n w[n] * loss[n].
    """
    hidden, weight = _f32(hidden, "hidden"), _f32(weight, "weight")
    targets = _ids(targets, "targets")
    rw = _row_weights(row_weights, targets)
    C = hidden.shape[-1]
    losses = np.empty(targets.shape, np.float32)
    if backward:
        dhidden = _zeros_like_or(dhidden, hidden)
        dweight = _zeros_like_or(dweight, weight)
    else:
        dhidden = dweight = None
    _C.lmhead_ce(
        _view(losses), None if dhidden is None else _view(dhidden, C), dweight, _view(hidden, C),
        weight, _view(targets), float(grad_scale), int(ignore_index), int(chunk_rows), rw,
    )
    return losses, dhidden, dweight


# ---- layernorm, gelu, residual -------------------------------------------------------------------------


def layernorm_forward(x, weight, bias, eps: float = 1e-5, out=None, mean=None, rstd=None):
    """LayerNorm over the last axis: x (..., C) -> (out, mean (...), rstd (...))."""
    x = _f32(x, "x")
    C = x.shape[-1]
    out = np.empty_like(x) if out is None else out
    mean = np.empty(x.shape[:-1], np.float32) if mean is None else mean
    rstd = np.empty(x.shape[:-1], np.float32) if rstd is None else rstd
    _C.layernorm_forward(_view(out, C), _view(mean), _view(rstd), _view(x, C), weight, bias,
                         float(eps))
    return out, mean, rstd


def layernorm_backward(dout, x, weight, mean, rstd, dx=None, dweight=None, dbias=None):
    """Gradients of layernorm_forward, accumulated: returns (dx, dweight, dbias)."""
    x = _f32(x, "x")
    C = x.shape[-1]
    dx = _zeros_like_or(dx, x)
    dweight = _zeros_like_or(dweight, weight)
    dbias = _zeros_like_or(dbias, weight)
    _C.layernorm_backward(_view(dx, C), dweight, dbias, _view(_f32(dout, "dout"), C), _view(x, C),
                          weight, _view(mean), _view(rstd))
    return dx, dweight, dbias


def gelu_forward(x, out=None) -> np.ndarray:
    """GELU with the tanh approximation (GPT-2), element-wise."""
    out = np.empty_like(_f32(x, "x")) if out is None else out
    _C.gelu_forward(out, x)
    return out


def gelu_backward(dout, x, dx=None) -> np.ndarray:
    dx = _zeros_like_or(dx, _f32(x, "x"))
    _C.gelu_backward(dx, x, dout)
    return dx


def residual_forward(a, b, out=None) -> np.ndarray:
    out = np.empty_like(_f32(a, "inp1")) if out is None else out
    _C.residual_forward(out, a, b)
    return out


def residual_backward(dout, da=None, db=None):
    dout = _f32(dout, "dout")
    da, db = _zeros_like_or(da, dout), _zeros_like_or(db, dout)
    _C.residual_backward(da, db, dout)
    return da, db


# ---- embedding -----------------------------------------------------------------------------------------


def embedding_forward(tokens, wte, wpe, out=None) -> np.ndarray:
    """out (B, T, C) = wte[tokens] + wpe[:T] for tokens (B, T)."""
    tokens = _ids(tokens, "tokens")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tokens.shape}")
    if out is None:
        out = np.empty((*tokens.shape, _f32(wte, "wte").shape[-1]), np.float32)
    _C.embedding_forward(out, tokens, wte, wpe)
    return out


def embedding_backward(dout, tokens, dwte, dwpe):
    """Scatter-add dout (B, T, C) into dwte (V, C) and dwpe (max_T, C), deterministically."""
    _C.embedding_backward(dwte, dwpe, dout, _ids(tokens, "tokens"))
    return dwte, dwpe


# ---- optimizer -----------------------------------------------------------------------------------------


def adamw_step(params, grads, m, v, lr: float, t: int, beta1: float = 0.9, beta2: float = 0.95,
               eps: float = 1e-8, weight_decay: float = 0.0, grad_scale: float = 1.0) -> None:
    """One AdamW step in place on params, m, v (step t >= 1); grads are multiplied by grad_scale first."""
    _C.adamw_step(params, m, v, grads, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
                  int(t), float(grad_scale))


def global_norm(*arrays) -> float:
    """sqrt of the sum of squares over all arrays (float32 in, double accumulation)."""
    return float(np.sqrt(sum(_C.sum_squares(a) for a in arrays)))


def attention_kv_forward(qkv, kcache, vcache, pos, out=None) -> np.ndarray:
    """Inference attention with a KV cache: qkv (B, Tn, 3C) of Tn new tokens per sequence; their keys and values
    are written into kcache/vcache (B, NH, max_T, hs) at positions pos[b] .. pos[b]+Tn-1, then each new query
    attends causally to its sequence's cache. Returns out (B, Tn, C). pos is not advanced."""
    qkv = _f32(qkv, "qkv")
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be (B, Tn, 3C), got shape {qkv.shape}")
    if out is None:
        out = np.empty((*qkv.shape[:2], qkv.shape[2] // 3), np.float32)
    _C.attention_kv_forward(out, kcache, vcache, qkv, _ids(pos, "pos"))
    return out
