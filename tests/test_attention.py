"""Causal self-attention on every backend (tests/backends.py): attention_forward (out, lse), attention_backward
(accumulated dqkv) and attention_kv_forward (the KV cache) against the float64 reference (tests/reference.py) and
torch SDPA, over awkward shapes (T = 1, 2, odd, across the 64-row tiles; hs 8 .. 256, the GPU's tensor-core
kernels for bfloat16 with hs 64 and 128), large logits, determinism, misaligned views, zero length and bad input.

Inputs are N(0, 1) rounded to the backend's dtype first. Errors are max |got - ref| / max |ref| per tensor (per q,
k, v part of dqkv, floored at 1% of the largest gradient: dq and dk are ~0 for T = 1). Tolerances:
  float32 : out 2e-5, lse 2e-5 (+ rtol 1e-4), dqkv 1e-4
  bfloat16: out 1e-2, lse 1e-3 (scores are exact fp32 products of bf16 values), dqkv 3e-2 (P and dS are rounded
            to bf16 before their products, results are stored in bf16)
vs torch bfloat16 on the GPU (flash SDPA): our error must stay within 2x torch's own error + 2e-3.
Outputs are poisoned with NaN first. The KV cache is NaN past the valid positions: a read past pos[b] + t shows
up as NaN in out."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import Backend, assert_rel

import fastllm
from fastllm import cuda, ops

TOL = {
    "float32": dict(out=2e-5, lse=2e-5, grad=1e-4),
    "bfloat16": dict(out=1e-2, lse=1e-3, grad=3e-2),
}

# (B, T, NH, hs): T across the 64-row tiles; hs 64 and 128 (the GPU's tensor cores in bf16), others (simple kernels)
SHAPES = [
    (1, 1, 1, 64), (2, 7, 3, 64), (1, 63, 2, 64), (2, 64, 2, 64), (1, 65, 4, 64), (2, 200, 3, 64), (3, 129, 2, 64),
    pytest.param((1, 1024, 2, 64), marks=pytest.mark.gpu_scale),
    (1, 1, 2, 128), (2, 7, 1, 128), (1, 63, 2, 128), (1, 64, 1, 128), (2, 65, 2, 128), (1, 200, 2, 128),
    (1, 129, 1, 128), pytest.param((1, 1024, 1, 128), marks=pytest.mark.gpu_scale),
    (1, 1, 1, 8), (1, 2, 2, 16), (1, 37, 8, 8), (3, 37, 2, 24), (3, 65, 4, 24), (2, 65, 2, 16), (1, 200, 3, 32),
    (3, 63, 2, 48), (1, 70, 1, 80), (1, 130, 2, 80), pytest.param((1, 1024, 1, 48), marks=pytest.mark.gpu_scale),
    (1, 70, 1, 256),
]


def inputs(bk, B, T, NH, hs, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    C = NH * hs
    qkv = bk.rounded(rng.standard_normal((B, T, 3 * C)) * scale)
    dout = bk.rounded(rng.standard_normal((B, T, C)))
    return qkv, dout


def check_grad(got, ref, C, tol, what="dqkv"):
    """Each of dq, dk, dv relative to its own largest value, floored at 1% of the largest gradient."""
    floor = 1e-2 * float(np.abs(ref).max())
    for i, part in enumerate("qkv"):
        sl = slice(i * C, (i + 1) * C)
        assert_rel(got[..., sl], ref[..., sl], tol, f"{what} d{part}", floor=max(floor, 1e-6))


def forward(bk, qkv_d, B, T, NH, hs):
    out, lse = bk.poisoned((B, T, NH * hs)), bk.poisoned((B, NH, T), "float32")
    res = bk.ops.attention_forward(qkv_d, NH, out=out, lse=lse)
    assert res[0] is out and res[1] is lse
    return out, lse


def check_forward_backward(bk, qkv, dout, NH, tol, dqkv0=None):
    B, T, C3 = qkv.shape
    C = C3 // 3
    qkv_d = bk.put(qkv)
    out, lse = forward(bk, qkv_d, B, T, NH, C // NH)
    ref_out, ref_lse = reference.attention_forward(qkv, NH)
    assert_rel(bk.get(out), ref_out, tol["out"], "out")
    lse_got = bk.get(lse)
    assert np.isfinite(lse_got).all(), "lse has unwritten values"
    np.testing.assert_allclose(lse_got, ref_lse, atol=tol["lse"], rtol=max(tol["lse"], 1e-4), err_msg="lse")
    init = np.zeros_like(qkv) if dqkv0 is None else dqkv0
    dqkv = bk.put(init)
    assert bk.ops.attention_backward(bk.put(dout), qkv_d, out, lse, NH, dqkv=dqkv) is dqkv
    got = bk.get(dqkv).astype(np.float64) - init  # accumulated (+=); bf16: init + grad was rounded once
    check_grad(got, reference.attention_backward(dout, qkv, NH), C, tol["grad"])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_attention_matches_reference(bk, shape):
    B, T, NH, hs = shape
    qkv, dout = inputs(bk, B, T, NH, hs)
    check_forward_backward(bk, qkv, dout, NH, TOL[bk.dtype])


@pytest.mark.parametrize("hs", [64, 128, 32])
def test_attention_backward_accumulates(bk, hs):
    B, T, NH = 2, 97, 2
    qkv, dout = inputs(bk, B, T, NH, hs, seed=1)
    init = bk.rounded(np.random.default_rng(2).standard_normal(qkv.shape))
    tol = dict(TOL[bk.dtype], grad=TOL[bk.dtype]["grad"] if bk.dtype == "float32" else 0.1)  # |init| ~ 1 rounded
    check_forward_backward(bk, qkv, dout, NH, tol, dqkv0=init)
    # twice into zeros = 2x once
    qkv_d, g = bk.put(qkv), bk.put(dout)
    out, lse = bk.ops.attention_forward(qkv_d, NH)
    d2 = bk.zeros(qkv.shape)
    for _ in range(2):
        bk.ops.attention_backward(g, qkv_d, out, lse, NH, dqkv=d2)
    check_grad(bk.get(d2), 2 * reference.attention_backward(dout, qkv, NH), NH * hs, TOL[bk.dtype]["grad"], "2 x dqkv")


@pytest.mark.parametrize("hs", [64, 128, 48])
def test_attention_large_logits_online_softmax(bk, hs):
    """Scores ~ 100: the running max changes across key tiles; exp must neither overflow nor lose the rows."""
    qkv, dout = inputs(bk, 1, 300, 2, hs, seed=3, scale=4.0)
    tol = dict(TOL[bk.dtype])
    tol["lse"] *= 10
    if bk.dtype == "bfloat16":
        tol["grad"] *= 2
    check_forward_backward(bk, qkv, dout, 2, tol)


def test_attention_first_row_attends_to_itself(bk):
    qkv, _ = inputs(bk, 2, 5, 4, 8, seed=6)
    out, lse = bk.ops.attention_forward(bk.put(qkv), 4)
    out, lse = bk.get(out), bk.get(lse)
    tol = TOL[bk.dtype]
    assert_rel(out[:, 0], qkv[:, 0, 64:], tol["out"], "out row 0 = v row 0")  # softmax over one key = 1
    q, k = qkv[:, 0, :32].reshape(2, 4, 8), qkv[:, 0, 32:64].reshape(2, 4, 8)
    np.testing.assert_allclose(lse[:, :, 0], (q * k).sum(-1) / np.sqrt(8), rtol=1e-5, atol=max(tol["lse"], 1e-5))


def test_attention_zero_length(bk):
    qkv = bk.ops.zeros((2, 0, 48), bk.dtype)
    out, lse = bk.ops.attention_forward(qkv, 2)
    assert out.shape == (2, 0, 16) and lse.shape == (2, 2, 0)
    assert bk.ops.attention_backward(bk.ops.zeros((2, 0, 16), bk.dtype), qkv, out, lse, 2).shape == qkv.shape


@pytest.mark.backends(variants=False)
def test_attention_deterministic(bk):
    """Bitwise reproducible (the CPU across 1 and 2 threads too), except the GPU tensor-core path's dq (fp32 atomics);
    the simple GPU kernels are bitwise reproducible everywhere."""
    B, T, NH, hs = 2, 257, 2, 64
    C = NH * hs
    qkv, dout = inputs(bk, B, T, NH, hs, seed=6)
    qkv_d, dout_d = bk.put(qkv), bk.put(dout)
    variants = ["fast", "simple"] if bk.is_cuda else ["1thread", "avx2"]
    for v in variants:
        runs = []
        for _ in range(2):
            with Backend(bk.device, bk.dtype, v).selected():
                out, lse = bk.ops.attention_forward(qkv_d, NH)
                dqkv = bk.ops.attention_backward(dout_d, qkv_d, out, lse, NH)
                runs.append((bk.get(out), bk.get(lse), bk.get(dqkv)))
        np.testing.assert_array_equal(runs[0][0], runs[1][0], err_msg=f"{v} out")
        np.testing.assert_array_equal(runs[0][1], runs[1][1], err_msg=f"{v} lse")
        first = C if (bk.is_cuda and v == "fast" and bk.dtype == "bfloat16") else 0
        np.testing.assert_array_equal(runs[0][2][..., first:], runs[1][2][..., first:], err_msg=f"{v} dqkv")
    if not bk.is_cuda:  # at the SIMD level in use (not the last variant's: AVX-512 rounds apart from AVX2)
        def grads():
            return bk.get(bk.ops.attention_backward(dout_d, qkv_d, *bk.ops.attention_forward(qkv_d, NH), NH))

        fastllm.set_num_threads(1)
        one = grads()
        fastllm.set_num_threads(2)
        np.testing.assert_array_equal(one, grads(), err_msg="1 vs 2 threads")


@pytest.mark.parametrize("offset", [1, 8])
def test_attention_views_at_odd_offsets(bk, offset):
    """Arrays that are views `offset` elements into their allocation: bf16 at offset 1 (2 bytes) is not 16-byte
    aligned, so the GPU launchers must fall back to the simple kernels; offset 8 (16 bytes) may use the tensor
    cores."""
    B, T, NH, hs = 2, 77, 2, 64
    C = NH * hs
    qkv, dout = inputs(bk, B, T, NH, hs, seed=12)
    qkv_d = bk.put(qkv, offset=offset)
    out, lse = bk.poisoned((B, T, C), offset=offset), bk.poisoned((B, NH, T), "float32")
    bk.ops.attention_forward(qkv_d, NH, out=out, lse=lse)
    ref_out, ref_lse = reference.attention_forward(qkv, NH)
    tol = TOL[bk.dtype]
    assert_rel(bk.get(out), ref_out, tol["out"], "out")
    np.testing.assert_allclose(bk.get(lse), ref_lse, atol=tol["lse"], rtol=max(tol["lse"], 1e-4))
    dqkv = bk.put(np.zeros(qkv.shape), offset=offset)
    bk.ops.attention_backward(bk.put(dout, offset=offset), qkv_d, out, lse, NH, dqkv=dqkv)
    check_grad(bk.get(dqkv), reference.attention_backward(dout, qkv, NH), C, tol["grad"])


@pytest.mark.backends(variants=False)
@pytest.mark.parametrize("shape", [(1, 1, 2, 8), (3, 37, 2, 24), (1, 129, 2, 64), (1, 64, 1, 128)], ids=str)
def test_attention_vs_torch(bk, shape):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    B, T, NH, hs = shape
    C = NH * hs
    qkv, dout = inputs(bk, B, T, NH, hs, seed=7)
    qkv_d = bk.put(qkv)
    out, lse = bk.ops.attention_forward(qkv_d, NH)
    dqkv = bk.ops.attention_backward(bk.put(dout), qkv_d, out, lse, NH)
    x = torch.from_numpy(qkv.astype(np.float64)).requires_grad_(True)
    q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in x.split(C, dim=2))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y.transpose(1, 2).reshape(B, T, C).backward(torch.from_numpy(dout.astype(np.float64)))
    scores = (q @ k.transpose(-1, -2)) / np.sqrt(hs)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    tol = TOL[bk.dtype]
    assert_rel(bk.get(out), y.detach().transpose(1, 2).reshape(B, T, C).numpy(), tol["out"], "out")
    np.testing.assert_allclose(bk.get(lse), torch.logsumexp(scores, dim=-1).detach().numpy(), atol=tol["lse"],
                               rtol=max(tol["lse"], 1e-4))
    check_grad(bk.get(dqkv), x.grad.numpy(), C, tol["grad"])


# ---- the GPU only: tensor cores vs simple kernels, grids beyond 65535 blocks, torch SDPA on the GPU


@pytest.mark.backends(devices=("cuda",), dtypes=("bfloat16",), variants=False)
@pytest.mark.parametrize("hs", [64, 128])
def test_cuda_attention_fast_and_simple_agree(bk, hs):
    B, T, NH = 2, 333, 3
    C = NH * hs
    qkv, dout = inputs(bk, B, T, NH, hs, seed=5)
    qkv_d, dout_d = bk.put(qkv), bk.put(dout)
    res = {}
    for v in ("fast", "simple"):
        with Backend("cuda", "bfloat16", v).selected():
            out, lse = bk.ops.attention_forward(qkv_d, NH)
            res[v] = (bk.get(out), bk.get(lse), bk.get(bk.ops.attention_backward(dout_d, qkv_d, out, lse, NH)))
    f, s = res["fast"], res["simple"]
    assert_rel(f[0], s[0], 1e-2, "out fast vs simple")
    np.testing.assert_allclose(f[1], s[1], atol=1e-3, rtol=1e-3, err_msg="lse fast vs simple")
    check_grad(f[2], s[2], C, 3e-2, what="fast vs simple")


@pytest.mark.cuda
@pytest.mark.gpu_scale
@pytest.mark.parametrize("hs", [64, 128])
def test_cuda_attention_many_heads_grid(hs):
    """B*NH = 65536 (tensor-core blocks beyond the 65535 limit of a y-grid) and 512 x T=130 simple rows."""
    for B, T, NH, dtype in [(1024, 1, 64, "bfloat16"), (64, 130, 8, "bfloat16"), (16, 33, 8, "float32")]:
        bk = Backend("cuda", dtype)
        qkv, dout = inputs(bk, B, T, NH, hs, seed=4)
        check_forward_backward(bk, qkv, dout, NH, TOL[dtype])


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


def _err(got, ref) -> float:
    return float(np.abs(got.astype(np.float64) - ref).max() / max(float(np.abs(ref).max()), 1e-6))


@pytest.mark.backends(devices=("cuda",), dtypes=("bfloat16",))
@pytest.mark.parametrize(
    "shape", [(2, 200, 3, 64), (1, 1024, 2, 64), (2, 129, 2, 128), (1, 1024, 2, 128), (2, 100, 2, 32)], ids=str)
def test_cuda_attention_vs_torch_sdpa(bk, torch_cuda, shape):
    torch = torch_cuda
    B, T, NH, hs = shape
    C = NH * hs
    torch.backends.cuda.matmul.allow_tf32 = False
    # float32: direct comparison with torch's float32 SDPA
    f32 = Backend("cuda", "float32")
    qkv, dout = inputs(f32, B, T, NH, hs, seed=7)
    t_out, t_grad = _torch_attention(torch, qkv, dout, NH, torch.float32)
    qkv_d = f32.put(qkv)
    out, lse = cuda.attention_forward(qkv_d, NH)
    assert_rel(out.numpy(), t_out, 1e-4, "out vs torch f32")
    check_grad(cuda.attention_backward(f32.put(dout), qkv_d, out, lse, NH).numpy(), t_grad, C, 1e-3,
               what="dqkv vs torch f32")
    # bfloat16: our error vs the float32 result at most 2x torch bf16's own error (+2e-3)
    qkv, dout = inputs(bk, B, T, NH, hs, seed=8)
    ref_out, ref_grad = _torch_attention(torch, qkv, dout, NH, torch.float32)
    tb_out, tb_grad = _torch_attention(torch, qkv, dout, NH, torch.bfloat16)
    qkv_d = bk.put(qkv)
    out, lse = cuda.attention_forward(qkv_d, NH)
    got = out.numpy()
    assert _err(got, ref_out) <= 2 * _err(tb_out, ref_out) + 2e-3, (_err(got, ref_out), _err(tb_out, ref_out))
    g = cuda.attention_backward(bk.put(dout), qkv_d, out, lse, NH).numpy()
    for i, part in enumerate("qkv"):
        sl = slice(i * C, (i + 1) * C)
        ours, theirs = _err(g[..., sl], ref_grad[..., sl]), _err(tb_grad[..., sl], ref_grad[..., sl])
        assert ours <= 2 * theirs + 2e-3, f"d{part}: ours {ours:.3g} vs torch bf16 {theirs:.3g}"


# ---- KV cache


def cache_from(bk, seq, pos, NH, maxT):
    """kcache, vcache (B, NH, maxT, hs) as numpy holding the keys/values of seq (B, T, 3C) at positions < pos[b],
    position p at row p % maxT (the last one written wins: a ring cache), NaN in rows never written."""
    B, C = seq.shape[0], seq.shape[2] // 3
    hs = C // NH
    kc = np.full((B, NH, maxT, hs), np.nan, np.float32)
    vc = np.full_like(kc, np.nan)
    for b in range(B):
        for p in range(int(pos[b])):
            kc[b, :, p % maxT] = seq[b, p, C : 2 * C].reshape(NH, hs)
            vc[b, :, p % maxT] = seq[b, p, 2 * C :].reshape(NH, hs)
    return kc, vc


def kv_step(bk, seq, pos, Tn, kcache, vcache):
    """One attention_kv_forward of the next Tn tokens of every row; returns out (B, Tn, C) as numpy."""
    B, C = seq.shape[0], seq.shape[2] // 3
    chunk = np.stack([seq[b, pos[b] : pos[b] + Tn] for b in range(B)])
    out = bk.poisoned((B, Tn, C))
    assert bk.ops.attention_kv_forward(bk.put(chunk), kcache, vcache, bk.ids(pos), out=out) is out
    return bk.get(out)


@pytest.mark.backends(variants=("cpu",))
@pytest.mark.parametrize("NH,hs", [(2, 64), (3, 32), (1, 128), (2, 80)])
@pytest.mark.parametrize("start", [[0, 5, 17], [0, 0, 0]])  # rows at different positions, and a fresh prefill
def test_kv_cache_prompt_then_decode(bk, NH, hs, start):
    """Prefill chunks (Tn > 1: the CPU's tiled attention over the cache, the mask shifted by each row's position)
    and single decode steps, against the float64 reference, on every kernel variant."""
    B, maxT, total = 3, 96, 60
    C = NH * hs
    tol = TOL[bk.dtype]
    seq = bk.rounded(np.random.default_rng(9).standard_normal((B, total, 3 * C)))
    pos = np.array(start, np.int32)  # each row already holds pos[b] tokens in its cache
    kcache, vcache = (bk.put(a) for a in cache_from(bk, seq, pos, NH, maxT))
    for Tn in [7, 1, 1, 1, 3, 1, 1, 1, 1]:
        got = kv_step(bk, seq, pos, Tn, kcache, vcache)
        for b in range(B):
            n = int(pos[b]) + Tn
            ref, _ = reference.attention_forward(seq[b : b + 1, :n], NH)
            assert_rel(got[b], ref[0, pos[b] : n], tol["out"], f"step Tn={Tn} row {b} (pos {pos[b]})")
        pos += Tn
    # the cache holds every key/value written (exact copies) and nothing past them
    kc, vc = cache_from(bk, seq, pos, NH, maxT)
    np.testing.assert_array_equal(bk.get(kcache), kc)
    np.testing.assert_array_equal(bk.get(vcache), vc)
    # the last step equals the full forward of each row
    for b in range(B):
        n = int(pos[b])
        out, _ = bk.ops.attention_forward(bk.put(seq[b : b + 1, :n]), NH)
        assert_rel(got[b, -1], bk.get(out)[0, -1], 2 * tol["out"], f"kv vs full forward row {b}")


@pytest.mark.backends(variants=("cpu",))
@pytest.mark.parametrize("Tn", [1, 5])
def test_kv_cache_long(bk, Tn):
    """Few rows and a long cache: the GPU splits the keys of a row over several blocks (flash-decoding), then
    merges them."""
    B, NH, hs, maxT = 2, 2, 64, 4096
    C = NH * hs
    pos = np.array([3000, 1234], np.int32)
    seq = bk.rounded(np.random.default_rng(10).standard_normal((B, int(pos.max()) + Tn, 3 * C)))
    kcache, vcache = (bk.put(a) for a in cache_from(bk, seq, pos, NH, maxT))
    got = kv_step(bk, seq, pos, Tn, kcache, vcache)
    for b in range(B):
        n = int(pos[b]) + Tn
        ref = ops.attention_forward(seq[b : b + 1, :n], NH)[0]  # the CPU kernel: the float64 one is slow at T=3000
        assert_rel(got[b], ref[0, pos[b] : n], TOL[bk.dtype]["out"], f"row {b}")


def test_kv_cache_numpy_pos_out_of_range(bk):
    B, NH, hs, maxT, Tn = 2, 2, 16, 8, 3
    kc, vc = bk.zeros((B, NH, maxT, hs)), bk.zeros((B, NH, maxT, hs))
    qkv = bk.zeros((B, Tn, 3 * NH * hs))
    bk.ops.attention_kv_forward(qkv, kc, vc, np.array([0, maxT - Tn]))  # valid
    for pos in ([0, maxT - Tn + 1], [-1, 0]):
        with pytest.raises(ValueError, match="pos"):
            bk.ops.attention_kv_forward(qkv, kc, vc, np.array(pos))
    with pytest.raises(TypeError, match="pos"):
        bk.ops.attention_kv_forward(qkv, kc, vc, np.zeros(B, np.float32))


@pytest.mark.cuda
def test_cuda_kv_cache_never_writes_outside():
    """pos + Tn > maxT with pos already on the GPU is the caller's error (the model checks it on the host); the GPU
    skips those writes."""
    bk = Backend("cuda", "float32")
    B, NH, hs, maxT, Tn, pad = 2, 2, 32, 8, 3, 1000
    C = NH * hs
    shape = (B, NH, maxT, hs)
    n = int(np.prod(shape))
    seq = np.random.default_rng(11).standard_normal((B, maxT + Tn, 3 * C)).astype(np.float32)
    for name in ("kcache", "vcache"):
        big = cuda.to_device(np.full(n + 2 * pad, 7.0, np.float32))
        kc, vc = cache_from(bk, seq, np.array([maxT, maxT]), NH, maxT)
        caches = {"kcache": cuda.to_device(kc), "vcache": cuda.to_device(vc)}
        caches[name] = big.view(pad, shape)
        caches[name].copy_(kc if name == "kcache" else vc)
        kv_step(bk, seq, np.array([maxT - 1, maxT], np.int32), Tn, caches["kcache"], caches["vcache"])
        flat = big.numpy()
        assert (flat[:pad] == 7.0).all() and (flat[-pad:] == 7.0).all(), f"{name}: wrote outside the cache"


# ---- score options: scale, softcap (Gemma 2), sliding window (Mistral, Gemma 2/3)

# awkward windows: 1 (only itself), 5 (inside one tile, rows spanning tile boundaries), 64 (a CPU tile), 100, and one
# at least T (= full causal); with a cap and a scale
OPTIONS = [dict(scale=0.3), dict(softcap=2.0), dict(window=1), dict(window=5), dict(window=64), dict(window=100),
           dict(window=1000), dict(scale=0.11, softcap=3.0, window=37)]
OPTION_SHAPES = [(2, 7, 3, 64), (1, 130, 2, 64), (2, 65, 1, 128), (1, 70, 1, 80), (1, 40, 1, 256)]


def check_options(bk, qkv, dout, NH, NKV, opts, tol, dqkv0=None):
    """forward (out, lse) and the accumulated backward with the options vs the float64 reference"""
    B, T, W = qkv.shape
    hs = W // (NH + 2 * NKV)
    qkv_d = bk.put(qkv)
    out, lse = bk.poisoned((B, T, NH * hs)), bk.poisoned((B, NH, T), "float32")
    bk.ops.attention_forward(qkv_d, NH, out=out, lse=lse, n_kv_head=NKV, **opts)
    ref_out, ref_lse = reference.gqa_attention_forward(qkv, NH, NKV, **opts)
    assert_rel(bk.get(out), ref_out, tol["out"], f"out {opts}")
    np.testing.assert_allclose(bk.get(lse), ref_lse, atol=tol["lse"], rtol=max(tol["lse"], 1e-4), err_msg="lse")
    init = np.zeros_like(qkv) if dqkv0 is None else dqkv0
    dqkv = bk.put(init)
    bk.ops.attention_backward(bk.put(dout), qkv_d, out, lse, NH, dqkv=dqkv, n_kv_head=NKV, **opts)
    ref = reference.gqa_attention_backward(dout, qkv, NH, NKV, **opts)
    got = bk.get(dqkv).astype(np.float64) - init
    floor = 1e-2 * float(np.abs(ref).max())
    for part, (a, b) in {"q": (0, NH), "k": (NH, NH + NKV), "v": (NH + NKV, NH + 2 * NKV)}.items():
        r = ref[..., a * hs : b * hs]
        zero = not np.abs(r).max() > 1e-12 * floor  # dq, dk of window=1 are exactly 0: fp32 cancellation noise
        assert_rel(got[..., a * hs : b * hs], r, tol["grad"], f"d{part} {opts}", floor=max(floor * (10 if zero else 1),
                                                                                          1e-6))


@pytest.mark.parametrize("opts", OPTIONS, ids=str)
@pytest.mark.parametrize("shape", OPTION_SHAPES, ids=str)
def test_attention_options_match_reference(bk, shape, opts):
    B, T, NH, hs = shape
    qkv, dout = inputs(bk, B, T, NH, hs, seed=21, scale=2.0)  # scores of a few units: the cap bends them
    check_options(bk, qkv, dout, NH, NH, opts, TOL[bk.dtype])


@pytest.mark.parametrize("opts", [dict(window=3, softcap=2.0), dict(window=70, scale=0.2)], ids=str)
@pytest.mark.parametrize("NH,NKV,hs", [(4, 1, 64), (6, 2, 32), (2, 2, 128)])
def test_attention_options_gqa_accumulates(bk, NH, NKV, hs, opts):
    rng = np.random.default_rng(22)
    qkv = bk.rounded(rng.standard_normal((2, 97, (NH + 2 * NKV) * hs)) * 2.0)
    dout = bk.rounded(rng.standard_normal((2, 97, NH * hs)))
    dqkv0 = bk.rounded(rng.standard_normal(qkv.shape) * 0.01)
    check_options(bk, qkv, dout, NH, NKV, opts, TOL[bk.dtype], dqkv0)


@pytest.mark.parametrize("window", [None, 1, 7, 1000])
def test_attention_defaults_and_wide_windows_are_plain_causal(bk, window):
    """scale=1/sqrt(hs), softcap=None and a window >= T are the default computation, bit for bit."""
    B, T, NH, hs = 2, 77, 2, 64
    qkv, dout = inputs(bk, B, T, NH, hs, seed=23)
    qkv_d, dout_d = bk.put(qkv), bk.put(dout)
    plain = bk.ops.attention_forward(qkv_d, NH)
    same = bk.ops.attention_forward(qkv_d, NH, scale=float(np.float32(1 / np.sqrt(hs))), softcap=None,
                                    window=1000 if window is None else max(window, T))
    for a, b in zip(plain, same):
        np.testing.assert_array_equal(bk.get(a), bk.get(b))
    g1 = bk.get(bk.ops.attention_backward(dout_d, qkv_d, *plain, NH))
    g2 = bk.get(bk.ops.attention_backward(dout_d, qkv_d, *same, NH, window=T))
    if bk.is_cuda and bk.dtype == "bfloat16" and bk.variant == "fast":  # dq by atomics
        np.testing.assert_allclose(g1, g2, rtol=1e-2, atol=1e-2)
    else:
        np.testing.assert_array_equal(g1, g2)
    if window is not None and window < T:  # and a real window changes the result
        assert not np.allclose(bk.get(bk.ops.attention_forward(qkv_d, NH, window=window)[0]), bk.get(plain[0]))


@pytest.mark.parametrize("hs", [64, 128, 48])
def test_attention_window_skips_the_keys_outside(bk, hs):
    """NaN in the key and value of position 10: the rows that see it are NaN, and the rows far past its window
    (more than a tile of keys away) stay finite in out, lse and every gradient -- their key tiles are never read."""
    B, T, NH, window = 1, 300, 2, 8
    C = NH * hs
    qkv, dout = inputs(bk, B, T, NH, hs, seed=24)
    qkv[0, 10, C:] = np.nan
    qkv_d = bk.put(qkv)
    out, lse = bk.ops.attention_forward(qkv_d, NH, window=window)
    dqkv = bk.get(bk.ops.attention_backward(bk.put(dout), qkv_d, out, lse, NH, window=window))
    out, lse = bk.get(out), bk.get(lse)
    assert np.isnan(out[0, 10:10 + window]).any(-1).all() and np.isnan(lse[0, :, 10:10 + window]).any(0).all()
    far = 10 + window + 128
    assert np.isfinite(out[0, far:]).all() and np.isfinite(lse[0, :, far:]).all()
    assert np.isfinite(dqkv[0, far:]).all()


@pytest.mark.backends(variants=False)
@pytest.mark.parametrize("NH,NKV,hs,T,opts", [
    (2, 2, 8, 1, dict(softcap=1.0, window=1)), (3, 3, 24, 37, dict(scale=0.5, softcap=1.5, window=9)),
    (4, 2, 64, 129, dict(softcap=50.0, window=64)), (4, 1, 256, 70, dict(scale=1 / 16, softcap=3.0, window=20)),
    (2, 1, 80, 67, dict(window=66))], ids=str)
def test_attention_options_vs_torch(bk, NH, NKV, hs, T, opts):
    """torch autograd (float64) through explicit scores: * scale, softcap * tanh(. / softcap), the sliding-window
    causal mask (transformers: kv_idx > q_idx - sliding_window), logsumexp, softmax; K/V repeated per group."""
    torch = pytest.importorskip("torch")
    B, G = 2, NH // NKV
    rng = np.random.default_rng(25)
    qkv = bk.rounded(rng.standard_normal((B, T, (NH + 2 * NKV) * hs)) * 2.0)
    dout = bk.rounded(rng.standard_normal((B, T, NH * hs)))
    qkv_d = bk.put(qkv)
    out, lse = bk.ops.attention_forward(qkv_d, NH, n_kv_head=NKV, **opts)
    dqkv = bk.ops.attention_backward(bk.put(dout), qkv_d, out, lse, NH, n_kv_head=NKV, **opts)
    x = torch.from_numpy(qkv.astype(np.float64)).requires_grad_(True)
    q, k, v = x.view(B, T, NH + 2 * NKV, hs).transpose(1, 2).split([NH, NKV, NKV], dim=1)
    k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
    scores = q @ k.transpose(-1, -2) * opts.get("scale", hs**-0.5)
    if "softcap" in opts:
        scores = opts["softcap"] * torch.tanh(scores / opts["softcap"])
    qi, ki = torch.arange(T)[:, None], torch.arange(T)[None, :]
    mask = (ki <= qi) & (ki > qi - opts.get("window", T))
    scores = scores.masked_fill(~mask, float("-inf"))
    y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(B, T, NH * hs)
    y.backward(torch.from_numpy(dout.astype(np.float64)))
    tol = TOL[bk.dtype]
    assert_rel(bk.get(out), y.detach().numpy(), tol["out"], "out")
    np.testing.assert_allclose(bk.get(lse), torch.logsumexp(scores, dim=-1).detach().numpy(), atol=tol["lse"],
                               rtol=max(tol["lse"], 1e-4))
    ref, got = x.grad.numpy(), bk.get(dqkv)
    floor = 1e-2 * float(np.abs(ref).max())
    for part, (a, b) in {"q": (0, NH), "k": (NH, NH + NKV), "v": (NH + NKV, NH + 2 * NKV)}.items():
        assert_rel(got[..., a * hs : b * hs], ref[..., a * hs : b * hs], tol["grad"], f"d{part}", floor=floor)


@pytest.mark.backends(variants=("cpu",))
@pytest.mark.parametrize("opts", [dict(window=16, softcap=2.0), dict(window=1), dict(window=40, scale=0.2),
                                  dict(softcap=5.0)], ids=str)
@pytest.mark.parametrize("NH,hs", [(2, 64), (1, 256), (3, 32)])
def test_kv_cache_options_prompt_then_decode(bk, NH, hs, opts):
    """Prefill chunks and decode steps with the options, rows starting before and past the window (pos 0, 9, 45),
    against the float64 reference of each whole row, and the last step against the full forward."""
    B, maxT, total = 3, 96, 70
    C = NH * hs
    tol = TOL[bk.dtype]
    seq = bk.rounded(np.random.default_rng(26).standard_normal((B, total, 3 * C)) * 2.0)
    pos = np.array([0, 9, 45], np.int32)
    kcache, vcache = (bk.put(a) for a in cache_from(bk, seq, pos, NH, maxT))
    for Tn in [7, 1, 1, 3, 1, 1, 5, 1]:
        chunk = np.stack([seq[b, pos[b] : pos[b] + Tn] for b in range(B)])
        out = bk.poisoned((B, Tn, C))
        bk.ops.attention_kv_forward(bk.put(chunk), kcache, vcache, bk.ids(pos), out=out, **opts)
        got = bk.get(out)
        for b in range(B):
            n = int(pos[b]) + Tn
            ref, _ = reference.attention_forward(seq[b : b + 1, :n], NH, **opts)
            assert_rel(got[b], ref[0, pos[b] : n], tol["out"], f"step Tn={Tn} row {b} (pos {pos[b]})")
        pos += Tn
    np.testing.assert_array_equal(bk.get(kcache), cache_from(bk, seq, pos, NH, maxT)[0])  # every row kept
    for b in range(B):
        full, _ = bk.ops.attention_forward(bk.put(seq[b : b + 1, : pos[b]]), NH, **opts)
        assert_rel(got[b, -1], bk.get(full)[0, -1], 2 * tol["out"], f"kv vs full forward row {b}")


@pytest.mark.backends(variants=("cpu",))
@pytest.mark.parametrize("window,NH,hs,opts", [(1, 2, 64, {}), (5, 3, 32, dict(softcap=2.0)), (16, 2, 80, {}),
                                               (70, 1, 128, dict(scale=0.2))], ids=str)
def test_kv_cache_ring(bk, window, NH, hs, opts):
    """A sliding window's cache as a ring of maxT = window + 7 - 1 rows (7: the longest chunk), far shorter than the
    positions: prefill chunks and decode steps, rows starting before and past the window, run to ~3 rings past it,
    against the float64 reference of each whole row; the ring then holds the latest position of each row."""
    B, longest = 3, 7
    maxT = window + longest - 1
    steps = [7, 1, 1, 3, 1, 7, 5] * (3 * (maxT + 10) // 25 + 1)
    C = NH * hs
    tol = TOL[bk.dtype]
    pos = np.array([0, 9, maxT + 3], np.int32)
    seq = bk.rounded(np.random.default_rng(27).standard_normal((B, int(pos.max()) + sum(steps), 3 * C)) * 2.0)
    kcache, vcache = (bk.put(a) for a in cache_from(bk, seq, pos, NH, maxT))
    for Tn in steps:
        chunk = np.stack([seq[b, pos[b] : pos[b] + Tn] for b in range(B)])
        out = bk.poisoned((B, Tn, C))
        bk.ops.attention_kv_forward(bk.put(chunk), kcache, vcache, bk.ids(pos), out=out, window=window, **opts)
        got = bk.get(out)
        for b in range(B):
            lo = max(0, int(pos[b]) - window + 1)  # the keys these queries see start at lo or later
            ref, _ = reference.attention_forward(seq[b : b + 1, lo : pos[b] + Tn], NH, window=window, **opts)
            assert_rel(got[b], ref[0, pos[b] - lo :], tol["out"], f"step Tn={Tn} row {b} (pos {pos[b]})")
        pos += Tn
    assert pos.min() > 3 * maxT
    np.testing.assert_array_equal(bk.get(kcache), cache_from(bk, seq, pos, NH, maxT)[0])
    np.testing.assert_array_equal(bk.get(vcache), cache_from(bk, seq, pos, NH, maxT)[1])


@pytest.mark.backends(variants=("cpu",))
@pytest.mark.parametrize("Tn", [1, 5])
def test_kv_cache_long_ring(bk, Tn):
    """A long window's ring (maxT = window + Tn - 1) at positions several rings past it: the GPU's split keys of a
    row (flash-decoding) wrap around the ring's end."""
    B, NH, hs, window = 2, 2, 64, 1500
    maxT = window + Tn - 1
    C = NH * hs
    pos = np.array([4000, 2 * maxT - 2], np.int32)
    seq = bk.rounded(np.random.default_rng(28).standard_normal((B, int(pos.max()) + Tn, 3 * C)))
    kcache, vcache = (bk.put(a) for a in cache_from(bk, seq, pos, NH, maxT))
    got = kv_step_window(bk, seq, pos, Tn, kcache, vcache, window)
    for b in range(B):
        lo = int(pos[b]) - window + 1
        ref = ops.attention_forward(seq[b : b + 1, lo : pos[b] + Tn], NH, window=window)[0]  # the CPU kernel
        assert_rel(got[b], ref[0, window - 1 :], TOL[bk.dtype]["out"], f"row {b}")


