"""CUDA layernorm, gelu, residual, embedding and adamw vs the float64 references (tests/reference.py) and the CPU
kernels (fastllm.ops), in float32 and bfloat16, fast and simple kernels (the `variant` fixture), odd shapes
(C = 1, 3, 769, 1600, rows above the register/shared-memory limits, unaligned views) and bad inputs.

bfloat16 cases feed the references the bf16-rounded inputs, so only the kernels' own rounding is measured.
Errors are max |got - ref| / max |ref| and are printed on failure. Tolerances: float32 1e-5 (gelu 2e-5: __expf),
bfloat16 outputs 1e-2 (one bf16 rounding is 2^-9 relative), fp32 statistics and parameter gradients from bf16
inputs 1e-4, adamw vs ops.adamw_step after several steps 1e-6. Outputs are poisoned with NaN first, gradients
start from random values (backward kernels accumulate)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from reference import bf16_round

from fastllm import _C, cuda, ops

DTYPES = ["float32", "bfloat16"]


# ---- helpers ----------------------------------------------------------------------------------------------------


@pytest.fixture(params=["fast", "simple"])
def variant(request):
    """Runs the test with the fast kernels and with the simple reference kernels."""
    _C.cuda._set_simple_elementwise(request.param == "simple")
    yield request.param
    _C.cuda._set_simple_elementwise(False)


def rounded(x, dtype):
    """x as the kernel sees it: float32, bf16-rounded for bfloat16."""
    x = np.asarray(x, np.float32)
    return bf16_round(x) if dtype == "bfloat16" else x


def dev(x, dtype, offset=0):
    """x on the GPU as dtype; with offset > 0 a view `offset` elements into a larger buffer (unaligned for the
    16-byte vector paths)."""
    x = np.ascontiguousarray(x, np.float32)
    if offset == 0:
        return cuda.to_device(x, dtype)
    buf = cuda.to_device(np.full(x.size + offset + 3, np.nan, np.float32), dtype)
    v = buf.view(offset, x.shape)
    v.copy_(x)
    return v


def poisoned(shape, dtype, offset=0):
    return dev(np.full(shape, np.nan, np.float32), dtype, offset)


def check(got, ref, tol, what):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{what}: {np.count_nonzero(~np.isfinite(got))} non-finite values (unwritten?)"
    scale = max(float(np.abs(ref).max(initial=0.0)), 1e-30)
    err = float(np.abs(got - ref).max(initial=0.0)) / scale
    assert err <= tol, f"{what}: max abs error / max |ref| = {err:.3g} > {tol:g}"


def out_tol(dtype, f32=1e-5):
    return f32 if dtype == "float32" else 1e-2


# ---- layernorm ---------------------------------------------------------------------------------------------------

# (N, C): C = 1, 3, odd 769, GPT-2 sizes, 2056 > 2048 (no register path), 6200 > 6144 (simple backward);
# N = 40000 makes a backward block own more than 4 rows per warp
LN_SHAPES = [(1, 1), (37, 3), (5, 8), (37, 768), (1, 769), (64, 1600), (300, 768), (3, 2056), (2, 6200), (40000, 8)]


def _ln_inputs(rng, N, C):
    x = (rng.standard_normal((N, C)) * 3 + 1).astype(np.float32)
    w = (rng.standard_normal(C) * 0.5 + 1).astype(np.float32)
    b = rng.standard_normal(C).astype(np.float32)
    return x, w, b


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C", LN_SHAPES)
def test_layernorm_forward(rng, variant, dtype, N, C):
    x, w, b = (rounded(a, dtype) for a in _ln_inputs(rng, N, C))
    out, mean, rstd = poisoned((N, C), dtype), poisoned((N,), "float32"), poisoned((N,), "float32")
    cuda.layernorm_forward(out, mean, rstd, dev(x, dtype), dev(w, dtype), dev(b, dtype), eps=1e-5)
    ro, rm, rr = reference.layernorm_forward(x, w, b, eps=1e-5)
    check(out.numpy(), ro, out_tol(dtype), f"out {dtype} {variant}")
    check(mean.numpy(), rm, 1e-5, "mean")
    check(rstd.numpy(), rr, 1e-5, "rstd")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,C", LN_SHAPES)
def test_layernorm_backward(rng, variant, dtype, N, C):
    x, w, b = (rounded(a, dtype) for a in _ln_inputs(rng, N, C))
    dy = rounded(rng.standard_normal((N, C)), dtype)
    dx0 = rounded(rng.standard_normal((N, C)), dtype)
    dw0, db0 = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    out, mean, rstd = cuda.empty((N, C), dtype), cuda.empty((N,)), cuda.empty((N,))
    xd, wd = dev(x, dtype), dev(w, dtype)
    cuda.layernorm_forward(out, mean, rstd, xd, wd, dev(b, dtype))
    dx, dw, db = dev(dx0, dtype), dev(dw0, "float32"), dev(db0, "float32")
    cuda.layernorm_backward(dx, dw, db, dev(dy, dtype), xd, wd, mean, rstd)
    rdx, rdw, rdb = reference.layernorm_backward(dy, x, w)
    check(dx.numpy(), dx0 + rdx, out_tol(dtype), f"dx {dtype} {variant}")
    check(dw.numpy(), dw0 + rdw, 1e-5 if dtype == "float32" else 1e-4, "dweight")
    check(db.numpy(), db0 + rdb, 1e-5 if dtype == "float32" else 1e-4, "dbias")


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layernorm_unaligned_and_batched_shapes(rng, variant, dtype, offset):
    B, T, C = 2, 5, 64
    x, w, b = (rounded(a, dtype) for a in _ln_inputs(rng, B * T, C))
    x = x.reshape(B, T, C)
    out, mean, rstd = poisoned((B, T, C), dtype, offset), poisoned((B, T), "float32"), poisoned((B, T), "float32")
    xd, wd, bd = dev(x, dtype, offset), dev(w, dtype, offset), dev(b, dtype, offset)
    cuda.layernorm_forward(out, mean, rstd, xd, wd, bd)
    ro, rm, rr = reference.layernorm_forward(x, w, b)
    check(out.numpy(), ro, out_tol(dtype), "out")
    check(mean.numpy(), rm, 1e-5, "mean")
    dy = rounded(rng.standard_normal((B, T, C)), dtype)
    dx, dw, db = dev(np.zeros((B, T, C)), dtype, offset), cuda.zeros((C,)), cuda.zeros((C,))
    cuda.layernorm_backward(dx, dw, db, dev(dy, dtype, offset), xd, wd, mean, rstd)
    rdx, rdw, rdb = reference.layernorm_backward(dy, x, w)
    check(dx.numpy(), rdx, out_tol(dtype), "dx")
    check(dw.numpy(), rdw, 1e-4, "dweight")
    check(db.numpy(), rdb, 1e-4, "dbias")


@pytest.mark.cuda
def test_layernorm_matches_cpu_kernel_and_is_deterministic(rng):
    N, C = 333, 768
    x, w, b = _ln_inputs(rng, N, C)
    dy = rng.standard_normal((N, C)).astype(np.float32)
    o_cpu, m_cpu, r_cpu = ops.layernorm_forward(x, w, b)
    dx_cpu, dw_cpu, db_cpu = ops.layernorm_backward(dy, x, w, m_cpu, r_cpu)
    out, mean, rstd = cuda.empty((N, C)), cuda.empty((N,)), cuda.empty((N,))
    xd, wd = cuda.to_device(x), cuda.to_device(w)
    cuda.layernorm_forward(out, mean, rstd, xd, wd, cuda.to_device(b))
    check(out.numpy(), o_cpu, 1e-5, "out vs ops")
    check(rstd.numpy(), r_cpu, 1e-5, "rstd vs ops")
    runs = []
    for _ in range(3):
        dx, dw, db = cuda.zeros((N, C)), cuda.zeros((C,)), cuda.zeros((C,))
        cuda.layernorm_backward(dx, dw, db, cuda.to_device(dy), xd, wd, mean, rstd)
        runs.append((dx.numpy(), dw.numpy(), db.numpy()))
    check(runs[0][0], dx_cpu, 1e-5, "dx vs ops")
    check(runs[0][1], dw_cpu, 1e-5, "dweight vs ops")
    check(runs[0][2], db_cpu, 1e-5, "dbias vs ops")
    for r in runs[1:]:
        for a, b_ in zip(r, runs[0]):
            np.testing.assert_array_equal(a, b_)  # bitwise reproducible


@pytest.mark.cuda
def test_layernorm_in_place_forward(rng):
    x, w, b = _ln_inputs(rng, 9, 256)
    xd = cuda.to_device(x)
    mean, rstd = cuda.empty((9,)), cuda.empty((9,))
    cuda.layernorm_forward(xd, mean, rstd, xd, cuda.to_device(w), cuda.to_device(b))
    check(xd.numpy(), reference.layernorm_forward(x, w, b)[0], 1e-5, "in-place out")


@pytest.mark.cuda
def test_layernorm_bad_inputs():
    x, w, b = cuda.zeros((4, 8)), cuda.zeros((8,)), cuda.zeros((8,))
    out, mean, rstd = cuda.zeros((4, 8)), cuda.zeros((4,)), cuda.zeros((4,))
    with pytest.raises(TypeError, match="weight"):
        cuda.layernorm_forward(out, mean, rstd, x, cuda.zeros((8,), "bfloat16"), b)
    with pytest.raises(ValueError, match="bias"):
        cuda.layernorm_forward(out, mean, rstd, x, w, cuda.zeros((9,)))
    with pytest.raises(ValueError, match="mean"):
        cuda.layernorm_forward(out, cuda.zeros((5,)), rstd, x, w, b)
    with pytest.raises(TypeError, match="rstd"):
        cuda.layernorm_forward(out, mean, cuda.zeros((4,), "bfloat16"), x, w, b)
    with pytest.raises(ValueError, match="out"):
        cuda.layernorm_forward(cuda.zeros((4, 7)), mean, rstd, x, w, b)
    with pytest.raises(TypeError, match="x"):
        cuda.layernorm_forward(out, mean, rstd, cuda.zeros((4, 8), "int32"), w, b)
    with pytest.raises(ValueError, match="overlap"):
        cuda.layernorm_forward(out, out.view(0, (4,)), rstd, x, w, b)
    with pytest.raises(ValueError, match="C >= 1"):
        cuda.layernorm_forward(cuda.zeros((4, 0)), mean, rstd, cuda.zeros((4, 0)), cuda.zeros((0,)), cuda.zeros((0,)))
    dx, dw, db = cuda.zeros((4, 8)), cuda.zeros((8,)), cuda.zeros((8,))
    with pytest.raises(TypeError, match="dweight"):
        cuda.layernorm_backward(dx, cuda.zeros((8,), "bfloat16"), db, x, x, w, mean, rstd)
    with pytest.raises(ValueError, match="dout"):
        cuda.layernorm_backward(dx, dw, db, cuda.zeros((4, 9)), x, w, mean, rstd)
    with pytest.raises(ValueError, match="overlap"):
        cuda.layernorm_backward(dx, dw, db, dx, x, w, mean, rstd)
    with pytest.raises(TypeError, match="DeviceArray"):
        cuda.layernorm_backward(np.zeros((4, 8), np.float32), dw, db, x, x, w, mean, rstd)


# ---- gelu, residual ----------------------------------------------------------------------------------------------

GELU_SIZES = [1, 3, 7, 8, 9, 1000, 4 * 768 * 37 + 5]


def check_each(got, ref, scale, rtol, atol, what):
    """|got - ref| <= rtol * scale + atol element by element (scale: the magnitude the result is made of)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(got).all(), f"{what}: {np.count_nonzero(~np.isfinite(got))} non-finite values (unwritten?)"
    excess = np.abs(got - ref) - (rtol * np.abs(scale) + atol)
    i = int(np.argmax(excess))
    assert excess.flat[i] <= 0, (
        f"{what}: at {i} got {got.flat[i]:.9g}, want {ref.flat[i]:.9g} (|error| {abs(got.flat[i] - ref.flat[i]):.3g}"
        f" > rtol {rtol:g} * {abs(scale.flat[i]):.3g} + atol {atol:g})"
    )


