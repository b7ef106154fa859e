"""CUDA softmax + cross-entropy and the fused classifier (csrc/cuda/softmax_ce.cu):
fastllm.cuda.softmax_cross_entropy and fastllm.cuda.lmhead_cross_entropy vs the CPU kernels (fastllm.ops) on the
values the GPU holds (bf16-rounded inputs, computed in fp32 on the CPU).

Tolerances (max |got - ref| over the scale named): losses absolute, 2e-4 for fp32 logits (fast exp/log, fp32
sums over V), 3e-2 for the classifier in bf16 (its logits are rounded to bf16 in the scratch: 2^-9 |logit|);
gradients max-norm relative, 1e-4 fp32, 1e-2 bf16 dlogits, 3e-2 bf16 classifier gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import reference

from fastllm import cuda, ops

gpu = pytest.mark.cuda
IGNORE = cuda.IGNORE_INDEX  # the default of every kernel and of the model


def bf16_round(x) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return u.astype(np.uint32).view(np.float32)


def upload(x, dtype):
    """(device array, float32 copy of what the device holds)"""
    x = np.ascontiguousarray(x, np.float32)
    return cuda.to_device(x, dtype=dtype), (bf16_round(x) if dtype == "bfloat16" else x.copy())


def max_abs(name, got, ref, tol):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert np.isfinite(got).all(), f"{name}: {np.count_nonzero(~np.isfinite(got))} non-finite of {got.size}"
    err = float(np.abs(got - ref).max()) if got.size else 0.0
    assert err < tol, f"{name}: max abs error {err:.3g} >= {tol:g}"


def max_rel(name, got, ref, tol):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (name, got.shape, ref.shape)
    assert np.isfinite(got).all(), f"{name}: {np.count_nonzero(~np.isfinite(got))} non-finite of {got.size}"
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-6)) if got.size else 0.0
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol:g}"


def make_targets(rng, shape, V, ignore_frac=0.2):
    t = rng.integers(0, V, size=shape).astype(np.int32)
    t[rng.random(shape) < ignore_frac] = IGNORE
    return t


# ---- softmax_cross_entropy


@gpu
@pytest.mark.parametrize("shape", [(1, 1), (5, 7), (64, 1000), (3, 2, 129), (33, 50257)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["out", "inplace", "loss_only"])
def test_softmax_ce_vs_cpu(rng, shape, dtype, mode):
    *lead, V = shape
    logits_np = (3 * rng.standard_normal(shape)).astype(np.float32)
    targets_np = make_targets(rng, tuple(lead), V)
    n_valid = max(int((targets_np != IGNORE).sum()), 1)
    scale = 1.0 / n_valid
    logits, stored = upload(logits_np, dtype)
    targets = cuda.to_device(targets_np)
    losses = cuda.to_device(np.full(lead, np.nan, np.float32))
    dlogits = {"out": cuda.to_device(np.full(shape, np.nan, np.float32), dtype), "inplace": logits, "loss_only": None}[
        mode
    ]
    cuda.softmax_cross_entropy(losses, dlogits, logits, targets, grad_scale=scale, ignore_index=IGNORE)
    ref_losses, ref_d = ops.softmax_cross_entropy(stored, targets_np, grad_scale=scale, ignore_index=IGNORE)
    max_abs("losses", losses.numpy(), ref_losses, 2e-4)
    if dlogits is not None:
        max_rel("dlogits", dlogits.numpy(), ref_d, 1e-4 if dtype == "float32" else 1e-2)
        d = dlogits.numpy().reshape(-1, V)
        assert not d[(targets_np == IGNORE).reshape(-1)].any(), "ignored rows must have zero gradient"


@gpu
def test_softmax_ce_flat_rows_and_extremes(rng):
    """losses/targets given flat (N,) for logits (B, T, V); large and -inf (masked) logits stay finite.
    Oracle: the float64 reference (the CPU kernel returns NaN for rows with -inf logits)."""
    B, T, V = 2, 3, 50
    x = rng.standard_normal((B, T, V)).astype(np.float32)
    x[0, 0, 7] = 80.0
    x[0, 1, :10] = -np.inf
    x[1, 2, 3] = -1e4
    targets_np = np.array([7, 12, 0, 49, IGNORE, 3], np.int32)
    logits = cuda.to_device(x)
    losses = cuda.empty((B * T,))
    cuda.softmax_cross_entropy(losses, logits, logits, cuda.to_device(targets_np))
    ref_losses, ref_d = reference.softmax_cross_entropy(x.reshape(-1, V), targets_np, ignore_index=IGNORE)
    # the -1e4 target logit gives a loss of ~1e4, stored in fp32 (half an ulp there is 4.9e-4): the loss error
    # is relative to max(1, |loss|) here
    got = losses.numpy().astype(np.float64)
    assert np.isfinite(got).all(), got
    err = float((np.abs(got - ref_losses) / np.maximum(1.0, np.abs(ref_losses))).max())
    assert err < 2e-4, f"losses: error {err:.3g} (relative to max(1, |loss|)) >= 2e-4"
    max_abs("dlogits", logits.numpy().reshape(-1, V), ref_d, 1e-5)


@gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_softmax_ce_bad_targets_give_nan(rng, dtype):
    N, V = 6, 33
    logits_np = rng.standard_normal((N, V)).astype(np.float32)
    targets_np = np.array([0, V, -5, IGNORE, 32, 2**30], np.int32)
    logits, _ = upload(logits_np, dtype)
    losses = cuda.empty((N,))
    d = cuda.empty((N, V), dtype)
    cuda.softmax_cross_entropy(losses, d, logits, cuda.to_device(targets_np))
    got = losses.numpy()
    bad = np.array([False, True, True, False, False, True])
    assert np.isnan(got[bad]).all() and np.isfinite(got[~bad]).all(), got
    assert np.isfinite(d.numpy()).all()


# ---- lmhead_cross_entropy (the fused classifier)


def run_lmhead(rng, N, C, V, dtype, grads, scratch_rows, lead=None):
    lead = lead or (N,)
    h_np = rng.standard_normal((*lead, C)).astype(np.float32)
    w_np = (rng.standard_normal((V, C)) / np.sqrt(C)).astype(np.float32)
    t_np = make_targets(rng, lead, V)
    scale = 1.0 / max(int((t_np != IGNORE).sum()), 1)
    h, hs = upload(h_np, dtype)
    w, ws = upload(w_np, dtype)
    ref_l, ref_dh, ref_dw = ops.lmhead_cross_entropy(hs, ws, t_np, grad_scale=scale, ignore_index=IGNORE)
    # gradients accumulate into non-zero buffers of the gradients' own magnitude
    dh0 = (rng.standard_normal(h_np.shape) * ref_dh.std()).astype(np.float32)
    dw0 = (rng.standard_normal(w_np.shape) * ref_dw.std()).astype(np.float32)
    dh = dw = None
    if grads in ("both", "dhidden"):
        dh, dh0 = upload(dh0, dtype)
    if grads in ("both", "dweight"):
        dw = cuda.to_device(dw0)
    losses = cuda.to_device(np.full(lead, np.nan, np.float32))
    scratch = None if scratch_rows is None else cuda.empty((scratch_rows, V), dtype)
    cuda.lmhead_cross_entropy(
        losses, dh, dw, h, w, cuda.to_device(t_np), grad_scale=scale, ignore_index=IGNORE, scratch=scratch
    )
    return (
        losses.numpy(),
        ref_l,
        None if dh is None else (dh.numpy(), dh0 + ref_dh),
        None if dw is None else (dw.numpy(), dw0 + ref_dw),
    )


@gpu
@pytest.mark.parametrize(
    "N,C,V", [(1, 8, 5), (10, 64, 257), (37, 96, 1000), pytest.param(300, 64, 50257, marks=pytest.mark.gpu_scale)],
    ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("scratch_rows", [None, 1, 3, 64], ids=lambda r: f"scratch{r}")
def test_lmhead_vs_cpu(rng, N, C, V, dtype, scratch_rows):
    losses, ref_l, dh, dw = run_lmhead(rng, N, C, V, dtype, "both", scratch_rows)
    f32 = dtype == "float32"
    max_abs("losses", losses, ref_l, 2e-4 if f32 else 3e-2)
    max_rel("dhidden", *dh, 1e-4 if f32 else 3e-2)
    max_rel("dweight", *dw, 1e-4 if f32 else 3e-2)


@gpu
@pytest.mark.parametrize("grads", ["none", "dhidden", "dweight"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lmhead_partial_outputs(rng, grads, dtype):
    losses, ref_l, dh, dw = run_lmhead(rng, 50, 32, 517, dtype, grads, 7, lead=(5, 10))
    f32 = dtype == "float32"
    max_abs("losses", losses, ref_l, 2e-4 if f32 else 3e-2)
    if dh is not None:
        max_rel("dhidden", *dh, 1e-4 if f32 else 3e-2)
    if dw is not None:
        max_rel("dweight", *dw, 1e-4 if f32 else 3e-2)


@gpu
@pytest.mark.gpu_scale
def test_lmhead_gpt2_vocab_bf16(rng):
    """GPT-2's V = 50257 (odd: the scratch rows are padded to 50264 for the tensor-core gemms), C = 768."""
    losses, ref_l, dh, dw = run_lmhead(rng, 256, 768, 50257, "bfloat16", "both", 100)
    max_abs("losses", losses, ref_l, 3e-2)
    max_rel("dhidden", *dh, 3e-2)
    max_rel("dweight", *dw, 3e-2)


