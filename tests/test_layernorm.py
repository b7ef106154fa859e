"""LayerNorm forward/backward on every backend (tests/backends.py) vs tests/reference.py (float64), the CPU kernel
and torch: awkward shapes (C = 1, 3, odd 769/771, 2056 > 2048 (no GPU register path), 6200 > 6144 (the simple GPU
backward), N = 40000 (a GPU block owns more than 4 rows per warp)), misaligned views, in place, accumulation into
non-zero gradients, determinism, zero sizes and bad input.

Inputs are rounded to the backend's dtype first. Errors are max |got - ref| / max |ref| per tensor. Tolerances:
float32 out, mean, rstd 1e-5 (two-pass variance in float32), dx, dweight, dbias 3e-5 (sums over C or N rows in
float32); bfloat16 out and dx 1e-2 (one bf16 rounding), mean and rstd 1e-5, dweight and dbias 1e-4 (fp32 sums of
bf16 products)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import assert_rel

from fastllm import _C, cuda, ops

TOL = {
    "float32": dict(out=1e-5, stats=1e-5, dx=3e-5, dw=3e-5),
    "bfloat16": dict(out=1e-2, stats=1e-5, dx=1e-2, dw=1e-4),
}

SHAPES = [(1, 1), (1, 3), (37, 3), (5, 8), (5, 17), (2, 3, 16), (7, 768), (37, 768), (1, 769), (64, 771), (64, 1600),
          (300, 768), (3, 2056), (2, 6200), (40000, 8)]


def make(bk, rng, shape):
    C = shape[-1]
    x = bk.rounded(rng.standard_normal(shape) * 3 + 1)
    w = bk.rounded(rng.standard_normal(C) * 0.5 + 1)
    b = bk.rounded(rng.standard_normal(C))
    dout = bk.rounded(rng.standard_normal(shape))
    return x, w, b, dout


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_layernorm_matches_reference(bk, rng, shape):
    tol = TOL[bk.dtype]
    x, w, b, dout = make(bk, rng, shape)
    out, mean, rstd = bk.poisoned(shape), bk.poisoned(shape[:-1], "float32"), bk.poisoned(shape[:-1], "float32")
    xd, wd = bk.put(x), bk.put(w)
    res = bk.ops.layernorm_forward(xd, wd, bk.put(b), eps=1e-5, out=out, mean=mean, rstd=rstd)
    assert res[0] is out and res[1] is mean and res[2] is rstd
    ref_out, ref_mean, ref_rstd = reference.layernorm_forward(x, w, b, eps=1e-5)
    assert_rel(bk.get(out), ref_out, tol["out"], "out")
    assert_rel(bk.get(mean), ref_mean, tol["stats"], "mean")
    assert_rel(bk.get(rstd), ref_rstd, tol["stats"], "rstd")
    # the gradients accumulate (+=) into non-zero buffers
    C = shape[-1]
    dx0 = bk.rounded(rng.standard_normal(shape))
    dw0, db0 = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    dx, dw, db = bk.put(dx0), bk.put(dw0, "float32"), bk.put(db0, "float32")
    bk.ops.layernorm_backward(bk.put(dout), xd, wd, mean, rstd, dx=dx, dweight=dw, dbias=db)
    ref_dx, ref_dw, ref_db = reference.layernorm_backward(dout, x, w)
    assert_rel(bk.get(dx), dx0 + ref_dx, tol["dx"], "dx")
    assert_rel(bk.get(dw), dw0 + ref_dw, tol["dw"], "dweight")
    assert_rel(bk.get(db), db0 + ref_db, tol["dw"], "dbias")


@pytest.mark.parametrize("offset", [1, 2])
def test_layernorm_misaligned_views(bk, rng, offset):
    """Every array a view `offset` elements into its allocation (no 16-byte vector loads), batched (B, T, C)."""
    tol = TOL[bk.dtype]
    x, w, b, dout = make(bk, rng, (2, 5, 64))
    out = bk.poisoned(x.shape, offset=offset)
    mean, rstd = bk.poisoned((2, 5), "float32", offset), bk.poisoned((2, 5), "float32", offset)
    xd, wd = bk.put(x, offset=offset), bk.put(w, offset=offset)
    bk.ops.layernorm_forward(xd, wd, bk.put(b, offset=offset), out=out, mean=mean, rstd=rstd)
    ref_out, ref_mean, _ = reference.layernorm_forward(x, w, b)
    assert_rel(bk.get(out), ref_out, tol["out"], "out")
    assert_rel(bk.get(mean), ref_mean, tol["stats"], "mean")
    dx, dw, db = bk.put(np.zeros(x.shape), offset=offset), bk.zeros((64,), "float32"), bk.zeros((64,), "float32")
    bk.ops.layernorm_backward(bk.put(dout, offset=offset), xd, wd, mean, rstd, dx=dx, dweight=dw, dbias=db)
    ref_dx, ref_dw, ref_db = reference.layernorm_backward(dout, x, w)
    assert_rel(bk.get(dx), ref_dx, tol["dx"], "dx")
    assert_rel(bk.get(dw), ref_dw, tol["dw"], "dweight")
    assert_rel(bk.get(db), ref_db, tol["dw"], "dbias")


@pytest.mark.backends(devices=("cuda",))
def test_layernorm_in_place(bk, rng):
    """The GPU's out may be x itself; the CPU refuses it (out overlaps inp, test_layernorm_bad_input_cpu)."""
    x, w, b, _ = make(bk, rng, (9, 256))
    xd = bk.put(x)
    bk.ops.layernorm_forward(xd, bk.put(w), bk.put(b), out=xd)
    assert_rel(bk.get(xd), reference.layernorm_forward(x, w, b)[0], TOL[bk.dtype]["out"], "in-place out")


