"""CUDA causal attention (csrc/cuda/attention.cu): attention_forward (out, lse), attention_backward (accumulated
dqkv) and attention_kv_forward (KV cache) against the CPU kernels (fastllm.ops, float32 on the same inputs) and torch
SDPA on the GPU, for both implementations: "fast" (the default: tensor-core kernels for bfloat16 with hs 64/128, the
simple kernels otherwise) and "simple" (FASTLLM_CUDA_ATTN=simple: the reference rows kernels everywhere).

Inputs are N(0, 1) and rounded to the kernel's dtype first, so the CPU reference sees exactly the GPU's values.
Errors are max |got - ref| / max |ref| per tensor (per q/k/v part for dqkv). Tolerances:
  float32 : out 2e-5, lse 2e-5 (absolute), dqkv 1e-4
  bfloat16: out 1e-2, lse 1e-3 (absolute; scores are exact fp32 products of bf16 values), dqkv 3e-2
            (P and dS are rounded to bf16 before their products, results are stored in bf16)
vs torch bfloat16 (flash SDPA): our error must stay within 2x torch's own error + 2e-3.
Outputs are poisoned with NaN first; every element must be written. The KV cache is NaN past the valid positions:
a read past pos[b] + t shows up as NaN in out."""

from __future__ import annotations

import numpy as np
import pytest

from fastllm import cuda, ops

DTYPES = ["float32", "bfloat16"]
TOL = {
    "float32": {"out": 2e-5, "lse": 2e-5, "grad": 1e-4},
    "bfloat16": {"out": 1e-2, "lse": 1e-3, "grad": 3e-2},
}

# (B, T, NH, hs): fast path for hs 64 and 128 (bf16), the simple kernels for the other head sizes
SHAPES = [
    (1, 1, 1, 64),
    (2, 7, 3, 64),
    (1, 63, 2, 64),
    (2, 64, 2, 64),
    (1, 65, 4, 64),
    (2, 200, 3, 64),
    pytest.param((1, 1024, 2, 64), marks=pytest.mark.gpu_scale),
    (1, 1, 2, 128),
    (2, 7, 1, 128),
    (1, 63, 2, 128),
    (1, 64, 1, 128),
    (2, 65, 2, 128),
    (1, 200, 2, 128),
    pytest.param((1, 1024, 1, 128), marks=pytest.mark.gpu_scale),
    (1, 37, 8, 8),
    (2, 65, 2, 16),
    (1, 200, 3, 32),
    (3, 63, 2, 48),
    (1, 130, 2, 80),
    pytest.param((1, 1024, 1, 48), marks=pytest.mark.gpu_scale),
    (1, 70, 1, 256),
]


@pytest.fixture(params=["fast", "simple"])
def impl(request, monkeypatch):
    """Selects the implementation through FASTLLM_CUDA_ATTN (read by the launcher at every call)."""
    if request.param == "simple":
        monkeypatch.setenv("FASTLLM_CUDA_ATTN", "simple")
    else:
        monkeypatch.delenv("FASTLLM_CUDA_ATTN", raising=False)
    return request.param


def _rounded(a: np.ndarray, dtype: str) -> np.ndarray:
    """a as the kernel sees it: rounded to bfloat16 (round to nearest even) when dtype is bfloat16."""
    a = np.ascontiguousarray(a, np.float32)
    if dtype == "float32":
        return a
    u = a.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def _up(a: np.ndarray, dtype: str):
    return cuda.to_device(np.ascontiguousarray(a, np.float32), dtype=dtype)


def _poisoned(shape, dtype: str):
    a = cuda.empty(shape, dtype)
    a.copy_(np.full(shape, np.nan, np.float32))
    return a


def _err(got, ref) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-6))


def _check(name, got, ref, tol):
    assert np.isfinite(got).all(), f"{name}: {np.size(got) - np.isfinite(got).sum()} non-finite values (unwritten?)"
    e = _err(got, ref)
    assert e <= tol, f"{name}: relative error {e:.3g} > {tol:g}"


