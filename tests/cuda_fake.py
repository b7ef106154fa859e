"""A numpy stand-in for fastllm._C.cuda (the CUDA contract of csrc/cuda/kernels.h and python/fastllm/cuda.py), so
the GPU model's orchestration (fastllm.cuda_model) runs and is tested on machines without a GPU.

DeviceArray keeps a flat numpy buffer (float32 for float32 and bfloat16, int32 for int32) and views that share it,
like the real one. Every kernel binding takes the same arguments in the same order as `_C.cuda.<name>` in cuda.py,
checks dtypes and shapes the way kernels.h states them (TypeError / ValueError, so orchestration mistakes show up
here), and computes with fastllm.ops CPU kernels in float32. bfloat16 arrays are emulated: every store into one
rounds float32 to bfloat16 (round to nearest even), unless `set_bf16(False)` makes them plain float32.

Use: `install(monkeypatch)` points fastllm.cuda at this module (see tests/test_cuda_model_fake.py).
"""

from __future__ import annotations

import math
import types

import numpy as np

from fastllm import _C as _CPU
from fastllm import ops

_EMULATE_BF16 = True


def set_bf16(emulate: bool) -> None:
    """True: bfloat16 arrays round every stored value to bfloat16 (RNE); False: they are plain float32."""
    global _EMULATE_BF16
    _EMULATE_BF16 = bool(emulate)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bfloat16 (ties to even), returned as float32."""
    x = np.ascontiguousarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    out = u.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, out).astype(np.float32)


_DTYPES = {"float32": "float32", "f32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16", "int32": "int32",
           "i32": "int32"}


def _parse_dtype(s: str) -> str:
    if s not in _DTYPES:
        raise TypeError(f"dtype must be 'float32', 'bfloat16' or 'int32', got '{s}'")
    return _DTYPES[s]


def _shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(d) for d in shape)


class DeviceArray:
    """Fake GPU array: a window (offset, shape) of a flat numpy buffer shared by all views."""

    def __init__(self, shape, dtype: str = "float32"):
        shape = _shape(shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"shape must not have negative sizes, got {shape}")
        self.dtype = _parse_dtype(dtype)
        self.shape = shape
        self._off = 0
        # uninitialised memory: NaN (float) / a large garbage value (int) so unwritten reads show up
        n = math.prod(shape)
        self._buf = np.full(n, np.nan, np.float32) if self.dtype != "int32" else np.full(n, -(2**30), np.int32)

    # -- properties like the binding's
    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * (2 if self.dtype == "bfloat16" else 4)

    @property
    def device(self) -> int:
        return 0

    @property
    def ptr(self) -> int:
        return self._buf.ctypes.data + self._off * self._buf.itemsize

    def _np(self) -> np.ndarray:
        """The live numpy view (writes go to the shared buffer)."""
        return self._buf[self._off:self._off + self.size].reshape(self.shape)

    def _store(self, values) -> None:
        """Write values (broadcast to shape) with bf16 rounding when emulated."""
        v = np.asarray(values, self._buf.dtype)
        if self.dtype == "bfloat16" and _EMULATE_BF16:
            v = round_bf16(np.broadcast_to(v, self.shape))
        self._np()[...] = v

    def _round(self) -> None:
        """Re-round after a kernel wrote float32 values in place."""
        if self.dtype == "bfloat16" and _EMULATE_BF16:
            a = self._np()
            a[...] = round_bf16(a)

    def numpy(self) -> np.ndarray:
        return self._np().copy()

    def copy_(self, src) -> None:
        if isinstance(src, DeviceArray):
            if src.shape != self.shape:
                raise ValueError(f"cannot copy shape {src.shape} into {self.shape}")
            if src.dtype != self.dtype and ("int32" in (src.dtype, self.dtype)):
                raise TypeError(f"cannot convert {src.dtype} into {self.dtype}")
            self._store(src._np())
            return
        if not isinstance(src, np.ndarray):
            raise TypeError(f"copy_ takes a numpy array or DeviceArray, got {type(src).__name__}")
        if src.dtype not in (np.float32, np.int32):
            raise TypeError(f"array must be a float32 or int32 numpy array, got {src.dtype}")
        src_t = "float32" if src.dtype == np.float32 else "int32"
        if src.shape != self.shape:
            raise ValueError(f"cannot copy an array of shape {src.shape} into a DeviceArray of shape {self.shape}")
        if not (src_t == self.dtype or (src_t == "float32" and self.dtype == "bfloat16")):
            raise TypeError(f"cannot copy a {src_t} array into a {self.dtype} DeviceArray")
        self._store(src)

    def zero_(self) -> None:
        self._np()[...] = 0

    def view(self, offset: int, shape) -> DeviceArray:
        v = object.__new__(DeviceArray)
        v.dtype, v._buf, v.shape = self.dtype, self._buf, _shape(shape)
        if offset < 0 or offset + v.size > self.size:
            raise ValueError(f"view of {v.size} elements at offset {offset} does not fit in {self.size} elements")
        v._off = self._off + int(offset)
        return v

    def view_as(self, byte_offset: int, shape, dtype: str) -> DeviceArray:
        """Like the binding's bounds and alignment checks; the fake hands out fresh memory for the region (the
        carved regions of cuda.carve are disjoint, so no aliasing is lost)."""
        v = DeviceArray(shape, dtype)
        es = 2 if v.dtype == "bfloat16" else 4
        if byte_offset < 0 or byte_offset % es:
            raise ValueError(f"byte_offset {byte_offset} must be >= 0 and a multiple of {es}")
        if byte_offset + v.nbytes > self.nbytes:
            raise ValueError(f"view of {v.nbytes} bytes at byte {byte_offset} does not fit in {self.nbytes} bytes")
        return v

    def reshape(self, shape) -> DeviceArray:
        v = self.view(0, shape)
        if v.size != self.size:
            raise ValueError(f"cannot reshape {self.shape} to {v.shape}")
        return v

    def __repr__(self) -> str:
        return f"DeviceArray(shape={self.shape}, dtype={self.dtype}, device=fake)"


# ---- module-level functions of _C.cuda ------------------------------------------------------------------


def from_numpy(array, dtype=None) -> DeviceArray:
    a = np.asarray(array)
    if a.dtype not in (np.float32, np.int32):
        raise TypeError(f"array must be a float32 or int32 numpy array, got {a.dtype}")
    d = DeviceArray(a.shape, dtype if dtype is not None else ("float32" if a.dtype == np.float32 else "int32"))
    d.copy_(np.asarray(a, order="C"))  # (np.ascontiguousarray would make a 0-d array 1-d)
    return d


def from_dlpack(obj) -> DeviceArray:  # pragma: no cover - nothing produces fake CUDA tensors
    raise TypeError("the fake CUDA module has no DLPack")


def device_count() -> int:
    return 1


def current_device() -> int:
    return 0


def set_device(device: int) -> None:
    if device != 0:
        raise ValueError(f"device {device} does not exist (fake has one)")


def synchronize() -> None:
    pass


_GEMM_IMPL = "auto"


def gemm_impl() -> str:
    return _GEMM_IMPL


def set_gemm_impl(name: str) -> None:
    """Accepted and recorded (the fake has one GEMM: numpy / the CPU kernel)."""
    global _GEMM_IMPL
    if name not in ("auto", "simple", "tc1"):
        raise ValueError(f"unknown GEMM implementation {name!r}")
    _GEMM_IMPL = name


def lmhead_chunk_rows(N: int, V: int, dtype: str) -> int:
    """Default scratch rows of lmhead_cross_entropy: at most ~256 MiB of logits, at most N."""
    _parse_dtype(dtype)
    return int(max(1, min(N, (256 << 20) // (max(V, 1) * (2 if _DTYPES[dtype] == "bfloat16" else 4)))))


# ---- argument checks (what the real bindings promise: TypeError for dtype, ValueError for shape) --------


def _arr(a, name: str) -> DeviceArray:
    if not isinstance(a, DeviceArray):
        raise TypeError(f"{name} must be a DeviceArray, got {type(a).__name__}")
    return a


def _float(a, name: str) -> str:
    _arr(a, name)
    if a.dtype not in ("float32", "bfloat16"):
        raise TypeError(f"{name} must be float32 or bfloat16, got {a.dtype}")
    return a.dtype


def _check(a, name: str, dtype: str, shape) -> np.ndarray:
    _arr(a, name)
    if a.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {a.dtype}")
    if a.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {a.shape}")
    return a._np()


def _ndim(a, name: str, n: int) -> tuple[int, ...]:
    if a.ndim != n:
        raise ValueError(f"{name} must have {n} dimensions, got shape {a.shape}")
    return a.shape


def _overlap(a, b) -> bool:
    """Element ranges of two arrays in one buffer intersect (like the bindings' byte-range check)."""
    return (a is not None and b is not None and a._buf is b._buf and a.size and b.size
            and a._off < b._off + b.size and b._off < a._off + a.size)


def _disjoint(dst, dst_name: str, /, **inputs) -> None:
    """The real bindings reject outputs that overlap other arguments (ValueError)."""
    for name, x in inputs.items():
        if _overlap(dst, x):
            raise ValueError(f"{dst_name} must not overlap {name}")


def _same_or_disjoint(out, out_name: str, x, x_name: str) -> None:
    same = out._buf is x._buf and out._off == x._off and out.size == x.size
    if not same and _overlap(out, x):
        raise ValueError(f"{out_name} must be {x_name} itself (in place) or not overlap it")


def _bf16_store(*arrays) -> None:
    for a in arrays:
        if a is not None:
            a._round()


# ---- kernels (argument order exactly as python/fastllm/cuda.py calls them) -----------------------------


def add_(dst, src) -> None:
    t = _float(dst, "dst")
    s = _check(src, "src", t, dst.shape)
    dst._store(dst._np() + s)


def sum_squares(x) -> float:
    _float(x, "x")
    return float(_CPU.sum_squares(np.ascontiguousarray(x._np().reshape(-1))))


def gemm(c, a, b, bias, pre_gelu, trans_a: bool, trans_b: bool, accumulate: bool) -> None:
    ab = _float(a, "a")
    _float(b, "b")
    _ndim(a, "a", 2)
    _ndim(b, "b", 2)
    M, K = (a.shape[1], a.shape[0]) if trans_a else a.shape
    Kb, N = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if Kb != K:
        raise ValueError(f"inner dimensions differ: op(a) is ({M}, {K}), op(b) is ({Kb}, {N})")
    _check(b, "b", ab, b.shape)
    ct = _float(c, "c")
    if ct not in ("float32", ab):
        raise TypeError(f"c must be float32 or {ab}, got {ct}")
    _check(c, "c", ct, (M, N))
    bias_np = None if bias is None else _check(bias, "bias", ab, (N,))
    if pre_gelu is not None:
        _check(pre_gelu, "pre_gelu", ct, (M, N))
        if accumulate:
            raise ValueError("pre_gelu needs accumulate=False")
    _disjoint(c, "c", a=a, b=b, bias=bias)
    _disjoint(pre_gelu, "pre_gelu", a=a, b=b, bias=bias, c=c)
    A, B_ = a._np(), b._np()
    if not trans_a and trans_b:
        prod = ops.matmul_forward(A, B_, bias_np)  # the CPU kernel: bit-equal to the CPU model in fp32
    else:
        opa = A.T if trans_a else A
        opb = B_.T if trans_b else B_
        prod = (opa.astype(np.float32) @ opb.astype(np.float32)).astype(np.float32)
        if bias_np is not None:
            prod += bias_np
    if pre_gelu is not None:
        pre_gelu._store(prod)
        # like matmul.cu's epilogue: GELU of the fp32 accumulator, not of the (bf16-)stored pre_gelu
        c._store(ops.gelu_forward(np.ascontiguousarray(prod, np.float32)))
    elif accumulate:
        c._store(c._np() + prod)
    else:
        c._store(prod)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight) -> None:
    t = _float(dout, "dout")
    N, OC = _ndim(dout, "dout", 2)
    _ndim(inp, "inp", 2)
    C = inp.shape[1]
    x = _check(inp, "inp", t, (N, C))
    w = _check(weight, "weight", t, (OC, C))
    dy = dout._np()
    if dinp is not None:
        _check(dinp, "dinp", t, (N, C))
    if dweight is not None:
        _check(dweight, "dweight", "float32", (OC, C))
    if dbias is not None:
        _check(dbias, "dbias", "float32", (OC,))
    for o, on in ((dinp, "dinp"), (dweight, "dweight"), (dbias, "dbias")):
        _disjoint(o, on, dout=dout, inp=inp, weight=weight)
    _disjoint(dinp, "dinp", dweight=dweight, dbias=dbias)
    _disjoint(dweight, "dweight", dbias=dbias)
    di = None if dinp is None else dinp._np()
    dw = dweight._np() if dweight is not None else np.zeros((OC, C), np.float32)
    db = None if dbias is None else dbias._np()
    ops.matmul_backward(dy, x, w, dinp=di, dweight=dw, dbias=db, need_dinp=di is not None, need_bias=db is not None)
    _bf16_store(dinp)


