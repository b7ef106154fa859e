"""softmax_ce and the fused lm-head + cross-entropy (lmhead_ce) on every backend (tests/backends.py) vs
tests/reference.py (float64) and torch: vocabularies 1, odd, 50257 and 50304, batch shapes, ignored rows, per-row
weights, out of place / in place / loss only, chunked scratch of 1..64 rows (and the padded row stride of the
GPU's scratch), accumulation into non-zero gradients, masked (-inf), huge and NaN logits, ids out of range and
bad input.

Inputs are rounded to the backend's dtype first. Tolerances (device, dtype), losses absolute, gradients as
max |got - ref| / max |ref|:
  cpu  float32   losses 2e-5 (+ rtol 1e-5), dlogits 1e-5; lm-head grads 1e-4 (float32 matmuls over V or N)
  cuda float32   losses 2e-4 (fast exp/log, fp32 sums over V), dlogits and lm-head grads 1e-4
  cuda bfloat16  losses 2e-4 (fp32 math on bf16 logits), dlogits 1e-2 (stored in bf16); the lm-head 3e-2 for
                 losses and gradients (its logits are rounded to bf16 in the scratch: 2^-9 |logit|)"""

from __future__ import annotations

import numpy as np
import pytest
import reference
from backends import assert_rel

from fastllm import _C, cuda, ops

IGNORE = ops.IGNORE_INDEX  # the default of every kernel and of the model
TOL = {
    ("cpu", "float32"): dict(loss=2e-5, dlogits=1e-5, lm_loss=1e-4, lm_grad=1e-4),
    ("cuda", "float32"): dict(loss=2e-4, dlogits=1e-4, lm_loss=2e-4, lm_grad=1e-4),
    ("cuda", "bfloat16"): dict(loss=2e-4, dlogits=1e-2, lm_loss=3e-2, lm_grad=3e-2),
}


def assert_losses(got, ref, atol, what="losses"):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), f"{what}: {np.count_nonzero(~np.isfinite(got))} non-finite values (unwritten?)"
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=atol, err_msg=what)


def make(bk, rng, shape, scale=3.0, ignore_frac=0.2):
    """logits (..., V) rounded to the dtype, targets (...) with ~ignore_frac rows ignored."""
    *lead, V = shape
    logits = bk.rounded(rng.standard_normal(shape) * scale)
    targets = rng.integers(0, V, lead).astype(np.int32)
    targets[rng.random(lead) < ignore_frac] = IGNORE
    return logits, targets


# ---- softmax + cross-entropy ----------------------------------------------------------------------------------


@pytest.mark.backends(variants=("cpu",))
@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (3, 17), (5, 7), (4, 64), (5, 771), (64, 1000), (3, 2, 129),
                                   (3, 50257), (33, 50257), (2, 50304)], ids=str)
@pytest.mark.parametrize("mode", ["out", "inplace", "loss_only"])
def test_softmax_ce_matches_reference(bk, rng, shape, mode):
    tol = TOL[bk.device, bk.dtype]
    logits, targets = make(bk, rng, shape)
    scale = 1.0 / max(int((targets != IGNORE).sum()), 1)
    x = bk.put(logits)
    losses, dlogits = bk.ops.softmax_ce(x, targets, grad_scale=scale, backward=mode != "loss_only",
                                        inplace=mode == "inplace", losses=bk.poisoned(shape[:-1], "float32"))
    ref_l, ref_d = reference.softmax_ce(logits, targets, grad_scale=scale)
    assert_losses(bk.get(losses).reshape(-1), ref_l, tol["loss"])
    if mode == "loss_only":
        assert dlogits is None
        return
    assert (dlogits is x) == (mode == "inplace")
    d = bk.get(dlogits).reshape(ref_d.shape)
    assert_rel(d, ref_d, tol["dlogits"], "dlogits")
    assert not d[(targets == IGNORE).reshape(-1)].any(), "ignored rows must have zero gradient"


@pytest.mark.backends(variants=("cpu",))
def test_softmax_ce_row_weights(bk, rng):
    """row_weights scale each row's gradient (grad_scale * w[n]); the losses are unchanged."""
    tol = TOL[bk.device, bk.dtype]
    logits, targets = make(bk, rng, (2, 5, 300))
    w = rng.standard_normal((2, 5)).astype(np.float32)
    w[0, 1] = 0.0
    losses, dlogits = bk.ops.softmax_ce(bk.put(logits), targets, grad_scale=0.5, row_weights=w)
    ref_l, ref_d = reference.softmax_ce(logits, targets, grad_scale=0.5)
    assert_losses(bk.get(losses).reshape(-1), ref_l, tol["loss"])
    assert_rel(bk.get(dlogits).reshape(ref_d.shape), ref_d * w.reshape(-1, 1), tol["dlogits"], "dlogits")


