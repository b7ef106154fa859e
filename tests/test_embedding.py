"""Token + position embedding forward/backward on every backend (tests/backends.py) vs tests/reference.py (float64)
and torch: singletons, C = 1 and odd, V odd and GPT-2's 50257, T < max_T, tokens repeated across many GPU sort
chunks, misaligned views, accumulation, determinism, out-of-range ids, the token embeddings' scale (Gemma's
sqrt(C)) and bad input.

Forward is one float32 add rounded once to the dtype: exact against numpy on the rounded tables. With a scale it is
one multiply-add (fused or not, by ISA): rtol 1e-6 float32, 2^-8 for the bf16 rounding. Backward sums up
to B*T rows per token in float32 (parameter gradients are float32 on both devices): rtol 1e-5 + atol 1e-5.
Determinism: backward is bitwise identical run to run (CPU: for 1 and 2 threads; GPU: a stable sort of the
positions by token, then fixed-order sums)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import Backend, assert_close, assert_rel

import fastllm
from fastllm import _C, cuda, ops

BWD_TOL = dict(rtol=1e-5, atol=1e-5)

# (B, T, C, V, max_T)
SHAPES = [(1, 1, 1, 1, 1), (1, 3, 17, 5, 4), (2, 5, 3, 7, 8), (3, 64, 771, 101, 64), (2, 9, 48, 50257, 9),
          (4, 64, 768, 1000, 67), (3, 17, 769, 50, 20), (8, 512, 64, 5, 515), (2, 40, 8, 50257, 43)]


def make(bk, rng, B, T, C, V, maxT):
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    wte = bk.rounded(rng.standard_normal((V, C)))
    wpe = bk.rounded(rng.standard_normal((maxT, C)))
    dout = bk.rounded(rng.standard_normal((B, T, C)))
    return tokens, wte, wpe, dout


@pytest.mark.parametrize("B,T,C,V,maxT", SHAPES)
@pytest.mark.parametrize("offset", [0, 1])
def test_embedding_matches_reference(bk, rng, B, T, C, V, maxT, offset):
    tokens, wte, wpe, dout = make(bk, rng, B, T, C, V, maxT)
    out = bk.poisoned((B, T, C), offset=offset)
    assert bk.ops.embedding_forward(bk.ids(tokens), bk.put(wte, offset=offset), bk.put(wpe), out=out) is out
    np.testing.assert_array_equal(bk.get(out), bk.rounded(wte[tokens] + wpe[:T]))
    dwte0, dwpe0 = rng.standard_normal((V, C)).astype(np.float32), rng.standard_normal((maxT, C)).astype(np.float32)
    dwte, dwpe = bk.put(dwte0, "float32", offset), bk.put(dwpe0, "float32")
    bk.ops.embedding_backward(bk.put(dout, offset=offset), bk.ids(tokens), dwte, dwpe)  # accumulates (+=)
    ref_dwte, ref_dwpe = reference.embedding_backward(dout, tokens, V, maxT)
    assert_close(bk.get(dwte), dwte0 + ref_dwte, **BWD_TOL, what="dwte")
    assert_close(bk.get(dwpe), dwpe0 + ref_dwpe, **BWD_TOL, what="dwpe")
    np.testing.assert_array_equal(bk.get(dwpe)[T:], dwpe0[T:])  # rows beyond T untouched


@pytest.mark.parametrize("scale", [1.0, 8.0])
def test_embedding_backward_is_deterministic(bk, rng, scale):
    B, T, C, V = 16, 1024, 64, 7  # long runs of equal tokens: on the GPU each spans hundreds of sort chunks
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    tokens[3, :700] = 4  # one very long run
    dout = bk.rounded(rng.standard_normal((B, T, C)))
    td, dd = bk.ids(tokens), bk.put(dout)
    runs = []
    for threads in (1, 2, 2):
        if not bk.is_cuda:
            fastllm.set_num_threads(threads)
        dwte, dwpe = bk.zeros((V, C), "float32"), bk.zeros((T, C), "float32")
        bk.ops.embedding_backward(dd, td, dwte, dwpe, scale=scale)
        runs.append((bk.get(dwte), bk.get(dwpe)))
    ref_dwte, ref_dwpe = reference.embedding_backward(dout, tokens, V, T, scale)
    assert_rel(runs[0][0], ref_dwte, 1e-5, "dwte")  # sums of ~2300 rows: relative to the largest
    assert_rel(runs[0][1], ref_dwpe, 1e-5, "dwpe")
    for r in runs[1:]:
        np.testing.assert_array_equal(r[0], runs[0][0])
        np.testing.assert_array_equal(r[1], runs[0][1])


@pytest.mark.backends(variants=False)
def test_embedding_matches_cpu_kernel(bk, rng):
    B, T, C, V = 4, 128, 96, 300
    tokens, wte, wpe, dout = make(bk, rng, B, T, C, V, T + 3)
    out = bk.ops.embedding_forward(tokens, bk.put(wte), bk.put(wpe))  # numpy ids: checked, then copied over
    np.testing.assert_array_equal(bk.get(out), bk.rounded(ops.embedding_forward(tokens, wte, wpe)))
    cw, cp = ops.embedding_backward(dout, tokens, np.zeros((V, C), np.float32), np.zeros((T + 3, C), np.float32))
    gw, gp = bk.ops.embedding_backward(bk.put(dout), tokens, bk.zeros((V, C), "float32"),
                                       bk.zeros((T + 3, C), "float32"))
    assert_close(bk.get(gw), cw, **BWD_TOL, what="dwte vs the CPU kernel")
    assert_close(bk.get(gp), cp, **BWD_TOL, what="dwpe vs the CPU kernel")


def test_embedding_zero_size(bk):
    out = bk.ops.embedding_forward(np.zeros((0, 4), np.int32), bk.zeros((5, 8)), bk.zeros((4, 8)))
    assert out.shape == (0, 4, 8)
    dwte = bk.zeros((5, 8), "float32")
    bk.ops.embedding_backward(bk.ops.empty((2, 0, 8), bk.dtype), np.zeros((2, 0), np.int32), dwte,
                              bk.zeros((4, 8), "float32"))
    np.testing.assert_array_equal(bk.get(dwte), np.zeros((5, 8)))


@pytest.mark.backends(variants=False)
def test_embedding_vs_torch(bk, rng):
    torch = pytest.importorskip("torch")
    B, T, C, V = 2, 7, 33, 50
    tokens, wte, wpe, dout = make(bk, rng, B, T, C, V, 10)
    te, pe = torch.from_numpy(wte.copy()).requires_grad_(), torch.from_numpy(wpe.copy()).requires_grad_()
    F = torch.nn.functional
    y = F.embedding(torch.from_numpy(tokens.astype(np.int64)), te) + F.embedding(torch.arange(T), pe)
    y.backward(torch.from_numpy(dout))
    out = bk.ops.embedding_forward(tokens, bk.put(wte), bk.put(wpe))
    np.testing.assert_array_equal(bk.get(out), bk.rounded(y.detach().numpy()))
    dwte, dwpe = bk.zeros((V, C), "float32"), bk.zeros((10, C), "float32")
    bk.ops.embedding_backward(bk.put(dout), tokens, dwte, dwpe)
    assert_close(bk.get(dwte), te.grad.numpy(), **BWD_TOL, what="dwte")
    assert_close(bk.get(dwpe), pe.grad.numpy(), **BWD_TOL, what="dwpe")


def test_embedding_without_positions(bk, rng):
    """wpe / dwpe None (rotary models): out = wte[tokens], dwte the scattered rows."""
    tokens, wte, _, dout = make(bk, rng, 3, 9, 40, 17, 9)
    out = bk.ops.embedding_forward(bk.ids(tokens), bk.put(wte), None)
    np.testing.assert_array_equal(bk.get(out), wte[tokens])
    dwte = bk.zeros(wte.shape, "float32")
    bk.ops.embedding_backward(bk.put(dout), bk.ids(tokens), dwte, None)
    ref, _ = reference.embedding_backward(dout, tokens, 17, 9)
    assert_close(bk.get(dwte), ref, **BWD_TOL, what="dwte")


# ---- scale: Gemma multiplies the token embeddings (not the position table) by sqrt(C)

SCALE_TOL = {"float32": dict(rtol=1e-6, atol=1e-6), "bfloat16": dict(rtol=2**-8, atol=1e-6)}


@pytest.mark.parametrize("B,T,C,V,maxT", [(1, 1, 1, 1, 1), (2, 5, 3, 7, 8), (3, 17, 769, 50, 20),
                                          (4, 64, 768, 1000, 67)])
@pytest.mark.parametrize("positions", [True, False], ids=["wpe", "no_wpe"])
def test_embedding_scale(bk, rng, B, T, C, V, maxT, positions):
    """out = wte[tokens] * scale (+ wpe[:T]); dwte += scale * the scattered dout rows, dwpe += dout unscaled."""
    tokens, wte, wpe, dout = make(bk, rng, B, T, C, V, maxT)
    scale = float(np.sqrt(C)) + 0.25  # not a power of two: the products round
    wpe = wpe if positions else None
    out = bk.ops.embedding_forward(bk.ids(tokens), bk.put(wte), None if wpe is None else bk.put(wpe), scale=scale)
    assert_close(bk.get(out), reference.embedding_forward(tokens, wte, wpe, scale), **SCALE_TOL[bk.dtype],
                 what="forward")
    dwte0 = rng.standard_normal((V, C)).astype(np.float32)
    dwte, dwpe = bk.put(dwte0, "float32"), None if wpe is None else bk.zeros((maxT, C), "float32")
    bk.ops.embedding_backward(bk.put(dout), bk.ids(tokens), dwte, dwpe, scale=scale)  # accumulates (+=)
    ref_dwte, ref_dwpe = reference.embedding_backward(dout, tokens, V, maxT, scale)
    assert_close(bk.get(dwte), dwte0 + ref_dwte, rtol=1e-5, atol=1e-5 * scale, what="dwte")
    if positions:
        assert_close(bk.get(dwpe), ref_dwpe, **BWD_TOL, what="dwpe (unscaled)")


@pytest.mark.backends(variants=False)
def test_embedding_scale_vs_torch(bk, rng):
    """HF Gemma: inputs_embeds = embed_tokens(ids) * normalizer; autograd gives dwte = normalizer * scattered dout."""
    torch = pytest.importorskip("torch")
    B, T, C, V = 2, 7, 48, 50
    tokens, wte, _, dout = make(bk, rng, B, T, C, V, T)
    scale = float(np.sqrt(C))
    te = torch.from_numpy(wte.copy()).requires_grad_()
    y = torch.nn.functional.embedding(torch.from_numpy(tokens.astype(np.int64)), te) * scale
    y.backward(torch.from_numpy(dout))
    out = bk.ops.embedding_forward(tokens, bk.put(wte), None, scale=scale)
    assert_close(bk.get(out), y.detach().numpy(), **SCALE_TOL[bk.dtype], what="forward")
    dwte = bk.zeros((V, C), "float32")
    bk.ops.embedding_backward(bk.put(dout), tokens, dwte, None, scale=scale)
    assert_close(bk.get(dwte), te.grad.numpy(), rtol=1e-5, atol=1e-5 * scale, what="dwte")


@pytest.mark.backends(variants=False)
def test_embedding_bad_scale(bk, rng):
    tokens, wte, wpe, dout = make(bk, rng, 2, 4, 8, 10, 4)
    wted, wped, dd = bk.put(wte), bk.put(wpe), bk.put(dout)
    dwte, dwpe = bk.zeros(wte.shape, "float32"), bk.zeros(wpe.shape, "float32")
    for bad, err in (("2.0", TypeError), (None, TypeError), (True, TypeError), (np.ones(1), TypeError),
                     (float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError),
                     (1e39, ValueError)):  # 1e39: finite in Python, inf as float32
        with pytest.raises(err, match="scale"):
            bk.ops.embedding_forward(tokens, wted, wped, scale=bad)
        with pytest.raises(err, match="scale"):
            bk.ops.embedding_backward(dd, tokens, dwte, dwpe, scale=bad)
    assert not bk.get(dwte).any() and not bk.get(dwpe).any()  # nothing was added
    out = bk.ops.embedding_forward(tokens, wted, wped, scale=np.float32(0.5))  # numpy scalars and ints are fine
    assert_close(bk.get(out), reference.embedding_forward(tokens, wte, wpe, 0.5), **SCALE_TOL[bk.dtype])
    out = bk.ops.embedding_forward(tokens, wted, None, scale=-2)
    assert_close(bk.get(out), reference.embedding_forward(tokens, wte, None, -2.0), **SCALE_TOL[bk.dtype])


# ---- ids outside [0, V): numpy ids are refused on both devices; ids already on the GPU cannot be checked there


@pytest.mark.backends(devices=("cuda",))
def test_embedding_device_ids_out_of_range(bk, rng):
    """Forward reads a zero wte row (out = wpe[t]); backward skips the id; never a wild read or write."""
    V, C, T = 10, 16, 8
    tokens = np.array([[0, -1, 10, 9, 2**31 - 1, -(2**31), 3, 11]], np.int32)
    wte, wpe = bk.rounded(rng.standard_normal((V, C))), bk.rounded(rng.standard_normal((T, C)))
    out = bk.ops.embedding_forward(bk.ids(tokens), bk.put(wte), bk.put(wpe), out=bk.poisoned((1, T, C)))
    valid = (tokens >= 0) & (tokens < V)
    want = wpe[None] + np.where(valid[..., None], wte[np.clip(tokens, 0, V - 1)], 0)
    np.testing.assert_array_equal(bk.get(out), bk.rounded(want))
    dout = bk.rounded(rng.standard_normal((1, T, C)))
    dwte, dwpe = bk.zeros((V, C), "float32"), bk.zeros((T, C), "float32")
    bk.ops.embedding_backward(bk.put(dout), bk.ids(tokens), dwte, dwpe)
    ref_dwte = np.zeros((V, C))
    np.add.at(ref_dwte, tokens[valid], dout[valid].astype(np.float64))
    assert_close(bk.get(dwte), ref_dwte, **BWD_TOL, what="dwte")
    assert_close(bk.get(dwpe), dout.sum(0, dtype=np.float64), **BWD_TOL, what="dwpe")  # every position counts


def test_embedding_numpy_ids_out_of_range(bk, rng):
    tokens, wte, wpe, dout = make(bk, rng, 2, 4, 8, 10, 4)
    wted, wped = bk.put(wte), bk.put(wpe)
    for bad in (10, -1):
        t = tokens.copy()
        t[1, 2] = bad
        with pytest.raises(ValueError, match="tokens"):
            bk.ops.embedding_forward(t, wted, wped)
    with pytest.raises(TypeError, match="tokens"):
        bk.ops.embedding_forward(tokens.astype(np.float32), wted, wped)
    with pytest.raises(ValueError, match="tokens"):
        bk.ops.embedding_forward(tokens.reshape(-1), wted, wped)


def test_embedding_bad_input_cpu(rng):
    tokens, wte, wpe, dout = make(Backend("cpu"), rng, 2, 4, 8, 10, 4)
    dwte, dwpe = np.zeros_like(wte), np.zeros_like(wpe)
    t = tokens.copy()
    t[1, 2] = 10
    with pytest.raises(ValueError, match="tokens"):
        ops.embedding_backward(dout, t, dwte, dwpe)
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


@pytest.mark.cuda
def test_embedding_bad_input_cuda():
    tok, wte, wpe = cuda.zeros((2, 4), "int32"), cuda.zeros((10, 8)), cuda.zeros((6, 8))
    out = cuda.zeros((2, 4, 8))
    with pytest.raises(TypeError, match="tokens"):
        cuda.embedding_forward(cuda.zeros((2, 4)), wte, wpe, out=out)
    with pytest.raises(ValueError, match="tokens"):
        cuda.embedding_forward(cuda.zeros((8,), "int32"), wte, wpe, out=out)
    with pytest.raises(ValueError, match="wpe"):
        cuda.embedding_forward(tok, wte, cuda.zeros((3, 8)), out=out)
    with pytest.raises(ValueError, match="wpe"):
        cuda.embedding_forward(tok, wte, cuda.zeros((6, 9)), out=out)
    with pytest.raises(TypeError, match="wpe"):
        cuda.embedding_forward(tok, wte, cuda.zeros((6, 8), "bfloat16"), out=out)
    with pytest.raises(ValueError, match="out"):
        cuda.embedding_forward(tok, wte, wpe, out=cuda.zeros((2, 4, 9)))
    dwte, dwpe, dout = cuda.zeros((10, 8)), cuda.zeros((6, 8)), cuda.zeros((2, 4, 8))
    with pytest.raises(TypeError, match="dwte"):
        cuda.embedding_backward(dout, tok, cuda.zeros((10, 8), "bfloat16"), dwpe)
    with pytest.raises(ValueError, match="dout"):
        cuda.embedding_backward(cuda.zeros((2, 5, 8)), tok, dwte, dwpe)
    with pytest.raises(ValueError, match="dwpe"):
        cuda.embedding_backward(dout, tok, dwte, cuda.zeros((3, 8)))
    with pytest.raises(ValueError, match="overlap"):
        cuda.embedding_backward(dout, tok, dwte, dwte.view(0, (6, 8)))


@pytest.mark.parametrize("V,C", [(1, 2), (33, 6), (100, 64), (4096 + 70, 130)])
def test_embedding_of_a_bf16_table_and_of_its_panels(rng, V, C):
    """A held model's bf16 token table (its bits, or a tied head's Bf16Panels, which the embedding then reads): the
    rows widened exactly, times the scale; ids outside the table are refused."""
    w = rng.standard_normal((V, C)).astype(np.float32)
    bits = ops.to_bf16(w)
    tokens = rng.integers(0, V, (3, 7))
    want = ops.from_bf16(bits)[tokens] * np.float32(1.5)
    for table in (bits, ops.pack_bf16(bits)):
        np.testing.assert_array_equal(ops.embedding_forward(tokens, table, None, scale=1.5), want)
        with pytest.raises(ValueError, match=f"outside \\[0, {V}\\)"):
            ops.embedding_forward(np.array([[0, V]]), table, None)