def attention_forward(out, lse, qkv, n_head: int) -> None:
    t = _float(qkv, "qkv")
    B, T, C3 = _ndim(qkv, "qkv", 3)
    C = C3 // 3
    if C3 % 3 or C % n_head:
        raise ValueError(f"qkv's last dimension {C3} must be 3 * C with C divisible by n_head={n_head}")
    o = _check(out, "out", t, (B, T, C))
    s = _check(lse, "lse", "float32", (B, n_head, T))
    _disjoint(out, "out", qkv=qkv, lse=lse)
    _disjoint(lse, "lse", qkv=qkv)
    ops.attention_forward(qkv._np(), n_head, out=o, lse=s)
    _bf16_store(out)


def attention_backward(dqkv, dout, qkv, out, lse, n_head: int) -> None:
    t = _float(qkv, "qkv")
    B, T, C3 = _ndim(qkv, "qkv", 3)
    C = C3 // 3
    d = _check(dqkv, "dqkv", t, (B, T, C3))
    dy = _check(dout, "dout", t, (B, T, C))
    o = _check(out, "out", t, (B, T, C))
    s = _check(lse, "lse", "float32", (B, n_head, T))
    _disjoint(dqkv, "dqkv", qkv=qkv, dout=dout, out=out, lse=lse)
    ops.attention_backward(dy, qkv._np(), o, s, n_head, dqkv=d)
    _bf16_store(dqkv)


