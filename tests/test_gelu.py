"""GELU forward/backward in both forms -- gelu (tanh approximation, GPT-2) and gelu_erf (exact, GPT-NeoX/Pythia) --
on every backend (tests/backends.py) vs tests/reference.py (float64; math.erfc for the exact form) and torch's
gelu(approximate="tanh" / "none") with autograd; in place, accumulation, misaligned views, extremes, zero sizes and bad
input; gelu_erf on a dense grid at every SIMD level against float64 at its own, tighter tolerance.

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
# op stem: (float64 reference forward, backward, torch's approximate=)
FORMS = {"gelu": (reference.gelu_forward, reference.gelu_backward, "tanh"),
         "gelu_erf": (reference.gelu_erf_forward, reference.gelu_erf_backward, "none")}


def _ops(bk, form):
    """(forward, backward) of `form` on the backend."""
    return getattr(bk.ops, f"{form}_forward"), getattr(bk.ops, f"{form}_backward")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_gelu_matches_reference(bk, rng, form, shape, offset):
    fwd_tol, bwd_tol = TOL[bk.dtype]
    forward, backward = _ops(bk, form)
    ref_forward, ref_backward, _ = FORMS[form]
    x = bk.rounded(rng.standard_normal(shape) * 3)
    out = bk.poisoned(shape, offset=offset)
    xd = bk.put(x, offset=offset)
    assert forward(xd, out=out) is out
    assert_close(bk.get(out), ref_forward(x), **fwd_tol, what=f"{form} forward")
    dout, dx0 = bk.rounded(rng.standard_normal(shape)), bk.rounded(rng.standard_normal(shape))
    dx = bk.put(dx0, offset=offset)
    backward(bk.put(dout, offset=offset), xd, dx=dx)  # accumulates (+=)
    assert_close(bk.get(dx), dx0 + ref_backward(dout, x), **bwd_tol, what=f"{form} backward")
    assert_close(bk.get(backward(bk.put(dout), xd)), ref_backward(dout, x), **bwd_tol,
                 what=f"{form} backward into zeros")


@pytest.mark.parametrize("form", FORMS)
def test_gelu_in_place(bk, rng, form):
    x = bk.rounded(rng.standard_normal((37, 300)) * 2)
    xd = bk.put(x)
    assert _ops(bk, form)[0](xd, out=xd) is xd
    assert_close(bk.get(xd), FORMS[form][0](x), **TOL[bk.dtype][0], what="in place")


@pytest.mark.parametrize("form", FORMS)
def test_gelu_extremes_saturate(bk, form):
    forward, backward = _ops(bk, form)
    ref_forward, ref_backward, _ = FORMS[form]
    x = bk.rounded([0, -0.0, 1e-30, -1e-30, 1e-8, -1e-3, 1e-3, 5, -5, 10, -10, 20, -20, 30, -30, 100, -100, 1e4, -1e4,
                    3e38, -3e38])
    y = bk.get(forward(bk.put(x)))
    dx = bk.get(backward(bk.put(np.ones_like(x)), bk.put(x)))
    assert np.isfinite(y).all() and np.isfinite(dx).all(), (y, dx)
    ok = np.abs(x) < 1e10  # gelu(-3e38) = -3e38 * sigmoid(-huge) is ~1 in float32 arithmetic, 0 in float64
    fwd_tol, bwd_tol = TOL[bk.dtype]
    assert_close(y[ok], ref_forward(x[ok]), **fwd_tol, what="forward")
    assert_close(dx[ok], ref_backward(np.ones_like(x[ok]), x[ok]), **bwd_tol, what="backward")
    assert y[-2] == x[-2] and abs(y[-1]) < 2  # saturated: identity / ~zero
    assert y[-4] == x[-4] and abs(y[-3]) < 1e-30 and dx[-4] == 1 and abs(dx[-3]) < 1e-30


@pytest.mark.parametrize("form", FORMS)
def test_gelu_zero_size(bk, form):
    forward, backward = _ops(bk, form)
    e = bk.ops.empty((0, 8), bk.dtype)
    assert forward(e, out=e).shape == (0, 8)
    assert backward(bk.ops.empty((0, 8), bk.dtype), e).shape == (0, 8)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.backends(variants=False)
def test_gelu_vs_torch(bk, rng, form):
    """Forward against torch's gelu, backward against its autograd (primes, a tail of every vector width)."""
    torch = pytest.importorskip("torch")
    forward, backward = _ops(bk, form)
    x = bk.rounded(rng.standard_normal((8, 333)) * 2)
    dout = bk.rounded(rng.standard_normal((8, 333)))
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = torch.nn.functional.gelu(xt, approximate=FORMS[form][2])
    yt.backward(torch.from_numpy(dout))
    fwd_tol, bwd_tol = TOL[bk.dtype]
    assert_close(bk.get(forward(bk.put(x))), yt.detach().numpy(), **fwd_tol, what="forward")
    assert_close(bk.get(backward(bk.put(dout), bk.put(x))), xt.grad.numpy(), **bwd_tol, what="backward")


def test_gelu_erf_accuracy_every_simd_level(simd):
    """The CPU's exact GELU on a dense grid of [-16, 16] (and a tail of 5: the scalar loop after the vectors)
    against float64 math.erfc: relative error <= 3e-6 forward for |x| < 8, 1e-5 in the far tail (the rounding of
    the erfc fit's exponent, gelu.cpp), backward within that plus 1e-7 absolute (where Phi(x) + x phi(x) crosses
    zero, x ~ -0.75); NaN propagates; +-inf: as the limits say (y(inf) = inf, y'(inf) = 1)."""
    x = np.linspace(-16, 16, 400_005).astype(np.float32)
    y, dx = ops.gelu_erf_forward(x), ops.gelu_erf_backward(np.ones_like(x), x)
    y_ref, dx_ref = reference.gelu_erf_forward(x), reference.gelu_erf_backward(np.ones_like(x), x)
    mid = np.abs(x) < 8
    assert_close(y[mid], y_ref[mid], rtol=3e-6, atol=1e-37, what=f"{simd} forward")
    assert_close(y, y_ref, rtol=1e-5, atol=1e-37, what=f"{simd} forward, far tail")
    assert_close(dx[mid], dx_ref[mid], rtol=3e-6, atol=1e-7, what=f"{simd} backward")
    assert_close(dx, dx_ref, rtol=1e-5, atol=1e-7, what=f"{simd} backward, far tail")
    odd = np.array([np.nan, np.inf, -0.0, 0.0, 1.0] * 4, np.float32)
    y, dx = ops.gelu_erf_forward(odd), ops.gelu_erf_backward(np.ones_like(odd), odd)
    assert np.isnan(y[::5]).all() and np.isnan(dx[::5]).all()
    assert (y[1::5] == np.inf).all() and (dx[1::5] == 1).all() and (y[2::5] == 0).all() and (dx[3::5] == 0.5).all()


# ---- bad input: numpy arrays on the CPU, DeviceArrays on the GPU


def test_gelu_bad_input_cpu(rng):
    x = rng.standard_normal((3, 5)).astype(np.float32)
    with pytest.raises(TypeError, match="inp"):
        ops.gelu_erf_forward(x.astype(np.float64))
    with pytest.raises(ValueError, match="dout"):
        ops.gelu_erf_backward(x[:2].copy(), x)
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
    with pytest.raises(ValueError, match="out"):
        cuda.gelu_erf_forward(x, out=cuda.zeros((8, 4)))
    with pytest.raises(ValueError, match="overlap"):
        cuda.gelu_erf_backward(x, cuda.zeros((4, 8)), dx=x)
