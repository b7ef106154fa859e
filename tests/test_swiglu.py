"""The gated MLP activations SwiGLU (Llama: silu(gate) * up) and GeGLU (Gemma: gelu_tanh(gate) * up, GELU's tanh
approximation), and ReLU^2, forward/backward (ops / cuda .swiglu_*, .geglu_*, .relu2_*) vs tests/reference.py
(float64), torch autograd and transformers' LlamaMLP / GemmaMLP (whose gate_proj/up_proj become one fused matmul
with [gate | up] output halves), on both backends. Every gated test runs for both activations (`act`).

Tolerances (max |got - ref| / max |ref|): float32 2e-6 (silu and gelu_tanh through a polynomial exp and a true
division on the CPU, __expf on the GPU), 1e-5 for GeGLU on the GPU (__expf's error grows with |z| = |2u|, ~20 ulp at
gate = -5, where gelu is tiny: a one-element output is off by ~3e-6); bfloat16 8e-3 (inputs rounded to bf16 first,
outputs stored in bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import BACKENDS, CASES, acc_floor, down, get, rel_err, rounded, up

TOL = {"float32": 2e-6, "bfloat16": 8e-3}
ACTS = ["swiglu", "geglu"]


def tol(act, name, dtype):
    return 1e-5 if (act, name, dtype) == ("geglu", "cuda", "float32") else TOL[dtype]


def fwd(bk, act):
    return getattr(bk, f"{act}_forward")


def bwd(bk, act):
    return getattr(bk, f"{act}_backward")


def ref_fwd(act, gate_up):
    return getattr(reference, f"{act}_forward")(gate_up)


def ref_bwd(act, dout, gate_up):
    return getattr(reference, f"{act}_backward")(dout, gate_up)


# H = 1, H odd and not a multiple of 8 or 16, T = 1, 1 row, many rows above the CPU's parallel threshold (N*H >= 64 Ki)
@pytest.mark.parametrize("shape", [(1, 2), (5, 34), (3, 1, 2 * 64), (1, 2 * 37), (2, 7, 2 * 100), (64, 2 * 771),
                                   (1024, 2 * 72)])
@pytest.mark.parametrize("name,dtype", CASES)
@pytest.mark.parametrize("act", ACTS)
def test_gated_matches_reference(rng, act, name, dtype, shape):
    bk, eps = get(name), tol(act, name, dtype)
    gu = rounded(rng.standard_normal(shape) * 3, dtype)
    out = fwd(bk, act)(up(name, gu, dtype))
    assert rel_err(down(name, out), ref_fwd(act, gu)) <= eps
    dout = rounded(rng.standard_normal((*shape[:-1], shape[-1] // 2)), dtype)
    ref = ref_bwd(act, dout, gu)
    assert rel_err(down(name, bwd(bk, act)(up(name, dout, dtype), up(name, gu, dtype))), ref) <= 2 * eps
    d0 = rounded(rng.standard_normal(shape), dtype)  # accumulates (+=)
    d = bwd(bk, act)(up(name, dout, dtype), up(name, gu, dtype), dgate_up=up(name, d0, dtype))
    assert rel_err(down(name, d), d0 + ref) <= 2 * eps


def test_geglu_is_not_swiglu(rng):
    """The references (and kernels) of the two activations differ by far more than the tolerance, so each test
    above tells them apart."""
    gu = (rng.standard_normal((4, 2 * 40)) * 3).astype(np.float32)
    assert rel_err(reference.geglu_forward(gu), reference.swiglu_forward(gu)) > 0.01
    assert rel_err(get("cpu").geglu_forward(gu), get("cpu").swiglu_forward(gu)) > 0.01


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_gated_extremes(name, act):
    """silu and gelu_tanh saturate cleanly: large |gate| gives 0 or gate, never inf/NaN, also in the backward."""
    bk = get(name)
    g = np.array([-3e38, -1e30, -1000, -100, -20, -1e-30, 0, 1e-30, 20, 100, 1000, 1e30, 3e38], np.float32)
    gu = np.concatenate([g, np.ones_like(g)])[None]
    out = down(name, fwd(bk, act)(up(name, gu)))
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out[0], ref_fwd(act, gu)[0], rtol=1e-6, atol=1e-30)
    d = down(name, bwd(bk, act)(up(name, np.ones((1, g.size), np.float32)), up(name, gu)))
    assert np.isfinite(d).all()
    np.testing.assert_allclose(d, ref_bwd(act, np.ones((1, g.size)), gu), rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("act", ACTS)
def test_gated_cpu_paths(rng, threads, simd, act):
    """Every SIMD level (AVX-512 masked tails, AVX2 + scalar tails, scalar) on 1 and 2 threads; N*H above the
    parallel threshold."""
    gu = (rng.standard_normal((90, 2 * 771)) * 3).astype(np.float32)
    ops = get("cpu")
    assert rel_err(fwd(ops, act)(gu), ref_fwd(act, gu)) <= TOL["float32"]
    dout = rng.standard_normal((90, 771)).astype(np.float32)
    assert rel_err(bwd(ops, act)(dout, gu), ref_bwd(act, dout, gu)) <= 2 * TOL["float32"]


@pytest.mark.parametrize("shape", [(1, 2), (3, 2 * 7), (2, 5, 2 * 33)])
@pytest.mark.parametrize("name", BACKENDS)
def test_geglu_vs_torch(rng, name, shape):
    """torch autograd of F.gelu(gate, approximate="tanh") * up (float64) for the output and both gradient halves."""
    torch = pytest.importorskip("torch")
    bk = get(name)
    gu = (rng.standard_normal(shape) * 3).astype(np.float32)
    dout = rng.standard_normal((*shape[:-1], shape[-1] // 2)).astype(np.float32)
    gut = torch.from_numpy(gu.astype(np.float64)).requires_grad_()
    g, u = gut.chunk(2, dim=-1)
    yt = torch.nn.functional.gelu(g, approximate="tanh") * u
    yt.backward(torch.from_numpy(dout.astype(np.float64)))
    eps = tol("geglu", name, "float32")
    assert rel_err(down(name, bk.geglu_forward(up(name, gu))), yt.detach().numpy()) <= eps
    assert rel_err(down(name, bk.geglu_backward(up(name, dout), up(name, gu))), gut.grad.numpy()) <= 2 * eps


def _hf_mlp(family: str):
    """transformers' LlamaMLP (silu) or GemmaMLP (gelu_pytorch_tanh), C = 24, H = 40, random weights."""
    transformers = pytest.importorskip("transformers")
    C, H = 24, 40
    if family == "llama":
        cfg = transformers.LlamaConfig(hidden_size=C, intermediate_size=H, num_attention_heads=2, hidden_act="silu",
                                       mlp_bias=False)
        return transformers.models.llama.modeling_llama.LlamaMLP(cfg)
    cfg = transformers.GemmaConfig(hidden_size=C, intermediate_size=H, num_attention_heads=2, num_key_value_heads=1,
                                   head_dim=12)
    assert cfg.hidden_act == "gelu_pytorch_tanh"  # Gemma's default: GELU's tanh approximation
    return transformers.models.gemma.modeling_gemma.GemmaMLP(cfg)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("family,act", [("llama", "swiglu"), ("gemma", "geglu")])