def gelu_tols(dtype):
    return (2e-5, 1e-6) if dtype == "float32" else (1e-2, 1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", GELU_SIZES)
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_gelu_forward_backward(rng, variant, dtype, n, offset):
    x = rounded(rng.standard_normal(n) * 3, dtype)
    out = poisoned((n,), dtype, offset)
    xd = dev(x, dtype, offset)
    cuda.gelu_forward(out, xd)
    ref = reference.gelu_forward(x)
    rtol, atol = gelu_tols(dtype)
    check_each(out.numpy(), ref, ref, rtol, atol, f"gelu fwd {dtype} {variant}")
    dy = rounded(rng.standard_normal(n), dtype)
    d0 = rounded(rng.standard_normal(n), dtype)
    dx = dev(d0, dtype, offset)
    cuda.gelu_backward(dx, dev(dy, dtype, offset), xd)
    g = reference.gelu_backward(dy, x)
    check_each(dx.numpy(), d0 + g, np.abs(d0) + np.abs(g), rtol, atol, f"gelu bwd {dtype} {variant}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_extremes_saturate_without_nan(variant, dtype):
    x = rounded([-3e38, -1e4, -100, -20, -10, -5, -1e-3, 0, 1e-3, 5, 10, 20, 100, 1e4, 3e38], dtype)
    out = poisoned(x.shape, dtype)
    cuda.gelu_forward(out, dev(x, dtype))
    ref = reference.gelu_forward(x)
    rtol, atol = gelu_tols(dtype)
    check_each(out.numpy(), ref, ref, rtol, atol, "gelu fwd extremes")
    dx = cuda.zeros(x.shape, dtype)
    cuda.gelu_backward(dx, dev(np.ones_like(x), dtype), dev(x, dtype))
    g = reference.gelu_backward(np.ones_like(x), x)
    check_each(dx.numpy(), g, g, rtol, atol, "gelu bwd extremes")


@pytest.mark.cuda
def test_gelu_matches_cpu_kernel_and_in_place(rng):
    x = (rng.standard_normal((37, 3072)) * 2).astype(np.float32)
    xd = cuda.to_device(x)
    out = cuda.empty(x.shape)
    cuda.gelu_forward(out, xd)
    ref = ops.gelu_forward(x)
    check_each(out.numpy(), ref, ref, 2e-5, 1e-6, "gelu fwd vs ops")
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = cuda.zeros(x.shape)
    cuda.gelu_backward(dx, cuda.to_device(dy), xd)
    ref = ops.gelu_backward(dy, x)
    check_each(dx.numpy(), ref, ref, 2e-5, 1e-6, "gelu bwd vs ops")
    cuda.gelu_forward(xd, xd)  # in place
    ref = ops.gelu_forward(x)
    check_each(xd.numpy(), ref, ref, 2e-5, 1e-6, "gelu in place")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 9, 100003])