@pytest.mark.backends(variants=("cpu",))
def test_softmax_ce_overwrites_and_batch_shape(bk, rng):
    """dlogits is written (=) over whatever the buffer held (the native kernel takes it as an argument); ignored rows
    get loss 0 and zero gradient rows; logits (2, 3, V) give losses (2, 3)."""
    logits, targets = make(bk, rng, (6, 33), ignore_frac=0)
    targets[[0, 3]] = IGNORE
    losses, _ = bk.ops.softmax_ce(bk.put(logits.reshape(2, 3, 33)), targets.reshape(2, 3), backward=False)
    losses = bk.get(losses)
    assert losses.shape == (2, 3) and losses[0, 0] == 0 and losses[1, 0] == 0
    native = _C.cuda if bk.is_cuda else _C
    garbage, losses = bk.put(np.full((6, 33), 7.0)), bk.poisoned((6,), "float32")
    native.softmax_ce(losses, garbage, bk.put(logits), bk.ids(targets), 1.0, IGNORE)
    ref_l, ref_d = reference.softmax_ce(logits, targets)
    assert_losses(bk.get(losses), ref_l, TOL[bk.device, bk.dtype]["loss"])
    assert_rel(bk.get(garbage), ref_d, TOL[bk.device, bk.dtype]["dlogits"], "dlogits")
    assert not bk.get(garbage)[[0, 3]].any()


@pytest.mark.backends(variants=("cpu",))
@pytest.mark.parametrize("big", [1e4, 3e4])
def test_softmax_ce_extreme_logits(bk, big):
    logits = np.zeros((4, 37), np.float32)
    logits[0, 5], logits[0, 6] = big, -big
    logits[1, :] = -big
    logits[1, 30] = big
    logits[2, :] = big  # all equal and huge
    logits[3, ::2] = -big
    logits = bk.rounded(logits)
    targets = np.array([6, 30, 0, 0], np.int32)
    losses, dlogits = bk.ops.softmax_ce(bk.put(logits), targets)
    losses, dlogits = bk.get(losses), bk.get(dlogits)
    assert np.isfinite(losses).all() and np.isfinite(dlogits).all()
    ref_l, ref_d = reference.softmax_ce(logits, targets)
    # a loss of ~2 big is stored in float32 (rtol); the GPU forms logsumexp = max + log(sum) in float32, so its
    # loss carries up to half an ulp of the largest logit too
    atol = 1e-4 + (2**-23 * big if bk.is_cuda else 0.0)
    np.testing.assert_allclose(losses, ref_l, rtol=1e-6 if bk.dtype == "float32" else 1e-5, atol=atol)
    assert_rel(dlogits, ref_d, TOL[bk.device, bk.dtype]["dlogits"], "dlogits")


@pytest.mark.backends(variants=("cpu",))
@pytest.mark.parametrize("V", [7, 34, 64, 100, 1000])
def test_softmax_ce_masked_logits(bk, rng, V):
    """-inf logits (masked tokens) get probability 0: finite loss and gradient elsewhere, even when a SIMD lane
    sees only -inf values at first; a masked target gives loss +inf."""
    logits = bk.rounded(rng.standard_normal((4, V)))
    logits[:, ::3] = -np.inf
    t1 = V - 1 if (V - 1) % 3 else V - 2  # an unmasked target after a long masked run
    logits[1, : min(t1, 70)] = -np.inf
    logits[2] = -np.inf
    logits[2, V - 1] = 1.0  # one finite logit: probability 1
    targets = np.array([1, t1, V - 1, 0], np.int32)  # row 3 targets a masked logit
    losses, dlogits = bk.ops.softmax_ce(bk.put(logits), targets)
    losses, dlogits = bk.get(losses), bk.get(dlogits)
    ref_l, ref_d = reference.softmax_ce(logits[:3], targets[:3])
    np.testing.assert_allclose(losses[:3], ref_l, rtol=1e-5, atol=TOL[bk.device, bk.dtype]["loss"])
    assert_rel(dlogits[:3], ref_d, TOL[bk.device, bk.dtype]["dlogits"], "dlogits")
    assert losses[3] == np.inf and np.isfinite(dlogits[3]).all()
    # masked: zero up to the documented tiny exp (row 3's target keeps its -1)
    assert max(np.abs(dlogits[:2, ::3]).max(), np.abs(dlogits[3, 3::3]).max(initial=0)) < 1e-30


@pytest.mark.backends(variants=("cpu",))
def test_softmax_ce_nan_propagates(bk):
    """A NaN logit must poison its row's loss (never silently dropped by a max or a clamp)."""
    for V in (7, 100):
        logits = np.zeros((3, V), np.float32)
        logits[1, V - 2] = np.nan
        losses, dlogits = bk.ops.softmax_ce(bk.put(logits), np.zeros(3, np.int32))
        losses, dlogits = bk.get(losses), bk.get(dlogits)
        assert np.isnan(losses[1]) and np.isfinite(losses[[0, 2]]).all()
        assert np.isnan(dlogits[1]).all() and np.isfinite(dlogits[[0, 2]]).all()


@pytest.mark.backends(variants=False)
def test_softmax_ce_other_ignore_index(bk, rng):
    logits, targets = make(bk, rng, (4, 10), ignore_frac=0)
    targets[1] = -100
    losses, dlogits = bk.ops.softmax_ce(bk.put(logits), targets, ignore_index=-100)
    assert bk.get(losses)[1] == 0 and not bk.get(dlogits)[1].any()
    with pytest.raises(ValueError, match="targets"):  # -100 is out of range when ignore_index is -1
        bk.ops.softmax_ce(bk.put(logits), targets)