def test_gated_is_hf_mlp(rng, name, family, act):
    """transformers' LlamaMLP / GemmaMLP = down(act(gate(x)) * up(x)): the fused weight concat([gate_proj, up_proj])
    with matmul -> swiglu / geglu -> matmul gives its output and all its gradients (torch autograd)."""
    torch = pytest.importorskip("torch")
    mlp = _hf_mlp(family)
    bk = get(name)
    N, C = 7, mlp.gate_proj.in_features
    x = rng.standard_normal((N, C)).astype(np.float32)
    dy = rng.standard_normal((N, C)).astype(np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = mlp(xt)
    yt.backward(torch.from_numpy(dy))
    w_gu = np.concatenate([mlp.gate_proj.weight.detach().numpy(), mlp.up_proj.weight.detach().numpy()])
    w_down = mlp.down_proj.weight.detach().numpy()
    xd, wgu, wdn = up(name, x), up(name, w_gu), up(name, w_down)
    gu = bk.matmul_forward(xd, wgu)
    h = fwd(bk, act)(gu)
    y = bk.matmul_forward(h, wdn)
    np.testing.assert_allclose(down(name, y), yt.detach().numpy(), rtol=1e-4, atol=1e-5)
    dh, dw_down, _ = bk.matmul_backward(up(name, dy), h, wdn, need_bias=False)
    dgu = bwd(bk, act)(dh, gu)
    dx, dw_gu, _ = bk.matmul_backward(dgu, xd, wgu, need_bias=False)
    np.testing.assert_allclose(down(name, dx), xt.grad.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(down(name, dw_down), mlp.down_proj.weight.grad.numpy(), rtol=1e-4, atol=1e-5)
    want = np.concatenate([mlp.gate_proj.weight.grad.numpy(), mlp.up_proj.weight.grad.numpy()])
    np.testing.assert_allclose(down(name, dw_gu), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(1,), (5, 17), (3, 7, 100), (64, 1543)])
@pytest.mark.parametrize("name,dtype", CASES)
def test_relu2_matches_reference(rng, name, dtype, shape):
    bk, tol = get(name), TOL[dtype]
    x = rounded(rng.standard_normal(shape) * 2, dtype)
    x.reshape(-1)[0] = 0.0
    out = bk.relu2_forward(up(name, x, dtype))
    assert rel_err(down(name, out), reference.relu2_forward(x)) <= tol
    dout, d0 = rounded(rng.standard_normal(shape), dtype), rounded(rng.standard_normal(shape), dtype)
    d = bk.relu2_backward(up(name, dout, dtype), up(name, x, dtype), dx=up(name, d0, dtype))
    assert rel_err(down(name, d) - d0, reference.relu2_backward(dout, x), acc_floor(d0, dtype)) <= 2 * tol
    xd = up(name, x, dtype)  # in place
    bk.relu2_forward(xd, out=xd)
    np.testing.assert_array_equal(down(name, xd), down(name, out))


@pytest.mark.parametrize("name", BACKENDS)
def test_relu2_vs_torch(rng, name):
    """nanochat's MLP activation F.relu(x).square(), gradient by autograd."""
    torch = pytest.importorskip("torch")
    bk = get(name)
    x, dout = rng.standard_normal((2, 5, 33)).astype(np.float32), rng.standard_normal((2, 5, 33)).astype(np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = torch.nn.functional.relu(xt).square()
    yt.backward(torch.from_numpy(dout))
    np.testing.assert_allclose(down(name, bk.relu2_forward(up(name, x))), yt.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(down(name, bk.relu2_backward(up(name, dout), up(name, x))), xt.grad.numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_gated_bad_input(rng, name, act):
    bk = get(name)
    f, b = fwd(bk, act), bwd(bk, act)
    gu = up(name, rng.standard_normal((4, 10)).astype(np.float32))
    with pytest.raises(ValueError, match="gate_up"):
        f(up(name, np.zeros((4, 9), np.float32)))  # odd last axis: not [gate | up]
    with pytest.raises(ValueError, match="out"):
        f(gu, out=up(name, np.zeros((4, 10), np.float32)))
    with pytest.raises(ValueError, match="dout"):
        b(up(name, np.zeros((4, 4), np.float32)), gu)
    with pytest.raises(ValueError, match="dgate_up"):
        b(up(name, np.zeros((4, 5), np.float32)), gu, dgate_up=up(name, np.zeros((4, 5), np.float32)))
    if name == "cpu":
        with pytest.raises(TypeError, match="gate_up"):
            f(np.zeros((4, 10)))  # float64
        with pytest.raises(TypeError, match="dout"):
            b(np.zeros((4, 5)), np.zeros((4, 10), np.float32))
        with pytest.raises(ValueError, match="out"):
            f(np.zeros((4, 10), np.float32), out=np.zeros((4, 10), np.float32)[:, ::2])  # strided
    else:
        with pytest.raises(TypeError, match="out"):
            f(gu, out=bk.zeros((4, 5), "bfloat16"))  # float32 gate_up, bf16 out


@pytest.mark.parametrize("name", BACKENDS)
def test_relu2_bad_input(rng, name):
    bk = get(name)
    gu = up(name, rng.standard_normal((4, 10)).astype(np.float32))
    with pytest.raises(ValueError, match="dout"):
        bk.relu2_backward(up(name, np.zeros((4, 9), np.float32)), gu)
    if name == "cpu":
        with pytest.raises(TypeError, match="x"):
            bk.relu2_forward(np.zeros((4, 10), np.float16))
