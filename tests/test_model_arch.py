"""The architecture options of the one GPT (rope, rmsnorm, GQA/MQA, QK-norm, swiglu/relu2, biases, untied lm-head,
logit soft-capping, Gemma's and OLMo's norms, NoPE layers, partial rotary dims, Granite's scales) on both backends:
loss, every gradient, logits and greedy generation through the KV cache against HF transformers' LlamaForCausalLM /
Qwen2 / Qwen3 / Mistral loaded with the same weights (the real oracle where a family exists) and against the plain
PyTorch reference tests/torch_gpt.py (every combination, also those no HF family has); config validation, parameter
layout, weight decay, checkpoints.

Tolerances: CPU float32 vs torch float32: loss 1e-5 relative, gradients 1e-4 relative to the tensor's largest entry,
logits 1e-4. The GPU (float32 FFMA GEMMs, the emulator in CI): 2e-3 on losses and logits, 5e-3 gradients."""

from __future__ import annotations

import numpy as np
import pytest
from backends import BACKENDS

from fastllm.model import GPT, PRESETS, GPTConfig, decays, param_shapes

BASE = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32, layernorm_eps=1e-5)
LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", qkv_bias=False, proj_bias=False, mlp_bias=False)

# option combinations for the PyTorch reference (each id names what it adds to GPT-2 / Llama)
ARCHS = {
    "gpt2": {},
    "gpt2-gqa-untied": dict(n_kv_head=2, tie_embeddings=False),
    "llama": dict(LLAMA, n_kv_head=2, mlp_hidden=48),
    "llama-mqa-headdim": dict(LLAMA, n_kv_head=1, head_dim=12, rope_theta=500000.0),
    "llama3-scaling-untied": dict(LLAMA, n_kv_head=2, tie_embeddings=False, rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8)),
    "linear-scaling": dict(LLAMA, rope_scaling=dict(rope_type="linear", factor=2.0)),
    "qwen2": dict(LLAMA, n_kv_head=2, qkv_bias=True),
    "qwen3": dict(LLAMA, n_kv_head=2, head_dim=16, qk_norm=True),
    "nanochat": dict(positions="rope", norm="rmsnorm", mlp="relu2", qkv_bias=False, proj_bias=False, mlp_bias=False,
                     tie_embeddings=False, logit_softcap=15.0),
    "rope-layernorm-softcap-biases": dict(positions="rope", mlp="swiglu", qk_norm=True, logit_softcap=3.0),
    "gemma2": dict(LLAMA, mlp="geglu", n_kv_head=2, head_dim=16, embed_scale=32 ** 0.5, post_norms=True,
                   attn_scale=12 ** -0.5, attn_softcap=2.0, logit_softcap=5.0, sliding_window=5,
                   layer_types=["sliding_attention", "full_attention"]),
    "gemma3": dict(LLAMA, mlp="geglu", n_kv_head=1, head_dim=16, embed_scale=32 ** 0.5, post_norms=True, qk_norm=True,
                   attn_scale=20 ** -0.5, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                   rope_theta=1e6, rope_local_theta=1e4, rope_scaling=dict(rope_type="linear", factor=4.0)),
    "window-layernorm-postnorms": dict(positions="rope", n_kv_head=2, sliding_window=3, post_norms=True,
                                       attn_softcap=1.5, embed_scale=0.5),
    # OLMo 2: norms after each branch instead of before, QK-norm over all q and all k channels; OLMo 3: sliding
    "olmo2": dict(LLAMA, pre_norms=False, post_norms=True, qk_norm=True, qk_norm_over="all", tie_embeddings=False),
    "olmo3-gqa": dict(LLAMA, n_kv_head=2, pre_norms=False, post_norms=True, qk_norm=True, qk_norm_over="all",
                      sliding_window=4, layer_types=["sliding_attention", "full_attention"], rope_local_theta=1e4,
                      rope_theta=5e5, rope_scaling=dict(rope_type="yarn", factor=4.0,
                                                        original_max_position_embeddings=8)),
    # SmolLM3: a layer without RoPE; Phi-4-mini: RoPE on the first 3/4 of each head's dims
    "smollm3-nope": dict(LLAMA, n_kv_head=2, nope_layers=[1]),
    # Granite: scaled embeddings, scores, residual branches and logits
    "granite": dict(LLAMA, n_kv_head=2, embed_scale=12.0, attn_scale=0.03, residual_scale=0.22, logits_scaling=8.0),
    "partial-rotary-layernorm-nopost": dict(positions="rope", n_kv_head=1, partial_rotary_factor=0.75,
                                            pre_norms=False, qk_norm=True, qk_norm_over="all"),
    # GPT-NeoX / Pythia: attention and MLP side by side, exact GELU, RoPE on a quarter of each head, untied
    "neox": dict(positions="rope", mlp="gelu_erf", parallel_residual=True, partial_rotary_factor=0.25,
                 tie_embeddings=False),
    # the parallel residual with the rest of the options that touch the branches (post-norms, Granite's scale)
    "parallel-postnorms-scaled-swiglu": dict(LLAMA, n_kv_head=2, parallel_residual=True, post_norms=True,
                                             residual_scale=0.5),
}


