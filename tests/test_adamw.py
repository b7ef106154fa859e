"""AdamW step and global gradient norm vs tests/reference.py (float64), torch.optim.AdamW and numpy.

Tolerances (float32): params/m/v after several steps rtol 1e-5 + atol 1e-7 vs torch (same float32 math,
different operation order) and rtol 2e-5 + atol 1e-7 vs the float64 reference; sum_squares accumulates in
double, so it matches numpy's float64 sum to rtol 1e-12."""

from __future__ import annotations

import numpy as np
import pytest
import reference

from fastllm import _C, ops

TOL = dict(rtol=1e-5, atol=1e-7)
REF_TOL = dict(rtol=2e-5, atol=1e-7)




# 1, odd sizes, and one above the parallel threshold (65536) with a ragged last block
@pytest.mark.parametrize("shape", [(1,), (17,), (3, 771), (70001,)])
@pytest.mark.parametrize("wd,grad_scale", [(0.0, 1.0), (0.1, 0.5)])
def test_adamw_matches_reference(rng, threads, simd, shape, wd, grad_scale):
    p = rng.standard_normal(shape).astype(np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    rp, rm, rv = p.copy(), m.copy(), v.copy()
    for t in range(1, 4):
        g = rng.standard_normal(shape).astype(np.float32)
        ops.adamw_step(p, g, m, v, lr=1e-2, t=t, weight_decay=wd, grad_scale=grad_scale)
        rp, rm, rv = reference.adamw_step(rp, g, rm, rv, 1e-2, t, weight_decay=wd, grad_scale=grad_scale)
    np.testing.assert_allclose(p, rp, **REF_TOL)
    np.testing.assert_allclose(m, rm, **REF_TOL)
    np.testing.assert_allclose(v, rv, **REF_TOL)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_vs_torch(rng, threads, wd):
    torch = pytest.importorskip("torch")
    shape = (37, 29)
    p0 = rng.standard_normal(shape).astype(np.float32)
    pt = torch.from_numpy(p0.copy()).requires_grad_()
    opt = torch.optim.AdamW([pt], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, foreach=False)
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    for t in range(1, 6):
        g = rng.standard_normal(shape).astype(np.float32)
        grad_scale = 0.5 if t % 2 else 1.0  # clipping-like scale: torch sees the scaled gradient
        pt.grad = torch.from_numpy(g * np.float32(grad_scale))
        opt.step()
        ops.adamw_step(
            p, g, m, v, lr=3e-3, t=t, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=wd, grad_scale=grad_scale
        )
    state = opt.state[pt]
    np.testing.assert_allclose(p, pt.detach().numpy(), **TOL)
    np.testing.assert_allclose(m, state["exp_avg"].numpy(), **TOL)
    np.testing.assert_allclose(v, state["exp_avg_sq"].numpy(), **TOL)


def test_global_norm(rng, threads, simd):
    arrays = [rng.standard_normal(s).astype(np.float32) for s in [(1,), (17,), (3, 771), (70001,)]]
    expected = np.sqrt(sum(np.sum(a.astype(np.float64) ** 2) for a in arrays))
    np.testing.assert_allclose(ops.global_norm(*arrays), expected, rtol=1e-12)
    for a in arrays:
        np.testing.assert_allclose(_C.sum_squares(a), np.sum(a.astype(np.float64) ** 2), rtol=1e-12)
    assert _C.sum_squares(np.zeros(0, np.float32)) == 0.0
    big = np.full(100000, 1e20, np.float32)  # squares overflow float32, not the double accumulator
    np.testing.assert_allclose(ops.global_norm(big), np.sqrt(1e5) * 1e20, rtol=1e-6)


def test_adamw_bad_input(rng):
    p = rng.standard_normal(10).astype(np.float32)
    g, m, v = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    with pytest.raises(TypeError, match="params"):
        ops.adamw_step(p.astype(np.float64), g, m, v, lr=1e-3, t=1)
    with pytest.raises(TypeError, match="grads"):
        ops.adamw_step(p, g.astype(np.float64), m, v, lr=1e-3, t=1)
    with pytest.raises(ValueError, match="m "):
        ops.adamw_step(p, g, m[:9].copy(), v, lr=1e-3, t=1)
    with pytest.raises(ValueError, match="v "):
        ops.adamw_step(p, g, m, np.zeros((2, 5), np.float32), lr=1e-3, t=1)
    with pytest.raises(ValueError, match="grads"):
        ops.adamw_step(p, np.zeros(20, np.float32)[::2], m, v, lr=1e-3, t=1)
    with pytest.raises(ValueError, match="t must"):
        ops.adamw_step(p, g, m, v, lr=1e-3, t=0)
    with pytest.raises(TypeError, match="x"):
        ops.global_norm(p.astype(np.float64))
    with pytest.raises(ValueError, match="x"):
        ops.global_norm(np.zeros(20, np.float32)[::2])


def test_adamw_huge_step_and_overlaps(rng):
    """t past 64 bits is a ValueError naming t (it was pybind11's 'incompatible function arguments' dump of
    every array); params, m, v may not share memory with each other or grads."""
    p = rng.standard_normal(10).astype(np.float32)
    g, m, v = np.zeros_like(p), np.zeros_like(p), np.zeros_like(p)
    with pytest.raises(ValueError, match="t = 1180591620717411303424 is out of range"):
        ops.adamw_step(p, g, m, v, lr=1e-3, t=2**70)
    with pytest.raises(ValueError, match="m overlaps v"):
        ops.adamw_step(p, g, m, m, lr=1e-3, t=1)
    with pytest.raises(ValueError, match="params overlaps grads"):
        ops.adamw_step(p, p, m, v, lr=1e-3, t=1)
    with pytest.raises(TypeError, match="lr must be a number"):
        _C.adamw_step(p, m, v, g, None, 0.9, 0.95, 1e-8, 0.0, 1, 1.0)
