"""int8 weights on the CPU (weight-only quantization for decoding; ops.quantize_int8, csrc/cpu/matmul.cpp
matmul_forward_i8w): the quantization follows its definition (per output row: scale = max|row| / 127, q = round(w /
scale)), and the product equals the float64 product with the dequantized matrix q * scale on every path -- the
few-rows kernels (int8 widened to fp32 in registers, each row's sum scaled once; AVX-512 tiles from 2 rows, AVX2)
up to 32 rows, the blockwise dequantization + packed fp32 GEMM above, and the portable path -- at every SIMD level
and thread count, on shapes off the kernels' tiles. The int8 values are exact in fp32, so only the fp32 summation
order differs from float64: |err| <= 1e-5 * sqrt(C) * max(|x| @ |w|^T). The KV cache's int8 decoding follows
float32 (test_sample.py tests it end to end). The w8a8 tests (int8 activations too) follow."""

from __future__ import annotations

import numpy as np
import pytest

from fastllm import _C, ops


def _ref(x, w8: ops.Int8Weight, bias=None):
    out = x.astype(np.float64) @ (w8.q.astype(np.float64) * w8.scale[:, None]).T
    return out if bias is None else out + bias


def test_quantize_int8_follows_its_definition(rng):
    w = rng.standard_normal((37, 53), dtype=np.float32) * rng.uniform(1e-3, 10, (37, 1)).astype(np.float32)
    w[3] = 0.0  # an all-zero row: scale 0, q 0
    w8 = ops.quantize_int8(w, rows_per_pass=5)  # passes that split the rows unevenly
    amax = np.abs(w.astype(np.float64)).max(axis=1)
    np.testing.assert_allclose(w8.scale, amax / 127, rtol=1e-6)
    assert w8.q.dtype == np.int8 and w8.scale.dtype == np.float32 and w8.q.shape == w.shape
    assert np.abs(w8.q).max() == 127 and (np.abs(w8.q).max(axis=1)[np.arange(37) != 3] == 127).all()
    assert w8.scale[3] == 0 and (w8.q[3] == 0).all()
    # every value is its row's nearest multiple of the scale: error at most half a step
    err = np.abs(ops.dequantize_int8(w8).astype(np.float64) - w)
    assert (err <= 0.5 * w8.scale[:, None] * (1 + 1e-5)).all()
    # stacked layers (L, OC, C) quantize per row of every layer
    stack = rng.standard_normal((3, 6, 10), dtype=np.float32)
    s8 = ops.quantize_int8(stack)
    assert s8.q.shape == (3, 6, 10) and s8.scale.shape == (3, 6)
    np.testing.assert_array_equal(s8.q[1], ops.quantize_int8(stack[1]).q)


def test_quantize_int8_bad_input(rng):
    w = rng.standard_normal((9, 4), dtype=np.float32)
    w[7, 2] = np.nan
    with pytest.raises(ValueError, match="row 7 holds NaN/Inf"):
        ops.quantize_int8(w, rows_per_pass=4)
    with pytest.raises(TypeError, match="float32 matrix"):
        ops.quantize_int8(w[0])
    with pytest.raises(TypeError, match="float32 matrix"):
        ops.quantize_int8(w.astype(np.float64))


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 5), (1, 61, 17), (1, 576, 1536), (2, 33, 7), (3, 100, 31),
                                   (4, 8, 3), (8, 64, 100), (9, 31, 40), (31, 77, 13), (32, 96, 65),
                                   (33, 70, 33), (100, 129, 50), (64, 600, 300)])
def test_matmul_int8w_equals_dequantized_product(shape, rng, simd, threads):
    N, C, OC = shape
    x = rng.standard_normal((N, C), dtype=np.float32)
    w8 = ops.quantize_int8(rng.standard_normal((OC, C), dtype=np.float32))
    b = rng.standard_normal(OC, dtype=np.float32)
    ref = _ref(x, w8, b)
    tol = 1e-5 * np.sqrt(C) * (np.abs(x) @ np.abs(ops.dequantize_int8(w8)).T).max()
    got = ops.matmul_forward(x, w8, b)
    assert got.shape == (N, OC)
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
    np.testing.assert_allclose(ops.matmul_forward(x[None], w8)[0], ref - b, rtol=0, atol=tol)
    # the MLP's first layer: pre_gelu holds the product, out its GELU (as with float32 weights)
    pre = np.empty((N, OC), np.float32)
    out = ops.matmul_forward(x, w8, b, pre_gelu=pre)
    np.testing.assert_allclose(pre, ref, rtol=0, atol=tol)
    np.testing.assert_allclose(out, ops.gelu_forward(pre), rtol=1e-6, atol=1e-6)


