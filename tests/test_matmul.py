"""matmul forward/backward (csrc/cpu/matmul.cpp, the blocked GEMM under it) against the float64 reference and
torch autograd, on awkward shapes, 1 and 2 threads, every SIMD level; accumulation semantics; bad input.

Tolerance (fp32 inputs of unit scale, sums of K products): |err| <= atol + rtol*|ref| with
rtol = 1e-5 * sqrt(K) + 1e-6 and atol = 1e-5 * sqrt(K) * (typical |product| = 1), K the summed dimension
(C for the forward, OC for dinp, N for dweight and dbias): fp32 summation error grows ~ sqrt(K) eps."""

from __future__ import annotations

import numpy as np
import pytest
import reference as ref

import fastllm
from fastllm import _C, ops

SHAPES = [  # (N, C, OC)
    (1, 1, 1),
    (7, 13, 5),
    (127, 769, 3),
    (33, 64, 100),
    (97, 131, 61),  # every dim prime / odd
    (3, 40, 130),  # few rows: the small-M (no packing) forward path
    (13, 50, 37),  # few rows in two row groups (8 + 5), odd K tail
    (32, 300, 70),  # the most rows of the small-M path: four groups of 8
    (256, 768, 2304),
]


def tol(K: int) -> dict:
    s = 1e-5 * np.sqrt(max(K, 1))
    return dict(rtol=s + 1e-6, atol=s)




def make(shape, rng):
    N, C, OC = shape
    inp = rng.standard_normal((N, C), dtype=np.float32)
    weight = rng.standard_normal((OC, C), dtype=np.float32)
    bias = rng.standard_normal(OC, dtype=np.float32)
    dout = rng.standard_normal((N, OC), dtype=np.float32)
    return inp, weight, bias, dout


_REF_CACHE: dict = {}


def make_with_ref(shape):
    """Inputs and float64 reference results, computed once per shape (the big shape's reference dominates)."""
    if shape not in _REF_CACHE:
        inp, weight, bias, dout = make(shape, np.random.default_rng(1234))
        _REF_CACHE[shape] = (
            (inp, weight, bias, dout),
            ref.matmul_forward(inp, weight),
            ref.matmul_backward(dout, inp, weight),
        )
    return _REF_CACHE[shape]


def run_fwd_bwd(inp, weight, bias, dout, init=0.0):
    """fastllm forward + backward; gradient buffers start at `init` (backward accumulates into them)."""
    N, C = inp.shape
    OC = weight.shape[0]
    out = np.full((N, OC), np.nan, np.float32)  # forward overwrites: garbage in `out` must not leak
    _C.matmul_forward(out, inp, weight, bias)
    dinp = np.full((N, C), init, np.float32)
    dweight = np.full((OC, C), init, np.float32)
    dbias = np.full(OC, init, np.float32)
    _C.matmul_backward(dinp, dweight, dbias, dout, inp, weight)
    return out, dinp, dweight, dbias


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matmul_vs_reference(shape, with_bias, threads, simd):
    N, C, OC = shape
    if simd != "avx512" and N * C * OC > 10**7:
        pytest.skip("large shape only on the fastest path (keeps the suite quick)")
    (inp, weight, bias, dout), r_out, (r_dinp, r_dweight, r_dbias) = make_with_ref(shape)
    b = bias if with_bias else None
    out, dinp, dweight, dbias = run_fwd_bwd(inp, weight, b, dout, init=0.5)  # accumulation onto 0.5
    if with_bias:
        r_out = r_out + bias
    np.testing.assert_allclose(out, r_out, **tol(C))
    np.testing.assert_allclose(dinp, r_dinp + 0.5, **tol(OC))
    np.testing.assert_allclose(dweight, r_dweight + 0.5, **tol(N))
    np.testing.assert_allclose(dbias, r_dbias + 0.5, **tol(N))


