"""RoPE (ops.rope_* / cuda.rope_*) on the packed qkv buffer, and its tables (fastllm.rope), vs tests/reference.py
(float64 rotation), transformers' LlamaRotaryEmbedding / apply_rotary_pos_emb (with torch autograd), on both
backends: rotate-half layout, rope_theta, per-row start positions (the KV cache), partial rotary dims, Llama 3's
rope_scaling, grouped KV heads.

Tolerances: float32 3e-6 relative to max |x| (one rotation: a few ulp); bfloat16 8e-3 (the output is stored in bf16).
The inverse frequencies are the float32 nearest theta^(-2i/d) (float64, rounded once), within an ulp of HF's: HF
computes them with torch's float32 pow, whose last bit depends on the CPU (Zen 4's AVX-512 pow and Zen 3's AVX2 one
differ), so no fixed float32 formula equals it on every machine. Tables and rotations are compared on HF's own
frequencies (cos/sin to 1 ulp)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import BACKENDS, CASES, acc_floor, down, get, rel_err, rounded, up

from fastllm import rope

TOL = {"float32": 3e-6, "bfloat16": 8e-3}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}


def _hf_inv_freq(head_dim, theta, scaling=None, partial=1.0):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    if partial != 1.0:
        params["partial_rotary_factor"] = partial
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                   rope_parameters=params, max_position_embeddings=131072)
    rope_type = cfg.rope_parameters["rope_type"]
    if rope_type == "default":
        emb = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
        return emb.inv_freq.numpy(), emb
    return ROPE_INIT_FUNCTIONS[rope_type](cfg)[0].numpy(), None


@pytest.mark.parametrize("head_dim,theta,scaling", [(64, 10000.0, None), (128, 500000.0, LLAMA3), (64, 1e6, None),
                                                     (32, 10000.0, {"rope_type": "linear", "factor": 4.0}),
                                                     (64, 500000.0, {**LLAMA3, "factor": 32.0})])
def test_inv_freq_equals_transformers(head_dim, theta, scaling):
    want, _ = _hf_inv_freq(head_dim, theta, scaling)
    got = rope.inv_freq(head_dim, theta, scaling)
    assert got.dtype == np.float32 and got.shape == want.shape
    if scaling:  # llama3's smoothing subtracts nearby numbers: HF's ulp grows to a few
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    else:  # within an ulp of HF's, and the correctly rounded value
        np.testing.assert_array_max_ulp(got, want, maxulp=1)
        i = np.arange(0, head_dim, 2, dtype=np.float64)
        np.testing.assert_array_equal(got, (1.0 / theta ** (i / head_dim)).astype(np.float32))


YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


@pytest.mark.parametrize("head_dim,theta,scaling", [
    (128, 1e6, YARN),  # Qwen2.5's / Qwen3's long-context setting
    (64, 10000.0, {**YARN, "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16, "beta_slow": 2}),
    (64, 500000.0, {**YARN, "truncate": False}),
    (64, 10000.0, {**YARN, "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 0.707}),  # DeepSeek's temperature
    (32, 10000.0, {**YARN, "attention_factor": 1.5}),
    (64, 1e6, {"rope_type": "dynamic", "factor": 2.0}),  # the default RoPE within max_position_embeddings
])
def test_yarn_and_dynamic_equal_transformers(head_dim, theta, scaling):
    """YaRN's frequencies and cos/sin factor, and dynamic NTK's frequencies below max_position_embeddings (131072
    here, as fastllm's context never exceeds it), equal transformers'."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    want, _ = _hf_inv_freq(head_dim, theta, scaling)
    np.testing.assert_allclose(rope.inv_freq(head_dim, theta, scaling), want, rtol=2e-6, atol=0)
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                   rope_parameters={"rope_theta": theta, **scaling}, max_position_embeddings=131072)
    factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg)[1]
    assert rope.attention_scaling(scaling) == pytest.approx(factor, rel=1e-12)
    assert (factor != 1.0) == (scaling["rope_type"] == "yarn")  # the temperature is tested, not only 1.0


def test_tables_equal_transformers():
    torch = pytest.importorskip("torch")
    _, emb = _hf_inv_freq(64, 10000.0)
    pos = torch.arange(5000)[None]
    cos_t, sin_t = emb(torch.zeros(1, dtype=torch.float32), pos)
    cos, sin = rope.rope_tables(emb.inv_freq.numpy(), 5000)  # HF's frequencies (see the module doc)
    # HF repeats the R2 columns twice (cat(freqs, freqs)); float32 cos/sin within an ulp
    np.testing.assert_allclose(np.concatenate([cos, cos], -1), cos_t[0].numpy(), rtol=0, atol=1.2e-7)
    np.testing.assert_allclose(np.concatenate([sin, sin], -1), sin_t[0].numpy(), rtol=0, atol=1.2e-7)


