"""The families past Llama and Qwen (tests/test_hf_models.py), and sliding-window attention: small random
GemmaForCausalLM / Gemma2ForCausalLM / Gemma3ForCausalLM / Olmo2ForCausalLM / Olmo3ForCausalLM / SmolLM3ForCausalLM /
Exaone4ForCausalLM / ArceeForCausalLM / GraniteForCausalLM / StableLmForCausalLM / Starcoder2ForCausalLM /
MinistralForCausalLM / Ernie4_5ForCausalLM / GlmForCausalLM / Glm4ForCausalLM / Phi3ForCausalLM / MistralForCausalLM
/ GPTNeoXForCausalLM models built and saved by transformers load into fastllm with transformers' float32 logits,
greedy tokens (through the KV cache, past the window) and gradients (transformers' autograd), from F32 and BF16
files; fastllm writes folders transformers loads to the same logits and reads them back bit for bit. Gemma's pieces:
GeGLU, embeddings times sqrt(hidden_size), norms that multiply by (1 + weight), MQA and a head_dim of its own (Gemma
1); norms after each branch, attention and final logit soft caps, query_pre_attn_scalar, sliding layers every other
layer (Gemma 2); QK-norm, five sliding layers of six with their own RoPE base and linear scaling on the full ones
(Gemma 3). OLMo's: norms after each branch instead of before it, QK-norm over all the q (k) channels (OLMo 2); three
sliding layers of four whose RoPE is not the full layers' YaRN (OLMo 3); OLMo 2's norms with per-head QK-norm and no
RoPE on the full layers (EXAONE 4). SmolLM3's layers without RoPE (and sliding NoPE layers); Arcee's relu2 MLP;
Granite's embedding, score, residual and logit scales; StableLM's LayerNorms and quarter-head RoPE, StarCoder2's
LayerNorms, GELU MLP and biases, Ministral's sliding layers; ERNIE 4.5's and the GLMs' RoPE on interleaved pairs (q
and k rows reordered as they load), GLM-4's norms around each branch; Phi-4-mini's RoPE on part of each head (with
LongRoPE's short factors); Mistral v0.1's and Phi-3's sliding windows past the window; GPT-NeoX's (Pythia's) parallel
residual, exact GELU, quarter-head RoPE and query_key_value rows per head (reordered as they load), and its
sequential form."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hf_families import hf_logits, random_model, saved_cases

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fastllm import hf  # noqa: E402
from fastllm.model import GPT, TOKEN_TABLE, GPTConfig  # noqa: E402
from fastllm.sample import generate  # noqa: E402

V, T_MAX, WINDOW = 301, 64, 8
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
            head_dim=16, max_position_embeddings=T_MAX, rms_norm_eps=1e-6, initializer_range=0.15, bos_token_id=None,
            eos_token_id=None, pad_token_id=None)
LAYERS = ["sliding_attention", "full_attention", "sliding_attention"]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
GEMMA = dict(mlp="geglu", embed_scale=pytest.approx(32 ** 0.5))
OLMO = dict(pre_norms=False, post_norms=True, qk_norm=True, qk_norm_over="all")
CASES = {  # name: (transformers class prefix, its config, the GPTConfig fields it maps to)
    "gemma-mqa": ("Gemma", dict(num_key_value_heads=1, hidden_act="gelu_pytorch_tanh"),
                  dict(GEMMA, n_kv_head=1, post_norms=False, qk_norm=False, sliding_window=None)),
    "gemma-7b-like": ("Gemma", dict(num_key_value_heads=4, hidden_size=48, hidden_act="gelu"),  # 16 * 4 != 48
                      dict(GEMMA, embed_scale=pytest.approx(48 ** 0.5), head_dim=16, sliding_window=None)),
    "gemma2": ("Gemma2", dict(num_key_value_heads=2, query_pre_attn_scalar=12, sliding_window=WINDOW,
                              attn_logit_softcapping=3.0, final_logit_softcapping=6.0),
               dict(GEMMA, post_norms=True, qk_norm=False, attn_softcap=3.0, logit_softcap=6.0,
                    attn_scale=12 ** -0.5, sliding_window=WINDOW, layer_types=LAYERS)),
    "gemma2-untied": ("Gemma2", dict(num_key_value_heads=4, sliding_window=WINDOW, tie_word_embeddings=False,
                                     layer_types=["full_attention", *LAYERS[1:]]),
                      dict(GEMMA, post_norms=True, tie_embeddings=False, layer_types=["full_attention", *LAYERS[1:]])),
    "gemma3": ("Gemma3", dict(num_key_value_heads=2, sliding_window=WINDOW, layer_types=LAYERS, rope_theta=1e6,
                              rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0},
                              query_pre_attn_scalar=20),
               dict(GEMMA, post_norms=True, qk_norm=True, rope_theta=1e6, rope_local_theta=1e4,
                    attn_scale=20 ** -0.5, layer_types=LAYERS, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral-v0.1": ("Mistral", dict(num_key_value_heads=2, sliding_window=WINDOW, hidden_act="silu"),
                     dict(mlp="swiglu", sliding_window=WINDOW, layer_types=None, embed_scale=None)),
    "phi3-mini-4k": ("Phi3", dict(num_key_value_heads=4, sliding_window=WINDOW + 3, hidden_act="silu",
                                  rope_scaling=None),
                     dict(mlp="swiglu", sliding_window=WINDOW + 3, post_norms=False)),
    "olmo2": ("Olmo2", dict(num_key_value_heads=4), dict(OLMO, tie_embeddings=False, sliding_window=None)),
    "olmo2-gqa-biases-tied": ("Olmo2", dict(num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True),
                              dict(OLMO, tie_embeddings=True, qkv_bias=True, proj_bias=True, mlp_bias=False)),
    "olmo3": ("Olmo3", dict(num_key_value_heads=2, sliding_window=WINDOW, rope_scaling=YARN, rope_theta=5e5,
                            layer_types=LAYERS),  # the full layer's YaRN; the sliding ones plain RoPE, the same base
              dict(OLMO, sliding_window=WINDOW, layer_types=LAYERS, rope_theta=5e5, rope_local_theta=5e5)),
    "smollm3": ("SmolLM3", dict(num_key_value_heads=2, no_rope_layer_interval=3, rope_theta=2e6),
                dict(nope_layers=[2], tie_embeddings=True, sliding_window=None, pre_norms=True)),
    "smollm3-sliding-biases-untied": ("SmolLM3", dict(num_key_value_heads=1, no_rope_layers=[1, 0, 0],
                                                      use_sliding_window=True, sliding_window=WINDOW,
                                                      attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
                                      dict(nope_layers=[1, 2], layer_types=["full_attention", "sliding_attention",
                                                                            "sliding_attention"],
                                           qkv_bias=True, proj_bias=True, mlp_bias=True, tie_embeddings=False)),
    "exaone4": ("Exaone4", dict(num_key_value_heads=2, sliding_window=WINDOW, sliding_window_pattern=3),
                dict(pre_norms=False, post_norms=True, qk_norm=True, qk_norm_over="head", nope_layers=[2],
                     sliding_window=WINDOW, layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    "exaone4-no-window": ("Exaone4", dict(num_key_value_heads=1, sliding_window=None,
                                          layer_types=["full_attention"] * 3),  # (EXAONE 4.0 1.2B: RoPE everywhere)
                          dict(pre_norms=False, qk_norm_over="head", nope_layers=None, sliding_window=None)),
    "arcee": ("Arcee", dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True, rope_scaling=YARN),
              dict(mlp="relu2", mlp_hidden=56, qkv_bias=True, proj_bias=True, mlp_bias=True)),
    "granite": ("Granite", dict(num_key_value_heads=2, embedding_multiplier=12.0, attention_multiplier=0.0078125,
                                residual_multiplier=0.22, logits_scaling=2.0, tie_word_embeddings=True),
                dict(embed_scale=12.0, attn_scale=0.0078125, residual_scale=0.22, logits_scaling=2.0)),
    "granite-defaults-biases": ("Granite", dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
                                dict(attn_scale=1.0, embed_scale=None, residual_scale=None, logits_scaling=None,
                                     qkv_bias=True, mlp_bias=True)),  # (its scores' scale is 1 unless set)
    "stablelm-2": ("StableLm", dict(num_key_value_heads=2, use_qkv_bias=True, head_dim=8),  # (StableLM's configs
                   # have no head_dim: its attention takes 32 / 4, its RoPE the config's)
                   dict(norm="layernorm", mlp="swiglu", partial_rotary_factor=0.25, qkv_bias=True, proj_bias=False,
                        head_dim=None)),
    "stablelm-tied-half-rotary": ("StableLm", dict(num_key_value_heads=4, tie_word_embeddings=True,
                                                   partial_rotary_factor=0.5, head_dim=8),
                                  dict(norm="layernorm", partial_rotary_factor=0.5, qkv_bias=False)),
    "starcoder2": ("Starcoder2", dict(num_key_value_heads=2, sliding_window=WINDOW, hidden_act="gelu_pytorch_tanh"),
                   dict(norm="layernorm", mlp="gelu", qkv_bias=True, proj_bias=True, mlp_bias=True,
                        sliding_window=WINDOW, layer_types=None, tie_embeddings=True)),
    "starcoder2-no-bias-untied": ("Starcoder2", dict(num_key_value_heads=1, use_bias=False, tie_word_embeddings=False),
                                  dict(mlp="gelu", qkv_bias=False, mlp_bias=False, tie_embeddings=False)),
    "ministral": ("Ministral", dict(num_key_value_heads=2, sliding_window=WINDOW, layer_types=LAYERS),
                  dict(sliding_window=WINDOW, layer_types=LAYERS, qkv_bias=False)),
    "ernie4_5": ("Ernie4_5", dict(num_key_value_heads=2),  # (its RoPE on interleaved pairs: q, k rows reordered)
                 dict(tie_embeddings=True, qkv_bias=False, proj_bias=False, mlp_bias=False, partial_rotary_factor=1.0)),
    "ernie4_5-biases-untied": ("Ernie4_5", dict(num_key_value_heads=1, use_bias=True, tie_word_embeddings=False),
                               dict(qkv_bias=True, proj_bias=True, mlp_bias=True, tie_embeddings=False)),
    "glm": ("Glm", dict(num_key_value_heads=2),  # (GLM-4-9B-chat-hf: glm4's without the post-norms)
            dict(pre_norms=True, post_norms=False, partial_rotary_factor=0.5, qkv_bias=True, proj_bias=False)),
    "glm-no-bias-full-rotary": ("Glm", dict(num_key_value_heads=4, attention_bias=False, partial_rotary_factor=1.0,
                                            tie_word_embeddings=True),
                                dict(partial_rotary_factor=1.0, qkv_bias=False, tie_embeddings=True)),
    "glm4": ("Glm4", dict(num_key_value_heads=2),  # (interleaved RoPE on half of each head, norms around branches)
             dict(pre_norms=True, post_norms=True, partial_rotary_factor=0.5, qkv_bias=True, proj_bias=False)),
    "glm4-full-rotary-tied": ("Glm4", dict(num_key_value_heads=4, attention_bias=False, partial_rotary_factor=1.0,
                                           tie_word_embeddings=True),
                              dict(post_norms=True, partial_rotary_factor=1.0, qkv_bias=False, tie_embeddings=True)),
    "phi4-mini-partial-rotary": ("Phi3", dict(num_key_value_heads=2, partial_rotary_factor=0.75, hidden_act="silu",
                                              head_dim=8, max_position_embeddings=4 * T_MAX,
                                              original_max_position_embeddings=T_MAX,
                                              rope_scaling={"type": "longrope", "short_factor": [1.0, 1.7, 4.0],
                                                            "long_factor": [2.0] * 3}),  # (head_dim 8 * 0.75 / 2)
                                 dict(partial_rotary_factor=0.75, block_size=T_MAX, nope_layers=None)),
    # (GPTNeoXConfig has no head_dim: its attention takes 32 / 4, its RoPE the config's, as StableLM's)
    "pythia": ("GPTNeoX", dict(head_dim=8, hidden_act="gelu", rotary_pct=0.25, layer_norm_eps=1e-5),
               dict(norm="layernorm", mlp="gelu_erf", parallel_residual=True, partial_rotary_factor=0.25,
                    qkv_bias=True, proj_bias=True, mlp_bias=True, tie_embeddings=False, head_dim=None)),
    "neox-sequential-tanh-tied-no-attention-bias": ("GPTNeoX", dict(head_dim=8, use_parallel_residual=False,
                                                                    hidden_act="gelu_new", rotary_pct=0.5,
                                                                    attention_bias=False, tie_word_embeddings=True,
                                                                    rotary_emb_base=5000),
                                                    dict(parallel_residual=False, mlp="gelu", partial_rotary_factor=0.5,
                                                         qkv_bias=False, proj_bias=False, mlp_bias=True,
                                                         tie_embeddings=True, rope_theta=5000)),
}


def hf_model(case: str):
    """A random transformers model of `case`, its norms moved off their init (so that 1 + weight is tested)."""
    prefix, kw, _ = CASES[case]
    return random_model(prefix, {**BASE, **kw}, noise=0.3)


case = saved_cases(CASES, hf_model)


def test_config_maps_the_options(case):
    name, _, d = case
    cfg = GPT.from_pretrained(d).config
    assert cfg.block_size == T_MAX
    for key, want in CASES[name][2].items():
        got = getattr(cfg, key)
        assert (got if key != "rope_scaling" else {k: got[k] for k in want}) == want, key


def test_logits_and_greedy_match_transformers(case):
    """T = 40 is five windows: the sliding layers must slide (full attention there gives other logits)."""
    name, ref, d = case
    model = GPT.from_pretrained(d)
    ids = np.random.default_rng(0).integers(0, V, (3, 40))
    want = hf_logits(ref, ids)
    assert np.abs(model.forward(ids) - want).max() <= 2e-4 * max(1.0, np.abs(want).max())
    assert np.abs(want).max() > 1.0
    new = set()
    for row in ids[:, :7].tolist():  # (random models repeat themselves: three prompts, so that the test is not)
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([row]), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                                  pad_token_id=0)[0].tolist()
        ours = generate(model.eval(), row, 30, temperature=0.0)
        assert ours == theirs
        new |= set(ours[7:])
    assert len(new) >= 3


OFF = dict(sliding_window=None, pre_norms=True, qk_norm_over="head", nope_layers=None, partial_rotary_factor=1.0,
           rope_local_theta=None, residual_scale=None, logits_scaling=None,
           parallel_residual=False)  # where a family does not set them


@pytest.mark.parametrize("name,option", [(name, option) for name, (_, _, want) in CASES.items() for option in OFF
                                         if want.get(option, OFF[option]) != OFF[option]])
def test_each_option_changes_the_logits(name, option, tmp_path):
    """The oracle above is not blind to the options: the same weights without the option a family sets (full
    attention instead of the window, pre-norms of gain one, per-head QK-norm, RoPE on every layer or whole heads,
    the full layers' RoPE on the sliding ones) compute other logits."""
    hf_model(name).save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    cfg, sd = model.config, model.state_dict()
    changes = {option: OFF[option]}
    if option == "sliding_window":
        changes["layer_types"] = None
        doc = json.loads((tmp_path / "config.json").read_text())  # (a window as long as the context: none)
        assert hf.config_from_hf({**doc, "sliding_window": T_MAX}).sliding_window is None
    if option == "partial_rotary_factor" and cfg.rope_scaling:  # LongRoPE's factors for the whole head
        short = cfg.rope_scaling["short_factor"]
        pad = [1.0] * (cfg.head_size // 2 - len(short))
        changes["rope_scaling"] = {**cfg.rope_scaling, "short_factor": short + pad}
    other = GPT(GPTConfig(**{**cfg.to_dict(), **changes}), seed=1)
    if option == "qk_norm_over":  # a weight per head: the first head's channels
        sd = {**sd, **{k: sd[k][:, :cfg.head_size] for k in ("attn.q_norm.weight", "attn.k_norm.weight")}}
    # (pre_norms: ln_1 and ln_2 come in with other's gains of one)
    other.load_state_dict({**{k: v for k, v in other.state_dict().items() if k not in sd}, **sd})
    ids = np.random.default_rng(0).integers(0, V, (1, 40))
    assert np.abs(other.forward(ids)[0, WINDOW + 4:] - model.forward(ids)[0, WINDOW + 4:]).max() > 1e-3


def test_neox_exact_gelu_is_not_the_tanh_one(tmp_path):
    """The oracle tells the two GELUs apart: Pythia's weights with the tanh approximation instead of the exact GELU
    compute logits off by more than the tolerance the tests above allow."""
    ref = hf_model("pythia")
    ref.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    tanh = GPT(GPTConfig(**{**model.config.to_dict(), "mlp": "gelu"}), init=False).load_state_dict(model.state_dict())
    ids = np.random.default_rng(0).integers(0, V, (2, 40))
    want = hf_logits(ref, ids)
    exact, approx = (np.abs(m.forward(ids) - want).max() for m in (model, tanh))
    assert exact <= 2e-4 * max(1.0, np.abs(want).max()) < approx and 20 * exact < approx


def test_neox_old_files_buffers_and_names(tmp_path):
    """Older GPT-NeoX files carry buffers (each layer's causal mask, masked_bias, rotary inv_freq: skipped, as
    transformers skips them) and may name the untied head lm_head (transformers 5's name in memory) or leave the
    gpt_neox. prefix out (a GPTNeoXModel's): the same model loads."""
    from fastllm.fileio import load_safetensors, save_safetensors

    ref = hf_model("pythia")
    ref.save_pretrained(tmp_path / "new")
    tensors, meta = load_safetensors(tmp_path / "new" / "model.safetensors")
    renamed = {"embed_out.weight": "lm_head.weight"}
    old = {renamed.get(k, k.removeprefix("gpt_neox.")): np.array(v) for k, v in tensors.items()}
    for layer in range(3):
        pre = f"layers.{layer}.attention."
        old.update({pre + "bias": np.tril(np.ones((1, 1, T_MAX, T_MAX), bool)), pre + "rotary_emb.inv_freq":
                    np.ones(1, np.float32), pre + "masked_bias": np.array(-1e9, np.float32)})
    (tmp_path / "old").mkdir()
    save_safetensors(tmp_path / "old" / "model.safetensors", old, meta)
    (tmp_path / "old" / "config.json").write_text((tmp_path / "new" / "config.json").read_text())
    ids = np.random.default_rng(7).integers(0, V, (1, 20))
    want = GPT.from_pretrained(tmp_path / "new").forward(ids)
    assert np.array_equal(GPT.from_pretrained(tmp_path / "old").forward(ids), want)


def test_weights_held_like_the_float32_model_decoding(case):
    """weights="bfloat16" (matrices held in bf16 alone, converted while loading): every family's logits and greedy
    tokens are those of the float32 model decoding with bf16 weights, bit for bit."""
    name, _, d = case
    full, held = GPT.from_pretrained(d).eval(), GPT.from_pretrained(d, weights="bfloat16")
    ids = np.random.default_rng(6).integers(0, V, (2, 24))
    with full.decoding("bfloat16"):
        assert np.array_equal(held.forward(ids), full.forward(ids))
    assert held.generate([[3, 1, 4], [1, 5]], 10, temperature=0) == \
        full.generate([[3, 1, 4], [1, 5]], 10, temperature=0, weights="bfloat16")


def test_gradients_match_transformers_autograd(case):
    """Every parameter's gradient of the mean cross-entropy, against torch autograd through transformers' model
    (the norms' (1 + weight) does not change a gradient)."""
    name, ref, d = case
    model = GPT.from_pretrained(d).train()
    rng = np.random.default_rng(1)
    ids, targets = rng.integers(0, V, (2, 24)), rng.integers(0, V, (2, 24))
    model.zero_grad()
    loss = model.forward(ids, targets)
    model.backward()
    ref.zero_grad()
    logits = ref(torch.as_tensor(ids)).logits.float()
    ref_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), torch.as_tensor(targets).reshape(-1))
    ref_loss.backward()
    assert loss == pytest.approx(ref_loss.item(), rel=1e-5)
    mapped = hf.tensor_map(model.config, json.loads((d / "config.json").read_text())["model_type"])
    # (transformers keeps GPT-NeoX's embed_out as lm_head in memory; its files say embed_out)
    grads = {"embed_out.weight" if n == "lm_head.weight" and "embed_out.weight" in mapped else n: p
             for n, p in ref.named_parameters()}
    assert set(mapped) == set(grads) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    for hf_name, slot in mapped.items():
        want = grads[hf_name].grad.numpy()
        got = slot.hf(model.g)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max() + 1e-7, hf_name


