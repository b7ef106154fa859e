"""CUDA GEMM (csrc/cuda/matmul.cu): fastllm.cuda.gemm / matmul_forward / matmul_backward.

Oracles: float64 numpy of the inputs as the GPU sees them (bf16-rounded), and the CPU kernels (fastllm.ops).
Errors are max-norm relative (max |got - ref| / max |ref|) and printed. Tolerances: fp32 output from fp32 inputs
2e-5 (FFMA, fp32 accumulation); fp32 output from bf16 inputs 1e-4 (exact products, fp32 sums); bf16 output 1e-2
(one bf16 rounding, 2^-9 relative). Outputs are poisoned with NaN first (every element must be written).
The tensor-core kernel runs for bf16 inputs whose storage rows are multiples of 8 elements and 16-byte aligned;
`fast vs simple` compares it with the FFMA kernel (cuda.gemm_impl("simple")) on such shapes.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastllm
from fastllm import cuda, ops

gpu = pytest.mark.cuda

TOL = {("float32", "float32"): 2e-5, ("bfloat16", "float32"): 1e-4, ("bfloat16", "bfloat16"): 1e-2}
GELU_K = np.sqrt(2.0 / np.pi)


def bf16_round(x) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even) -> float32, as the GPU stores it."""
    x = np.ascontiguousarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def as_stored(x, dtype: str) -> np.ndarray:
    return bf16_round(x) if dtype == "bfloat16" else np.asarray(x, np.float32)


def upload(x, dtype: str):
    """(device array, float64 copy of what the device holds)"""
    x = np.ascontiguousarray(x, np.float32)
    return cuda.to_device(x, dtype=dtype), as_stored(x, dtype).astype(np.float64)


def poisoned(shape, dtype: str):
    return cuda.to_device(np.full(shape, np.nan, np.float32), dtype=dtype)


def gelu64(x):
    return 0.5 * x * (1 + np.tanh(GELU_K * (x + 0.044715 * x**3)))


def rel_err(got, ref) -> float:
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert np.isfinite(got).all(), f"{np.count_nonzero(~np.isfinite(got))} non-finite values of {got.size}"
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30)) if got.size else 0.0


def check(name, got, ref, tol):
    err = rel_err(got, ref)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"


def run_gemm(rng, M, N, K, trans_a, trans_b, ab, ct, epilogue, impl=None):
    """Runs cuda.gemm once; returns (c, pre_gelu or None, reference c, reference pre_gelu or None)."""
    a_np = rng.standard_normal((K, M) if trans_a else (M, K)).astype(np.float32)
    b_np = rng.standard_normal((N, K) if trans_b else (K, N)).astype(np.float32) / np.sqrt(max(K, 1))
    a, a64 = upload(a_np, ab)
    b, b64 = upload(b_np, ab)
    prod = (a64.T if trans_a else a64) @ (b64.T if trans_b else b64)
    bias = pre = None
    if epilogue in ("bias", "gelu", "accumulate"):
        bias, bias64 = upload(rng.standard_normal(N).astype(np.float32), ab)
        prod = prod + bias64
    if epilogue == "accumulate":
        c, c0 = upload(rng.standard_normal((M, N)).astype(np.float32), ct)
        ref = c0 + prod
    else:
        c = poisoned((M, N), ct)
        ref = prod
    ref_pre = None
    if epilogue == "gelu":
        pre = poisoned((M, N), ct)
        ref_pre, ref = prod, gelu64(prod)
    old = cuda.gemm_impl(impl) if impl else None
    try:
        cuda.gemm(
            c, a, b, trans_a=trans_a, trans_b=trans_b, accumulate=epilogue == "accumulate", bias=bias, pre_gelu=pre
        )
        cuda.synchronize()
    finally:
        if old:
            cuda.gemm_impl(old)
    return c.numpy(), None if pre is None else pre.numpy(), ref, ref_pre


DTYPES = [("float32", "float32"), ("bfloat16", "float32"), ("bfloat16", "bfloat16")]
TRANS = [(False, False), (False, True), (True, False), (True, True)]
TRANS_IDS = ["nn", "nt", "tn", "tt"]


@gpu
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 1), (7, 13, 5), (127, 129, 65), (300, 770, 96), (264, 200, 136)],
    ids=lambda s: "x".join(map(str, s)),
)
@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: f"{d[0]}->{d[1]}")
@pytest.mark.parametrize("epilogue", ["none", "bias", "gelu", "accumulate"])
def test_gemm(rng, shape, trans, dtypes, epilogue):
    M, N, K = shape
    c, pre, ref, ref_pre = run_gemm(rng, M, N, K, *trans, *dtypes, epilogue)
    tol = TOL[dtypes]
    check("c", c, ref, tol)
    if ref_pre is not None:
        check("pre_gelu", pre, ref_pre, tol)


