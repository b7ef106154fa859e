"""Hugging Face checkpoints of the Llama family: small random LlamaForCausalLM / MistralForCausalLM /
Qwen2ForCausalLM / Qwen3ForCausalLM models built and saved by transformers (GQA and MQA, tied and untied, rope
scaling, attention and MLP biases, QK-norm, a head_dim of its own) load into fastllm with transformers' float32
logits (1e-4) and greedy tokens, from F32, F16 and BF16 files, single or sharded; fastllm writes folders
transformers loads to the same logits, and reads them back bit for bit; unsupported and broken folders give errors
naming the file and the key or tensor; loading maps the file and keeps the peak memory near one model."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from chat_templates import GEMMA2_TEMPLATE, OLMO2_TEMPLATE, SMOLLM3_TEMPLATE
from hf_families import (
    LLAMA2_TEMPLATE,
    LLAMA3_TEMPLATE,
    PHI3_TEMPLATE,
    QWEN25_TEMPLATE,
    hf_logits,
    random_model,
    saved_cases,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from fastllm import chat, checkpoint, hf, ops  # noqa: E402
from fastllm.checkpoint import load_model  # noqa: E402
from fastllm.fileio import load_safetensors, save_safetensors  # noqa: E402
from fastllm.model import GPT, TOKEN_TABLE, GPTConfig  # noqa: E402
from fastllm.sample import generate  # noqa: E402
from fastllm.tokenizer import Tokenizer  # noqa: E402

V, T_MAX = 301, 64
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=T_MAX, rms_norm_eps=1e-5, hidden_act="silu", initializer_range=0.15,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=16)
CASES = {  # name: (transformers class prefix, config)
    "llama-gqa-tied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama3-scaling-untied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0,
                                            rope_scaling=LLAMA3_SCALING)),
    "llama-linear-mqa-biases": ("Llama", dict(num_key_value_heads=1, rope_scaling={"rope_type": "linear",
                                                                                    "factor": 2.0},
                                              attention_bias=True, mlp_bias=True, tie_word_embeddings=False)),
    "mistral-gqa": ("Mistral", dict(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "phi3-fused": ("Phi3", dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None,
                                rope_scaling=None)),
    "qwen3-headdim": ("Qwen3", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    # Qwen's long-context setting (prompts past original_max_position_embeddings), and dynamic NTK (the default
    # RoPE below max_position_embeddings)
    "qwen2-yarn": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    "llama-dynamic": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True, rope_scaling=dict(
        rope_type="dynamic", factor=2.0))),
}


def hf_model(case: str, seed: int = 0):
    """A random transformers model of `case`, with non-trivial norms and biases (so all of them are checked)."""
    prefix, kw = CASES[case]
    return random_model(prefix, {**BASE, **kw}, seed)


case = saved_cases(CASES, hf_model)  # (case name, transformers model, the folder transformers saved it to)


# ---- transformers -> fastllm -------------------------------------------------------------------------------


def test_logits_and_greedy_match_transformers(case):
    name, ref, d = case
    model = GPT.from_pretrained(d)
    cfg = model.config
    kw = CASES[name][1]
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.block_size, cfg.mlp_width) == ("rope", "rmsnorm", "swiglu",
                                                                                 T_MAX, 56)
    assert cfg.kv_heads == kw["num_key_value_heads"] and cfg.tie_embeddings == kw["tie_word_embeddings"]
    assert cfg.qk_norm == name.startswith("qwen3") and cfg.qkv_bias == (name.startswith("qwen2") or "biases" in name)
    ids = np.random.default_rng(0).integers(0, V, (3, 40))
    want = hf_logits(ref, ids)
    assert np.abs(model.forward(ids) - want).max() <= 1e-4
    assert np.abs(want).max() > 1.0  # not a degenerate near-zero comparison
    prompt = [5, 17, 99, 3, 250]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=25, min_new_tokens=25, do_sample=False,
                              pad_token_id=0)[0].tolist()
    ours = generate(model.eval(), prompt, 25, temperature=0.0)
    assert ours == theirs and len(set(ours[5:])) > 1


def test_sharded_and_half_precision_files(case, tmp_path):
    name, ref, d = case
    base = GPT.from_pretrained(d)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / hf.INDEX_FILE).exists() and not (tmp_path / "sharded" / hf.WEIGHTS_FILE).exists()
    assert np.array_equal(GPT.from_pretrained(tmp_path / "sharded").params, base.params)
    ids = np.random.default_rng(1).integers(0, V, (2, 24))
    for dtype in (torch.bfloat16, torch.float16):  # stored in half precision, computed in float32 by both
        folder = tmp_path / str(dtype)
        hf_model(name).to(dtype).save_pretrained(folder)
        tensors, _ = load_safetensors(folder / hf.WEIGHTS_FILE)
        assert next(iter(tensors.values())).dtype != np.float32 or dtype == torch.bfloat16
        theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert np.abs(GPT.from_pretrained(folder).forward(ids) - hf_logits(theirs, ids)).max() <= 1e-4


# ---- fastllm -> transformers -> fastllm --------------------------------------------------------------------


def test_save_pretrained_round_trip(case, tmp_path):
    name, ref, d = case
    model = GPT.from_pretrained(d)
    model.save_pretrained(tmp_path / "out", max_shard_bytes=None if "tied" in name else 40_000)
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert type(theirs).__name__ == type(ref).__name__
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = np.random.default_rng(2).integers(0, V, (2, 30))
    assert np.abs(hf_logits(theirs.eval(), ids) - hf_logits(ref, ids)).max() <= 1e-5
    back = GPT.from_pretrained(tmp_path / "out")
    assert back.config == model.config and np.array_equal(back.params, model.params)


def test_fastllm_presets_save_as_llama(tmp_path):
    """A model trained from scratch with fastllm's modern options is written as the transformers family that
    computes it; options no family has are refused by name before anything is written."""
    cfg = GPTConfig.preset("nano", vocab_size=V)
    model = GPT(cfg, seed=1)
    model.save_pretrained(tmp_path / "nano")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "nano").eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"
    ids = np.random.default_rng(3).integers(0, V, (2, 20))
    assert np.abs(model.forward(ids) - hf_logits(theirs, ids)).max() <= 1e-4
    for bad, match in ((dict(mlp="relu2", qk_norm=True), "mlp='relu2' \\(Arcee\\) with qk_norm=True"),
                       (dict(logit_softcap=15.0), "logit_softcap=15.0"),
                       (dict(qkv_bias=True, proj_bias=False, mlp_bias=True), "qkv_bias=True with proj_bias=False")):
        import dataclasses

        with pytest.raises(ValueError, match=match):
            GPT(dataclasses.replace(cfg, **bad)).save_pretrained(tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


def test_convert_and_load_model(case, tmp_path, capsys):
    """`fastllm convert` both ways, and load_model/`fastllm sample` straight from the HF folder."""
    from fastllm import cli

    name, ref, d = case
    ids = np.random.default_rng(4).integers(0, V, (1, 16))
    assert cli.main(["convert", str(d), str(tmp_path / "ckpt")]) == 0
    assert np.abs(load_model(tmp_path / "ckpt").forward(ids) - hf_logits(ref, ids)).max() <= 1e-4
    assert np.abs(load_model(d).forward(ids) - hf_logits(ref, ids)).max() <= 1e-4
    assert cli.main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "back"), "--to", "hf"]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert np.abs(hf_logits(back, ids) - hf_logits(ref, ids)).max() <= 1e-5
    capsys.readouterr()


# ---- refused, by name ----------------------------------------------------------------------------------------


def edit_config(d, out, drop=(), **changes):
    shutil.copytree(d, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(changes)
    for k in drop:
        cfg.pop(k, None)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama") / "model"
    hf_model("llama3-scaling-untied").save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2") / "model"
    hf_model("qwen2-tied").save_pretrained(d)
    return d


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(model_type="mixtral", architectures=["MixtralForCausalLM"]), "model_type 'mixtral' is not supported"),
        (dict(model_type="qwen2_moe"), "model_type 'qwen2_moe' is not supported"),
        (dict(architectures=["LlamaForSequenceClassification"]), "architectures"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
        (dict(rope_parameters={"rope_type": "su2", "factor": 4.0, "rope_theta": 1e4}),
         "rope_scaling type 'su2' is not supported"),
        (dict(rope_scaling={"type": "yarn", "factor": 4.0, "attention_factor": 0}), "attention_factor must be"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.75}),
         "partial_rotary_factor=0.75 is not supported for llama"),  # (Phi-3's: tests/test_hf_archs.py)
        (dict(quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config \\(gptq"),
        (dict(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=0),
         "sliding_window=0 on layers .* must be a positive integer"),
        (dict(model_type="mistral", architectures=["MistralForCausalLM"], attention_bias=True),
         "attention_bias=True is not supported for mistral"),
        (dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], mlp_bias=True),
         "mlp_bias=True is not supported for qwen3"),
        (dict(num_key_value_heads=3), "n_kv_head=3 must divide n_head=4"),
        (dict(rms_norm_eps=-1), "rms_norm_eps must be a positive number"),
        (dict(intermediate_size=64), r"tensor 'model.layers.0.mlp.\w+_proj.weight' has shape \((56, 32|32, 56)\), "
                                     r"config.json needs \((64, 32|32, 64)\)"),
        (dict(num_hidden_layers=1), "unexpected tensor 'model.layers.1"),
        (dict(tie_word_embeddings=True), "lm_head.weight differs from the token embedding"),
    ],
)
def test_bad_or_unsupported_config(llama_dir, tmp_path, changes, match):
    d = edit_config(llama_dir, tmp_path / "bad", **changes)
    with pytest.raises(ValueError, match=match) as e:
        GPT.from_pretrained(d)
    assert "config.json" in str(e.value) or "model.safetensors" in str(e.value)


def test_qwen_sliding_window_layers(qwen2_dir, tmp_path):
    """Qwen's transformers 4 spelling of sliding layers (use_sliding_window: those from max_window_layers on) slides
    those layers, as transformers does (the Mistral, Phi-3, Gemma and OLMo 3 windows: tests/test_hf_archs.py); Qwen2.5's
    released configs name a window they do not use."""
    d = edit_config(qwen2_dir, tmp_path / "sw", drop=("layer_types",), use_sliding_window=True, sliding_window=6,
                    max_window_layers=1)
    model = GPT.from_pretrained(d)
    cfg = model.config
    assert (cfg.block_size, cfg.sliding_window, cfg.layer_types) == (T_MAX, 6, ["full_attention", "sliding_attention"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, V, (2, 40))
    assert np.abs(model.forward(ids) - hf_logits(ref, ids)).max() <= 1e-4
    model.attn_options = [dict(o, window=None) for o in model.attn_options]  # (full attention differs)
    assert np.abs(model.forward(ids) - hf_logits(ref, ids)).max() > 1e-3
    d = edit_config(qwen2_dir, tmp_path / "full", drop=("layer_types",), use_sliding_window=False,
                    sliding_window=4096, max_window_layers=1)
    assert GPT.from_pretrained(d).config.sliding_window is None


def test_phi3_longrope_within_its_original_context(tmp_path):
    """Phi-3-128k's and Phi-3.5's LongRoPE loads with original_max_position_embeddings as the context, where
    transformers uses the short factors (and the attention factor of the long context): logits and greedy tokens as
    transformers', and save_pretrained writes a model transformers computes the same."""
    torch.manual_seed(0)
    rope = {"rope_type": "longrope", "short_factor": [1.0, 1.3, 2.0, 3.5], "long_factor": [2.0, 3.0, 5.0, 9.0]}
    cfg = transformers.Phi3Config(**{**BASE, "num_key_value_heads": 2, "original_max_position_embeddings": 16,
                                     "rope_scaling": rope})
    ref = transformers.Phi3ForCausalLM(cfg).float().eval()
    ref.save_pretrained(tmp_path / "phi3")
    model = GPT.from_pretrained(tmp_path / "phi3")
    assert model.config.block_size == 16 and model.config.rope_scaling["rope_type"] == "longrope"
    ids = np.random.default_rng(0).integers(0, V, (2, 16))
    assert np.abs(model.forward(ids) - hf_logits(ref, ids)).max() <= 1e-4
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([[5, 17, 99]]), max_new_tokens=13, min_new_tokens=13, do_sample=False,
                              pad_token_id=0)[0].tolist()
    assert generate(model.eval(), [5, 17, 99], 13, temperature=0.0) == theirs
    model.save_pretrained(tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == "Phi3ForCausalLM"
    assert np.abs(hf_logits(again, ids) - hf_logits(ref, ids)).max() <= 1e-5


def rewrite(d, fn, out):
    """Copy HF folder d to out, passing its tensors through fn(dict) -> dict."""
    shutil.copytree(d, out)
    tensors, meta = load_safetensors(out / hf.WEIGHTS_FILE)
    save_safetensors(out / hf.WEIGHTS_FILE, fn(dict(tensors)), meta)
    return out


def test_bad_tensors(llama_dir, tmp_path):
    def drop(t):
        del t["model.layers.1.self_attn.k_proj.weight"]
        return t

    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.self_attn.k_proj.weight'\]"):
        GPT.from_pretrained(rewrite(llama_dir, drop, tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight' has dtype I32"):
        GPT.from_pretrained(rewrite(llama_dir, lambda t: {**t, "model.layers.0.self_attn.q_proj.weight": t[
            "model.layers.0.self_attn.q_proj.weight"].astype(np.int32)}, tmp_path / "int"))

    def nan(t):
        t["model.norm.weight"] = t["model.norm.weight"].copy()
        t["model.norm.weight"][3] = np.nan
        return t

    with pytest.raises(ValueError, match="model.safetensors: tensor 'model.norm.weight' holds NaN"):
        GPT.from_pretrained(rewrite(llama_dir, nan, tmp_path / "nan"))

    def base_model_names(t):  # LlamaModel files: no "model." prefix; old files: rotary inv_freq buffers
        t = {k.removeprefix("model."): v for k, v in t.items()}
        t["layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
        return t

    a = GPT.from_pretrained(llama_dir)
    assert np.array_equal(GPT.from_pretrained(rewrite(llama_dir, base_model_names, tmp_path / "base")).params,
                          a.params)
    (tmp_path / "pt").mkdir()
    shutil.copy(llama_dir / "config.json", tmp_path / "pt" / "config.json")
    (tmp_path / "pt" / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="no model.safetensors .*pytorch_model.bin is never read"):
        GPT.from_pretrained(tmp_path / "pt")


# ---- memory ----------------------------------------------------------------------------------------------------


def write_big_llama(folder, dtype: str, tied: bool = False) -> int:
    """A ~100M-parameter Llama-shaped folder written without transformers (random weights); returns the
    number of parameters."""
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=768,
               intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12, num_key_value_heads=4,
               max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=tied, hidden_act="silu")
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    model = GPT(hf.config_from_hf(cfg), init=False)  # zeros: only the shapes matter here
    state = hf.hf_state_dict(model)
    rng = np.random.default_rng(0)
    for k in state:
        a = rng.standard_normal(state[k].shape, np.float32) * 0.02
        state[k] = (a.view(np.uint32) >> 16).astype(np.uint16) if dtype == "BF16" else a
    save_safetensors(folder / hf.WEIGHTS_FILE, state)
    if dtype == "BF16":  # save_safetensors writes uint16 as U16: mark them BF16 (the data offsets stay)
        raw = (folder / hf.WEIGHTS_FILE).read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.dumps(json.loads(raw[8:8 + n].replace(b'"U16"', b'"BF16"'))).encode()
        header += b" " * (-len(header) % 8)
        (folder / hf.WEIGHTS_FILE).write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n:])
    return model.num_parameters


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("dtype,weights,tied", [("F32", None, False), ("BF16", None, False),
                                               ("BF16", "bfloat16", False), ("F32", "int8", False),
                                               ("BF16", "bfloat16", True), ("BF16", "int8", True)])
def test_peak_memory_is_one_model(tmp_path, dtype, weights, tied):
    """Loading maps the file and converts tensor by tensor into the model's buffer, giving pages back: the peak
    resident memory grows by about one float32 model, never two (measured in a fresh process). With weights=, the
    matrices are converted a layer at a time and held in that form alone: the peak is the model in that form (bf16:
    2 bytes a matrix weight, int8: 1), the rest (norms; the token embedding of an F32 file) float32, a BF16 file's
    token embedding its bf16 bits -- once where it is a tied bf16 head too (the head reads the bits, or the table
    reads the head's panels where the CPU's bf16 GEMM takes panels), else beside the head's int8 copy."""
    n = write_big_llama(tmp_path / "big", dtype, tied)
    script = textwrap.dedent(f"""
        import numpy as np
        from fastllm.model import GPT, MATRICES, TOKEN_TABLE
        def peak():  # this process's peak resident memory (VmHWM: reset by exec, unlike ru_maxrss)
            line = next(x for x in open("/proc/self/status") if x.startswith("VmHWM"))
            return int(line.split()[1]) * 1024
        before = peak()
        model = GPT.from_pretrained({str(tmp_path / "big")!r}, weights={weights!r})
        after = peak()
        logits = model.eval().forward(np.array([[1, 2, 3]]))
        assert np.isfinite(logits).all() and float(np.abs(logits).max()) > 0
        table = model.weights_only is not None and TOKEN_TABLE in model.decode_weights(model.weights_only)
        matrices = sum(model.p[k].size for k in (*MATRICES, "lm_head.weight") if k in model.p)
        print(before, after, matrices, model.p["wte"].size, int(table))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before, after, matrices, wte, table = map(int, out.stdout.split())
    assert table == (dtype == "BF16" and weights is not None)  # (a BF16 file's token embedding held as its bits)
    bytes_per = {None: 4, "bfloat16": 2, "int8": 1}[weights]
    model_bytes = 4 * (n - matrices - wte) + (2 if table else 4) * wte + bytes_per * matrices
    if tied and weights == "int8":  # the head's own copy (a bf16 head is the table: its bits, or its panels)
        model_bytes += bytes_per * wte
    assert n > 70e6 and matrices > 0.5 * n
    grew = after - before
    # (plus a fixed transient: a block of the file's pages, the conversion's one-block scratch and temporaries)
    assert model_bytes * 0.9 < grew < model_bytes * 1.1 + (48 << 20), (grew / 2**20, model_bytes / 2**20)


@pytest.mark.parametrize("weights", ["bfloat16", "int8", "w8a8"])
@pytest.mark.parametrize("tied,vocab,bf16_file", [(False, 2 * 4096 + 37, False), (True, V, False),
                                                  (True, 4096 + 70, True)])
def test_weights_held_in_a_decode_form(tmp_path, weights, tied, vocab, bf16_file):
    """GPT.from_pretrained(path, weights=...) converts the matrices while loading (an untied lm-head a block of
    ops.ROW_BLOCK rows at a time: here three, the last one part full) and holds them in that form alone: the same
    snapshot, logits and greedy tokens as the float32 model decoding with those weights, bit for bit (a BF16 file's
    tied embedding: its bits, or the head's panels, which the embedding then reads); what needs the float32 weights
    is refused by name, and so is another decode form."""
    ref = random_model("Llama", {**BASE, **CASES["llama3-scaling-untied"][1], "vocab_size": vocab,
                                 "tie_word_embeddings": tied})
    (ref.to(torch.bfloat16) if bf16_file else ref).save_pretrained(tmp_path / "m")
    full = GPT.from_pretrained(tmp_path / "m").eval()
    held = GPT.from_pretrained(tmp_path / "m", weights=weights)
    assert held.weights_only == weights and not held.training
    want = full.decode_weights(weights)
    snapshot = held.decode_weights(weights)
    if bf16_file and weights == "bfloat16" and ops.bf16_panels_preferred():
        assert snapshot[TOKEN_TABLE] is snapshot["wte"]  # one copy of the table: the head's panels
    for name, w in snapshot.items():
        if name == TOKEN_TABLE:
            continue  # (the float32 model reads its float32 table: the same numbers, checked by the logits below)
        for a, b in zip(w if isinstance(w, tuple) else (w,), want[name] if isinstance(w, tuple) else (want[name],)):
            assert np.array_equal(a, b), name
    ids = np.random.default_rng(0).integers(0, vocab, (2, 20))
    with full.decoding(weights):
        assert np.array_equal(held.forward(ids), full.forward(ids))
        assert held.forward(ids, ids) == full.forward(ids, ids)
    prompts = [[5, 17, 99, 3], [8, 2]]
    assert held.generate(prompts, 12, temperature=0) == full.generate(prompts, 12, temperature=0, weights=weights)
    for call in (held.train, held.state_dict, lambda: held.to("cuda"), held.zero_grad,
                 lambda: held.save_pretrained(tmp_path / "out"),
                 lambda: held.kv_cache(1, weights="int8" if weights != "int8" else "w8a8")):
        with pytest.raises(ValueError, match=f"holds its matrices in {weights} only"):
            call()
    assert not (tmp_path / "out").exists()
    held.to("cpu", "bfloat16")  # the compute dtype alone changes (adapters may train over the held matrices)
    assert held.weights_only == weights and held.decode_weights(weights) is held._decoding[0]
    assert np.abs(held.forward(ids) - full.forward(ids)).max() < 0.1 * np.abs(full.forward(ids)).max()
    held.to("cpu")
    ckpt = checkpoint.convert(tmp_path / "m", tmp_path / "ckpt")  # a fastllm checkpoint: its float32, converted
    assert np.array_equal(load_model(ckpt, weights=weights).forward(ids), held.forward(ids))
    with pytest.raises(ValueError, match="weights must be None or one of"):
        GPT.from_pretrained(tmp_path / "m", weights="float16")


def test_read_into_rows(tmp_path):
    """SafetensorsFile.read_into(..., start=r0): rows r0 .. r0 + len(out) - 1 of a tensor, F32 and BF16."""
    from safetensors.torch import save_file

    a = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    save_file({"a": torch.tensor(a), "b": torch.tensor(a).bfloat16()}, tmp_path / "t.safetensors")
    tensors = load_safetensors(tmp_path / "t.safetensors", mmap=True)[0]
    out = np.empty((4, 3), np.float32)
    tensors.read_into("a", out, start=5)
    assert np.array_equal(out, a[5:9])
    tensors.read_into("b", out, start=6)
    assert np.array_equal(out, torch.tensor(a).bfloat16().float().numpy()[6:])
    for bad in (dict(out=out, start=7), dict(out=out, start=-1), dict(out=np.empty((2, 2), np.float32), start=0)):
        with pytest.raises(ValueError, match="tensor 'a' has shape"):
            tensors.read_into("a", **bad)


def test_convert_keeps_the_chat_files(qwen2_dir, tmp_path):
    """convert copies the tokenizer's companions (tokenizer_config.json, the template) and writes the EOS ids."""
    pytest.importorskip("tokenizers")
    from hf_families import QWEN25_TEMPLATE, build_tokenizer, write_folder

    src = shutil.copytree(qwen2_dir, tmp_path / "src")
    tok = build_tokenizer("qwen2", vocab_size=290)
    write_folder(src, tok, "qwen2", chat_template=QWEN25_TEMPLATE, eos="<|im_end|>",
                 generation_eos=["<|im_end|>", "<|endoftext|>"])
    checkpoint.convert(src, tmp_path / "ckpt")
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    eos = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
    assert chat.eos_token_ids(tmp_path / "ckpt") == eos
    checkpoint.convert(tmp_path / "ckpt", tmp_path / "hf", to="hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == eos
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    msgs = [{"role": "user", "content": "hi"}]
    assert auto.apply_chat_template(msgs, tokenize=False) == \
        transformers.AutoTokenizer.from_pretrained(src).apply_chat_template(msgs, tokenize=False)


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_save_pretrained_keeps_the_source_folders_eos_and_template(family, tmp_path):
    """GPT.from_pretrained(folder).save_pretrained(out, tokenizer=...) (the module doc's round trip) writes the
    folder's EOS ids and chat template: transformers' generate stops where the source model's does (Llama 3 has
    no <|endoftext|>; Qwen2.5-Instruct ends turns with <|im_end|>) and apply_chat_template renders the same text."""
    pytest.importorskip("tokenizers")
    from hf_families import LLAMA3_TEMPLATE, QWEN25_TEMPLATE, build_tokenizer, write_folder

    src = tmp_path / "src"
    hf_model("qwen2-tied" if family == "qwen2" else "llama-gqa-tied").save_pretrained(src)
    tok = build_tokenizer(family, vocab_size=290)
    eos = ["<|eot_id|>", "<|end_of_text|>"] if family == "llama3" else ["<|im_end|>", "<|endoftext|>"]
    write_folder(src, tok, family, chat_template=LLAMA3_TEMPLATE if family == "llama3" else QWEN25_TEMPLATE,
                 eos=eos[0], generation_eos=eos)
    ids = [tok.token_to_id(t) for t in eos]
    GPT.from_pretrained(src).save_pretrained(tmp_path / "out", tokenizer=Tokenizer.from_pretrained(src))
    gen = transformers.GenerationConfig.from_pretrained(tmp_path / "out")
    assert gen.eos_token_id == ids
    assert json.loads((tmp_path / "out" / "config.json").read_text())["eos_token_id"] == ids
    assert chat.eos_token_ids(tmp_path / "out") == ids
    auto, theirs = (transformers.AutoTokenizer.from_pretrained(d) for d in (tmp_path / "out", src))
    assert auto.eos_token == theirs.eos_token == eos[0]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert auto.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    explicit = hf.save_pretrained(GPT.from_pretrained(src), tmp_path / "explicit", eos_token_id=ids[1])
    assert chat.eos_token_ids(explicit) == [ids[1]]  # an explicit eos_token_id still wins


# Qwen2.5's template (without tools) with {% generation %} around each assistant reply, as transformers'
# return_assistant_tokens_mask needs: it renders the same text as QWEN25_TEMPLATE.
QWEN25_GENERATION = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{%- generation %}{{- message.content + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}{%- elif not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("template", ["generation", "incremental"])
def test_chat_template_masks_match_transformers(template, tmp_path):
    """SFT on a checkpoint's own chat template: the ids and the assistant mask of a conversation equal
    transformers' apply_chat_template(return_assistant_tokens_mask=True), both from {% generation %} blocks and,
    for a template without them (Qwen2.5's), from rendering the conversation turn by turn."""
    pytest.importorskip("jinja2")
    from hf_families import CONVERSATIONS, QWEN25_TEMPLATE, build_tokenizer, write_folder

    tok = build_tokenizer("qwen2", vocab_size=400)
    gen = write_folder(tmp_path / "generation", tok, "qwen2", chat_template=QWEN25_GENERATION, eos="<|im_end|>")
    write_folder(tmp_path / "incremental", tok, "qwen2", chat_template=QWEN25_TEMPLATE, eos="<|im_end|>")
    auto = transformers.AutoTokenizer.from_pretrained(gen)
    ours = chat.chat_format(tmp_path / template, Tokenizer.from_pretrained(tmp_path / template))
    extra = [{"role": "user", "content": "Sum?"}, {"role": "assistant", "content": "4\n\n"},
             {"role": "user", "content": "ok"}, {"role": "assistant", "content": ""}]
    for msgs in [*CONVERSATIONS, extra]:
        assert ours.text(msgs) == auto.apply_chat_template(msgs, tokenize=False)
        want = auto.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
        ids, mask = ours.render(msgs)
        assert ids.tolist() == list(want["input_ids"])
        assert mask.tolist() == list(want["assistant_masks"]), msgs
        if template == "incremental":
            assert mask.sum() == sum(len(tok.encode(m["content"] + "<|im_end|>").ids) for m in msgs
                                     if m["role"] == "assistant")
        # OpenAI's "weight": 0 leaves the first assistant turn out of the mask, the same text and the other turns
        first = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), None)
        if first is None:
            continue
        weighted = [{**m, "weight": 0} if i == first else m for i, m in enumerate(msgs)]
        ids_w, mask_w = ours.render(weighted)
        turn = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])) == -1)[0]  # the end of the first turn
        assert ids_w.tolist() == ids.tolist() and mask_w.tolist() == [0] * turn + mask.tolist()[turn:]


