"""PEFT's LoRA adapter folders (fastllm.hf.save_adapter / load_adapter) against peft itself, on small random
transformers models of six families: Llama (GQA), Qwen2 (q/k/v biases), GPT-2 (Conv1D, fused c_attn), Phi-3 (fused
qkv_proj and gate_up_proj modules), GLM (interleaved RoPE: q and k rows reordered, gate_up_proj) and GPT-NeoX
(query_key_value's rows per head, reordered). peft's adapters
(random lora_B; per-module ranks and scales from rank_pattern, alpha_pattern, rslora; some layers only; a regex
target) load into fastllm to peft's logits; fastllm's adapters load into peft to fastllm's logits; a save and load
gives the same tensors bit for bit; what fastllm does not compute is refused by name."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hf_families import hf_logits, random_model, saved_cases
from test_lora import randomize_b

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from fastllm import hf  # noqa: E402
from fastllm.fileio import load_safetensors, save_safetensors, write_json  # noqa: E402
from fastllm.model import GPT  # noqa: E402

V = 301
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, hidden_act="silu",
            initializer_range=0.15, bos_token_id=None, eos_token_id=None, pad_token_id=None)
FAMILIES = {  # name: (transformers class prefix, its config, attention modules to adapt)
    "llama-gqa": ("Llama", dict(tie_word_embeddings=False), ["q_proj", "v_proj"]),
    "qwen2-biases": ("Qwen2", dict(tie_word_embeddings=True), ["q_proj", "v_proj"]),
    "gpt2": ("GPT2", dict(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=V, initializer_range=0.1,
                          bos_token_id=None, eos_token_id=None), ["c_attn"]),
    "phi3-fused": ("Phi3", dict(sliding_window=None, rope_scaling=None), ["qkv_proj"]),
    "glm-interleaved": ("Glm", dict(head_dim=8, partial_rotary_factor=0.5), ["q_proj", "k_proj"]),
    "neox-per-head-qkv": ("GPTNeoX", dict(head_dim=8, hidden_act="gelu"), ["query_key_value"]),
}
ATTENTION = r"0\..*attn.*"  # (a rank_pattern / alpha_pattern key: layer 0's attention modules, in every family)
SETTINGS = {  # name: LoraConfig fields (attention: the family's attention modules)
    "attention": dict(r=4, lora_alpha=8, target_modules="attention"),
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "patterns-rslora": dict(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True,
                            rank_pattern={r"1\.mlp\..*": 2, ATTENTION: 3}, alpha_pattern={ATTENTION: 5}),
    "some-layers": dict(r=3, lora_alpha=5, target_modules="attention", layers_to_transform=[1]),
    "regex": dict(r=2, lora_alpha=16,
                  target_modules=r".*\.(q_proj|k_proj|c_attn|qkv_proj|query_key_value|down_proj|dense_4h_to_h|c_fc)"),
}


def base_model(family: str):
    """A random float32 transformers model of `family`, its norms and biases moved off their init."""
    prefix, kw, _ = FAMILIES[family]
    if prefix != "GPT2":
        return random_model(prefix, {**BASE, **kw})
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


case = saved_cases(FAMILIES, base_model)  # (family name, the transformers base model, the folder it saved to)


def peft_model(family: str, ref, setting: str):
    """peft's LoRA model (random nonzero lora_B: init_lora_weights=False) of `setting` on a copy of ref."""
    kw = dict(SETTINGS[setting])
    if kw["target_modules"] == "attention":
        kw["target_modules"] = FAMILIES[family][2]
    config = peft.LoraConfig(**kw, init_lora_weights=False, fan_in_fan_out=family == "gpt2")
    torch.manual_seed(1)
    return peft.get_peft_model(copy.deepcopy(ref), config).eval()


def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, V, (2, 24))


def assert_close(got: np.ndarray, want: np.ndarray, base: np.ndarray) -> None:
    """got is want within 1e-4 of the logits' scale, and the adapter changes the logits (not a vacuous test)."""
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(want - base).max() > 0.05


# ---- peft -> fastllm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_peft_adapters_load_to_peft_logits(case, setting, tmp_path):
    name, ref, d = case
    pm = peft_model(name, ref, setting)
    pm.save_pretrained(tmp_path / "adapter")
    x = ids()
    want = hf_logits(pm, x)
    model = GPT.from_pretrained(d)
    lora = hf.load_adapter(model, tmp_path / "adapter")
    assert model.lora is lora and hf.is_adapter_folder(tmp_path / "adapter")
    assert_close(model.forward(x), want, hf_logits(ref, x))
    if setting == "patterns-rslora":  # saved back (ranks that differ: rank_pattern, alpha_pattern), peft reads it
        hf.save_adapter(model, tmp_path / "back")
        back = peft.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / "back").eval()
        assert_close(hf_logits(back, x), want, hf_logits(ref, x))
        again = GPT.from_pretrained(d)  # and read again: the same adapter, bit for bit
        hf.load_adapter(again, tmp_path / "back")
        assert (again.lora.ranks, again.lora.rows) == (lora.ranks, lora.rows)
        for key, t in lora.state_dict().items():
            assert np.array_equal(again.lora.state_dict()[key], t), key


