"""Grouped-query causal attention (n_kv_head) of ops / cuda .attention_forward, .attention_backward and
.attention_kv_forward vs tests/reference.py (float64, K/V repeated per group), transformers' repeat_kv + torch SDPA
(autograd), on both backends: NKV = 1 (MQA), 1 < NKV < NH, NKV = NH (must equal n_kv_head=None, the multi-head
path), T = 1 and primes, the KV cache holding only the kv heads.

Errors are max |got - ref| / max |ref| per tensor (per q/k/v part for dqkv, floored at 1% of the largest gradient).
Tolerances: float32 out 2e-5, lse 2e-5 (absolute), dqkv 1e-4; bfloat16 out 1e-2, lse 1e-3, dqkv 3e-2 (the tensor-core
path for hs 64/128 rounds P and dS to bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import BACKENDS, CASES, down, get, rel_err, rounded, up

TOL = {"float32": {"out": 2e-5, "lse": 2e-5, "grad": 1e-4}, "bfloat16": {"out": 1e-2, "lse": 1e-3, "grad": 3e-2}}

# (B, T, NH, NKV, hs): hs 64/128 take the CUDA tensor-core kernels in bf16, the others the simple ones
SHAPES = [(1, 1, 4, 1, 16), (2, 7, 4, 2, 16), (1, 13, 6, 3, 24), (2, 5, 8, 1, 8), (1, 37, 2, 2, 32),
          (1, 65, 4, 2, 64), (2, 33, 4, 1, 64), (2, 19, 3, 3, 64), (1, 40, 2, 1, 128), (1, 33, 2, 2, 128),
          pytest.param(2, 300, 8, 2, 64, marks=pytest.mark.gpu_scale)]


def _qkv(rng, B, T, NH, NKV, hs, dtype):
    qkv = rounded(rng.standard_normal((B, T, (NH + 2 * NKV) * hs)), dtype)
    dout = rounded(rng.standard_normal((B, T, NH * hs)), dtype)
    return qkv, dout


def _check_grad(got, ref, NH, NKV, hs, tol):
    floor = 1e-2 * float(np.abs(ref).max())
    bounds = {"q": (0, NH * hs), "k": (NH * hs, (NH + NKV) * hs), "v": ((NH + NKV) * hs, (NH + 2 * NKV) * hs)}
    for part, (a, b) in bounds.items():
        e = rel_err(got[..., a:b], ref[..., a:b], floor=floor)
        assert e <= tol, f"d{part}: relative error {e:.3g} > {tol:g}"


@pytest.mark.parametrize("B,T,NH,NKV,hs", SHAPES)
@pytest.mark.parametrize("name,dtype", CASES)
def test_gqa_matches_reference(rng, name, dtype, B, T, NH, NKV, hs):
    bk, tol = get(name), TOL[dtype]
    qkv, dout = _qkv(rng, B, T, NH, NKV, hs, dtype)
    qd = up(name, qkv, dtype)
    out, lse = bk.attention_forward(qd, NH, n_kv_head=NKV)
    ref_out, ref_lse = reference.gqa_attention_forward(qkv, NH, NKV)
    assert rel_err(down(name, out), ref_out) <= tol["out"]
    assert np.abs(down(name, lse) - ref_lse).max() <= tol["lse"]
    d0 = rounded(rng.standard_normal(qkv.shape) * 0.1, dtype)
    dqkv = bk.attention_backward(up(name, dout, dtype), qd, out, lse, NH, dqkv=up(name, d0, dtype), n_kv_head=NKV)
    ref_d = reference.gqa_attention_backward(dout, qkv, NH, NKV)
    _check_grad(down(name, dqkv) - d0, ref_d, NH, NKV, hs, tol["grad"] * (2 if dtype == "bfloat16" else 1))


@pytest.mark.parametrize("name,dtype", CASES)
def test_n_kv_head_none_is_multi_head(rng, name, dtype):
    """n_kv_head=None and n_kv_head=n_head are the same computation (bit for bit) on the (B, T, 3C) layout."""
    bk = get(name)
    qkv, dout = _qkv(rng, 2, 19, 3, 3, 64, dtype)
    qd, dd = up(name, qkv, dtype), up(name, dout, dtype)
    o1, l1 = bk.attention_forward(qd, 3)
    o2, l2 = bk.attention_forward(qd, 3, n_kv_head=3)
    np.testing.assert_array_equal(down(name, o1), down(name, o2))
    np.testing.assert_array_equal(down(name, l1), down(name, l2))
    g1 = down(name, bk.attention_backward(dd, qd, o1, l1, 3))
    g2 = down(name, bk.attention_backward(dd, qd, o2, l2, 3, n_kv_head=3))
    if name == "cuda" and dtype == "bfloat16":  # the tensor-core backward adds dq with atomics: order may vary
        np.testing.assert_allclose(g1, g2, rtol=1e-2, atol=1e-2)
    else:
        np.testing.assert_array_equal(g1, g2)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("NH,NKV", [(4, 1), (4, 2), (3, 3)])
def test_gqa_vs_torch_sdpa(rng, name, NH, NKV):
    """transformers' repeat_kv + F.scaled_dot_product_attention(is_causal=True), the HF sdpa path; autograd grads."""
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    bk = get(name)
    B, T, hs = 2, 23, 32
    qkv, dout = _qkv(rng, B, T, NH, NKV, hs, "float32")
    x = torch.from_numpy(qkv.copy()).view(B, T, NH + 2 * NKV, hs).transpose(1, 2).requires_grad_()
    q, k, v = x[:, :NH], x[:, NH:NH + NKV], x[:, NH + NKV:]
    y = torch.nn.functional.scaled_dot_product_attention(q, llama.repeat_kv(k, NH // NKV),
                                                         llama.repeat_kv(v, NH // NKV), is_causal=True)
    y = y.transpose(1, 2).reshape(B, T, NH * hs)
    y.backward(torch.from_numpy(dout))
    qd = up(name, qkv)
    out, lse = bk.attention_forward(qd, NH, n_kv_head=NKV)
    np.testing.assert_allclose(down(name, out), y.detach().numpy(), rtol=1e-4, atol=2e-5)
    d = bk.attention_backward(up(name, dout), qd, out, lse, NH, n_kv_head=NKV)
    want = x.grad.transpose(1, 2).reshape(B, T, -1).numpy()
    np.testing.assert_allclose(down(name, d), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opts", [{}, dict(scale=0.2, softcap=2.0, window=3)], ids=str)
@pytest.mark.parametrize("name,dtype", CASES)
@pytest.mark.parametrize("NH,NKV,hs", [(4, 1, 16), (6, 2, 64), (2, 2, 40), (3, 3, 16)])
def test_gqa_kv_cache_matches_full_attention(rng, name, dtype, NH, NKV, hs, opts):
    """Prefill then one-token steps through attention_kv_forward equal the full causal attention; rows start at
    different positions; the cache (B, NKV, maxT, hs) holds exactly the kv heads' keys and values. NKV = NH = 3
    goes through n_kv_head=None (multi-head attention). With a scale, softcap and a window shorter than the
    positions (Gemma 2's sliding layers) too."""
    bk, tol = get(name), TOL[dtype]
    nkv_arg = None if (NH, NKV) == (3, 3) else NKV
    B, T, maxT, P = 2, 9, 16, 5
    qkv, _ = _qkv(rng, B, T, NH, NKV, hs, dtype)
    kc, vc = up(name, np.zeros((B, NKV, maxT, hs), np.float32), dtype), up(name, np.zeros((B, NKV, maxT, hs)), dtype)
    outs = [down(name, bk.attention_kv_forward(up(name, qkv[:, :P], dtype), kc, vc, np.zeros(B, np.int32),
                                               n_kv_head=nkv_arg, **opts))]
    for t in range(P, T):
        outs.append(down(name, bk.attention_kv_forward(up(name, qkv[:, t:t + 1], dtype), kc, vc,
                                                       np.full(B, t, np.int32), n_kv_head=nkv_arg, **opts)))
    got = np.concatenate(outs, axis=1)
    ref_out, _ = reference.gqa_attention_forward(qkv, NH, NKV, **opts)
    assert rel_err(got, ref_out) <= tol["out"]
    _, k, v = reference.gqa_split(qkv, NH, NKV)
    np.testing.assert_array_equal(down(name, kc)[:, :, :T], k)
    np.testing.assert_array_equal(down(name, vc)[:, :, :T], v)
    # different start positions per row: row 1 continues from position 3 of its own cache
    qkv2, _ = _qkv(rng, B, 2, NH, NKV, hs, dtype)
    out2 = down(name, bk.attention_kv_forward(up(name, qkv2, dtype), kc, vc, np.array([T, 3], np.int32),
                                              n_kv_head=nkv_arg, **opts))
    seq1 = np.concatenate([qkv[1:, :3], qkv2[1:]], axis=1)
    assert rel_err(out2[1:], reference.gqa_attention_forward(seq1, NH, NKV, **opts)[0][:, 3:]) <= tol["out"]


def test_gqa_cpu_paths(rng, threads, simd):
    """Every SIMD level and thread count; the backward's bits do not depend on the thread count."""
    ops = get("cpu")
    NH, NKV, hs, T = 6, 2, 64, 130
    qkv, dout = _qkv(rng, 2, T, NH, NKV, hs, "float32")
    out, lse = ops.attention_forward(qkv, NH, n_kv_head=NKV)
    assert rel_err(out, reference.gqa_attention_forward(qkv, NH, NKV)[0]) <= 2e-5
    d = ops.attention_backward(dout, qkv, out, lse, NH, n_kv_head=NKV)
    _check_grad(d, reference.gqa_attention_backward(dout, qkv, NH, NKV), NH, NKV, hs, 1e-4)
    import fastllm

    n = fastllm.get_num_threads()
    fastllm.set_num_threads(1 if n > 1 else 2)
    try:
        np.testing.assert_array_equal(ops.attention_backward(dout, qkv, out, lse, NH, n_kv_head=NKV), d)
    finally:
        fastllm.set_num_threads(n)


@pytest.mark.parametrize("name", BACKENDS)
def test_gqa_bad_input(rng, name):
    bk = get(name)
    qkv, dout = _qkv(rng, 2, 5, 4, 2, 16, "float32")  # W = 128
    qd = up(name, qkv)
    with pytest.raises(ValueError, match="n_kv_head"):
        bk.attention_forward(qd, 4, n_kv_head=3)
    with pytest.raises(ValueError, match="n_kv_head"):
        bk.attention_forward(qd, 4, n_kv_head=0)
    with pytest.raises(ValueError, match="qkv"):
        bk.attention_forward(qd, 6, n_kv_head=2)  # 10 heads do not divide 128
    with pytest.raises(ValueError, match="qkv"):
        bk.attention_forward(up(name, qkv[:, :, :124]), 4, n_kv_head=2)  # 124 is not 8 * hs
    out, lse = bk.attention_forward(qd, 4, n_kv_head=2)
    with pytest.raises(ValueError, match="out"):
        bk.attention_forward(qd, 4, out=up(name, np.zeros((2, 5, 128), np.float32)), n_kv_head=2)
    with pytest.raises(ValueError, match="dqkv"):
        bk.attention_backward(up(name, dout), qd, out, lse, 4, dqkv=up(name, np.zeros((2, 5, 192), np.float32)),
                              n_kv_head=2)
    kc, vc = up(name, np.zeros((2, 2, 8, 16), np.float32)), up(name, np.zeros((2, 2, 8, 16), np.float32))
    with pytest.raises(ValueError, match="n_kv_head"):
        bk.attention_kv_forward(qd, kc, vc, np.zeros(2, np.int32), n_kv_head=1)  # kcache holds 2 kv heads
    with pytest.raises(ValueError, match="n_kv_head"):
        bk.attention_kv_forward(qd, kc, vc, np.zeros(2, np.int32))  # None means n_head: (B, T, 3C)
    with pytest.raises(ValueError, match="pos"):
        bk.attention_kv_forward(qd, kc, vc, np.array([0, 4], np.int32), n_kv_head=2)  # 4 + 5 > max_T = 8
    big = up(name, np.zeros((2, 4, 8, 16), np.float32))  # a cache of all 4 heads: the repeated K/V of old
    with pytest.raises(ValueError, match="kcache|n_kv_head"):
        bk.attention_kv_forward(qd, big, big, np.zeros(2, np.int32), n_kv_head=2)