@pytest.mark.parametrize("offset", [0, 1])
def test_residual_forward_exact(rng, variant, dtype, n, offset):
    a, b = rounded(rng.standard_normal(n), dtype), rounded(rng.standard_normal(n), dtype)
    out = poisoned((n,), dtype, offset)
    ad, bd = dev(a, dtype, offset), dev(b, dtype)
    cuda.residual_forward(out, ad, bd)
    np.testing.assert_array_equal(out.numpy(), rounded(a + b, dtype))
    cuda.residual_forward(ad, ad, bd)  # in place
    np.testing.assert_array_equal(ad.numpy(), rounded(a + b, dtype))


@pytest.mark.cuda
def test_gelu_residual_bad_inputs():
    x = cuda.zeros((4, 8))
    with pytest.raises(TypeError, match="out"):
        cuda.gelu_forward(cuda.zeros((4, 8), "bfloat16"), x)
    with pytest.raises(ValueError, match="out"):
        cuda.gelu_forward(cuda.zeros((8, 4)), x)
    cuda.gelu_forward(x.reshape((32,)).view(0, (4, 8)), x)  # the same memory: in place is fine
    buf = cuda.zeros((40,))
    with pytest.raises(ValueError, match="in place"):
        cuda.gelu_forward(buf.view(1, (4, 8)), buf.view(0, (4, 8)))
    with pytest.raises(ValueError, match="overlap"):
        cuda.gelu_backward(x, x, cuda.zeros((4, 8)))
    with pytest.raises(TypeError, match="x"):
        cuda.gelu_forward(cuda.zeros((3,), "int32"), cuda.zeros((3,), "int32"))
    with pytest.raises(TypeError, match="b"):
        cuda.residual_forward(x, x, cuda.zeros((4, 8), "bfloat16"))
    with pytest.raises(ValueError, match="b"):
        cuda.residual_forward(cuda.zeros((4, 8)), x, cuda.zeros((4, 9)))


