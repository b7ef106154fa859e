"""fastllm's CUDA backend: GPU arrays and the GPU twins of the CPU kernels in `fastllm.ops`.

Arrays are `DeviceArray`s (dense, row-major; float32, bfloat16 or int32) made with `empty`, `zeros`,
`to_device` or `from_dlpack` (zero-copy from torch/cupy). Kernels follow csrc/cuda/kernels.h: outputs first,
activations and parameters in one dtype T (float32 or bfloat16, fp32 accumulation inside), parameter
gradients, layernorm statistics, logsumexp and losses in float32; forward kernels overwrite their outputs,
backward kernels ACCUMULATE (+=) into every gradient (zero them first). Launches are asynchronous;
`synchronize()` waits, `.numpy()` copies back.

>>> from fastllm import cuda
>>> if cuda.is_available():
...     x = cuda.to_device(np.ones((4, 8), np.float32), dtype="bfloat16")
...     y = cuda.empty((4, 8), "bfloat16"); cuda.gelu_forward(y, x); y.numpy()
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _C

IGNORE_INDEX = -1  # the same default as fastllm.ops and the model


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
    """Uninitialised GPU memory."""
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
        n = sizes[dtype]
        for d in shape:
            n *= int(d)
        total += -(-n // align) * align
    arena = empty((max(total, 4) // 4,), "float32")
    return {name: arena.view_as(offsets[name], shape, dtype) for name, (shape, dtype) in specs.items()}


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


def from_dlpack(obj) -> DeviceArray:
    """Wrap a CUDA tensor (torch, cupy, ... anything with __dlpack__) without copying; it must be dense,
    row-major, and float32, bfloat16 or int32. The DeviceArray keeps the producer's memory alive."""
    return _require().from_dlpack(obj)


def synchronize() -> None:
    _require().synchronize()


def add_(dst, src) -> None:
    """dst += src (same shape and dtype)."""
    dst, src = _dev(dst, "dst"), _dev(src, "src")  # checked before _C.cuda is looked up (CPU-only builds)
    _C.cuda.add_(dst, src)


def copy_(dst, src) -> None:
    """dst = src: a numpy array or DeviceArray of the same shape; float32 <-> bfloat16 converts."""
    _dev(dst, "dst").copy_(src)


def sum_squares(x) -> float:
    x = _dev(x, "x")
    return float(_C.cuda.sum_squares(x))


def global_norm(*arrays) -> float:
    """sqrt of the sum of squares over all arrays (synchronises)."""
    return float(np.sqrt(sum(sum_squares(a) for a in arrays)))


# ---- kernels (see csrc/cuda/kernels.h for the exact contract) ----------------------------------------------


def gemm(c, a, b, trans_a: bool = False, trans_b: bool = False, accumulate: bool = False, bias=None,
         pre_gelu=None) -> None:
    """c (M, N) = [c +] op(a) @ op(b) [+ bias]; op(a) = a (M, K) or a.T for a stored (K, M) if trans_a; likewise b.
    a, b, bias: float32 or bfloat16 (same); c: float32 or a's dtype. With pre_gelu: pre_gelu = a@b+bias and
    c = gelu(pre_gelu)."""
    _C.cuda.gemm(_dev(c, "c"), _dev(a, "a"), _dev(b, "b"), _opt(bias, "bias"), _opt(pre_gelu, "pre_gelu"),
                 bool(trans_a), bool(trans_b), bool(accumulate))


def gemm_impl(name: str | None = None) -> str:
    """The GEMM kernel in use: 'auto' (bf16 tensor cores when operands are 16-byte aligned with row strides
    that are multiples of 8, else the FFMA kernel), 'simple' (always the FFMA reference kernel) or 'tc1' (the
    tensor-core build for 1 block/SM, for benchmarks). With `name`, selects it and returns the previous one.
    The initial value comes from $FASTLLM_CUDA_GEMM (default 'auto')."""
    old = _require().gemm_impl()
    if name is not None:
        _C.cuda.set_gemm_impl(str(name))
    return old


