"""GPT model: loss and every parameter gradient against a PyTorch GPT-2 with the same weights; overfitting;
bad configs and inputs."""

from __future__ import annotations

import numpy as np
import pytest

import fastllm
from fastllm.model import GPT, GPTConfig


def small_model(seed=0, **kw):
    cfg = GPTConfig(**{**dict(block_size=16, vocab_size=67, n_layer=2, n_head=2, n_embd=24), **kw})
    model = GPT(cfg, seed=seed)
    # non-trivial biases and layernorm gains so that their gradients are tested too
    rng = np.random.default_rng(seed + 1)
    for name, arr in model.p.items():
        if name.endswith(".bias") or name.startswith("ln_"):
            arr += rng.standard_normal(arr.shape).astype(np.float32) * 0.1
    return model


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-12)


def test_param_count_matches_gpt2_124m():
    model = GPT(GPTConfig.preset("gpt2", vocab_size=50257), init=False)
    assert model.num_parameters == 124_439_808  # GPT-2 small, lm-head tied


@pytest.mark.parametrize("B,T,ignore", [(2, 16, False), (3, 7, True), (1, 1, False)])
def test_loss_and_grads_match_torch(B, T, ignore, threads):
    torch = pytest.importorskip("torch")
    model = small_model()
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 67, (B, T))
    tgt = rng.integers(0, 67, (B, T))
    if ignore:
        tgt[:, ::3] = -1  # ignore index: no loss, no gradient
    loss = model.forward(idx, tgt)
    model.zero_grad()
    model.backward()

    fwd, params = __import__("torch_gpt").build(model)
    ref = fwd(idx, tgt)
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-5 * max(1.0, abs(ref.item()))
    for name, grad in model.g.items():
        # fp32 both sides: relative error (to the largest entry) <= 1e-4
        assert rel_err(grad, params[name].grad.numpy()) <= 1e-4, name
    with torch.no_grad():
        logits = fwd(idx).numpy()
    assert rel_err(model.forward(idx), logits) <= 1e-5


def test_grad_accumulates_across_backward_calls():
    model = small_model()
    idx = np.arange(16).reshape(2, 8) % 67
    model.forward(idx, idx)
    model.zero_grad()
    model.backward()
    once = model.grads.copy()
    model.forward(idx, idx)
    model.backward()
    np.testing.assert_allclose(model.grads, 2 * once, rtol=1e-6, atol=1e-8)


def test_overfits_one_batch():
    from fastllm.optim import AdamW

    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32), seed=0)
    opt = AdamW(model, lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 32, (4, 16))
    y = rng.integers(0, 32, (4, 16))
    first = model.forward(x, y)
    for _ in range(150):
        loss = model.forward(x, y)
        model.zero_grad()
        model.backward()
        opt.step()
    assert first > 3.0 and loss < 0.05, (first, loss)


def test_eval_forward_gives_same_loss_without_grads():
    model = small_model()
    idx = np.arange(16).reshape(2, 8)
    l_train = model.forward(idx, idx)
    l_eval = model.eval().forward(idx, idx)
    assert l_train == pytest.approx(l_eval, rel=1e-6)
    with pytest.raises(RuntimeError, match="backward"):
        model.backward()


def test_named_parameters_cover_the_flat_buffer():
    model = small_model()
    total = sum(a.size for _, a in model.named_parameters())
    assert total == model.num_parameters == model.params.size
    names = dict(model.named_parameters())
    assert "h.1.attn.c_attn.weight" in names and names["h.1.attn.c_attn.weight"].shape == (72, 24)
    names["ln_f.bias"][0] = 5.0  # views, not copies
    assert model.p["ln_f.bias"][0] == 5.0


@pytest.mark.parametrize("kw,match", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_layer=0), "n_layer"),
    (dict(vocab_size=-1), "vocab_size"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**dict(block_size=16, vocab_size=67, n_layer=2, n_head=2, n_embd=24), **kw})


def test_bad_inputs():
    model = small_model()
    with pytest.raises(ValueError, match="block_size"):
        model.forward(np.zeros((1, 17), np.int64))
    with pytest.raises(ValueError, match=r"\[0, 67\)"):
        model.forward(np.full((1, 4), 67))
    with pytest.raises(TypeError, match="integer"):
        model.forward(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="targets"):
        model.forward(np.zeros((1, 4), np.int64), np.zeros((1, 5), np.int64))
    with pytest.raises(ValueError, match="targets"):
        model.forward(np.zeros((1, 4), np.int64), np.full((1, 4), 99))
    with pytest.raises(ValueError, match="preset"):
        GPTConfig.preset("gpt5")


def test_info_reports_version():
    assert fastllm.__version__