@gpu
def test_lmhead_bad_targets_give_nan(rng):
    N, C, V = 4, 16, 40
    h = cuda.to_device(rng.standard_normal((N, C)).astype(np.float32))
    w = cuda.to_device(rng.standard_normal((V, C)).astype(np.float32))
    losses = cuda.empty((N,))
    cuda.lmhead_cross_entropy(losses, None, None, h, w, cuda.to_device(np.array([1, V, IGNORE, -5], np.int32)))
    got = losses.numpy()
    assert np.isfinite(got[[0, 2]]).all() and np.isnan(got[[1, 3]]).all(), got


# ---- bad input


def test_wrappers_reject_numpy():
    x = np.zeros((2, 3), np.float32)
    t = np.zeros(2, np.int32)
    with pytest.raises(TypeError, match="losses must be a fastllm.cuda.DeviceArray"):
        cuda.softmax_cross_entropy(np.zeros(2, np.float32), None, x, t)
    with pytest.raises(TypeError, match="losses must be a fastllm.cuda.DeviceArray"):
        cuda.lmhead_cross_entropy(np.zeros(2, np.float32), None, None, x, x, t)


@gpu
def test_softmax_ce_bad_input():
    N, V = 4, 10
    logits = cuda.zeros((N, V), "bfloat16")
    targets = cuda.zeros((N,), "int32")
    losses = cuda.zeros((N,))
    with pytest.raises(TypeError, match="logits must be float32 or bfloat16"):
        cuda.softmax_cross_entropy(losses, None, cuda.zeros((N, V), "int32"), targets)
    with pytest.raises(TypeError, match="targets must have dtype int32"):
        cuda.softmax_cross_entropy(losses, None, logits, cuda.zeros((N,)))
    with pytest.raises(ValueError, match="targets must have shape"):
        cuda.softmax_cross_entropy(losses, None, logits, cuda.zeros((N + 1,), "int32"))
    with pytest.raises(TypeError, match="losses must have dtype float32"):
        cuda.softmax_cross_entropy(cuda.zeros((N,), "bfloat16"), None, logits, targets)
    with pytest.raises(ValueError, match="losses must have shape"):
        cuda.softmax_cross_entropy(cuda.zeros((N, 1)), None, logits, targets)
    with pytest.raises(TypeError, match="dlogits must have dtype bfloat16"):
        cuda.softmax_cross_entropy(losses, cuda.zeros((N, V)), logits, targets)
    with pytest.raises(ValueError, match="dlogits must have shape"):
        cuda.softmax_cross_entropy(losses, cuda.zeros((N, V + 1), "bfloat16"), logits, targets)
    buf = cuda.zeros((2 * N * V,), "bfloat16")
    with pytest.raises(ValueError, match="dlogits must be logits itself"):
        cuda.softmax_cross_entropy(losses, buf.view(1, (N, V)), buf.view(0, (N, V)), targets)
    with pytest.raises(ValueError, match="V >= 1"):
        cuda.softmax_cross_entropy(losses, None, cuda.zeros((N, 0)), targets)