def matmul_forward(out, inp, weight, bias=None, pre_gelu=None) -> None:
    """out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC); with pre_gelu (N, OC): the GELU epilogue
    (pre_gelu = the product, out = gelu(pre_gelu)). Leading dims of inp/out are flattened."""
    C, OC = _dev(inp, "inp").shape[-1], _dev(weight, "weight").shape[0]
    N = inp.size // max(C, 1)
    pre = None if pre_gelu is None else _dev(pre_gelu, "pre_gelu").reshape((N, OC))
    gemm(_dev(out, "out").reshape((N, OC)), inp.reshape((N, C)), weight, trans_b=True, bias=bias, pre_gelu=pre)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight) -> None:
    """Accumulates dinp (N, C) += dout @ weight, dweight (OC, C, float32) += dout^T @ inp, dbias (OC, float32)
    += column sums of dout. Any of the three may be None."""
    _C.cuda.matmul_backward(_opt(dinp, "dinp"), _opt(dweight, "dweight"), _opt(dbias, "dbias"),
                            _dev(dout, "dout"), _dev(inp, "inp"), _dev(weight, "weight"))


def attention_forward(out, lse, qkv, n_head: int) -> None:
    """Causal flash attention: qkv (B, T, 3C) -> out (B, T, C), lse (B, NH, T, float32, natural log), like
    `fastllm.ops.attention_forward`. Head size hs = C / n_head <= 256. bfloat16 with hs 64 or 128 runs the
    tensor-core kernels; other cases (and FASTLLM_CUDA_ATTN=simple in the environment) the simple reference ones."""
    _C.cuda.attention_forward(_dev(out, "out"), _dev(lse, "lse"), _dev(qkv, "qkv"), int(n_head))


def attention_backward(dqkv, dout, qkv, out, lse, n_head: int) -> None:
    """dqkv (B, T, 3C) += gradient of attention_forward (out, lse: its outputs). The tensor-core path adds dq
    through fp32 atomics (its bits may vary from run to run); the simple path is deterministic."""
    _C.cuda.attention_backward(_dev(dqkv, "dqkv"), _dev(dout, "dout"), _dev(qkv, "qkv"), _dev(out, "out"),
                               _dev(lse, "lse"), int(n_head))


def attention_kv_forward(out, kcache, vcache, qkv, pos) -> None:
    """KV-cache attention: writes the new keys/values of qkv (B, Tn, 3C) into kcache/vcache (B, NH, maxT, hs) at
    pos[b].. (pos: int32 DeviceArray (B,)), then out (B, Tn, C) = causal attention over each cache (new query t of
    row b sees positions 0 .. pos[b] + t). pos lives on the GPU and is not checked here: the caller must ensure
    0 <= pos[b] and pos[b] + Tn <= maxT on the host; the kernels never write outside the caches (out-of-range
    positions are skipped) and never read past maxT."""
    _C.cuda.attention_kv_forward(_dev(out, "out"), _dev(kcache, "kcache"), _dev(vcache, "vcache"),
                                 _dev(qkv, "qkv"), _dev(pos, "pos"))


def softmax_cross_entropy(losses, dlogits, logits, targets, grad_scale: float = 1.0,
                          ignore_index: int = IGNORE_INDEX) -> None:
    """losses (N, float32) and, if dlogits is given, dlogits (N, V) = (softmax - onehot) * grad_scale (written;
    may be `logits` itself). targets: int32 (N,). An id outside [0, V) other than ignore_index gives a NaN loss
    (no wild read; check ids on the host)."""
    _C.cuda.softmax_cross_entropy(_dev(losses, "losses"), _opt(dlogits, "dlogits"), _dev(logits, "logits"),
                                  _dev(targets, "targets"), float(grad_scale), int(ignore_index))


def lmhead_cross_entropy(losses, dhidden, dweight, hidden, weight, targets, grad_scale: float = 1.0,
                         ignore_index: int = IGNORE_INDEX, scratch=None) -> None:
    """Fused classifier: logits = hidden (N, C) @ weight (V, C)^T in row chunks (never N x V), losses (N, float32);
    if given, dhidden (N, C) += and dweight (V, C, float32) += the gradients. scratch: an optional DeviceArray
    (rows, V) of hidden's dtype reused between calls (see lmhead_scratch); allocated per call if None. Chunks are
    its rows x V elements at a row stride of V rounded up to 8 (fast GEMMs), so slightly fewer than `rows` rows.
    Target ids are not range-checked on the GPU: an id outside [0, V) other than ignore_index gives a NaN loss."""
    _C.cuda.lmhead_cross_entropy(_dev(losses, "losses"), _opt(dhidden, "dhidden"), _opt(dweight, "dweight"),
                                 _dev(hidden, "hidden"), _dev(weight, "weight"), _dev(targets, "targets"),
                                 float(grad_scale), int(ignore_index), _opt(scratch, "scratch"))


