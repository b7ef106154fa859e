"""GELU (tanh approximation) forward/backward on every backend (tests/backends.py) vs tests/reference.py (float64)
and torch; in place, accumulation, misaligned views, extremes, zero sizes and bad input.

Inputs are rounded to the backend's dtype first, so only the kernel's own rounding is measured. Tolerances, as
|err| <= atol + rtol * |ref|: float32 rtol 2e-5 (the GPU's __expf; the CPU's sigmoid form has ~2e-7 absolute
error times |x|), atol 1e-6 forward and 2e-5 backward (the derivative loses a few ulp at |x| ~ 3 to 10);
bfloat16 (one bf16 rounding of the result, 2^-9 relative) rtol 1e-2, atol 1e-3."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import assert_close

from fastllm import cuda, ops

TOL = {  # dtype: (forward, backward) tolerances
    "float32": (dict(rtol=2e-5, atol=1e-6), dict(rtol=2e-5, atol=2e-5)),
    "bfloat16": (dict(rtol=1e-2, atol=1e-3), dict(rtol=1e-2, atol=1e-3)),
}

# tails of every vector width (4 floats, 8 bf16), more than one CUDA block, above the CPU's parallel threshold
SHAPES = [(1,), (3,), (7,), (8,), (9,), (17,), (4, 771), (2, 3, 17), (4 * 768 * 37 + 5,)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_gelu_matches_reference(bk, rng, shape, offset):
    fwd_tol, bwd_tol = TOL[bk.dtype]
    x = bk.rounded(rng.standard_normal(shape) * 3)
    out = bk.poisoned(shape, offset=offset)
    xd = bk.put(x, offset=offset)
    assert bk.ops.gelu_forward(xd, out=out) is out
    assert_close(bk.get(out), reference.gelu_forward(x), **fwd_tol, what="gelu forward")
    dout, dx0 = bk.rounded(rng.standard_normal(shape)), bk.rounded(rng.standard_normal(shape))
    dx = bk.put(dx0, offset=offset)
    bk.ops.gelu_backward(bk.put(dout, offset=offset), xd, dx=dx)  # accumulates (+=)
    assert_close(bk.get(dx), dx0 + reference.gelu_backward(dout, x), **bwd_tol, what="gelu backward")
    assert_close(bk.get(bk.ops.gelu_backward(bk.put(dout), xd)), reference.gelu_backward(dout, x), **bwd_tol,
                 what="gelu backward into zeros")


def test_gelu_in_place(bk, rng):
    x = bk.rounded(rng.standard_normal((37, 300)) * 2)
    xd = bk.put(x)
    assert bk.ops.gelu_forward(xd, out=xd) is xd
    assert_close(bk.get(xd), reference.gelu_forward(x), **TOL[bk.dtype][0], what="in place")


def test_gelu_extremes_saturate(bk):
    x = bk.rounded([0, -0.0, 1e-30, -1e-30, 1e-8, -1e-3, 1e-3, 5, -5, 10, -10, 20, -20, 30, -30, 100, -100, 1e4, -1e4,
                    3e38, -3e38])
    y = bk.get(bk.ops.gelu_forward(bk.put(x)))
    dx = bk.get(bk.ops.gelu_backward(bk.put(np.ones_like(x)), bk.put(x)))
    assert np.isfinite(y).all() and np.isfinite(dx).all(), (y, dx)
    ok = np.abs(x) < 1e10  # gelu(-3e38) = -3e38 * sigmoid(-huge) is ~1 in float32 arithmetic, 0 in float64
    fwd_tol, bwd_tol = TOL[bk.dtype]
    assert_close(y[ok], reference.gelu_forward(x[ok]), **fwd_tol, what="forward")
    assert_close(dx[ok], reference.gelu_backward(np.ones_like(x[ok]), x[ok]), **bwd_tol, what="backward")
    assert y[-2] == x[-2] and abs(y[-1]) < 2  # saturated: identity / ~zero
    assert y[-4] == x[-4] and abs(y[-3]) < 1e-30 and dx[-4] == 1 and abs(dx[-3]) < 1e-30


def test_gelu_zero_size(bk):
    e = bk.ops.empty((0, 8), bk.dtype)
    assert bk.ops.gelu_forward(e, out=e).shape == (0, 8)
    assert bk.ops.gelu_backward(bk.ops.empty((0, 8), bk.dtype), e).shape == (0, 8)


@pytest.mark.backends(variants=False)
def test_gelu_vs_torch(bk, rng):
    torch = pytest.importorskip("torch")
    x = bk.rounded(rng.standard_normal((8, 333)) * 2)
    dout = bk.rounded(rng.standard_normal((8, 333)))
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = torch.nn.functional.gelu(xt, approximate="tanh")
    yt.backward(torch.from_numpy(dout))
    fwd_tol, bwd_tol = TOL[bk.dtype]
    assert_close(bk.get(bk.ops.gelu_forward(bk.put(x))), yt.detach().numpy(), **fwd_tol, what="forward")
    assert_close(bk.get(bk.ops.gelu_backward(bk.put(dout), bk.put(x))), xt.grad.numpy(), **bwd_tol, what="backward")


# ---- bad input: numpy arrays on the CPU, DeviceArrays on the GPU


def test_gelu_bad_input_cpu(rng):
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
    buf = np.zeros(20, np.float32)  # in place (out is x) is fine; a shifted overlap would read overwritten values
    with pytest.raises(ValueError, match="out overlaps inp"):
        ops.gelu_forward(buf[:15].reshape(3, 5), out=buf[5:].reshape(3, 5))


@pytest.mark.cuda
def test_gelu_bad_input_cuda():
    x = cuda.zeros((4, 8))
    with pytest.raises(TypeError, match="out"):
        cuda.gelu_forward(x, out=cuda.zeros((4, 8), "bfloat16"))
    with pytest.raises(ValueError, match="out"):
        cuda.gelu_forward(x, out=cuda.zeros((8, 4)))
    cuda.gelu_forward(x, out=x.reshape((32,)).view(0, (4, 8)))  # the same memory: in place is fine
    buf = cuda.zeros((40,))
    with pytest.raises(ValueError, match="in place"):
        cuda.gelu_forward(buf.view(0, (4, 8)), out=buf.view(1, (4, 8)))
    with pytest.raises(ValueError, match="overlap"):
        cuda.gelu_backward(x, cuda.zeros((4, 8)), dx=x)
    with pytest.raises(TypeError, match="x"):
        cuda.gelu_forward(cuda.zeros((3,), "int32"), out=cuda.zeros((3,), "int32"))