def test_chat_template_that_renders_nothing(tmp_path):
    """A template whose text is empty (a {% generation %} block around nothing) gives no ids, not an error."""
    from tiny import byte_tokenizer

    fmt = chat.ChatTemplate("{% for m in messages %}{% generation %}{% endgeneration %}{% endfor %}",
                            byte_tokenizer(), stop_tokens=[0])
    ids, mask = fmt.render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])
    assert ids.size == 0 and mask.size == 0


# family: (transformers class prefix, chat template, tokenizer_config.json's eos_token, generation_config.json's
# EOS tokens, config beside BASE), as the hub's checkpoints of the family have them
HUB = {
    "llama3": ("Llama", LLAMA3_TEMPLATE, "<|eot_id|>", ["<|end_of_text|>", "<|eot_id|>"], {}),
    "qwen2": ("Qwen2", QWEN25_TEMPLATE, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"], {}),
    "llama2": ("Llama", LLAMA2_TEMPLATE, "</s>", ["</s>"], {}),
    "phi3": ("Phi3", PHI3_TEMPLATE, "<|end|>", ["<|endoftext|>", "<|end|>"], {}),
    # Gemma-2-it's: [<eos>, <end_of_turn>] ([1, 107]); a window of 8 that the prompts and answers pass
    # (untied: a tied random Gemma repeats its last token, whose embedding times sqrt(hidden_size) dominates)
    "gemma2": ("Gemma2", GEMMA2_TEMPLATE, "<eos>", ["<eos>", "<end_of_turn>"],
               dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, hidden_act="gelu_pytorch_tanh",
                    tie_word_embeddings=False)),
    # OLMo-2-Instruct's: <|endoftext|> (100257) as BOS and EOS, the only EOS id
    "olmo2": ("Olmo2", OLMO2_TEMPLATE, "<|endoftext|>", ["<|endoftext|>"], {}),
    # SmolLM3-3B's: <|im_end|> (128012); its second layer without RoPE, room for the template's system text
    # (untied, unlike SmolLM3-3B: answer_stops_at_eos moves lm_head rows)
    "smollm3": ("SmolLM3", SMOLLM3_TEMPLATE, "<|im_end|>", ["<|im_end|>"],
                dict(no_rope_layer_interval=2, max_position_embeddings=256, tie_word_embeddings=False)),
}