@pytest.mark.parametrize("shape", SHAPES[:5] + [(64, 96, 288)], ids=lambda s: "x".join(map(str, s)))
def test_matmul_vs_torch(shape, rng):
    torch = pytest.importorskip("torch")
    N, C, OC = shape
    inp, weight, bias, dout = make(shape, rng)
    ti = torch.tensor(inp, requires_grad=True)
    tw = torch.tensor(weight, requires_grad=True)
    tb = torch.tensor(bias, requires_grad=True)
    tout = torch.nn.functional.linear(ti, tw, tb)
    tout.backward(torch.tensor(dout))
    out, dinp, dweight, dbias = run_fwd_bwd(inp, weight, bias, dout)
    np.testing.assert_allclose(out, tout.detach().numpy(), **tol(C))
    np.testing.assert_allclose(dinp, ti.grad.numpy(), **tol(OC))
    np.testing.assert_allclose(dweight, tw.grad.numpy(), **tol(N))
    np.testing.assert_allclose(dbias, tb.grad.numpy(), **tol(N))


def test_backward_accumulates_and_optional_outputs(rng):
    """Two backward calls add twice; any gradient may be None and the others are still right."""
    inp, weight, _, dout = make((45, 70, 33), rng)
    r_dinp, r_dweight, r_dbias = ref.matmul_backward(dout, inp, weight)
    dinp = rng.standard_normal(inp.shape, dtype=np.float32)
    start = dinp.copy()
    _C.matmul_backward(dinp, None, None, dout, inp, weight)
    _C.matmul_backward(dinp, None, None, dout, inp, weight)
    np.testing.assert_allclose(dinp, start + 2 * r_dinp, **tol(33))
    dweight = np.ones(weight.shape, np.float32)
    _C.matmul_backward(None, dweight, None, dout, inp, weight)
    np.testing.assert_allclose(dweight, 1 + r_dweight, **tol(45))
    dbias = np.ones(33, np.float32)
    _C.matmul_backward(None, None, dbias, dout, inp, weight)
    np.testing.assert_allclose(dbias, 1 + r_dbias, **tol(45))
    _C.matmul_backward(None, None, None, dout, inp, weight)  # nothing asked: a no-op


def test_ops_wrapper_leading_dims(rng):
    inp = rng.standard_normal((2, 3, 16), dtype=np.float32)
    weight = rng.standard_normal((8, 16), dtype=np.float32)
    out = fastllm.ops.matmul_forward(inp, weight)
    np.testing.assert_allclose(
        out, ref.matmul_forward(inp.reshape(-1, 16), weight).reshape(2, 3, 8), **tol(16)
    )


def test_zero_rows(rng):
    """N = 0: nothing to do, gradients of the weight stay as they were."""
    inp = np.zeros((0, 8), np.float32)
    weight = rng.standard_normal((4, 8), dtype=np.float32)
    out = np.empty((0, 4), np.float32)
    _C.matmul_forward(out, inp, weight, None)
    dweight = np.ones((4, 8), np.float32)
    dbias = np.ones(4, np.float32)
    _C.matmul_backward(None, dweight, dbias, np.zeros((0, 4), np.float32), inp, weight)
    assert (dweight == 1).all() and (dbias == 1).all()


# ---- the GEMM core (fastllm._C.gemm): every transpose, alpha/beta, shapes crossing the cache blocks


# (M, N, K); (20, 4200, 9) and (2700, 20, 9) are split into several dynamically scheduled chunks per thread
# (2 threads); M <= 32 with trans_b takes the unpacked small-M path (a single-stream dot product per column for
# 1 row, 4x4 steps for <= 4 rows, 8x3 for more, in groups of 8 rows)
GEMM_SHAPES = [
    (1, 1, 1),
    (1, 333, 235),  # one row: 64-wide steps, then two 16-wide, then a masked K tail
    (21, 70, 45),  # three row groups (8 + 8 + 5)
    (15, 33, 17),
    (29, 47, 1000),
    (350, 70, 41),
    (37, 3100, 19),
    (20, 4200, 9),
    (2700, 20, 9),
    (3, 2000, 50),
    (6, 1001, 77),  # 8x3 small-M steps with a last partial column step and a K tail
]


