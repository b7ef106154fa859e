"""Token + position embedding forward/backward vs tests/reference.py (float64) and torch.

Tolerances (float32): forward is one float32 add per element, compared with rtol 1e-6 (the reference adds in
float64); backward sums up to B*T rows per token in float32: rtol 1e-5 + atol 1e-5. Determinism: backward
is bitwise identical for 1 and 2 threads (each element is summed in token order by one thread)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import CASES, down, get, rounded, up

import fastllm
from fastllm import _C, ops

BWD_TOL = dict(rtol=1e-5, atol=1e-5)




def make(rng, B, T, C, V, maxT):
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    wte = rng.standard_normal((V, C)).astype(np.float32)
    wpe = rng.standard_normal((maxT, C)).astype(np.float32)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    return tokens, wte, wpe, dout


# (B, T, C, V, maxT): singletons, C not a multiple of 16, V odd, T < maxT, one above the parallel threshold
@pytest.mark.parametrize(
    "B,T,C,V,maxT",
    [(1, 1, 1, 1, 1), (1, 3, 17, 5, 4), (2, 5, 3, 7, 8), (3, 64, 771, 101, 64), (2, 9, 48, 50257, 9)],
)
def test_embedding_matches_reference(rng, threads, simd, B, T, C, V, maxT):
    tokens, wte, wpe, dout = make(rng, B, T, C, V, maxT)
    out = ops.embedding_forward(tokens, wte, wpe)
    np.testing.assert_allclose(out, reference.embedding_forward(tokens, wte, wpe), rtol=1e-6)
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    ops.embedding_backward(dout, tokens, dwte, dwpe)
    ref_dwte, ref_dwpe = reference.embedding_backward(dout, tokens, V, maxT)
    np.testing.assert_allclose(dwte, ref_dwte, **BWD_TOL)
    np.testing.assert_allclose(dwpe, ref_dwpe, **BWD_TOL)


def test_embedding_backward_accumulates_and_is_deterministic(rng, simd):
    B, T, C, V = 4, 64, 200, 13  # few tokens: many rows scatter into the same dwte row
    tokens, wte, wpe, dout = make(rng, B, T, C, V, T)
    dwte0, dwpe0 = (
        rng.standard_normal((V, C)).astype(np.float32),
        rng.standard_normal((T, C)).astype(np.float32),
    )
    results = []
    for n in (1, 2):
        fastllm.set_num_threads(n)
        dwte, dwpe = dwte0.copy(), dwpe0.copy()
        ops.embedding_backward(dout, tokens, dwte, dwpe)
        results.append((dwte, dwpe))
    ref_dwte, ref_dwpe = reference.embedding_backward(dout, tokens, V, T)
    np.testing.assert_allclose(results[0][0], dwte0 + ref_dwte, **BWD_TOL)
    np.testing.assert_allclose(results[0][1], dwpe0 + ref_dwpe, **BWD_TOL)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


def test_embedding_vs_torch(rng, threads):
    torch = pytest.importorskip("torch")
    B, T, C, V = 2, 7, 33, 50
    tokens, wte, wpe, dout = make(rng, B, T, C, V, 10)
    te, pe = torch.from_numpy(wte.copy()).requires_grad_(), torch.from_numpy(wpe.copy()).requires_grad_()
    F = torch.nn.functional
    y = F.embedding(torch.from_numpy(tokens.astype(np.int64)), te) + F.embedding(torch.arange(T), pe)
    y.backward(torch.from_numpy(dout))
    np.testing.assert_allclose(ops.embedding_forward(tokens, wte, wpe), y.detach().numpy(), rtol=1e-6)
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    ops.embedding_backward(dout, tokens, dwte, dwpe)
    np.testing.assert_allclose(dwte, te.grad.numpy(), **BWD_TOL)
    np.testing.assert_allclose(dwpe, pe.grad.numpy(), **BWD_TOL)


@pytest.mark.parametrize("name,dtype", CASES)
def test_embedding_without_positions(rng, name, dtype):
    """wpe / dwpe None (rotary models): out = wte[tokens], dwte the scattered rows, on both backends."""
    bk = get(name)
    tokens, wte, _, dout = make(rng, 3, 9, 40, 17, 9)
    wte, dout = rounded(wte, dtype), rounded(dout, dtype)
    out = down(name, bk.embedding_forward(up(name, tokens), up(name, wte, dtype), None))
    np.testing.assert_array_equal(out, wte[tokens])
    dwte = bk.zeros(wte.shape, "float32")
    bk.embedding_backward(up(name, dout, dtype), up(name, tokens), dwte, None)
    ref, _ = reference.embedding_backward(dout, tokens, 17, 9)
    np.testing.assert_allclose(down(name, dwte), ref, **BWD_TOL)


def test_embedding_bad_input(rng):
    tokens, wte, wpe, dout = make(rng, 2, 4, 8, 10, 4)
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    for bad in (10, -1):
        t = tokens.copy()
        t[1, 2] = bad
        with pytest.raises(ValueError, match="tokens"):
            ops.embedding_forward(t, wte, wpe)
        with pytest.raises(ValueError, match="tokens"):
            ops.embedding_backward(dout, t, dwte, dwpe)
    with pytest.raises(TypeError, match="tokens"):
        ops.embedding_forward(tokens.astype(np.float32), wte, wpe)
    with pytest.raises(ValueError, match="tokens"):
        ops.embedding_forward(tokens.reshape(-1), wte, wpe)
    with pytest.raises(TypeError, match="wte"):
        ops.embedding_forward(tokens, wte.astype(np.float64), wpe)
    with pytest.raises(ValueError, match="wpe"):
        ops.embedding_forward(tokens, wte, wpe[:, :7].copy())
    with pytest.raises(ValueError, match="wpe"):
        ops.embedding_forward(np.zeros((2, 5), np.int32), wte, wpe)  # T=5 > wpe rows
    with pytest.raises(ValueError, match="wte"):
        _C.embedding_forward(np.empty((2, 4, 8), np.float32), tokens, np.asfortranarray(wte), wpe)
    with pytest.raises(ValueError, match="dout"):
        ops.embedding_backward(dout[:, :3].copy(), tokens, dwte, dwpe)
    with pytest.raises(TypeError, match="dwte"):
        ops.embedding_backward(dout, tokens, dwte.astype(np.float64), dwpe)
    with pytest.raises(ValueError, match="dwte"):
        ops.embedding_backward(dout, tokens, np.asfortranarray(dwte), dwpe)