def hub_folder(family: str, folder, template: str | None = None, **config):
    """A random transformers model of `family` (HUB) saved with its tokenizer.json, chat template (default: the
    family's) and generation_config.json EOS ids, like a folder from the hub; `config` overrides BASE and the
    family's. -> (the transformers model, its AutoTokenizer)."""
    from hf_families import build_tokenizer, write_folder

    prefix, default, eos, ends, kw = HUB[family]
    sentencepiece = family in ("llama2", "phi3", "gemma2")  # (BPE from characters: a larger vocab)
    tok = build_tokenizer(family, vocab_size=800 if sentencepiece else 400)
    torch.manual_seed(0)
    ids = [tok.token_to_id(t) for t in ends]
    cfg = getattr(transformers, f"{prefix}Config")(**{**BASE, "vocab_size": tok.get_vocab_size(),
                                                       "num_key_value_heads": 2, "eos_token_id": ids, **kw, **config})
    ref = getattr(transformers, f"{prefix}ForCausalLM")(cfg).float().eval()
    ref.save_pretrained(folder)
    write_folder(folder, tok, family, chat_template=template or default, eos=eos, generation_eos=ends)
    ref.generation_config.eos_token_id = ids
    return ref, transformers.AutoTokenizer.from_pretrained(folder)