@pytest.mark.parametrize("mnk", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize(
    "trans", [(False, False), (False, True), (True, False), (True, True)], ids=["NN", "NT", "TN", "TT"]
)
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.5, 1.0), (2.0, 0.25)])
def test_gemm(mnk, trans, alpha, beta, threads, rng):
    M, N, K = mnk
    ta, tb = trans
    a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
    c0 = rng.standard_normal((M, N), dtype=np.float32)
    c = np.full((M, N), np.nan, np.float32) if beta == 0 else c0.copy()  # beta 0: c must not be read
    _C.gemm(c, a, b, ta, tb, alpha, beta)
    opa = a.T.astype(np.float64) if ta else a.astype(np.float64)
    opb = b.T.astype(np.float64) if tb else b.astype(np.float64)
    expect = alpha * (opa @ opb) + (beta * c0 if beta else 0)
    t = tol(K)
    np.testing.assert_allclose(c, expect, rtol=t["rtol"], atol=t["atol"] * max(1.0, abs(alpha)) + 1e-6)


def test_gemm_simd_levels(simd, rng):
    """Edge tiles in both M and N and a K crossing the K block, on each micro-kernel."""
    a = rng.standard_normal((53, 1100), dtype=np.float32)
    b = rng.standard_normal((1100, 77), dtype=np.float32)
    c = np.ones((53, 77), np.float32)
    _C.gemm(c, a, b, False, False, 1.0, 1.0)
    np.testing.assert_allclose(c, 1 + a.astype(np.float64) @ b, **tol(1100))


def test_gemm_bad_input(rng):
    a = np.zeros((4, 5), np.float32)
    with pytest.raises(ValueError, match="inner dimension"):
        _C.gemm(np.zeros((4, 3), np.float32), a, np.zeros((4, 3), np.float32))
    with pytest.raises(ValueError, match="c"):
        _C.gemm(np.zeros((4, 4), np.float32), a, np.zeros((5, 3), np.float32))
    with pytest.raises(TypeError, match="b"):
        _C.gemm(np.zeros((4, 3), np.float32), a, np.zeros((5, 3)))


# ---- bad input


def test_bad_dtype(rng):
    inp = rng.standard_normal((4, 8), dtype=np.float32)
    out = np.empty((4, 3), np.float32)
    with pytest.raises(TypeError, match="weight"):
        _C.matmul_forward(out, inp, np.zeros((3, 8)), None)  # float64
    with pytest.raises(TypeError, match="inp"):
        _C.matmul_forward(out, inp.astype(np.float64), np.zeros((3, 8), np.float32), None)


def test_bad_shapes(rng):
    inp = rng.standard_normal((4, 8), dtype=np.float32)
    weight = rng.standard_normal((3, 8), dtype=np.float32)
    out = np.empty((4, 3), np.float32)
    with pytest.raises(ValueError, match="weight"):
        _C.matmul_forward(out, inp, weight[:, :7].copy(), None)  # C mismatch
    with pytest.raises(ValueError, match="bias"):
        _C.matmul_forward(out, inp, weight, np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="out"):
        _C.matmul_forward(np.empty((4, 4), np.float32), inp, weight, None)
    with pytest.raises(ValueError, match="inp"):
        _C.matmul_forward(out, inp.reshape(-1), weight, None)
    dout = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="dweight"):
        _C.matmul_backward(None, np.zeros((8, 3), np.float32), None, dout, inp, weight)
    with pytest.raises(ValueError, match="dout"):
        _C.matmul_backward(
            np.zeros((4, 8), np.float32), None, None, np.zeros((3, 4), np.float32), inp, weight
        )
    with pytest.raises(ValueError, match="dinp"):
        _C.matmul_backward(np.zeros((4, 7), np.float32), None, None, dout, inp, weight)


def test_non_contiguous(rng):
    inp = rng.standard_normal((4, 16), dtype=np.float32)
    weight = rng.standard_normal((3, 8), dtype=np.float32)
    out = np.empty((4, 3), np.float32)
    with pytest.raises(ValueError, match="contiguous"):
        _C.matmul_forward(out, inp[:, ::2], weight, None)
    with pytest.raises(ValueError, match="contiguous"):
        _C.matmul_forward(np.empty((3, 4), np.float32).T, inp[:, :8].copy(), weight, None)