@pytest.mark.backends(variants=False)
def test_softmax_ce_vs_torch(bk, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    logits, targets = make(bk, rng, (9, 5003), ignore_frac=0)
    targets[4] = IGNORE
    x = torch.from_numpy(logits.copy()).requires_grad_()
    loss = F.cross_entropy(x, torch.from_numpy(targets.astype(np.int64)), ignore_index=IGNORE)  # mean over valid
    loss.backward()
    n_valid = int((targets != IGNORE).sum())
    losses, dlogits = bk.ops.softmax_ce(bk.put(logits), targets, grad_scale=1.0 / n_valid)
    np.testing.assert_allclose(bk.get(losses).sum() / n_valid, loss.item(), rtol=1e-5)
    assert_rel(bk.get(dlogits), x.grad.numpy(), TOL[bk.device, bk.dtype]["dlogits"], "dlogits")


@pytest.mark.parametrize("offset", [0, 3])
def test_softmax_ce_large_out_of_place_streaming(rng, offset):
    """CPU: N*V >= 8 Mi takes the non-temporal-store path (AVX-512); dlogits misaligned by `offset` floats."""
    N, V = 167, 50304
    logits = rng.standard_normal((N, V)).astype(np.float32) * 3
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[3] = IGNORE
    buf = np.full(N * V + offset, np.nan, np.float32)
    dlogits = buf[offset:].reshape(N, V)
    losses = np.empty(N, np.float32)
    _C.softmax_ce(losses, dlogits, logits, targets, 0.5, -1)
    rows = [0, 3, 100, N - 1]  # rows are independent: check a few against the float64 reference ...
    ref_l, ref_d = reference.softmax_ce(logits[rows], targets[rows], grad_scale=0.5)
    assert_losses(losses[rows], ref_l, 2e-5)
    assert_rel(dlogits[rows], ref_d, 1e-5, "dlogits")
    assert np.abs(dlogits.sum(1)).max() < 1e-5  # ... and all: every element written, (softmax - onehot) sums to 0


# ---- fused lm-head + cross-entropy ----------------------------------------------------------------------------


def lmhead_reference(hidden, weight, targets, grad_scale, row_weights=None):
    logits = reference.matmul_forward(hidden.reshape(-1, hidden.shape[-1]), weight)
    losses, dlogits = reference.softmax_ce(logits, targets, grad_scale)
    if row_weights is not None:
        dlogits = dlogits * row_weights.reshape(-1, 1)
    dh, dw, _ = reference.matmul_backward(dlogits, hidden.reshape(-1, hidden.shape[-1]), weight)
    return losses, dh.reshape(hidden.shape), dw


def lmhead_inputs(bk, rng, lead, C, V):
    hidden = bk.rounded(rng.standard_normal((*lead, C)))
    weight = bk.rounded(rng.standard_normal((V, C)) / np.sqrt(C))
    targets = rng.integers(0, V, lead).astype(np.int32)
    targets[rng.random(lead) < 0.2] = IGNORE
    return hidden, weight, targets


# (N, C, V): V = 1 and 5 (the GPU scratch falls back to row stride V), odd V (padded stride)
LM_SHAPES = [(1, 3, 1), (1, 8, 5), (7, 17, 5), (7, 16, 131), (10, 64, 257), (13, 24, 771), (37, 96, 1000)]


@pytest.mark.parametrize("N,C,V", LM_SHAPES)
@pytest.mark.parametrize("scratch_rows", [None, 1, 3, 64], ids=lambda r: f"scratch{r}")
def test_lmhead_ce_matches_reference(bk, rng, N, C, V, scratch_rows):
    check_lmhead(bk, rng, N, C, V, scratch_rows)


@pytest.mark.gpu_scale
@pytest.mark.backends(devices=("cuda",), variants=False)
@pytest.mark.parametrize("N,C,V,scratch_rows", [(300, 64, 50257, None), (300, 64, 50257, 1), (300, 64, 50257, 64),
                                                (256, 768, 50257, 100)])
def test_lmhead_ce_gpt2_vocab(bk, rng, N, C, V, scratch_rows):
    """GPT-2's V = 50257 (odd: the scratch rows are padded to 50264 for the tensor-core gemms)."""
    check_lmhead(bk, rng, N, C, V, scratch_rows)


def check_lmhead(bk, rng, N, C, V, scratch_rows):
    tol = TOL[bk.device, bk.dtype]
    hidden, weight, targets = lmhead_inputs(bk, rng, (N,), C, V)
    scale = 1.0 / max(int((targets != IGNORE).sum()), 1)
    ref_l, ref_dh, ref_dw = lmhead_reference(hidden, weight, targets, scale)
    # the gradients accumulate into non-zero buffers of the gradients' own magnitude
    dh0 = bk.rounded(rng.standard_normal(hidden.shape) * ref_dh.std())
    dw0 = (rng.standard_normal(weight.shape) * ref_dw.std()).astype(np.float32)
    dh, dw = bk.put(dh0), bk.put(dw0, "float32")
    scratch = None if scratch_rows is None else bk.ops.empty((scratch_rows, V), bk.dtype)
    h, w = bk.put(hidden), bk.put(weight)
    losses, dh_, dw_ = bk.ops.lmhead_ce(h, w, targets, grad_scale=scale, dhidden=dh, dweight=dw, scratch=scratch,
                                        losses=bk.poisoned((N,), "float32"))
    assert dh_ is dh and dw_ is dw
    assert_losses(bk.get(losses), ref_l, tol["lm_loss"])
    assert_rel(bk.get(dh), dh0 + ref_dh, tol["lm_grad"], "dhidden")
    assert_rel(bk.get(dw), dw0 + ref_dw, tol["lm_grad"], "dweight")
    fwd_only, none_h, none_w = bk.ops.lmhead_ce(h, w, targets, backward=False, scratch=scratch)
    assert none_h is None and none_w is None
    assert_losses(bk.get(fwd_only), ref_l, tol["lm_loss"], "forward-only losses")


def test_lmhead_ce_row_weights_and_batch_shape(bk, rng):
    tol = TOL[bk.device, bk.dtype]
    hidden, weight, targets = lmhead_inputs(bk, rng, (5, 10), 32, 517)
    w = rng.standard_normal((5, 10)).astype(np.float32)
    losses, dh, dw = bk.ops.lmhead_ce(bk.put(hidden), bk.put(weight), targets, grad_scale=0.5, row_weights=w,
                                      scratch=bk.ops.empty((7, 517), bk.dtype))
    ref_l, ref_dh, ref_dw = lmhead_reference(hidden, weight, targets, 0.5, w)
    assert bk.get(losses).shape == (5, 10) and bk.get(dh).shape == (5, 10, 32)
    assert_losses(bk.get(losses).reshape(-1), ref_l, tol["lm_loss"])
    assert_rel(bk.get(dh), ref_dh, tol["lm_grad"], "dhidden")
    assert_rel(bk.get(dw), ref_dw, tol["lm_grad"], "dweight")


@pytest.mark.parametrize("grads", ["dhidden", "dweight", "none"])
def test_lmhead_ce_one_gradient(bk, rng, grads):
    """The native kernel computes only the gradients it is given (the wrappers always pass both)."""
    tol = TOL[bk.device, bk.dtype]
    native = _C.cuda if bk.is_cuda else _C
    hidden, weight, targets = lmhead_inputs(bk, rng, (50,), 32, 517)
    ref_l, ref_dh, ref_dw = lmhead_reference(hidden, weight, targets, 1.0)
    dh = bk.zeros(hidden.shape) if grads == "dhidden" else None
    dw = bk.zeros(weight.shape, "float32") if grads == "dweight" else None
    losses = bk.poisoned((50,), "float32")
    native.lmhead_ce(losses, dh, dw, bk.put(hidden), bk.put(weight), bk.ids(targets), 1.0, IGNORE,
                     bk.ops.empty((7, 517), bk.dtype), None)
    assert_losses(bk.get(losses), ref_l, tol["lm_loss"])
    if dh is not None:
        assert_rel(bk.get(dh), ref_dh, tol["lm_grad"], "dhidden")
    if dw is not None:
        assert_rel(bk.get(dw), ref_dw, tol["lm_grad"], "dweight")


@pytest.mark.backends(variants=False)
def test_lmhead_ce_vs_torch(bk, rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    tol = TOL[bk.device, bk.dtype]
    hidden, weight, targets = lmhead_inputs(bk, rng, (12,), 32, 501)
    h = torch.from_numpy(hidden.copy()).requires_grad_()
    w = torch.from_numpy(weight.copy()).requires_grad_()
    loss = F.cross_entropy(F.linear(h, w), torch.from_numpy(targets.astype(np.int64)), ignore_index=IGNORE,
                           reduction="sum")
    loss.backward()
    losses, dh, dw = bk.ops.lmhead_ce(bk.put(hidden), bk.put(weight), targets,
                                      scratch=bk.ops.empty((5, 501), bk.dtype))
    np.testing.assert_allclose(bk.get(losses).sum(), loss.item(), rtol=tol["lm_loss"])
    assert_rel(bk.get(dh), h.grad.numpy(), tol["lm_grad"], "dhidden")
    assert_rel(bk.get(dw), w.grad.numpy(), tol["lm_grad"], "dweight")


# ---- ids out of range: numpy targets are refused on both devices; targets already on the GPU give NaN losses


def test_numpy_targets_out_of_range(bk, rng):
    logits, targets = make(bk, rng, (3, 8), ignore_frac=0)
    for bad in (8, -2):
        t = targets.copy()
        t[1] = bad
        with pytest.raises(ValueError, match="targets"):
            bk.ops.softmax_ce(bk.put(logits), t)
        with pytest.raises(ValueError, match="targets"):
            bk.ops.lmhead_ce(bk.put(np.zeros((3, 4))), bk.put(np.zeros((8, 4))), t)
    with pytest.raises(TypeError, match="targets"):
        bk.ops.softmax_ce(bk.put(logits), targets.astype(np.float32))
    with pytest.raises(TypeError, match="targets"):
        bk.ops.lmhead_ce(bk.put(np.zeros((3, 4))), bk.put(np.zeros((8, 4))), targets.astype(np.float64))


@pytest.mark.backends(devices=("cuda",), variants=False)
def test_device_targets_out_of_range_give_nan(bk, rng):
    N, V = 6, 33
    logits, _ = make(bk, rng, (N, V))
    targets = bk.ids([0, V, -5, IGNORE, 32, 2**30])
    bad = np.array([False, True, True, False, False, True])
    losses, d = bk.ops.softmax_ce(bk.put(logits), targets)
    got = bk.get(losses)
    assert np.isnan(got[bad]).all() and np.isfinite(got[~bad]).all(), got
    assert np.isfinite(bk.get(d)).all()
    losses, _, _ = bk.ops.lmhead_ce(bk.put(rng.standard_normal((N, 16))), bk.put(rng.standard_normal((V, 16))),
                                    targets, backward=False)
    got = bk.get(losses)
    assert np.isnan(got[bad]).all() and np.isfinite(got[~bad]).all(), got


# ---- bad input: numpy arrays on the CPU, DeviceArrays on the GPU


def test_softmax_ce_bad_input_cpu(rng):
    logits = rng.standard_normal((3, 8)).astype(np.float32)
    targets = np.array([0, 1, 7], np.int32)
    losses, d = np.empty(3, np.float32), np.empty((3, 8), np.float32)
    with pytest.raises(TypeError, match="logits"):
        ops.softmax_ce(logits.astype(np.float64), targets)
    with pytest.raises(TypeError, match="dlogits"):
        _C.softmax_ce(losses, d.astype(np.float64), logits, targets, 1.0, -1)
    with pytest.raises(ValueError, match="targets"):
        ops.softmax_ce(logits, targets[:2])
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
    with pytest.raises(ValueError, match="row_weights"):
        ops.softmax_ce(logits, targets, row_weights=np.ones(4, np.float32))


@pytest.mark.cuda
def test_softmax_ce_bad_input_cuda():
    N, V = 4, 10
    logits = cuda.zeros((N, V), "bfloat16")
    targets = cuda.zeros((N,), "int32")
    with pytest.raises(TypeError, match="logits must be float32 or bfloat16"):
        cuda.softmax_ce(cuda.zeros((N, V), "int32"), targets)
    with pytest.raises(TypeError, match="targets must have dtype int32"):
        cuda.softmax_ce(logits, cuda.zeros((N,)))
    with pytest.raises(ValueError, match="targets must have shape"):
        cuda.softmax_ce(logits, cuda.zeros((N + 1,), "int32"))
    with pytest.raises(TypeError, match="losses must have dtype float32"):
        cuda.softmax_ce(logits, targets, losses=cuda.zeros((N,), "bfloat16"))
    with pytest.raises(ValueError, match="losses must have shape"):
        cuda.softmax_ce(logits, targets, losses=cuda.zeros((N, 1)))
    with pytest.raises(ValueError, match="V >= 1"):
        cuda.softmax_ce(cuda.zeros((N, 0)), targets)
    with pytest.raises(ValueError, match="row_weights"):
        cuda.softmax_ce(logits, targets, row_weights=np.ones(N + 1, np.float32))
    with pytest.raises(TypeError, match="row_weights"):
        cuda.softmax_ce(logits, targets, row_weights=np.ones(N, np.float64))
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            cuda.softmax_ce(logits, targets, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):  # float32 0 (the native check)
        _C.cuda.softmax_ce(cuda.zeros((N,)), None, logits, targets, 1.0, -1, None, 0.0, 1e-46)
    # the binding refuses a dlogits of another dtype, shape, or partly overlapping the logits
    losses = cuda.zeros((N,))
    with pytest.raises(TypeError, match="dlogits must have dtype bfloat16"):
        _C.cuda.softmax_ce(losses, cuda.zeros((N, V)), logits, targets)
    with pytest.raises(ValueError, match="dlogits must have shape"):
        _C.cuda.softmax_ce(losses, cuda.zeros((N, V + 1), "bfloat16"), logits, targets)
    buf = cuda.zeros((2 * N * V,), "bfloat16")
    with pytest.raises(ValueError, match="dlogits must be logits itself"):
        _C.cuda.softmax_ce(losses, buf.view(1, (N, V)), buf.view(0, (N, V)), targets)


def test_lmhead_ce_bad_input_cpu(rng):
    hidden = rng.standard_normal((4, 8)).astype(np.float32)
    weight = rng.standard_normal((11, 8)).astype(np.float32)
    targets = np.array([0, 1, 10, -1], np.int32)
    with pytest.raises(TypeError, match="hidden"):
        ops.lmhead_ce(hidden.astype(np.float64), weight, targets)
    with pytest.raises(TypeError, match="weight"):
        ops.lmhead_ce(hidden, weight.astype(np.float64), targets)
    with pytest.raises(ValueError, match="weight"):
        ops.lmhead_ce(hidden, weight[:, :7].copy(), targets)
    with pytest.raises(ValueError, match="scratch"):
        ops.lmhead_ce(hidden, weight, targets, scratch=np.empty((0, 11), np.float32))
    with pytest.raises(ValueError, match="scratch"):
        ops.lmhead_ce(hidden, weight, targets, scratch=np.empty((3, 10), np.float32))
    with pytest.raises(ValueError, match="dweight"):
        ops.lmhead_ce(hidden, weight, targets, dweight=np.zeros((11, 7), np.float32))


def test_zero_vocab_huge_integers_and_overlaps_cpu(rng):
    """V = 0 and integers past their C type give a ValueError naming the argument (they used to fail in numpy's
    reshape, or with pybind11's 'incompatible function arguments' dump); outputs may not overlap inputs."""
    logits = rng.standard_normal((3, 8)).astype(np.float32)
    targets = np.array([0, 1, 7], np.int32)
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
    ops.softmax_ce(logits.copy(), targets, inplace=True)  # dlogits = logits: allowed
    with pytest.raises(ValueError, match="dlogits overlaps logits"):
        buf = np.zeros(32, np.float32)
        _C.softmax_ce(np.zeros(3, np.float32), buf[4:28].reshape(3, 8), buf[:24].reshape(3, 8), targets, 1.0, -1)


@pytest.mark.cuda
def test_lmhead_ce_bad_input_cuda():
    N, C, V = 4, 8, 10
    h = cuda.zeros((N, C), "bfloat16")
    w = cuda.zeros((V, C), "bfloat16")
    t = cuda.zeros((N,), "int32")
    with pytest.raises(TypeError, match="weight must have dtype bfloat16"):
        cuda.lmhead_ce(h, cuda.zeros((V, C)), t)
    with pytest.raises(ValueError, match="hidden must be"):
        cuda.lmhead_ce(cuda.zeros((N, C + 1), "bfloat16"), w, t)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        cuda.lmhead_ce(h, cuda.zeros((V * C,), "bfloat16"), t)
    with pytest.raises(ValueError, match="targets must have shape"):
        cuda.lmhead_ce(h, w, cuda.zeros((N - 1,), "int32"))
    with pytest.raises(TypeError, match="dhidden must have dtype bfloat16"):
        cuda.lmhead_ce(h, w, t, dhidden=cuda.zeros((N, C)))
    with pytest.raises(TypeError, match="dweight must have dtype float32"):
        cuda.lmhead_ce(h, w, t, dweight=cuda.zeros((V, C), "bfloat16"))
    with pytest.raises(ValueError, match="dweight must have shape"):
        cuda.lmhead_ce(h, w, t, dweight=cuda.zeros((C, V)))
    with pytest.raises(ValueError, match="scratch must be"):
        cuda.lmhead_ce(h, w, t, scratch=cuda.zeros((3, V + 1), "bfloat16"))
    with pytest.raises(TypeError, match="scratch must have hidden's dtype"):
        cuda.lmhead_ce(h, w, t, scratch=cuda.zeros((3, V)))
    with pytest.raises(ValueError, match="dhidden must not overlap hidden"):
        cuda.lmhead_ce(h, w, t, dhidden=h)
    with pytest.raises(ValueError, match="temperature"):
        cuda.lmhead_ce(h, w, t, temperature=float("nan"))
    with pytest.raises(ValueError, match="temperature"):
        _C.cuda.lmhead_ce(cuda.zeros((N,)), None, None, h, w, t, 1.0, -1, None, None, 0.0, -2.0)


def test_lmhead_chunk_rows_cpu():
    assert ops.lmhead_chunk_rows(16384, 50257) == 1024  # 256..1024 rows, <= 256 MiB, a multiple of 64
    assert ops.lmhead_chunk_rows(16384, 151936) == 384
    assert ops.lmhead_chunk_rows(16384, 4096) == 1024
    assert ops.lmhead_chunk_rows(16384, 10**7) == 256
    assert ops.lmhead_chunk_rows(10, 50257) == 10


@pytest.mark.cuda
def test_lmhead_chunk_rows():
    assert cuda.lmhead_chunk_rows(16384, 50257, "bfloat16") == 2560  # <= 256 MiB of scratch, a multiple of 128
    assert cuda.lmhead_chunk_rows(10, 50257, "float32") == 10


# ---- logit soft-capping (softcap=c: z = c * tanh(logits / c), Gemma 2 / nanochat) ---------------------------


def softcap_torch(logits, targets, c, grad_scale=1.0, hidden=None):
    """(losses, dlogits or (dhidden, dweight)) from torch autograd in float64 (logits = hidden @ weight^T when
    hidden is given: logits is then the weight)."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    h = None if hidden is None else torch.tensor(np.asarray(hidden, np.float64), requires_grad=True)
    z = x if h is None else h @ x.T
    z = c * torch.tanh(z / c)
    loss = torch.nn.functional.cross_entropy(z, torch.as_tensor(targets, dtype=torch.long), ignore_index=IGNORE,
                                             reduction="none")
    (loss.sum() * grad_scale).backward()
    grads = x.grad.numpy() if h is None else (h.grad.numpy(), x.grad.numpy())
    return loss.detach().numpy(), grads


@pytest.mark.backends(variants=("cpu",))  # every SIMD level (the vectorized tanh and its scalar tail)
@pytest.mark.parametrize("N,V,c", [(3, 17, 2.0), (5, 771, 15.0), (9, 1001, 7.0), (2, 50257, 30.0)])
@pytest.mark.parametrize("inplace", [False, True])
def test_softmax_ce_softcap_vs_torch(bk, rng, N, V, c, inplace):
    tol = TOL[bk.device, bk.dtype]
    logits, targets = make(bk, rng, (N, V), scale=3 * c)  # many logits in the saturated range
    targets[0] = IGNORE
    ref_l, ref_d = softcap_torch(logits, targets, c, grad_scale=0.5)
    losses, d = bk.ops.softmax_ce(bk.put(logits), targets, grad_scale=0.5, inplace=inplace, softcap=c)
    assert_losses(bk.get(losses), ref_l, tol["loss"])
    assert_rel(bk.get(d), ref_d, tol["dlogits"], "dlogits")


@pytest.mark.backends(variants=("cpu",))
def test_lmhead_ce_softcap_vs_torch(bk, rng):
    N, C, V, c = 37, 24, 301, 4.0
    hidden, weight = bk.rounded(rng.standard_normal((N, C))), bk.rounded(rng.standard_normal((V, C)))
    targets = rng.integers(0, V, N).astype(np.int32)
    targets[3] = IGNORE
    ref_l, (ref_dh, ref_dw) = softcap_torch(weight, targets, c, grad_scale=1 / N, hidden=hidden)
    tol = {("cpu", "float32"): 1e-4, ("cuda", "float32"): 2e-3, ("cuda", "bfloat16"): 3e-2}[bk.device, bk.dtype]
    h, w = bk.put(hidden), bk.put(weight)
    losses, dh, dw = bk.ops.lmhead_ce(h, w, targets, grad_scale=1 / N, scratch=bk.ops.empty((8, V), bk.dtype),
                                      softcap=c)  # several chunks
    np.testing.assert_allclose(bk.get(losses), ref_l, rtol=tol, atol=tol)
    assert_rel(bk.get(dh), ref_dh, tol, "dhidden")
    assert_rel(bk.get(dw), ref_dw, tol, "dweight")
    losses_eval, _, _ = bk.ops.lmhead_ce(h, w, targets, backward=False, softcap=c)
    np.testing.assert_allclose(bk.get(losses_eval), ref_l, rtol=tol, atol=tol)


# ---- temperature (the logits, after any cap, divided by T: RL's log-probs of the distribution sampled at T) -----


TEMPERATURES = [0.7, 1.0, 1.3]


def tempered_torch(logits, targets, T, c=None, grad_scale=1.0, row_weights=None, hidden=None):
    """(losses, dlogits or (dhidden, dweight)) from torch autograd in float64 of
    grad_scale * sum_n w[n] * -log_softmax(cap(logits) / T)[n, target] (logits = hidden @ weight^T when hidden is
    given: logits is then the weight)."""
    torch = pytest.importorskip("torch")
    x = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    h = None if hidden is None else torch.tensor(np.asarray(hidden, np.float64), requires_grad=True)
    z = x if h is None else h @ x.T
    if c is not None:
        z = c * torch.tanh(z / c)
    t = torch.as_tensor(np.asarray(targets).reshape(-1), dtype=torch.long)
    keep = t != IGNORE
    lp = torch.log_softmax(z.reshape(len(t), -1) / T, -1).gather(-1, t.clamp(min=0)[:, None])[:, 0]
    loss = torch.where(keep, -lp, torch.zeros_like(lp))
    w = torch.ones_like(loss) if row_weights is None else torch.tensor(np.asarray(row_weights, np.float64).ravel())
    (grad_scale * (loss * w).sum()).backward()
    grads = x.grad.numpy() if h is None else (h.grad.numpy(), x.grad.numpy())
    return loss.detach().numpy(), grads


@pytest.mark.backends(variants=("cpu",))  # every SIMD level: the scaled row goes through each row routine
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (5, 771), (2, 3, 129), (4, 50257)], ids=str)
@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("c", [None, 5.0], ids=["nocap", "cap5"])
@pytest.mark.parametrize("mode", ["out", "inplace"])
def test_softmax_ce_temperature_vs_reference_and_torch(bk, rng, shape, T, c, mode):
    """temperature T: the loss of softmax(cap(x) / T) and its gradient with respect to x, (softmax - onehot) / T
    (* the cap's derivative), with row weights; against the float64 reference and torch autograd of
    log_softmax(logits / T)."""
    tol = TOL[bk.device, bk.dtype]
    logits, targets = make(bk, rng, shape, scale=4.0)  # some logits in the cap's saturated range
    w = rng.standard_normal(shape[:-1]).astype(np.float32)
    ref_l, ref_d = reference.softmax_ce_tempered(logits, targets, T, c, grad_scale=0.5)
    ref_d = ref_d * w.reshape(-1, 1)
    torch_l, torch_d = tempered_torch(logits, targets, T, c, grad_scale=0.5, row_weights=w)
    np.testing.assert_allclose(ref_l, torch_l, atol=1e-12)  # the two oracles agree
    np.testing.assert_allclose(ref_d, torch_d.reshape(ref_d.shape), atol=1e-12)
    losses, d = bk.ops.softmax_ce(bk.put(logits), targets, grad_scale=0.5, inplace=mode == "inplace",
                                  row_weights=w, softcap=c, temperature=T, losses=bk.poisoned(shape[:-1], "float32"))
    assert_losses(bk.get(losses).reshape(-1), ref_l, tol["loss"])
    assert_rel(bk.get(d).reshape(ref_d.shape), ref_d, tol["dlogits"], "dlogits")
    loss_only, none = bk.ops.softmax_ce(bk.put(logits), targets, backward=False, softcap=c, temperature=T)
    assert none is None
    assert_losses(bk.get(loss_only).reshape(-1), ref_l, tol["loss"], "forward-only losses")


@pytest.mark.parametrize("T", TEMPERATURES)
@pytest.mark.parametrize("c", [None, 4.0], ids=["nocap", "cap4"])
@pytest.mark.parametrize("N,C,V,rows", [(1, 3, 1, None), (13, 24, 771, 5), (37, 16, 301, 8)])
def test_lmhead_ce_temperature_vs_torch(bk, rng, T, c, N, C, V, rows):
    """The fused lm-head at temperature T (several chunks): losses and the gradients of
    sum_n w[n] * -log_softmax(cap(hidden @ W^T) / T)[n, target] against torch autograd (float64)."""
    hidden, weight, targets = lmhead_inputs(bk, rng, (N,), C, V)
    weight = bk.rounded(weight * 3)  # logits of a few units: the temperature and the cap both matter
    w = rng.standard_normal(N).astype(np.float32)
    ref_l, (ref_dh, ref_dw) = tempered_torch(weight, targets, T, c, grad_scale=1 / N, row_weights=w, hidden=hidden)
    tol = {("cpu", "float32"): 1e-4, ("cuda", "float32"): 2e-3, ("cuda", "bfloat16"): 3e-2}[bk.device, bk.dtype]
    scratch = None if rows is None else bk.ops.empty((rows, V), bk.dtype)
    h, W = bk.put(hidden), bk.put(weight)
    losses, dh, dw = bk.ops.lmhead_ce(h, W, targets, grad_scale=1 / N, row_weights=w, scratch=scratch, softcap=c,
                                      temperature=T)
    np.testing.assert_allclose(bk.get(losses), ref_l, rtol=tol, atol=tol)
    assert_rel(bk.get(dh), ref_dh, tol, "dhidden")
    assert_rel(bk.get(dw), ref_dw, tol, "dweight")
    fwd, _, _ = bk.ops.lmhead_ce(h, W, targets, backward=False, softcap=c, temperature=T)
    np.testing.assert_allclose(bk.get(fwd), ref_l, rtol=tol, atol=tol)


@pytest.mark.backends(variants=("cpu",))
@pytest.mark.parametrize("c", [None, 6.0], ids=["nocap", "cap6"])
def test_temperature_one_is_bit_for_bit_none(bk, rng, c):
    """temperature=1 takes no extra step: the kernels' results are those without the argument, bit for bit."""
    logits, targets = make(bk, rng, (7, 1001), scale=5.0)
    w = rng.standard_normal(7).astype(np.float32)
    a = bk.ops.softmax_ce(bk.put(logits), targets, grad_scale=0.3, row_weights=w, softcap=c)
    b = bk.ops.softmax_ce(bk.put(logits), targets, grad_scale=0.3, row_weights=w, softcap=c, temperature=1.0)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(bk.get(x), bk.get(y))
    hidden, weight, targets = lmhead_inputs(bk, rng, (9,), 16, 203)
    a = bk.ops.lmhead_ce(bk.put(hidden), bk.put(weight), targets, row_weights=w[:1].repeat(9), softcap=c)
    b = bk.ops.lmhead_ce(bk.put(hidden), bk.put(weight), targets, row_weights=w[:1].repeat(9), softcap=c,
                         temperature=1)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(bk.get(x), bk.get(y))


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf"), 1e-45])
def test_temperature_bad_values(rng, bad):
    logits, targets = rng.standard_normal((2, 5)).astype(np.float32), np.array([1, 3], np.int32)
    with pytest.raises(ValueError, match="temperature"):
        if bad == 1e-45:  # a float64 > 0 whose float32 (or its reciprocal) is not: the native check
            _C.softmax_ce(np.empty(2, np.float32), None, logits, targets, 1.0, -1, None, 0.0, bad)
        else:
            ops.softmax_ce(logits, targets, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        _C.lmhead_ce(np.empty(2, np.float32), None, None, logits, logits.copy(), targets, 1.0, -1, None, None, 0.0,
                     bad)
    with pytest.raises(TypeError, match="temperature"):
        ops.lmhead_ce(logits, logits.copy(), targets, temperature="0.7")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_softcap_bad_values(rng, bad):
    logits, targets = rng.standard_normal((2, 5)).astype(np.float32), np.array([1, 3], np.int32)
    with pytest.raises(ValueError, match="softcap"):
        ops.softmax_ce(logits, targets, softcap=bad)
    with pytest.raises(ValueError, match="softcap"):
        _C.softmax_ce(np.empty(2, np.float32), None, logits, targets, 1.0, -1, None, bad if bad else -1.0)
    with pytest.raises(TypeError, match="softcap"):
        ops.lmhead_ce(logits, logits.copy(), targets, softcap="7")
