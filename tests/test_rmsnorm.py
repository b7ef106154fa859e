"""RMSNorm forward/backward (ops.rmsnorm_* / cuda.rmsnorm_*) vs tests/reference.py (float64) and transformers'
LlamaRMSNorm (torch autograd), on both backends; the `heads` form (Qwen3's QK-norm on the packed qkv buffer) and
the `cols` form (OLMo 2's QK-norm over all q, all k channels of it).

Errors are max |got - ref| / max |ref| per tensor. Tolerances: float32 out 1e-5, dx 1e-4, dweight 1e-4 (sums over
N rows in float32); bfloat16 (inputs rounded to bf16 first, so the reference sees the kernel's values; outputs stored
in bf16) out 8e-3, dx 1e-2, dweight 1e-3 (fp32 accumulation)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import BACKENDS, CASES, acc_floor, down, get, rel_err, rounded, up

from fastllm import ops

TOL = {"float32": {"out": 1e-5, "dx": 1e-4, "dw": 1e-4}, "bfloat16": {"out": 8e-3, "dx": 1e-2, "dw": 1e-3}}


def make(rng, shape, dtype="float32"):
    C = shape[-1]
    x = rounded(rng.standard_normal(shape) * 2 + 0.3, dtype)
    w = rounded(rng.standard_normal(C), dtype)
    dout = rounded(rng.standard_normal(shape), dtype)
    return x, w, dout


# C = 1, C not a multiple of 16 or 8, T = 1, (64, 771) above the CPU's parallel threshold
@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (5, 17), (2, 1, 64), (3, 7, 100), (64, 771)])
@pytest.mark.parametrize("name,dtype", CASES)
def test_rmsnorm_matches_reference(rng, name, dtype, shape):
    bk, tol = get(name), TOL[dtype]
    x, w, dout = make(rng, shape, dtype)
    out, rstd = bk.rmsnorm_forward(up(name, x, dtype), up(name, w, dtype), 1e-6)
    ref_out, ref_rstd = reference.rmsnorm_forward(x, w)
    assert rel_err(down(name, out), ref_out) <= tol["out"]
    assert rel_err(down(name, rstd), ref_rstd) <= 1e-5
    # backward accumulates into given buffers
    dx0, dw0 = rounded(rng.standard_normal(shape), dtype), rng.standard_normal(shape[-1]).astype(np.float32)
    dx, dw = bk.rmsnorm_backward(up(name, dout, dtype), up(name, x, dtype), up(name, w, dtype), rstd,
                                 dx=up(name, dx0, dtype), dweight=up(name, dw0))
    ref_dx, ref_dw = reference.rmsnorm_backward(dout, x, w)
    assert rel_err(down(name, dx) - dx0, ref_dx, max(1.0, acc_floor(dx0, dtype))) <= tol["dx"]  # dx ~ 0 for C = 1
    assert rel_err(down(name, dw) - dw0, ref_dw) <= tol["dw"]


@pytest.mark.parametrize("name", BACKENDS)
def test_rmsnorm_in_place_and_eps(rng, name):
    bk = get(name)
    x, w, _ = make(rng, (4, 9, 33))
    x[0, 0] = 0.0  # an all-zero row: rstd = 1/sqrt(eps), out = 0
    xd = up(name, x)
    out, rstd = bk.rmsnorm_forward(xd, up(name, w), 1e-5, out=xd)
    ref_out, ref_rstd = reference.rmsnorm_forward(x, w, eps=1e-5)
    assert rel_err(down(name, xd), ref_out) <= 1e-5
    assert rel_err(down(name, rstd), ref_rstd) <= 1e-5
    assert np.all(down(name, out)[0, 0] == 0)


@pytest.mark.parametrize("name,dtype", CASES)
@pytest.mark.parametrize("NH,NKV", [(4, 2), (3, 3), (2, 1)])
def test_rmsnorm_heads_qk_norm(rng, name, dtype, NH, NKV):
    """Qwen3's QK-norm: q_norm on the q heads and k_norm on the k heads of qkv (B, T, NH + 2 NKV, hs), in place;
    v untouched; the backward fills only those rows of dqkv."""
    bk, tol = get(name), TOL[dtype]
    B, T, hs = 2, 5, 24
    qkv = rounded(rng.standard_normal((B, T, NH + 2 * NKV, hs)), dtype)
    wq, wk = rounded(rng.standard_normal(hs), dtype), rounded(rng.standard_normal(hs), dtype)
    dout = rounded(rng.standard_normal(qkv.shape), dtype)
    xd = up(name, qkv, dtype)
    _, rq = bk.rmsnorm_forward(xd, up(name, wq, dtype), 1e-6, out=xd, heads=(0, NH))
    _, rk = bk.rmsnorm_forward(xd, up(name, wk, dtype), 1e-6, out=xd, heads=(NH, NH + NKV))
    got = down(name, xd)
    ref_q, ref_rq = reference.rmsnorm_forward(qkv[:, :, :NH], wq)
    ref_k, ref_rk = reference.rmsnorm_forward(qkv[:, :, NH:NH + NKV], wk)
    assert down(name, rq).shape == (B, T, NH) and down(name, rk).shape == (B, T, NKV)
    assert rel_err(got[:, :, :NH], ref_q) <= tol["out"]
    assert rel_err(got[:, :, NH:NH + NKV], ref_k) <= tol["out"]
    assert rel_err(down(name, rk), ref_rk) <= 1e-5 and rel_err(down(name, rq), ref_rq) <= 1e-5
    np.testing.assert_array_equal(got[:, :, NH + NKV:], qkv[:, :, NH + NKV:])
    # a new out starts as a copy of x
    out, _ = bk.rmsnorm_forward(up(name, qkv, dtype), up(name, wq, dtype), heads=(0, NH))
    np.testing.assert_array_equal(down(name, out)[:, :, NH:], qkv[:, :, NH:])
    # backward of the q rows only
    dx, dw = bk.rmsnorm_backward(up(name, dout, dtype), up(name, qkv, dtype), up(name, wq, dtype), rq, heads=(0, NH))
    ref_dx, ref_dw = reference.rmsnorm_backward(dout[:, :, :NH], qkv[:, :, :NH], wq)
    dx = down(name, dx)
    assert rel_err(dx[:, :, :NH], ref_dx) <= tol["dx"]
    assert np.all(dx[:, :, NH:] == 0)
    assert rel_err(down(name, dw), ref_dw) <= tol["dw"]
    # in place on dout (the model's QK-norm backward on the packed dqkv): the q rows become their gradient (=, not
    # +=), the other rows (k, v) pass through unchanged; dweight accumulates as before
    d = up(name, dout, dtype)
    _, dw2 = bk.rmsnorm_backward(d, up(name, qkv, dtype), up(name, wq, dtype), rq, dx=d, dweight=dw, heads=(0, NH))
    d = down(name, d)
    assert rel_err(d[:, :, :NH], ref_dx) <= tol["dx"]
    np.testing.assert_array_equal(d[:, :, NH:], dout[:, :, NH:])
    assert rel_err(down(name, dw2), 2 * ref_dw) <= tol["dw"]


@pytest.mark.parametrize("name,dtype", CASES)
@pytest.mark.parametrize("NH,NKV,hs", [(4, 2, 24), (3, 3, 5), (2, 1, 8), (5, 1, 160)])
def test_rmsnorm_cols_qk_norm(rng, name, dtype, NH, NKV, hs):
    """OLMo 2's QK-norm: q_norm over all NH * hs q channels and k_norm over all NKV * hs k channels of qkv (B, T, W),
    in place; v untouched; the backward fills only those columns of dqkv (and, in place, passes v's through). Odd
    widths and offsets (hs = 5) take the unaligned paths, (5, 1, 160) columns past one warp's worth."""
    bk, tol = get(name), TOL[dtype]
    B, T = 2, 3
    Q, K = NH * hs, NKV * hs
    qkv = rounded(rng.standard_normal((B, T, Q + 2 * K)) * 2 + 0.3, dtype)
    wq, wk = rounded(rng.standard_normal(Q), dtype), rounded(rng.standard_normal(K), dtype)
    dout = rounded(rng.standard_normal(qkv.shape), dtype)
    xd = up(name, qkv, dtype)
    _, rq = bk.rmsnorm_forward(xd, up(name, wq, dtype), 1e-6, out=xd, cols=(0, Q))
    _, rk = bk.rmsnorm_forward(xd, up(name, wk, dtype), 1e-6, out=xd, cols=(Q, Q + K))
    got = down(name, xd)
    ref_q, ref_rq = reference.rmsnorm_forward(qkv[..., :Q], wq)
    ref_k, ref_rk = reference.rmsnorm_forward(qkv[..., Q:Q + K], wk)
    assert down(name, rq).shape == (B, T) and down(name, rk).shape == (B, T)
    assert rel_err(got[..., :Q], ref_q) <= tol["out"] and rel_err(got[..., Q:Q + K], ref_k) <= tol["out"]
    assert rel_err(down(name, rq), ref_rq) <= 1e-5 and rel_err(down(name, rk), ref_rk) <= 1e-5
    np.testing.assert_array_equal(got[..., Q + K:], qkv[..., Q + K:])
    out, _ = bk.rmsnorm_forward(up(name, qkv, dtype), up(name, wk, dtype), cols=(Q, Q + K))  # a new out: x's copy
    np.testing.assert_array_equal(down(name, out)[..., :Q], qkv[..., :Q])
    # backward of the k columns: accumulated into a zero dx, the others untouched
    dx, dw = bk.rmsnorm_backward(up(name, dout, dtype), up(name, qkv, dtype), up(name, wk, dtype), rk, cols=(Q, Q + K))
    ref_dx, ref_dw = reference.rmsnorm_backward(dout[..., Q:Q + K], qkv[..., Q:Q + K], wk)
    dx = down(name, dx)
    assert rel_err(dx[..., Q:Q + K], ref_dx) <= tol["dx"] and rel_err(down(name, dw), ref_dw) <= tol["dw"]
    assert np.all(dx[..., :Q] == 0) and np.all(dx[..., Q + K:] == 0)
    # in place on dout: the q columns become their gradient, k and v pass through
    d = up(name, dout, dtype)
    bk.rmsnorm_backward(d, up(name, qkv, dtype), up(name, wq, dtype), rq, dx=d, cols=(0, Q))
    d = down(name, d)
    assert rel_err(d[..., :Q], reference.rmsnorm_backward(dout[..., :Q], qkv[..., :Q], wq)[0]) <= tol["dx"]
    np.testing.assert_array_equal(d[..., Q:], dout[..., Q:])


def test_rmsnorm_cpu_paths(rng, threads, simd):
    """Every SIMD level and thread count of the CPU kernel, above the parallel threshold."""
    x, w, dout = make(rng, (70, 771))
    out, rstd = ops.rmsnorm_forward(x, w)
    assert rel_err(out, reference.rmsnorm_forward(x, w)[0]) <= 1e-5
    dx, dw = ops.rmsnorm_backward(dout, x, w, rstd)
    ref_dx, ref_dw = reference.rmsnorm_backward(dout, x, w)
    assert rel_err(dx, ref_dx) <= 1e-4 and rel_err(dw, ref_dw) <= 1e-4


@pytest.mark.parametrize("name", BACKENDS)
def test_rmsnorm_vs_transformers(rng, name):
    """transformers' LlamaRMSNorm (the module Llama, Qwen2/3 and Mistral use) with torch autograd."""
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    bk = get(name)
    x, w, dout = make(rng, (3, 11, 97))
    norm = llama.LlamaRMSNorm(97, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = norm(xt)
    yt.backward(torch.from_numpy(dout))
    out, rstd = bk.rmsnorm_forward(up(name, x), up(name, w), 1e-5)
    np.testing.assert_allclose(down(name, out), yt.detach().numpy(), rtol=1e-5, atol=1e-5)
    dx, dw = bk.rmsnorm_backward(up(name, dout), up(name, x), up(name, w), rstd)
    np.testing.assert_allclose(down(name, dx), xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(down(name, dw), norm.weight.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", BACKENDS)
def test_rmsnorm_bad_input(rng, name):
    bk = get(name)
    x, w, dout = make(rng, (4, 8))
    xd, wd = up(name, x), up(name, w)
    out, rstd = bk.rmsnorm_forward(xd, wd)
    with pytest.raises(ValueError, match="weight"):
        bk.rmsnorm_forward(xd, up(name, w[:7]))
    with pytest.raises(ValueError, match="heads"):
        bk.rmsnorm_forward(up(name, x.reshape(2, 2, 8)), wd, heads=(1, 3))
    with pytest.raises(ValueError, match="heads"):
        bk.rmsnorm_forward(up(name, x[0]), wd, heads=(0, 1))  # heads needs (..., R, C)
    with pytest.raises(ValueError, match="cols"):
        bk.rmsnorm_forward(xd, up(name, w[:3]), cols=(6, 9))  # past the last column
    with pytest.raises(ValueError, match="cols"):
        bk.rmsnorm_forward(xd, up(name, w[:0]), cols=(3, 3))  # empty
    with pytest.raises(ValueError, match="weight"):
        bk.rmsnorm_forward(xd, wd, cols=(0, 4))  # weight (8,) for 4 columns
    with pytest.raises(ValueError, match="heads or cols"):
        bk.rmsnorm_forward(up(name, x.reshape(4, 2, 4)), up(name, w[:4]), heads=(0, 1), cols=(0, 4))
    with pytest.raises(ValueError, match="rstd"):
        bk.rmsnorm_forward(xd, wd, rstd=up(name, np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="eps"):
        bk.rmsnorm_forward(xd, wd, eps=-1.0)
    with pytest.raises(ValueError, match="dout"):
        bk.rmsnorm_backward(up(name, dout[:3]), xd, wd, rstd)
    with pytest.raises(ValueError, match="dweight"):
        bk.rmsnorm_backward(up(name, dout), xd, wd, rstd, dweight=up(name, np.zeros(7, np.float32)))
    with pytest.raises(TypeError, match="x"):
        bk.rmsnorm_forward(x.astype(np.float64) if name == "cpu" else x, wd)
    if name == "cpu":
        with pytest.raises(TypeError, match="weight"):
            ops.rmsnorm_forward(x, w.astype(np.float64))
        with pytest.raises(ValueError, match="x"):
            ops.rmsnorm_forward(np.asfortranarray(x), w)