def test_output_overlapping_an_input_is_refused(rng):
    """out=inp used to return wrong numbers (the kernel reads inp while writing out); any overlap is refused."""
    x = rng.standard_normal((4, 8), dtype=np.float32)
    w = rng.standard_normal((8, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="out overlaps inp"):
        ops.matmul_forward(x, w, out=x)
    with pytest.raises(ValueError, match="out overlaps weight"):
        ops.matmul_forward(x, w, out=w[2:6])
    buf = np.zeros(40, np.float32)
    with pytest.raises(ValueError, match="out overlaps inp"):  # partial overlap
        _C.matmul_forward(buf[8:40].reshape(4, 8), buf[:32].reshape(4, 8), w, None)
    with pytest.raises(ValueError, match="dinp overlaps dout"):
        ops.matmul_backward(x, x, w, dinp=x)
    with pytest.raises(ValueError, match="dweight overlaps dbias"):
        _C.matmul_backward(None, buf[:32].reshape(4, 8), buf[28:32], np.zeros((4, 4), np.float32), x,
                           w[:4].copy())
    with pytest.raises(ValueError, match="c overlaps a"):
        _C.gemm(buf[:16].reshape(4, 4), buf[:16].reshape(4, 4), np.zeros((4, 4), np.float32))
    np.testing.assert_allclose(ops.matmul_forward(x, w), x @ w.T, rtol=1e-5, atol=1e-5)  # separate out: fine


def test_zero_sizes(rng):
    """Zero rows are an empty batch; zero columns (C) or output channels (OC) are refused, naming them (they
    used to fail in numpy's reshape with 'cannot reshape array of size 0')."""
    x = rng.standard_normal((4, 8), dtype=np.float32)
    assert ops.matmul_forward(np.zeros((0, 8), np.float32), np.zeros((3, 8), np.float32)).shape == (0, 3)
    with pytest.raises(ValueError, match=r"OC \(weight rows\) must be >= 1"):
        ops.matmul_forward(x, np.zeros((0, 8), np.float32))
    with pytest.raises(ValueError, match=r"C \(inp columns\) must be >= 1"):
        ops.matmul_forward(np.zeros((4, 0), np.float32), np.zeros((3, 0), np.float32))
    with pytest.raises(ValueError, match=r"C \(inp columns\)"):
        ops.matmul_backward(np.zeros((4, 3), np.float32), np.zeros((4, 0), np.float32),
                            np.zeros((3, 0), np.float32))


def test_arguments_of_the_wrong_kind_are_named(rng):
    """A list, None or an integer past 64 bits gives an error naming the argument, not pybind11's
    'incompatible function arguments' listing every argument (whole arrays included)."""
    x = rng.standard_normal((4, 8), dtype=np.float32)
    w = rng.standard_normal((3, 8), dtype=np.float32)
    out = np.empty((4, 3), np.float32)
    for args, kind, name in [((out, x, w.tolist(), None), TypeError, "weight"),
                             ((out, None, w, None), TypeError, "inp"),
                             ((out, x, w, [0.0, 0.0, 0.0]), TypeError, "bias")]:
        with pytest.raises(kind, match=name) as e:
            _C.matmul_forward(*args)
        assert "Invoked with" not in str(e.value)
    with pytest.raises(ValueError, match="alpha"):
        _C.gemm(np.zeros((4, 4), np.float32), x, x, False, True, 10**400, 0.0)
    with pytest.raises(TypeError, match="beta"):
        _C.gemm(np.zeros((4, 4), np.float32), x, x, False, True, 1.0, "0")


def test_strided_output_is_refused_not_copied(rng):
    """A strided 3-D out cannot be viewed as (N, OC): it used to be copied silently by reshape, the kernel
    filled the copy and out kept its old values."""
    x = rng.standard_normal((2, 3, 8), dtype=np.float32)
    w = rng.standard_normal((4, 8), dtype=np.float32)
    out = np.zeros((3, 2, 4), np.float32).transpose(1, 0, 2)  # (2, 3, 4), not viewable as (6, 4)
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        ops.matmul_forward(x, w, out=out)
    mean = np.zeros((6, 2), np.float32)[:, 0]  # a strided (6,) buffer for layernorm's mean
    with pytest.raises(ValueError, match="mean must be C-contiguous"):
        ops.layernorm_forward(x, np.ones(8, np.float32), np.zeros(8, np.float32), mean=mean.reshape(2, 3))