def on(device: str, model: GPT, dtype: str = "float32") -> GPT:
    """model itself for "cpu", else a copy on `device` in `dtype`."""
    if device == "cpu":
        return model
    return GPT(model.config, init=False, device=device, dtype=dtype).load_state_dict(model.state_dict())


def make(arch: str, seed: int = 0, device: str = "cpu", **kw) -> GPT:
    """A small model of `arch` with perturbed gains and biases (so their gradients are tested too), on `device`
    (float32)."""
    cfg = GPTConfig(**{**BASE, **ARCHS[arch], **kw})
    model = GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed + 1)
    for name, arr in model.p.items():
        if name.endswith(".bias") or "norm" in name or name.startswith("ln_"):
            arr += rng.standard_normal(arr.shape).astype(np.float32) * 0.1
    return on(device, model)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def host_grads(model) -> dict[str, np.ndarray]:
    return {k: np.array(model.bk.to_numpy(v)) for k, v in model.g.items()}


def batch(V: int, B: int = 2, T: int = 13, seed: int = 0):
    rng = np.random.default_rng(seed)
    idx, tgt = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    tgt[0, ::4] = -1  # ignored targets
    return idx, tgt


# ---- parity with the PyTorch reference, every option --------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_grads_logits_match_torch(arch):
    torch = pytest.importorskip("torch")
    import torch_gpt

    model = make(arch)
    idx, tgt = batch(model.config.vocab_size)
    loss = model.forward(idx, tgt)
    model.zero_grad()
    model.backward()
    fwd, params = torch_gpt.build(model)
    ref = fwd(idx, tgt)
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())), (loss, ref.item())
    assert set(model.g) == set(params)
    bad = {k: rel_err(g, params[k].grad.numpy()) for k, g in model.g.items()}
    bad = {k: f"{v:.1e}" for k, v in bad.items() if not v <= 1e-4}
    assert not bad, f"gradients off: {bad}"
    with torch.no_grad():
        logits = fwd(idx).numpy()
    assert rel_err(model.forward(idx), logits) <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "qwen3", "nanochat", "granite", "neox"])
def test_weighted_ce_and_hidden_state_gradients_match_torch(arch):
    """What GRPO and the reward model use: per-row weights, and backward(dhidden) from the final hidden states."""
    torch = pytest.importorskip("torch")
    import torch_gpt

    model = make(arch, seed=3)
    idx, tgt = batch(model.config.vocab_size, seed=3)
    w = np.random.default_rng(3).standard_normal(idx.shape).astype(np.float32)
    model.zero_grad()
    loss = model.forward(idx, tgt, weights=w)
    model.backward()
    fwd, params = torch_gpt.build(model)
    logits = fwd(idx)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), torch.as_tensor(tgt).view(-1),
                                           ignore_index=-1, reduction="none")
    ref = (ce * torch.as_tensor(w).view(-1)).sum()
    ref.backward()
    assert abs(loss - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))
    for k, g in model.g.items():
        assert rel_err(g, params[k].grad.numpy()) <= 1e-4, k

    dh = np.random.default_rng(4).standard_normal((*idx.shape, model.config.n_embd)).astype(np.float32)
    model.zero_grad()
    h = model.hidden_states(idx)
    model.backward(dhidden=dh)
    fwd, params = torch_gpt.build(model)
    href = fwd(idx, hidden=True)
    (href * torch.as_tensor(dh)).sum().backward()
    assert rel_err(h, href.detach().numpy()) <= 1e-4
    for k, g in model.g.items():
        if k != model.head or model.config.tie_embeddings:  # an untied lm-head gets no gradient here
            assert rel_err(g, params[k].grad.numpy()) <= 1e-4, k
    if not model.config.tie_embeddings:
        assert not model.g["lm_head.weight"].any()