def hf_greedy(ref, auto, inputs: dict, n: int) -> str:
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=n, do_sample=False)
    return auto.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def answer_stops_at_eos(ref, folder, inputs: dict) -> list[int]:
    """Makes the (untied) random model of a hub folder answer `inputs` with a few greedy tokens (3 or more), then its
    first EOS id: the lm_head rows of that EOS and of the first greedy token from the 4th on not written before
    change places; saved to `folder` again. -> the answer's ids, the EOS last."""
    eos = ref.generation_config.eos_token_id[0]
    assert not ref.config.tie_word_embeddings  # (the input embeddings stay as they are)
    ids = inputs["input_ids"]
    with torch.no_grad():
        for _ in range(8):  # (greedy, past any EOS)
            ids = torch.cat([ids, ref(ids).logits[:, -1:].argmax(-1)], 1)
        free = ids[0, inputs["input_ids"].shape[1]:].tolist()
        k = next(k for k in range(3, len(free)) if free[k] not in free[:k])
        assert eos not in free[:k + 1]
        w = ref.lm_head.weight
        w[[free[k], eos]] = w[[eos, free[k]]]
    ref.save_pretrained(folder)
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=12, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert out.tolist() == free[:k] + [eos]
    return out.tolist()


@pytest.mark.parametrize("family", ["llama3", "qwen2", "llama2", "phi3", "gemma2", "olmo2", "smollm3"])
def test_cli_chat_uses_the_folders_template(family, tmp_path, monkeypatch, capsys):
    """`fastllm chat --ckpt <HF folder>` renders the checkpoint's own chat template (Llama 3's has no ChatML tokens
    at all; OLMo 2's <|user|> turns are plain text, the BOS written by the template) and answers with transformers'
    greedy tokens for apply_chat_template's prompt, stopping at the folder's EOS (made a greedy token).
    Gemma's template refuses a system message: --system is an error before any input is read (it was one at every
    message, and the exit status 0)."""
    pytest.importorskip("tokenizers")
    import io

    from fastllm import cli

    ref, auto = hub_folder(family, tmp_path / family)
    chat = ["chat", "--ckpt", str(tmp_path / family), "--temperature", "0", "-n", "12"]
    msgs = [{"role": "user", "content": "Hello there"}]
    if family == "gemma2":
        with pytest.raises(Exception, match="System role not supported"):  # (jinja2's TemplateError)
            auto.apply_chat_template([{"role": "system", "content": "Be brief."}] + msgs, tokenize=False)
        monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
        assert cli.main(chat + ["--system", "Be brief."]) == 1
        assert "System role not supported" in capsys.readouterr().err and sys.stdin.read() == "Hello there\n"
    else:
        msgs.insert(0, {"role": "system", "content": "Be brief."})
        chat += ["--system", "Be brief."]
    prompt = auto.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    answer_stops_at_eos(ref, tmp_path / family, prompt)
    want = hf_greedy(ref, auto, prompt, 12)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\n"))
    assert cli.main(chat) == 0
    assert capsys.readouterr().out == want + "\n"  # (Llama 2: no leading space, as transformers decodes the answer)