def test_matmul_int8w_matches_torch(rng):
    """torch as the oracle: F.linear on the dequantized weights (the numbers an int8 model stands for)."""
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((5, 300), dtype=np.float32)
    w8 = ops.quantize_int8(rng.standard_normal((70, 300), dtype=np.float32))
    b = rng.standard_normal(70, dtype=np.float32)
    ref = torch.nn.functional.linear(torch.from_numpy(x).double(), torch.from_numpy(ops.dequantize_int8(w8)).double(),
                                     torch.from_numpy(b).double()).numpy()
    np.testing.assert_allclose(ops.matmul_forward(x, w8, b), ref, rtol=0, atol=1e-4)


def test_matmul_int8w_bad_input(rng):
    x = rng.standard_normal((2, 8), dtype=np.float32)
    w8 = ops.quantize_int8(rng.standard_normal((3, 8), dtype=np.float32))
    out = np.empty((2, 3), np.float32)
    with pytest.raises(TypeError, match="int8 weight needs its per-row scale"):
        _C.matmul_forward(out, x, w8.q)
    with pytest.raises(TypeError, match="scale goes with an int8 weight only"):
        _C.matmul_forward(out, x, ops.dequantize_int8(w8), scale=w8.scale)
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.matmul_forward(x, ops.Int8Weight(w8.q, w8.scale[:2]))
    with pytest.raises(TypeError, match="scale must be a float32"):
        ops.matmul_forward(x, ops.Int8Weight(w8.q, w8.scale.astype(np.float64)))
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.matmul_forward(np.ascontiguousarray(x[:, :5]), w8)  # C of the input and of the weight differ


# ---- w8a8: int8 weights and int8 activations (ops.Int8Panels, csrc/cpu/matmul_w8a8.cpp) -----------------------


def _w8a8_ref(x, w8: ops.Int8Weight, bias=None):
    """The definition (ops.Int8Panels): each row of x quantized (sa = max|x| / 127, qa = rint(x / sa), float32
    arithmetic), the integer sums exact (int64 here), then (float32(sum) * sa) * scale + bias in float32."""
    amax = np.abs(x).max(axis=-1, keepdims=True)
    sa = amax / np.float32(127)
    qa = np.clip(np.rint(x / np.where(sa > 0, sa, np.float32(1))), -127, 127).astype(np.int64)
    out = (qa @ w8.q.astype(np.int64).T).astype(np.float32) * sa * w8.scale
    return out if bias is None else out + bias


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 7, 5), (1, 61, 17), (1, 576, 1536), (2, 33, 7), (3, 100, 31),
                                   (8, 64, 100), (12, 40, 48), (13, 31, 40), (31, 77, 13), (33, 70, 33),
                                   (100, 3001, 50), (64, 600, 300), (16, 64, 33), (40, 128, 70), (33, 768, 100)])
