"""GELU (tanh approximation) and the residual add vs tests/reference.py (float64) and torch.

Tolerances (float32): gelu forward atol 1e-6 + rtol 1e-5 (the sigmoid form has ~2e-7 absolute error
times |x|); gelu backward atol 2e-5 + rtol 1e-5 (the derivative loses a few ulp at |x| ~ 3 to 10);
residual is exact float32 addition (atol 0 vs float32 numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import reference

from fastllm import ops

FWD_TOL = dict(rtol=1e-5, atol=1e-6)
BWD_TOL = dict(rtol=1e-5, atol=2e-5)




# sizes: tails of every vector width, and one above the parallel threshold (65536) with a ragged last block
@pytest.mark.parametrize("shape", [(1,), (3,), (17,), (4, 771), (2, 3, 17), (70001,)])
def test_gelu_matches_reference(rng, threads, simd, shape):
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    dout = rng.standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(ops.gelu_forward(x), reference.gelu_forward(x), **FWD_TOL)
    np.testing.assert_allclose(ops.gelu_backward(dout, x), reference.gelu_backward(dout, x), **BWD_TOL)


def test_gelu_extremes_finite(simd):
    x = np.array([0, -0.0, 1e-30, -1e-30, 1e-8, 5, -5, 10, -10, 30, -30, 1e4, -1e4, 3e38, -3e38], np.float32)
    y = ops.gelu_forward(x)
    dx = ops.gelu_backward(np.ones_like(x), x)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    with np.errstate(over="ignore", invalid="ignore"):
        ref_y, ref_dx = reference.gelu_forward(x), reference.gelu_backward(np.ones_like(x), x)
    ok = np.isfinite(ref_y) & np.isfinite(ref_dx) & (np.abs(x) < 1e10)
    np.testing.assert_allclose(y[ok], ref_y[ok], **FWD_TOL)
    np.testing.assert_allclose(dx[ok], ref_dx[ok], **BWD_TOL)
    assert y[-2] == 3e38 and abs(y[-1]) < 2  # saturated: identity / ~zero (x * 4e-39 at x = -3e38)
    assert y[-4] == 1e4 and abs(y[-3]) < 1e-30 and dx[-4] == 1 and abs(dx[-3]) < 1e-30


def test_gelu_backward_accumulates(rng, simd):
    x = rng.standard_normal(100).astype(np.float32)
    dout = rng.standard_normal(100).astype(np.float32)
    dx0 = rng.standard_normal(100).astype(np.float32)
    dx = ops.gelu_backward(dout, x, dx=dx0.copy())
    np.testing.assert_allclose(dx, dx0 + reference.gelu_backward(dout, x), **BWD_TOL)


def test_gelu_vs_torch(rng, threads):
    torch = pytest.importorskip("torch")
    x = (rng.standard_normal((8, 333)) * 2).astype(np.float32)
    dout = rng.standard_normal((8, 333)).astype(np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = torch.nn.functional.gelu(xt, approximate="tanh")
    yt.backward(torch.from_numpy(dout))
    np.testing.assert_allclose(ops.gelu_forward(x), yt.detach().numpy(), **FWD_TOL)
    np.testing.assert_allclose(ops.gelu_backward(dout, x), xt.grad.numpy(), **BWD_TOL)


@pytest.mark.parametrize("shape", [(1,), (17,), (3, 771), (70001,)])
def test_residual(rng, threads, shape):
    a, b, dout = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    np.testing.assert_array_equal(ops.residual_forward(a, b), a + b)
    da0, db0 = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    da, db = ops.residual_backward(dout, da0.copy(), db0.copy())
    np.testing.assert_array_equal(da, da0 + dout)  # accumulates (+=)
    np.testing.assert_array_equal(db, db0 + dout)


def test_residual_vs_torch(rng):
    torch = pytest.importorskip("torch")
    a, b, dout = (rng.standard_normal((4, 17)).astype(np.float32) for _ in range(3))
    at, bt = torch.from_numpy(a.copy()).requires_grad_(), torch.from_numpy(b.copy()).requires_grad_()
    (at + bt).backward(torch.from_numpy(dout))
    np.testing.assert_array_equal(ops.residual_forward(a, b), (at + bt).detach().numpy())
    da, db = ops.residual_backward(dout)
    np.testing.assert_array_equal(da, at.grad.numpy())
    np.testing.assert_array_equal(db, bt.grad.numpy())


def test_gelu_residual_bad_input(rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    with pytest.raises(TypeError, match="inp"):
        ops.gelu_forward(x.astype(np.float64))
    with pytest.raises(TypeError, match="out"):
        ops.gelu_forward(x, out=np.empty((3, 5)))
    with pytest.raises(ValueError, match="out"):
        ops.gelu_forward(x, out=np.empty((3, 4), np.float32))
    with pytest.raises(ValueError, match="inp"):
        ops.gelu_forward(x.T)
    with pytest.raises(ValueError, match="dout"):
        ops.gelu_backward(x[:2].copy(), x)
    with pytest.raises(TypeError, match="dinp"):
        ops.gelu_backward(x, x, dx=np.zeros((3, 5)))
    with pytest.raises(ValueError, match="inp2"):
        ops.residual_forward(x, x[:, :4].copy())
    with pytest.raises(TypeError, match="inp2"):
        ops.residual_forward(x, x.astype(np.float64))
    with pytest.raises(ValueError, match="dinp2"):
        ops.residual_backward(x, None, np.zeros((5, 3), np.float32))


def test_in_place_allowed_partial_overlap_refused(rng):
    """Element-wise kernels may write over their input exactly (out is inp); a shifted overlap would read
    values already overwritten, so it is refused."""
    x = rng.standard_normal((3, 5)).astype(np.float32)
    expect = ops.gelu_forward(x)
    y = x.copy()
    assert ops.gelu_forward(y, out=y) is y
    np.testing.assert_array_equal(y, expect)
    buf = np.zeros(20, np.float32)
    with pytest.raises(ValueError, match="out overlaps inp"):
        ops.gelu_forward(buf[:15].reshape(3, 5), out=buf[5:].reshape(3, 5))
    a, b = x.copy(), rng.standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(ops.residual_forward(a, b, out=a), x + b)
