"""softmax_ce and the fused lm-head + cross-entropy vs tests/reference.py (float64) and torch.

Tolerances (float32 kernels vs float64 references): losses atol 2e-5 + rtol 1e-5 (logsumexp of up to
50k terms summed in float32 lanes); dlogits atol 1e-6 (softmax probabilities are <= 1, exp is <= 2 ulp);
lm-head grads rtol/atol 1e-4 (they go through float32 matmuls with K = V or N reductions)."""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import CASES, down, get, rel_err, rounded, up

from fastllm import _C, ops

LOSS_TOL = dict(rtol=1e-5, atol=2e-5)
GRAD_TOL = dict(rtol=1e-5, atol=1e-6)
LM_TOL = dict(rtol=1e-4, atol=1e-4)




def make(rng, N, V, scale=3.0, ignore_rows=()):
    logits = (rng.standard_normal((N, V)) * scale).astype(np.float32)
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[list(ignore_rows)] = -1
    return logits, targets


# ---- softmax + cross-entropy: parity --------------------------------------------------------------------


@pytest.mark.parametrize("N,V", [(1, 1), (1, 5), (3, 17), (4, 64), (5, 771), (3, 50257)])
def test_softmax_ce_matches_reference(rng, threads, simd, N, V):
    logits, targets = make(rng, N, V, ignore_rows=[N - 1] if N > 2 else [])
    losses, dlogits = ops.softmax_ce(logits, targets, grad_scale=0.5)
    ref_l, ref_d = reference.softmax_ce(logits, targets, grad_scale=0.5)
    np.testing.assert_allclose(losses, ref_l, **LOSS_TOL)
    np.testing.assert_allclose(dlogits, ref_d, **GRAD_TOL)


def test_softmax_ce_gpt2_vocab_padded(rng, threads):
    logits, targets = make(rng, 2, 50304)
    losses, dlogits = ops.softmax_ce(logits, targets)
    ref_l, ref_d = reference.softmax_ce(logits, targets)
    np.testing.assert_allclose(losses, ref_l, **LOSS_TOL)
    np.testing.assert_allclose(dlogits, ref_d, **GRAD_TOL)


@pytest.mark.parametrize("offset", [0, 3])
def test_softmax_ce_large_out_of_place_streaming(rng, offset):
    """N*V >= 8 Mi takes the non-temporal-store path (AVX-512); dlogits misaligned by `offset` floats."""
    N, V = 167, 50304
    logits, targets = make(rng, N, V, ignore_rows=[3])
    buf = np.full(N * V + offset, np.nan, np.float32)
    dlogits = buf[offset:].reshape(N, V)
    losses = np.empty(N, np.float32)
    _C.softmax_ce(losses, dlogits, logits, targets, 0.5, -1)
    rows = [0, 3, 100, N - 1]  # rows are independent: check a few against the float64 reference ...
    ref_l, ref_d = reference.softmax_ce(logits[rows], targets[rows], grad_scale=0.5)
    np.testing.assert_allclose(losses[rows], ref_l, **LOSS_TOL)
    np.testing.assert_allclose(dlogits[rows], ref_d, **GRAD_TOL)
    assert (
        np.abs(dlogits.sum(1)).max() < 1e-5
    )  # ... and all: every element written, (softmax - onehot) sums to 0


def test_softmax_ce_ignore_rows_and_batch_shape(rng, simd):
    logits, targets = make(rng, 6, 33, ignore_rows=[0, 3])
    logits, targets = logits.reshape(2, 3, 33), targets.reshape(2, 3)
    garbage = np.full((2, 3, 33), 7.0, np.float32)
    losses, _ = ops.softmax_ce(logits, targets, backward=False)
    assert losses.shape == (2, 3) and losses[0, 0] == 0 and losses[1, 0] == 0
    _C.softmax_ce(
        losses.reshape(-1), garbage.reshape(-1, 33), logits.reshape(-1, 33), targets.reshape(-1), 1.0, -1
    )
    assert (garbage[0, 0] == 0).all() and (garbage[1, 0] == 0).all()  # written (=), zero rows where ignored
    ref_l, ref_d = reference.softmax_ce(logits, targets)
    np.testing.assert_allclose(garbage.reshape(-1, 33), ref_d, **GRAD_TOL)
    np.testing.assert_allclose(losses.reshape(-1), ref_l, **LOSS_TOL)


