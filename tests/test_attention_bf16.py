"""bf16 attention on the CPU: ops.attention_forward / attention_backward with dtype="bfloat16" (the tile products on
bf16-rounded operands with fp32 sums, VDPBF16PS; the mixed-precision model's attention, backend.CpuBf16) against
the float64 reference (tests/reference.py, grouped-query form) and torch's CPU SDPA on bf16 q, k, v, over awkward
shapes: T = 1, odd, across the 64-row tiles; hs odd, 8 .. 256; grouped and multi-query heads.

The inputs are rounded to bf16 first, so q k^T is exact up to fp32 sums and only P (in p v and p^T dO) and dS
(in dS k and dS^T q) are rounded inside: errors (max |got - ref| / max |ref|, per q/k/v part of dqkv, floored at 1%
of the largest gradient; ~1e-3 and ~2e-3 measured) stay within out 3e-3, lse 1e-5, dqkv 6e-3. These tests need
AVX512_BF16 (info()["bf16_attention"] == "avx512_bf16") and skip with the reason elsewhere; there dtype="bfloat16"
runs the fp32 kernels, bit for bit (tested on every CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import rel_err, rounded

import fastllm
from fastllm import ops

TOL = {"out": 3e-3, "lse": 1e-5, "grad": 6e-3}

# (B, T, NH, NKV, hs)
SHAPES = [(1, 1, 1, 1, 64), (2, 7, 3, 3, 64), (1, 63, 2, 2, 64), (2, 64, 2, 1, 64), (1, 65, 4, 2, 64),
          (2, 200, 3, 3, 64), (3, 129, 2, 2, 64), (1, 70, 1, 1, 128), (2, 130, 4, 2, 128), (1, 37, 8, 8, 8),
          (3, 65, 4, 4, 24), (2, 130, 4, 2, 17), (3, 33, 6, 3, 5), (1, 70, 1, 1, 256), (1, 300, 2, 1, 80)]


@pytest.fixture
def bf16_attention():
    d = fastllm.info()
    if d["bf16_attention"] != "avx512_bf16":
        pytest.skip(f"this CPU ({d['cpu'] or 'unknown'}) has no AVX512_BF16: bf16 attention runs the fp32 kernels")


def _inputs(seed, B, T, NH, NKV, hs, scale=1.0):
    rng = np.random.default_rng(seed)
    qkv = rounded(rng.standard_normal((B, T, (NH + 2 * NKV) * hs)) * scale, "bfloat16")
    dout = rounded(rng.standard_normal((B, T, NH * hs)), "bfloat16")
    return qkv, dout


def _run(qkv, dout, NH, NKV, dtype, dqkv0=None, **opts):
    out, lse = ops.attention_forward(qkv, NH, n_kv_head=NKV, dtype=dtype, **opts)
    dqkv = np.zeros_like(qkv) if dqkv0 is None else dqkv0.copy()
    ops.attention_backward(dout, qkv, out, lse, NH, dqkv=dqkv, n_kv_head=NKV, dtype=dtype, **opts)
    return out, lse, dqkv


def _check(out, lse, dqkv, ref_out, ref_lse, ref_d, NH, NKV, hs, tol=TOL):
    assert rel_err(out, ref_out) <= tol["out"], rel_err(out, ref_out)
    np.testing.assert_allclose(lse, ref_lse, atol=tol["lse"], rtol=tol["lse"], err_msg="lse")
    floor = 1e-2 * float(np.abs(ref_d).max())
    bounds = {"q": (0, NH * hs), "k": (NH * hs, (NH + NKV) * hs), "v": ((NH + NKV) * hs, (NH + 2 * NKV) * hs)}
    for part, (a, b) in bounds.items():
        e = rel_err(dqkv[..., a:b], ref_d[..., a:b], floor=floor)
        assert e <= tol["grad"], f"d{part}: relative error {e:.3g} > {tol['grad']:g}"


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("B,T,NH,NKV,hs", SHAPES, ids=str)
def test_bf16_attention_matches_reference(bf16_attention, B, T, NH, NKV, hs, threads):
    qkv, dout = _inputs(0, B, T, NH, NKV, hs)
    old = fastllm.get_num_threads()
    fastllm.set_num_threads(threads)
    try:
        out, lse, dqkv = _run(qkv, dout, NH, NKV, "bfloat16")
    finally:
        fastllm.set_num_threads(old)
    ref_out, ref_lse = reference.gqa_attention_forward(qkv, NH, NKV)
    _check(out, lse, dqkv, ref_out, ref_lse, reference.gqa_attention_backward(dout, qkv, NH, NKV), NH, NKV, hs)


@pytest.mark.parametrize("opts", [dict(softcap=2.0, window=5), dict(scale=0.2, window=70), dict(softcap=50.0),
                                  dict(window=1)], ids=str)
@pytest.mark.parametrize("B,T,NH,NKV,hs", [(2, 130, 4, 2, 64), (1, 70, 2, 1, 256), (2, 65, 3, 3, 80)], ids=str)
def test_bf16_attention_options(bf16_attention, B, T, NH, NKV, hs, opts):
    """scale, softcap and sliding window (the Gemma 2/3 attention) with bf16 tile products"""
    qkv, dout = _inputs(31, B, T, NH, NKV, hs, scale=2.0)
    out, lse, dqkv = _run(qkv, dout, NH, NKV, "bfloat16", **opts)
    ref_out, ref_lse = reference.gqa_attention_forward(qkv, NH, NKV, **opts)
    ref_d = reference.gqa_attention_backward(dout, qkv, NH, NKV, **opts)
    tol = dict(TOL, lse=2e-5, grad=TOL["grad"] * (10 if opts.get("window") == 1 else 1))  # dq, dk = 0: noise
    _check(out, lse, dqkv, ref_out, ref_lse, ref_d, NH, NKV, hs, tol)


def test_bf16_attention_rounds_and_is_deterministic(bf16_attention):
    """The bf16 products really run (P rounded: not the fp32 kernels' bits), they give the same bits on any thread
    count, and the backward accumulates (+=)."""
    qkv, dout = _inputs(1, 2, 150, 4, 2, 64)
    f32 = _run(qkv, dout, 4, 2, "float32")
    runs = []
    old = fastllm.get_num_threads()
    for threads in (1, 2, 1):
        fastllm.set_num_threads(threads)
        try:
            runs.append(_run(qkv, dout, 4, 2, "bfloat16"))
        finally:
            fastllm.set_num_threads(old)
    assert not np.array_equal(runs[0][0], f32[0]), "dtype='bfloat16' gave the fp32 kernels' output"
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            np.testing.assert_array_equal(a, b)
    d0 = rounded(np.random.default_rng(2).standard_normal(qkv.shape), "bfloat16")
    acc = _run(qkv, dout, 4, 2, "bfloat16", dqkv0=d0)[2]
    np.testing.assert_allclose(acc - d0, runs[0][2], rtol=0, atol=1e-6 * float(np.abs(d0).max()))


@pytest.mark.parametrize("hs", [64, 48])
def test_bf16_attention_large_logits(bf16_attention, hs):
    """Scores ~ 100: the online softmax's running max moves across key tiles; nothing overflows."""
    qkv, dout = _inputs(3, 1, 300, 2, 2, hs, scale=4.0)
    out, lse, dqkv = _run(qkv, dout, 2, 2, "bfloat16")
    ref_out, ref_lse = reference.gqa_attention_forward(qkv, 2, 2)
    tol = dict(TOL, lse=1e-4, grad=1.2e-2)
    _check(out, lse, dqkv, ref_out, ref_lse, reference.gqa_attention_backward(dout, qkv, 2, 2), 2, 2, hs, tol)


@pytest.mark.parametrize("level", ["avx512", "avx2", "scalar"])
def test_bf16_attention_without_bf16_hardware_is_fp32(level):
    """Below avx512_bf16 (forced with fastllm.set_simd, or a CPU without it) dtype="bfloat16" runs the fp32 kernels:
    the same bits as dtype="float32"."""
    best = fastllm.info()["simd_detected"]
    if fastllm.SIMD_LEVELS.index(level) > fastllm.SIMD_LEVELS.index(best):
        pytest.skip(f"this CPU ({fastllm.info()['cpu'] or 'unknown'}) has no {level}")
    qkv, dout = _inputs(4, 2, 70, 2, 1, 32)
    fastllm.set_simd(level)
    try:
        assert fastllm.info()["bf16_attention"] == "fp32"
        for a, b in zip(_run(qkv, dout, 2, 1, "bfloat16"), _run(qkv, dout, 2, 1, "float32")):
            np.testing.assert_array_equal(a, b)
    finally:
        fastllm.set_simd("auto")


def test_bf16_attention_bad_dtype():
    qkv = np.zeros((1, 4, 24), np.float32)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ops.attention_forward(qkv, 2, dtype="float16")
    out, lse = ops.attention_forward(qkv, 2)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ops.attention_backward(np.zeros((1, 4, 8), np.float32), qkv, out, lse, 2, dtype="int8")


@pytest.mark.parametrize("NH,NKV,T", [(4, 4, 200), (4, 1, 77)])
def test_bf16_attention_vs_torch_sdpa_bf16(bf16_attention, NH, NKV, T):
    """torch's CPU SDPA on bf16 q, k, v (what autocast runs): our error against float64 at most torch's own + 1e-3,
    for the output and each part of dqkv."""
    torch = pytest.importorskip("torch")
    B, hs = 2, 64
    qkv, dout = _inputs(5, B, T, NH, NKV, hs)
    out, _, dqkv = _run(qkv, dout, NH, NKV, "bfloat16")
    ref_out, _ = reference.gqa_attention_forward(qkv, NH, NKV)
    ref_d = reference.gqa_attention_backward(dout, qkv, NH, NKV)

    x = torch.tensor(qkv, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = torch.split(x, [NH * hs, NKV * hs, NKV * hs], dim=-1)
    q, k, v = (t.reshape(B, T, -1, hs).transpose(1, 2) for t in (q, k, v))
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=NKV != NH)
    y = y.transpose(1, 2).reshape(B, T, NH * hs)
    y.backward(torch.tensor(dout, dtype=torch.bfloat16))
    t_out, t_d = y.detach().float().numpy(), x.grad.float().numpy()

    assert rel_err(out, ref_out) <= rel_err(t_out, ref_out) + 1e-3
    floor = 1e-2 * float(np.abs(ref_d).max())
    for a, b in ((0, NH * hs), (NH * hs, (NH + NKV) * hs), ((NH + NKV) * hs, (NH + 2 * NKV) * hs)):
        ours, theirs = rel_err(dqkv[..., a:b], ref_d[..., a:b], floor), rel_err(t_d[..., a:b], ref_d[..., a:b], floor)
        assert ours <= theirs + 1e-3, (ours, theirs)


@pytest.mark.parametrize("NH,NKV,hs", [(4, 2, 64), (3, 3, 40)])
def test_bf16_kv_prefill(bf16_attention, NH, NKV, hs):
    """attention_kv_forward with dtype="bfloat16" (bf16 weights' prefills): several new tokens after cached ones
    (rows at different positions) within bf16 tolerance of float64, the cache written exactly; one new token (a
    decode step) is the fp32 kernel's, bit for bit."""
    B, Tn, maxT = 3, 37, 80
    pos = np.array([0, 5, 17], np.int32)
    rng = np.random.default_rng(6)
    hist = rounded(rng.standard_normal((B, 17 + Tn, (NH + 2 * NKV) * hs)), "bfloat16")  # every row's full sequence
    got = {}
    for dtype in ("float32", "bfloat16"):
        k = np.full((B, NKV, maxT, hs), np.nan, np.float32)
        v = np.full((B, NKV, maxT, hs), np.nan, np.float32)
        for b in range(B):  # the cached rows 0 .. pos[b] - 1
            k[b, :, :pos[b]] = hist[b, :pos[b], NH * hs:(NH + NKV) * hs].reshape(pos[b], NKV, hs).transpose(1, 0, 2)
            v[b, :, :pos[b]] = hist[b, :pos[b], (NH + NKV) * hs:].reshape(pos[b], NKV, hs).transpose(1, 0, 2)
        new = np.stack([hist[b, pos[b]:pos[b] + Tn] for b in range(B)])
        out = ops.attention_kv_forward(new, k, v, pos, n_kv_head=NKV, dtype=dtype)
        step = ops.attention_kv_forward(np.ascontiguousarray(new[:, :1]), k, v, pos + Tn, n_kv_head=NKV, dtype=dtype)
        got[dtype] = out, step, k.copy()
    np.testing.assert_array_equal(got["bfloat16"][1], got["float32"][1])
    np.testing.assert_array_equal(got["bfloat16"][2], got["float32"][2])
    assert not np.array_equal(got["bfloat16"][0], got["float32"][0]), "dtype='bfloat16' ran the fp32 products"
    for b in range(B):
        ref, _ = reference.gqa_attention_forward(hist[b:b + 1, :pos[b] + Tn], NH, NKV)
        assert rel_err(got["bfloat16"][0][b], ref[0, pos[b]:]) <= TOL["out"]
