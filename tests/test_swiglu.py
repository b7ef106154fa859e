"""SwiGLU and ReLU^2 forward/backward (ops / cuda .swiglu_*, .relu2_*) vs tests/reference.py (float64), torch autograd
and transformers' LlamaMLP (whose gate_proj/up_proj become one fused matmul with [gate | up] output halves), on
both backends.

Tolerances (max |got - ref| / max |ref|): float32 2e-6 (silu through a polynomial exp, a true division); bfloat16
8e-3 (inputs rounded to bf16 first, outputs stored in bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import BACKENDS, CASES, acc_floor, down, get, rel_err, rounded, up

TOL = {"float32": 2e-6, "bfloat16": 8e-3}


# H = 1, H not a multiple of 8 or 16, T = 1, (64, 2 * 771) above the CPU's parallel threshold
@pytest.mark.parametrize("shape", [(1, 2), (5, 34), (3, 1, 2 * 64), (2, 7, 2 * 100), (64, 2 * 771)])
@pytest.mark.parametrize("name,dtype", CASES)
def test_swiglu_matches_reference(rng, name, dtype, shape):
    bk, tol = get(name), TOL[dtype]
    gu = rounded(rng.standard_normal(shape) * 3, dtype)
    out = bk.swiglu_forward(up(name, gu, dtype))
    assert rel_err(down(name, out), reference.swiglu_forward(gu)) <= tol
    dout = rounded(rng.standard_normal((*shape[:-1], shape[-1] // 2)), dtype)
    d0 = rounded(rng.standard_normal(shape), dtype)
    d = bk.swiglu_backward(up(name, dout, dtype), up(name, gu, dtype), dgate_up=up(name, d0, dtype))
    assert rel_err(down(name, d) - d0, reference.swiglu_backward(dout, gu), acc_floor(d0, dtype)) <= 2 * tol


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")
@pytest.mark.parametrize("name", BACKENDS)
def test_swiglu_extremes(name):
    """silu saturates cleanly: large |gate| gives 0 or gate, never inf/NaN, also in the backward."""
    bk = get(name)
    g = np.array([-1e30, -1000, -100, -20, -1e-30, 0, 1e-30, 20, 100, 1000, 1e30], np.float32)
    gu = np.concatenate([g, np.ones_like(g)])[None]
    out = down(name, bk.swiglu_forward(up(name, gu)))
    np.testing.assert_allclose(out[0], reference.swiglu_forward(gu)[0], rtol=1e-6, atol=1e-30)
    d = down(name, bk.swiglu_backward(up(name, np.ones((1, g.size), np.float32)), up(name, gu)))
    assert np.isfinite(d).all()
    np.testing.assert_allclose(d, reference.swiglu_backward(np.ones((1, g.size)), gu), rtol=1e-5, atol=1e-30)


def test_swiglu_cpu_paths(rng, threads, simd):
    gu = (rng.standard_normal((70, 2 * 771)) * 3).astype(np.float32)
    ops = get("cpu")
    assert rel_err(ops.swiglu_forward(gu), reference.swiglu_forward(gu)) <= TOL["float32"]
    dout = rng.standard_normal((70, 771)).astype(np.float32)
    assert rel_err(ops.swiglu_backward(dout, gu), reference.swiglu_backward(dout, gu)) <= 2 * TOL["float32"]


@pytest.mark.parametrize("name", BACKENDS)
def test_swiglu_is_llama_mlp(rng, name):
    """transformers' LlamaMLP = down(silu(gate(x)) * up(x)): the fused weight concat([gate_proj, up_proj]) with
    matmul -> swiglu -> matmul gives its output and all its gradients (torch autograd)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    bk = get(name)
    C, H, N = 24, 40, 7
    cfg = transformers.LlamaConfig(hidden_size=C, intermediate_size=H, num_attention_heads=2, hidden_act="silu",
                                   mlp_bias=False)
    mlp = transformers.models.llama.modeling_llama.LlamaMLP(cfg)
    x = rng.standard_normal((N, C)).astype(np.float32)
    dy = rng.standard_normal((N, C)).astype(np.float32)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = mlp(xt)
    yt.backward(torch.from_numpy(dy))
    w_gu = np.concatenate([mlp.gate_proj.weight.detach().numpy(), mlp.up_proj.weight.detach().numpy()])
    w_down = mlp.down_proj.weight.detach().numpy()
    xd, wgu, wdn = up(name, x), up(name, w_gu), up(name, w_down)
    gu = bk.matmul_forward(xd, wgu)
    h = bk.swiglu_forward(gu)
    y = bk.matmul_forward(h, wdn)
    np.testing.assert_allclose(down(name, y), yt.detach().numpy(), rtol=1e-4, atol=1e-5)
    dh, dw_down, _ = bk.matmul_backward(up(name, dy), h, wdn, need_bias=False)
    dgu = bk.swiglu_backward(dh, gu)
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
def test_swiglu_relu2_bad_input(rng, name):
    bk = get(name)
    gu = up(name, rng.standard_normal((4, 10)).astype(np.float32))
    with pytest.raises(ValueError, match="gate_up"):
        bk.swiglu_forward(up(name, np.zeros((4, 9), np.float32)))
    with pytest.raises(ValueError, match="out"):
        bk.swiglu_forward(gu, out=up(name, np.zeros((4, 10), np.float32)))
    with pytest.raises(ValueError, match="dout"):
        bk.swiglu_backward(up(name, np.zeros((4, 4), np.float32)), gu)
    with pytest.raises(ValueError, match="dgate_up"):
        bk.swiglu_backward(up(name, np.zeros((4, 5), np.float32)), gu, dgate_up=up(name, np.zeros((4, 5), np.float32)))
    with pytest.raises(ValueError, match="dout"):
        bk.relu2_backward(up(name, np.zeros((4, 9), np.float32)), gu)
    if name == "cpu":
        with pytest.raises(TypeError, match="gate_up"):
            bk.swiglu_forward(np.zeros((4, 10)))
        with pytest.raises(TypeError, match="x"):
            bk.relu2_forward(np.zeros((4, 10), np.float16))