def test_rope_tables_bad_input():
    with pytest.raises(ValueError, match="longrope"):
        rope.inv_freq(64, scaling={"rope_type": "longrope", "factor": 4.0})
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        rope.inv_freq(64, scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="attention_factor"):
        rope.attention_scaling({**YARN, "attention_factor": -1.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        rope.inv_freq(64, scaling={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ValueError, match="theta"):
        rope.inv_freq(64, theta=-1.0)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        rope.inv_freq(64, partial_rotary_factor=0.01)
    with pytest.raises(ValueError, match="max_pos"):
        rope.rope_tables(rope.inv_freq(8), 0)


def _angles(B, T, pos, freq):
    p = np.zeros(B, np.int64) if pos is None else np.asarray(pos)
    return np.stack([reference.rope_angles(p[b] + np.arange(T), freq) for b in range(B)])


# (B, T, NH, NKV, hs, partial rotary factor): T = 1, primes, MQA, NKV = NH, head sizes not multiples of 16
SHAPES = [(1, 1, 1, 1, 2, 1.0), (2, 7, 4, 2, 16, 1.0), (1, 13, 3, 3, 64, 1.0), (3, 5, 4, 1, 24, 0.5),
          (2, 33, 2, 2, 128, 1.0), (1, 9, 6, 3, 80, 0.25)]


@pytest.mark.parametrize("B,T,NH,NKV,hs,partial", SHAPES)
@pytest.mark.parametrize("name,dtype", CASES)
def test_rope_matches_reference(rng, name, dtype, B, T, NH, NKV, hs, partial):
    bk = get(name)
    W = (NH + 2 * NKV) * hs
    freq = rope.inv_freq(hs, 10000.0, partial_rotary_factor=partial)
    cos, sin = rope.rope_tables(freq, 64)
    pos = rng.integers(0, 64 - T + 1, B)
    qkv = rounded(rng.standard_normal((B, T, W)), dtype)
    ang = _angles(B, T, pos, freq)
    c, s = up(name, cos), up(name, sin)
    out = bk.rope_forward(up(name, qkv, dtype), c, s, NH, pos=pos, n_kv_head=NKV)
    got, ref = down(name, out), reference.rope_forward(qkv, ang, NH, NKV)
    assert rel_err(got, ref) <= TOL[dtype]
    np.testing.assert_array_equal(got[..., (NH + NKV) * hs:], qkv[..., (NH + NKV) * hs:])  # v passes through
    # in place, and without pos (positions 0..T-1)
    xd = up(name, qkv, dtype)
    bk.rope_forward(xd, c, s, NH, out=xd, n_kv_head=NKV)
    assert rel_err(down(name, xd), reference.rope_forward(qkv, _angles(B, T, None, freq), NH, NKV)) <= TOL[dtype]
    # backward: accumulates into dqkv; in place when dqkv is dout
    dout = rounded(rng.standard_normal((B, T, W)), dtype)
    d0 = rounded(rng.standard_normal((B, T, W)), dtype)
    ref_d = reference.rope_forward(dout, ang, NH, NKV, inverse=True)
    d = bk.rope_backward(up(name, dout, dtype), c, s, NH, pos=pos, dqkv=up(name, d0, dtype), n_kv_head=NKV)
    assert rel_err(down(name, d) - d0, ref_d, acc_floor(d0, dtype)) <= 2 * TOL[dtype]
    dd = up(name, dout, dtype)
    bk.rope_backward(dd, c, s, NH, pos=pos, dqkv=dd, n_kv_head=NKV)
    assert rel_err(down(name, dd), ref_d) <= TOL[dtype]


@pytest.mark.parametrize("name", BACKENDS)
def test_rope_chunks_equal_whole(rng, name):
    """Prefill in one call == chunks at their start positions (what the KV cache does), rows at different pos."""
    bk = get(name)
    NH, NKV, hs, T = 4, 2, 32, 12
    cos, sin = (up(name, a) for a in rope.rope_tables(rope.inv_freq(hs, 1e6), 40))
    qkv = rng.standard_normal((2, T, (NH + 2 * NKV) * hs)).astype(np.float32)
    whole = down(name, bk.rope_forward(up(name, qkv), cos, sin, NH, pos=np.array([0, 20]), n_kv_head=NKV))
    for t0, t1 in [(0, 5), (5, 6), (6, 12)]:
        part = bk.rope_forward(up(name, qkv[:, t0:t1]), cos, sin, NH, pos=np.array([t0, 20 + t0]), n_kv_head=NKV)
        np.testing.assert_array_equal(down(name, part), whole[:, t0:t1])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("scaling", [None, LLAMA3])
def test_rope_vs_transformers(rng, name, scaling):
    """transformers' apply_rotary_pos_emb (rotate_half) on q and k with cos/sin from its rotary embedding, gradient
    by torch autograd."""
    torch = pytest.importorskip("torch")
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    bk = get(name)
    B, T, NH, NKV, hs = 2, 9, 4, 2, 64
    hf_freq, _ = _hf_inv_freq(hs, 500000.0, scaling)
    pos = np.array([3, 100])
    position_ids = torch.from_numpy(pos[:, None] + np.arange(T)[None])
    freqs = position_ids[..., None].float() * torch.from_numpy(hf_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos_t, sin_t = emb.cos(), emb.sin()
    qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs)).astype(np.float32)
    x = torch.from_numpy(qkv.copy()).view(B, T, NH + 2 * NKV, hs).transpose(1, 2).requires_grad_()
    q, k = llama.apply_rotary_pos_emb(x[:, :NH], x[:, NH:NH + NKV], cos_t, sin_t)
    y = torch.cat([q, k, x[:, NH + NKV:]], 1).transpose(1, 2).reshape(B, T, -1)
    dout = rng.standard_normal(y.shape).astype(np.float32)
    y.backward(torch.from_numpy(dout))
    np.testing.assert_allclose(rope.inv_freq(hs, 500000.0, scaling), hf_freq, rtol=1e-6, atol=0)
    cos, sin = (up(name, a) for a in rope.rope_tables(hf_freq, 128))  # the rotation on HF's frequencies
    out = bk.rope_forward(up(name, qkv), cos, sin, NH, pos=pos, n_kv_head=NKV)
    np.testing.assert_allclose(down(name, out), y.detach().numpy(), rtol=0, atol=2e-6)
    d = bk.rope_backward(up(name, dout), cos, sin, NH, pos=pos, n_kv_head=NKV)
    np.testing.assert_allclose(down(name, d), x.grad.transpose(1, 2).reshape(B, T, -1).numpy(), rtol=0, atol=2e-6)


def test_rope_cpu_paths(rng, threads, simd):
    NH, NKV, hs = 8, 2, 64
    freq = rope.inv_freq(hs)
    cos, sin = rope.rope_tables(freq, 300)
    qkv = rng.standard_normal((2, 300, (NH + 2 * NKV) * hs)).astype(np.float32)  # above the parallel threshold
    ops = get("cpu")
    got = ops.rope_forward(qkv, cos, sin, NH, pos=np.array([0, 0]), n_kv_head=NKV)
    assert rel_err(got, reference.rope_forward(qkv, _angles(2, 300, None, freq), NH, NKV)) <= TOL["float32"]


@pytest.mark.parametrize("name", BACKENDS)
def test_rope_bad_input(rng, name):
    bk = get(name)
    cos, sin = (up(name, a) for a in rope.rope_tables(rope.inv_freq(16), 10))
    qkv = up(name, rng.standard_normal((2, 4, 8 * 16)).astype(np.float32))  # NH = 4, NKV = 2
    with pytest.raises(ValueError, match="pos"):
        bk.rope_forward(qkv, cos, sin, 4, pos=np.array([0, 7]), n_kv_head=2)  # 7 + 4 > 10 rows
    with pytest.raises(ValueError, match="pos"):
        bk.rope_forward(qkv, cos, sin, 4, pos=np.array([-1, 0]), n_kv_head=2)
    with pytest.raises(ValueError, match="pos|tables"):
        bk.rope_forward(up(name, rng.standard_normal((2, 11, 128)).astype(np.float32)), cos, sin, 4, n_kv_head=2)
    with pytest.raises(ValueError, match="n_kv_head"):
        bk.rope_forward(qkv, cos, sin, 4, n_kv_head=3)
    with pytest.raises(ValueError, match="qkv"):
        bk.rope_forward(qkv, cos, sin, 3, n_kv_head=1)  # 5 heads do not divide 128
    big = [up(name, a) for a in rope.rope_tables(rope.inv_freq(64), 10)]  # rotary dim 64 > hs = 16
    with pytest.raises(ValueError, match="cos"):
        bk.rope_forward(qkv, big[0], big[1], 4, n_kv_head=2)
    with pytest.raises(ValueError, match="sin"):
        bk.rope_forward(qkv, cos, up(name, np.zeros((10, 7), np.float32)), 4, n_kv_head=2)
    with pytest.raises(ValueError, match="out"):
        bk.rope_forward(qkv, cos, sin, 4, out=up(name, np.zeros((2, 4, 64), np.float32)), n_kv_head=2)
    with pytest.raises(TypeError, match="pos"):
        bk.rope_forward(qkv, cos, sin, 4, pos=np.array([0.0, 1.0]), n_kv_head=2)
    if name == "cpu":  # a shifted view of the input as output would read what it already wrote
        buf = rng.standard_normal(2 * 4 * 128 + 16).astype(np.float32)
        with pytest.raises(ValueError, match="out"):
            bk.rope_forward(buf[:-16].reshape(2, 4, 128), cos, sin, 4, out=buf[16:].reshape(2, 4, 128), n_kv_head=2)
