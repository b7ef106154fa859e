"""Causal self-attention (csrc/cpu/attention.cpp): out, lse and the accumulated dqkv against the float64
reference (tests/reference.py) and torch SDPA with autograd, over awkward shapes (T = 1, 2, odd, across the
64-row tiles; hs in 8, 16, 24, 64, 80, 128), every SIMD level, 1 and 2 threads; plus bad input.

Tolerances (float32 kernel vs float64 reference, inputs ~ N(0, 1)): out and lse atol 2e-5, rtol 1e-4;
dqkv atol 1e-4 (x the largest gradient when above 1), rtol 1e-3. Measured errors are ~1e-6."""

from __future__ import annotations

import numpy as np
import pytest
import reference

import fastllm
from fastllm import ops

# (B, T, C, NH): hs = C / NH
SHAPES = [
    (1, 1, 8, 1),  # T=1, hs=8
    (1, 2, 32, 2),  # T=2, hs=16
    (3, 37, 48, 2),  # odd T, hs=24
    (1, 37, 64, 8),  # hs=8, many heads
    (3, 129, 128, 2),  # T across three 64-row tiles, hs=64
    (1, 129, 128, 1),  # hs=128
    (1, 70, 80, 1),  # hs=80 (not a multiple of 16)
    (3, 65, 96, 4),  # hs=24, one row into the second tile
]


def _inputs(B, T, C, scale=1.0, seed=0):
    rng = np.random.default_rng(seed)
    qkv = (rng.standard_normal((B, T, 3 * C)) * scale).astype(np.float32)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    return qkv, dout


def _check(qkv, dout, NH, dqkv0=None):
    out, lse = ops.attention_forward(qkv, NH)
    ref_out, ref_lse = reference.attention_forward(qkv, NH)
    np.testing.assert_allclose(out, ref_out, atol=2e-5, rtol=1e-4, err_msg="out")
    np.testing.assert_allclose(lse, ref_lse, atol=2e-5, rtol=1e-4, err_msg="lse")
    init = np.zeros_like(qkv) if dqkv0 is None else dqkv0
    dqkv = ops.attention_backward(dout, qkv, out, lse, NH, dqkv=init.copy())
    ref = reference.attention_backward(dout, qkv, NH) + init
    atol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(dqkv, ref, atol=atol, rtol=1e-3, err_msg="dqkv")




@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, threads):
    B, T, C, NH = shape
    qkv, dout = _inputs(B, T, C)
    _check(qkv, dout, NH)


@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (3, 37, 48, 2), (1, 129, 128, 2), (1, 70, 160, 2)], ids=str)
def test_simd_levels(shape, simd):
    B, T, C, NH = shape
    qkv, dout = _inputs(B, T, C, seed=1)
    _check(qkv, dout, NH)


def test_large_logits_online_softmax():
    # scores of size ~100: the running max changes across key tiles and exp must not overflow
    qkv, dout = _inputs(2, 150, 64, scale=4.0, seed=2)
    out, lse = ops.attention_forward(qkv, 2)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    _check(qkv, dout, 2)


def test_accumulates(threads):
    qkv, dout = _inputs(2, 67, 64, seed=3)
    init = np.random.default_rng(4).standard_normal(qkv.shape).astype(np.float32)
    _check(qkv, dout, 4, dqkv0=init)


def test_deterministic_across_threads():
    qkv, dout = _inputs(2, 100, 128, seed=5)
    old = fastllm.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            fastllm.set_num_threads(n)
            out, lse = ops.attention_forward(qkv, 2)
            results.append((out, lse, ops.attention_backward(dout, qkv, out, lse, 2)))
    finally:
        fastllm.set_num_threads(old)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_empty_sequence():
    qkv = np.zeros((2, 0, 48), np.float32)
    out, lse = ops.attention_forward(qkv, 2)
    assert out.shape == (2, 0, 16) and lse.shape == (2, 2, 0)
    assert ops.attention_backward(out.copy(), qkv, out, lse, 2).shape == qkv.shape


def test_first_row_attends_to_itself():
    qkv, _ = _inputs(2, 5, 32, seed=6)
    out, lse = ops.attention_forward(qkv, 4)
    np.testing.assert_allclose(out[:, 0], qkv[:, 0, 64:], rtol=1e-6, atol=1e-6)  # softmax over one key = 1
    q, k = qkv[:, 0, :32].reshape(2, 4, 8), qkv[:, 0, 32:64].reshape(2, 4, 8)
    np.testing.assert_allclose(lse[:, :, 0], (q * k).sum(-1) / np.sqrt(8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 16, 2), (3, 37, 48, 2), (1, 129, 128, 2), (1, 64, 128, 1)], ids=str)
