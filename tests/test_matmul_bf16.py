"""bf16 on the CPU (csrc/cpu/matmul.cpp). Inference weights (float_to_bf16, matmul_forward_bf16w): the conversion
equals torch's float32 -> bfloat16 rounding bit for bit (ties, NaN, inf, overflow, subnormals), and the product
equals the float64 product of the bf16-rounded operands on every SIMD path (AVX-512 BF16 dot products or the
portable loop) and thread count. Mixed precision (Prec::bf16: gemm, matmul_forward/backward and lmhead_ce with
dtype="bfloat16", operands rounded while packed): the same equality for every transpose, alpha/beta, shapes that are
not multiples of the tiles, K = 1, odd K and K across the cache blocks, for every kernel (AMX tiles, and the same
AMX kernel on the C++ model of the tiles on every CPU; VNNI panels on avx512_bf16 and scalar; rounded fp32 panels
on avx512/avx2). Tolerance: products of bf16 numbers are exact in fp32,
so only the fp32 summation order differs: |err| <= 1e-5 * sqrt(K) * max(|a| @ |b|)."""

from __future__ import annotations

import numpy as np
import pytest

from fastllm import _C, ops


def _r(x):
    """x rounded to bf16, as float64 (the operands the bf16 kernels multiply)."""
    return ops.from_bf16(ops.to_bf16(np.asarray(x, np.float32))).astype(np.float64)


def test_to_bf16_matches_torch_bit_for_bit(rng, simd):
    torch = pytest.importorskip("torch")
    x = np.concatenate([
        rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(-40, 38, 10000),
        np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.3895314e38, 3.4e38, 1e-45, -1e-40, 1.0 + 2**-8,
                  1.0 + 3 * 2**-8, 1.0 + 2**-8 + 2**-20], np.float32),
    ]).astype(np.float32)
    ours = ops.to_bf16(x)
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(ours[finite], ref[finite])
    assert np.all(np.isnan(ops.from_bf16(ours[~finite])))
    np.testing.assert_array_equal(ops.from_bf16(ours)[finite], torch.from_numpy(ref.view(np.int16)).view(
        torch.bfloat16).float().numpy()[finite])


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 768, 2304), (1, 200, 33), (1, 48, 5), (1, 61, 17), (3, 33, 7),
                                   (5, 37, 13), (8, 64, 100), (9, 100, 31), (16, 3072, 768), (29, 70, 33),
                                   (8, 32, 1), (9, 96, 33), (40, 64, 70),  # these 3 (and 8x64, 16x3072): AMX
                                   (48, 64, 33), (77, 130, 67), (300, 768, 100), (60, 33, 20)])  # >= 48 rows: GEMM
def test_matmul_bf16w_equals_rounded_product(shape, rng, bf16_gemm, threads):
    N, C, OC = shape
    x = rng.standard_normal((N, C), dtype=np.float32)
    w16 = ops.to_bf16(rng.standard_normal((OC, C), dtype=np.float32))
    b = rng.standard_normal(OC, dtype=np.float32)
    ref = ops.from_bf16(ops.to_bf16(x)).astype(np.float64) @ ops.from_bf16(w16).astype(np.float64).T + b
    got = ops.matmul_forward(x, w16, b)
    assert got.shape == (N, OC)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.sqrt(C) * np.abs(ref).max())
    np.testing.assert_allclose(ops.matmul_forward(x[None], w16)[0], ref - b, rtol=0,
                               atol=1e-5 * np.sqrt(C) * np.abs(ref).max())


@pytest.mark.parametrize("shape", [(1, 2, 1), (1, 70, 33), (1, 768, 2304), (2, 64, 33), (3, 130, 64), (8, 96, 100),
                                   (11, 64, 65), (16, 1600, 40), (29, 70, 31), (48, 64, 97), (300, 768, 100)])
