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
from typing import NamedTuple

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
    if x.dtype == np.float32 and x.flags.c_contiguous:
        _C.zero_(x)  # on all threads: a training step zeroes ~40 MB a layer of gradients (numpy's fill uses one)
    else:
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


class Bf16Panels(NamedTuple):
    """bf16 weights (..., OC, C) packed once into the bf16 GEMM's panels (pack_bf16), for decoding where the bf16
    GEMM runs on AVX512_BF16 (bf16_panels_preferred()): 32 rows of W at a time, pairs of k interleaved, so a decode
    step of any batch streams the weights in one sequence and multiplies them without per-call packing. The same
    numbers as to_bf16(w); matmul_forward takes it as `weight`. unpack_bf16 gives the (..., OC, C) bits back."""

    data: np.ndarray  # (..., bf16_panel_rows(OC), C) uint16, in panel order
    rows: int  # OC


def bf16_panels_preferred() -> bool:
    """Whether bf16 decode weights are faster as Bf16Panels than as row-major bf16 here (the bf16 GEMM in use is
    avx512_bf16; AMX reads the rows in place, and elsewhere the row kernels are the faster ones)."""
    return bool(_C.bf16_panels_preferred())


def pack_bf16(w) -> Bf16Panels:
    """float32 weights, or their bf16 bits (uint16), (..., OC, C) with C even -> Bf16Panels (rounded to nearest even).

    >>> p = pack_bf16(np.ones((3, 4), np.float32)); (p.data.shape, p.rows)
    ((32, 4), 3)
    """
    w = np.ascontiguousarray(w if isinstance(w, np.ndarray) and w.dtype == np.uint16 else to_bf16(w))
    if w.ndim < 2:
        raise ValueError(f"pack_bf16 needs a matrix (..., OC, C), got shape {w.shape}")
    *lead, OC, C = w.shape
    if C % 2:
        raise ValueError(f"pack_bf16: C (the weight's columns) must be even, got {C}")
    data = carve({"p": ((*lead, _C.bf16_panel_rows(OC), C), "bfloat16")})["p"]  # 64-byte aligned: whole lines
    for d, m in zip(data.reshape(-1, *data.shape[-2:]), w.reshape(-1, OC, C)):
        _C.pack_bf16_panels(d, m)
    return Bf16Panels(data, OC)


