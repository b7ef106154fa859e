"""bf16 inference weights (csrc/cpu/matmul.cpp: float_to_bf16, matmul_forward_bf16w): the conversion equals
torch's float32 -> bfloat16 rounding bit for bit (ties, NaN, inf, overflow, subnormals), and the product equals the
float64 product of the bf16-rounded operands on every SIMD path (AVX-512 BF16 dot products or the portable loop)
and thread count. Tolerance: products of bf16 numbers are exact in fp32, so only the fp32 summation order
differs: |err| <= 1e-5 * sqrt(C) * max|ref|."""

from __future__ import annotations

import numpy as np
import pytest

from fastllm import ops


def test_to_bf16_matches_torch_bit_for_bit(rng):
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
                                   (5, 37, 13), (8, 64, 100), (9, 100, 31), (16, 3072, 768), (29, 70, 33)])
def test_matmul_bf16w_equals_rounded_product(shape, rng, simd_bf16, threads):
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