def kv_step_window(bk, seq, pos, Tn, kcache, vcache, window):
    B, C = seq.shape[0], seq.shape[2] // 3
    chunk = np.stack([seq[b, pos[b] : pos[b] + Tn] for b in range(B)])
    out = bk.poisoned((B, Tn, C))
    bk.ops.attention_kv_forward(bk.put(chunk), kcache, vcache, bk.ids(pos), out=out, window=window)
    return bk.get(out)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_kv_cache_ring_equals_full_cache_cpu(dtype):
    """On the CPU a ring gives the bits of a cache that keeps every position (the same key tiles, read from other
    rows) for the prefill's fp32 and bf16 tile products, and the decode steps up to rounding."""
    B, NH, NKV, hs, window, longest = 2, 4, 2, 64, 100, 70
    W = (NH + 2 * NKV) * hs
    steps = [70, 1, 1, 33, 1, 70, 70, 1, 5, 70, 1] * 2
    pos = np.array([0, 20], np.int32)
    seq = np.random.default_rng(29).standard_normal((B, 20 + sum(steps), W)).astype(np.float32)
    full = [np.zeros((B, NKV, seq.shape[1], hs), np.float32) for _ in range(2)]
    ring = [np.zeros((B, NKV, window + longest - 1, hs), np.float32) for _ in range(2)]
    for Tn in steps:
        chunk = np.stack([seq[b, pos[b] : pos[b] + Tn] for b in range(B)])
        a, b = (ops.attention_kv_forward(chunk, *cache, pos, n_kv_head=NKV, dtype=dtype, window=window)
                for cache in (full, ring))
        if Tn > 1:  # the prefill packs the keys into aligned scratch: the same sums
            np.testing.assert_array_equal(a, b, err_msg=f"Tn={Tn} pos {pos}")
        else:  # a step reads the rows in place: the vectorized dot may split its sums by the arrays' alignment
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"Tn={Tn} pos {pos}")
        pos += Tn
    assert pos.min() > 3 * ring[0].shape[2]