def unpack_bf16(p: Bf16Panels) -> np.ndarray:
    """The bf16 bits (..., OC, C) uint16 of Bf16Panels: the inverse of pack_bf16 on bf16 input."""
    *lead, R, C = p.data.shape
    nr = _C.bf16_panel_rows(1)  # rows per panel
    words = p.data.view(np.uint32).reshape(*lead, R // nr, C // 2, nr)  # panel, pair, row
    return np.ascontiguousarray(np.swapaxes(words, -1, -2)).reshape(*lead, R, C // 2).view(np.uint16)[..., :p.rows, :]


class Int8Weight(NamedTuple):
    """A weight matrix (..., OC, C) quantized to int8 per output row (weight-only, symmetric, as for decoding):
    w ~= q * scale[..., None], scale = max |row| / 127, q = round(w / scale) in [-127, 127]. matmul_forward takes it
    as `weight`. Made by quantize_int8."""

    q: np.ndarray  # (..., OC, C) int8
    scale: np.ndarray  # (..., OC) float32


def quantize_int8(w, rows_per_pass: int = 4096) -> Int8Weight:
    """float32 weights (..., OC, C) -> Int8Weight, rows_per_pass rows at a time (a bounded temporary, whatever the
    matrix). NaN/Inf weights raise ValueError naming the first such row. Numpy, not a kernel: it runs once per model.

    >>> quantize_int8(np.array([[1.0, -0.5]], np.float32)).q
    array([[ 127, -64]], dtype=int8)
    """
    w = _f32(w, "w")
    if w.dtype != np.float32 or w.ndim < 2:
        raise TypeError(f"quantize_int8 needs a float32 matrix (..., OC, C), got {w.dtype} of shape {w.shape}")
    rows = w.reshape(-1, w.shape[-1])
    q, scale = np.empty(rows.shape, np.int8), np.empty(len(rows), np.float32)
    for i in range(0, len(rows), rows_per_pass):
        r = rows[i:i + rows_per_pass]
        amax = np.abs(r).max(axis=1, initial=0.0)
        if not np.isfinite(amax).all():
            raise ValueError(f"quantize_int8: row {i + int(np.argmin(np.isfinite(amax)))} holds NaN/Inf")
        s = amax / np.float32(127)
        scale[i:i + len(r)] = s
        q[i:i + len(r)] = np.rint(r / np.where(s > 0, s, np.float32(1))[:, None])  # |r / s| <= 127
    return Int8Weight(q.reshape(w.shape), scale.reshape(w.shape[:-1]))


def dequantize_int8(w: Int8Weight) -> np.ndarray:
    """The float32 matrix an Int8Weight stands for: q * scale (what matmul_forward multiplies by, exactly)."""
    return w.q.astype(np.float32) * w.scale[..., None]


class Int8Panels(NamedTuple):
    """An Int8Weight packed once for w8a8 decoding (pack_int8): int8 weights AND int8 activations, each input row
    quantized at every call with its own scale (dynamic quantization, as torch's quantize_dynamic and llama.cpp's
    Q8 activations): sa = max|x| / 127, qa = rint(x / sa), and out = (float32(sum_k qa * q) * sa) * scale + bias
    with the sum exact in int32 (AVX512-VNNI's VPDPBUSD where the CPU has it: info()["w8a8"]). A row's outputs
    depend on that row alone. Coarser than Int8Weight's float32 activations, faster wherever the products are the
    cost (batches, prompts). matmul_forward takes it as `weight`; unpack_int8 gives the Int8Weight back."""

    data: np.ndarray  # (..., w8a8_panel_rows(OC) * w8a8_depth(C)) int8, in panel order
    scale: np.ndarray  # (..., OC) float32, as Int8Weight's
    wsum: np.ndarray  # (..., OC) int32: each row's sum of q (the unsigned activations' correction)
    cols: int  # C


def pack_int8(w) -> Int8Panels:
    """An Int8Weight, or float32 weights (quantized first: quantize_int8), (..., OC, C) with C <= 65536 ->
    Int8Panels.

    >>> p = pack_int8(np.ones((3, 4), np.float32)); (p.data.shape, p.cols)
    ((128,), 4)
    """
    w = w if isinstance(w, Int8Weight) else quantize_int8(w)
    q = np.ascontiguousarray(w.q)
    if q.dtype != np.int8 or q.ndim < 2 or w.scale.shape != q.shape[:-1]:
        raise ValueError(f"pack_int8 needs int8 q (..., OC, C) and scale (..., OC), got {q.dtype} {q.shape} and "
                         f"{w.scale.shape}")
    *lead, OC, C = q.shape
    if not 0 < C <= 65536:
        raise ValueError(f"pack_int8: C (the weight's columns) must be in [1, 65536] (int32 sums), got {C}")
    n = _C.w8a8_panel_rows(OC) * _C.w8a8_depth(C)  # a multiple of 4 bytes: carved as int32, 64-byte aligned
    data = carve({"p": ((*lead, n // 4), "int32")})["p"].view(np.int8)
    wsum = np.empty((*lead, OC), np.int32)
    for d, s, m in zip(data.reshape(-1, data.shape[-1]), wsum.reshape(-1, OC), q.reshape(-1, OC, C)):
        _C.pack_w8a8_panels(d, s, m)
    return Int8Panels(data, np.ascontiguousarray(w.scale, np.float32), wsum, C)


ROW_BLOCK = 4096  # rows of a block join_row_blocks joins: a multiple of every packed form's panel rows


def join_row_blocks(w, rows: int):
    """A weight in a decode form -- bf16 bits, Bf16Panels, Int8Weight or Int8Panels -- made from a matrix as a stack
    of blocks of ROW_BLOCK rows (n, ROW_BLOCK, C), its last block padded -> that (rows, C) matrix's weight (views, no
    copy): a large matrix (an lm-head) converted a block at a time, never all of it in float32."""
    if isinstance(w, np.ndarray):
        return w.reshape(-1, w.shape[-1])[:rows]
    if isinstance(w, Bf16Panels):
        return Bf16Panels(w.data.reshape(-1, w.data.shape[-1])[:_C.bf16_panel_rows(rows)], rows)
    if isinstance(w, Int8Weight):
        return Int8Weight(w.q.reshape(-1, w.q.shape[-1])[:rows], w.scale.reshape(-1)[:rows])
    n = _C.w8a8_panel_rows(rows) * _C.w8a8_depth(w.cols)
    return Int8Panels(w.data.reshape(-1)[:n], w.scale.reshape(-1)[:rows], w.wsum.reshape(-1)[:rows], w.cols)


def unpack_int8(p: Int8Panels) -> Int8Weight:
    """The Int8Weight of Int8Panels: the inverse of pack_int8."""
    *lead, OC = p.scale.shape
    G, nr = _C.w8a8_depth(p.cols) // 4, _C.w8a8_panel_rows(1)  # groups of 4 k, rows per panel
    b = p.data.reshape(*lead, -1, G, nr, 4)  # panel, group, row, k within the group
    q = np.moveaxis(b, -2, -3).reshape(*lead, -1, 4 * G)[..., :OC, :p.cols]
    return Int8Weight(np.ascontiguousarray(q), p.scale)


# ---- matmul --------------------------------------------------------------------------------------------


PRECISIONS = ("float32", "bfloat16")  # of the matmuls' products: `dtype=` of matmul_forward/backward, lmhead_ce


def _bf16(dtype: str) -> bool:
    """dtype= of the matmul family: "float32", or "bfloat16" -- both operands rounded to bf16 (nearest even) as
    the GEMM packs them, exact products, fp32 sums and fp32 results: the CPU's mixed precision (what
    torch.autocast(bfloat16) computes for a linear layer), with fp32 arrays in and out."""
    if dtype not in PRECISIONS:
        raise ValueError(f"dtype must be one of {PRECISIONS}, got {dtype!r}")
    return dtype == "bfloat16"


def matmul_forward(inp, weight, bias=None, out=None, pre_gelu=None, dtype: str = "float32") -> np.ndarray:
    """out (..., OC) = inp (..., C) @ weight (OC, C)^T + bias (OC); with pre_gelu (..., OC): pre_gelu = that
    product and out = gelu(pre_gelu) (the MLP's first layer). dtype="bfloat16": the product in bf16 (_bf16).
    weight may also be bf16 itself (uint16 from to_bf16; inference): inp is then rounded to bf16 too, products
    are exact and sums fp32 (AVX-512 BF16 dot products where the CPU has them), or those bits packed once
    (Bf16Panels, pack_bf16: the same products); or an Int8Weight (quantize_int8;
    inference): inp stays fp32, each row's dot product with q is summed in fp32 and scaled; or Int8Panels
    (pack_int8; inference): inp quantized to int8 per row, exact integer sums. dtype is for float32 weights.

    >>> matmul_forward(np.ones((2, 3), np.float32), np.ones((4, 3), np.float32)).shape
    (2, 4)
    """
    inp = _f32(inp, "inp")
    lead, C = inp.shape[:-1], inp.shape[-1] if inp.ndim else 0
    weight, scale = weight if isinstance(weight, Int8Weight) else (weight, None)
    w8a8, panels = isinstance(weight, Int8Panels), isinstance(weight, Bf16Panels)
    if w8a8 and C != weight.cols:
        raise ValueError(f"matmul_forward: inp has C = {C} columns, the int8 panels were packed for {weight.cols}")
    if not (w8a8 or panels or isinstance(weight, np.ndarray)):
        raise TypeError(f"weight must be a numpy array, got {type(weight).__name__}")
    OC = weight.scale.shape[-1] if w8a8 else weight.rows if panels else weight.shape[0] if weight.ndim == 2 else 0
    out = np.empty((*lead, OC), np.float32) if out is None else _out(out, "out", (*lead, OC))
    pg = None if pre_gelu is None else _view(_out(pre_gelu, "pre_gelu", (*lead, OC)), OC)
    if w8a8:
        _C.matmul_forward_w8a8(_view(out, OC), _view(inp, C), weight.data, weight.scale, weight.wsum, bias, pg)
    elif panels:
        _C.matmul_forward_bf16p(_view(out, OC), _view(inp, C), weight.data, OC, bias, pg)
    else:
        _C.matmul_forward(_view(out, OC), _view(inp, C), weight, bias, pg, _bf16(dtype), scale)
    return out


def matmul_backward(dout, inp, weight, dinp=None, dweight=None, dbias=None, need_dinp=True, need_bias=True,
                    need_weight=True, dtype: str = "float32"):
    """Gradients of matmul_forward, accumulated: returns (dinp, dweight, dbias); need_dinp/need_bias/need_weight=False
    skip those (returned as None; need_weight=False: a frozen weight). dtype="bfloat16": both products in bf16
    (_bf16), as autocast's backward. weight may also be a frozen weight in a decode form (bf16 bits, Bf16Panels,
    Int8Weight: LoRA over a base held in bf16 or int8), with need_weight=need_bias=False: dinp += dout @ W on W's
    own numbers (dtype: the product's precision, as for float32 weights)."""
    dout, inp = _f32(dout, "dout"), _f32(inp, "inp")
    weight, scale = weight if isinstance(weight, Int8Weight) else (weight, None)
    if isinstance(weight, Int8Panels):
        raise TypeError("matmul_backward: w8a8 weights (Int8Panels) are for inference only; hold the base in "
                        "'bfloat16' or 'int8' to train adapters on it")
    rows = weight.rows if isinstance(weight, Bf16Panels) else 0
    weight = weight.data if rows else weight
    if not isinstance(weight, np.ndarray):
        raise TypeError(f"weight must be a numpy array, got {type(weight).__name__}")
    held = weight.dtype in (np.uint16, np.int8)
    if held and (need_weight or need_bias):
        raise ValueError("matmul_backward: a weight held in bf16 or int8 is frozen: give need_weight=False and "
                         "need_bias=False")
    weight = weight if held else _f32(weight, "weight")
    C, OC = inp.shape[-1], rows or weight.shape[0]
    dinp = _out(dinp, "dinp", inp.shape) if need_dinp else None
    dweight = _out(dweight, "dweight", weight.shape) if need_weight else None
    dbias = _out(dbias, "dbias", (OC,)) if need_bias else None
    _C.matmul_backward(None if dinp is None else _view(dinp, C), dweight, dbias, _view(dout, OC),
                       _view(inp, C), weight, _bf16(dtype), scale, rows)
    return dinp, dweight, dbias


def gemm(a, b, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0, out=None, accumulate: bool = False,
         dtype: str = "float32") -> np.ndarray:
    """out (M, N) = alpha * op(a) @ op(b) (accumulate: out +=); op(a) = a (M, K) or a.T for a stored (K, M) if
    trans_a; likewise b. float32, C-contiguous. The GEMM under matmul (the same kernel, any transpose): the model's
    small products (LoRA's adapters). dtype="bfloat16": operands rounded to bf16 (_bf16). Returns out."""
    a, b = _f32(a, "a"), _f32(b, "b")
    M = a.shape[1 if trans_a else 0] if a.ndim == 2 else 0
    N = b.shape[0 if trans_b else 1] if b.ndim == 2 else 0
    out = np.zeros((M, N), np.float32) if out is None else _f32(out, "out")
    _C.gemm(out, a, b, bool(trans_a), bool(trans_b), float(alpha), 1.0 if accumulate else 0.0, _bf16(dtype))
    return out


# ---- attention -----------------------------------------------------------------------------------------


def _nkv(n_kv_head) -> int | None:
    return None if n_kv_head is None else int(n_kv_head)


def _q_width(qkv, n_head: int, n_kv_head: int | None) -> int:
    """C = n_head * hs of packed qkv (..., (n_head + 2 * n_kv_head) * hs) (both backends; the bindings check)."""
    nh, nkv = int(n_head), int(n_head if n_kv_head is None else n_kv_head)
    return qkv.shape[-1] // (nh + 2 * nkv) * nh if nh > 0 and nkv > 0 else 0


def _kv_out_width(qkv, kcache, n_kv_head: int | None) -> int:
    """NH * hs of attention_kv_forward's out, from qkv (B, Tn, (NH + 2 NKV) hs) and kcache (B, NKV, maxT, hs); n_kv_head
    None means NH = NKV. Shapes only (both backends; the bindings check them)."""
    if len(kcache.shape) != 4 or kcache.shape[-1] <= 0:
        return 0
    nkv, hs = kcache.shape[1], kcache.shape[-1]
    return max(nkv if n_kv_head is None else qkv.shape[-1] // hs - 2 * nkv, 0) * hs


def attention_opts(scale=None, softcap=None, window=None) -> dict:
    """The score options of the attentions (both backends) as the kernels take them, checked (errors name the
    argument): scale (q . k) * scale, None -> 0 (the kernels' 1/sqrt(hs)), else a finite number > 0; softcap: the
    scores become softcap * tanh(score / softcap) (softcap_arg: None -> 0); window: query t sees key s only if
    t - s < window (sliding window), None -> 0 (full causal), else an int >= 1.

    >>> attention_opts(scale=0.0625, window=4096)
    {'scale': 0.0625, 'softcap': 0.0, 'window': 4096}
    """
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
            raise TypeError(f"scale must be None or a number > 0, got {type(scale).__name__}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")
    if window is not None:
        if isinstance(window, bool) or not isinstance(window, (int, np.integer)):
            raise TypeError(f"window must be None or an int >= 1, got {type(window).__name__}")
        if window < 1:
            raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    return {"scale": 0.0 if scale is None else float(scale), "softcap": softcap_arg(softcap),
            "window": 0 if window is None else int(window)}


def attention_forward(qkv, n_head: int, out=None, lse=None, n_kv_head: int | None = None, dtype: str = "float32", *,
                      scale: float | None = None, softcap: float | None = None, window: int | None = None):
    """Causal self-attention on packed qkv (B, T, (NH + 2*NKV) * hs) = [q | k | v] -> (out (B, T, NH*hs), lse
    (B, NH, T): the logsumexp of each query's final scores, saved for backward). n_kv_head (NKV, dividing n_head;
    None = n_head, qkv (B, T, 3C)) gives grouped-query attention: query head h uses kv head h // (NH // NKV), and
    K/V are never repeated in memory.

    The scores (attention_opts): (q . k) * scale (None: 1/sqrt(hs); Gemma 2/3: query_pre_attn_scalar**-0.5), then
    softcap * tanh(score / softcap) if softcap is given (Gemma 2: 50); window (None: full causal) lets query t see
    only keys t - window < s <= t (Mistral, Gemma 2/3), and skips the key tiles outside it: O(T * window) work.

    dtype="bfloat16": the tile products (q k^T and p v; in the backward also dO v^T, p^T dO, dS k, dS^T q) round
    their operands to bf16 and sum in fp32, as torch's SDPA on bf16 q, k, v does, where the CPU has AVX512_BF16
    (`info()["bf16_attention"]`); elsewhere they stay fp32, which is as fast there. The softmax, lse and all the
    arrays stay float32."""
    qkv = _f32(qkv, "qkv")
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be (B, T, (n_head + 2*n_kv_head) * hs), got shape {qkv.shape}")
    B, T, W = qkv.shape
    n_head = int(n_head)
    out = np.empty((B, T, _q_width(qkv, n_head, n_kv_head)), np.float32) if out is None else out
    if lse is None:  # (for an impossible n_head, a placeholder: the kernel names the problem)
        lse = np.empty((B, n_head, T) if 0 < n_head <= W else 0, np.float32)
    opts = attention_opts(scale, softcap, window)
    _C.attention_forward(out, lse, qkv, n_head, _nkv(n_kv_head), _bf16(dtype), **opts)
    return out, lse


def attention_backward(dout, qkv, out, lse, n_head: int, dqkv=None, n_kv_head: int | None = None,
                       dtype: str = "float32", *, scale: float | None = None, softcap: float | None = None,
                       window: int | None = None) -> np.ndarray:
    """Gradient w.r.t. qkv (B, T, (NH + 2*NKV) * hs), accumulated into dqkv; dk, dv of a kv head sum over the
    query heads that share it. dtype, scale, softcap and window as given to attention_forward."""
    opts = attention_opts(scale, softcap, window)
    dqkv = _out(dqkv, "dqkv", _f32(qkv, "qkv").shape)
    _C.attention_backward(dqkv, dout, qkv, out, lse, int(n_head), _nkv(n_kv_head), _bf16(dtype), **opts)
    return dqkv


def attention_kv_forward(qkv, kcache, vcache, pos, out=None, n_kv_head: int | None = None, dtype: str = "float32",
                         *, scale: float | None = None, softcap: float | None = None,
                         window: int | None = None) -> np.ndarray:
    """Inference attention with a KV cache: qkv (B, Tn, (NH + 2*NKV) * hs) of Tn new tokens per sequence; their keys
    and values are written into kcache/vcache (B, NKV, max_T, hs) at positions pos[b] .. pos[b]+Tn-1 (only the kv
    heads are stored), then each new query attends causally to its sequence's cache. Returns out (B, Tn, NH*hs).
    pos is not advanced. n_kv_head None means n_head (qkv (B, Tn, 3C)); given, it must equal kcache.shape[1].
    dtype="bfloat16": a prefill's (Tn > 1) tile products in bf16 as in attention_forward; a step (Tn = 1) is fp32.
    scale, softcap, window as in attention_forward, positions absolute (pos[b] + t): position p is kept at row
    p % max_T, so with a window the cache may be a ring shorter than the positions, of max_T >= window + Tn - 1 rows
    (then no new row overwrites a key that a new query still reads; ValueError otherwise); without one every
    pos[b] + Tn <= max_T."""
    opts = attention_opts(scale, softcap, window)
    qkv, kcache = _f32(qkv, "qkv"), _f32(kcache, "kcache")
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be (B, Tn, (n_head + 2*n_kv_head) * hs), got shape {qkv.shape}")
    out = np.empty((*qkv.shape[:2], _kv_out_width(qkv, kcache, n_kv_head)), np.float32) if out is None else out
    _C.attention_kv_forward(out, kcache, vcache, qkv, _ids(pos, "pos"), _nkv(n_kv_head), _bf16(dtype), **opts)
    return out


# ---- softmax + cross-entropy ---------------------------------------------------------------------------


def softcap_arg(softcap) -> float:
    """The kernels' softcap argument: None -> 0 (no cap); else a finite number > 0 (ValueError naming softcap)."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.integer, np.floating)):
        raise TypeError(f"softcap must be None or a number > 0, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    return float(softcap)


def temperature_arg(temperature) -> float:
    """The kernels' temperature argument: a finite number > 0 (TypeError / ValueError naming temperature)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)):
        raise TypeError(f"temperature must be a number > 0, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def softcap_logits(logits: np.ndarray, softcap: float | None) -> np.ndarray:
    """c * tanh(logits / c) in place on a float32 numpy array (Gemma 2 / nanochat logit soft-capping; the kernels'
    softcap); logits unchanged for None. Returns logits."""
    if softcap is not None:
        c = np.float32(softcap_arg(softcap))
        np.tanh(logits / c, out=logits)
        logits *= c
    return logits


def softmax_ce(logits, targets, grad_scale: float = 1.0, ignore_index: int = IGNORE_INDEX, backward: bool = True,
               inplace: bool = False, losses=None, row_weights=None, softcap: float | None = None,
               temperature: float = 1.0):
    """Per-row loss and dlogits = (softmax - onehot) * grad_scale for logits (..., V), targets (...).

    Rows whose target equals `ignore_index` get loss 0 and zero gradient. With inplace=True dlogits
    overwrites logits (no extra N x V buffer). row_weights (float32, shaped like targets) scales each row's
    gradient (grad_scale * row_weights[n]: the gradient of sum_n w[n] * loss[n]); losses are unchanged.
    softcap c (> 0, optional): the logits are soft-capped first, z = c * tanh(logits / c) (Gemma 2, nanochat); the
    loss is that of z and dlogits the gradient with respect to the uncapped logits.
    temperature T (> 0; 1: none): the (capped) logits are then divided by T, as a sampler at temperature T does
    (fastllm.sample): the loss is -log softmax(z / T)[target] and dlogits its gradient with respect to the logits,
    (softmax(z / T) - onehot) / T (* dz/dlogits) * grad_scale (RL's log-probs, rl.py). T = 1 is bit for bit none.
    Returns (losses, dlogits or None); dlogits is written (=), not accumulated.
    """
    logits = _f32(logits, "logits")
    targets = _ids(targets, "targets")
    rw = _row_weights(row_weights, targets)
    V = logits.shape[-1]
    losses = np.empty(targets.shape, np.float32) if losses is None else losses
    dlogits = (logits if inplace else np.empty_like(logits)) if backward else None
    _C.softmax_ce(_view(losses), None if dlogits is None else _view(dlogits, V), _view(logits, V),
                  _view(targets), float(grad_scale), int(ignore_index), rw, softcap_arg(softcap),
                  temperature_arg(temperature))
    return losses, dlogits


def lmhead_chunk_rows(n_rows: int, vocab_size: int, dtype: str = "float32") -> int:
    """Rows of lmhead_ce's default scratch for n_rows rows (what the CPU kernel uses when none is given)."""
    _np_dtype(dtype)
    return int(_C.lmhead_chunk_rows(int(n_rows), int(vocab_size)))


def lmhead_ce(hidden, weight, targets, grad_scale: float = 1.0, ignore_index: int = IGNORE_INDEX,
              backward: bool = True, dhidden=None, dweight=None, row_weights=None, scratch=None, losses=None,
              softcap: float | None = None, temperature: float = 1.0, need_weight: bool = True, dtype: str = "float32"):
    """Fused lm-head + cross-entropy: logits = hidden (..., C) @ weight (V, C)^T, computed in chunks of rows into
    `scratch` (rows, V) (allocated per call if None: pass one, of lmhead_chunk_rows rows, to reuse it) and never
    materialised whole. Returns (losses (...), dhidden (..., C) or None, dweight (V, C) or None); gradients
    accumulate. With row_weights (float32, shaped like targets) the gradients are those of
    grad_scale * sum_n w[n] * loss[n]. softcap c: the logits are c * tanh(logits / c), temperature T: then divided
    by T (see softmax_ce). dtype="bfloat16": the two products in bf16 (_bf16); the softmax and the loss stay fp32.
    need_weight=False: no dweight (a frozen lm-head). weight may also be a frozen lm-head in a decode form (bf16
    bits, Bf16Panels, Int8Weight; need_weight=False): each chunk's logits by matmul_forward, then softmax_ce and
    dhidden += dlogits @ W by matmul_backward, on the weight's own numbers."""
    hidden = _f32(hidden, "hidden")
    targets = _ids(targets, "targets")
    rw = _row_weights(row_weights, targets)
    C = hidden.shape[-1]
    losses = np.empty(targets.shape, np.float32) if losses is None else losses
    dhidden = _out(dhidden, "dhidden", hidden.shape) if backward else None
    if isinstance(weight, (Bf16Panels, Int8Weight)) or getattr(weight, "dtype", None) == np.uint16:
        if need_weight and backward:
            raise ValueError("lmhead_ce: an lm-head held in bf16 or int8 is frozen: give need_weight=False")
        h, t, loss = _view(hidden, C), _view(targets), _view(losses)
        dh = None if dhidden is None else _view(dhidden, C)
        w = None if rw is None else _view(rw)
        V = weight.rows if isinstance(weight, Bf16Panels) else getattr(weight, "q", weight).shape[0]
        rows = lmhead_chunk_rows(h.shape[0], V) if scratch is None else scratch.shape[0]
        for s in range(0, h.shape[0], rows):
            n = min(rows, h.shape[0] - s)
            logits = matmul_forward(h[s:s + n], weight, out=None if scratch is None else scratch[:n])
            softmax_ce(logits, t[s:s + n], grad_scale, ignore_index, backward, inplace=True, losses=loss[s:s + n],
                       row_weights=None if w is None else w[s:s + n], softcap=softcap, temperature=temperature)
            if backward:
                matmul_backward(logits, h[s:s + n], weight, dinp=dh[s:s + n], need_weight=False, need_bias=False,
                                dtype=dtype)
        return losses, dhidden, None
    weight = _f32(weight, "weight")
    dweight = _out(dweight, "dweight", weight.shape) if backward and need_weight else None
    _C.lmhead_ce(_view(losses), None if dhidden is None else _view(dhidden, C), dweight,
                 _view(hidden, C), weight, _view(targets), float(grad_scale), int(ignore_index), scratch, rw,
                 softcap_arg(softcap), temperature_arg(temperature), _bf16(dtype))
    return losses, dhidden, dweight


# ---- layernorm, gelu (tanh and erf), residual ----------------------------------------------------------


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
    dx = _out(dx, "dx", x.shape)
    dweight = _out(dweight, "dweight", (C,))
    dbias = _out(dbias, "dbias", (C,))
    _C.layernorm_backward(_view(dx, C), dweight, dbias, _view(_f32(dout, "dout"), C), _view(x, C),
                          weight, _view(mean), _view(rstd))
    return dx, dweight, dbias


def _activation(kernel, x, out) -> np.ndarray:
    """out = f(x) element-wise by kernel(out, x) (a GELU); out may be x itself."""
    out = np.empty_like(_f32(x, "x")) if out is None else out
    kernel(out, x)
    return out


def _activation_backward(kernel, dout, x, dx) -> np.ndarray:
    """dx += f'(x) * dout by kernel(dx, dout, x)."""
    dx = _out(dx, "dx", _f32(x, "x").shape)
    kernel(dx, dout, x)
    return dx


def gelu_forward(x, out=None) -> np.ndarray:
    """GELU with the tanh approximation (GPT-2), element-wise; out may be x itself."""
    return _activation(_C.gelu_forward, x, out)


def gelu_backward(dout, x, dx=None) -> np.ndarray:
    """dx += gelu'(x) * dout."""
    return _activation_backward(_C.gelu_backward, dout, x, dx)


def gelu_erf_forward(x, out=None) -> np.ndarray:
    """The exact GELU (torch's gelu(approximate="none"), HF's "gelu": GPT-NeoX, Pythia): out = x Phi(x) =
    0.5 x (1 + erf(x / sqrt(2))), element-wise; out may be x itself."""
    return _activation(_C.gelu_erf_forward, x, out)


def gelu_erf_backward(dout, x, dx=None) -> np.ndarray:
    """dx += (Phi(x) + x phi(x)) * dout, phi the standard normal density."""
    return _activation_backward(_C.gelu_erf_backward, dout, x, dx)


def residual_forward(a, b, out=None, scale: float = 1.0) -> np.ndarray:
    """out = a + scale * b (the skip connection; scale: Granite's residual_multiplier); out may be a or b itself."""
    out = np.empty_like(_f32(a, "inp1")) if out is None else out
    _C.residual_forward(out, a, b, scale_arg(scale))
    return out


def residual_backward(dout, dinp1=None, dinp2=None, scale: float = 1.0):
    """dinp1 += dout, dinp2 += scale * dout (the gradients of both inputs of residual_forward)."""
    dout = _f32(dout, "dout")
    dinp1, dinp2 = _out(dinp1, "dinp1", dout.shape), _out(dinp2, "dinp2", dout.shape)
    _C.residual_backward(dinp1, dinp2, dout, scale_arg(scale))
    return dinp1, dinp2


# ---- the Llama and Gemma families: rmsnorm, rope, swiglu, geglu, relu2 -----------------------------------


def _norm_stats_shape(x, heads, cols=None) -> tuple:
    """The shape of rmsnorm's rstd for x (..., C) (also with cols=(c0, c1): a row's columns c0..c1-1), or with
    heads=(h0, h1) for the rows [h0, h1) of x (..., R, C)."""
    if heads is None:
        return tuple(x.shape[:-1])
    if len(x.shape) < 2:
        raise ValueError(f"heads needs x (..., R, C) with a head axis, got shape {tuple(x.shape)}")
    return (*x.shape[:-2], int(heads[1]) - int(heads[0]))


def _heads(heads):
    """heads=(h0, h1) or cols=(c0, c1) as a pair of ints (None stays None)."""
    return None if heads is None else (int(heads[0]), int(heads[1]))


def rmsnorm_forward(x, weight, eps: float = 1e-6, out=None, rstd=None, heads=None, cols=None):
    """RMSNorm over the last axis: x (..., C) -> (out = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps) of shape
    x.shape[:-1]), as HF LlamaRMSNorm. out may be x itself (in place).
    heads=(h0, h1) normalises only the rows x[..., h0:h1, :] of x (..., R, C), rstd (..., h1 - h0): Qwen3's QK-norm
    on the packed qkv viewed as (B, T, NH + 2*NKV, hs) (q heads (0, NH), k heads (NH, NH + NKV)); cols=(c0, c1) only
    the columns x[..., c0:c1] (weight (c1 - c0,), rstd x.shape[:-1]): OLMo 2's QK-norm over all the q (or k) channels
    of the packed qkv (B, T, W). The other rows (columns) of out are left as they are (a new out starts as a copy of
    x).

    >>> out, rstd = rmsnorm_forward(np.ones((2, 4), np.float32), np.ones(4, np.float32))
    """
    x = _f32(x, "x")
    if out is None:
        out = np.empty_like(x) if heads is None and cols is None else x.copy()
    rstd = np.empty(_norm_stats_shape(x, heads, cols), np.float32) if rstd is None else rstd
    _C.rmsnorm_forward(out, rstd, x, weight, float(eps), _heads(heads), _heads(cols))
    return out, rstd


def rmsnorm_backward(dout, x, weight, rstd, dx=None, dweight=None, heads=None, cols=None):
    """Gradients of rmsnorm_forward, accumulated: returns (dx (..., C), dweight (weight's shape)); with heads (cols),
    only those rows (columns) of dx receive. dx may be dout itself (in place): its rows are then replaced (=) by the
    gradient and, with heads or cols, the others pass through (QK-norm's backward on the packed dqkv: the v rows'
    gradient is dout's)."""
    x = _f32(x, "x")
    dx = _out(dx, "dx", x.shape)
    dweight = _out(dweight, "dweight", np.shape(weight))
    _C.rmsnorm_backward(dx, dweight, dout, x, weight, rstd, _heads(heads), _heads(cols))
    return dx, dweight


def rope_forward(qkv, cos, sin, n_head: int, pos=None, out=None, n_kv_head: int | None = None) -> np.ndarray:
    """Rotary position embedding of the q and k heads of packed qkv (B, T, (NH + 2*NKV) * hs), rotate-half layout
    (HF apply_rotary_pos_emb): token t of sequence b sits at position pos[b] + t (pos int (B,), None = 0) and uses
    row p of the tables cos, sin (max_pos, rotary_dim // 2) from fastllm.rope.rope_tables; the first rotary_dim
    dims of each q/k head rotate, the rest and v pass through. out may be qkv itself (in place)."""
    qkv = _f32(qkv, "qkv")
    out = np.empty_like(qkv) if out is None else out
    _C.rope_forward(out, qkv, cos, sin, None if pos is None else _ids(pos, "pos"), int(n_head), _nkv(n_kv_head))
    return out


def rope_backward(dout, cos, sin, n_head: int, pos=None, dqkv=None, n_kv_head: int | None = None) -> np.ndarray:
    """Gradient of rope_forward (the inverse rotation; no saved activations): dqkv += R^T dout. dqkv may be dout
    itself: then dout is rotated back in place (dqkv = R^T dout), the usual use after attention_backward."""
    dout = _f32(dout, "dout")
    dqkv = _out(dqkv, "dqkv", dout.shape)
    _C.rope_backward(dqkv, dout, cos, sin, None if pos is None else _ids(pos, "pos"), int(n_head), _nkv(n_kv_head))
    return dqkv


def swiglu_forward(gate_up, out=None) -> np.ndarray:
    """SwiGLU: gate_up (..., 2H) = [gate | up] -> out (..., H) = silu(gate) * up, HF LlamaMLP's act_fn(gate_proj(x))
    * up_proj(x) when gate_up = x @ concat([gate_proj.weight, up_proj.weight]).T.

    >>> swiglu_forward(np.zeros((3, 8), np.float32)).shape
    (3, 4)
    """
    return _gated_forward(_C.swiglu_forward, gate_up, out)


def swiglu_backward(dout, gate_up, dgate_up=None) -> np.ndarray:
    """dgate_up (..., 2H) += [dout * up * silu'(gate) | dout * silu(gate)]."""
    return _gated_backward(_C.swiglu_backward, dout, gate_up, dgate_up)


def geglu_forward(gate_up, out=None) -> np.ndarray:
    """GeGLU (Gemma): gate_up (..., 2H) = [gate | up] -> out (..., H) = gelu_tanh(gate) * up, with GELU's tanh
    approximation (torch's gelu(approximate="tanh"), HF's gelu_pytorch_tanh): HF GemmaMLP's act_fn(gate_proj(x)) *
    up_proj(x) when gate_up = x @ concat([gate_proj.weight, up_proj.weight]).T.

    >>> geglu_forward(np.zeros((3, 8), np.float32)).shape
    (3, 4)
    """
    return _gated_forward(_C.geglu_forward, gate_up, out)


def geglu_backward(dout, gate_up, dgate_up=None) -> np.ndarray:
    """dgate_up (..., 2H) += [dout * up * gelu_tanh'(gate) | dout * gelu_tanh(gate)]."""
    return _gated_backward(_C.geglu_backward, dout, gate_up, dgate_up)


def _gated_forward(kernel, gate_up, out) -> np.ndarray:
    """A gated MLP activation's forward (swiglu, geglu): gate_up (..., 2H) -> out (..., H)."""
    gate_up = _f32(gate_up, "gate_up")
    out = np.empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), np.float32) if out is None else out
    kernel(out, gate_up)
    return out


def _gated_backward(kernel, dout, gate_up, dgate_up) -> np.ndarray:
    dgate_up = _out(dgate_up, "dgate_up", _f32(gate_up, "gate_up").shape)
    kernel(dgate_up, dout, gate_up)
    return dgate_up


def relu2_forward(x, out=None) -> np.ndarray:
    """ReLU^2 (nanochat, modded-nanogpt, Primer): out = max(x, 0)^2, element-wise; out may be x itself."""
    out = np.empty_like(_f32(x, "x")) if out is None else out
    _C.relu2_forward(out, x)
    return out


def relu2_backward(dout, x, dx=None) -> np.ndarray:
    """dx += 2 max(x, 0) * dout."""
    dx = _out(dx, "dx", _f32(x, "x").shape)
    _C.relu2_backward(dx, dout, x)
    return dx


# ---- embedding -----------------------------------------------------------------------------------------


def scale_arg(scale) -> float:
    """embedding_forward/backward's and residual_forward/backward's scale: a finite real number (TypeError /
    ValueError naming scale)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"scale must be a number, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def embedding_forward(tokens, wte, wpe, out=None, scale: float = 1.0) -> np.ndarray:
    """out (B, T, C) = wte[tokens] * scale + wpe[:T] for tokens (B, T); wpe None: out = wte[tokens] * scale (no
    position embedding, as in rotary models). scale = sqrt(C) for Gemma (HF rounds it to the activations' dtype
    first: pass that value to match it in bfloat16).

    >>> embedding_forward(np.zeros((1, 2), np.int32), np.ones((3, 4), np.float32), None, scale=2.0)[0, 0]
    array([2., 2., 2., 2.], dtype=float32)
    """
    scale = scale_arg(scale)
    tokens = _ids(tokens, "tokens")
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (B, T), got shape {tokens.shape}")
    panels = isinstance(wte, Bf16Panels)
    if (panels or isinstance(wte, np.ndarray) and wte.dtype == np.uint16) and wpe is None:  # a bf16 table (a model
        # holding its weights in bf16 from a BF16 file): gathered and widened exactly, as the kernel reads float32
        # (numpy: a gather of B*T rows is no hot path); or the panels of a tied lm-head (Bf16Panels: row r is word
        # r % 32 of each group of 32 words in panel r // 32, each word two bf16 values of the row, low half first)
        V = wte.rows if panels else len(wte)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= V):
            raise ValueError(f"tokens hold ids outside [0, {V})")
        if panels:
            C, nr = wte.data.shape[-1], _C.bf16_panel_rows(1)  # (rows per panel)
            words = wte.data.view(np.uint32).reshape(-1, C // 2, nr)  # panel, pair, row
            bits = words[tokens // nr, :, tokens % nr].view(np.uint16)  # (..., C): each word's low half first
        else:
            bits = wte[tokens]
        rows = from_bf16(bits)
        out = np.empty(rows.shape, np.float32) if out is None else out
        np.multiply(rows, np.float32(scale), out=out)
        return out
    out = np.empty((*tokens.shape, _f32(wte, "wte").shape[-1]), np.float32) if out is None else out
    _C.embedding_forward(out, tokens, wte, wpe, scale)
    return out


def embedding_backward(dout, tokens, dwte, dwpe, scale: float = 1.0):
    """Scatter-add dout (B, T, C) * scale into dwte (V, C) and dout (unscaled) into dwpe (max_T, C) (None: no
    position embedding), deterministically; returns them."""
    _C.embedding_backward(dwte, dwpe, dout, _ids(tokens, "tokens"), scale_arg(scale))
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
