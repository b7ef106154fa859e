"""LoRA over a base held in bf16 or int8 (GPT.hold_weights, load_model(weights=), `--base-weights`): the input
gradient through a frozen held weight (ops.matmul_backward, and lmhead_ce's frozen lm-head) against float64 on the
weight's own numbers, on every bf16 GEMM kernel, both orientations of bf16 (bits, panels) and int8; the adapters'
gradients against PyTorch autograd on a base whose matrices are those numbers; AdamW steps against torch.optim.AdamW;
what stays refused. The runs (`fastllm sft --base-weights`): tests/test_hf_models.py."""

from __future__ import annotations

import numpy as np
import pytest
from test_lora import adamw_losses, randomize_b, torch_adamw_losses, torch_lora_grads
from test_model_arch import batch, make, rel_err

from fastllm import ops
from fastllm.lora import LoraConfig


def held_forms(w: np.ndarray) -> dict:
    """{form: (the held weight, its numbers as float64)} of a float32 matrix: bf16 bits, bf16 panels, int8 rows."""
    bits = ops.to_bf16(w)
    q = ops.quantize_int8(w)
    forms = {"bits": (bits, ops.from_bf16(bits)), "int8": (q, ops.dequantize_int8(q))}
    if w.shape[-1] % 2 == 0:
        forms["panels"] = (ops.pack_bf16(bits), ops.from_bf16(bits))
    return {k: (h, n.astype(np.float64)) for k, (h, n) in forms.items()}


def _r(x):
    return ops.from_bf16(ops.to_bf16(np.asarray(x, np.float32))).astype(np.float64)