@gpu
def test_lmhead_bad_input():
    N, C, V = 4, 8, 10
    h = cuda.zeros((N, C), "bfloat16")
    w = cuda.zeros((V, C), "bfloat16")
    t = cuda.zeros((N,), "int32")
    losses = cuda.zeros((N,))
    with pytest.raises(TypeError, match="weight must have dtype bfloat16"):
        cuda.lmhead_cross_entropy(losses, None, None, h, cuda.zeros((V, C)), t)
    with pytest.raises(ValueError, match="hidden must be"):
        cuda.lmhead_cross_entropy(losses, None, None, cuda.zeros((N, C + 1), "bfloat16"), w, t)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        cuda.lmhead_cross_entropy(losses, None, None, h, cuda.zeros((V * C,), "bfloat16"), t)
    with pytest.raises(ValueError, match="targets must have shape"):
        cuda.lmhead_cross_entropy(losses, None, None, h, w, cuda.zeros((N - 1,), "int32"))
    with pytest.raises(TypeError, match="dhidden must have dtype bfloat16"):
        cuda.lmhead_cross_entropy(losses, cuda.zeros((N, C)), None, h, w, t)
    with pytest.raises(TypeError, match="dweight must have dtype float32"):
        cuda.lmhead_cross_entropy(losses, None, cuda.zeros((V, C), "bfloat16"), h, w, t)
    with pytest.raises(ValueError, match="dweight must have shape"):
        cuda.lmhead_cross_entropy(losses, None, cuda.zeros((C, V)), h, w, t)
    with pytest.raises(ValueError, match="scratch must be"):
        cuda.lmhead_cross_entropy(losses, None, None, h, w, t, scratch=cuda.zeros((3, V + 1), "bfloat16"))
    with pytest.raises(TypeError, match="scratch must have hidden's dtype"):
        cuda.lmhead_cross_entropy(losses, None, None, h, w, t, scratch=cuda.zeros((3, V)))
    with pytest.raises(ValueError, match="dhidden must not overlap hidden"):
        cuda.lmhead_cross_entropy(losses, h, None, h, w, t)


@gpu
def test_lmhead_scratch_helper():
    s = cuda.lmhead_scratch(16384, 50257, "bfloat16")
    assert s.shape == (2560, 50257) and s.dtype == "bfloat16"
    assert cuda.lmhead_scratch(10, 50257, "float32").shape == (10, 50257)