# ---- the KV cache -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("arch", ["llama3-scaling-untied", "qwen3", "nanochat", "gpt2-gqa-untied", "gemma2",
                                  "gemma3", "olmo2", "smollm3-nope", "partial-rotary-layernorm-nopost", "granite",
                                  "neox", "parallel-postnorms-scaled-swiglu"])
def test_kv_cache_equals_full_forward(name, arch):
    """Prompts of different lengths prefilled together, then decode steps at different positions per row: every
    step's logits equal those of a full forward over the sequence so far."""
    model = make(arch, seed=5, device=name).eval()
    tol = 1e-4 if name == "cpu" else 2e-3
    rng = np.random.default_rng(5)
    rows = [list(rng.integers(0, 97, n)) for n in (7, 3, 11)]
    cache = model.kv_cache(3, max_len=20)
    n_full = sum(model.config.window(l) is None for l in range(2))
    assert cache.k.shape == (n_full, 3, model.config.kv_heads, 20, model.config.head_size)  # only the kv heads
    logits = cache.prefill(rows)
    for step in range(4):
        for b, r in enumerate(rows):
            full = model.forward(np.array([r]))[0, -1]
            assert rel_err(logits[b], full) <= tol, (step, b)
        nxt = rng.integers(0, 97, 3)
        for b in range(3):
            rows[b].append(int(nxt[b]))
        logits = cache.decode(nxt)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "olmo3-gqa"])
def test_kv_cache_ring_equals_full_forward(name, arch):
    """Sliding layers keep a ring of 2 * window - 1 rows: prompts longer than the window (prefilled in chunks of
    window tokens), then decode steps far past it, and a row copied (copy_row) after its ring wrapped: every step's
    logits equal those of a full forward over the sequence so far."""
    model = make(arch, seed=5, device=name, block_size=96).eval()
    cfg, tol = model.config, 1e-4 if name == "cpu" else 2e-3
    window = cfg.sliding_window
    rng = np.random.default_rng(5)
    rows = [list(rng.integers(0, 97, n)) for n in (23, 3, 11, 2)]
    cache = model.kv_cache(4)
    assert cache.k.shape == (1, 4, cfg.kv_heads, 96, cfg.head_size)  # the full layer
    assert cache.k_ring.shape == (1, 4, cfg.kv_heads, 2 * window - 1, cfg.head_size)  # the sliding one
    assert cache.rows == [2 * window - 1, 96]
    logits = cache.prefill(rows)
    for step in range(30 if name == "cpu" else 16):
        if step == 8:  # row 3 continues row 2 (whose ring has wrapped)
            cache.copy_row(2, 3)
            rows[3], logits[3] = list(rows[2]), logits[2]
        for b, r in enumerate(rows):
            full = model.forward(np.array([r]))[0, -1]
            assert rel_err(logits[b], full) <= tol, (step, b)
        nxt = rng.integers(0, 97, 4)
        for b in range(4):
            rows[b].append(int(nxt[b]))
        logits = cache.decode(nxt)
    assert min(map(len, rows)) > 3 * window


@pytest.mark.parametrize("arch", ["llama", "qwen3", "nanochat", "gemma3", "olmo2"])
def test_bf16_decode_weights(arch):
    model = make(arch, seed=6).eval()
    model.params *= 3.0  # sharper logits
    prompts = [[1, 2, 3, 4], [5, 6]]
    f32 = model.kv_cache(2).prefill(prompts)
    cache = model.kv_cache(2, weights="bfloat16")
    assert set(cache.snapshot) == {"attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight",
                              model.head}
    assert rel_err(cache.prefill(prompts), f32) < 3e-2
    out = model.generate(prompts, 6, temperature=0, weights="bfloat16")
    assert [len(r) for r in out] == [10, 8]