def _check_grad(got, ref, C, tol, what="dqkv"):
    """Each of dq, dk, dv relative to its own largest value, floored at 1% of the largest gradient (dq and dk are
    ~0 for T=1, where only rounding noise is left)."""
    floor = 1e-2 * float(np.abs(ref).max())
    for i, part in enumerate("qkv"):
        sl = slice(i * C, (i + 1) * C)
        g, r = got[..., sl], ref[..., sl]
        assert np.isfinite(g).all(), f"{what} d{part}: non-finite values"
        e = float(np.abs(g.astype(np.float64) - r).max() / max(float(np.abs(r).max()), floor, 1e-6))
        assert e <= tol, f"{what} d{part}: relative error {e:.3g} > {tol:g}"


def _inputs(B, T, NH, hs, dtype, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    C = NH * hs
    qkv = _rounded(rng.standard_normal((B, T, 3 * C)) * scale, dtype)
    dout = _rounded(rng.standard_normal((B, T, C)), dtype)
    return qkv, dout


def _gpu_forward(qkv_d, B, T, NH, hs, dtype):
    out = _poisoned((B, T, NH * hs), dtype)
    lse = _poisoned((B, NH, T), "float32")
    cuda.attention_forward(out, lse, qkv_d, NH)
    return out, lse


# ---- forward and backward vs the CPU kernels


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_cpu(shape, dtype, impl):
    B, T, NH, hs = shape
    C = NH * hs
    tol = TOL[dtype]
    qkv, dout = _inputs(B, T, NH, hs, dtype)
    ref_out, ref_lse = ops.attention_forward(qkv, NH)
    ref_grad = ops.attention_backward(dout, qkv, ref_out, ref_lse, NH)

    qkv_d = _up(qkv, dtype)
    out, lse = _gpu_forward(qkv_d, B, T, NH, hs, dtype)
    _check("out", out.numpy(), ref_out, tol["out"])
    lse_got = lse.numpy()
    assert np.isfinite(lse_got).all(), "lse has unwritten values"
    np.testing.assert_allclose(lse_got, ref_lse, atol=tol["lse"], rtol=tol["lse"], err_msg="lse")

    dqkv = cuda.zeros((B, T, 3 * C), dtype)
    cuda.attention_backward(dqkv, _up(dout, dtype), qkv_d, out, lse, NH)
    _check_grad(dqkv.numpy(), ref_grad, C, tol["grad"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hs", [64, 128, 32])
def test_backward_accumulates(dtype, hs, impl):
    B, T, NH = 2, 97, 2
    C = NH * hs
    qkv, dout = _inputs(B, T, NH, hs, dtype, seed=1)
    init = _rounded(np.random.default_rng(2).standard_normal((B, T, 3 * C)), dtype)
    ref_out, ref_lse = ops.attention_forward(qkv, NH)
    ref_grad = ops.attention_backward(dout, qkv, ref_out, ref_lse, NH)
    qkv_d = _up(qkv, dtype)
    out, lse = _gpu_forward(qkv_d, B, T, NH, hs, dtype)
    dqkv = _up(init, dtype)
    cuda.attention_backward(dqkv, _up(dout, dtype), qkv_d, out, lse, NH)
    got = dqkv.numpy().astype(np.float64) - init  # bf16: the sum init + grad was rounded once (|init| ~ 1)
    tol = TOL[dtype]["grad"] if dtype == "float32" else 0.1
    _check_grad(got, ref_grad, C, tol, what="dqkv - init")
    # twice into zeros = 2x once
    d2 = cuda.zeros((B, T, 3 * C), dtype)
    g = _up(dout, dtype)
    cuda.attention_backward(d2, g, qkv_d, out, lse, NH)
    cuda.attention_backward(d2, g, qkv_d, out, lse, NH)
    _check_grad(d2.numpy(), 2 * ref_grad, C, TOL[dtype]["grad"], what="2 x dqkv")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hs", [64, 128, 48])
def test_large_logits_online_softmax(dtype, hs, impl):
    # scores ~ 100: the running max changes across key tiles; exp must neither overflow nor lose the rows
    B, T, NH = 1, 300, 2
    qkv, dout = _inputs(B, T, NH, hs, dtype, seed=3, scale=4.0)
    ref_out, ref_lse = ops.attention_forward(qkv, NH)
    ref_grad = ops.attention_backward(dout, qkv, ref_out, ref_lse, NH)
    qkv_d = _up(qkv, dtype)
    out, lse = _gpu_forward(qkv_d, B, T, NH, hs, dtype)
    tol = TOL[dtype]
    _check("out", out.numpy(), ref_out, tol["out"])
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=tol["lse"] * 10, rtol=tol["lse"], err_msg="lse")
    dqkv = cuda.zeros((B, T, 3 * NH * hs), dtype)
    cuda.attention_backward(dqkv, _up(dout, dtype), qkv_d, out, lse, NH)
    _check_grad(dqkv.numpy(), ref_grad, NH * hs, tol["grad"] * (1 if dtype == "float32" else 2))


@pytest.mark.cuda
@pytest.mark.gpu_scale
@pytest.mark.parametrize("hs", [64, 128])
def test_many_heads_grid(hs):
    # B*NH = 65536 (fast path blocks beyond the 65535 limit of a y-grid) and 512 x T=130 simple rows
    for B, T, NH, dtype in [(1024, 1, 64, "bfloat16"), (64, 130, 8, "bfloat16"), (16, 33, 8, "float32")]:
        qkv, dout = _inputs(B, T, NH, hs, dtype, seed=4)
        ref_out, ref_lse = ops.attention_forward(qkv, NH)
        qkv_d = _up(qkv, dtype)
        out, lse = _gpu_forward(qkv_d, B, T, NH, hs, dtype)
        _check(f"out {B}x{NH}", out.numpy(), ref_out, TOL[dtype]["out"])
        np.testing.assert_allclose(lse.numpy(), ref_lse, atol=TOL[dtype]["lse"], rtol=TOL[dtype]["lse"])
        if T > 1:
            ref_grad = ops.attention_backward(dout, qkv, ref_out, ref_lse, NH)
            dqkv = cuda.zeros((B, T, 3 * NH * hs), dtype)
            cuda.attention_backward(dqkv, _up(dout, dtype), qkv_d, out, lse, NH)
            _check_grad(dqkv.numpy(), ref_grad, NH * hs, TOL[dtype]["grad"])


@pytest.mark.cuda
@pytest.mark.parametrize("hs", [64, 128])
def test_fast_and_simple_agree(hs, monkeypatch):
    B, T, NH = 2, 333, 3
    C = NH * hs
    qkv, dout = _inputs(B, T, NH, hs, "bfloat16", seed=5)
    qkv_d, dout_d = _up(qkv, "bfloat16"), _up(dout, "bfloat16")
    res = {}
    for which in ("fast", "simple"):
        if which == "simple":
            monkeypatch.setenv("FASTLLM_CUDA_ATTN", "simple")
        else:
            monkeypatch.delenv("FASTLLM_CUDA_ATTN", raising=False)
        out, lse = _gpu_forward(qkv_d, B, T, NH, hs, "bfloat16")
        dqkv = cuda.zeros((B, T, 3 * C), "bfloat16")
        cuda.attention_backward(dqkv, dout_d, qkv_d, out, lse, NH)
        res[which] = (out.numpy(), lse.numpy(), dqkv.numpy())
    f, s = res["fast"], res["simple"]
    _check("out fast vs simple", f[0], s[0], 1e-2)
    np.testing.assert_allclose(f[1], s[1], atol=1e-3, rtol=1e-3, err_msg="lse fast vs simple")
    _check_grad(f[2], s[2], C, 3e-2, what="fast vs simple")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic(dtype, monkeypatch):
    # simple path: bitwise reproducible everywhere; fast path: out, lse, dk, dv reproducible (dq uses atomics)
    B, T, NH, hs = 2, 257, 2, 64
    C = NH * hs
    qkv, dout = _inputs(B, T, NH, hs, dtype, seed=6)
    qkv_d, dout_d = _up(qkv, dtype), _up(dout, dtype)
    for which in ("fast", "simple"):
        if which == "simple":
            monkeypatch.setenv("FASTLLM_CUDA_ATTN", "simple")
        else:
            monkeypatch.delenv("FASTLLM_CUDA_ATTN", raising=False)
        runs = []
        for _ in range(2):
            out, lse = _gpu_forward(qkv_d, B, T, NH, hs, dtype)
            dqkv = cuda.zeros((B, T, 3 * C), dtype)
            cuda.attention_backward(dqkv, dout_d, qkv_d, out, lse, NH)
            runs.append((out.numpy(), lse.numpy(), dqkv.numpy()))
        np.testing.assert_array_equal(runs[0][0], runs[1][0], err_msg=f"{which} out")
        np.testing.assert_array_equal(runs[0][1], runs[1][1], err_msg=f"{which} lse")
        first = 0 if which == "simple" or dtype == "float32" else C
        np.testing.assert_array_equal(runs[0][2][..., first:], runs[1][2][..., first:], err_msg=f"{which} dqkv")


@pytest.mark.cuda
@pytest.mark.parametrize("offset", [1, 8])
def test_views_at_odd_offsets(offset):
    # bf16 hs=64 arrays that are views one element (2 bytes) into their allocation are not 16-byte aligned: the
    # launchers must fall back to the simple kernels (offset 1) or may use the tensor cores (offset 8 = 16 bytes)
    B, T, NH, hs, dtype = 2, 77, 2, 64, "bfloat16"
    C = NH * hs
    qkv, dout = _inputs(B, T, NH, hs, dtype, seed=12)
    ref_out, ref_lse = ops.attention_forward(qkv, NH)
    ref_grad = ops.attention_backward(dout, qkv, ref_out, ref_lse, NH)

    def view_of(shape, data=None):
        n = int(np.prod(shape))
        big = _poisoned((n + offset,), dtype)
        v = big.view(offset, shape)
        v.copy_(np.zeros(shape, np.float32) if data is None else data)
        return v

    qkv_d = view_of(qkv.shape, qkv)
    out = view_of((B, T, C))
    lse = _poisoned((B, NH, T), "float32")
    cuda.attention_forward(out, lse, qkv_d, NH)
    _check("out", out.numpy(), ref_out, TOL[dtype]["out"])
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=TOL[dtype]["lse"], rtol=TOL[dtype]["lse"])
    dqkv = view_of((B, T, 3 * C))
    cuda.attention_backward(dqkv, view_of(dout.shape, dout), qkv_d, out, lse, NH)
    _check_grad(dqkv.numpy(), ref_grad, C, TOL[dtype]["grad"])


# ---- vs torch SDPA on the GPU


def _torch_attention(torch, qkv, dout, NH, dtype):
    """out (B, T, C) and dqkv of causal SDPA on the GPU in torch dtype `dtype` (float32 math or bf16 flash)."""
    import torch.nn.functional as F

    B, T, C3 = qkv.shape
    C = C3 // 3
    x = torch.tensor(qkv, device="cuda", dtype=dtype, requires_grad=True)
    q, k, v = (x[..., i * C : (i + 1) * C].view(B, T, NH, C // NH).transpose(1, 2) for i in range(3))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
    y.backward(torch.tensor(dout, device="cuda", dtype=dtype))
    return y.detach().float().cpu().numpy(), x.grad.float().cpu().numpy()


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape", [(2, 200, 3, 64), (1, 1024, 2, 64), (2, 129, 2, 128), (1, 1024, 2, 128), (2, 100, 2, 32)], ids=str
)
def test_vs_torch(torch_cuda, shape, impl):
    torch = torch_cuda
    B, T, NH, hs = shape
    C = NH * hs
    torch.backends.cuda.matmul.allow_tf32 = False
    # float32: direct comparison with torch's float32 SDPA
    qkv, dout = _inputs(B, T, NH, hs, "float32", seed=7)
    t_out, t_grad = _torch_attention(torch, qkv, dout, NH, torch.float32)
    qkv_d = _up(qkv, "float32")
    out, lse = _gpu_forward(qkv_d, B, T, NH, hs, "float32")
    _check("out vs torch f32", out.numpy(), t_out, 1e-4)
    dqkv = cuda.zeros((B, T, 3 * C), "float32")
    cuda.attention_backward(dqkv, _up(dout, "float32"), qkv_d, out, lse, NH)
    _check_grad(dqkv.numpy(), t_grad, C, 1e-3, what="dqkv vs torch f32")
    # bfloat16: our error vs the float32 result at most 2x torch bf16's own error (+2e-3)
    qkv, dout = _inputs(B, T, NH, hs, "bfloat16", seed=8)
    ref_out, ref_grad = _torch_attention(torch, qkv, dout, NH, torch.float32)
    tb_out, tb_grad = _torch_attention(torch, qkv, dout, NH, torch.bfloat16)
    qkv_d = _up(qkv, "bfloat16")
    out, lse = _gpu_forward(qkv_d, B, T, NH, hs, "bfloat16")
    got = out.numpy()
    assert _err(got, ref_out) <= 2 * _err(tb_out, ref_out) + 2e-3, (_err(got, ref_out), _err(tb_out, ref_out))
    dqkv = cuda.zeros((B, T, 3 * C), "bfloat16")
    cuda.attention_backward(dqkv, _up(dout, "bfloat16"), qkv_d, out, lse, NH)
    g = dqkv.numpy()
    for i, part in enumerate("qkv"):
        sl = slice(i * C, (i + 1) * C)
        ours, theirs = _err(g[..., sl], ref_grad[..., sl]), _err(tb_grad[..., sl], ref_grad[..., sl])
        assert ours <= 2 * theirs + 2e-3, f"d{part}: ours {ours:.3g} vs torch bf16 {theirs:.3g}"


# ---- KV cache


def _cache_from(seq, pos, NH, maxT, C):
    """kcache, vcache (B, NH, maxT, hs) holding the keys/values of seq (B, T, 3C) at positions < pos[b], NaN after."""
    B = seq.shape[0]
    hs = C // NH
    kc = np.full((B, NH, maxT, hs), np.nan, np.float32)
    vc = np.full_like(kc, np.nan)
    for b in range(B):
        p = int(pos[b])
        kc[b, :, :p] = seq[b, :p, C : 2 * C].reshape(p, NH, hs).transpose(1, 0, 2)
        vc[b, :, :p] = seq[b, :p, 2 * C :].reshape(p, NH, hs).transpose(1, 0, 2)
    return kc, vc


def _kv_step(seq, pos, Tn, kcache, vcache, dtype, C):
    B = seq.shape[0]
    chunk = np.stack([seq[b, pos[b] : pos[b] + Tn] for b in range(B)])
    out = _poisoned((B, Tn, C), dtype)
    cuda.attention_kv_forward(out, kcache, vcache, _up(chunk, dtype), cuda.to_device(pos.astype(np.int32)))
    return out.numpy()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("NH,hs", [(2, 64), (3, 32), (1, 128), (2, 80)])
def test_kv_cache_prompt_then_decode(dtype, NH, hs):
    B, maxT, total = 3, 96, 60
    C = NH * hs
    seq = _rounded(np.random.default_rng(9).standard_normal((B, total, 3 * C)), dtype)
    pos = np.array([0, 5, 17], np.int32)  # each row already holds pos[b] tokens in its cache
    kc, vc = _cache_from(seq, pos, NH, maxT, C)
    kcache, vcache = _up(kc, dtype), _up(vc, dtype)
    for Tn in [7, 1, 1, 1, 3, 1, 1, 1, 1]:
        got = _kv_step(seq, pos, Tn, kcache, vcache, dtype, C)
        for b in range(B):
            n = int(pos[b]) + Tn
            ref, _ = ops.attention_forward(seq[b : b + 1, :n], NH)
            _check(f"step Tn={Tn} row {b} (pos {pos[b]})", got[b], ref[0, pos[b] : n], TOL[dtype]["out"])
        pos += Tn
    # the cache holds every key/value written (exact copies) and nothing past them
    kg, vg = kcache.numpy(), vcache.numpy()
    kc, vc = _cache_from(seq, pos, NH, maxT, C)
    np.testing.assert_array_equal(kg, kc)
    np.testing.assert_array_equal(vg, vc)
    # the last step equals the GPU full forward of each row
    for b in range(B):
        n = int(pos[b])
        out, _ = _gpu_forward(_up(seq[b : b + 1, :n], dtype), 1, n, NH, hs, dtype)
        ref, _ = ops.attention_forward(seq[b : b + 1, :n], NH)
        _check(f"full forward row {b}", out.numpy()[0, -1], ref[0, -1], TOL[dtype]["out"])
        _check(f"kv vs full forward row {b}", got[b, -1], out.numpy()[0, -1], 2 * TOL[dtype]["out"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tn", [1, 5])
def test_kv_cache_long_split(dtype, Tn):
    # few rows and a long cache: the keys of a row are split over several blocks (flash-decoding) and merged
    B, NH, hs, maxT = 2, 2, 64, 4096
    C = NH * hs
    pos = np.array([3000, 1234], np.int32)
    seq = _rounded(np.random.default_rng(10).standard_normal((B, int(pos.max()) + Tn, 3 * C)), dtype)
    kc, vc = _cache_from(seq, pos, NH, maxT, C)
    kcache, vcache = _up(kc, dtype), _up(vc, dtype)
    got = _kv_step(seq, pos, Tn, kcache, vcache, dtype, C)
    for b in range(B):
        n = int(pos[b]) + Tn
        ref, _ = ops.attention_forward(seq[b : b + 1, :n], NH)
        _check(f"row {b}", got[b], ref[0, pos[b] : n], TOL[dtype]["out"])


@pytest.mark.cuda
def test_kv_cache_never_writes_outside():
    # pos + Tn > maxT is the caller's error (checked on the host by the model); the GPU skips those writes
    B, NH, hs, maxT, Tn, pad = 2, 2, 32, 8, 3, 1000
    C = NH * hs
    shape = (B, NH, maxT, hs)
    n = int(np.prod(shape))
    seq = np.random.default_rng(11).standard_normal((B, maxT + Tn, 3 * C)).astype(np.float32)
    for name in ("kcache", "vcache"):
        big = cuda.to_device(np.full(n + 2 * pad, 7.0, np.float32))
        kc, vc = _cache_from(seq, np.array([maxT, maxT]), NH, maxT, C)
        caches = {"kcache": cuda.to_device(kc), "vcache": cuda.to_device(vc)}
        caches[name] = big.view(pad, shape)
        caches[name].copy_(kc if name == "kcache" else vc)
        pos = np.array([maxT - 1, maxT], np.int32)
        _kv_step(seq, pos, Tn, caches["kcache"], caches["vcache"], "float32", C)
        cuda.synchronize()
        flat = big.numpy()
        assert (flat[:pad] == 7.0).all() and (flat[-pad:] == 7.0).all(), f"{name}: wrote outside the cache"


# ---- bad input


def test_numpy_arguments_raise_typeerror():
    # no GPU needed: the Python wrappers reject host arrays before calling the extension
    x = np.zeros((1, 4, 24), np.float32)
    with pytest.raises(TypeError, match="out"):
        cuda.attention_forward(np.zeros((1, 4, 8), np.float32), np.zeros((1, 2, 4), np.float32), x, 2)
    with pytest.raises(TypeError, match="dqkv"):
        cuda.attention_backward(x, x, x, x, x, 2)
    with pytest.raises(TypeError, match="out"):
        cuda.attention_kv_forward(x, x, x, x, np.zeros(1, np.int32))


@pytest.mark.cuda
def test_bad_input():
    B, T, NH, hs = 2, 5, 2, 16
    C = NH * hs
    bf = "bfloat16"
    qkv = cuda.zeros((B, T, 3 * C), bf)
    out, lse = cuda.zeros((B, T, C), bf), cuda.zeros((B, NH, T))
    # forward
    with pytest.raises(TypeError, match="qkv"):
        cuda.attention_forward(out, lse, cuda.zeros((B, T, 3 * C), "int32"), NH)
    with pytest.raises(TypeError, match="out"):
        cuda.attention_forward(cuda.zeros((B, T, C)), lse, qkv, NH)
    with pytest.raises(TypeError, match="lse"):
        cuda.attention_forward(out, cuda.zeros((B, NH, T), bf), qkv, NH)
    with pytest.raises(ValueError, match="qkv"):
        cuda.attention_forward(out, lse, cuda.zeros((B * T, 3 * C), bf), NH)
    with pytest.raises(ValueError, match="3"):
        cuda.attention_forward(out, lse, cuda.zeros((B, T, 3 * C + 1), bf), NH)
    with pytest.raises(ValueError, match="n_head"):
        cuda.attention_forward(out, lse, qkv, 3)
    with pytest.raises(ValueError, match="n_head"):
        cuda.attention_forward(out, lse, qkv, 0)
    with pytest.raises(ValueError, match="head size"):
        big = cuda.zeros((1, 2, 3 * 512), bf)
        cuda.attention_forward(cuda.zeros((1, 2, 512), bf), cuda.zeros((1, 1, 2)), big, 1)
    with pytest.raises(ValueError, match="out"):
        cuda.attention_forward(cuda.zeros((B, T + 1, C), bf), lse, qkv, NH)
    with pytest.raises(ValueError, match="lse"):
        cuda.attention_forward(out, cuda.zeros((B, T, NH)), qkv, NH)
    packed = cuda.zeros((B, T, 4 * C), bf)  # out as a view inside qkv's memory
    with pytest.raises(ValueError, match="overlap"):
        cuda.attention_forward(packed.view(0, (B, T, C)), lse, packed.view(0, (B, T, 3 * C)), NH)
    # backward
    dqkv, dout = cuda.zeros((B, T, 3 * C), bf), cuda.zeros((B, T, C), bf)
    with pytest.raises(TypeError, match="dqkv"):
        cuda.attention_backward(cuda.zeros((B, T, 3 * C)), dout, qkv, out, lse, NH)
    with pytest.raises(TypeError, match="dout"):
        cuda.attention_backward(dqkv, cuda.zeros((B, T, C)), qkv, out, lse, NH)
    with pytest.raises(TypeError, match="lse"):
        cuda.attention_backward(dqkv, dout, qkv, out, cuda.zeros((B, NH, T), bf), NH)
    with pytest.raises(ValueError, match="dout"):
        cuda.attention_backward(dqkv, cuda.zeros((B, T, C + 1), bf), qkv, out, lse, NH)
    with pytest.raises(ValueError, match="out"):
        cuda.attention_backward(dqkv, dout, qkv, cuda.zeros((B, T - 1, C), bf), lse, NH)
    with pytest.raises(ValueError, match="dqkv"):
        cuda.attention_backward(cuda.zeros((B, T, C), bf), dout, qkv, out, lse, NH)
    with pytest.raises(ValueError, match="overlap"):
        cuda.attention_backward(qkv, dout, qkv, out, lse, NH)
    # KV cache
    maxT, Tn = 16, 3
    q1 = cuda.zeros((B, Tn, 3 * C), bf)
    kc, vc = cuda.zeros((B, NH, maxT, hs), bf), cuda.zeros((B, NH, maxT, hs), bf)
    o1, pos = cuda.zeros((B, Tn, C), bf), cuda.zeros((B,), "int32")
    cuda.attention_kv_forward(o1, kc, vc, q1, pos)  # valid
    with pytest.raises(TypeError, match="pos"):
        cuda.attention_kv_forward(o1, kc, vc, q1, cuda.zeros((B,)))
    with pytest.raises(TypeError, match="vcache"):
        cuda.attention_kv_forward(o1, kc, cuda.zeros((B, NH, maxT, hs)), q1, pos)
    with pytest.raises(TypeError, match="out"):
        cuda.attention_kv_forward(cuda.zeros((B, Tn, C)), kc, vc, q1, pos)
    with pytest.raises(ValueError, match="pos"):
        cuda.attention_kv_forward(o1, kc, vc, q1, cuda.zeros((B + 1,), "int32"))
    with pytest.raises(ValueError, match="kcache"):
        cuda.attention_kv_forward(o1, cuda.zeros((B, NH, maxT), bf), vc, q1, pos)
    with pytest.raises(ValueError, match="kcache"):
        cuda.attention_kv_forward(o1, cuda.zeros((B, NH, maxT, hs + 1), bf), vc, q1, pos)
    with pytest.raises(ValueError, match="vcache"):
        cuda.attention_kv_forward(o1, kc, cuda.zeros((B, NH, maxT + 1, hs), bf), q1, pos)
    with pytest.raises(ValueError, match="out"):
        cuda.attention_kv_forward(cuda.zeros((B, Tn, C + 2), bf), kc, vc, q1, pos)
    with pytest.raises(ValueError, match="max_T"):
        cuda.attention_kv_forward(cuda.zeros((B, maxT + 1, C), bf), kc, vc, cuda.zeros((B, maxT + 1, 3 * C), bf), pos)
    with pytest.raises(ValueError, match="overlap"):
        cuda.attention_kv_forward(o1, kc, kc, q1, pos)
