"""LayerNorm forward/backward vs tests/reference.py (float64) and torch.

Tolerances (float32): out, mean, rstd rtol 1e-5 + atol 2e-6 (two-pass variance in float32 lanes);
dinp rtol 1e-4 + atol 1e-5 and dweight/dbias rtol 1e-4 + atol 5e-5 (sums over N rows in float32)."""

from __future__ import annotations

import numpy as np
import pytest
import reference

from fastllm import _C, ops

FWD_TOL = dict(rtol=1e-5, atol=2e-6)
DX_TOL = dict(rtol=1e-4, atol=1e-5)
DW_TOL = dict(rtol=1e-4, atol=5e-5)




def make(rng, shape):
    C = shape[-1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    dout = rng.standard_normal(shape).astype(np.float32)
    return x, w, b, dout


# N=1, C=1, C not a multiple of 16; (64, 771) is above the parallel threshold (32768 elements)
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (5, 17), (2, 3, 16), (7, 768), (64, 771)])
def test_layernorm_matches_reference(rng, threads, simd, shape):
    x, w, b, dout = make(rng, shape)
    out, mean, rstd = ops.layernorm_forward(x, w, b)
    ref_out, ref_mean, ref_rstd = reference.layernorm_forward(x, w, b)
    np.testing.assert_allclose(out, ref_out, **FWD_TOL)
    np.testing.assert_allclose(mean, ref_mean, **FWD_TOL)
    np.testing.assert_allclose(rstd, ref_rstd, rtol=1e-5)
    dx, dw, db = ops.layernorm_backward(dout, x, w, mean, rstd)
    ref_dx, ref_dw, ref_db = reference.layernorm_backward(dout, x, w)
    np.testing.assert_allclose(dx, ref_dx, **DX_TOL)
    np.testing.assert_allclose(dw, ref_dw, **DW_TOL)
    np.testing.assert_allclose(db, ref_db, **DW_TOL)


def test_layernorm_large_offset(rng, simd):
    """Two-pass variance: a large common offset does not cancel the variance away."""
    x = (rng.standard_normal((4, 300)) * 0.1 + 1000).astype(np.float32)
    w, b = np.ones(300, np.float32), np.zeros(300, np.float32)
    out, _, rstd = ops.layernorm_forward(x, w, b)
    ref_out, _, ref_rstd = reference.layernorm_forward(x, w, b)
    np.testing.assert_allclose(rstd, ref_rstd, rtol=1e-3)
    np.testing.assert_allclose(out, ref_out, atol=1e-3)  # x itself carries 6e-5 rounding at 1000


def test_layernorm_backward_accumulates(rng, threads, simd):
    x, w, b, dout = make(rng, (70, 771))
    _, mean, rstd = ops.layernorm_forward(x, w, b)
    dx0 = rng.standard_normal(x.shape).astype(np.float32)
    dw0, db0 = rng.standard_normal(771).astype(np.float32), rng.standard_normal(771).astype(np.float32)
    dx, dw, db = ops.layernorm_backward(dout, x, w, mean, rstd, dx0.copy(), dw0.copy(), db0.copy())
    ref_dx, ref_dw, ref_db = reference.layernorm_backward(dout, x, w)
    np.testing.assert_allclose(dx, dx0 + ref_dx, **DX_TOL)
    np.testing.assert_allclose(dw, dw0 + ref_dw, **DW_TOL)
    np.testing.assert_allclose(db, db0 + ref_db, **DW_TOL)


def test_layernorm_vs_torch(rng, threads):
    torch = pytest.importorskip("torch")
    x, w, b, dout = make(rng, (3, 11, 771))
    xt, wt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, w, b))
    yt = torch.nn.functional.layer_norm(xt, (771,), wt, bt, eps=1e-5)
    yt.backward(torch.from_numpy(dout))
    out, mean, rstd = ops.layernorm_forward(x, w, b)
    np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    dx, dw, db = ops.layernorm_backward(dout, x, w, mean, rstd)
    np.testing.assert_allclose(dx, xt.grad.numpy(), **DX_TOL)
    np.testing.assert_allclose(dw, wt.grad.numpy(), **DW_TOL)
    np.testing.assert_allclose(db, bt.grad.numpy(), **DW_TOL)


def test_layernorm_bad_input(rng):
    x, w, b, dout = make(rng, (4, 8))
    out, mean, rstd = ops.layernorm_forward(x, w, b)
    with pytest.raises(TypeError, match="inp"):
        ops.layernorm_forward(x.astype(np.float64), w, b)
    with pytest.raises(TypeError, match="weight"):
        ops.layernorm_forward(x, w.astype(np.float64), b)
    with pytest.raises(ValueError, match="weight"):
        ops.layernorm_forward(x, w[:7].copy(), b)
    with pytest.raises(ValueError, match="bias"):
        ops.layernorm_forward(x, w, np.zeros(9, np.float32))
    with pytest.raises(ValueError, match="inp"):
        _C.layernorm_forward(out, mean, rstd, np.asfortranarray(x), w, b, 1e-5)
    with pytest.raises(ValueError, match="mean"):
        _C.layernorm_forward(out, mean[:3].copy(), rstd, x, w, b, 1e-5)
    with pytest.raises(ValueError, match="dout"):
        ops.layernorm_backward(dout[:3].copy(), x, w, mean, rstd)
    with pytest.raises(TypeError, match="rstd"):
        ops.layernorm_backward(dout, x, w, mean, rstd.astype(np.float64))
    with pytest.raises(ValueError, match="dweight"):
        ops.layernorm_backward(dout, x, w, mean, rstd, dweight=np.zeros(7, np.float32))


def test_layernorm_zero_channels_and_overlaps(rng):
    """C = 0 is refused naming it (it failed in numpy's reshape); outputs may not share memory with inputs or
    each other (mean and rstd in one buffer used to overwrite each other silently)."""
    x, w, b, dout = make(rng, (4, 8))
    with pytest.raises(ValueError, match=r"C \(inp columns\) must be >= 1"):
        ops.layernorm_forward(np.zeros((4, 0), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))
    stats = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="mean overlaps rstd"):
        ops.layernorm_forward(x, w, b, mean=stats, rstd=stats)
    with pytest.raises(ValueError, match="out overlaps inp"):
        ops.layernorm_forward(x, w, b, out=x)
    out, mean, rstd = ops.layernorm_forward(x, w, b)
    with pytest.raises(ValueError, match="dinp overlaps dout"):
        ops.layernorm_backward(dout, x, w, mean, rstd, dx=dout)