def test_bf16_files_load_as_transformers_computes_them(case, tmp_path):
    """A BF16 file computed in float32 by both (Gemma's 1 + weight added to the bf16 weight in float32, as
    transformers does)."""
    name, _, _ = case
    hf_model(name).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    model = GPT.from_pretrained(tmp_path / "bf16")
    ids = np.random.default_rng(2).integers(0, V, (2, 30))
    want = hf_logits(ref, ids)
    assert np.abs(model.forward(ids) - want).max() <= 2e-4 * max(1.0, np.abs(want).max())
    # held in bf16: the matrices and (RoPE models) the token embedding as the file's bf16 bits, the same numbers
    held = GPT.from_pretrained(tmp_path / "bf16", weights="bfloat16")
    assert (TOKEN_TABLE in held.decode_weights("bfloat16")) == (model.config.positions == "rope")
    with model.eval().decoding("bfloat16"):
        assert np.array_equal(held.forward(ids), model.forward(ids))


def test_save_pretrained_round_trip(case, tmp_path):
    """fastllm -> transformers -> fastllm: transformers computes fastllm's logits, and the tensors come back
    (the norms' 1 + weight and back again: within a float32 rounding)."""
    name, _, d = case
    model = GPT.from_pretrained(d)
    model.save_pretrained(tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "config.json").read_text())
    assert doc["model_type"] == json.loads((d / "config.json").read_text())["model_type"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = np.random.default_rng(3).integers(0, V, (2, 33))
    want = hf_logits(theirs, ids)
    assert np.abs(model.forward(ids) - want).max() <= 2e-4 * max(1.0, np.abs(want).max())
    back = GPT.from_pretrained(tmp_path / "out")
    assert back.config == model.config
    assert np.abs(back.params - model.params).max() <= (1e-6 if name.startswith("gemma") else 0)


def test_gemma3_rope_parameters_per_layer_type(tmp_path):
    """transformers 5's spelling of Gemma 3's two RoPEs (rope_parameters per layer type) and 4's (rope_theta,
    rope_local_base_freq, rope_scaling) read the same; a scaled sliding RoPE is refused by name."""
    d = {**json.loads(json.dumps(hf_model("gemma3").config.to_dict())), "architectures": ["Gemma3ForCausalLM"]}
    new = hf.config_from_hf(d)
    old = {k: v for k, v in d.items() if k != "rope_parameters"} | dict(
        rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert hf.config_from_hf(old) == new
    bad = d | {"rope_parameters": {**d["rope_parameters"], "sliding_attention": {"rope_type": "linear",
                                                                                 "factor": 2.0}}}
    with pytest.raises(ValueError, match="rope_parameters.sliding_attention"):
        hf.config_from_hf(bad)


def test_gemma3_image_text_checkpoint_loads_its_language_model(tmp_path):
    """Gemma 3 4B-27B are Gemma3ForConditionalGeneration: fastllm reads the language model (text_config, tensors
    under language_model.model.) and skips the vision tower; on text its logits and greedy tokens are transformers',
    and save_pretrained writes a Gemma3ForCausalLM of the language model alone."""
    text = {k: v for k, v in {**BASE, **CASES["gemma3"][1]}.items() if not k.endswith("token_id")}
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    torch.manual_seed(0)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                    image_token_index=V - 1, boi_token_index=V - 3, eoi_token_index=V - 2)
    ref = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    ref.save_pretrained(tmp_path / "mm")
    model = GPT.from_pretrained(tmp_path / "mm")
    assert model.config.qk_norm and model.config.layer_types == LAYERS
    ids = np.random.default_rng(4).integers(0, V - 3, (2, 36))
    want = hf_logits(ref, ids)
    assert np.abs(model.forward(ids) - want).max() <= 2e-4 * max(1.0, np.abs(want).max())
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([[5, 17, 99]]), max_new_tokens=20, min_new_tokens=20, do_sample=False,
                              pad_token_id=0)[0].tolist()
    assert generate(model.eval(), [5, 17, 99], 20, temperature=0.0) == theirs
    model.save_pretrained(tmp_path / "text")
    assert json.loads((tmp_path / "text" / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    text_only = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "text", dtype=torch.float32).eval()
    assert np.abs(hf_logits(text_only, ids) - want).max() <= 2e-4 * max(1.0, np.abs(want).max())
    doc = json.loads((tmp_path / "mm" / "config.json").read_text())
    for changes, match in (({"text_config": None}, "text_config must be an object"),
                           ({"architectures": ["Gemma3ForCausalLM"]}, "architectures")):
        (tmp_path / "mm" / "config.json").write_text(json.dumps(doc | changes))
        with pytest.raises(ValueError, match=match):
            GPT.from_pretrained(tmp_path / "mm")


def test_gemma_activation_keys():
    """Gemma's first configs say hidden_act "gelu" (read as the tanh approximation, as transformers does), Gemma 1.1
    adds hidden_activation; an exact GELU or another activation is refused by name."""
    d = {**json.loads(hf_model("gemma-mqa").config.to_json_string()), "architectures": ["GemmaForCausalLM"]}
    want = hf.config_from_hf(d)
    assert hf.config_from_hf(d | {"hidden_act": "gelu", "hidden_activation": "gelu_pytorch_tanh"}) == want
    for changes in ({"hidden_activation": "gelu"}, {"hidden_act": "silu"}):
        with pytest.raises(ValueError, match=f"{next(iter(changes))} '{next(iter(changes.values()))}' is not"):
            hf.config_from_hf(d | changes)


@pytest.mark.parametrize("options", [dict(qk_norm=False, rope_local_theta=None), dict(attn_softcap=None)],
                         ids=["gemma2", "gemma3"])
def test_fastllm_gemma_configs_without_windows_save_for_transformers(options, tmp_path):
    """A Gemma 2/3 config of fastllm's own with no sliding layer saves as a folder transformers computes the same
    (transformers' Gemma 2/3 always build a sliding mask: the window written is the whole context) and reads back
    to the same config; Gemma 3 with a score cap, which transformers' Gemma 3 does not apply, is refused by name."""
    cfg = GPTConfig(block_size=T_MAX, vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, n_embd=32,
                    positions="rope", norm="rmsnorm", mlp="geglu", mlp_hidden=56, qkv_bias=False, proj_bias=False,
                    mlp_bias=False, embed_scale=32 ** 0.5, post_norms=True, qk_norm=True, rope_local_theta=1e4,
                    attn_softcap=5.0, logit_softcap=10.0)
    model = GPT(GPTConfig(**{**cfg.to_dict(), **options}), seed=0)
    model.params *= 4.0  # sharper logits
    model.save_pretrained(tmp_path / "out")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = np.random.default_rng(5).integers(0, V, (2, 40))
    want = hf_logits(theirs, ids)
    assert np.abs(model.forward(ids) - want).max() <= 2e-4 * max(1.0, np.abs(want).max())
    assert GPT.from_pretrained(tmp_path / "out").config == model.config
    if "attn_softcap" in options:
        with pytest.raises(ValueError, match="attn_softcap=5.0 and qk_norm"):
            GPT(cfg, init=False).save_pretrained(tmp_path / "capped")


def test_olmo3_rope_parameters_per_layer_type(tmp_path):
    """transformers 5's rope_parameters per layer type: sliding layers with a base of their own, or with the full
    layers' scaling too; both load, compute transformers' logits and save back as transformers reads them."""
    for sliding in ({"rope_type": "default", "rope_theta": 1e4}, {**YARN, "rope_theta": 5e5}):
        params = {"full_attention": {**YARN, "rope_theta": 5e5}, "sliding_attention": sliding}
        ref = random_model("Olmo3", {**BASE, **CASES["olmo3"][1], "rope_scaling": None, "rope_parameters": params},
                           noise=0.3)
        assert ref.config.rope_parameters["sliding_attention"]["rope_theta"] == sliding["rope_theta"]
        d = tmp_path / str(len(sliding))
        ref.save_pretrained(d)
        model = GPT.from_pretrained(d)
        assert model.config.rope_local_theta == (1e4 if sliding["rope_type"] == "default" else None)
        ids = np.random.default_rng(4).integers(0, V, (2, 40))
        want = hf_logits(ref, ids)
        assert np.abs(model.forward(ids) - want).max() <= 2e-4 * max(1.0, np.abs(want).max())
        model.save_pretrained(d / "out")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(d / "out", dtype=torch.float32).eval()
        assert np.abs(hf_logits(theirs, ids) - want).max() <= 2e-4 * max(1.0, np.abs(want).max())
        assert GPT.from_pretrained(d / "out").config == model.config


@pytest.mark.parametrize("case_name,changes,match", [
    ("gemma2", dict(hidden_activation="gelu"), "hidden_activation .gelu. is not supported"),  # exact GELU in Gemma 2
    ("gemma2", dict(hidden_activation="silu"), "hidden_activation .silu. is not supported"),
    ("gemma2", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma2", dict(query_pre_attn_scalar=-1), "query_pre_attn_scalar must be a positive number"),
    ("gemma2", dict(attn_logit_softcapping=0), "attn_logit_softcapping must be a positive number"),
    ("gemma2", dict(layer_types=["sliding_attention", "chunked_attention", "full_attention"]),
     "layer_types \\['chunked_attention'\\] are not supported"),
    ("gemma2", dict(layer_types=["sliding_attention"]), "layer_types must be a list of num_hidden_layers=3"),
    ("gemma2", dict(sliding_window=0), "sliding_window=0 on layers"),
    ("smollm3", dict(no_rope_layers=[1, 0]), "no_rope_layers must be a list of num_hidden_layers=3"),
    ("smollm3", dict(no_rope_layers=[1, 2, 1]), "no_rope_layers must be a list"),
    ("smollm3", dict(no_rope_layers=None, no_rope_layer_interval=0), "no_rope_layer_interval must be a positive"),
    ("olmo2", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported for olmo2"),
    ("olmo2", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ("olmo3", dict(layer_types=["sliding_attention"]), "layer_types must be a list of num_hidden_layers=3"),
    ("phi4-mini-partial-rotary", dict(partial_rotary_factor=0.05), "partial_rotary_factor"),
    ("pythia", dict(hidden_act="relu"), "hidden_act 'relu' is not supported"),
    ("pythia", dict(head_dim=16), "head_dim=16 is not supported for gpt_neox"),
    ("pythia", dict(use_parallel_residual="yes"), "use_parallel_residual must be true or false"),
    ("pythia", dict(hidden_size=None), "malformed|hidden_size"),
    ("stablelm-2", dict(use_parallel_residual=True), "use_parallel_residual=true is not supported for stablelm"),
    ("stablelm-2", dict(qk_layernorm=True), "qk_layernorm=true is not supported"),
])
def test_bad_configs(tmp_path, case_name, changes, match):
    d = tmp_path / "model"
    hf_model(case_name).save_pretrained(d)
    doc = json.loads((d / "config.json").read_text()) | changes
    (d / "config.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=match) as e:
        GPT.from_pretrained(d)
    assert "config.json" in str(e.value)


@pytest.mark.parametrize("options,kind", [
    (dict(pre_norms=False, post_norms=True, qk_norm=True, qk_norm_over="all"), "olmo2"),
    (dict(pre_norms=False, post_norms=True, qk_norm=True, qk_norm_over="all", sliding_window=5,
          layer_types=["sliding_attention", "full_attention"]), "olmo3"),
    (dict(nope_layers=[0]), "smollm3"),
    (dict(nope_layers=[1], sliding_window=4, layer_types=["sliding_attention", "full_attention"]), "smollm3"),
    (dict(partial_rotary_factor=0.5), "phi3"),
    (dict(mlp="relu2", qkv_bias=True, proj_bias=True), "arcee"),
    (dict(residual_scale=0.5, logits_scaling=4.0, embed_scale=3.0, attn_scale=0.1), "granite"),
    (dict(norm="layernorm", partial_rotary_factor=0.25, qkv_bias=True), "stablelm"),
    (dict(norm="layernorm", mlp="gelu", qkv_bias=True, proj_bias=True, mlp_bias=True, sliding_window=4), "starcoder2"),
    (dict(sliding_window=4, layer_types=["sliding_attention", "full_attention"]), "ministral"),
    (dict(post_norms=True, qkv_bias=True, partial_rotary_factor=0.5), "glm4"),
    (dict(qkv_bias=True, partial_rotary_factor=0.5), "glm"),
    (dict(pre_norms=False, post_norms=True, qk_norm=True, sliding_window=4, nope_layers=[1],
          layer_types=["sliding_attention", "full_attention"]), "exaone4"),
    (dict(pre_norms=False, post_norms=True, qk_norm=True), "exaone4"),
    (dict(norm="layernorm", mlp="gelu_erf", parallel_residual=True, n_kv_head=None, partial_rotary_factor=0.25,
          qkv_bias=True, proj_bias=True, mlp_bias=True, tie_embeddings=False), "gpt_neox"),
    (dict(norm="layernorm", mlp="gelu_erf", n_kv_head=None, mlp_bias=True), "gpt_neox"),  # (sequential, no attn bias)
])
def test_fastllm_configs_save_as_their_family(options, kind, tmp_path):
    """A config trained in fastllm with these options saves as the family that computes it (same logits)."""
    cfg = GPTConfig(**{**dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                              positions="rope", norm="rmsnorm", mlp="swiglu", mlp_hidden=48, qkv_bias=False,
                              proj_bias=False, mlp_bias=False), **options})
    model = GPT(cfg, seed=0)
    model.params *= 4.0
    model.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == kind
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ids = np.random.default_rng(5).integers(0, 97, (2, 20))
    want = hf_logits(theirs, ids)
    assert np.abs(model.forward(ids) - want).max() <= 2e-4 * max(1.0, np.abs(want).max())
    assert GPT.from_pretrained(tmp_path / "out").config == cfg


@pytest.mark.parametrize("options,match", [
    (dict(pre_norms=False, post_norms=True, qk_norm=True, qk_norm_over="all", mlp="gelu"), "OLMo 2/3"),
    (dict(pre_norms=False), "pre_norms=False, qk_norm_over=.head. \\(EXAONE 4\\)"),
    (dict(nope_layers=[0], qk_norm=True), "SmolLM3"),
    (dict(partial_rotary_factor=0.5, qkv_bias=True, proj_bias=True), "partial_rotary_factor"),
    (dict(parallel_residual=True), "norm='rmsnorm'.*GPT-NeoX|GPT-NeoX.*norm='rmsnorm'"),
    (dict(norm="layernorm", mlp="gelu_erf", mlp_bias=True, n_kv_head=2), "n_kv_head=2"),
])
def test_configs_no_family_computes_are_refused_by_name(options, match, tmp_path):
    llama = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32, positions="rope", norm="rmsnorm",
                 mlp="swiglu", qkv_bias=False, proj_bias=False, mlp_bias=False)
    cfg = GPTConfig(**{**llama, **options})
    with pytest.raises(ValueError, match=match):
        GPT(cfg).save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gptconfig_checks_the_new_options():
    base = dict(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_embd=32, positions="rope", norm="rmsnorm")
    for bad, match in ((dict(nope_layers=[2]), "nope_layers"), (dict(nope_layers=[0, 0]), "nope_layers"),
                       (dict(nope_layers=[True]), "nope_layers"), (dict(partial_rotary_factor=0.0), "partial"),
                       (dict(partial_rotary_factor=1.5), "partial"), (dict(qk_norm_over="heads"), "qk_norm_over"),
                       (dict(pre_norms=1), "pre_norms"), (dict(partial_rotary_factor=0.1), "rotary dim")):
        with pytest.raises(ValueError, match=match):
            GPTConfig(**base, **bad)
    with pytest.raises(ValueError, match="nope_layers is set but positions is 'learned'"):
        GPTConfig(**{**base, "positions": "learned"}, nope_layers=[0])
    assert GPTConfig(**base, nope_layers=(1, 0)).nope_layers == [0, 1]


@pytest.mark.parametrize("kind", ["gpt_neox", "smollm3", "olmo2", "olmo3", "exaone4", "arcee", "granite", "ernie4_5",
                                  "glm4",
                                  "ministral", "stablelm", "starcoder2", "phi3", "glm", "llama", "mistral", "qwen2",
                                  "qwen3",
                                  "gemma", "gemma2", "gemma3_text"])
def test_configs_leaving_keys_out_mean_transformers_defaults(kind):
    """A config.json with only the sizes (older or hand-written ones leave defaults out) maps to the model
    transformers builds from it: the same GPTConfig as from the full config.json transformers writes."""
    sizes = dict(vocab_size=64, hidden_size=256, intermediate_size=96, num_hidden_layers=4, num_attention_heads=32,
                 max_position_embeddings=64)  # (32 heads: the default kv heads, 2 to 32, divide them)
    arch = "Gemma3TextForCausalLM" if kind == "gemma3_text" else hf.ARCHITECTURES[kind][0]
    full = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**sizes, pad_token_id=None)
    assert hf.config_from_hf({**sizes, "model_type": kind}) == hf.config_from_hf(json.loads(full.to_json_string()))

