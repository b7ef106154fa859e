"""The GPU backend: GPU arrays and the GPU twins of the CPU ops in `fastllm.ops`, with the same functions,
arguments and meaning (the contract is in fastllm/backend.py: inputs first, outputs returned and optionally
passed in; forward ops overwrite, backward ops ACCUMULATE (+=) into the gradients they are given).

Arrays are `DeviceArray`s (dense, row-major; float32, bfloat16 or int32) made with `empty`, `zeros`,
`to_device` or `from_dlpack` (zero-copy from torch/cupy). Activations and weights have one dtype per call
(float32 or bfloat16, fp32 accumulation inside); parameter gradients, layernorm statistics, logsumexp and
losses are float32. Launches are asynchronous; `synchronize()` waits, `to_numpy(x)` (x.numpy()) copies back.
Token ids and positions may be given as numpy arrays: they are range-checked on the host and uploaded (the
kernels cannot raise).

>>> from fastllm import cuda
>>> if cuda.is_available():
...     x = cuda.to_device(np.ones((4, 8), np.float32), dtype="bfloat16")
...     cuda.gelu_forward(x).numpy()
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from . import _C
from .ops import (
    IGNORE_INDEX,
    _heads,
    _ids,
    _kv_out_width,
    _nkv,
    _norm_stats_shape,
    _q_width,
    attention_opts,
    scale_arg,
    softcap_arg,
    temperature_arg,
)


def is_built() -> bool:
    """True if this fastllm was compiled with its CUDA kernels."""
    return hasattr(_C, "cuda")


def is_available() -> bool:
    """True if the CUDA kernels are built and a GPU is visible."""
    return is_built() and _C.cuda.device_count() > 0


class CudaUnavailableError(RuntimeError):
    """fastllm has no CUDA build, or no GPU is visible."""


def _require() -> Any:
    if not is_built():
        raise CudaUnavailableError("fastllm was built without CUDA (no CUDA toolkit at install time; see "
                                   "FASTLLM_CUDA)")
    if _C.cuda.device_count() == 0:
        raise CudaUnavailableError("no CUDA GPU is available (fastllm was built with CUDA, but the driver reports "
                                   "none)")
    return _C.cuda


if is_built():
    DeviceArray = _C.cuda.DeviceArray
else:  # a placeholder type so isinstance() checks and annotations work on CPU-only builds

    class DeviceArray:  # type: ignore[no-redef]
        def __init__(self, *args, **kwargs):
            _require()


def _dev(x, name: str) -> DeviceArray:
    """x unchanged if it is a DeviceArray; a clear TypeError otherwise (numpy arrays are not copied silently)."""
    if not isinstance(x, DeviceArray):
        raise TypeError(f"{name} must be a fastllm.cuda.DeviceArray on the GPU, got {type(x).__name__}"
                        " (copy host arrays with fastllm.cuda.to_device)")
    return x


def _opt(x, name: str):
    return None if x is None else _dev(x, name)


# ---- arrays -------------------------------------------------------------------------------------------------


def empty(shape, dtype: str = "float32") -> DeviceArray:
    """Uninitialised GPU memory; shape is a tuple or an int, as in numpy."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    return _require().DeviceArray(shape, dtype)


def zeros(shape, dtype: str = "float32") -> DeviceArray:
    a = empty(shape, dtype)
    a.zero_()
    return a


