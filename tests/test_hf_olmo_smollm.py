"""OLMo 2, OLMo 3, SmolLM3 and Phi-4-mini-style checkpoints: small random Olmo2ForCausalLM / Olmo3ForCausalLM /
SmolLM3ForCausalLM / Phi3ForCausalLM models built and saved by transformers load into fastllm with transformers'
float32 logits, greedy tokens (through the KV cache) and gradients (transformers' autograd), from F32 and BF16
files; fastllm writes folders transformers loads to the same logits. Their pieces: norms after each branch instead
of before it and QK-norm over all the q (k) channels (OLMo 2), three sliding layers of four whose RoPE is not the
full layers' YaRN (OLMo 3), layers without RoPE and sliding NoPE layers (SmolLM3), RoPE on part of each head
(Phi-4-mini's partial_rotary_factor, with LongRoPE's short factors)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hf_families import hf_logits, random_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fastllm import hf  # noqa: E402
from fastllm.model import GPT, GPTConfig  # noqa: E402
from fastllm.sample import generate  # noqa: E402

V, T_MAX, WINDOW = 301, 64, 8
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
            head_dim=16, max_position_embeddings=T_MAX, rms_norm_eps=1e-6, initializer_range=0.15, bos_token_id=None,
            eos_token_id=None, pad_token_id=None)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
CASES = {  # name: (transformers class prefix, config)
    "olmo2": ("Olmo2", dict(num_key_value_heads=4)),
    "olmo2-gqa-biases-tied": ("Olmo2", dict(num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True)),
    "olmo3": ("Olmo3", dict(num_key_value_heads=2, sliding_window=WINDOW, rope_scaling=YARN, rope_theta=5e5,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "smollm3": ("SmolLM3", dict(num_key_value_heads=2, no_rope_layer_interval=3, rope_theta=2e6)),
    "smollm3-sliding-biases-untied": ("SmolLM3", dict(num_key_value_heads=1, no_rope_layers=[1, 0, 0],
                                                      use_sliding_window=True, sliding_window=WINDOW,
                                                      attention_bias=True, mlp_bias=True,
                                                      tie_word_embeddings=False)),
    "phi4-mini-partial-rotary": ("Phi3", dict(num_key_value_heads=2, partial_rotary_factor=0.75, hidden_act="silu",
                                              head_dim=8, max_position_embeddings=4 * T_MAX,
                                              original_max_position_embeddings=T_MAX,
                                              rope_scaling={"type": "longrope", "short_factor": [1.0, 1.7, 4.0],
                                                            "long_factor": [2.0] * 3})),  # (head_dim 8 * 0.75 / 2)
}


def hf_model(case: str):
    prefix, kw = CASES[case]
    return random_model(prefix, {**BASE, **kw}, noise=0.3)


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    model = hf_model(request.param)
    d = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(d)
    return request.param, model, d


def test_config_maps_the_options(case):
    name, _, d = case
    cfg = GPT.from_pretrained(d).config
    olmo = name.startswith("olmo")
    assert (cfg.pre_norms, cfg.post_norms, cfg.qk_norm) == (not olmo, olmo, olmo)
    assert cfg.qk_norm_over == ("all" if olmo else "head") and cfg.block_size == T_MAX
    assert cfg.nope_layers == {"smollm3": [2], "smollm3-sliding-biases-untied": [1, 2]}.get(name)
    assert cfg.partial_rotary_factor == (0.75 if name.startswith("phi4") else 1.0)
    if name == "olmo3":  # the full layer's YaRN; the sliding ones the plain RoPE of the same base
        assert cfg.rope_scaling["rope_type"] == "yarn" and cfg.rope_local_theta == cfg.rope_theta == 5e5
        assert cfg.layer_types == CASES[name][1]["layer_types"] and cfg.sliding_window == WINDOW
    if name.startswith("smollm3-sliding"):  # the NoPE layers slide
        assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
        assert (cfg.qkv_bias, cfg.proj_bias, cfg.mlp_bias, cfg.tie_embeddings) == (True, True, True, False)
    assert cfg.tie_embeddings == (name in ("olmo2-gqa-biases-tied", "smollm3"))


def test_logits_and_greedy_match_transformers(case):
    """T = 40 is five windows and well past YaRN's original context."""
    name, ref, d = case
    model = GPT.from_pretrained(d)
    ids = np.random.default_rng(0).integers(0, V, (3, 40))
    want = hf_logits(ref, ids)
    assert np.abs(model.forward(ids) - want).max() <= 2e-4 * max(1.0, np.abs(want).max())
    assert np.abs(want).max() > 1.0
    new = set()
    for row in ids[:, :7].tolist():
        with torch.no_grad():
            theirs = ref.generate(torch.tensor([row]), max_new_tokens=30, min_new_tokens=30, do_sample=False,
                                  pad_token_id=0)[0].tolist()
        ours = generate(model.eval(), row, 30, temperature=0.0)
        assert ours == theirs
        new |= set(ours[7:])
    assert len(new) >= 3