# ---- HF transformers as the oracle ------------------------------------------------------------------------------

HF_ARCHS = {  # fastllm options -> the HF family that has exactly them
    "llama": ("llama", dict(LLAMA, n_kv_head=2, mlp_hidden=48)),
    "llama-biases-untied": ("llama", dict(LLAMA, qkv_bias=True, proj_bias=True, mlp_bias=True, tie_embeddings=False)),
    "llama3-scaling": ("llama", ARCHS["llama3-scaling-untied"]),
    "mistral-mqa": ("mistral", dict(LLAMA, n_kv_head=1, rope_theta=1e6)),
    "qwen2": ("qwen2", ARCHS["qwen2"]),
    "qwen3": ("qwen3", dict(ARCHS["qwen3"], tie_embeddings=False)),
}


def hf_make(arch: str, device: str = "cpu", seed: int = 7) -> GPT:
    cfg = GPTConfig(**{**BASE, **HF_ARCHS[arch][1]})
    model = GPT(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for name, arr in model.p.items():
        if name.endswith(".bias") or "norm" in name or name.startswith("ln_"):
            arr += rng.standard_normal(arr.shape).astype(np.float32) * 0.1
    model.params *= 2.0  # sharper logits: greedy does not hinge on near-ties
    return on(device, model)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("arch", HF_ARCHS)
def test_matches_transformers(name, arch):
    """Loss, logits and every gradient against the HF model of the family, and greedy generation through the KV
    cache against HF's generate."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import torch_gpt

    model = hf_make(arch, name)
    hf = torch_gpt.hf_twin(model, HF_ARCHS[arch][0])
    loss_tol, grad_tol = (1e-5, 1e-4) if name == "cpu" else (2e-3, 5e-3)
    idx, tgt = batch(model.config.vocab_size, T=17, seed=8)
    loss = model.forward(idx, tgt)
    model.zero_grad()
    model.backward()
    out = hf(input_ids=torch.as_tensor(idx), use_cache=False)
    ref = torch.nn.functional.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]),
                                            torch.as_tensor(tgt).reshape(-1), ignore_index=-1)
    ref.backward()
    assert abs(loss - ref.item()) <= loss_tol * max(1.0, ref.item()), (loss, ref.item())
    hf_params = dict(hf.named_parameters())
    if model.config.tie_embeddings:
        hf_params["lm_head.weight"] = hf_params["model.embed_tokens.weight"]
    ours = torch_gpt.hf_names(_GradView(model))
    bad = {k: rel_err(g, hf_params[k].grad.numpy()) for k, g in ours.items()}
    bad = {k: f"{v:.1e}" for k, v in bad.items() if not v <= grad_tol}
    assert not bad, f"gradients off: {bad}"
    model.eval()
    assert rel_err(model.forward(idx), out.logits.detach().numpy()) <= 10 * loss_tol

    prompt = [[3, 14, 15, 92, 65, 35]]
    with torch.no_grad():
        want = hf.generate(torch.as_tensor(prompt), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                           pad_token_id=0)[0].tolist()
    assert model.generate(prompt, 12, temperature=0)[0] == want


class _GradView:
    """Looks like a GPT whose state_dict() is its gradients (to map them to HF names with torch_gpt.hf_names)."""

    def __init__(self, model):
        self.config, self._g = model.config, host_grads(model)

    def state_dict(self):
        return self._g


# ---- config, layout, decay --------------------------------------------------------------------------------------


def test_parameter_names_and_order_follow_the_spec():
    cfg = GPTConfig(**{**BASE, **ARCHS["qwen3"], "tie_embeddings": False})
    assert list(param_shapes(cfg)) == [
        "wte", "ln_1.weight", "attn.c_attn.weight", "attn.q_norm.weight", "attn.k_norm.weight",
        "attn.c_proj.weight", "ln_2.weight", "mlp.c_fc.weight", "mlp.c_proj.weight", "ln_f.weight", "lm_head.weight"]
    s = param_shapes(cfg)
    assert s["attn.c_attn.weight"] == (2, (4 + 2 * 2) * 16, 32) and s["attn.c_proj.weight"] == (2, 32, 64)
    assert s["mlp.c_fc.weight"] == (2, 2 * 128, 32) and s["attn.q_norm.weight"] == (2, 16)
    gpt2 = param_shapes(GPTConfig(**BASE))
    assert list(gpt2) == ["wte", "wpe", "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                          "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight",
                          "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias", "ln_f.weight", "ln_f.bias"]


def test_weight_decay_covers_the_matrices_only():
    model = make("qwen3", tie_embeddings=False)
    decayed = {n for n in model.shapes if decays(n)}
    assert decayed == {"wte", "lm_head.weight", "attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                       "mlp.c_proj.weight"}


def test_gpt2_presets_unchanged_and_modern_presets_exist():
    assert PRESETS["gpt2"] == dict(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    assert PRESETS["mini"] == dict(n_layer=4, n_head=4, n_embd=128, block_size=128)
    assert GPT(GPTConfig.preset("gpt2"), init=False).num_parameters == 124_439_808
    for name in ("nano", "micro"):
        cfg = GPTConfig.preset(name, vocab_size=300)
        assert cfg.positions == "rope" and cfg.norm == "rmsnorm" and cfg.kv_heads < cfg.n_head
    old = {k: v for k, v in GPTConfig().to_dict().items() if k in ("block_size", "vocab_size", "n_layer", "n_head",
                                                                   "n_embd", "layernorm_eps")}
    assert GPTConfig.from_dict(old) == GPTConfig()  # a checkpoint of before the options loads as GPT-2


@pytest.mark.parametrize("kw,match", [
    (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(n_kv_head=0), "n_kv_head"),
    (dict(head_dim=-2), "head_dim"),
    (dict(positions="alibi"), "positions"),
    (dict(norm="batchnorm"), "norm"),
    (dict(mlp="reglu"), "mlp"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(sliding_window=True), "sliding_window"),
    (dict(layer_types=["full_attention"]), "layer_types"),
    (dict(layer_types=["full_attention", "chunked_attention"]), "layer_types"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding_window is None"),
    (dict(rope_local_theta=1e4), "rope_local_theta"),
    (dict(embed_scale=0.0), "embed_scale"),
    (dict(attn_scale=-1.0), "attn_scale"),
    (dict(attn_softcap=float("nan")), "attn_softcap"),
    (dict(post_norms=1), "post_norms"),
    (dict(parallel_residual=1), "parallel_residual"),
    (dict(parallel_residual=True, pre_norms=False), "parallel_residual needs pre_norms"),
    (dict(mlp_hidden=0), "mlp_hidden"),
    (dict(qkv_bias="yes"), "qkv_bias"),
    (dict(logit_softcap=0.0), "logit_softcap"),
    (dict(logit_softcap=float("inf")), "logit_softcap"),
    (dict(rope_theta=-1.0, positions="rope"), "rope_theta"),
    (dict(positions="rope", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(positions="rope", rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (dict(positions="rope", head_dim=7), "even"),
    (dict(n_embd=30), "divisible by n_head"),
])
def test_bad_config_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**BASE, **kw})


def test_load_state_dict_refuses_tensors_of_another_config():
    model = make("llama")
    sd = dict(make("gpt2").state_dict())
    with pytest.raises(ValueError, match="not parameters of this config"):
        model.load_state_dict(sd)


def test_checkpoint_round_trip(tmp_path):
    from fastllm.checkpoint import load_model, save
    from fastllm.optim import AdamW

    model = make("llama3-scaling-untied")
    folder = save(tmp_path / "run", 3, model, AdamW(model), {}, kind="train")
    again = load_model(folder)
    assert again.config == model.config
    idx = np.arange(10).reshape(1, 10)
    np.testing.assert_array_equal(again.eval().forward(idx), model.eval().forward(idx))