def carve(specs: dict[str, tuple[tuple[int, ...], str]], align: int = 256) -> dict[str, DeviceArray]:
    """One allocation for many buffers: {name: (shape, dtype)} -> {name: DeviceArray view}, each view starting
    at a multiple of `align` bytes (so every 16-byte vector path applies). The views keep the allocation alive."""
    sizes = {"float32": 4, "int32": 4, "bfloat16": 2}
    offsets, total = {}, 0
    for name, (shape, dtype) in specs.items():
        if dtype not in sizes:
            raise TypeError(f"dtype of {name} must be one of {sorted(sizes)}, got {dtype!r}")
        offsets[name] = total
        nbytes = sizes[dtype] * math.prod(int(d) for d in shape)
        total += -(-nbytes // align) * align
    arena = empty((max(total, 4) // 4,), "float32")
    return {name: arena.view_as(offsets[name], shape, dtype) for name, (shape, dtype) in specs.items()}


def view(x, offset: int, shape) -> DeviceArray:
    """The elements [offset, offset + prod(shape)) of x as an array of `shape`, sharing x's memory."""
    return _dev(x, "x").view(int(offset), tuple(shape))


def to_device(array, dtype: str | None = None) -> DeviceArray:
    """Copy a numpy array (float32 or int32; int64 token ids are checked and narrowed) to the GPU; float32 may be
    stored as bfloat16 (round to nearest even)."""
    a = np.asarray(array)
    if a.dtype.kind in "iu" and a.dtype != np.int32:
        if a.size and (a.min() < np.iinfo(np.int32).min or a.max() > np.iinfo(np.int32).max):
            raise ValueError("integer array does not fit in int32")
        a = a.astype(np.int32)
    elif a.dtype == np.float64:
        a = a.astype(np.float32)
    # np.asarray(order="C"), not np.ascontiguousarray: the latter turns a 0-d array into shape (1,)
    return _require().from_numpy(np.asarray(a, order="C"), dtype)


def to_numpy(x) -> np.ndarray:
    """A numpy copy (bfloat16 -> float32); waits for the kernels that write x."""
    return _dev(x, "x").numpy()


def from_dlpack(obj) -> DeviceArray:
    """Wrap a CUDA tensor (torch, cupy, ... anything with __dlpack__) without copying; it must be dense,
    row-major, and float32, bfloat16 or int32. The DeviceArray keeps the producer's memory alive."""
    return _require().from_dlpack(obj)


def synchronize() -> None:
    _require().synchronize()


def copy_(dst, src) -> None:
    """dst = src: a numpy array or DeviceArray of the same shape; float32 <-> bfloat16 converts."""
    _dev(dst, "dst").copy_(src)


def zero_(x) -> None:
    _dev(x, "x").zero_()


def add_(dst, src) -> None:
    """dst += src (same shape and dtype)."""
    dst, src = _dev(dst, "dst"), _dev(src, "src")  # checked before _C.cuda is looked up (CPU-only builds)
    _C.cuda.add_(dst, src)


def sum_squares(x) -> float:
    x = _dev(x, "x")
    return float(_C.cuda.sum_squares(x))


def global_norm(*arrays) -> float:
    """sqrt of the sum of squares over all arrays (synchronises)."""
    return float(np.sqrt(sum(sum_squares(a) for a in arrays)))


def _on_device(x, name: str, V: int | None = None, allow=None) -> DeviceArray:
    """Token ids / positions: a DeviceArray as is; a numpy array checked (int32, and ids in [0, V) or == allow when
    V is given, since the GPU kernels cannot raise) and uploaded."""
    if isinstance(x, DeviceArray):
        return x
    ids = _ids(x, name)
    if V is not None and ids.size:
        bad = ((ids < 0) | (ids >= V)) & (ids != allow)
        if bad.any():
            raise ValueError(f"{name} holds id {int(ids[bad][0])} outside [0, {V})")
    return to_device(ids)


# ---- kernels (see csrc/cuda/kernels.h for the exact contract) ----------------------------------------------


def gemm(a, b, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0, out=None, accumulate: bool = False,
         bias=None, pre_gelu=None):
    """out (M, N) = alpha * op(a) @ op(b) [+ bias] (accumulate: out +=); op(a) = a (M, K) or a.T for a stored (K, M)
    if trans_a; likewise b. a, b, bias: float32 or bfloat16 (same); out: float32 or a's dtype (allocated as a's when
    None). With pre_gelu: pre_gelu = alpha*a@b+bias and out = gelu(pre_gelu). The GEMM under matmul; the model's
    small products (LoRA's adapters). Returns out."""
    a, b = _dev(a, "a"), _dev(b, "b")
    if out is None:
        M = a.shape[1 if trans_a else 0] if len(a.shape) == 2 else 0
        out = zeros((M, b.shape[0 if trans_b else 1] if len(b.shape) == 2 else 0), a.dtype)
    arrays = _dev(out, "out"), a, b, _opt(bias, "bias"), _opt(pre_gelu, "pre_gelu")
    _C.cuda.gemm(*arrays, bool(trans_a), bool(trans_b), bool(accumulate), float(alpha))  # checked first: CPU-only
    return out


def gemm_impl(name: str | None = None) -> str:
    """The GEMM kernel in use: 'auto' (bf16 tensor cores when operands are 16-byte aligned with row strides
    that are multiples of 8, else the FFMA kernel), 'simple' (always the FFMA reference kernel) or 'tc1' (the
    tensor-core build for 1 block/SM, for benchmarks). With `name`, selects it and returns the previous one.
    The initial value comes from $FASTLLM_CUDA_GEMM (default 'auto')."""
    old = _require().gemm_impl()
    if name is not None:
        _C.cuda.set_gemm_impl(str(name))
    return old


def matmul_forward(inp, weight, bias=None, out=None, pre_gelu=None) -> DeviceArray:
    """out (..., OC) = inp (..., C) @ weight (OC, C)^T + bias (OC); with pre_gelu (..., OC): pre_gelu = that
    product and out = gelu(pre_gelu). out (and pre_gelu) may be float32 or inp's dtype (default: inp's)."""
    inp, weight = _dev(inp, "inp"), _dev(weight, "weight")
    OC = weight.shape[0] if len(weight.shape) == 2 else 0
    if out is None:
        out = empty((*inp.shape[:-1], OC), inp.dtype)
    _C.cuda.matmul_forward(_dev(out, "out"), inp, weight, _opt(bias, "bias"), _opt(pre_gelu, "pre_gelu"))
    return out


def matmul_backward(dout, inp, weight, dinp=None, dweight=None, dbias=None, need_dinp=True, need_bias=True,
                    need_weight=True):
    """Gradients of matmul_forward, accumulated: dinp (..., C) += dout @ weight, dweight (OC, C, float32) +=
    dout^T @ inp, dbias (OC, float32) += column sums of dout. Returns (dinp, dweight, dbias); need_*=False skip
    those (returned as None; need_weight=False: a frozen weight)."""
    dout, inp, weight = _dev(dout, "dout"), _dev(inp, "inp"), _dev(weight, "weight")
    if need_dinp and dinp is None:
        dinp = zeros(inp.shape, inp.dtype)
    if need_weight and dweight is None:
        dweight = zeros(weight.shape, "float32")
    if need_bias and dbias is None:
        dbias = zeros(weight.shape[:1], "float32")
    _C.cuda.matmul_backward(_opt(dinp, "dinp") if need_dinp else None, _opt(dweight, "dweight") if need_weight
                            else None, _opt(dbias, "dbias") if need_bias else None, dout, inp, weight)
    return (dinp if need_dinp else None), (dweight if need_weight else None), (dbias if need_bias else None)


def attention_forward(qkv, n_head: int, out=None, lse=None, n_kv_head: int | None = None, *,
                      scale: float | None = None, softcap: float | None = None, window: int | None = None):
    """Causal flash attention: qkv (B, T, (NH + 2*NKV) * hs) = [q | k | v] -> (out (B, T, NH*hs), lse (B, NH, T,
    float32, natural log, of the final scores)). n_kv_head (NKV, dividing n_head; None = n_head, qkv (B, T, 3C)):
    grouped-query attention, query head h uses kv head h // (NH // NKV), K/V never repeated. Head size hs <= 256.
    bfloat16 with hs 64 or 128 runs the tensor-core kernels; other cases (and FASTLLM_CUDA_ATTN=simple in the
    environment) the simple reference ones. scale, softcap, window: the score options of ops.attention_forward."""
    opts = attention_opts(scale, softcap, window)
    qkv = _dev(qkv, "qkv")
    if len(qkv.shape) != 3:
        raise ValueError(f"qkv must be (B, T, (n_head + 2*n_kv_head) * hs), got shape {tuple(qkv.shape)}")
    B, T = qkv.shape[:2]
    out = empty((B, T, _q_width(qkv, n_head, n_kv_head)), qkv.dtype) if out is None else out
    lse = empty((B, int(n_head), T), "float32") if lse is None else lse
    _C.cuda.attention_forward(_dev(out, "out"), _dev(lse, "lse"), qkv, int(n_head), _nkv(n_kv_head), **opts)
    return out, lse


def attention_backward(dout, qkv, out, lse, n_head: int, dqkv=None, n_kv_head: int | None = None, *,
                       scale: float | None = None, softcap: float | None = None, window: int | None = None):
    """dqkv (B, T, (NH + 2*NKV) * hs) += gradient of attention_forward (out, lse: its outputs; scale, softcap,
    window as given to it); dk, dv of a kv head sum over the query heads that share it. The tensor-core path adds
    dq through fp32 atomics (its bits may vary from run to run); the simple path is deterministic."""
    opts = attention_opts(scale, softcap, window)
    qkv = _dev(qkv, "qkv")
    dqkv = zeros(qkv.shape, qkv.dtype) if dqkv is None else dqkv
    _C.cuda.attention_backward(_dev(dqkv, "dqkv"), _dev(dout, "dout"), qkv, _dev(out, "out"), _dev(lse, "lse"),
                               int(n_head), _nkv(n_kv_head), **opts)
    return dqkv


def _positions(pos, name: str, n_new: int, limit: int, what: str, window: int | None = None):
    """pos (B,) as a DeviceArray: a numpy array is checked (0 <= pos[b] and pos[b] + n_new <= limit, or with a
    window a ring of limit >= window + n_new - 1 rows: kv_rows_fit in csrc/common.h) and uploaded; a DeviceArray is
    used as is (the kernels skip positions out of range, never read or write outside)."""
    if isinstance(pos, DeviceArray):
        return pos
    p = _ids(pos, name)
    ring = bool(window) and limit >= window + n_new - 1  # every position fits the ring (modulo limit)
    if p.size and (p.min() < 0 or (p.max() + n_new > limit and not ring)):
        why = f" (or a ring cache with window={window}: {what} >= window + {n_new} - 1)" if window else ""
        raise ValueError(f"{name} + {n_new} new tokens must lie in [0, {what}={limit}]{why}, got {name} {p.tolist()}")
    return to_device(p)


def attention_kv_forward(qkv, kcache, vcache, pos, out=None, n_kv_head: int | None = None, *,
                         scale: float | None = None, softcap: float | None = None, window: int | None = None):
    """KV-cache attention: writes the new keys/values of qkv (B, Tn, (NH + 2*NKV) * hs) into kcache/vcache
    (B, NKV, maxT, hs) at pos[b].. (int32 (B,); a numpy array is checked and uploaded; only the kv heads are
    stored), then out (B, Tn, NH*hs) = causal attention over each cache (new query t of row b sees positions 0 ..
    pos[b] + t). pos is not advanced. n_kv_head None means n_head (qkv (B, Tn, 3C)); given, it must equal
    kcache.shape[1]. scale, softcap, window as in attention_forward, positions absolute: position p is at row
    p % maxT, so with a window the cache may be a ring of maxT >= window + Tn - 1 rows (ops.attention_kv_forward).
    A DeviceArray pos is not checked: the caller ensures that on the host (0 <= pos[b] and pos[b] + Tn <= maxT, or the
    ring's rule); the kernels never write outside the caches (negative positions are skipped) nor read outside."""
    opts = attention_opts(scale, softcap, window)
    qkv, kcache = _dev(qkv, "qkv"), _dev(kcache, "kcache")
    if len(kcache.shape) == 4:
        Tn = qkv.shape[1] if len(qkv.shape) == 3 else 0
        pos = _positions(pos, "pos", Tn, kcache.shape[2], "max_T", opts["window"] or None)
    if out is None:
        out = empty((*qkv.shape[:2], _kv_out_width(qkv, kcache, n_kv_head)), qkv.dtype)
    _C.cuda.attention_kv_forward(_dev(out, "out"), kcache, _dev(vcache, "vcache"), qkv, _dev(pos, "pos"),
                                 _nkv(n_kv_head), **opts)
    return out


def softmax_ce(logits, targets, grad_scale: float = 1.0, ignore_index: int = IGNORE_INDEX, backward: bool = True,
               inplace: bool = False, losses=None, row_weights=None, softcap: float | None = None,
               temperature: float = 1.0):
    """Per-row loss (float32) and dlogits = (softmax - onehot) * grad_scale (* row_weights[n]) for logits (..., V),
    targets (...). Rows whose target is ignore_index get loss 0 and zero gradient; inplace=True writes dlogits
    over logits. softcap c: the logits are soft-capped first, c * tanh(logits / c) (fp32 math); temperature T:
    then divided by T (the loss of softmax(z / T), the gradient with respect to the logits). Returns (losses,
    dlogits or None); dlogits is written (=). A DeviceArray target outside [0, V) other than ignore_index gives a NaN
    loss (no wild read); numpy targets are checked on the host."""
    logits = _dev(logits, "logits")
    V = logits.shape[-1]
    targets = _on_device(targets, "targets", V, ignore_index)
    losses = empty(targets.shape, "float32") if losses is None else losses
    dlogits = (logits if inplace else empty(logits.shape, logits.dtype)) if backward else None
    rw = None if row_weights is None else _on_device_f32(row_weights, "row_weights")
    _C.cuda.softmax_ce(_dev(losses, "losses"), dlogits, logits, targets, float(grad_scale), int(ignore_index), rw,
                       softcap_arg(softcap), temperature_arg(temperature))
    return losses, dlogits


def lmhead_chunk_rows(n_rows: int, vocab_size: int, dtype: str = "bfloat16") -> int:
    """Rows of lmhead_ce's default scratch for n_rows rows (<= ~256 MiB)."""
    return int(_require().lmhead_chunk_rows(int(n_rows), int(vocab_size), dtype))


def lmhead_ce(hidden, weight, targets, grad_scale: float = 1.0, ignore_index: int = IGNORE_INDEX,
              backward: bool = True, dhidden=None, dweight=None, row_weights=None, scratch=None, losses=None,
              softcap: float | None = None, temperature: float = 1.0, need_weight: bool = True):
    """Fused classifier: logits = hidden (..., C) @ weight (V, C)^T in row chunks of `scratch` (rows, V) of hidden's
    dtype (allocated per call if None; pass one of lmhead_chunk_rows rows to reuse it), never N x V at once.
    Returns (losses (...), dhidden (..., C) or None, dweight (V, C, float32) or None); the gradients accumulate
    (need_weight=False: no dweight, a frozen lm-head).
    With row_weights (float32, shaped like targets) they are those of grad_scale * sum_n w[n] * loss[n].
    softcap c: the logits are c * tanh(logits / c), temperature T: then divided by T (see softmax_ce)."""
    hidden, weight = _dev(hidden, "hidden"), _dev(weight, "weight")
    targets = _on_device(targets, "targets", weight.shape[0], ignore_index)
    losses = empty(targets.shape, "float32") if losses is None else losses
    if backward:
        dhidden = zeros(hidden.shape, hidden.dtype) if dhidden is None else dhidden
        dweight = None if not need_weight else zeros(weight.shape, "float32") if dweight is None else dweight
    else:
        dhidden = dweight = None
    rw = None if row_weights is None else _on_device_f32(row_weights, "row_weights")
    _C.cuda.lmhead_ce(_dev(losses, "losses"), _opt(dhidden, "dhidden"), _opt(dweight, "dweight"), hidden, weight,
                      targets, float(grad_scale), int(ignore_index), _opt(scratch, "scratch"), rw, softcap_arg(softcap),
                      temperature_arg(temperature))
    return losses, dhidden, dweight


def _on_device_f32(x, name: str) -> DeviceArray:
    if isinstance(x, DeviceArray):
        return x
    a = np.asarray(x)
    if a.dtype != np.float32:
        raise TypeError(f"{name} must be float32, got dtype {a.dtype}")
    return to_device(a)


def layernorm_forward(x, weight, bias, eps: float = 1e-5, out=None, mean=None, rstd=None):
    """LayerNorm over the last axis: x (..., C) -> (out (..., C), mean, rstd (float32, x.shape[:-1])); weight, bias
    (C,) of x's dtype. out may be x itself."""
    x = _dev(x, "x")
    out = empty(x.shape, x.dtype) if out is None else out
    mean = empty(x.shape[:-1], "float32") if mean is None else mean
    rstd = empty(x.shape[:-1], "float32") if rstd is None else rstd
    _C.cuda.layernorm_forward(_dev(out, "out"), _dev(mean, "mean"), _dev(rstd, "rstd"), x, _dev(weight, "weight"),
                              _dev(bias, "bias"), float(eps))
    return out, mean, rstd


def layernorm_backward(dout, x, weight, mean, rstd, dx=None, dweight=None, dbias=None):
    """dx (..., C) +=, dweight/dbias (C, float32) += (deterministic: no float atomics). Returns (dx, dweight,
    dbias)."""
    x = _dev(x, "x")
    C = x.shape[-1]
    dx = zeros(x.shape, x.dtype) if dx is None else dx
    dweight = zeros((C,), "float32") if dweight is None else dweight
    dbias = zeros((C,), "float32") if dbias is None else dbias
    _C.cuda.layernorm_backward(_dev(dx, "dx"), _dev(dweight, "dweight"), _dev(dbias, "dbias"), _dev(dout, "dout"),
                               x, _dev(weight, "weight"), _dev(mean, "mean"), _dev(rstd, "rstd"))
    return dx, dweight, dbias


def _activation(kernel: str, x, out):
    """out = f(x) element-wise by _C.cuda.<kernel>(out, x) (a GELU); out may be x itself."""
    x = _dev(x, "x")
    out = empty(x.shape, x.dtype) if out is None else out
    getattr(_C.cuda, kernel)(_dev(out, "out"), x)
    return out


def _activation_backward(kernel: str, dout, x, dx):
    """dx += f'(x) * dout by _C.cuda.<kernel>(dx, dout, x)."""
    x = _dev(x, "x")
    dx = zeros(x.shape, x.dtype) if dx is None else dx
    getattr(_C.cuda, kernel)(_dev(dx, "dx"), _dev(dout, "dout"), x)
    return dx


def gelu_forward(x, out=None):
    """out = gelu(x), tanh approximation (GPT-2); out may be x itself."""
    return _activation("gelu_forward", x, out)


def gelu_backward(dout, x, dx=None):
    """dx += gelu'(x) * dout."""
    return _activation_backward("gelu_backward", dout, x, dx)


def gelu_erf_forward(x, out=None):
    """out = x Phi(x) = 0.5 x (1 + erf(x / sqrt(2))), the exact GELU (GPT-NeoX, Pythia); out may be x itself."""
    return _activation("gelu_erf_forward", x, out)


def gelu_erf_backward(dout, x, dx=None):
    """dx += (Phi(x) + x phi(x)) * dout."""
    return _activation_backward("gelu_erf_backward", dout, x, dx)


def residual_forward(a, b, out=None, scale: float = 1.0):
    """out = a + scale * b (same shape and dtype); out may be a or b itself."""
    a = _dev(a, "a")
    out = empty(a.shape, a.dtype) if out is None else out
    _C.cuda.residual_forward(_dev(out, "out"), a, _dev(b, "b"), scale_arg(scale))
    return out


def residual_backward(dout, dinp1=None, dinp2=None, scale: float = 1.0):
    """dinp1 += dout, dinp2 += scale * dout (the gradients of both inputs of residual_forward)."""
    dout = _dev(dout, "dout")
    dinp1 = zeros(dout.shape, dout.dtype) if dinp1 is None else dinp1
    dinp2 = zeros(dout.shape, dout.dtype) if dinp2 is None else dinp2
    _C.cuda.residual_backward(_dev(dinp1, "dinp1"), _dev(dinp2, "dinp2"), dout, scale_arg(scale))
    return dinp1, dinp2


def rmsnorm_forward(x, weight, eps: float = 1e-6, out=None, rstd=None, heads=None, cols=None):
    """RMSNorm over the last axis: x (..., C) -> (out = x * rstd * weight (x's dtype), rstd (x.shape[:-1], float32)),
    as HF LlamaRMSNorm (fp32 math); weight (C,) of x's dtype. out may be x itself. heads=(h0, h1): only the rows
    x[..., h0:h1, :] of x (..., R, C) (Qwen3's QK-norm on qkv viewed as (B, T, NH + 2*NKV, hs)), rstd (..., h1 - h0);
    cols=(c0, c1): only the columns x[..., c0:c1] (OLMo 2's QK-norm on qkv (B, T, W)), weight (c1 - c0,); the other
    rows (columns) of out are left as they are (a new out starts as a copy of x)."""
    x = _dev(x, "x")
    if out is None:
        out = empty(x.shape, x.dtype)
        if heads is not None or cols is not None:
            out.copy_(x)
    rstd = empty(_norm_stats_shape(x, heads, cols), "float32") if rstd is None else rstd
    _C.cuda.rmsnorm_forward(_dev(out, "out"), _dev(rstd, "rstd"), x, _dev(weight, "weight"), float(eps),
                            _heads(heads), _heads(cols))
    return out, rstd


def rmsnorm_backward(dout, x, weight, rstd, dx=None, dweight=None, heads=None, cols=None):
    """dx (..., C) +=, dweight (weight's shape, float32) += (deterministic: no float atomics); with heads (cols) only
    those rows (columns) of dx. dx may be dout itself (in place: its rows are replaced by the gradient, the others
    pass through). Returns (dx, dweight)."""
    x = _dev(x, "x")
    weight = _dev(weight, "weight")
    dx = zeros(x.shape, x.dtype) if dx is None else dx
    dweight = zeros(tuple(weight.shape), "float32") if dweight is None else dweight
    _C.cuda.rmsnorm_backward(_dev(dx, "dx"), _dev(dweight, "dweight"), _dev(dout, "dout"), x, weight,
                             _dev(rstd, "rstd"), _heads(heads), _heads(cols))
    return dx, dweight


def _rope_pos(pos, x, cos):
    """None, or pos (B,) on the GPU; numpy positions (and the implicit 0..T-1 of pos=None) are checked against the
    tables (pos[b] + T <= max_pos): the kernels skip rows beyond them, they cannot raise."""
    T = x.shape[1] if len(x.shape) == 3 else 0
    P = _dev(cos, "cos").shape[0] if len(cos.shape) == 2 else 0
    if pos is None:
        if T > P:
            raise ValueError(f"positions 0 .. {T - 1} (pos=None) are outside the cos/sin tables of {P} rows")
        return None
    return _positions(pos, "pos", T, P, "rows of the cos/sin tables")


def rope_forward(qkv, cos, sin, n_head: int, pos=None, out=None, n_kv_head: int | None = None):
    """Rotary position embedding of the q and k heads of packed qkv (B, T, (NH + 2*NKV) * hs), rotate-half layout (HF
    apply_rotary_pos_emb), fp32 math: token t of sequence b sits at position pos[b] + t (pos (B,), None = 0) and
    uses row p of the float32 tables cos, sin (max_pos, rotary_dim // 2) from fastllm.rope.rope_tables (uploaded
    once); the first rotary_dim dims of each q/k head rotate, the rest and v pass through. out may be qkv itself."""
    qkv = _dev(qkv, "qkv")
    out = empty(qkv.shape, qkv.dtype) if out is None else out
    _C.cuda.rope_forward(_dev(out, "out"), qkv, _dev(cos, "cos"), _dev(sin, "sin"), _rope_pos(pos, qkv, cos),
                         int(n_head), _nkv(n_kv_head))
    return out


def rope_backward(dout, cos, sin, n_head: int, pos=None, dqkv=None, n_kv_head: int | None = None):
    """Gradient of rope_forward: dqkv += R^T dout; dqkv may be dout itself (then dout is rotated back in place)."""
    dout = _dev(dout, "dout")
    dqkv = zeros(dout.shape, dout.dtype) if dqkv is None else dqkv
    _C.cuda.rope_backward(_dev(dqkv, "dqkv"), dout, _dev(cos, "cos"), _dev(sin, "sin"), _rope_pos(pos, dout, cos),
                          int(n_head), _nkv(n_kv_head))
    return dqkv


def swiglu_forward(gate_up, out=None):
    """SwiGLU: gate_up (..., 2H) = [gate | up] -> out (..., H) = silu(gate) * up (fp32 math)."""
    return _gated_forward(_C.cuda.swiglu_forward, gate_up, out)


def swiglu_backward(dout, gate_up, dgate_up=None):
    """dgate_up (..., 2H) += [dout * up * silu'(gate) | dout * silu(gate)]."""
    return _gated_backward(_C.cuda.swiglu_backward, dout, gate_up, dgate_up)


def geglu_forward(gate_up, out=None):
    """GeGLU (Gemma): gate_up (..., 2H) = [gate | up] -> out (..., H) = gelu_tanh(gate) * up (fp32 math)."""
    return _gated_forward(_C.cuda.geglu_forward, gate_up, out)


def geglu_backward(dout, gate_up, dgate_up=None):
    """dgate_up (..., 2H) += [dout * up * gelu_tanh'(gate) | dout * gelu_tanh(gate)]."""
    return _gated_backward(_C.cuda.geglu_backward, dout, gate_up, dgate_up)


def _gated_forward(kernel, gate_up, out):
    gate_up = _dev(gate_up, "gate_up")
    out = empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), gate_up.dtype) if out is None else out
    kernel(_dev(out, "out"), gate_up)
    return out


def _gated_backward(kernel, dout, gate_up, dgate_up):
    gate_up = _dev(gate_up, "gate_up")
    dgate_up = zeros(gate_up.shape, gate_up.dtype) if dgate_up is None else dgate_up
    kernel(_dev(dgate_up, "dgate_up"), _dev(dout, "dout"), gate_up)
    return dgate_up


def relu2_forward(x, out=None):
    """ReLU^2: out = max(x, 0)^2, element-wise; out may be x itself."""
    x = _dev(x, "x")
    out = empty(x.shape, x.dtype) if out is None else out
    _C.cuda.relu2_forward(_dev(out, "out"), x)
    return out


def relu2_backward(dout, x, dx=None):
    """dx += 2 max(x, 0) * dout."""
    x = _dev(x, "x")
    dx = zeros(x.shape, x.dtype) if dx is None else dx
    _C.cuda.relu2_backward(_dev(dx, "dx"), _dev(dout, "dout"), x)
    return dx


def embedding_forward(tokens, wte, wpe, out=None, scale: float = 1.0):
    """out (B, T, C) = wte[tokens] * scale + wpe[:T] (fp32 math); tokens int32 (B, T) (numpy ids are range-checked
    and uploaded), wte (V, C), wpe (maxT >= T, C) or None (no position embedding); scale = sqrt(C) for Gemma. A
    DeviceArray id outside [0, V) reads as a zero wte row (out = wpe[t]), never a wild read."""
    scale = scale_arg(scale)
    wte = _dev(wte, "wte")
    tokens = _on_device(tokens, "tokens", wte.shape[0])
    if len(tokens.shape) != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tuple(tokens.shape)}")
    out = empty((*tokens.shape, wte.shape[-1]), wte.dtype) if out is None else out
    _C.cuda.embedding_forward(_dev(out, "out"), tokens, wte, _opt(wpe, "wpe"), scale)
    return out


def embedding_backward(dout, tokens, dwte, dwpe, scale: float = 1.0):
    """dwte (V, C, float32) += the scattered dout rows * scale and dwpe (maxT, C, float32; or None) += the dout rows
    summed over the batch (unscaled), deterministically (a stable sort of the positions by token, then fixed-order
    sums); ids outside [0, V) are skipped. Returns them."""
    scale = scale_arg(scale)
    arrays = _dev(dwte, "dwte"), _opt(dwpe, "dwpe"), _dev(dout, "dout")  # checked first: CPU-only builds
    _C.cuda.embedding_backward(*arrays, _on_device(tokens, "tokens"), scale)
    return dwte, dwpe


def adamw_step(params, grads, m, v, lr: float, t: int, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
               weight_decay: float = 0.0, grad_scale: float = 1.0, params_copy=None) -> None:
    """One AdamW step in place on float32 params, m, v (step t >= 1) with grads * grad_scale; params_copy
    (optional, e.g. bfloat16) receives the updated parameters."""
    arrays = _dev(params, "params"), _dev(m, "m"), _dev(v, "v"), _dev(grads, "grads"), _opt(params_copy, "params_copy")
    _C.cuda.adamw_step(*arrays, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(t),
                       float(grad_scale))