def test_wrappers_reject_numpy_arrays():
    x = np.zeros(3, np.float32)
    for call, name in [
        (lambda: cuda.gelu_forward(x, x), "out"),
        (lambda: cuda.gelu_backward(x, x, x), "dx"),
        (lambda: cuda.residual_forward(x, x, x), "out"),
        (lambda: cuda.layernorm_forward(x, x, x, x, x, x), "out"),
        (lambda: cuda.embedding_forward(x, x, x, x), "out"),
        (lambda: cuda.embedding_backward(x, x, x, x), "dwte"),
        (lambda: cuda.adamw_step(x, x, x, x, lr=1e-3, t=1), "params"),
    ]:
        with pytest.raises(TypeError, match=f"{name} must be a fastllm.cuda.DeviceArray"):
            call()


# ---- embedding ---------------------------------------------------------------------------------------------------

# (B, T, C, V): C = 1, odd, GPT-2; V small so that tokens repeat a lot (segments spanning many sort chunks)
EMB_SHAPES = [(1, 1, 1, 1), (2, 5, 3, 7), (4, 64, 768, 1000), (3, 17, 769, 50), (8, 512, 64, 5), (2, 40, 8, 50257)]


def _emb_inputs(rng, B, T, C, V, maxT_extra=3):
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    wte = rng.standard_normal((V, C)).astype(np.float32)
    wpe = rng.standard_normal((T + maxT_extra, C)).astype(np.float32)
    return tokens, wte, wpe


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,V", EMB_SHAPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_embedding_forward_exact(rng, variant, dtype, B, T, C, V, offset):
    tokens, wte, wpe = _emb_inputs(rng, B, T, C, V)
    wte, wpe = rounded(wte, dtype), rounded(wpe, dtype)
    out = poisoned((B, T, C), dtype, offset)
    cuda.embedding_forward(out, cuda.to_device(tokens), dev(wte, dtype, offset), dev(wpe, dtype))
    np.testing.assert_array_equal(out.numpy(), rounded(wte[tokens] + wpe[:T], dtype))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_forward_out_of_range_ids_read_zero_rows(rng, variant, dtype):
    V, C = 10, 16
    tokens = np.array([[0, -1, 10, 9, 2**31 - 1, -(2**31), 3, 11]], np.int32)
    wte, wpe = rounded(rng.standard_normal((V, C)), dtype), rounded(rng.standard_normal((8, C)), dtype)
    out = poisoned((1, 8, C), dtype)
    cuda.embedding_forward(out, cuda.to_device(tokens), dev(wte, dtype), dev(wpe, dtype))
    valid = (tokens >= 0) & (tokens < V)
    want = wpe[None, :8] + np.where(valid[..., None], wte[np.clip(tokens, 0, V - 1)], 0)
    np.testing.assert_array_equal(out.numpy(), rounded(want, dtype))