def sft_to_answer_blue(family: str, tmp_path) -> None:
    """`fastllm sft --base <HF folder of family>` (tmp_path/base) -> tmp_path/out, taught to answer "Name a
    colour." with "Blue." in the folder's own chat template (no system message: Qwen's template puts in its long
    default one, hence a context of 128)."""
    from fastllm import cli

    hub_folder(family, tmp_path / "base", max_position_embeddings=128)
    conv = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
    (tmp_path / "conv.jsonl").write_text((json.dumps(conv) + "\n") * 8)
    assert cli.main(["sft", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "conv.jsonl"), "--out",
                     str(tmp_path / "out"), "--max-steps", "40", "--batch-size", "2", "--seq-len", "128", "--lr",
                     "1e-2", "--warmup-steps", "2", "--eval-every", "0", "--val-fraction", "0", "--no-progress"]) == 0


@pytest.mark.parametrize("family", ["llama3", "qwen2", "llama2", "gemma2", "olmo2"])
def test_cli_sft_of_a_hub_folder_keeps_its_template(family, tmp_path, monkeypatch, capsys):
    """`fastllm sft --base <HF folder>` trains on the checkpoint's own chat template (no ChatML tokens added), writes
    its tokenizer files and EOS ids beside the checkpoints, and `fastllm chat` on the result answers as taught."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    import io

    from fastllm import cli

    sft_to_answer_blue(family, tmp_path)
    base_tok = checkpoint.checkpoint_tokenizer(tmp_path / "base", checkpoint.find_tokenizer(tmp_path / "base"))
    model = load_model(tmp_path / "out")
    assert model.config.vocab_size == GPT.from_pretrained(tmp_path / "base").config.vocab_size  # no tokens added
    assert chat.eos_token_ids(tmp_path / "out") == chat.eos_token_ids(tmp_path / "base", base_tok)
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a colour.\n"))
    assert cli.main(["chat", "--ckpt", str(tmp_path / "out"), "--temperature", "0", "-n", "8"]) == 0
    assert capsys.readouterr().out.strip() == "Blue."


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma2"])
def test_cli_rl_of_a_chat_model_prompts_in_its_template(family, tmp_path, capsys):
    """`fastllm rl` of a chat model rolls out in its chat template, the completions ending at its EOS ids: the SFT
    model above answers the held-out problem exactly from the first evaluation on (plain-text prompts and a
    <|endoftext|> stop scored 0, and a Llama 3 folder, without <|endoftext|>, was refused). --no-chat prompts in
    plain text and stops at the folder's EOS ids."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from fastllm import cli
    from fastllm.plot import read_log

    sft_to_answer_blue(family, tmp_path)
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "Name a colour.", "answer": "Blue"}) + "\n")
    common = ["--ckpt", str(tmp_path / "out"), "--data", str(tmp_path / "p.jsonl"), "--steps", "1",
              "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "8", "--eval-every", "1",
              "--eval-prompts", "1", "--no-progress"]
    capsys.readouterr()
    assert cli.main(["rl", "--out", str(tmp_path / "rl"), *common]) == 0
    assert "prompts: chat (chat template)" in capsys.readouterr().out
    assert [r["eval_accuracy"] for r in read_log(tmp_path / "rl" / "log.jsonl") if "eval_accuracy" in r] == [1.0, 1.0]
    assert cli.main(["rl", "--out", str(tmp_path / "plain"), "--no-chat", *common]) == 0
    assert "prompts: plain text" in capsys.readouterr().out