def attention_kv_forward(out, kcache, vcache, qkv, pos) -> None:
    t = _float(qkv, "qkv")
    B, Tn, C3 = _ndim(qkv, "qkv", 3)
    C = C3 // 3
    _, NH, maxT, hs = _ndim(kcache, "kcache", 4)
    if NH * hs != C:
        raise ValueError(f"kcache heads {NH} x {hs} do not match C={C}")
    k = _check(kcache, "kcache", t, (B, NH, maxT, hs))
    v = _check(vcache, "vcache", t, (B, NH, maxT, hs))
    o = _check(out, "out", t, (B, Tn, C))
    p = _check(pos, "pos", "int32", (B,))
    _disjoint(kcache, "kcache", vcache=vcache, qkv=qkv, pos=pos)
    _disjoint(vcache, "vcache", qkv=qkv, pos=pos)
    _disjoint(out, "out", qkv=qkv, kcache=kcache, vcache=vcache)
    if (p < 0).any() or (p + Tn > maxT).any():
        raise ValueError(f"pos + Tn must be in [0, {maxT}], got pos {p} and Tn={Tn}")
    ops.attention_kv_forward(qkv._np(), k, v, p, out=o)
    _bf16_store(out, kcache, vcache)


def softmax_cross_entropy(losses, dlogits, logits, targets, grad_scale: float, ignore_index: int) -> None:
    t = _float(logits, "logits")
    N, V = _ndim(logits, "logits", 2)
    lo = _check(losses, "losses", "float32", (N,))
    tg = _check(targets, "targets", "int32", (N,))
    if dlogits is not None:
        _check(dlogits, "dlogits", t, (N, V))
    x = logits._np().copy()
    res, d = ops.softmax_cross_entropy(x, tg, grad_scale=grad_scale, ignore_index=ignore_index,
                                       backward=dlogits is not None)
    lo[...] = res
    if dlogits is not None:
        dlogits._store(d)