def lmhead_scratch(n_rows: int, vocab_size: int, dtype: str = "bfloat16") -> DeviceArray:
    """A scratch buffer for lmhead_cross_entropy with the default chunk size for n_rows rows (<= ~256 MiB)."""
    rows = _require().lmhead_chunk_rows(int(n_rows), int(vocab_size), dtype)
    return empty((rows, int(vocab_size)), dtype)


def layernorm_forward(out, mean, rstd, x, weight, bias, eps: float = 1e-5) -> None:
    """LayerNorm over the last axis: x (..., C) -> out (..., C), mean/rstd (float32, shape x.shape[:-1] or (N,)
    with N the number of rows); weight, bias (C,) of x's dtype. out may be x itself."""
    args = _dev(out, "out"), _dev(mean, "mean"), _dev(rstd, "rstd"), _dev(x, "x"), _dev(weight, "weight")
    _C.cuda.layernorm_forward(*args, _dev(bias, "bias"), float(eps))


def layernorm_backward(dx, dweight, dbias, dout, x, weight, mean, rstd) -> None:
    """dx (..., C) +=, dweight/dbias (C, float32) += (deterministic: no float atomics)."""
    args = (_dev(dx, "dx"), _dev(dweight, "dweight"), _dev(dbias, "dbias"), _dev(dout, "dout"), _dev(x, "x"),
            _dev(weight, "weight"), _dev(mean, "mean"), _dev(rstd, "rstd"))
    _C.cuda.layernorm_backward(*args)


def gelu_forward(out, x) -> None:
    """out = gelu(x), tanh approximation (GPT-2); out may be x itself."""
    args = _dev(out, "out"), _dev(x, "x")
    _C.cuda.gelu_forward(*args)


def gelu_backward(dx, dout, x) -> None:
    """dx += gelu'(x) * dout."""
    args = _dev(dx, "dx"), _dev(dout, "dout"), _dev(x, "x")
    _C.cuda.gelu_backward(*args)


def residual_forward(out, a, b) -> None:
    """out = a + b (same shape and dtype); out may be a or b itself."""
    args = _dev(out, "out"), _dev(a, "a"), _dev(b, "b")
    _C.cuda.residual_forward(*args)


def embedding_forward(out, tokens, wte, wpe) -> None:
    """out (B, T, C) = wte[tokens] + wpe[:T]; tokens int32 (B, T), wte (V, C), wpe (maxT >= T, C). Ids are not
    range-checked on the GPU (the model checks them on the host before upload); an id outside [0, V) reads as a
    zero wte row (out = wpe[t]), never a wild read."""
    args = _dev(out, "out"), _dev(tokens, "tokens"), _dev(wte, "wte"), _dev(wpe, "wpe")
    _C.cuda.embedding_forward(*args)


def embedding_backward(dwte, dwpe, dout, tokens) -> None:
    """dwte (V, C, float32) and dwpe (maxT, C, float32) += the scattered dout rows, deterministically (a stable
    sort of the positions by token, then fixed-order sums); ids outside [0, V) are skipped."""
    args = _dev(dwte, "dwte"), _dev(dwpe, "dwpe"), _dev(dout, "dout"), _dev(tokens, "tokens")
    _C.cuda.embedding_backward(*args)


def adamw_step(params, grads, m, v, lr: float, t: int, beta1: float = 0.9, beta2: float = 0.95, eps: float = 1e-8,
               weight_decay: float = 0.0, grad_scale: float = 1.0, params_copy=None) -> None:
    """AdamW in place on float32 params, m, v (step t >= 1) with grads * grad_scale; params_copy (optional,
    e.g. bfloat16) receives the updated weights."""
    arrays = _dev(params, "params"), _dev(m, "m"), _dev(v, "v"), _dev(grads, "grads"), _opt(params_copy, "params_copy")
    _C.cuda.adamw_step(*arrays, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), int(t),
                       float(grad_scale))