@gpu
@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("dtypes", DTYPES[1:], ids=lambda d: f"{d[0]}->{d[1]}")
def test_gemm_gpt_shape(rng, trans, dtypes):
    """1024 x 2304 x 768 (the qkv projection of GPT-2 small on 1024 tokens) with the GELU epilogue."""
    c, pre, ref, ref_pre = run_gemm(rng, 1024, 2304, 768, *trans, *dtypes, "gelu")
    check("c", c, ref, TOL[dtypes])
    check("pre_gelu", pre, ref_pre, TOL[dtypes])


# shapes where every operand row is a multiple of 8 elements (the tensor-core kernel runs), with M, N, K
# below, at and above the 128 x 128 x 32 block tile and its 4-stage pipeline
FAST_SHAPES = [(8, 8, 8), (128, 128, 32), (136, 264, 40), (264, 200, 136), (520, 392, 1000),
               pytest.param((1024, 768, 3072), marks=pytest.mark.gpu_scale)]


@gpu
@pytest.mark.parametrize("shape", FAST_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("trans", TRANS, ids=TRANS_IDS)
@pytest.mark.parametrize("ct", ["float32", "bfloat16"])
@pytest.mark.parametrize("epilogue", ["gelu", "accumulate"])
@pytest.mark.parametrize("impl", ["auto", "tc1"])
def test_gemm_fast_vs_simple(shape, trans, ct, epilogue, impl):
    M, N, K = shape
    assert M % 8 == 0 and N % 8 == 0 and K % 8 == 0  # tensor cores for every transpose
    fast = run_gemm(np.random.default_rng(7), M, N, K, *trans, "bfloat16", ct, epilogue, impl=impl)
    slow = run_gemm(np.random.default_rng(7), M, N, K, *trans, "bfloat16", ct, epilogue, impl="simple")
    # same bf16 products, fp32 sums in another order; bf16 outputs may differ by one rounding
    tol = 1e-5 if ct == "float32" else 1e-2
    check("fast vs simple c", fast[0], slow[0], tol)
    check("fast c vs float64", fast[0], fast[2], TOL[("bfloat16", ct)])
    if fast[1] is not None:
        check("fast vs simple pre_gelu", fast[1], slow[1], tol)


@gpu
@pytest.mark.parametrize("offset", [1, 8], ids=["misaligned", "aligned"])
def test_gemm_views(rng, offset):
    """Operands that are views into a larger buffer: offset 1 (2 bytes: the FFMA fallback) or 8 (16 bytes)."""
    M, N, K = 136, 72, 64
    a_np = rng.standard_normal((M, K)).astype(np.float32)
    b_np = rng.standard_normal((N, K)).astype(np.float32)
    base = cuda.to_device(np.concatenate([np.zeros(offset, np.float32), a_np.ravel(), b_np.ravel()]), "bfloat16")
    a = base.view(offset, (M, K))
    b = base.view(offset + M * K, (N, K))
    c = poisoned((M, N), "float32")
    cuda.gemm(c, a, b, trans_b=True)
    ref = bf16_round(a_np).astype(np.float64) @ bf16_round(b_np).astype(np.float64).T
    check("c", c.numpy(), ref, TOL[("bfloat16", "float32")])


@gpu
@pytest.mark.parametrize("lead", [(7,), (2, 37), (300,)], ids=str)
@pytest.mark.parametrize("C,OC", [(5, 3), (64, 48), (96, 770), (768, 256)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_forward_backward_vs_cpu(rng, lead, C, OC, dtype):
    x_np = rng.standard_normal((*lead, C)).astype(np.float32)
    w_np = (rng.standard_normal((OC, C)) / np.sqrt(C)).astype(np.float32)
    b_np = rng.standard_normal(OC).astype(np.float32)
    dy_np = rng.standard_normal((*lead, OC)).astype(np.float32)
    x, xs = upload(x_np, dtype)
    w, ws = upload(w_np, dtype)
    b, bs = upload(b_np, dtype)
    dy, dys = upload(dy_np, dtype)
    xs32, ws32, bs32, dys32 = (v.astype(np.float32) for v in (xs, ws, bs, dys))

    out = poisoned((*lead, OC), dtype)
    cuda.matmul_forward(out, x, w, b)
    tol = TOL[(dtype, dtype)]
    check("out", out.numpy(), ops.matmul_forward(xs32, ws32, bs32), tol)

    # gradients accumulate into non-zero buffers
    dinp0 = as_stored(rng.standard_normal(x_np.shape).astype(np.float32), dtype)
    dw0 = rng.standard_normal((OC, C)).astype(np.float32)
    db0 = rng.standard_normal(OC).astype(np.float32)
    dinp = cuda.to_device(dinp0, dtype=dtype)
    dw = cuda.to_device(dw0)
    db = cuda.to_device(db0)
    cuda.matmul_backward(dinp, dw, db, dy, x, w)
    ref_dinp, ref_dw, ref_db = ops.matmul_backward(
        dys32, xs32, ws32, dinp=dinp0.copy(), dweight=dw0.copy(), dbias=db0.copy()
    )
    check("dinp", dinp.numpy(), ref_dinp, tol)
    check("dweight", dw.numpy(), ref_dw, TOL[(dtype, "float32")])
    check("dbias", db.numpy(), ref_db, TOL[(dtype, "float32")])


@gpu
def test_matmul_backward_optional_outputs(rng):
    N, C, OC = 33, 24, 40
    x, xs = upload(rng.standard_normal((N, C)), "bfloat16")
    w, ws = upload(rng.standard_normal((OC, C)), "bfloat16")
    dy, dys = upload(rng.standard_normal((N, OC)), "bfloat16")
    dw = cuda.zeros((OC, C))
    cuda.matmul_backward(None, dw, None, dy, x, w)
    check("dweight", dw.numpy(), dys.T @ xs, 1e-4)
    db = cuda.zeros((OC,))
    cuda.matmul_backward(None, None, db, dy, x, w)
    check("dbias", db.numpy(), dys.sum(0), 1e-4)


@gpu
@pytest.mark.parametrize("M,N", [(1, 1), (64, 50257), (5000, 3), (16384, 40), (300, 2304)])
def test_bias_backward_deterministic(rng, M, N):
    """dbias through matmul_backward: both the one-pass and the two-pass (partial sums) path, bitwise repeatable."""
    dy, dys = upload(rng.standard_normal((M, N)), "bfloat16")
    x = cuda.zeros((M, 1), "bfloat16")
    w = cuda.zeros((N, 1), "bfloat16")
    results = []
    for _ in range(2):
        db = cuda.zeros((N,))
        cuda.matmul_backward(None, None, db, dy, x, w)
        results.append(db.numpy())
    check("dbias", results[0], dys.sum(0), 1e-4)
    assert np.array_equal(results[0], results[1]), "bias_backward is not deterministic"


# ---- bad input (TypeError for dtypes, ValueError for shapes, naming the argument)


def test_wrappers_reject_numpy():
    """No GPU needed: the Python wrappers refuse host arrays before touching the device."""
    x = np.zeros((2, 2), np.float32)
    with pytest.raises(TypeError, match="c must be a fastllm.cuda.DeviceArray"):
        cuda.gemm(x, x, x)
    with pytest.raises(TypeError, match="dout must be"):
        cuda.matmul_backward(None, None, None, x, x, x)


@gpu
def test_gemm_bad_input():
    a = cuda.zeros((4, 8), "bfloat16")
    b = cuda.zeros((8, 6), "bfloat16")
    c = cuda.zeros((4, 6))
    with pytest.raises(TypeError, match="b must have dtype bfloat16"):
        cuda.gemm(c, a, cuda.zeros((8, 6)))
    with pytest.raises(TypeError, match="c must be float32 or"):
        cuda.gemm(cuda.zeros((4, 6), "int32"), a, b)
    with pytest.raises(TypeError, match="c must be float32 or"):
        cuda.gemm(cuda.zeros((4, 6), "bfloat16"), cuda.zeros((4, 8)), cuda.zeros((8, 6)))
    with pytest.raises(TypeError, match="a must be float32 or bfloat16"):
        cuda.gemm(c, cuda.zeros((4, 8), "int32"), b)
    with pytest.raises(ValueError, match="b must have shape"):
        cuda.gemm(c, a, cuda.zeros((7, 6), "bfloat16"))
    with pytest.raises(ValueError, match="b must have shape"):
        cuda.gemm(c, a, b, trans_b=True)
    with pytest.raises(ValueError, match="a must have shape"):
        cuda.gemm(c, a, b, trans_a=True)
    with pytest.raises(ValueError, match="a must be 2-D"):
        cuda.gemm(c, cuda.zeros((8,), "bfloat16"), b)
    with pytest.raises(ValueError, match="bias must have shape"):
        cuda.gemm(c, a, b, bias=cuda.zeros((5,), "bfloat16"))
    with pytest.raises(TypeError, match="bias must have dtype"):
        cuda.gemm(c, a, b, bias=cuda.zeros((6,)))
    with pytest.raises(ValueError, match="pre_gelu must have shape"):
        cuda.gemm(c, a, b, pre_gelu=cuda.zeros((6, 4)))
    with pytest.raises(TypeError, match="pre_gelu must have dtype"):
        cuda.gemm(c, a, b, pre_gelu=cuda.zeros((4, 6), "bfloat16"))
    with pytest.raises(ValueError, match="accumulate"):
        cuda.gemm(c, a, b, accumulate=True, pre_gelu=cuda.zeros((4, 6)))
    sq = cuda.zeros((8, 8), "bfloat16")
    with pytest.raises(ValueError, match="c must not overlap a"):
        cuda.gemm(sq, sq, cuda.zeros((8, 8), "bfloat16"))
    buf = cuda.zeros((64,), "bfloat16")
    with pytest.raises(ValueError, match="c must not overlap b"):
        cuda.gemm(buf.view(0, (4, 4)), cuda.zeros((4, 4), "bfloat16"), buf.view(8, (4, 4)))
    with pytest.raises(ValueError, match="pre_gelu must not overlap c"):
        cuda.gemm(
            buf.view(0, (4, 4)),
            cuda.zeros((4, 4), "bfloat16"),
            cuda.zeros((4, 4), "bfloat16"),
            pre_gelu=buf.view(8, (4, 4)),
        )
    with pytest.raises(ValueError, match="must be 'auto', 'simple' or 'tc1'"):
        cuda.gemm_impl("cublas")


@gpu
def test_matmul_backward_bad_input():
    x = cuda.zeros((5, 4), "bfloat16")
    w = cuda.zeros((3, 4), "bfloat16")
    dy = cuda.zeros((5, 3), "bfloat16")
    with pytest.raises(TypeError, match="weight must have dtype bfloat16"):
        cuda.matmul_backward(None, None, None, dy, x, cuda.zeros((3, 4)))
    with pytest.raises(TypeError, match="inp must have dtype bfloat16"):
        cuda.matmul_backward(None, None, None, dy, cuda.zeros((5, 4)), w)
    with pytest.raises(ValueError, match="dout must be"):
        cuda.matmul_backward(None, None, None, cuda.zeros((5, 2), "bfloat16"), x, w)
    with pytest.raises(ValueError, match="inp must be"):
        cuda.matmul_backward(None, None, None, dy, cuda.zeros((6, 4), "bfloat16"), w)
    with pytest.raises(TypeError, match="dweight must have dtype float32"):
        cuda.matmul_backward(None, cuda.zeros((3, 4), "bfloat16"), None, dy, x, w)
    with pytest.raises(ValueError, match="dweight must have shape"):
        cuda.matmul_backward(None, cuda.zeros((4, 3)), None, dy, x, w)
    with pytest.raises(ValueError, match="dbias must have shape"):
        cuda.matmul_backward(None, None, cuda.zeros((4,)), dy, x, w)
    with pytest.raises(ValueError, match="dinp must have shape"):
        cuda.matmul_backward(cuda.zeros((5, 3), "bfloat16"), None, None, dy, x, w)
    with pytest.raises(ValueError, match="dinp must not overlap dout"):
        cuda.matmul_backward(
            dy.reshape((5, 3)), None, None, dy, cuda.zeros((5, 3), "bfloat16"), cuda.zeros((3, 3), "bfloat16")
        )


def test_module_has_bindings():
    """No GPU needed: a CUDA build exposes the bindings cuda.py calls."""
    if not cuda.is_built():
        pytest.skip("fastllm built without CUDA")
    for name in (
        "gemm",
        "matmul_backward",
        "gemm_impl",
        "set_gemm_impl",
        "softmax_cross_entropy",
        "lmhead_cross_entropy",
        "lmhead_chunk_rows",
    ):
        assert hasattr(fastllm._C.cuda, name), name
    assert fastllm._C.cuda.lmhead_chunk_rows(16384, 50257, "bfloat16") == 2560
    assert fastllm._C.cuda.lmhead_chunk_rows(100, 50257, "float32") == 100