def lmhead_cross_entropy(losses, dhidden, dweight, hidden, weight, targets, grad_scale: float, ignore_index: int,
                         scratch) -> None:
    t = _float(hidden, "hidden")
    N, C = _ndim(hidden, "hidden", 2)
    _ndim(weight, "weight", 2)
    V = weight.shape[0]
    w = _check(weight, "weight", t, (V, C))
    lo = _check(losses, "losses", "float32", (N,))
    tg = _check(targets, "targets", "int32", (N,))
    if dhidden is not None:
        _check(dhidden, "dhidden", t, (N, C))
    if dweight is not None:
        _check(dweight, "dweight", "float32", (V, C))
    if scratch is not None:
        _ndim(scratch, "scratch", 2)
        _check(scratch, "scratch", t, (scratch.shape[0], V))
        if scratch.shape[0] < 1:
            raise ValueError("scratch needs at least one row")
    for o, on in ((losses, "losses"), (dhidden, "dhidden"), (dweight, "dweight")):
        _disjoint(o, on, hidden=hidden, weight=weight, targets=targets, scratch=scratch)
    _disjoint(dhidden, "dhidden", dweight=dweight, losses=losses)
    _disjoint(dweight, "dweight", losses=losses)
    bad = (tg != ignore_index) & ((tg < 0) | (tg >= V))
    if bad.any():
        raise ValueError(f"targets hold ids outside [0, {V})")
    backward = dhidden is not None or dweight is not None
    dh = dhidden._np() if dhidden is not None else (np.zeros((N, C), np.float32) if backward else None)
    dw = dweight._np() if dweight is not None else (np.zeros((V, C), np.float32) if backward else None)
    res, _, _ = ops.lmhead_cross_entropy(hidden._np(), w, tg, grad_scale=grad_scale, ignore_index=ignore_index,
                                         backward=backward, dhidden=dh, dweight=dw)
    lo[...] = res
    _bf16_store(dhidden)


