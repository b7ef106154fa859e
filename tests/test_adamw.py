"""AdamW step and the global gradient norm on every backend (tests/backends.py) vs tests/reference.py (float64), the
CPU kernel, torch.optim.AdamW and numpy; the optional params_copy (float32 or bfloat16), misaligned views, zero
sizes and bad input. Parameters, gradients and moments are float32 on both devices.

Tolerances: params/m/v after several steps rtol 2e-5 + atol 1e-7 vs the float64 reference and rtol 1e-5 + atol
1e-7 vs torch (same float32 math, another operation order); the GPU vs the CPU kernel 1e-6 of the largest value;
params_copy exactly the params rounded to its dtype. sum_squares accumulates in double on the CPU (rtol 1e-12
vs numpy's float64 sum) and in fp32 per GPU block, then double (rtol 1e-6)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import assert_close, assert_rel

from fastllm import _C, cuda, ops

TOL = dict(rtol=1e-5, atol=1e-7)
REF_TOL = dict(rtol=2e-5, atol=1e-7)
NORM_RTOL = {"cpu": 1e-12, "cuda": 1e-6}


# 1, sizes around the 4-wide vector tails, and above the CPU's parallel threshold (65536) with a ragged last block
@pytest.mark.backends(dtypes=("float32",))
@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (5,), (17,), (3, 771), (12345,), (70001,)], ids=str)
@pytest.mark.parametrize("wd,grad_scale", [(0.0, 1.0), (0.1, 0.5)])
@pytest.mark.parametrize("copy", [None, "float32", "bfloat16"])
@pytest.mark.parametrize("offset", [0, 1])
def test_adamw_matches_reference(bk, rng, shape, wd, grad_scale, copy, offset):
    p = rng.standard_normal(shape).astype(np.float32)
    pd, md, vd = bk.put(p, offset=offset), bk.zeros(shape, "float32"), bk.put(np.zeros(shape), offset=offset)
    cd = bk.poisoned(shape, copy, offset) if copy else None
    cp, cm, cv = p.copy(), np.zeros_like(p), np.zeros_like(p)  # the CPU kernel, step by step
    rp, rm, rv = p, np.zeros_like(p), np.zeros_like(p)
    hp = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=wd, grad_scale=grad_scale)
    for t in range(1, 5):
        g = (rng.standard_normal(shape) * 10.0 ** rng.integers(-4, 2)).astype(np.float32)
        assert bk.ops.adamw_step(pd, bk.put(g, offset=offset), md, vd, lr=1e-2, t=t, params_copy=cd, **hp) is None
        ops.adamw_step(cp, g, cm, cv, lr=1e-2, t=t, **hp)
        rp, rm, rv = reference.adamw_step(rp, g, rm, rv, 1e-2, t, **hp)
    got = [bk.get(a) for a in (pd, md, vd)]
    for name, a, r, c in zip(("params", "m", "v"), got, (rp, rm, rv), (cp, cm, cv)):
        assert_close(a, r, **REF_TOL, what=f"{name} vs the reference")
        assert_rel(a, c, 1e-6, f"{name} vs the CPU kernel")
    if copy:
        np.testing.assert_array_equal(bk.get(cd), bk.rounded(got[0], copy))


@pytest.mark.backends(dtypes=("float32",), variants=False)
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adamw_vs_torch(bk, rng, wd):
    torch = pytest.importorskip("torch")
    shape = (37, 29)
    p0 = rng.standard_normal(shape).astype(np.float32)
    pt = torch.from_numpy(p0.copy()).requires_grad_()
    opt = torch.optim.AdamW([pt], lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd, foreach=False)
    p, m, v = bk.put(p0), bk.zeros(shape, "float32"), bk.zeros(shape, "float32")
    for t in range(1, 6):
        g = rng.standard_normal(shape).astype(np.float32)
        grad_scale = 0.5 if t % 2 else 1.0  # clipping-like scale: torch sees the scaled gradient
        pt.grad = torch.from_numpy(g * np.float32(grad_scale))
        opt.step()
        bk.ops.adamw_step(p, bk.put(g), m, v, lr=3e-3, t=t, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=wd,
                          grad_scale=grad_scale)
    state = opt.state[pt]
    np.testing.assert_allclose(bk.get(p), pt.detach().numpy(), **TOL)
    np.testing.assert_allclose(bk.get(m), state["exp_avg"].numpy(), **TOL)
    np.testing.assert_allclose(bk.get(v), state["exp_avg_sq"].numpy(), **TOL)


@pytest.mark.backends(dtypes=("float32",))
def test_adamw_zero_size(bk):
    z = bk.ops.empty((0,))
    bk.ops.adamw_step(z, bk.ops.empty((0,)), bk.ops.empty((0,)), bk.ops.empty((0,)), lr=1e-3, t=1)


@pytest.mark.parametrize("n", [1, 33, 70001, 1 << 20, 3_000_001])
def test_global_norm(bk, rng, n):
    x = rng.standard_normal(n).astype(np.float32)
    xr = bk.rounded(x)
    rtol = NORM_RTOL[bk.device]
    want = float(np.sum(xr.astype(np.float64) ** 2))
    np.testing.assert_allclose(bk.ops.sum_squares(bk.put(x)), want, rtol=rtol)
    tail = np.sum(xr[:5].astype(np.float64) ** 2)
    np.testing.assert_allclose(bk.ops.global_norm(bk.put(x), bk.put(x[:5])), np.sqrt(want + tail), rtol=rtol)


@pytest.mark.backends(dtypes=("float32",), variants=False)
def test_global_norm_edges(bk):
    assert bk.ops.sum_squares(bk.ops.empty((0,))) == 0.0
    big = np.full(100000, 1e20, np.float32)  # squares overflow float32
    norm = bk.ops.global_norm(bk.put(big))
    if bk.is_cuda:  # the GPU squares and sums in fp32 per block: inf, which the training loop's finite check catches
        assert norm == np.inf
    else:  # the CPU squares and sums in double
        np.testing.assert_allclose(norm, np.sqrt(1e5) * 1e20, rtol=1e-6)


# ---- bad input: numpy arrays on the CPU, DeviceArrays on the GPU


def test_adamw_bad_input_cpu(rng):
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
    # t past 64 bits names t (not pybind11's 'incompatible function arguments' dump of every array); params, m, v
    # may not share memory with each other or grads
    with pytest.raises(ValueError, match="t = 1180591620717411303424 is out of range"):
        ops.adamw_step(p, g, m, v, lr=1e-3, t=2**70)
    with pytest.raises(ValueError, match="m overlaps v"):
        ops.adamw_step(p, g, m, m, lr=1e-3, t=1)
    with pytest.raises(ValueError, match="params overlaps grads"):
        ops.adamw_step(p, p, m, v, lr=1e-3, t=1)
    with pytest.raises(TypeError, match="lr must be a number"):
        _C.adamw_step(p, m, v, g, None, 0.9, 0.95, 1e-8, 0.0, 1, 1.0)


@pytest.mark.cuda
def test_adamw_bad_input_cuda():
    p, g, m, v = cuda.zeros((8,)), cuda.zeros((8,)), cuda.zeros((8,)), cuda.zeros((8,))
    with pytest.raises(TypeError, match="grads"):
        cuda.adamw_step(p, cuda.zeros((8,), "bfloat16"), m, v, lr=1e-3, t=1)
    with pytest.raises(ValueError, match="m"):
        cuda.adamw_step(p, g, cuda.zeros((9,)), v, lr=1e-3, t=1)
    with pytest.raises(ValueError, match="step"):
        cuda.adamw_step(p, g, m, v, lr=1e-3, t=0)
    with pytest.raises(TypeError, match="params_copy"):
        cuda.adamw_step(p, g, m, v, lr=1e-3, t=1, params_copy=cuda.zeros((8,), "int32"))
    with pytest.raises(ValueError, match="params_copy"):
        cuda.adamw_step(p, g, m, v, lr=1e-3, t=1, params_copy=cuda.zeros((7,), "bfloat16"))
    with pytest.raises(ValueError, match="overlap"):
        cuda.adamw_step(p, g, p, v, lr=1e-3, t=1)
    big = cuda.zeros((16,))
    with pytest.raises(ValueError, match="overlap"):
        cuda.adamw_step(big.view(0, (8,)), g, big.view(4, (8,)), v, lr=1e-3, t=1)
    # arrays of other shapes but the same size are fine (flat buffers vs views)
    cuda.adamw_step(cuda.zeros((2, 4)), g, m, cuda.zeros((4, 2)), lr=1e-3, t=1)
