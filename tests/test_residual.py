"""The residual add (the skip connection: out = a + scale * b; backward dinp1 += dout, dinp2 += scale * dout; scale:
Granite's residual_multiplier, else 1) on every backend (tests/backends.py) vs numpy and torch: exact, since one
float32 add rounded once to the dtype is what numpy computes on the rounded inputs (with a scale: one float32
multiply-add, within an ulp of numpy's two roundings); in place, misaligned views, zero sizes and bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fastllm import cuda, ops


@pytest.mark.parametrize("shape", [(1,), (9,), (17,), (3, 771), (70001,), (100003,)], ids=str)
@pytest.mark.parametrize("offset", [0, 1])
def test_residual_exact(bk, rng, shape, offset):
    a, b, dout = (bk.rounded(rng.standard_normal(shape)) for _ in range(3))
    out = bk.poisoned(shape, offset=offset)
    ad, bd = bk.put(a, offset=offset), bk.put(b)
    assert bk.ops.residual_forward(ad, bd, out=out) is out
    np.testing.assert_array_equal(bk.get(out), bk.rounded(a + b))
    da0, db0 = bk.rounded(rng.standard_normal(shape)), bk.rounded(rng.standard_normal(shape))
    da, db = bk.put(da0, offset=offset), bk.put(db0)
    bk.ops.residual_backward(bk.put(dout), dinp1=da, dinp2=db)  # accumulates (+=)
    np.testing.assert_array_equal(bk.get(da), bk.rounded(da0 + dout))
    np.testing.assert_array_equal(bk.get(db), bk.rounded(db0 + dout))
    bk.ops.residual_forward(ad, bd, out=ad)  # in place
    np.testing.assert_array_equal(bk.get(ad), bk.rounded(a + b))


@pytest.mark.parametrize("shape", [(9,), (3, 771), (70001,)], ids=str)
def test_residual_scale(bk, rng, shape):
    """out = a + scale * b, dinp2 += scale * dout (dinp1 += dout unscaled): float32 math, rounded once to the dtype
    (an FMA may round a + scale * b once where numpy rounds twice: within an ulp of the float32 result)."""
    a, b, dout = (bk.rounded(rng.standard_normal(shape)) for _ in range(3))
    s, ulp = np.float32(0.22), 2.0 ** (-8 if bk.dtype == "bfloat16" else -23)  # (a unit roundoff of the dtype)
    out = bk.get(bk.ops.residual_forward(bk.put(a), bk.put(b), scale=0.22))
    assert np.all(np.abs(out - (a + s * b)) <= ulp * (np.abs(a) + np.abs(s * b)))
    da, db = bk.ops.residual_backward(bk.put(dout), scale=0.22)
    np.testing.assert_array_equal(bk.get(da), bk.rounded(dout))
    assert np.all(np.abs(bk.get(db) - s * dout) <= ulp * np.abs(s * dout))
    for bad, err in ((float("nan"), ValueError), ("2", TypeError)):
        with pytest.raises(err, match="scale"):
            bk.ops.residual_forward(bk.put(a), bk.put(b), scale=bad)


def test_residual_zero_size(bk):
    e = bk.ops.empty((0, 8), bk.dtype)
    assert bk.ops.residual_forward(e, e, out=e).shape == (0, 8)
    d1, d2 = bk.ops.residual_backward(e)
    assert d1.shape == d2.shape == (0, 8)


@pytest.mark.backends(variants=False)
def test_residual_vs_torch(bk, rng):
    torch = pytest.importorskip("torch")
    a, b, dout = (bk.rounded(rng.standard_normal((4, 17))) for _ in range(3))
    at, bt = torch.from_numpy(a.copy()).requires_grad_(), torch.from_numpy(b.copy()).requires_grad_()
    yt = at + bt
    yt.backward(torch.from_numpy(dout))
    np.testing.assert_array_equal(bk.get(bk.ops.residual_forward(bk.put(a), bk.put(b))),
                                  bk.rounded(yt.detach().numpy()))
    da, db = bk.ops.residual_backward(bk.put(dout))
    np.testing.assert_array_equal(bk.get(da), at.grad.numpy())
    np.testing.assert_array_equal(bk.get(db), bt.grad.numpy())


def test_residual_bad_input_cpu(rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    with pytest.raises(ValueError, match="inp2"):
        ops.residual_forward(x, x[:, :4].copy())
    with pytest.raises(TypeError, match="inp2"):
        ops.residual_forward(x, x.astype(np.float64))
    with pytest.raises(ValueError, match="dinp2"):
        ops.residual_backward(x, None, np.zeros((5, 3), np.float32))


@pytest.mark.cuda
def test_residual_bad_input_cuda():
    x = cuda.zeros((4, 8))
    with pytest.raises(TypeError, match="b"):
        cuda.residual_forward(x, cuda.zeros((4, 8), "bfloat16"), out=x)
    with pytest.raises(ValueError, match="b"):
        cuda.residual_forward(x, cuda.zeros((4, 9)), out=cuda.zeros((4, 8)))
    with pytest.raises(ValueError, match="dinp2"):
        cuda.residual_backward(x, dinp2=cuda.zeros((8, 4)))