def layernorm_forward(out, mean, rstd, x, weight, bias, eps: float) -> None:
    t = _float(x, "x")
    N, C = _ndim(x, "x", 2)
    o = _check(out, "out", t, (N, C))
    mu = _check(mean, "mean", "float32", (N,))
    rs = _check(rstd, "rstd", "float32", (N,))
    w = _check(weight, "weight", t, (C,))
    b = _check(bias, "bias", t, (C,))
    _same_or_disjoint(out, "out", x, "x")
    _disjoint(out, "out", weight=weight, bias=bias, mean=mean, rstd=rstd)
    _disjoint(mean, "mean", x=x, weight=weight, bias=bias, rstd=rstd)
    _disjoint(rstd, "rstd", x=x, weight=weight, bias=bias)
    ops.layernorm_forward(x._np(), w, b, eps, out=o, mean=mu, rstd=rs)
    _bf16_store(out)


def layernorm_backward(dx, dweight, dbias, dout, x, weight, mean, rstd) -> None:
    t = _float(x, "x")
    N, C = _ndim(x, "x", 2)
    d = _check(dx, "dx", t, (N, C))
    dw = _check(dweight, "dweight", "float32", (C,))
    db = _check(dbias, "dbias", "float32", (C,))
    dy = _check(dout, "dout", t, (N, C))
    w = _check(weight, "weight", t, (C,))
    mu = _check(mean, "mean", "float32", (N,))
    rs = _check(rstd, "rstd", "float32", (N,))
    _disjoint(dx, "dx", dout=dout, x=x, weight=weight, mean=mean, rstd=rstd, dweight=dweight, dbias=dbias)
    _disjoint(dweight, "dweight", dout=dout, x=x, weight=weight, mean=mean, rstd=rstd, dbias=dbias)
    _disjoint(dbias, "dbias", dout=dout, x=x, weight=weight, mean=mean, rstd=rstd)
    ops.layernorm_backward(dy, x._np(), w, mu, rs, dx=d, dweight=dw, dbias=db)
    _bf16_store(dx)


def gelu_forward(out, x) -> None:
    t = _float(x, "x")
    o = _check(out, "out", t, x.shape)
    _same_or_disjoint(out, "out", x, "x")
    ops.gelu_forward(x._np(), out=o)
    _bf16_store(out)