@pytest.mark.parametrize("window,maxT,Tn,pos,ok", [
    (None, 8, 3, [0, 5], True), (None, 8, 3, [0, 6], False),  # no window: pos + Tn <= maxT
    (4, 8, 5, [0, 100], True), (4, 8, 6, [0, 100], False),  # a ring: maxT >= window + Tn - 1 = 8, 9
    (4, 8, 6, [0, 2], True),  # too short for a ring, but every position fits
    (9, 8, 1, [0, 8], False), (8, 8, 1, [3, 1000], True)], ids=str)
def test_kv_cache_ring_sizes(bk, window, maxT, Tn, pos, ok):
    """Positions past maxT need a window and a ring long enough for it: a ValueError naming the sizes otherwise."""
    B, NH, hs = 2, 2, 16
    kc, vc = bk.zeros((B, NH, maxT, hs)), bk.zeros((B, NH, maxT, hs))
    qkv = bk.zeros((B, Tn, 3 * NH * hs))
    if ok:
        bk.ops.attention_kv_forward(qkv, kc, vc, np.array(pos), window=window)
    else:
        with pytest.raises(ValueError, match=f"max_T={maxT}" + ("" if window is None else ".*window")):
            bk.ops.attention_kv_forward(qkv, kc, vc, np.array(pos), window=window)