def test_layernorm_large_offset(bk, rng):
    """Two-pass variance: a large common offset does not cancel the variance away."""
    x = bk.rounded(rng.standard_normal((4, 300)) * 0.1 + 1000)
    w, b = np.ones(300, np.float32), np.zeros(300, np.float32)
    out, _, rstd = bk.ops.layernorm_forward(bk.put(x), bk.put(w), bk.put(b))
    ref_out, _, ref_rstd = reference.layernorm_forward(x, w, b)
    np.testing.assert_allclose(bk.get(rstd), ref_rstd, rtol=1e-3)
    # float32: x itself carries 6e-5 rounding at 1000; bfloat16: the output's rounding
    np.testing.assert_allclose(bk.get(out), ref_out, atol=1e-3 if bk.dtype == "float32" else 2e-2)


@pytest.mark.backends(variants=False)
def test_layernorm_deterministic_and_matches_cpu_kernel(bk, rng):
    """Bitwise the same on every run (no float atomics); float32 equals the CPU kernel to 1e-5."""
    N, C = 333, 768
    x, w, b, dout = make(bk, rng, (N, C))
    cpu_out, cpu_mean, cpu_rstd = ops.layernorm_forward(x, w, b)
    cpu_grads = ops.layernorm_backward(dout, x, w, cpu_mean, cpu_rstd)
    xd, wd = bk.put(x), bk.put(w)
    out, mean, rstd = bk.ops.layernorm_forward(xd, wd, bk.put(b))
    runs = [[bk.get(g) for g in bk.ops.layernorm_backward(bk.put(dout), xd, wd, mean, rstd)] for _ in range(3)]
    for r in runs[1:]:
        for a, b_ in zip(r, runs[0]):
            np.testing.assert_array_equal(a, b_)
    if bk.dtype == "float32":
        assert_rel(bk.get(out), cpu_out, 1e-5, "out vs the CPU kernel")
        assert_rel(bk.get(rstd), cpu_rstd, 1e-5, "rstd vs the CPU kernel")
        for got, want, name in zip(runs[0], cpu_grads, ("dx", "dweight", "dbias")):
            assert_rel(got, want, 1e-5, f"{name} vs the CPU kernel")


def test_layernorm_zero_rows(bk):
    e = bk.ops.empty((0, 8), bk.dtype)
    w, b = bk.zeros((8,)), bk.zeros((8,))
    _, mean, rstd = bk.ops.layernorm_forward(e, w, b, out=e)
    dw = bk.zeros((8,), "float32")
    bk.ops.layernorm_backward(bk.ops.empty((0, 8), bk.dtype), e, w, mean, rstd, dweight=dw)
    np.testing.assert_array_equal(bk.get(dw), np.zeros(8))