def test_shared_and_separate_a(tmp_path):
    """q_proj and v_proj with equal lora_A are one adapter of rank r; separate ones concatenate (rank 2r)."""
    ref = base_model("llama-gqa")
    ref.save_pretrained(tmp_path / "base")
    pm = peft_model("llama-gqa", ref, "attention")
    pm.save_pretrained(tmp_path / "separate")
    tensors, meta = load_safetensors(tmp_path / "separate" / hf.ADAPTER_WEIGHTS)
    for key in [k for k in tensors if "v_proj.lora_A" in k]:
        tensors[key] = tensors[key.replace("v_proj", "q_proj")]
    (tmp_path / "shared").mkdir()
    save_safetensors(tmp_path / "shared" / hf.ADAPTER_WEIGHTS, tensors, meta)
    (tmp_path / "shared" / hf.ADAPTER_CONFIG).write_text((tmp_path / "separate" / hf.ADAPTER_CONFIG).read_text())
    x = ids()
    for kind, rank in (("separate", 8), ("shared", 4)):
        model = GPT.from_pretrained(tmp_path / "base")
        lora = hf.load_adapter(model, tmp_path / kind)
        assert lora.ranks == {"attn.c_attn.weight": rank} and lora.rows == {"attn.c_attn.weight": [(0, 32), (48, 64)]}
        want = hf_logits(peft.PeftModel.from_pretrained(copy.deepcopy(ref), tmp_path / kind).eval(), x)
        assert_close(model.forward(x), want, hf_logits(ref, x))


# ---- fastllm -> peft -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets,rslora", [("q,v", False), ("all", True)])
def test_fastllm_adapters_load_into_peft(case, targets, rslora, tmp_path):
    name, ref, d = case
    model = GPT.from_pretrained(d)
    model.add_lora(r=4, alpha=8, targets=targets, rslora=rslora)
    randomize_b(model.lora)
    folder = hf.save_adapter(model, tmp_path / "adapter", base=str(d))
    assert hf.is_adapter_folder(folder) and hf.adapter_base(folder) == str(d)
    doc = json.loads((folder / hf.ADAPTER_CONFIG).read_text())
    assert (doc["r"], doc["lora_alpha"], doc["use_rslora"], doc["rank_pattern"]) == (4, 8, rslora, {})
    assert doc["fan_in_fan_out"] == (name == "gpt2")
    x = ids()
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(ref), folder).eval()
    assert_close(hf_logits(pm, x), model.forward(x), hf_logits(ref, x))


@pytest.mark.parametrize("targets", ["q,v", "all", "o,down"])
def test_round_trip_is_exact(case, targets, tmp_path):
    """save_adapter then load_adapter: the same tensors bit for bit, the same ranks; the same rows where each
    projection is a module of its own (Phi-3's qkv_proj, GPT-2's c_attn, GLM's gate_up_proj, GPT-NeoX's
    query_key_value are one module: their rows read back whole)."""
    name, _, d = case
    model = GPT.from_pretrained(d)
    model.add_lora(r=4, alpha=6, targets=targets)
    tensors = randomize_b(model.lora)
    hf.save_adapter(model, tmp_path / "adapter")
    again = GPT.from_pretrained(d)
    lora = hf.load_adapter(again, tmp_path / "adapter")
    assert lora.ranks == model.lora.ranks and lora.scale == model.lora.scale
    assert list(lora.shapes.items()) == list(model.lora.shapes.items())  # one flat layout: AdamW state resumes
    fused = {"phi3-fused": "qkv_proj", "gpt2": "c_attn", "glm-interleaved": "gate_up_proj",
             "neox-per-head-qkv": "query_key_value"}.get(name)
    if fused is None or targets == "o,down":
        assert lora.rows == model.lora.rows
    for key, t in tensors.items():
        assert np.array_equal(lora.state_dict()[key], t), key
    x = ids()
    assert np.array_equal(again.forward(x), model.forward(x))


def test_adapter_base_and_folders(tmp_path):
    assert not hf.is_adapter_folder(tmp_path)
    write_json(tmp_path / hf.ADAPTER_CONFIG, {"peft_type": "LORA", "base_model_name_or_path": None})
    assert hf.is_adapter_folder(tmp_path) and hf.adapter_base(tmp_path) == ""
    write_json(tmp_path / hf.ADAPTER_CONFIG, {"peft_type": "LORA", "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"})
    assert hf.adapter_base(tmp_path) == "Qwen/Qwen2.5-0.5B"


# ---- refused -------------------------------------------------------------------------------------------------

PRE = "base_model.model.model.layers."


def _drop(tensors: dict, key: str) -> None:
    del tensors[key]