def test_bf16_panels_equal_rounded_product(shape, rng, simd_bf16, threads):
    """Bf16Panels (pack_bf16): the same products as the row-major bf16 weights, on every row count (the tile height
    follows it: 4, 8, 12 or 14) and SIMD level (VDPBF16PS, or the portable loop over the same panels); OC not a
    multiple of the 32-column panels; bias and the GELU epilogue."""
    N, C, OC = shape
    x = rng.standard_normal((N, C), dtype=np.float32)
    w = rng.standard_normal((OC, C), dtype=np.float32)
    b = rng.standard_normal(OC, dtype=np.float32)
    p = ops.pack_bf16(w)
    assert p.rows == OC and p.data.shape == (-(-OC // 32) * 32, C) and p.data.ctypes.data % 64 == 0
    ref = _r(x) @ _r(w).T + b
    tol = 1e-5 * np.sqrt(C) * (np.abs(_r(x)) @ np.abs(_r(w)).T).max()
    np.testing.assert_allclose(ops.matmul_forward(x, p, b), ref, rtol=0, atol=tol)
    pre = np.empty((N, OC), np.float32)
    got = ops.matmul_forward(x[None], p, b, pre_gelu=pre[None])[0]
    np.testing.assert_allclose(pre, ref, rtol=0, atol=tol)
    np.testing.assert_allclose(got, ops.gelu_forward(pre), rtol=1e-6, atol=1e-6)


def test_bf16_panels_pack_and_unpack(rng):
    w = rng.standard_normal((3, 70, 10), dtype=np.float32)  # stacked over layers, as a model's snapshot
    p = ops.pack_bf16(w)
    assert p.data.shape == (3, 96, 10) and p.rows == 70
    np.testing.assert_array_equal(ops.unpack_bf16(p), ops.to_bf16(w))
    np.testing.assert_array_equal(ops.pack_bf16(ops.to_bf16(w)).data, p.data)  # from bf16 bits: no rounding again
    x = rng.standard_normal((4, 10), dtype=np.float32)
    layer = ops.Bf16Panels(p.data[1], p.rows)  # a layer's view: still whole cache lines
    np.testing.assert_array_equal(ops.matmul_forward(x, layer), ops.matmul_forward(x, ops.to_bf16(w[1])))
    with pytest.raises(ValueError, match="C .* must be even"):
        ops.pack_bf16(w[..., :9])
    with pytest.raises(ValueError, match="matrix"):
        ops.pack_bf16(np.ones(4, np.float32))
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.matmul_forward(x, ops.Bf16Panels(p.data[1], 97))  # 97 rows need 128 in panels
    with pytest.raises(ValueError, match="even"):
        ops.matmul_forward(x[:, :9], ops.Bf16Panels(p.data[1][:, :9], 70))
    with pytest.raises(TypeError, match="weight must be a uint16"):
        ops.matmul_forward(x, ops.Bf16Panels(p.data[1].astype(np.int16), 70))


def test_bf16w_bad_input(rng):
    x = rng.standard_normal((2, 8), dtype=np.float32)
    w = rng.standard_normal((3, 8), dtype=np.float32)
    with pytest.raises(TypeError, match="weight must be a float32"):
        ops.matmul_forward(x, w.astype(np.float16))  # neither float32 nor bf16 bit patterns
    np.testing.assert_allclose(ops.matmul_forward(x, w), x @ w.T, rtol=1e-5, atol=1e-5)  # float32: the fp32 path
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.matmul_forward(x, ops.to_bf16(w[:, :4]))
    with pytest.raises(TypeError, match="x must be a float32"):
        ops.to_bf16(np.zeros(3, np.float64))


# ---- mixed precision: fp32 arrays, products of their bf16 roundings -----------------------------------------


@pytest.mark.parametrize("ta,tb", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (3, 5, 1), (7, 33, 19), (29, 17, 2), (15, 31, 3), (65, 130, 77),
                                   (40, 70, 1537), (33, 64, 2100)])
def test_gemm_bf16_equals_rounded_product(M, N, K, ta, tb, rng, bf16_gemm, threads):
    a = rng.standard_normal((K, M) if ta else (M, K), dtype=np.float32)
    b = rng.standard_normal((N, K) if tb else (K, N), dtype=np.float32)
    c0 = rng.standard_normal((M, N), dtype=np.float32)
    ra, rb = (_r(a).T if ta else _r(a)), (_r(b).T if tb else _r(b))
    for alpha, beta in ((1.0, 0.0), (0.5, 1.5)):
        c = c0.copy()
        _C.gemm(c, a, b, ta, tb, alpha, beta, bf16=True)
        ref = alpha * (ra @ rb) + beta * c0
        scale = (np.abs(ra) @ np.abs(rb)).max() + np.abs(c0).max()
        np.testing.assert_allclose(c, ref, rtol=0, atol=1e-5 * np.sqrt(K) * scale)


def test_gemm_bf16_rounds_the_operands(bf16_gemm):
    """1 + 2^-10 is not a bf16 number (it rounds to 1): the bf16 product of it with itself is exactly 1, the fp32
    product is not; 1 + 2^-7 is one, and stays."""
    x = np.full((3, 5), 1 + 2**-10, np.float32)
    c = np.empty((3, 3), np.float32)
    _C.gemm(c, x, x, False, True, bf16=True)
    np.testing.assert_array_equal(c, 5.0)
    _C.gemm(c, x, x, False, True)
    assert np.all(c > 5.009)
    x = np.full((3, 5), 1 + 2**-7, np.float32)
    _C.gemm(c, x, x, False, True, bf16=True)
    np.testing.assert_allclose(c, 5 * (1 + 2**-7) ** 2, rtol=1e-6)


@pytest.mark.parametrize("ta", [False, True])
def test_gemm_bf16_special_values(ta, rng, bf16_gemm):
    """NaN and inf pass through the packing (VCVTNE2PS2BF16 or the integer rounding) into the products; subnormal
    operands (zeros to VDPBF16PS / TDPBF16PS, kept by the fp32 kernels) change nothing beyond the tolerance."""
    M, N, K = 5, 40, 37
    a = rng.standard_normal((M, K)).astype(np.float32)
    a[0, 3] = np.nan
    a[1, 2] = np.inf
    a[2, ::2] = 1e-39  # subnormal
    a[3, 1::3] = -3e-41
    b = np.abs(rng.standard_normal((K, N))).astype(np.float32) + 0.5
    c = np.empty((M, N), np.float32)
    _C.gemm(c, np.ascontiguousarray(a.T) if ta else a, b, ta, False, bf16=True)
    assert np.isnan(c[0]).all()
    assert np.isposinf(c[1]).all()
    finite = np.where(np.abs(a) < 1e-30, 0.0, a)[2:]
    ref = _r(finite) @ _r(b)
    np.testing.assert_allclose(c[2:], ref, rtol=0, atol=1e-5 * np.sqrt(K) * (np.abs(_r(finite)) @ _r(b)).max())


@pytest.mark.parametrize("N,C,OC", [(1, 7, 3), (13, 64, 50), (70, 33, 129)])
def test_matmul_bf16_forward_backward(N, C, OC, rng, bf16_gemm):
    x = rng.standard_normal((N, C), dtype=np.float32)
    w = rng.standard_normal((OC, C), dtype=np.float32)
    bias = rng.standard_normal(OC, dtype=np.float32)
    dout = rng.standard_normal((N, OC), dtype=np.float32)
    tol = 1e-5 * np.sqrt(max(N, C, OC))
    ref = _r(x) @ _r(w).T + bias
    np.testing.assert_allclose(ops.matmul_forward(x, w, bias, dtype="bfloat16"), ref, rtol=0,
                               atol=tol * np.abs(ref).max())
    pre = np.empty((N, OC), np.float32)
    out = ops.matmul_forward(x, w, bias, pre_gelu=pre, dtype="bfloat16")
    np.testing.assert_allclose(pre, ref, rtol=0, atol=tol * np.abs(ref).max())
    np.testing.assert_allclose(out, ops.gelu_forward(pre), rtol=1e-6, atol=1e-6)
    dx, dw, db = ops.matmul_backward(dout, x, w, dtype="bfloat16")
    for got, want in ((dx, _r(dout) @ _r(w)), (dw, _r(dout).T @ _r(x)), (db, dout.astype(np.float64).sum(0))):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol * np.abs(want).max())
    with pytest.raises(ValueError, match="dtype must be one of"):
        ops.matmul_forward(x, w, dtype="float16")
    with pytest.raises(ValueError, match="dtype must be one of"):
        ops.matmul_backward(dout, x, w, dtype="bf16")


def test_lmhead_ce_bf16(rng, bf16_gemm):
    """Logits from the rounded operands, softmax and loss in fp32; the backward products round dlogits too."""
    N, C, V = 37, 24, 300
    h = rng.standard_normal((N, C), dtype=np.float32)
    w = rng.standard_normal((V, C), dtype=np.float32) * 0.3
    t = rng.integers(0, V, N)
    losses, dh, dw = ops.lmhead_ce(h, w, t, dtype="bfloat16")
    z = _r(h) @ _r(w).T
    z -= z.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(losses, -np.log(p[np.arange(N), t]), rtol=1e-5, atol=1e-5)
    p[np.arange(N), t] -= 1.0
    for got, (a, b) in ((dh, (p, _r(w))), (dw, (p.T, _r(h)))):  # |error| <= the rounding of dlogits, 2^-9
        np.testing.assert_allclose(got, _r(a) @ b, rtol=0, atol=2**-8 * (np.abs(a) @ np.abs(b)).max())
    _, dh32, _ = ops.lmhead_ce(h, w, t)
    assert not np.array_equal(dh, dh32)  # the precision was used, not ignored