@pytest.mark.backends(variants=False)
def test_layernorm_vs_torch(bk, rng):
    torch = pytest.importorskip("torch")
    x, w, b, dout = make(bk, rng, (3, 11, 771))
    xt, wt, bt = (torch.from_numpy(a.copy()).requires_grad_() for a in (x, w, b))
    yt = torch.nn.functional.layer_norm(xt, (771,), wt, bt, eps=1e-5)
    yt.backward(torch.from_numpy(dout))
    tol = TOL[bk.dtype]
    xd, wd = bk.put(x), bk.put(w)
    out, mean, rstd = bk.ops.layernorm_forward(xd, wd, bk.put(b))
    assert_rel(bk.get(out), yt.detach().numpy(), tol["out"], "out")
    dx, dw, db = bk.ops.layernorm_backward(bk.put(dout), xd, wd, mean, rstd)
    assert_rel(bk.get(dx), xt.grad.numpy(), tol["dx"], "dx")
    assert_rel(bk.get(dw), wt.grad.numpy(), tol["dw"], "dweight")
    assert_rel(bk.get(db), bt.grad.numpy(), tol["dw"], "dbias")


# ---- bad input: numpy arrays on the CPU, DeviceArrays on the GPU


def test_layernorm_bad_input_cpu(rng):
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((4, 8), 8, 8))
    dout = rng.standard_normal((4, 8)).astype(np.float32)
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
    # C = 0 names C; outputs may not share memory with inputs or each other (mean and rstd in one buffer used to
    # overwrite each other silently)
    with pytest.raises(ValueError, match=r"C \(inp columns\) must be >= 1"):
        ops.layernorm_forward(np.zeros((4, 0), np.float32), np.zeros(0, np.float32), np.zeros(0, np.float32))
    stats = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="mean overlaps rstd"):
        ops.layernorm_forward(x, w, b, mean=stats, rstd=stats)
    with pytest.raises(ValueError, match="out overlaps inp"):
        ops.layernorm_forward(x, w, b, out=x)
    with pytest.raises(ValueError, match="dinp overlaps dout"):
        ops.layernorm_backward(dout, x, w, mean, rstd, dx=dout)


@pytest.mark.cuda
def test_layernorm_bad_input_cuda():
    x, w, b = cuda.zeros((4, 8)), cuda.zeros((8,)), cuda.zeros((8,))
    out, mean, rstd = cuda.zeros((4, 8)), cuda.zeros((4,)), cuda.zeros((4,))
    stats = dict(out=out, mean=mean, rstd=rstd)
    with pytest.raises(TypeError, match="weight"):
        cuda.layernorm_forward(x, cuda.zeros((8,), "bfloat16"), b, **stats)
    with pytest.raises(ValueError, match="bias"):
        cuda.layernorm_forward(x, w, cuda.zeros((9,)), **stats)
    with pytest.raises(ValueError, match="mean"):
        cuda.layernorm_forward(x, w, b, out=out, mean=cuda.zeros((5,)), rstd=rstd)
    with pytest.raises(TypeError, match="rstd"):
        cuda.layernorm_forward(x, w, b, out=out, mean=mean, rstd=cuda.zeros((4,), "bfloat16"))
    with pytest.raises(ValueError, match="out"):
        cuda.layernorm_forward(x, w, b, out=cuda.zeros((4, 7)), mean=mean, rstd=rstd)
    with pytest.raises(TypeError, match="x"):
        cuda.layernorm_forward(cuda.zeros((4, 8), "int32"), w, b, **stats)
    with pytest.raises(ValueError, match="overlap"):
        cuda.layernorm_forward(x, w, b, out=out, mean=out.view(0, (4,)), rstd=rstd)
    with pytest.raises(ValueError, match="C >= 1"):
        cuda.layernorm_forward(cuda.zeros((4, 0)), cuda.zeros((0,)), cuda.zeros((0,)), out=cuda.zeros((4, 0)))
    dx, dw, db = cuda.zeros((4, 8)), cuda.zeros((8,)), cuda.zeros((8,))
    with pytest.raises(TypeError, match="dweight"):
        cuda.layernorm_backward(x, x, w, mean, rstd, dx=dx, dweight=cuda.zeros((8,), "bfloat16"), dbias=db)
    with pytest.raises(ValueError, match="dout"):
        cuda.layernorm_backward(cuda.zeros((4, 9)), x, w, mean, rstd, dx=dx, dweight=dw, dbias=db)
    with pytest.raises(ValueError, match="overlap"):
        cuda.layernorm_backward(dx, x, w, mean, rstd, dx=dx, dweight=dw, dbias=db)