def _emb_backward_ref(dout, tokens, V, maxT):
    dwte, dwpe = reference.embedding_backward(dout, np.clip(tokens, 0, V - 1), V, maxT)
    bad = (tokens < 0) | (tokens >= V)
    if bad.any():  # the reference scatters everything: take the invalid ids back out
        fix = np.zeros_like(dwte)
        np.add.at(fix, np.clip(tokens[bad], 0, V - 1), np.asarray(dout, np.float64)[bad])
        dwte = dwte - fix
    return dwte, dwpe


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,V", EMB_SHAPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_embedding_backward(rng, variant, dtype, B, T, C, V, offset):
    tokens, _, _ = _emb_inputs(rng, B, T, C, V)
    maxT = T + 3
    dout = rounded(rng.standard_normal((B, T, C)), dtype)
    dwte0 = rng.standard_normal((V, C)).astype(np.float32)
    dwpe0 = rng.standard_normal((maxT, C)).astype(np.float32)
    dwte, dwpe = dev(dwte0, "float32", offset), dev(dwpe0, "float32")
    cuda.embedding_backward(dwte, dwpe, dev(dout, dtype, offset), cuda.to_device(tokens))
    rwte, rwpe = _emb_backward_ref(dout, tokens, V, maxT)
    check(dwte.numpy(), dwte0 + rwte, 1e-5, f"dwte {dtype} {variant}")
    check(dwpe.numpy(), dwpe0 + rwpe, 1e-5, f"dwpe {dtype} {variant}")
    np.testing.assert_array_equal(dwpe.numpy()[T:], dwpe0[T:])  # rows beyond T untouched


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_backward_skips_bad_ids_and_is_deterministic(rng, variant, dtype):
    B, T, C, V = 16, 1024, 64, 7  # long runs of equal tokens: each spans hundreds of sort chunks
    tokens = rng.integers(-2, V + 2, (B, T)).astype(np.int32)
    tokens[3, :700] = 4  # one very long run
    tokens[0, :5] = [2**31 - 1, -(2**31), V, -1, 0]
    dout = rounded(rng.standard_normal((B, T, C)), dtype)
    td, dd = cuda.to_device(tokens), dev(dout, dtype)
    runs = []
    for _ in range(3):
        dwte, dwpe = cuda.zeros((V, C)), cuda.zeros((T, C))
        cuda.embedding_backward(dwte, dwpe, dd, td)
        runs.append((dwte.numpy(), dwpe.numpy()))
    rwte, rwpe = _emb_backward_ref(dout, tokens, V, T)
    check(runs[0][0], rwte, 1e-5, "dwte")
    check(runs[0][1], rwpe, 1e-5, "dwpe")
    for r in runs[1:]:
        np.testing.assert_array_equal(r[0], runs[0][0])
        np.testing.assert_array_equal(r[1], runs[0][1])