def test_reward_model_of_a_llama3_folder_then_rl_against_it(tmp_path, capsys):
    """`fastllm reward-model --base <Llama 3 folder>` (a tokenizer without <|endoftext|>) scores each pair at the
    folder's EOS token (it crashed appending None), and `fastllm rl --reward-model` uses it."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from fastllm import cli
    from fastllm.rl import RewardModel, RewardScorer

    hub_folder("llama3", tmp_path / "base")
    pairs = [{"prompt": f"{a}+1=", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(10)]
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    assert cli.main(["reward-model", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "prefs.jsonl"),
                     "--out", str(tmp_path / "rm"), "--epochs", "1", "--batch-size", "4", "--no-progress"]) == 0
    scorer = RewardScorer.load(tmp_path / "rm")
    eot_id = scorer.tokenizer.special_tokens["<|end_of_text|>"]
    assert RewardModel.encode(scorer.rm, scorer.tokenizer, "1+1=", "2")[-1] == eot_id
    assert np.isfinite(scorer("1+1=", "2"))
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    assert cli.main(["rl", "--ckpt", str(tmp_path / "base"), "--out", str(tmp_path / "rl"), "--data",
                     str(tmp_path / "p.jsonl"), "--reward-model", str(tmp_path / "rm"), "--steps", "1",
                     "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "4", "--eval-every", "0",
                     "--no-progress"]) == 0


@pytest.mark.parametrize("family", ["llama3", "qwen2", "llama2", "phi3", "gemma2", "olmo2", "smollm3"])
def test_serve_a_hub_folder_with_its_template(family, tmp_path):
    """`fastllm serve` of a hub folder renders /v1/chat/completions with the folder's own chat template (Llama 3's
    has no ChatML tokens) and stops at its EOS ids (made a greedy token): through the official openai client,
    the greedy answer and the prompt (its ids, their count) are transformers' for apply_chat_template's; SmolLM3's
    /no_think mode too, as the request's chat_template_kwargs {"enable_thinking": false} (its empty <think></think>
    in the prompt)."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    pytest.importorskip("starlette")
    openai = pytest.importorskip("openai")
    from starlette.testclient import TestClient

    from fastllm.serve import Engine, load
    from fastllm.serve.app import create_app

    ref, auto = hub_folder(family, tmp_path / family)
    msgs = [{"role": "system", "content": "Be brief."}] * (family != "gemma2")  # (Gemma's template refuses one)
    msgs.append({"role": "user", "content": "Hello there"})
    options = [{}] + [{"enable_thinking": False}] * (family == "smollm3")
    prompts = [auto.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True, **o)
               for o in options]
    answer = answer_stops_at_eos(ref, tmp_path / family, prompts[0])
    wants = [hf_greedy(ref, auto, prompt, 12) for prompt in prompts]
    model, tok = load(tmp_path / family)
    with TestClient(create_app(Engine(model, tok, max_batch=2), "m")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        rs = [client.chat.completions.create(model="m", messages=msgs, max_tokens=12, temperature=0,
                                             extra_body={"chat_template_kwargs": o} if o else None) for o in options]
        if family == "gemma2":  # a system message: the template's refusal, as a 400
            with pytest.raises(openai.BadRequestError, match="System role not supported"):
                client.chat.completions.create(model="m", messages=[{"role": "system", "content": "Be brief."}, *msgs])
    assert rs[0].choices[0].finish_reason == "stop" and rs[0].usage.completion_tokens == len(answer)
    for r, prompt, want, o in zip(rs, prompts, wants, options):
        assert r.choices[0].message.content == want
        assert r.usage.prompt_tokens == prompt["input_ids"].shape[1]
        assert chat.chat_format(tmp_path / family, tok, o).prompt(msgs).tolist() == prompt["input_ids"][0].tolist()


def test_serve_splits_the_reasoning_of_a_smollm3_folder(tmp_path):
    """SmolLM3's template leaves <think> to the model (/think, the default; <think> and </think> are plain added
    tokens of its tokenizer): the answer's <think> block is message.reasoning_content, the rest (after the newline
    SmolLM3 writes) the content; /no_think (chat_template_kwargs) closes an empty block in the prompt, and the
    answer is all content."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from fastllm.serve.api import ServedModel, parse_chat
    from fastllm.serve.engine import Chunk

    folder = tmp_path / "smollm3"
    hub_folder("smollm3", folder)
    tok = Tokenizer.from_pretrained(folder)
    served = ServedModel("m", tok, 4096, 2, tok.n_vocab, chat.chat_format(folder, tok), str(folder))
    msgs = [{"role": "user", "content": "Time?"}]
    for extra, answer, want in [({}, "<think>\nThe user asks.\n</think>\nNoon.", ("The user asks.", "Noon.")),
                                ({"chat_template_kwargs": {"enable_thinking": False}}, "Noon.", (None, "Noon."))]:
        call = parse_chat({"model": "m", "messages": msgs, **extra}, served)
        prompt = tok.decode(call.request.prompts[0])
        assert prompt.endswith("<|im_start|>assistant\n" + "<think>\n\n</think>\n" * bool(extra))
        call.feed([Chunk(0, answer, [1], finish_reason="stop")])
        msg = call.response()["choices"][0]["message"]
        assert (msg["reasoning_content"], msg["content"]) == want


@pytest.mark.parametrize("family", ["llama3", "qwen2", "llama2", "gemma2", "olmo2", "smollm3"])
def test_serve_completions_of_a_hub_folder(family, tmp_path):
    """/v1/completions of a hub folder encodes a text prompt as transformers' tokenizer does (Llama 3: after its BOS
    token, as vLLM does) and continues it with transformers' greedy tokens, stopping at generation_config.json's EOS
    ids; /tokenize and /tokenizer_info answer what the AutoTokenizer says."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("starlette")
    openai = pytest.importorskip("openai")
    from starlette.testclient import TestClient

    from fastllm.serve import Engine, load
    from fastllm.serve.app import create_app

    ref, auto = hub_folder(family, tmp_path / family)
    model, tok = load(tmp_path / family)
    inputs = auto("Hello there", return_tensors="pt")
    with TestClient(create_app(Engine(model, tok, max_batch=2), "m")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        for n in (40, 3):
            with torch.no_grad():
                out = ref.generate(**inputs, max_new_tokens=n, do_sample=False)[0, inputs["input_ids"].shape[1]:]
            r = client.completions.create(model="m", prompt="Hello there", max_tokens=n, temperature=0)
            # (random weights emit broken UTF-8: a streamed decode and a whole one replace it differently)
            want = auto.decode(out, skip_special_tokens=True).replace("\ufffd", "")
            assert r.choices[0].text.replace("\ufffd", "") == want
            assert r.usage.prompt_tokens == inputs["input_ids"].shape[1]
            stopped = len(out) < n or int(out[-1]) in ref.generation_config.eos_token_id
            assert r.choices[0].finish_reason == ("stop" if stopped else "length")
            assert r.usage.completion_tokens == len(out)
        ids = http.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
        assert ids == inputs["input_ids"][0].tolist()
        info = http.get("/tokenizer_info").json()
    assert (info["bos_token"], info["eos_token"]) == (auto.bos_token, auto.eos_token)
    assert info["chat_template"] == auto.chat_template


@pytest.mark.parametrize("family,template", [("llama3", "LLAMA31_TEMPLATE"), ("qwen2", "QWEN25_TEMPLATE"),
                                             ("qwen2", "QWEN3_TEMPLATE")])
def test_serve_tool_calls_through_a_hub_folders_template(family, template, tmp_path):
    """Tool calling with a hub folder's own template (Llama 3.1's, Qwen2.5's, Qwen3's): the prompt of a
    conversation with tools, a call and its result is transformers' apply_chat_template(..., tools=...) token for
    token, and a call that tool_choice forces comes back, through the openai client, as tool_calls in the
    template's format."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    pytest.importorskip("starlette")
    pytest.importorskip("llguidance")
    openai = pytest.importorskip("openai")
    import hf_families
    from starlette.testclient import TestClient

    from fastllm.serve import Engine, load
    from fastllm.serve.api import _messages
    from fastllm.serve.app import create_app

    tools = [{"type": "function", "function": {"name": "add", "description": "a + b", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["a", "b"], "additionalProperties": False}}}]
    ref, auto = hub_folder(family, tmp_path / family, template=getattr(hf_families, template),
                           max_position_embeddings=1024)
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    msgs = [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": "2+3?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    hf_msgs = [dict(m) for m in msgs]
    hf_msgs[2] = {"role": "assistant", "content": "", "tool_calls": [
        {**call, "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
    model, tok = load(tmp_path / family)
    fmt = chat.chat_format(tmp_path / family, tok)
    assert fmt.tool_format == {"llama3": "llama3_json", "qwen2": "hermes"}[family]
    for conversation, hf_conversation in ((msgs[:2], hf_msgs[:2]), (msgs, hf_msgs)):
        want = auto.apply_chat_template(hf_conversation, tools=tools, add_generation_prompt=True, return_dict=True)
        assert fmt.prompt(_messages(conversation), tools).tolist() == list(want["input_ids"])
    with TestClient(create_app(Engine(model, tok, max_batch=2), "m")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        r = client.chat.completions.create(model="m", messages=msgs[:2], tools=tools, tool_choice="required",
                                           max_tokens=60, seed=0, parallel_tool_calls=False)
    (tc,) = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and tc.function.name == "add"
    args = json.loads(tc.function.arguments)
    assert sorted(args) == ["a", "b"] and all(0 <= v <= 9 for v in args.values())


@pytest.mark.parametrize("family", ["llama3", "gemma2"])
def test_eval_prompts_of_a_hub_folder_use_its_template(family, tmp_path):
    """Generative evaluation (`fastllm eval --task gen`) and the lm-eval adapter's apply_chat_template render a hub
    folder's prompts with its own template, as transformers' apply_chat_template does, and stop at its EOS ids
    (Gemma's template refuses a system message, as it does in transformers)."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    from fastllm.eval import chat_of, prompt_ids
    from fastllm.serve import load

    _, auto = hub_folder(family, tmp_path / family)
    model, tok = load(tmp_path / family)
    msgs = [{"role": "user", "content": "Q: 2+2?"}]
    fmt = chat_of(model, tok)
    want = auto.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert prompt_ids(tok, "2+2?", fmt, "Q: {prompt}").tolist() == list(want)
    with_system = [{"role": "system", "content": "Be brief."}] + msgs  # --system, as lm-eval's system_instruction
    if family == "gemma2":
        with pytest.raises(ValueError, match="System role not supported"):
            prompt_ids(tok, "2+2?", fmt, "Q: {prompt}", system="Be brief.")
    else:
        want = auto.apply_chat_template(with_system, add_generation_prompt=True, return_dict=True)["input_ids"]
        assert prompt_ids(tok, "2+2?", fmt, "Q: {prompt}", system="Be brief.").tolist() == list(want)
    # plain text (a base model), as lm-eval's --system_instruction: after the BOS, as the AutoTokenizer encodes it
    assert prompt_ids(tok, "2+2?", None, system="Be brief.").tolist() == auto("Be brief.\n\n2+2?")["input_ids"]
    assert set(fmt.stop_tokens) == set(chat.eos_token_ids(tmp_path / family, tok))
    assert chat_of(model, tok, chat=False) is None
    pytest.importorskip("lm_eval")
    from fastllm.eval.harness import FastLLM

    lm = FastLLM(model=model, tokenizer=tok)
    assert lm.apply_chat_template(msgs) == auto.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma2"])
def test_lm_eval_adapter_encodes_as_lm_evals_hf_model(family, tmp_path):
    """The lm-eval adapter on a hub folder scores what lm-eval's own HF model (HFLM) scores there: texts encoded as
    the AutoTokenizer encodes them (Llama 3: after <|begin_of_text|>), the BOS (else tokenizer_config.json's
    eos_token, Qwen2.5-Instruct's <|im_end|>) before empty contexts and rolling windows, generations greedy as
    transformers' generate and stopped at generation_config.json's EOS ids."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from fastllm.eval import load
    from fastllm.eval.harness import FastLLM

    folder = tmp_path / family
    ref, auto = hub_folder(family, folder)
    model, tok = load(folder)
    lm = FastLLM(model=model, tokenizer=tok)
    prefix = auto.bos_token_id if auto.bos_token_id is not None else auto.eos_token_id
    assert (lm.prefix_token_id, lm.eot_token_id) == (prefix, auto.eos_token_id)

    def logp(ids, n):  # summed log p of the last n of ids, each given those before it
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([ids[:-1]])).logits[0].double(), -1)
        return float(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][-n:].sum())

    pairs = [("Hello there", " world"), ("", "Hello world"), ("The answer is ", "42")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (ctx, cont), (lp, _) in zip(pairs, got):
        if ctx:  # lm-eval's _encode_pair: the pair encoded whole, split after the (right-stripped) context
            ids = auto(ctx + cont)["input_ids"]
            n = len(ids) - len(auto(ctx.rstrip())["input_ids"])
        else:  # the prefix token, then the continuation
            ids = [prefix] + auto(cont, add_special_tokens=False)["input_ids"]
            n = len(ids) - 1
        assert lp == pytest.approx(logp(ids, n), rel=1e-5), (ctx, cont)
    text = "Hello world, this is a test."
    (rolled,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)
    ids = [prefix] + auto(text)["input_ids"]  # one window: the text is shorter than the context
    assert rolled == pytest.approx(logp(ids, len(ids) - 1), rel=1e-5)
    # generation: greedy, after the BOS; the folder's EOS ids made the 4th greedy token, so that it stops there
    inputs = auto("Hello there", return_tensors="pt")
    with torch.no_grad():
        free = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    stop = int(free[3])
    assert stop not in free[:3].tolist()  # (these random weights do not repeat it earlier)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop]}))
    lm = FastLLM(model=model, tokenizer=tok)
    req = [Instance("generate_until", {}, ("Hello there", {"until": ["\n\n"], "max_gen_toks": 8}), 0)]
    assert lm.generate_until(req, disable_tqdm=True) == [auto.decode(free[:3])]


def test_eval_tasks_of_a_llama3_folder_start_with_its_bos(tmp_path):
    """`fastllm eval` on a folder whose tokenizer puts a BOS first (Llama 3): bits per byte of documents that start
    with it (there is no <|endoftext|>), multiple-choice contexts after it (the log-likelihoods the lm-eval adapter
    and lm-eval's HFLM give), plain-text prompts after it, ended at generation_config.json's EOS ids."""
    pytest.importorskip("tokenizers")
    from fastllm.eval import evaluate, load

    folder = tmp_path / "llama3"
    ref, auto = hub_folder("llama3", folder)
    model, tok = load(folder)
    assert tok.eot_token is None and tok.bos_token == auto.bos_token_id

    def logp(ids, n):  # summed log p of the last n of ids, each given those before it
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor([ids[:-1]])).logits[0].double(), -1)
        return float(lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])][-n:].sum())

    text = "Hello world, this is a test."
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": text}) + "\n")
    m = evaluate(model, tok, "bpb", data=tmp_path / "docs.jsonl")["metrics"]
    ids = auto(text)["input_ids"]  # <|begin_of_text|> + the text
    assert m["bytes"] == len(text) and m["tokens"] == len(ids) - 1
    assert m["bpb"] == pytest.approx(-logp(ids, len(ids) - 1) / math.log(2) / len(text), rel=1e-5)
    (tmp_path / "mc.jsonl").write_text(json.dumps({"context": "The answer is", "choices": ["42", "yes"],
                                                   "answer": 0}) + "\n")
    rec = evaluate(model, tok, "mc", data=tmp_path / "mc.jsonl")["records"][0]
    n_ctx = len(auto("The answer is")["input_ids"])
    want = [logp(auto(f"The answer is {c}")["input_ids"], len(auto(f"The answer is {c}")["input_ids"]) - n_ctx)
            for c in ("42", "yes")]
    np.testing.assert_allclose(rec["logprob"], want, rtol=1e-5)
    # gen, plain text: the prompt after the BOS, greedy, ended at the folder's EOS id (made the 4th greedy token)
    inputs = auto("Hello there", return_tensors="pt")
    with torch.no_grad():
        free = ref.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    assert int(free[3]) not in free[:3].tolist()
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [int(free[3])]}))
    (tmp_path / "gen.jsonl").write_text(json.dumps({"prompt": "Hello there", "answer": "1"}) + "\n")
    rec = evaluate(model, tok, "gen", data=tmp_path / "gen.jsonl", chat=False, max_new_tokens=8)["records"][0]
    assert rec["completions"] == [auto.decode(free[:3])]


@pytest.mark.parametrize("family", ["llama3", "qwen2", "llama2", "gemma2"])
def test_lm_eval_adapter_scores_as_lm_evals_hf_model(family, tmp_path):
    """The same requests through lm-eval's own HF model (HFLM, which needs accelerate) and the adapter: the same
    log-likelihoods, rolling log-likelihoods and greedy generations."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("lm_eval")
    pytest.importorskip("accelerate")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from fastllm.eval.harness import FastLLM

    hub_folder(family, tmp_path / family)
    lm = FastLLM(str(tmp_path / family))  # as lm_eval --model fastllm --model_args pretrained=... loads it
    hflm = HFLM(pretrained=str(tmp_path / family), device="cpu", dtype="float32", batch_size=4)
    pairs = [("Hello there", " world"), ("", "Hello world"), ("The answer is ", "42"), ("Q: x\nA:", " yes")]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    np.testing.assert_allclose([r[0] for r in lm.loglikelihood(reqs, disable_tqdm=True)],
                               [r[0] for r in hflm.loglikelihood(reqs)], rtol=1e-5)
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(["Hello world, a test.", "x"])]
    np.testing.assert_allclose(lm.loglikelihood_rolling(reqs, disable_tqdm=True), hflm.loglikelihood_rolling(reqs),
                               rtol=1e-5)
    reqs = [Instance("generate_until", {}, ("Hello there", {"until": ["\n\n"], "max_gen_toks": 10}), 0)]
    assert lm.generate_until(reqs, disable_tqdm=True) == hflm.generate_until(reqs)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "llama2", "gemma2", "olmo2", "smollm3"])