def test_matches_torch(shape):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    B, T, C, NH = shape
    hs = C // NH
    qkv, dout = _inputs(B, T, C, seed=7)
    out, lse = ops.attention_forward(qkv, NH)
    dqkv = ops.attention_backward(dout, qkv, out, lse, NH)

    x = torch.from_numpy(qkv.astype(np.float64)).requires_grad_(True)
    q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in x.split(C, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y.transpose(1, 2).reshape(B, T, C).backward(torch.from_numpy(dout.astype(np.float64)))
    scores = (q @ k.transpose(-1, -2)) / np.sqrt(hs)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    t_lse = torch.logsumexp(scores, dim=-1).detach().numpy()
    t_out = y.detach().transpose(1, 2).reshape(B, T, C).numpy()
    np.testing.assert_allclose(out, t_out, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(lse, t_lse, atol=2e-5, rtol=1e-4)
    g = x.grad.numpy()
    np.testing.assert_allclose(dqkv, g, atol=1e-4 * max(1.0, float(np.abs(g).max())), rtol=1e-3)


# ---- bad input


def test_bad_dtype():
    qkv = np.zeros((1, 4, 24), np.float64)
    with pytest.raises(TypeError, match="qkv"):
        ops.attention_forward(qkv, 2)
    q32 = qkv.astype(np.float32)
    out, lse = ops.attention_forward(q32, 2)
    with pytest.raises(TypeError, match="qkv"):
        ops.attention_backward(np.zeros_like(out), qkv, out, lse, 2, dqkv=np.zeros_like(q32))
    with pytest.raises(TypeError, match="dout"):
        ops.attention_backward(np.zeros(out.shape, np.float64), q32, out, lse, 2)


def test_bad_shapes():
    qkv = np.zeros((1, 4, 24), np.float32)
    with pytest.raises(ValueError, match="qkv"):
        ops.attention_forward(np.zeros((1, 4, 25), np.float32), 1)  # last dim not 3C
    with pytest.raises(ValueError, match="qkv"):
        ops.attention_forward(np.zeros((4, 24), np.float32), 1)  # not 3-D
    with pytest.raises(ValueError, match="n_head"):
        ops.attention_forward(qkv, 3)  # 3 does not divide C=8
    with pytest.raises(ValueError, match="n_head"):
        ops.attention_forward(qkv, 0)
    with pytest.raises(ValueError, match="out"):
        ops.attention_forward(qkv, 2, out=np.empty((1, 4, 7), np.float32))
    with pytest.raises(ValueError, match="lse"):
        ops.attention_forward(qkv, 2, lse=np.empty((1, 4, 2), np.float32))  # (B, T, NH) instead of (B, NH, T)
    out, lse = ops.attention_forward(qkv, 2)
    dout = np.zeros_like(out)
    with pytest.raises(ValueError, match="lse"):
        ops.attention_backward(dout, qkv, out, lse[:, :1].copy(), 2)
    with pytest.raises(ValueError, match="out"):
        ops.attention_backward(dout, qkv, out[:, :3].copy(), lse, 2)
    with pytest.raises(ValueError, match="dout"):
        ops.attention_backward(dout[:, :, :4].copy(), qkv, out, lse, 2)
    with pytest.raises(ValueError, match="dqkv"):
        ops.attention_backward(dout, qkv, out, lse, 2, dqkv=np.zeros((1, 4, 23), np.float32))


@pytest.mark.parametrize("part", ["q", "k", "v"])
def test_nan_propagates_like_the_kv_kernel(part, simd):
    """A NaN in q, k or v reaches every output row that attends to it, in out and (q, k) lse, as in the
    KV-cache kernel: the vectorized exp2 used to turn NaN scores into ~0 weights (finite output, lse -inf)."""
    B, T, C, NH = 2, 70, 64, 2
    hs = C // NH
    qkv = np.random.default_rng(0).standard_normal((B, T, 3 * C), dtype=np.float32)
    t, col = 5, {"q": 0, "k": C, "v": 2 * C}[part] + 3  # head 0, position t
    qkv[0, t, col] = np.nan
    out, lse = ops.attention_forward(qkv, NH)
    kc, vc = np.zeros((B, NH, T, hs), np.float32), np.zeros((B, NH, T, hs), np.float32)
    kv_out = ops.attention_kv_forward(qkv, kc, vc, np.zeros(B, np.int32))
    reach = np.isnan(kv_out[0, :, :hs]).any(-1)  # rows of head 0 the KV kernel makes NaN
    assert reach.sum() == (1 if part == "q" else T - t)
    assert np.isnan(out[0, :, :hs]).any(-1)[reach].all()
    if part != "v":
        assert np.isnan(lse[0, 0])[reach].all()
    assert np.isfinite(out[1]).all() and np.isfinite(lse[1]).all() and np.isfinite(out[0, :, hs:]).all()
    assert not np.isinf(lse).any()


def test_bad_sizes_and_arguments():
    """n_head -2, 2**40 or 2**70, C = 0 and a 2-D qkv for the KV kernel: a ValueError naming the argument (they
    used to fail in numpy with 'negative dimensions', a 16 TiB allocation, an IndexError, or left lse
    uninitialised)."""
    qkv = np.zeros((1, 4, 24), np.float32)
    for n_head in (-2, 2**40, 2**70):
        with pytest.raises(ValueError, match="n_head"):
            ops.attention_forward(qkv, n_head)
        with pytest.raises(ValueError, match="n_head"):
            fastllm._C.attention_forward(np.zeros((1, 4, 8), np.float32), np.zeros((1, 1, 4), np.float32), qkv,
                                         n_head)
    with pytest.raises(ValueError, match=r"C \(qkv has 3\*C columns\) must be >= 1"):
        ops.attention_forward(np.zeros((1, 4, 0), np.float32), 1)
    cache = np.zeros((1, 2, 8, 4), np.float32)
    with pytest.raises(ValueError, match="qkv must be"):
        ops.attention_kv_forward(qkv[0], cache, cache.copy(), [0])
    with pytest.raises(ValueError, match="kcache overlaps vcache"):
        ops.attention_kv_forward(qkv, cache, cache, [0])
    with pytest.raises(ValueError, match="out overlaps qkv"):
        ops.attention_forward(qkv, 2, out=qkv.reshape(-1)[:32].reshape(1, 4, 8))