def gelu_backward(dx, dout, x) -> None:
    t = _float(x, "x")
    d = _check(dx, "dx", t, x.shape)
    dy = _check(dout, "dout", t, x.shape)
    _disjoint(dx, "dx", dout=dout, x=x)
    ops.gelu_backward(dy, x._np(), dx=d)
    _bf16_store(dx)


def residual_forward(out, a, b) -> None:
    t = _float(a, "a")
    o = _check(out, "out", t, a.shape)
    bb = _check(b, "b", t, a.shape)
    _same_or_disjoint(out, "out", a, "a")
    _same_or_disjoint(out, "out", b, "b")
    ops.residual_forward(a._np(), bb.copy(), out=o)
    _bf16_store(out)


def embedding_forward(out, tokens, wte, wpe) -> None:
    t = _float(wte, "wte")
    B, T = _ndim(tokens, "tokens", 2)
    _ndim(wte, "wte", 2)
    V, C = wte.shape
    _ndim(wpe, "wpe", 2)
    if wpe.shape[0] < T:
        raise ValueError(f"wpe has {wpe.shape[0]} rows < T={T}")
    p = _check(wpe, "wpe", t, (wpe.shape[0], C))
    tk = _check(tokens, "tokens", "int32", (B, T))
    o = _check(out, "out", t, (B, T, C))
    _disjoint(out, "out", tokens=tokens, wte=wte, wpe=wpe)
    ok = (tk >= 0) & (tk < V)
    safe = np.where(ok, tk, 0).astype(np.int32)
    ops.embedding_forward(safe, wte._np(), p, out=o)
    o[~ok] = p[:T][np.nonzero(~ok)[1]]  # an id outside [0, V) reads a zero wte row (no wild read)
    _bf16_store(out)


def embedding_backward(dwte, dwpe, dout, tokens) -> None:
    t = _float(dout, "dout")
    B, T, C = _ndim(dout, "dout", 3)
    _ndim(dwte, "dwte", 2)
    _ndim(dwpe, "dwpe", 2)
    dw = _check(dwte, "dwte", "float32", (dwte.shape[0], C))
    dp = _check(dwpe, "dwpe", "float32", (dwpe.shape[0], C))
    if dwpe.shape[0] < T:
        raise ValueError(f"dwpe has {dwpe.shape[0]} rows < T={T}")
    tk = _check(tokens, "tokens", "int32", (B, T))
    del t
    _disjoint(dwte, "dwte", dwpe=dwpe, dout=dout, tokens=tokens)
    _disjoint(dwpe, "dwpe", dout=dout, tokens=tokens)
    ops.embedding_backward(np.ascontiguousarray(dout._np()), tk, dw, dp)


def adamw_step(params, m, v, grads, params_copy, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, t: int, grad_scale: float) -> None:
    n = params.size
    p = _check(params, "params", "float32", (n,))
    mm = _check(m, "m", "float32", (n,))
    vv = _check(v, "v", "float32", (n,))
    g = _check(grads, "grads", "float32", (n,))
    if t < 1:
        raise ValueError(f"t must be >= 1, got {t}")
    _disjoint(params, "params", m=m, v=v, grads=grads, params_copy=params_copy)
    _disjoint(m, "m", v=v, grads=grads, params_copy=params_copy)
    _disjoint(v, "v", grads=grads, params_copy=params_copy)
    _disjoint(grads, "grads", params_copy=params_copy)
    ops.adamw_step(p, g, mm, vv, lr=lr, t=t, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                   grad_scale=grad_scale)
    if params_copy is not None:
        _float(params_copy, "params_copy")
        _check(params_copy, "params_copy", params_copy.dtype, (n,))
        params_copy._store(p)


# ---- installing it ------------------------------------------------------------------------------------


def install(monkeypatch, emulate_bf16: bool = True):
    """Point fastllm.cuda at this fake for the duration of a test (pytest's monkeypatch undoes it)."""
    import sys

    from fastllm import cuda

    set_bf16(emulate_bf16)
    fake_C = types.SimpleNamespace(cuda=sys.modules[__name__])
    monkeypatch.setattr(cuda, "_C", fake_C)
    monkeypatch.setattr(cuda, "DeviceArray", DeviceArray)
    return cuda