@pytest.mark.cuda
def test_embedding_matches_cpu_kernel(rng):
    B, T, C, V = 4, 128, 96, 300
    tokens, wte, wpe = _emb_inputs(rng, B, T, C, V)
    out = cuda.empty((B, T, C))
    cuda.embedding_forward(out, cuda.to_device(tokens), cuda.to_device(wte), cuda.to_device(wpe))
    np.testing.assert_array_equal(out.numpy(), ops.embedding_forward(tokens, wte, wpe))
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    cw, cp = ops.embedding_backward(dout, tokens, np.zeros((V, C), np.float32), np.zeros((T + 3, C), np.float32))
    gw, gp = cuda.zeros((V, C)), cuda.zeros((T + 3, C))
    cuda.embedding_backward(gw, gp, cuda.to_device(dout), cuda.to_device(tokens))
    check(gw.numpy(), cw, 1e-5, "dwte vs ops")
    check(gp.numpy(), cp, 1e-5, "dwpe vs ops")


@pytest.mark.cuda
def test_embedding_bad_inputs():
    tok, wte, wpe = cuda.zeros((2, 4), "int32"), cuda.zeros((10, 8)), cuda.zeros((6, 8))
    out = cuda.zeros((2, 4, 8))
    with pytest.raises(TypeError, match="tokens"):
        cuda.embedding_forward(out, cuda.zeros((2, 4)), wte, wpe)
    with pytest.raises(ValueError, match="tokens"):
        cuda.embedding_forward(out, cuda.zeros((8,), "int32"), wte, wpe)
    with pytest.raises(ValueError, match="wpe"):
        cuda.embedding_forward(out, tok, wte, cuda.zeros((3, 8)))
    with pytest.raises(ValueError, match="wpe"):
        cuda.embedding_forward(out, tok, wte, cuda.zeros((6, 9)))
    with pytest.raises(TypeError, match="wpe"):
        cuda.embedding_forward(out, tok, wte, cuda.zeros((6, 8), "bfloat16"))
    with pytest.raises(ValueError, match="out"):
        cuda.embedding_forward(cuda.zeros((2, 4, 9)), tok, wte, wpe)
    dwte, dwpe, dout = cuda.zeros((10, 8)), cuda.zeros((6, 8)), cuda.zeros((2, 4, 8))
    with pytest.raises(TypeError, match="dwte"):
        cuda.embedding_backward(cuda.zeros((10, 8), "bfloat16"), dwpe, dout, tok)
    with pytest.raises(ValueError, match="dout"):
        cuda.embedding_backward(dwte, dwpe, cuda.zeros((2, 5, 8)), tok)
    with pytest.raises(ValueError, match="dwpe"):
        cuda.embedding_backward(dwte, cuda.zeros((3, 8)), dout, tok)
    with pytest.raises(ValueError, match="overlap"):
        cuda.embedding_backward(dwte, dwte.view(0, (6, 8)), dout, tok)