def test_softmax_ce_other_ignore_index(rng):
    logits, targets = make(rng, 4, 10)
    targets[1] = -100
    losses, dlogits = ops.softmax_ce(logits, targets, ignore_index=-100)
    assert losses[1] == 0 and not dlogits[1].any()
    with pytest.raises(ValueError, match="targets"):  # -100 is out of range when ignore_index is -1
        ops.softmax_ce(logits, targets)


def test_softmax_ce_in_place(rng, threads, simd):
    logits, targets = make(rng, 5, 1000, ignore_rows=[2])
    ref_l, ref_d = reference.softmax_ce(logits, targets, grad_scale=0.25)
    losses, dlogits = ops.softmax_ce(logits, targets, grad_scale=0.25, inplace=True)
    assert dlogits is logits
    np.testing.assert_allclose(losses, ref_l, **LOSS_TOL)
    np.testing.assert_allclose(logits, ref_d, **GRAD_TOL)


@pytest.mark.parametrize("big", [1e4, 3e4])
def test_softmax_ce_extreme_logits(simd, big):
    logits = np.zeros((4, 37), np.float32)
    logits[0, 5], logits[0, 6] = big, -big
    logits[1, :] = -big
    logits[1, 30] = big
    logits[2, :] = big  # all equal and huge
    logits[3, ::2] = -big
    targets = np.array([6, 30, 0, 0], np.int32)
    losses, dlogits = ops.softmax_ce(logits, targets)
    assert np.isfinite(losses).all() and np.isfinite(dlogits).all()
    ref_l, ref_d = reference.softmax_ce(logits, targets)
    np.testing.assert_allclose(losses, ref_l, rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(dlogits, ref_d, **GRAD_TOL)


@pytest.mark.parametrize("V", [7, 34, 64, 100, 1000])
def test_softmax_ce_masked_logits(rng, simd, V):
    """-inf logits (masked tokens) get probability 0: finite loss and gradient elsewhere, even when a SIMD lane
    sees only -inf values at first; a masked target gives loss +inf."""
    logits = rng.standard_normal((4, V)).astype(np.float32)
    logits[:, ::3] = -np.inf
    t1 = V - 1 if (V - 1) % 3 else V - 2  # an unmasked target after a long masked run
    logits[1, : min(t1, 70)] = -np.inf
    logits[2] = -np.inf
    logits[2, V - 1] = 1.0  # one finite logit: probability 1
    targets = np.array([1, t1, V - 1, 0], np.int32)  # row 3 targets a masked logit
    losses, dlogits = ops.softmax_ce(logits, targets)
    ref_l, ref_d = reference.softmax_ce(logits[:3], targets[:3])
    np.testing.assert_allclose(losses[:3], ref_l, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dlogits[:3], ref_d, **GRAD_TOL)
    assert losses[3] == np.inf and np.isfinite(dlogits[3]).all()
    # masked: zero up to the documented tiny exp (row 3's target keeps its -1)
    assert max(np.abs(dlogits[:2, ::3]).max(), np.abs(dlogits[3, 3::3]).max(initial=0)) < 1e-30


def test_softmax_ce_nan_propagates(simd):
    """A NaN logit must poison its row's loss (never silently dropped by a max or a clamp)."""
    for V in (7, 100):
        logits = np.zeros((3, V), np.float32)
        logits[1, V - 2] = np.nan
        losses, dlogits = ops.softmax_ce(logits, np.zeros(3, np.int32))
        assert np.isnan(losses[1]) and np.isfinite(losses[[0, 2]]).all()
        assert np.isnan(dlogits[1]).all() and np.isfinite(dlogits[[0, 2]]).all()


def test_softmax_ce_vs_torch(rng, threads):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    logits, targets = make(rng, 9, 5003, ignore_rows=[4])
    x = torch.from_numpy(logits.copy()).requires_grad_()
    loss = F.cross_entropy(x, torch.from_numpy(targets.astype(np.int64)), ignore_index=-1)  # mean over valid
    loss.backward()
    n_valid = int((targets != -1).sum())
    losses, dlogits = ops.softmax_ce(logits, targets, grad_scale=1.0 / n_valid)
    np.testing.assert_allclose(losses.sum() / n_valid, loss.item(), rtol=1e-5)
    np.testing.assert_allclose(dlogits, x.grad.numpy(), rtol=1e-5, atol=1e-7)


# ---- softmax + cross-entropy: bad input -----------------------------------------------------------------


# ---- logit soft-capping (softcap=c: z = c * tanh(logits / c), Gemma 2 / nanochat) ---------------------------


def softcap_torch(logits, targets, c, grad_scale=1.0, hidden=None):
    """(losses, dlogits or (dhidden, dweight)) from torch autograd in float64 (logits = hidden @ weight^T when
    hidden is given: logits is then the weight)."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    h = None if hidden is None else torch.tensor(np.asarray(hidden, np.float64), requires_grad=True)
    z = x if h is None else h @ x.T
    z = c * torch.tanh(z / c)
    loss = torch.nn.functional.cross_entropy(z, torch.as_tensor(targets, dtype=torch.long), ignore_index=-1,
                                             reduction="none")
    (loss.sum() * grad_scale).backward()
    grads = x.grad.numpy() if h is None else (h.grad.numpy(), x.grad.numpy())
    return loss.detach().numpy(), grads


@pytest.mark.parametrize("name,dtype", CASES)
@pytest.mark.parametrize("N,V,c", [(3, 17, 2.0), (5, 771, 15.0), (2, 50257, 30.0)])
@pytest.mark.parametrize("inplace", [False, True])
def test_softmax_ce_softcap_vs_torch(rng, name, dtype, N, V, c, inplace):
    bk = get(name)
    logits, targets = make(rng, N, V, scale=3 * c, ignore_rows=[0])  # many logits in the saturated range
    logits = rounded(logits, dtype)
    ref_l, ref_d = softcap_torch(logits, targets, c, grad_scale=0.5)
    losses, d = bk.softmax_ce(up(name, logits, dtype), up(name, targets), grad_scale=0.5, inplace=inplace,
                              softcap=c)
    np.testing.assert_allclose(down(name, losses), ref_l, rtol=1e-5, atol=2e-5 if name == "cpu" else 2e-4)
    assert rel_err(down(name, d), ref_d) <= (1e-5 if dtype == "float32" else 1e-2)


def test_softmax_ce_softcap_cpu_paths(rng, threads, simd):
    """Every SIMD level (the vectorized tanh and its scalar tail) and thread count."""
    logits, targets = make(rng, 9, 1001, scale=20.0)
    ref_l, ref_d = softcap_torch(logits, targets, 7.0)
    losses, d = ops.softmax_ce(logits, targets, softcap=7.0)
    np.testing.assert_allclose(losses, ref_l, **LOSS_TOL)
    np.testing.assert_allclose(d, ref_d, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name,dtype", CASES)
def test_lmhead_ce_softcap_vs_torch(rng, name, dtype):
    bk = get(name)
    N, C, V, c = 37, 24, 301, 4.0
    hidden = rounded(rng.standard_normal((N, C)), dtype)
    weight = rounded(rng.standard_normal((V, C)), dtype)
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[3] = -1
    ref_l, (ref_dh, ref_dw) = softcap_torch(weight, targets, c, grad_scale=1 / N, hidden=hidden)
    scratch = bk.zeros((8, V), dtype)  # several chunks
    losses, dh, dw = bk.lmhead_ce(up(name, hidden, dtype), up(name, weight, dtype), up(name, targets),
                                  grad_scale=1 / N, scratch=scratch, softcap=c)
    tol = {"float32": 1e-4 if name == "cpu" else 2e-3, "bfloat16": 3e-2}[dtype]
    np.testing.assert_allclose(down(name, losses), ref_l, rtol=tol, atol=tol)
    assert rel_err(down(name, dh), ref_dh) <= tol and rel_err(down(name, dw), ref_dw) <= tol
    losses_eval, _, _ = bk.lmhead_ce(up(name, hidden, dtype), up(name, weight, dtype), up(name, targets),
                                     backward=False, softcap=c)
    np.testing.assert_allclose(down(name, losses_eval), ref_l, rtol=tol, atol=tol)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_softcap_bad_values(rng, bad):
    logits, targets = make(rng, 2, 5)
    with pytest.raises(ValueError, match="softcap"):
        ops.softmax_ce(logits, targets, softcap=bad)
    with pytest.raises(ValueError, match="softcap"):
        _C.softmax_ce(np.empty(2, np.float32), None, logits, targets, 1.0, -1, None, bad if bad else -1.0)
    with pytest.raises(TypeError, match="softcap"):
        ops.lmhead_ce(logits, logits.copy(), targets, softcap="7")


def test_softmax_ce_bad_input(rng):
    logits, targets = make(rng, 3, 8)
    losses, d = np.empty(3, np.float32), np.empty((3, 8), np.float32)
    with pytest.raises(TypeError, match="logits"):
        ops.softmax_ce(logits.astype(np.float64), targets)
    with pytest.raises(TypeError, match="targets"):
        ops.softmax_ce(logits, targets.astype(np.float32))
    with pytest.raises(TypeError, match="dlogits"):
        _C.softmax_ce(losses, d.astype(np.float64), logits, targets, 1.0, -1)
    with pytest.raises(ValueError, match="targets"):
        ops.softmax_ce(logits, targets[:2])
    for bad in (8, -2):
        t = targets.copy()
        t[1] = bad
        with pytest.raises(ValueError, match="targets"):
            ops.softmax_ce(logits, t)
    with pytest.raises(ValueError, match="logits"):
        _C.softmax_ce(losses, None, np.asfortranarray(logits), targets, 1.0, -1)
    with pytest.raises(ValueError, match="logits"):
        _C.softmax_ce(losses, None, logits[:, ::2], targets, 1.0, -1)
    with pytest.raises(ValueError, match="dlogits"):
        _C.softmax_ce(losses, d[:, :4], logits, targets, 1.0, -1)
    with pytest.raises(ValueError, match="losses"):
        _C.softmax_ce(np.empty(4, np.float32), None, logits, targets, 1.0, -1)
    with pytest.raises(ValueError, match="logits"):
        _C.softmax_ce(losses, None, logits.reshape(-1), targets, 1.0, -1)


# ---- fused lm-head + cross-entropy ----------------------------------------------------------------------


def lmhead_reference(hidden, weight, targets, grad_scale, ignore_index=-1):
    logits = reference.matmul_forward(hidden, weight)
    losses, dlogits = reference.softmax_ce(logits, targets, grad_scale, ignore_index)
    dh, dw, _ = reference.matmul_backward(dlogits, hidden, weight)
    return losses, dh, dw


@pytest.mark.parametrize("N,C,V,chunk", [(1, 3, 1, 256), (7, 17, 5, 3), (7, 16, 131, 1), (13, 24, 771, 4)])
def test_lmhead_ce_matches_reference(rng, threads, N, C, V, chunk):
    hidden = rng.standard_normal((N, C)).astype(np.float32)
    weight = (rng.standard_normal((V, C)) * 0.3).astype(np.float32)
    targets = rng.integers(0, V, N).astype(np.int32)
    if N > 2:
        targets[1] = -1
    scratch = np.empty((chunk, V), np.float32)
    losses, dh, dw = ops.lmhead_ce(hidden, weight, targets, grad_scale=0.5, scratch=scratch)
    ref_l, ref_dh, ref_dw = lmhead_reference(hidden, weight, targets, 0.5)
    np.testing.assert_allclose(losses, ref_l, **LM_TOL)
    np.testing.assert_allclose(dh, ref_dh, **LM_TOL)
    np.testing.assert_allclose(dw, ref_dw, **LM_TOL)
    fwd_only, none_h, none_w = ops.lmhead_ce(hidden, weight, targets, backward=False, scratch=scratch)
    assert none_h is None and none_w is None
    np.testing.assert_allclose(fwd_only, ref_l, **LM_TOL)


def test_lmhead_ce_accumulates_across_calls(rng):
    N, C, V = 10, 8, 37
    hidden = rng.standard_normal((N, C)).astype(np.float32)
    weight = rng.standard_normal((V, C)).astype(np.float32)
    targets = rng.integers(0, V, N).astype(np.int32)
    dh0 = rng.standard_normal((N, C)).astype(np.float32)
    dw0 = rng.standard_normal((V, C)).astype(np.float32)
    dh, dw = dh0.copy(), dw0.copy()
    ops.lmhead_ce(hidden, weight, targets, dhidden=dh, dweight=dw, scratch=np.empty((3, V), np.float32))
    _, ref_dh, ref_dw = lmhead_reference(hidden, weight, targets, 1.0)
    np.testing.assert_allclose(dh, dh0 + ref_dh, **LM_TOL)
    np.testing.assert_allclose(dw, dw0 + ref_dw, **LM_TOL)
    dw2, losses = dw0.copy(), np.empty(N, np.float32)  # dweight alone (no dhidden)
    _C.lmhead_ce(losses, None, dw2, hidden, weight, targets, 1.0, -1, np.empty((4, V), np.float32))
    np.testing.assert_allclose(dw2, dw0 + ref_dw, **LM_TOL)


def test_lmhead_ce_vs_torch(rng, threads):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    N, C, V = 12, 32, 501
    hidden = rng.standard_normal((N, C)).astype(np.float32)
    weight = (rng.standard_normal((V, C)) * 0.2).astype(np.float32)
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[5] = -1
    h = torch.from_numpy(hidden.copy()).requires_grad_()
    w = torch.from_numpy(weight.copy()).requires_grad_()
    loss = F.cross_entropy(
        F.linear(h, w), torch.from_numpy(targets.astype(np.int64)), ignore_index=-1, reduction="sum"
    )
    loss.backward()
    losses, dh, dw = ops.lmhead_ce(hidden, weight, targets, scratch=np.empty((5, V), np.float32))
    np.testing.assert_allclose(losses.sum(), loss.item(), rtol=1e-5)
    np.testing.assert_allclose(dh, h.grad.numpy(), **LM_TOL)
    np.testing.assert_allclose(dw, w.grad.numpy(), **LM_TOL)


def test_lmhead_ce_bad_input(rng):
    hidden = rng.standard_normal((4, 8)).astype(np.float32)
    weight = rng.standard_normal((11, 8)).astype(np.float32)
    targets = np.array([0, 1, 10, -1], np.int32)
    with pytest.raises(TypeError, match="hidden"):
        ops.lmhead_ce(hidden.astype(np.float64), weight, targets)
    with pytest.raises(TypeError, match="weight"):
        ops.lmhead_ce(hidden, weight.astype(np.float64), targets)
    with pytest.raises(ValueError, match="weight"):
        ops.lmhead_ce(hidden, weight[:, :7].copy(), targets)
    with pytest.raises(ValueError, match="targets"):
        ops.lmhead_ce(hidden, weight, np.array([0, 1, 11, -1], np.int32))
    with pytest.raises(TypeError, match="targets"):
        ops.lmhead_ce(hidden, weight, targets.astype(np.float64))
    with pytest.raises(ValueError, match="scratch"):
        ops.lmhead_ce(hidden, weight, targets, scratch=np.empty((0, 11), np.float32))
    with pytest.raises(ValueError, match="scratch"):
        ops.lmhead_ce(hidden, weight, targets, scratch=np.empty((3, 10), np.float32))
    with pytest.raises(ValueError, match="dweight"):
        ops.lmhead_ce(hidden, weight, targets, dweight=np.zeros((11, 7), np.float32))


def test_zero_vocab_and_huge_integers(rng):
    """V = 0 and integers past their C type give a ValueError naming the argument (they used to fail in numpy's
    reshape, or with pybind11's 'incompatible function arguments' dump)."""
    logits, targets = make(rng, 3, 8)
    with pytest.raises(ValueError, match=r"V \(logits columns\) must be >= 1"):
        ops.softmax_ce(np.zeros((3, 0), np.float32), targets)
    with pytest.raises(ValueError, match="ignore_index"):
        ops.softmax_ce(logits, targets, ignore_index=2**40)
    hidden = rng.standard_normal((3, 4), dtype=np.float32)
    weight = rng.standard_normal((8, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"V \(weight rows\) must be >= 1"):
        ops.lmhead_ce(hidden, np.zeros((0, 4), np.float32), targets)
    with pytest.raises(ValueError, match="ignore_index"):
        ops.lmhead_ce(hidden, weight, targets, ignore_index=-(2**70))
    with pytest.raises(ValueError, match="dhidden overlaps hidden"):
        ops.lmhead_ce(hidden, weight, targets, dhidden=hidden)
    with pytest.raises(ValueError, match="scratch overlaps hidden"):
        ops.lmhead_ce(hidden, weight, targets, scratch=hidden.reshape(-1)[:8].reshape(1, 8))
    losses, _ = ops.softmax_ce(logits.copy(), targets, inplace=True)  # dlogits = logits: allowed
    with pytest.raises(ValueError, match="dlogits overlaps logits"):
        buf = np.zeros(32, np.float32)
        _C.softmax_ce(np.zeros(3, np.float32), buf[4:28].reshape(3, 8), buf[:24].reshape(3, 8), targets, 1.0, -1)