@pytest.mark.parametrize("bad,err,match", [
    (dict(scale=0), ValueError, "scale"), (dict(scale=-1.0), ValueError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale"), (dict(scale=float("inf")), ValueError, "scale"),
    (dict(scale="0.1"), TypeError, "scale"), (dict(scale=True), TypeError, "scale"),
    (dict(softcap=0.0), ValueError, "softcap"), (dict(softcap=-50), ValueError, "softcap"),
    (dict(softcap=True), TypeError, "softcap"), (dict(window=0), ValueError, "window"),
    (dict(window=-4), ValueError, "window"), (dict(window=2.0), TypeError, "window"),
    (dict(window=True), TypeError, "window"), (dict(window="8"), TypeError, "window")], ids=str)
def test_attention_bad_options(bk, bad, err, match):
    B, T, NH, hs = 1, 4, 2, 8
    qkv = bk.zeros((B, T, 3 * NH * hs))
    out, lse = bk.ops.attention_forward(qkv, NH)
    cache = [bk.zeros((B, NH, 8, hs)) for _ in range(2)]
    with pytest.raises(err, match=match):
        bk.ops.attention_forward(qkv, NH, **bad)
    with pytest.raises(err, match=match):
        bk.ops.attention_backward(bk.zeros((B, T, NH * hs)), qkv, out, lse, NH, **bad)
    with pytest.raises(err, match=match):
        bk.ops.attention_kv_forward(qkv, *cache, np.zeros(B, np.int32), **bad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_attention_bindings_refuse_bad_options(device):
    """The native kernels' own check (the numbers the wrappers pass): a ValueError naming the argument, no crash."""
    bk = Backend(device)
    mod = fastllm._C if device == "cpu" else fastllm._C.cuda
    B, T, NH, hs = 1, 4, 2, 8
    qkv, out, lse = bk.zeros((B, T, 3 * NH * hs)), bk.zeros((B, T, NH * hs)), bk.zeros((B, NH, T))
    kc, vc, pos = bk.zeros((B, NH, 8, hs)), bk.zeros((B, NH, 8, hs)), bk.ids(np.zeros(B))
    cpu = dict(bf16=False) if device == "cpu" else {}
    for bad, match in [(dict(window=-1), "window"), (dict(scale=-0.5), "scale"), (dict(scale=float("nan")), "scale"),
                       (dict(softcap=-1.0), "softcap"), (dict(softcap=float("inf")), "softcap")]:
        with pytest.raises(ValueError, match=match):
            mod.attention_forward(out, lse, qkv, NH, None, **cpu, **bad)
        with pytest.raises(ValueError, match=match):
            mod.attention_backward(bk.zeros(qkv.shape), out, qkv, out, lse, NH, None, **cpu, **bad)
        with pytest.raises(ValueError, match=match):
            mod.attention_kv_forward(out, kc, vc, qkv, pos, None, **cpu, **bad)


# ---- bad input: numpy arrays on the CPU, DeviceArrays on the GPU


def test_attention_bad_input_cpu():
    qkv = np.zeros((1, 4, 24), np.float32)
    with pytest.raises(TypeError, match="qkv"):
        ops.attention_forward(qkv.astype(np.float64), 2)
    out, lse = ops.attention_forward(qkv, 2)
    dout = np.zeros_like(out)
    with pytest.raises(TypeError, match="qkv"):
        ops.attention_backward(dout, qkv.astype(np.float64), out, lse, 2, dqkv=np.zeros_like(qkv))
    with pytest.raises(TypeError, match="dout"):
        ops.attention_backward(np.zeros(out.shape, np.float64), qkv, out, lse, 2)
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
    with pytest.raises(ValueError, match="lse"):
        ops.attention_backward(dout, qkv, out, lse[:, :1].copy(), 2)
    with pytest.raises(ValueError, match="out"):
        ops.attention_backward(dout, qkv, out[:, :3].copy(), lse, 2)
    with pytest.raises(ValueError, match="dout"):
        ops.attention_backward(dout[:, :, :4].copy(), qkv, out, lse, 2)
    with pytest.raises(ValueError, match="dqkv"):
        ops.attention_backward(dout, qkv, out, lse, 2, dqkv=np.zeros((1, 4, 23), np.float32))


def test_kv_cache_no_new_tokens_or_rows_cpu():
    """Zero new tokens or zero rows: empty outputs and an unchanged cache (was a division by zero, SIGFPE)."""
    kc, vc = np.ones((1, 2, 8, 4), np.float32), np.ones((1, 2, 8, 4), np.float32)
    assert ops.attention_kv_forward(np.zeros((1, 0, 24), np.float32), kc, vc, np.zeros(1, np.int32)).shape == (1, 0, 8)
    assert (kc == 1).all() and (vc == 1).all()
    empty = np.zeros((0, 2, 8, 4), np.float32)
    assert ops.attention_kv_forward(np.zeros((0, 1, 24), np.float32), empty, empty.copy(),
                                    np.zeros(0, np.int32)).shape == (0, 1, 8)


@pytest.mark.parametrize("part", ["q", "k", "v"])
def test_attention_nan_propagates_like_the_kv_kernel_cpu(part, simd):
    """A NaN in q, k or v reaches every output row that attends to it, in out and (q, k) lse, as in the
    KV-cache kernel decoding token by token: the vectorized exp2 used to turn NaN scores into ~0 weights (finite
    output, lse -inf)."""
    B, T, C, NH = 2, 70, 64, 2
    hs = C // NH
    qkv = np.random.default_rng(0).standard_normal((B, T, 3 * C), dtype=np.float32)
    t, col = 5, {"q": 0, "k": C, "v": 2 * C}[part] + 3  # head 0, position t
    qkv[0, t, col] = np.nan
    out, lse = ops.attention_forward(qkv, NH)
    kc, vc = np.zeros((B, NH, T, hs), np.float32), np.zeros((B, NH, T, hs), np.float32)
    kv_out = np.concatenate([ops.attention_kv_forward(qkv[:, i:i + 1].copy(), kc, vc, np.full(B, i, np.int32))
                             for i in range(T)], axis=1)
    reach = np.isnan(kv_out[0, :, :hs]).any(-1)  # rows of head 0 the KV kernel makes NaN
    assert reach.sum() == (1 if part == "q" else T - t)
    assert np.isnan(out[0, :, :hs]).any(-1)[reach].all()
    if part != "v":
        assert np.isnan(lse[0, 0])[reach].all()
    assert np.isfinite(out[1]).all() and np.isfinite(lse[1]).all() and np.isfinite(out[0, :, hs:]).all()
    assert not np.isinf(lse).any()


def test_attention_bad_sizes_and_arguments_cpu():
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


@pytest.mark.cuda
def test_attention_bad_input_cuda():
    B, T, NH, hs = 2, 5, 2, 16
    C = NH * hs
    bf = "bfloat16"
    qkv = cuda.zeros((B, T, 3 * C), bf)
    out, lse = cuda.zeros((B, T, C), bf), cuda.zeros((B, NH, T))
    # forward
    with pytest.raises(TypeError, match="qkv"):
        cuda.attention_forward(cuda.zeros((B, T, 3 * C), "int32"), NH, out=out, lse=lse)
    with pytest.raises(TypeError, match="out"):
        cuda.attention_forward(qkv, NH, out=cuda.zeros((B, T, C)), lse=lse)
    with pytest.raises(TypeError, match="lse"):
        cuda.attention_forward(qkv, NH, out=out, lse=cuda.zeros((B, NH, T), bf))
    with pytest.raises(ValueError, match="qkv"):
        cuda.attention_forward(cuda.zeros((B * T, 3 * C), bf), NH)
    with pytest.raises(ValueError, match=r"qkv last dim .* got 97"):
        cuda.attention_forward(cuda.zeros((B, T, 3 * C + 1), bf), NH, out=out, lse=lse)
    with pytest.raises(ValueError, match="n_head"):
        cuda.attention_forward(qkv, 3, out=out, lse=lse)
    with pytest.raises(ValueError, match="n_head"):
        cuda.attention_forward(qkv, 0, out=out, lse=lse)
    with pytest.raises(ValueError, match="head size"):
        cuda.attention_forward(cuda.zeros((1, 2, 3 * 512), bf), 1)
    with pytest.raises(ValueError, match="out"):
        cuda.attention_forward(qkv, NH, out=cuda.zeros((B, T + 1, C), bf), lse=lse)
    with pytest.raises(ValueError, match="lse"):
        cuda.attention_forward(qkv, NH, out=out, lse=cuda.zeros((B, T, NH)))
    packed = cuda.zeros((B, T, 4 * C), bf)  # out as a view inside qkv's memory
    with pytest.raises(ValueError, match="overlap"):
        cuda.attention_forward(packed.view(0, (B, T, 3 * C)), NH, out=packed.view(0, (B, T, C)), lse=lse)
    # backward
    dqkv, dout = cuda.zeros((B, T, 3 * C), bf), cuda.zeros((B, T, C), bf)
    with pytest.raises(TypeError, match="dqkv"):
        cuda.attention_backward(dout, qkv, out, lse, NH, dqkv=cuda.zeros((B, T, 3 * C)))
    with pytest.raises(TypeError, match="dout"):
        cuda.attention_backward(cuda.zeros((B, T, C)), qkv, out, lse, NH, dqkv=dqkv)
    with pytest.raises(TypeError, match="lse"):
        cuda.attention_backward(dout, qkv, out, cuda.zeros((B, NH, T), bf), NH, dqkv=dqkv)
    with pytest.raises(ValueError, match="dout"):
        cuda.attention_backward(cuda.zeros((B, T, C + 1), bf), qkv, out, lse, NH, dqkv=dqkv)
    with pytest.raises(ValueError, match="out"):
        cuda.attention_backward(dout, qkv, cuda.zeros((B, T - 1, C), bf), lse, NH, dqkv=dqkv)
    with pytest.raises(ValueError, match="dqkv"):
        cuda.attention_backward(dout, qkv, out, lse, NH, dqkv=cuda.zeros((B, T, C), bf))
    with pytest.raises(ValueError, match="overlap"):
        cuda.attention_backward(dout, qkv, out, lse, NH, dqkv=qkv)
    # KV cache
    maxT, Tn = 16, 3
    q1 = cuda.zeros((B, Tn, 3 * C), bf)
    kc, vc = cuda.zeros((B, NH, maxT, hs), bf), cuda.zeros((B, NH, maxT, hs), bf)
    o1, pos = cuda.zeros((B, Tn, C), bf), cuda.zeros((B,), "int32")
    cuda.attention_kv_forward(q1, kc, vc, pos, out=o1)  # valid
    with pytest.raises(TypeError, match="pos"):
        cuda.attention_kv_forward(q1, kc, vc, cuda.zeros((B,)), out=o1)
    with pytest.raises(TypeError, match="vcache"):
        cuda.attention_kv_forward(q1, kc, cuda.zeros((B, NH, maxT, hs)), pos, out=o1)
    with pytest.raises(TypeError, match="out"):
        cuda.attention_kv_forward(q1, kc, vc, pos, out=cuda.zeros((B, Tn, C)))
    with pytest.raises(ValueError, match="pos"):
        cuda.attention_kv_forward(q1, kc, vc, cuda.zeros((B + 1,), "int32"), out=o1)
    with pytest.raises(ValueError, match="kcache"):
        cuda.attention_kv_forward(q1, cuda.zeros((B, NH, maxT), bf), vc, pos, out=o1)
    with pytest.raises(ValueError, match="kcache"):
        cuda.attention_kv_forward(q1, cuda.zeros((B, NH, maxT, hs + 1), bf), vc, pos, out=o1)
    with pytest.raises(ValueError, match="vcache"):
        cuda.attention_kv_forward(q1, kc, cuda.zeros((B, NH, maxT + 1, hs), bf), pos, out=o1)
    with pytest.raises(ValueError, match="out"):
        cuda.attention_kv_forward(q1, kc, vc, pos, out=cuda.zeros((B, Tn, C + 2), bf))
    with pytest.raises(ValueError, match="max_T"):
        cuda.attention_kv_forward(cuda.zeros((B, maxT + 1, 3 * C), bf), kc, vc, pos)
    with pytest.raises(ValueError, match="overlap"):
        cuda.attention_kv_forward(q1, kc, kc, pos, out=o1)