# ---- adamw -------------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 3, 4, 5, 1000, 12345])
@pytest.mark.parametrize("copy", [None, "float32", "bfloat16"])
@pytest.mark.parametrize("offset", [0, 1])
def test_adamw_matches_cpu_kernel(rng, variant, n, copy, offset):
    p = rng.standard_normal(n).astype(np.float32)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    pd, md, vd = dev(p, "float32", offset), dev(m, "float32"), dev(v, "float32", offset)
    cd = poisoned((n,), copy, offset) if copy else None
    hp = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_scale=0.5)
    for t in range(1, 6):
        g = (rng.standard_normal(n) * 10.0 ** rng.integers(-4, 2)).astype(np.float32)
        ops.adamw_step(p, g, m, v, lr=1e-2, t=t, **hp)
        cuda.adamw_step(pd, dev(g, "float32", offset), md, vd, lr=1e-2, t=t, params_copy=cd, **hp)
    check(pd.numpy(), p, 1e-6, f"params {variant}")
    check(md.numpy(), m, 1e-6, "m")
    check(vd.numpy(), v, 1e-6, "v")
    if copy:
        np.testing.assert_array_equal(cd.numpy(), rounded(pd.numpy(), copy))


@pytest.mark.cuda
def test_adamw_matches_reference(rng):
    n = 4099
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    pd, gd, md, vd = cuda.to_device(p), cuda.to_device(g), cuda.zeros((n,)), cuda.zeros((n,))
    cuda.adamw_step(pd, gd, md, vd, lr=1e-3, t=1, weight_decay=0.01)
    rp, rm, rv = reference.adamw_step(p, g, np.zeros(n), np.zeros(n), 1e-3, 1, weight_decay=0.01)
    check(pd.numpy(), rp, 1e-6, "params vs reference")
    check(md.numpy(), rm, 1e-6, "m vs reference")
    check(vd.numpy(), rv, 1e-6, "v vs reference")


@pytest.mark.cuda
def test_adamw_bad_inputs():
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


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_sizes_are_no_ops(dtype):
    e = cuda.empty((0, 8), dtype)
    cuda.gelu_forward(e, e)
    cuda.gelu_backward(cuda.empty((0, 8), dtype), cuda.empty((0, 8), dtype), e)
    cuda.residual_forward(e, e, e)
    cuda.layernorm_forward(e, cuda.empty((0,)), cuda.empty((0,)), e, cuda.zeros((8,), dtype), cuda.zeros((8,), dtype))
    w = cuda.zeros((8,))
    cuda.layernorm_backward(
        cuda.empty((0, 8), dtype),
        w,
        cuda.zeros((8,)),
        e,
        e,
        cuda.zeros((8,), dtype),
        cuda.empty((0,)),
        cuda.empty((0,)),
    )
    np.testing.assert_array_equal(w.numpy(), np.zeros(8))
    cuda.embedding_forward(
        cuda.empty((0, 4, 8), dtype), cuda.empty((0, 4), "int32"), cuda.zeros((5, 8), dtype), cuda.zeros((4, 8), dtype)
    )
    cuda.embedding_backward(
        cuda.zeros((5, 8)), cuda.zeros((4, 8)), cuda.empty((2, 0, 8), dtype), cuda.empty((2, 0), "int32")
    )
    z = cuda.empty((0,))
    cuda.adamw_step(z, z.reshape((0,)), cuda.empty((0,)), cuda.empty((0,)), lr=1e-3, t=1)
    cuda.synchronize()