@pytest.mark.parametrize("option", ["pre_norms", "qk_norm_over", "nope_layers", "partial_rotary_factor",
                                    "rope_local_theta"])
def test_each_option_changes_the_logits(case, option):
    """The oracle is not blind to the options: the model without the one its family sets computes other logits."""
    name, _, d = case
    model = GPT.from_pretrained(d)
    cfg = model.config
    off = dict(pre_norms=True, qk_norm_over="head", nope_layers=None, partial_rotary_factor=1.0,
               rope_local_theta=None)[option]
    if getattr(cfg, option) == off:
        pytest.skip(f"{name} does not set {option}")
    changes = {option: off}
    if option == "partial_rotary_factor" and cfg.rope_scaling:  # LongRoPE's factors for the whole head
        short = cfg.rope_scaling["short_factor"]
        pad = [1.0] * (cfg.head_size // 2 - len(short))
        changes["rope_scaling"] = {**cfg.rope_scaling, "short_factor": short + pad}
    changed = GPTConfig(**{**cfg.to_dict(), **changes})
    other = GPT(changed, seed=1)
    if option == "pre_norms":  # ln_1, ln_2 come in: gains of one
        other.load_state_dict({**model.state_dict(), **{k: v for k, v in other.state_dict().items()
                                                         if k.startswith(("ln_1", "ln_2"))}})
    elif option == "qk_norm_over":  # a weight per head: the first head's channels
        sd = model.state_dict()
        hd = cfg.head_size
        other.load_state_dict({**sd, **{k: sd[k][:, :hd] for k in ("attn.q_norm.weight", "attn.k_norm.weight")}})
    else:
        other.load_state_dict(model.state_dict())
    ids = np.random.default_rng(0).integers(0, V, (1, 40))
    assert np.abs(other.forward(ids) - model.forward(ids)).max() > 1e-3


def test_gradients_match_transformers_autograd(case):
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
    grads = dict(ref.named_parameters())
    mapped = hf.tensor_map(model.config, json.loads((d / "config.json").read_text())["model_type"])
    assert set(mapped) == set(grads) - ({"lm_head.weight"} if model.config.tie_embeddings else set())
    for hf_name, slot in mapped.items():
        want = grads[hf_name].grad.numpy()
        got = slot.view(model.g)
        assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max() + 1e-7, hf_name


def test_bf16_files_load_as_transformers_computes_them(case, tmp_path):
    name, _, _ = case
    hf_model(name).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    model = GPT.from_pretrained(tmp_path / "bf16")
    ids = np.random.default_rng(2).integers(0, V, (2, 30))
    want = hf_logits(ref, ids)
    assert np.abs(model.forward(ids) - want).max() <= 2e-4 * max(1.0, np.abs(want).max())


def test_save_pretrained_round_trip(case, tmp_path):
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
    assert np.array_equal(back.params, model.params)


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
    ("smollm3", dict(no_rope_layers=[1, 0]), "no_rope_layers must be a list of num_hidden_layers=3"),
    ("smollm3", dict(no_rope_layers=[1, 2, 1]), "no_rope_layers must be a list"),
    ("smollm3", dict(no_rope_layers=None, no_rope_layer_interval=0), "no_rope_layer_interval must be a positive"),
    ("olmo2", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5 is not supported for olmo2"),
    ("olmo2", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ("olmo3", dict(layer_types=["sliding_attention"]), "layer_types must be a list of num_hidden_layers=3"),
    ("phi4-mini-partial-rotary", dict(partial_rotary_factor=0.05), "partial_rotary_factor"),
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
])
def test_fastllm_configs_save_as_their_family(options, kind, tmp_path):
    """A config trained in fastllm with these options saves as the family that computes it (same logits)."""
    cfg = GPTConfig(block_size=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, positions="rope",
                    norm="rmsnorm", mlp="swiglu", mlp_hidden=48, qkv_bias=False, proj_bias=False, mlp_bias=False,
                    **options)
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
    (dict(pre_norms=False), "OLMo 2/3"),
    (dict(nope_layers=[0], qk_norm=True), "SmolLM3"),
    (dict(partial_rotary_factor=0.5, qkv_bias=True, proj_bias=True), "partial_rotary_factor"),
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