BAD = {  # name: (change to (adapter_config.json, tensors), error)
    "not-lora": (lambda doc, t: doc.update(peft_type="IA3"), "peft_type 'IA3'"),
    "dora": (lambda doc, t: doc.update(use_dora=True), "use_dora=True: DoRA"),
    "bias": (lambda doc, t: doc.update(bias="lora_only"), "bias 'lora_only'"),
    "modules-to-save": (lambda doc, t: doc.update(modules_to_save=["lm_head"]), "modules_to_save"),
    "lora-bias": (lambda doc, t: doc.update(lora_bias=True), "lora_bias=True"),
    "rank-not-config-r": (lambda doc, t: doc.update(r=3), r"has shape \(4, 32\).*r=3 for model.layers.0"),
    "unknown-module": (lambda doc, t: t.update({PRE + "7.self_attn.q_proj.lora_A.weight": np.zeros((4, 32))}),
                       "module 'model.layers.7.self_attn.q_proj' is no linear layer of this model"),
    "not-a-lora-tensor": (lambda doc, t: t.update({PRE + "0.self_attn.q_proj.weight": np.zeros((32, 32), np.float32)}),
                          "is not a LoRA tensor"),
    "shape": (lambda doc, t: t.update({PRE + "1.self_attn.v_proj.lora_B.weight": np.zeros((15, 4), np.float32)}),
              r"v_proj.lora_B.weight' has shape \(15, 4\).*need \(16, 4\)"),
    "nan": (lambda doc, t: t[PRE + "1.self_attn.q_proj.lora_A.weight"].__setitem__((0, 3), np.nan), "NaN"),
    "no-partner": (lambda doc, t: _drop(t, PRE + "0.self_attn.v_proj.lora_B.weight"),
                   "v_proj.lora_A.weight' has no lora_B partner"),
    "embedding": (lambda doc, t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A":
                                           np.zeros((4, V), np.float32)}), "a LoRA on an embedding"),
    "embedding-as-linear": (lambda doc, t: t.update({"base_model.model.model.embed_tokens.lora_A.weight":
                                                     np.zeros((4, V), np.float32)}), "is an embedding"),
    "lm-head": (lambda doc, t: t.update({"base_model.model.lm_head.lora_A.weight": np.zeros((4, 32), np.float32)}),
                "is the lm-head"),
    "integers": (lambda doc, t: t.update({PRE + "0.self_attn.q_proj.lora_A.weight": np.zeros((4, 32), np.int32)}),
                 "dtype int32"),
    "bad-pattern": (lambda doc, t: doc.update(rank_pattern={"q_proj(": 2}), "is not a regular expression"),
    "bad-alpha": (lambda doc, t: doc.update(lora_alpha="8"), "lora_alpha must be a number"),
}


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """A llama base folder and a fastllm adapter folder (q, v) on it."""
    d = tmp_path_factory.mktemp("bad")
    base_model("llama-gqa").save_pretrained(d / "base")
    model = GPT.from_pretrained(d / "base")
    model.add_lora(r=4, alpha=8, targets="q,v")
    randomize_b(model.lora)
    hf.save_adapter(model, d / "adapter")
    return d / "base", d / "adapter"


@pytest.mark.parametrize("case", list(BAD))
def test_refused_by_name(adapter, case, tmp_path):
    base, good = adapter
    doc = json.loads((good / hf.ADAPTER_CONFIG).read_text())
    tensors = {k: v.copy() for k, v in load_safetensors(good / hf.ADAPTER_WEIGHTS)[0].items()}
    change, match = BAD[case]
    change(doc, tensors)
    write_json(tmp_path / hf.ADAPTER_CONFIG, doc)
    save_safetensors(tmp_path / hf.ADAPTER_WEIGHTS, tensors)
    model = GPT.from_pretrained(base)
    with pytest.raises(ValueError, match=match) as e:
        hf.load_adapter(model, tmp_path)
    assert str(tmp_path) in str(e.value) and model.lora is None


def test_truncated_file_and_pickle_refused(adapter, tmp_path):
    base, good = adapter
    (tmp_path / hf.ADAPTER_CONFIG).write_text((good / hf.ADAPTER_CONFIG).read_text())
    data = (good / hf.ADAPTER_WEIGHTS).read_bytes()
    (tmp_path / hf.ADAPTER_WEIGHTS).write_bytes(data[:len(data) - 100])
    model = GPT.from_pretrained(base)
    with pytest.raises(ValueError, match="truncated or corrupt"):
        hf.load_adapter(model, tmp_path)
    (tmp_path / hf.ADAPTER_WEIGHTS).unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin is never read: no pickle"):
        hf.load_adapter(model, tmp_path)
    assert model.lora is None
    hf.load_adapter(model, good)
    with pytest.raises(ValueError, match="has LoRA adapters already"):
        hf.load_adapter(model, good)


def test_save_refuses_what_no_module_holds(adapter, tmp_path):
    base, _ = adapter
    model = GPT.from_pretrained(base)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        hf.save_adapter(model, tmp_path)
    model.add_lora(r=2, targets="q")
    tensors = {k: v.copy() for k, v in model.lora.state_dict().items()}
    tensors["attn.c_attn.lora_B"][0, 40] = 1.0  # a k row
    model.lora.load_state_dict(tensors)
    with pytest.raises(ValueError, match="nonzero rows of B outside"):
        hf.save_adapter(model, tmp_path)