def test_cli_sample_from_a_hub_folder(family, tmp_path, capsys):
    """`fastllm sample --ckpt <HF folder>` encodes the prompt as transformers' tokenizer does (Llama 3: after its
    BOS token) and continues it with transformers' greedy tokens, stopping at generation_config.json's EOS ids."""
    pytest.importorskip("tokenizers")
    from fastllm import cli

    ref, auto = hub_folder(family, tmp_path / family)
    for n in (40, 3):
        want = hf_greedy(ref, auto, auto("Hello there", return_tensors="pt"), n)
        assert cli.main(["sample", "--ckpt", str(tmp_path / family), "--prompt", "Hello there", "--temperature", "0",
                         "-n", str(n)]) == 0
        # (random weights emit broken UTF-8: streamed, it is replaced as a whole decode replaces it)
        assert capsys.readouterr().out == "Hello there" + want


def test_a_hub_folder_with_only_a_sentencepiece_model(tmp_path, capsys):
    """A Llama 2 folder with tokenizer.model and no tokenizer.json (older fine-tunes): `fastllm sample --ckpt` finds
    and converts it (greedy text as transformers' with the converted file), `fastllm convert` writes its
    tokenizer.json, and a checkpoint copy of it keeps tokenizer_config.json (whose settings the conversion reads)."""
    pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")
    from hf_families import sentencepiece_model

    from fastllm import checkpoint, cli

    folder = tmp_path / "llama2"
    ref, auto = hub_folder("llama2", folder)
    want = hf_greedy(ref, auto, auto("Hello there", return_tensors="pt"), 12)
    (folder / "tokenizer.json").unlink()
    shutil.copy(sentencepiece_model(800), folder / "tokenizer.model")
    conf = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**conf, "tokenizer_class": "LlamaTokenizer"}))
    sample = ["sample", "--prompt", "Hello there", "--temperature", "0", "-n", "12", "--ckpt"]
    assert cli.main(sample + [str(folder)]) == 0
    assert capsys.readouterr().out == "Hello there" + want
    assert cli.main(["convert", str(folder), str(tmp_path / "ckpt")]) == 0
    assert (tmp_path / "ckpt" / "tokenizer.json").is_file()
    capsys.readouterr()
    assert cli.main(sample + [str(tmp_path / "ckpt")]) == 0
    assert capsys.readouterr().out == "Hello there" + want
    copied = checkpoint.copy_tokenizer(checkpoint.find_tokenizer(folder), tmp_path / "copy")
    assert copied.name == "tokenizer.model" and (tmp_path / "copy" / "tokenizer_config.json").is_file()
    text = "Hello there, 世界!"
    assert Tokenizer.from_pretrained(tmp_path / "copy").encode(text).tolist() == auto.encode(text,
                                                                                            add_special_tokens=False)