@pytest.mark.parametrize("N,C,OC", [(1, 2, 1), (5, 34, 33), (70, 64, 129), (33, 130, 2), (300, 96, 40)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_backward_through_held_weights(N, C, OC, dtype, rng, bf16_gemm):
    """dinp += dout @ W on W's numbers (bf16: both operands rounded, as for float32 weights); accumulates."""
    x = rng.standard_normal((N, C), dtype=np.float32)
    dout = rng.standard_normal((N, OC), dtype=np.float32)
    d0 = rng.standard_normal((N, C), dtype=np.float32)
    for form, (held, W) in held_forms(rng.standard_normal((OC, C), dtype=np.float32)).items():
        dx, dw, db = ops.matmul_backward(dout, x, held, dinp=d0.copy(), need_weight=False, need_bias=False,
                                         dtype=dtype)
        assert dw is None and db is None
        prod = (_r(dout) @ _r(W)) if dtype == "bfloat16" else dout.astype(np.float64) @ W
        want = d0 + prod
        np.testing.assert_allclose(dx, want, rtol=0, atol=1e-5 * np.sqrt(OC) * np.abs(prod).max(), err_msg=form)


def test_matmul_backward_through_held_weights_in_blocks(rng):
    """Rows of W widened a block at a time (<= 2^22 values): several blocks, the last one partial, a panel across
    two blocks."""
    N, C, OC = 3, 65536, 97  # blocks of 64 rows
    x = rng.standard_normal((N, C), dtype=np.float32)
    dout = rng.standard_normal((N, OC), dtype=np.float32)
    for form, (held, W) in held_forms(rng.standard_normal((OC, C), dtype=np.float32)).items():
        dx, _, _ = ops.matmul_backward(dout, x, held, need_weight=False, need_bias=False)
        want = dout.astype(np.float64) @ W
        np.testing.assert_allclose(dx, want, rtol=0, atol=1e-5 * np.sqrt(OC) * np.abs(want).max(), err_msg=form)


def test_held_weights_bad_input(rng):
    x = rng.standard_normal((4, 8), dtype=np.float32)
    dout = rng.standard_normal((4, 6), dtype=np.float32)
    w = rng.standard_normal((6, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="frozen"):
        ops.matmul_backward(dout, x, ops.to_bf16(w))  # its gradient asked for
    with pytest.raises(ValueError, match="frozen"):
        ops.matmul_backward(dout, x, ops.quantize_int8(w), need_weight=False)  # a bias gradient
    with pytest.raises(TypeError, match="inference only"):
        ops.matmul_backward(dout, x, ops.pack_int8(w), need_weight=False, need_bias=False)
    with pytest.raises(ValueError, match="dout"):
        ops.matmul_backward(dout[:, :5], x, ops.to_bf16(w), need_weight=False, need_bias=False)
    with pytest.raises(ValueError, match="frozen"):
        ops.lmhead_ce(x, ops.to_bf16(w), np.zeros(4, np.int64))  # need_weight defaults to True


@pytest.mark.parametrize("form", ["bits", "panels", "int8"])
def test_lmhead_ce_with_a_held_head(form, rng):
    """Chunks of rows (a scratch of 7 rows for 30): the losses and dhidden of softmax(h W^T) on W's numbers, with
    ignored targets, row weights, a soft cap and a temperature."""
    N, C, V = 30, 16, 50
    h = rng.standard_normal((N, C), dtype=np.float32)
    held, W = held_forms(rng.standard_normal((V, C), dtype=np.float32) * 0.5)[form]
    t = rng.integers(0, V, N)
    t[[3, 17]] = -1
    rw = rng.standard_normal(N).astype(np.float32)
    cap, temp, scale = 3.0, 0.7, 0.5
    losses, dh, dw = ops.lmhead_ce(h, held, t, grad_scale=scale, row_weights=rw, softcap=cap, temperature=temp,
                                   scratch=np.empty((7, V), np.float32), need_weight=False)
    assert dw is None
    xr = _r(h) if form != "int8" else h.astype(np.float64)  # (bf16 weights take bf16 inputs: matmul_forward's rule)
    logits = xr @ W.T
    z = cap * np.tanh(logits / cap) / temp
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    valid = t >= 0
    want_loss = np.where(valid, -np.log(p[np.arange(N), np.maximum(t, 0)]), 0.0)
    np.testing.assert_allclose(losses, want_loss, rtol=1e-4, atol=1e-5)
    g = p.copy()
    g[np.arange(N), np.maximum(t, 0)] -= 1.0
    g *= (1 - np.tanh(logits / cap) ** 2) / temp * (scale * rw * valid)[:, None]
    want = g @ W
    np.testing.assert_allclose(dh, want, rtol=0, atol=1e-4 * np.abs(want).max())


def base_of(model, snapshot) -> None:
    """Write the numbers of a held snapshot into the float32 model's matrices (the oracle's base)."""
    sd = model.state_dict()
    for name, v in snapshot.items():
        if name not in sd:
            continue  # (a bf16 token table beside the head)
        if isinstance(v, ops.Int8Weight):
            numbers = ops.dequantize_int8(v)
        else:
            numbers = ops.from_bf16(ops.unpack_bf16(v) if isinstance(v, ops.Bf16Panels) else v)
        sd[name][...] = numbers.reshape(sd[name].shape)


def as_bits(snapshot: dict) -> dict:
    """A bf16 snapshot with every matrix as bf16 bits (what a CPU without AVX512_BF16 holds) instead of panels."""
    return {k: ops.unpack_bf16(v) if isinstance(v, ops.Bf16Panels) else v for k, v in snapshot.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "qwen2", "olmo2"])
@pytest.mark.parametrize("form,dtype", [("int8", "float32"), ("int8", "bfloat16"), ("bfloat16", "float32"),
                                        ("bits", "float32"), ("bfloat16", "bfloat16")])
def test_adapter_gradients_over_a_held_base_match_torch(arch, form, dtype):
    """Adapters over held matrices and lm-head: PyTorch autograd's gradients on the float32 model with the held
    numbers. int8 in float32 compute is that model's arithmetic (tight); bf16 weights take bf16 inputs, and
    dtype bfloat16 rounds every product (bf16 tolerance)."""
    model = make(arch)
    idx, tgt = batch(model.config.vocab_size)
    snapshot = model.decode_weights("bfloat16" if form == "bits" else form)
    snapshot = as_bits(snapshot) if form == "bits" else snapshot
    base_of(model, snapshot)
    lora = model.add_lora(LoraConfig(r=3, alpha=5.0, targets=("all",)), seed=1)
    tensors = randomize_b(lora)
    want_loss, want = torch_lora_grads(model, tensors, lora, idx, tgt)
    model.hold_weights(snapshot, "bfloat16" if form == "bits" else form)
    model.to("cpu", dtype).train()
    model.zero_grad()
    loss = model.forward(idx, tgt)
    model.backward()
    exact = (form, dtype) == ("int8", "float32")
    tol = 2e-4 if exact else 4e-2  # (as tests/test_lora.py: float32, bfloat16)
    assert abs(loss - want_loss) <= tol * max(1.0, abs(want_loss))
    for name, g in want.items():
        assert rel_err(np.array(lora.g[name]), g) <= tol * (1 if exact else 3), name


def test_adamw_over_an_int8_base_equals_torch_and_leaves_it_unchanged():
    """Ten AdamW steps on adapters over int8 matrices: torch.optim.AdamW's losses on the dequantized base; the held
    matrices are not written; generation runs on base + adapters; the model can't train without adapters."""
    model = make("llama")
    idx, tgt = batch(model.config.vocab_size)
    snapshot = model.decode_weights("int8")
    base_of(model, snapshot)
    held = {k: (v.q.copy(), v.scale.copy()) for k, v in snapshot.items() if isinstance(v, ops.Int8Weight)}
    lora = model.add_lora(r=4, alpha=8, targets=("q", "v", "down"))
    want = torch_adamw_losses(model, lora, idx, tgt, steps=10)
    model.hold_weights(snapshot, "int8").train()
    got = adamw_losses(model, idx, tgt, steps=10)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert got[-1] < got[0] - 0.1
    for k, (q, s) in held.items():
        np.testing.assert_array_equal(snapshot[k].q, q, err_msg=k)
        np.testing.assert_array_equal(snapshot[k].scale, s, err_msg=k)
    model.eval()
    prompt = idx[0, :4].tolist()
    out = model.generate([prompt], 5, temperature=0)
    with model.without_lora():  # (B = 0 where the adapters start; trained now: another answer, from the same base)
        base_out = model.generate([prompt], 5, temperature=0)
    assert len(out[0]) == len(base_out[0]) == 9 and out[0][:4] == prompt
    with pytest.raises(ValueError, match="holds its matrices in int8"):
        model.merge_lora()
    plain = make("llama")
    plain.hold_weights(plain.decode_weights("bfloat16"), "bfloat16")
    with pytest.raises(ValueError, match="training: this model holds"):
        plain.train()