def test_w8a8_follows_its_definition(shape, rng, w8a8_path, threads):
    """Every kernel (AMX blocks of 32 rows, VNNI tiles of 1..12 rows, AVX2, the portable loop) against the
    definition: the activations' quantization bit for bit (one quantum off would be far outside the tolerance: a whole
    sa * scale * |q| term), the sums exact, so only the float32 scaling rounds: rtol 1e-6. Shapes off the tiles: C not
    a multiple of 4, OC of the last panel under and over 16, rows past a block of 12 and (C = 3001) past the rows kept
    in L2; AMX from 16 rows with C a multiple of 64, a last block of 1..31 rows. Row by row (decode steps: VNNI where
    the prompt ran on AMX) the outputs are the same bits."""
    N, C, OC = shape
    x = rng.standard_normal((N, C), dtype=np.float32) * rng.uniform(0.01, 30, (N, 1)).astype(np.float32)
    x[N // 2, : C // 3] *= 40  # outliers in a row
    if N > 2:
        x[1] = 0.0  # an all-zero row: sa = 0, the bias alone
    w = rng.standard_normal((OC, C), dtype=np.float32)
    p = ops.pack_int8(w)
    w8 = ops.unpack_int8(p)
    b = rng.standard_normal(OC, dtype=np.float32)
    ref = _w8a8_ref(x, w8, b)
    tol = 2e-6 * (np.abs(ref - b) + np.abs(b)) + 1e-30
    got = ops.matmul_forward(x, p, b)
    assert got.shape == (N, OC)
    assert (np.abs(got - ref) <= tol).all(), np.abs(got - ref).max()
    np.testing.assert_allclose(ops.matmul_forward(x[None], p)[0], _w8a8_ref(x, w8), rtol=2e-6, atol=1e-30)
    pre = np.empty((N, OC), np.float32)
    out = ops.matmul_forward(x, p, b, pre_gelu=pre)
    assert (np.abs(pre - ref) <= tol).all()
    np.testing.assert_allclose(out, ops.gelu_forward(pre), rtol=1e-6, atol=1e-6)
    # a row's outputs depend on that row alone (exact integer sums): row by row gives the same numbers
    np.testing.assert_array_equal(np.concatenate([ops.matmul_forward(x[i:i + 1], p, b) for i in range(N)]), got)


def test_w8a8_is_close_to_float32(rng):
    """The quantization error a user sees: relative to the float32 product, about 1% on unit-scale random data (both
    operands at 8 bits); the same product torch's dynamic int8 linear approximates."""
    x = rng.standard_normal((16, 768), dtype=np.float32)
    w = rng.standard_normal((512, 768), dtype=np.float32) * 0.02
    exact = x.astype(np.float64) @ w.T.astype(np.float64)
    err = np.abs(ops.matmul_forward(x, ops.pack_int8(w)) - exact).max() / np.abs(exact).max()
    assert 1e-4 < err < 2e-2


def test_pack_int8_and_unpack(rng):
    w8 = ops.quantize_int8(rng.standard_normal((3, 45, 70), dtype=np.float32))  # stacked layers, OC % 32 = 13
    p = ops.pack_int8(w8)
    assert p.data.dtype == np.int8 and p.data.shape == (3, 64 * 72) and p.cols == 70
    assert p.data.ctypes.data % 64 == 0
    np.testing.assert_array_equal(p.wsum, w8.q.astype(np.int32).sum(-1))
    back = ops.unpack_int8(p)
    np.testing.assert_array_equal(back.q, w8.q)
    np.testing.assert_array_equal(back.scale, w8.scale)
    np.testing.assert_array_equal(ops.pack_int8(w8.q.astype(np.float32) * w8.scale[..., None]).data, p.data)


def test_w8a8_bad_input(rng):
    x = rng.standard_normal((3, 8), dtype=np.float32)
    p = ops.pack_int8(rng.standard_normal((5, 8), dtype=np.float32))
    x[1, 4] = np.nan  # NaN/Inf in a row: that row's outputs are NaN, the others computed
    out = ops.matmul_forward(x, p)
    assert np.isnan(out[1]).all() and np.isfinite(out[[0, 2]]).all()
    with pytest.raises(ValueError, match="packed for 8"):
        ops.matmul_forward(np.zeros((2, 7), np.float32), p)
    with pytest.raises(TypeError, match="inp"):
        ops.matmul_forward(x.astype(np.float64), p)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.matmul_forward(x, ops.Int8Panels(p.data[:-4], p.scale, p.wsum, p.cols))
    with pytest.raises(ValueError, match="C <= 65536"):
        ops.matmul_forward(np.zeros((1, 65540), np.float32), ops.Int8Panels(p.data, p.scale, p.wsum, 65540))
    with pytest.raises(ValueError, match=r"\[1, 65536\]"):
        ops.pack_int8(ops.Int8Weight(np.zeros((2, 70000), np.int8), np.ones(2, np.float32)))
    with pytest.raises(ValueError, match="holds NaN"):
        ops.pack_int8(np.full((2, 4), np.inf, np.float32))