def test_stream_text_encodes_a_text_prompt_as_transformers(tmp_path):
    """stream_text(model, tok, "text", ...) continues what transformers' tokenizer("text") encodes: a Llama 3
    folder's BOS first (it was left out, unlike `fastllm sample`), "" a new document ([BOS]; it was an error)."""
    pytest.importorskip("tokenizers")
    from fastllm.sample import stream_text

    folder = tmp_path / "llama3"
    ref, auto = hub_folder("llama3", folder)
    model, tok = load_model(folder).eval(), Tokenizer.from_pretrained(folder)
    for prompt in ("Hello there", ""):
        want = hf_greedy(ref, auto, auto(prompt, return_tensors="pt"), 20)
        assert "".join(stream_text(model, tok, prompt, 20, temperature=0,
                                   stop_tokens=chat.eos_token_ids(folder, tok))) == want


def test_cli_sample_of_a_vocab_padded_past_the_tokenizer(tmp_path, capsys):
    """Qwen2/2.5/3 configs have more embedding rows (vocab_size 151936) than the tokenizer has tokens (~151665):
    a generated id without a token is no text, as transformers' decode skips it (it was a ValueError mid-stream)."""
    pytest.importorskip("tokenizers")
    from fastllm import cli

    ref, auto = hub_folder("qwen2", tmp_path / "qwen2", vocab_size=600)  # 407 tokens
    inputs = auto("Hello there", return_tensors="pt")
    with torch.no_grad():
        out = ref.generate(**inputs, max_new_tokens=30, do_sample=False)[0, inputs["input_ids"].shape[1]:].tolist()
    assert max(out) >= len(auto)  # random weights: ids past the tokenizer's are generated
    want = hf_greedy(ref, auto, inputs, 30)
    assert cli.main(["sample", "--ckpt", str(tmp_path / "qwen2"), "--prompt", "Hello there", "--temperature", "0",
                     "-n", "30"]) == 0
    assert capsys.readouterr().out == "Hello there" + want


@pytest.mark.parametrize("family", ["qwen2", "llama3"])
def test_lora_sft_and_dpo_of_a_hub_folder_load_in_peft(family, tmp_path, monkeypatch, capsys):
    """`fastllm sft --lora-r` on a hub folder: its checkpoints are PEFT adapter folders naming the folder, which peft's
    PeftModel.from_pretrained(the transformers model, checkpoint) loads and computes fastllm's logits with; `fastllm
    chat` on them answers as taught; `fastllm dpo --lora-r` then trains new adapters on that model (its template,
    its EOS ids) and `fastllm convert --to hf` merges everything into one transformers folder."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    peft = pytest.importorskip("peft")
    import io

    from fastllm import cli

    ref, auto = hub_folder(family, tmp_path / "base", max_position_embeddings=128)
    conv = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
    (tmp_path / "conv.jsonl").write_text((json.dumps(conv) + "\n") * 8)
    assert cli.main(["sft", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "conv.jsonl"), "--out",
                     str(tmp_path / "out"), "--max-steps", "40", "--batch-size", "2", "--seq-len", "128", "--lr",
                     "2e-2", "--warmup-steps", "2", "--eval-every", "0", "--val-fraction", "0", "--no-progress",
                     "--lora-r", "8", "--lora-alpha", "16", "--lora-targets", "q,k,v,o,gate,up,down"]) == 0
    ckpt = checkpoint.latest(tmp_path / "out")
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str((tmp_path / "base").resolve())
    tuned = load_model(ckpt).eval()
    ids = auto.apply_chat_template([{"role": "user", "content": "Name a colour."}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(ref, str(ckpt)).eval()(ids).logits.numpy()
    got = tuned.forward(ids.numpy())
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Name a colour.\n"))
    assert cli.main(["chat", "--ckpt", str(ckpt), "--temperature", "0", "-n", "8"]) == 0
    assert capsys.readouterr().out.strip() == "Blue."
    prefs = [{"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Blue."}] * 6
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    assert cli.main(["dpo", "--base", str(ckpt), "--data", str(tmp_path / "prefs.jsonl"), "--out",
                     str(tmp_path / "dpo"), "--lora-r", "4", "--lr", "1e-2", "--beta", "0.5", "--epochs", "4",
                     "--batch-size", "3", "--val-fraction", "0", "--eval-every", "0", "--no-progress"]) == 0
    assert "plain text" not in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "dpo" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-9) and rows[-1]["margin"] > 0
    assert cli.main(["convert", str(tmp_path / "dpo"), str(tmp_path / "merged"), "--to", "hf"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").float().eval()
    with torch.no_grad():
        np.testing.assert_allclose(merged(ids).logits.numpy(), load_model(tmp_path / "dpo").eval().forward(ids.numpy()),
                                   rtol=0, atol=2e-4 * float(np.abs(want).max()))


@pytest.mark.parametrize("form", ["int8", "bfloat16"])
def test_lora_sft_and_dpo_over_a_base_held_in_int8_or_bf16(form, tmp_path, capsys):
    """`--base-weights int8 / bfloat16`: LoRA SFT of a hub folder whose matrices are held in that form alone learns
    the answer (`fastllm chat` on the base held so, and on the float32 base); its checkpoints are the usual PEFT
    adapter folders; a run resumed half-way ends with the same adapters, bit for bit; DPO trains adapters over a held
    base too; refusals name the option."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("jinja2")
    import io
    import shutil

    from fastllm import cli

    hub_folder("qwen2", tmp_path / "base", max_position_embeddings=128)
    conv = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]}
    (tmp_path / "conv.jsonl").write_text((json.dumps(conv) + "\n") * 8)
    args = ["sft", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "conv.jsonl"), "--out",
            str(tmp_path / "out"), "--max-steps", "40", "--ckpt-every", "20", "--batch-size", "2", "--seq-len", "128",
            "--lr", "2e-2", "--warmup-steps", "2", "--eval-every", "0", "--val-fraction", "0", "--no-progress",
            "--lora-r", "8", "--lora-alpha", "16", "--base-weights", form]
    assert cli.main(args) == 0
    assert "LoRA {'r': 8" in capsys.readouterr().out
    ckpt = checkpoint.latest(tmp_path / "out")
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    for dtype in ([], ["--dtype", form]):  # the float32 base, and the base held as it trained
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sys, "stdin", io.StringIO("Name a colour.\n"))
            assert cli.main(["chat", "--ckpt", str(ckpt), "--temperature", "0", "-n", "8", *dtype]) == 0
        assert capsys.readouterr().out.strip() == "Blue."
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "out" / "ckpt_000020", resumed / "ckpt_000020")
    at = args.index(str(tmp_path / "out"))
    assert cli.main([*args[:at], str(resumed), *args[at + 1:], "--resume"]) == 0
    want, got = load_model(ckpt).lora.state_dict(), load_model(resumed).lora.state_dict()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    prefs = [{"prompt": "Name a colour.", "chosen": "Red.", "rejected": "Blue."}] * 6
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prefs))
    dpo = ["dpo", "--base", str(tmp_path / "base"), "--data", str(tmp_path / "prefs.jsonl"), "--out",
           str(tmp_path / "dpo"), "--lora-r", "4", "--lr", "1e-2", "--beta", "0.5", "--epochs", "4", "--batch-size",
           "3", "--val-fraction", "0", "--eval-every", "0", "--no-progress", "--base-weights", form]
    assert cli.main(dpo) == 0
    rows = [json.loads(x) for x in (tmp_path / "dpo" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-9) and rows[-1]["margin"] > 0
    capsys.readouterr()
    no_lora = [a for a in args if a not in ("--lora-r", "8", "--lora-alpha", "16")]
    assert cli.main(no_lora) == 1
    assert "base_weights='" + form + "': a base held in" in capsys.readouterr().err
    assert cli.main([*dpo[:2], str(ckpt), *dpo[3:6], str(tmp_path / "dpo2"), *dpo[7:]]) == 1
    assert "convert it first" in capsys.readouterr().err
