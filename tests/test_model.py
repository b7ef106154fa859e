"""GPT model: loss and every parameter gradient against a PyTorch GPT-2 with the same weights; overfitting;
bad configs and inputs. The same model on the GPU (device="cuda", marked `cuda`: a GPU or the CUDA emulator)
against itself on the CPU: micro-batch accumulation, clipped AdamW steps, the bf16 compute copy, state_dict round
trips that continue bit for bit, the KV cache and sampling, and the same errors for bad input (the 20-step
training, per-tensor gradient and CLI comparisons are in tests/test_cuda_model.py).

Tolerances on the GPU: float32 runs the FFMA GEMMs and fast exp, ~2e-3 relative on losses and gradients (5e-3
per gradient tensor); bfloat16 ~2e-2 on the loss, gradients by direction (cosine > 0.99)."""

from __future__ import annotations

import numpy as np
import pytest
from reference import bf16_round

import fastllm
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW
from fastllm.sample import generate

cuda = pytest.mark.cuda
# (device, compute dtype) of the model
DEVICES = [pytest.param(("cpu", "float32"), id="cpu"), pytest.param(("cuda", "float32"), id="cuda-f32", marks=cuda),
           pytest.param(("cuda", "bfloat16"), id="cuda-bf16", marks=cuda)]
GPU_DTYPES = [pytest.param("float32", marks=cuda), pytest.param("bfloat16", marks=cuda)]


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


@pytest.mark.parametrize("device", DEVICES)
def test_grad_accumulates_across_backward_calls(device):
    model = small_model().to(*device)
    idx = np.arange(16).reshape(2, 8) % 67
    model.forward(idx, idx)
    model.zero_grad()
    model.backward()
    once = model.bk.to_numpy(model.grads).copy()
    model.forward(idx, idx)
    model.backward()
    np.testing.assert_allclose(model.bk.to_numpy(model.grads), 2 * once, rtol=1e-6, atol=1e-8)


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


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    model = small_model().to(*device)
    with pytest.raises(RuntimeError, match="forward"):
        model.backward()  # nothing to differentiate yet
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
    with pytest.raises(ValueError, match="dtype"):
        GPT(model.config, device=device[0], dtype="float16")
    with pytest.raises(ValueError, match="device"):
        GPT(model.config, device="tpu")


def test_info_reports_version():
    assert fastllm.__version__


# ---- the one model on the GPU against itself on the CPU -----------------------------------------------------------


def tiny_config(**kw) -> GPTConfig:
    """head size 16: the GPU runs its simple attention kernels (bitwise deterministic)."""
    return GPTConfig(**{**dict(block_size=32, vocab_size=48, n_layer=2, n_head=2, n_embd=32), **kw})


def batch(rng, B=3, T=16, V=48):
    x, y = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    y[0, :3] = -1  # ignored positions (like SFT's prompt tokens)
    return x, y


@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("accum", [1, 2])
def test_gpu_micro_batches_and_clipped_steps_match_cpu(rng, dtype, accum):
    """Loss, every gradient, the grad norm and the parameters after AdamW with clipping over several steps, with
    gradients accumulated over `accum` micro-batches; the bf16 compute copy follows the fp32 master weights."""
    cpu = GPT(tiny_config(), seed=3)
    gpu = GPT(tiny_config(), seed=3, device="cuda", dtype=dtype)
    cpu_opt, gpu_opt = AdamW(cpu, lr=1e-2, weight_decay=0.1), AdamW(gpu, lr=1e-2, weight_decay=0.1)
    f32 = dtype == "float32"
    for step in range(4):
        cpu.zero_grad()
        gpu.zero_grad()
        lc = lg = 0.0
        for _ in range(accum):
            x, y = batch(rng)
            lc += cpu.forward(x, y) / accum
            lg += gpu.forward(x, y) / accum
            cpu.backward()
            gpu.backward()
        assert abs(lg - lc) <= (2e-3 if f32 else 2e-2) * abs(lc), (step, lg, lc)
        gc, gg = cpu.grads, gpu.bk.to_numpy(gpu.grads)
        if f32:
            bad = {k: f"{rel_err(gpu.bk.to_numpy(gpu.g[k]), cpu.g[k]):.2e}" for k in cpu.g
                   if not rel_err(gpu.bk.to_numpy(gpu.g[k]), cpu.g[k]) < 5e-3}
            assert not bad, f"step {step}: gradients off (rel err): {bad}"
        else:
            cos = float(gc @ gg / (np.linalg.norm(gc) * np.linalg.norm(gg)))
            assert cos > 0.99, (step, cos)
        nc, ng = cpu.grad_norm() / accum, gpu.grad_norm() / accum
        assert abs(nc - ng) <= (5e-3 if f32 else 5e-2) * nc, (nc, ng)
        clip = min(1.0, 0.05 / (nc + 1e-6))  # a small max norm so clipping is active
        cpu_opt.step(1e-2 * (step + 1) / 4, grad_scale=clip / accum)
        gpu_opt.step(1e-2 * (step + 1) / 4, grad_scale=clip / accum)
        assert gpu_opt.t == cpu_opt.t == step + 1
    params = gpu.bk.to_numpy(gpu.params)
    # AdamW normalises each update: an element whose tiny bf16 gradient differs in sign moves a whole lr step
    assert rel_err(params, cpu.params) < (1e-3 if f32 else 5e-2)
    if not f32:  # the bf16 copy the kernels read is the master weights rounded (AdamW's params_copy)
        np.testing.assert_array_equal(gpu.bk.to_numpy(gpu.cparams), bf16_round(params))


@pytest.mark.parametrize("device", DEVICES)
def test_state_dict_round_trip_continues_bit_for_bit(rng, device):
    """Model and AdamW state_dict into a fresh model on the same device: the next steps are the same bits."""
    a = GPT(tiny_config(), seed=5, device=device[0], dtype=device[1])
    opt_a = AdamW(a, lr=1e-2)
    batches = [batch(rng) for _ in range(4)]

    def step(m, o, xy):
        m.zero_grad()
        loss = m.forward(*xy)
        m.backward()
        o.step(grad_scale=min(1.0, 1.0 / (m.grad_norm() + 1e-6)))
        return loss

    for xy in batches[:2]:
        step(a, opt_a, xy)
    b = GPT(tiny_config(), init=False, device=device[0], dtype=device[1]).load_state_dict(a.state_dict())
    opt_b = AdamW(b, lr=1e-2)
    opt_b.load_state_dict(opt_a.state_dict())
    assert opt_b.t == 2
    np.testing.assert_array_equal(b.bk.to_numpy(b.cparams), a.bk.to_numpy(a.cparams))
    for xy in batches[2:]:
        assert step(a, opt_a, xy) == step(b, opt_b, xy)
    np.testing.assert_array_equal(a.bk.to_numpy(a.params), b.bk.to_numpy(b.params))
    np.testing.assert_array_equal(opt_a.state_dict()["v"], opt_b.state_dict()["v"])


@pytest.mark.parametrize("dtype", GPU_DTYPES)
def test_gpu_kv_cache_and_sampling_match_cpu(dtype):
    """Batched prompts of different lengths (prefill, then decode) and prompts sharing a prefix of several tokens
    (batched prefill, Tn > 1) give the CPU's logits; seeded sampling draws the CPU's tokens (float32); a bad id
    or a prompt past block_size is refused before the cache changes."""
    cpu = GPT(tiny_config(), seed=4).eval()
    cpu.params *= 4.0  # sharper logits: no near-ties for greedy or sampling to flip on
    gpu = GPT(cpu.config, init=False, device="cuda", dtype=dtype).load_state_dict(cpu.state_dict()).eval()
    tol = 2e-3 if dtype == "float32" else 3e-2
    for prompts in ([[1, 2, 3, 4, 5], [7], [9, 10, 11]], [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]):
        cache_c, cache_g = cpu.kv_cache(3), gpu.kv_cache(3)
        assert rel_err(cache_g.prefill(prompts), cache_c.prefill(prompts)) < tol
        assert rel_err(cache_g.decode([5, 6, 7]), cache_c.decode([5, 6, 7])) < tol
        assert cache_g.pos.tolist() == cache_c.pos.tolist()
        if dtype == "float32":
            assert generate(gpu, prompts, 6, temperature=0) == generate(cpu, prompts, 6, temperature=0)
            kw = dict(temperature=1.0, top_k=5, seed=7)
            assert generate(gpu, prompts, 8, **kw) == generate(cpu, prompts, 8, **kw)
    with pytest.raises(ValueError, match="block_size"):
        generate(gpu, [1, 2], 40, temperature=0)
    cache = gpu.kv_cache(2)
    with pytest.raises(ValueError, match="outside"):
        cache.prefill([[1, 2], [3, 48]])
    assert cache.pos.tolist() == [0, 0]  # checked before the cache changed
