"""Hugging Face interop: models in the `transformers` layout, read and written (the tokenizer files are read by
fastllm.tokenizer, the chat template by fastllm.chat; fastllm.checkpoint.convert turns a folder into a fastllm
checkpoint and back).

A folder that transformers' `from_pretrained` reads holds
    config.json                    model_type and sizes (mapped to a GPTConfig below)
    model.safetensors              the tensors (or model-0000K-of-0000N.safetensors + model.safetensors.index.json
                                   {"weight_map": {name: file}}); F32, F16 or BF16
    generation_config.json         eos_token_id (int or list): where generation stops (optional)
    tokenizer.json, tokenizer_config.json, chat_template.jinja   (optional)

Architectures (config.json model_type -> GPTConfig; every name below is refused when it is not as listed):
    gpt2     GPT2LMHeadModel     learned positions, layernorm, GELU (gelu_new), biases, tied lm-head
    llama    LlamaForCausalLM    RoPE (rope_theta, rope_scaling default | linear | llama3 | yarn | dynamic: see
                                 fastllm.rope), RMSNorm, SwiGLU (silu), GQA, attention_bias (q, k, v, o), mlp_bias,
                                 head_dim, tied or untied
    mistral  MistralForCausalLM  Llama's, without biases; sliding_window (v0.1, Zephyr): every layer attends to its
                                 latest sliding_window tokens only
    qwen2    Qwen2ForCausalLM    Llama's with q/k/v biases (and no others); sliding layers as listed in layer_types
                                 (or from max_window_layers on, with use_sliding_window)
    qwen3    Qwen3ForCausalLM    Llama's with QK-norm (RMSNorm over head_dim on q and k), attention_bias; sliding
                                 layers as qwen2's
    phi3     Phi3ForCausalLM     Mistral's, q|k|v and gate|up each in one tensor (fastllm's layout); longrope
                                 (Phi-3-128k, Phi-3.5, Phi-4-mini) with original_max_position_embeddings as the
                                 context (its short factors); partial_rotary_factor (Phi-4-mini: 0.75)
    smollm3  SmolLM3ForCausalLM  Llama's, with no RoPE on the layers no_rope_layers marks 0 (every fourth:
                                 no_rope_layer_interval); with use_sliding_window those NoPE layers slide
    olmo2    Olmo2ForCausalLM    Llama's with the norms after each branch instead of before it
                                 (post_attention_layernorm, post_feedforward_layernorm: no input_layernorm) and
                                 QK-norm over all the q channels and all the k channels (not per head)
    olmo3    Olmo3ForCausalLM    OLMo 2's, three sliding layers of four (or as layer_types lists); rope_scaling (YaRN
                                 of the long-context models) applies to the full-attention layers only
    exaone4  Exaone4ForCausalLM  OLMo 2's norms with Qwen3's QK-norm (per head), no biases; with a sliding_window,
                                 three sliding layers of four (sliding_window_pattern: 4 or "LLLG", or layer_types)
                                 and no RoPE on the full-attention ones (EXAONE 4.0)
    arcee    ArceeForCausalLM    Llama's with a relu2 MLP (down(relu(up(x))^2), no gate: AFM-4.5B)
    ministral MinistralForCausalLM  Mistral's, its sliding layers as layer_types lists (Ministral 8B)
    stablelm StableLmForCausalLM Llama's with LayerNorms (weight and bias), RoPE on a quarter of each head
                                 (partial_rotary_factor, 0.25 by default), q/k/v biases with use_qkv_bias (StableLM 2,
                                 StableLM 3B 4E1T); qk_layernorm and use_parallel_residual are refused
    starcoder2 Starcoder2ForCausalLM  LayerNorms, a GELU-tanh MLP without a gate (c_fc, c_proj), biases on every
                                 projection (use_bias), GQA, every layer sliding with sliding_window (StarCoder2)
    ernie4_5 Ernie4_5ForCausalLM Llama's with use_bias (every projection) and RoPE on interleaved pairs (2i, 2i+1),
                                 which fastllm turns into its rotate-half pairs by reordering the q and k rows of each
                                 head as it loads (evens, then odds; undone on saving): ERNIE 4.5 0.3B
    glm      GlmForCausalLM      Llama's with q/k/v biases, gate|up in one tensor, interleaved RoPE on half of each
                                 head (partial_rotary_factor 0.5) reordered as ernie4_5's: GLM-4-9B-chat-hf, GLM-Edge
    glm4     Glm4ForCausalLM     glm's, with norms after each branch too (post_self_attn_layernorm,
                                 post_mlp_layernorm): GLM-4-9B-0414
    granite  GraniteForCausalLM  Llama's with four scales: embedding_multiplier (the token embeddings),
                                 attention_multiplier (the scores, instead of 1/sqrt(head_dim)), residual_multiplier
                                 (each branch's output joins the residual stream times it), logits_scaling (the
                                 logits divided by it): IBM Granite 3.x
    gemma    GemmaForCausalLM    GeGLU (GELU's tanh approximation), token embeddings times sqrt(hidden_size),
                                 RMSNorms that multiply by (1 + weight) (fastllm keeps the gain 1 + weight: loading
                                 adds 1, saving subtracts it), attention_bias, MQA/GQA, head_dim, tied by default
    gemma2   Gemma2ForCausalLM   Gemma's, plus a norm after each branch (post_attention_layernorm,
                                 post_feedforward_layernorm; pre_feedforward_layernorm is the MLP's pre-norm),
                                 attn_logit_softcapping, final_logit_softcapping, query_pre_attn_scalar (the scores'
                                 scale), sliding layers every other layer (or as layer_types lists)
    gemma3_text Gemma3ForCausalLM  Gemma 2's, plus QK-norm, five sliding layers of six (sliding_window_pattern, or
                                 layer_types) whose RoPE has its own base (rope_local_base_freq) and no scaling;
                                 attn_logit_softcapping is not applied (as in transformers' Gemma 3)
    gemma3   Gemma3ForConditionalGeneration  (Gemma 3 4B-27B) its language model: text_config as gemma3_text's (with
                                 Gemma3TextConfig's defaults for what it leaves out), the tensors under
                                 language_model.model. or model.language_model.; the vision tower is not read, and
                                 save_pretrained writes the language model alone (Gemma3ForCausalLM)
    gpt_neox GPTNeoXForCausalLM  (Pythia, GPT-NeoX-20B) LayerNorms, attention and MLP side by side
                                 (use_parallel_residual, true by default; false: in sequence), the exact GELU
                                 (hidden_act "gelu"; "gelu_new"/"gelu_pytorch_tanh": the tanh one), RoPE on the first
                                 rotary_pct of each head (0.25 by default; rotary_emb_base, or transformers 5's
                                 rope_parameters), biases on every projection (attention_bias: the attention's),
                                 embed_out its untied lm-head; query_key_value's rows are per head [q k v] and are
                                 reordered to fastllm's [q | k | v] as they load (and back as they save)
Keys of config.json that change the computation are mapped or refused by name (other rope types, MoE model
types, quantization, activations, partial rotary); the others (dropout, initializer range, token
ids, generation defaults, bookkeeping) do not affect the model and are not read.

Weights: per layer, HF keeps one tensor per projection where fastllm stacks the layers (L, ...) and concatenates
q|k|v into attn.c_attn and gate|up into mlp.c_fc (the row blocks of the spec in fastllm.model); RoPE is HF's
rotate-half layout, so q/k rows need no permutation. GPT-2's Conv1D weights are (in, out), the transpose of
fastllm's. Loading maps each file (fastllm.fileio.load_safetensors(mmap=True)) and converts tensor by tensor
straight into the model's flat float32 buffer, giving each tensor's pages back after it is copied: the peak is
about one float32 model (measured in tests/test_hf_models.py), whatever the stored dtype; with weights= (inference
only) the matrices go straight to bf16 or int8 a layer at a time and the peak is the model in that form. No pickle:
never pytorch_model.bin.

LoRA adapters (fastllm.lora) as PEFT keeps them: a folder with adapter_config.json (r, lora_alpha, rank_pattern,
alpha_pattern, use_rslora, ...) and adapter_model.safetensors (base_model.model.<module>.lora_A.weight (r, in),
.lora_B.weight (out, r) per transformers module: q_proj, ..., GPT-2's c_attn); save_adapter writes one that peft
reads to the same logits, load_adapter reads peft's exactly (separate A's of one fastllm matrix concatenated).

>>> model = GPT.from_pretrained("Qwen2.5-0.5B-Instruct/")   # or hf.from_pretrained(path)
>>> model.save_pretrained("out", tokenizer=tok)              # transformers can load "out"
>>> tok = Tokenizer.from_pretrained("Qwen2.5-0.5B-Instruct/")
>>> load_adapter(model, "qwen-lora/")                        # a PEFT adapter folder (save_adapter writes one)
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from . import ops
from .chat import eos_token_ids, read_templates, special_tokens
from .fileio import load_safetensors, read_json, save_safetensors, write_json
from .lora import TARGETS, Lora, LoraConfig, target_rows
from .model import (
    GATED,
    GPT,
    MATRICES,
    TOKEN_TABLE,
    WEIGHT_FORMS,
    GPTConfig,
    param_shapes,
    snapshot_convert,
    stacked_snapshot,
)
from .rope import ROPE_TYPES, attention_scaling
from .version import __version__

CONFIG_FILE = "config.json"
GENERATION_FILE = "generation_config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ARCHITECTURES = {
    "gpt2": ("GPT2LMHeadModel", "GPT2Model"),
    "llama": ("LlamaForCausalLM",),
    "mistral": ("MistralForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "qwen3": ("Qwen3ForCausalLM",),
    "phi3": ("Phi3ForCausalLM",),
    "smollm3": ("SmolLM3ForCausalLM",),
    "olmo2": ("Olmo2ForCausalLM",),
    "olmo3": ("Olmo3ForCausalLM",),
    "exaone4": ("Exaone4ForCausalLM",),
    "arcee": ("ArceeForCausalLM",),
    "granite": ("GraniteForCausalLM",),
    "ernie4_5": ("Ernie4_5ForCausalLM",),
    "glm": ("GlmForCausalLM",),
    "glm4": ("Glm4ForCausalLM",),
    "ministral": ("MinistralForCausalLM",),
    "stablelm": ("StableLmForCausalLM",),
    "starcoder2": ("Starcoder2ForCausalLM",),
    "gemma": ("GemmaForCausalLM",),
    "gemma2": ("Gemma2ForCausalLM",),
    "gemma3_text": ("Gemma3ForCausalLM",),
    "gemma3": ("Gemma3ForConditionalGeneration",),  # (Gemma 3 4B-27B: its language model; images are not read)
    "gpt_neox": ("GPTNeoXForCausalLM",),
}
GEMMAS = ("gemma", "gemma2", "gemma3_text")
EPS_KEYS = {"stablelm": "layer_norm_eps", "starcoder2": "norm_epsilon"}  # the LayerNorm families' epsilon keys
MLP_NAMES = {"arcee": "relu2", "starcoder2": "GELU-tanh"}  # the MLPs other than SwiGLU, for errors
GLMS = ("glm", "glm4")  # q/k/v biases by default, o without; gate|up in one tensor; half-head interleaved RoPE
INTERLEAVED = ("ernie4_5", *GLMS)  # RoPE on pairs (2i, 2i+1): their q and k rows reordered per head (tensor_map)
OLMOS = ("olmo2", "olmo3")  # norms after each branch only, QK-norm over all heads
TIED = ("smollm3", "starcoder2", "ernie4_5")  # (and the Gemmas) tie_word_embeddings defaults to true
# transformers' rope_theta defaults (else 1e4)
DEFAULT_THETA = {"smollm3": 2e6, "olmo3": 5e5, "gemma3_text": 1e6, "ernie4_5": 5e5}
MODEL_TYPES = tuple(ARCHITECTURES)
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both GELU's tanh approximation, as fastllm's kernel
NEOX_ACTIVATIONS = {"gelu": "gelu_erf", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}  # HF's -> GPTConfig.mlp
_GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                      layer_norm_epsilon=1e-5)  # fmt: skip
# transformers' defaults for the keys a config.json may leave out, where they are not the Llama family's (rms_norm_eps
# 1e-6, as many kv heads as heads, head_dim = hidden_size / heads, no window: _llama_config's); the text_config of
# Gemma 3 4B-27B names only what differs from Gemma3TextConfig's
FAMILY_DEFAULTS = {
    "gemma3_text": dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131_072,
                        rms_norm_eps=1e-6, query_pre_attn_scalar=256, sliding_window=4096),
    "gemma": dict(num_key_value_heads=16),
    "gemma2": dict(num_key_value_heads=4, sliding_window=4096),
    "smollm3": dict(num_key_value_heads=4),
    **dict.fromkeys(("mistral", "ministral"), dict(num_key_value_heads=8, sliding_window=4096)),
    "qwen2": dict(num_key_value_heads=32),
    "qwen3": dict(num_key_value_heads=32, head_dim=128),
    "phi3": dict(rms_norm_eps=1e-5),
    "olmo2": dict(rms_norm_eps=1e-5),
    "olmo3": dict(rms_norm_eps=1e-5, sliding_window=4096),
    "exaone4": dict(rms_norm_eps=1e-5, num_key_value_heads=32, sliding_window=4096),
    "arcee": dict(rms_norm_eps=1e-5),
    "ernie4_5": dict(rms_norm_eps=1e-5, num_key_value_heads=2, head_dim=128),
    **dict.fromkeys(("glm", "glm4"), dict(rms_norm_eps=1.5625e-7, num_key_value_heads=2, head_dim=128)),
    "stablelm": dict(num_key_value_heads=32),
    "starcoder2": dict(num_key_value_heads=2),
}
VISION = re.compile(r"(model\.)?(vision_tower|multi_modal_projector)\..*")  # a multimodal Gemma 3's, not read
_SKIP = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)|(model\.)?layers\.\d+\.self_attn\.rotary_emb"
                   r"\.inv_freq|(gpt_neox\.)?(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)|"
                   r"rotary_emb\.inv_freq)")
# (buffers old checkpoints carry: causal masks, RoPE frequencies, recomputed; GPT-NeoX's per layer or shared)


# ---- config ----------------------------------------------------------------------------------------------


def _positive_number(d: dict, key: str, default, bad) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise bad(f"{key} must be a positive number, got {v!r}")
    return float(v)


def _rope(d: dict, bad, default_theta: float = 10000.0) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 4's rope_theta + rope_scaling keys or 5's rope_parameters."""
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise bad(f"rope_parameters must be an object, got {params!r}")
    params = dict(params or {})
    theta = params.pop("rope_theta", None)
    if theta is not None and "rope_theta" in d and d["rope_theta"] != theta:
        raise bad(f"rope_theta={d['rope_theta']} differs from rope_parameters.rope_theta={theta}")
    theta = _positive_number(d if theta is None else {"rope_theta": theta}, "rope_theta", default_theta, bad)
    scaling = d.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise bad(f"rope_scaling must be an object or null, got {scaling!r}")
    scaling = dict(scaling or params)
    kind = scaling.pop("type", None) or scaling.get("rope_type", "default")
    scaling["rope_type"] = kind
    if kind not in ROPE_TYPES:
        raise bad(f"rope_scaling type {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    if kind in ("yarn", "longrope"):  # transformers' defaults: the pre-scaling context is the config's, the factor
        scaling.setdefault("original_max_position_embeddings",  # their ratio (Phi-3 keeps the context at top level)
                           d.get("original_max_position_embeddings", d["max_position_embeddings"]))
        if scaling.get("factor") is None and scaling["original_max_position_embeddings"]:
            scaling["factor"] = d["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    return theta, (None if kind == "default" else scaling)


def _sliding(d: dict, kind: str, n_layer: int, bad) -> tuple[int | None, list[str] | None]:
    """(sliding_window, layer_types) of GPTConfig: which layers attend to a window of the latest tokens only
    (Mistral v0.1, Zephyr, Phi-3: all; Gemma 2: every other; Gemma 3: five of six; OLMo 3, EXAONE 4: three of four;
    Qwen with use_sliding_window: those from max_window_layers on), from transformers 5's layer_types or 4's
    spellings."""
    window, kinds = d.get("sliding_window"), _layer_kinds(d, kind, n_layer, bad)
    sliding = [i for i, k in enumerate(kinds) if k == "sliding_attention"]
    if not sliding:
        return None, None
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise bad(f"sliding_window={window!r} on layers {sliding[:4]}{'...' if len(sliding) > 4 else ''} must be a "
                  "positive integer")
    return window, None if len(sliding) == n_layer else kinds


def _layer_kinds(d: dict, kind: str, n_layer: int, bad) -> list[str]:
    """Each layer's "full_attention" or "sliding_attention", as the family's transformers code reads its config."""
    window = d.get("sliding_window")
    kinds = d.get("layer_types")
    if kinds is not None:
        if not isinstance(kinds, list) or len(kinds) != n_layer:
            raise bad(f"layer_types must be a list of num_hidden_layers={n_layer} names, got {kinds!r}")
        other = sorted({k for k in kinds if k not in ("full_attention", "sliding_attention")}, key=str)
        if other:
            raise bad(f"layer_types {other} are not supported (only full_attention and sliding_attention)")
    elif kind in ("qwen2", "qwen3"):  # transformers 4's spelling
        first = d.get("max_window_layers", n_layer)
        kinds = ["sliding_attention" if d.get("use_sliding_window") and i >= first else "full_attention"
                 for i in range(n_layer)]
    elif kind in ("gemma2", "gemma3_text", "olmo3"):  # every other layer (Gemma 2), all but every sixth (Gemma 3) or
        # fourth (OLMo 3)
        every = {"gemma2": 2, "olmo3": 4}.get(kind) or d.get("sliding_window_pattern", 6)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise bad(f"sliding_window_pattern must be a positive integer, got {every!r}")
        kinds = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layer)]
    elif kind == "exaone4" and window is not None:  # sliding_window_pattern: every n-th layer full (4), or "LLLG"
        every = d.get("sliding_window_pattern", 4)
        if isinstance(every, str) and every and set(every) <= {"L", "G"}:
            kinds = ["sliding_attention" if every[i % len(every)] == "L" else "full_attention" for i in range(n_layer)]
        elif isinstance(every, int) and not isinstance(every, bool) and every >= 1:
            kinds = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layer)]
        else:
            raise bad(f"sliding_window_pattern must be a positive integer or a string of L and G, got {every!r}")
    elif kind == "smollm3":  # with use_sliding_window, the layers without RoPE
        nope = _nope_layers(d, n_layer, bad)
        kinds = ["sliding_attention" if d.get("use_sliding_window") and window is not None and i in nope else
                 "full_attention" for i in range(n_layer)]
    else:  # mistral, phi3: every layer slides when sliding_window is set
        kinds = ["sliding_attention" if window is not None else "full_attention"] * n_layer
    if (kind == "smollm3" and not d.get("use_sliding_window")) or (kind == "exaone4" and window is None):
        kinds = ["full_attention"] * n_layer  # (their layer_types slide only with these)
    return kinds


def _nope_layers(d: dict, n_layer: int, bad) -> list[int]:
    """SmolLM3's layers without RoPE: where no_rope_layers (1: RoPE, 0: none, per layer) says 0, or every
    no_rope_layer_interval-th layer (transformers' default: every fourth)."""
    flags = d.get("no_rope_layers")
    if flags is None:
        every = d.get("no_rope_layer_interval", 4)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise bad(f"no_rope_layer_interval must be a positive integer, got {every!r}")
        flags = [int((i + 1) % every != 0) for i in range(n_layer)]
    if not isinstance(flags, list) or len(flags) != n_layer or any(f not in (0, 1) for f in flags):
        raise bad(f"no_rope_layers must be a list of num_hidden_layers={n_layer} values 0 or 1, got {flags!r}")
    return [i for i, f in enumerate(flags) if not f]


def config_from_hf(d: dict, where: str = CONFIG_FILE) -> GPTConfig:
    """A GPTConfig from a transformers config.json dict (see the module doc); ValueError naming `where` and the key
    for what fastllm cannot run."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: not a JSON object")

    def bad(msg: str) -> ValueError:
        return ValueError(f"{where}: {msg}")

    kind = d.get("model_type")
    if not isinstance(kind, str) or kind not in ARCHITECTURES:
        raise bad(f"model_type {kind!r} is not supported (supported: {', '.join(MODEL_TYPES)})")
    archs = d.get("architectures") or [ARCHITECTURES[kind][0]]
    if not isinstance(archs, list) or any(a not in ARCHITECTURES[kind] for a in archs):
        raise bad(f"architectures {archs!r} are not supported for model_type {kind!r} (only "
                  f"{list(ARCHITECTURES[kind])})")
    if d.get("quantization_config") is not None:
        method = d["quantization_config"].get("quant_method") if isinstance(d["quantization_config"], dict) else None
        raise bad(f"quantization_config ({method or 'quantized weights'}) is not supported: give an unquantized "
                  "F32/F16/BF16 checkpoint")
    if kind == "gemma3":  # Gemma 3 4B-27B: the language model (text_config) of the image-text model
        if not isinstance(d.get("text_config"), dict):
            raise bad("text_config must be an object (the language model of Gemma3ForConditionalGeneration)")
        d, kind = d["text_config"], "gemma3_text"
    d = {**FAMILY_DEFAULTS.get(kind, {}), **d}
    try:
        cfg = _gpt2_config(d, bad) if kind == "gpt2" else _neox_config(d, bad) if kind == "gpt_neox" else \
            _llama_config(d, kind, bad)
        return GPTConfig(**cfg)
    except ValueError as e:
        if str(e).startswith(where):
            raise
        raise bad(str(e)) from None
    except (TypeError, AttributeError) as e:  # a value of the wrong JSON type somewhere
        raise bad(f"malformed value ({type(e).__name__}: {e})") from None


def _gpt2_config(d: dict, bad) -> dict:
    act = d.get("activation_function", "gelu_new")
    if act not in GPT2_ACTIVATIONS:
        raise bad(f"activation_function {act!r} is not supported (only {list(GPT2_ACTIVATIONS)})")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False), ("tie_word_embeddings", True)):  # fmt: skip
        if key in d and bool(d[key]) != want:
            raise bad(f"{key}={d[key]!r} is not supported (fastllm needs {want})")
    v = {k: d.get(k, default) for k, default in _GPT2_DEFAULTS.items()}
    n_ctx = d.get("n_ctx")
    if "n_positions" not in d and n_ctx is not None:  # very old configs name the context n_ctx only
        v["n_positions"] = n_ctx
    if n_ctx is not None and n_ctx != v["n_positions"]:
        raise bad(f"n_ctx={n_ctx} differs from n_positions={v['n_positions']}")
    n_inner = d.get("n_inner")
    if n_inner is not None and n_inner != 4 * v["n_embd"]:
        raise bad(f"n_inner={n_inner} is not supported (fastllm's GPT-2 MLP is 4 * n_embd = {4 * v['n_embd']})")
    eps = _positive_number(v, "layer_norm_epsilon", None, bad)
    return dict(block_size=v["n_positions"], vocab_size=v["vocab_size"], n_layer=v["n_layer"], n_head=v["n_head"],
                n_embd=v["n_embd"], layernorm_eps=eps)


def _neox_config(d: dict, bad) -> dict:
    """GPT-NeoX's keys (transformers 4's rotary_pct and rotary_emb_base, or 5's rope_parameters) -> GPTConfig's."""
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings")
    missing = [k for k in required if k not in d]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    C, NH = d["hidden_size"], d["num_attention_heads"]
    act = d.get("hidden_act", "gelu")
    if act not in NEOX_ACTIVATIONS:
        raise bad(f"hidden_act {act!r} is not supported (only {', '.join(map(repr, NEOX_ACTIVATIONS))}: the exact "
                  "GELU or its tanh approximation)")
    head_dim = d.get("head_dim")  # (GPTNeoXConfig has none; its RoPE would read one, its attention not)
    if head_dim is not None and not (isinstance(C, int) and isinstance(NH, int) and NH > 0 and head_dim * NH == C):
        raise bad(f"head_dim={head_dim!r} is not supported for gpt_neox (its heads are hidden_size / "
                  f"num_attention_heads = {C} / {NH})")
    for key in ("use_parallel_residual", "attention_bias", "tie_word_embeddings"):
        if not isinstance(d.get(key, False), bool):
            raise bad(f"{key} must be true or false, got {d[key]!r}")
    params = dict(d["rope_parameters"]) if isinstance(d.get("rope_parameters"), dict) else d.get("rope_parameters")
    partial = (params or {}).pop("partial_rotary_factor", d.get("rotary_pct", 0.25))
    rope = {k: v for k, v in d.items() if k != "rope_parameters"} | ({"rope_parameters": params} if params else {})
    if "rotary_emb_base" in d and "rope_theta" not in d:  # (transformers 4's name of it)
        rope["rope_theta"] = d["rotary_emb_base"]
    theta, scaling = _rope(rope, bad)
    attention_bias = d.get("attention_bias", True)
    return dict(
        block_size=d["max_position_embeddings"], vocab_size=d["vocab_size"], n_layer=d["num_hidden_layers"],
        n_head=NH, n_embd=C, layernorm_eps=_positive_number(d, "layer_norm_eps", 1e-5, bad), positions="rope",
        rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial, norm="layernorm",
        mlp=NEOX_ACTIVATIONS[act], mlp_hidden=d["intermediate_size"], qkv_bias=attention_bias,
        proj_bias=attention_bias, mlp_bias=True, tie_embeddings=d.get("tie_word_embeddings", False),
        parallel_residual=d.get("use_parallel_residual", True))


def _llama_config(d: dict, kind: str, bad) -> dict:
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings")
    missing = [k for k in required if k not in d]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    C, NH, L = d["hidden_size"], d["num_attention_heads"], d["num_hidden_layers"]
    gemma = kind in GEMMAS
    # Gemma's GeGLU uses GELU's tanh approximation: Gemma 2 and 3 name it hidden_activation; Gemma's first configs
    # say hidden_act "gelu", which transformers reads as the tanh approximation (Gemma 1.1 adds hidden_activation)
    tanh = ("gelu_pytorch_tanh", "gelu_new")
    checks = {"hidden_act": tanh + ("gelu",), "hidden_activation": tanh} if kind == "gemma" else \
        {"hidden_activation": tanh} if gemma else {"hidden_act": ("relu2",)} if kind == "arcee" else \
        {"hidden_act": tanh} if kind == "starcoder2" else {"hidden_act": ("silu",)}
    for key, acts in checks.items():
        act = d.get(key) or acts[0]
        if act not in acts:
            raise bad(f"{key} {act!r} is not supported (only {', '.join(map(repr, acts))}: "
                      f"{'GeGLU with GELU-tanh' if gemma else MLP_NAMES.get(kind, 'SwiGLU')})")
    if d.get("qk_layernorm"):  # (StableLM's other options)
        raise bad("qk_layernorm=true is not supported (StableLM's LayerNorm per head on q and k: fastllm's QK-norm "
                  "is an RMSNorm)")
    if d.get("use_parallel_residual"):
        raise bad("use_parallel_residual=true is not supported for stablelm (its attention and MLP side by side read "
                  "one norm, input_layernorm; fastllm's parallel residual, GPT-NeoX's, has one per branch)")
    if d.get("use_bidirectional_attention"):
        raise bad("use_bidirectional_attention=true is not supported (fastllm's attention is causal)")
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    partial = d.get("partial_rotary_factor", params.get("partial_rotary_factor", {"stablelm": 0.25, "glm": 0.5,
                                                                                  "glm4": 0.5}.get(kind, 1.0)))
    if partial != 1.0 and kind not in ("phi3", "stablelm", *GLMS):  # (transformers' Llama code turns whole heads)
        raise bad(f"partial_rotary_factor={partial} is not supported for {kind} (only phi3's, stablelm's and the "
                  f"GLMs')")
    context = d["max_position_embeddings"]
    window, layer_types = _sliding(d, kind, L, bad)
    if window is not None and window >= context:  # a window as long as the context is full attention
        window, layer_types = None, None
    attention_bias = d.get("attention_bias", kind in GLMS)  # (the families' transformers defaults, as below)
    mlp_bias = d.get("mlp_bias", False)
    if kind in ("mistral", "qwen2", "phi3", "exaone4", "ministral") and attention_bias:
        raise bad(f"attention_bias={attention_bias!r} is not supported for {kind} (transformers' {kind} has "
                  f"{'q/k/v biases only' if kind == 'qwen2' else 'no attention biases'})")
    if kind not in ("llama", "smollm3", "arcee", "granite") and mlp_bias:
        raise bad(f"mlp_bias={mlp_bias!r} is not supported for {kind} (its MLP has no biases)")
    for key, value in (("attention_bias", attention_bias), ("mlp_bias", mlp_bias)):
        if not isinstance(value, bool):
            raise bad(f"{key} must be true or false, got {value!r}")
    theta, scaling, local_theta = _layer_type_rope(d, kind, bad) if kind in ("gemma3_text", "olmo3") else \
        (*_rope(d, bad, DEFAULT_THETA.get(kind, 1e4)), None)
    rope_type = scaling and scaling.get("rope_type", scaling.get("type"))
    if rope_type == "longrope":  # LongRoPE's short factors hold up to the original context; fastllm stops there
        context = min(context, int(scaling["original_max_position_embeddings"]))
        scaling["attention_factor"] = attention_scaling(scaling)  # (from the full context's factor: kept on save)
    head_dim, n_kv = d.get("head_dim", 256 if gemma else None), d.get("num_key_value_heads")
    if kind == "stablelm":  # (transformers' StableLM reads no head_dim: hidden_size / num_attention_heads)
        head_dim = None
    if isinstance(C, int) and isinstance(NH, int) and NH > 0 and C % NH == 0 and head_dim == C // NH:
        head_dim = None  # the defaults: keep the config canonical
    if n_kv == NH:
        n_kv = None
    qkv_bias = True if kind == "qwen2" else d.get("use_qkv_bias", False) if kind == "stablelm" else attention_bias
    if kind in ("starcoder2", "ernie4_5"):  # (one use_bias for every projection)
        qkv_bias = mlp_bias = attention_bias = bool(d.get("use_bias", kind == "starcoder2"))
    proj_bias = attention_bias and kind not in ("qwen2", *GLMS)  # (their attention_bias: q, k, v only)
    cfg = dict(
        block_size=context, vocab_size=d["vocab_size"], n_layer=L, n_head=NH, n_embd=C,
        layernorm_eps=_positive_number(d, EPS_KEYS.get(kind, "rms_norm_eps"), 1e-6 if kind not in EPS_KEYS else 1e-5,
                                       bad), n_kv_head=n_kv,
        head_dim=head_dim, positions="rope", rope_theta=theta, rope_scaling=scaling, norm="rmsnorm", mlp="swiglu",
        mlp_hidden=d["intermediate_size"], qkv_bias=qkv_bias, proj_bias=proj_bias,
        mlp_bias=mlp_bias, qk_norm=kind in ("qwen3", "gemma3_text", "exaone4", *OLMOS),
        tie_embeddings=bool(d.get("tie_word_embeddings", gemma or kind in TIED)), sliding_window=window,
        layer_types=layer_types, rope_local_theta=local_theta, partial_rotary_factor=partial,
    )
    if kind in (*OLMOS, "exaone4"):  # norms after each branch instead of before it; OLMo's QK-norm over all q (k)
        cfg.update(pre_norms=False, post_norms=True, qk_norm_over="head" if kind == "exaone4" else "all")
    if kind == "exaone4" and d.get("sliding_window") is not None:  # (then its full-attention layers have no RoPE)
        full = [i for i, k in enumerate(_layer_kinds(d, kind, L, bad)) if k == "full_attention"]
        cfg.update(nope_layers=full or None)
    if kind == "arcee":
        cfg.update(mlp="relu2")
    if kind == "glm4":  # a norm after each branch too
        cfg.update(post_norms=True)
    if kind in EPS_KEYS:  # StableLM, StarCoder2: LayerNorms (weight and bias); StarCoder2's MLP: GELU-tanh, no gate
        cfg.update(norm="layernorm", **(dict(mlp="gelu") if kind == "starcoder2" else {}))
    if kind == "granite":  # (1 maps to None, fastllm's "none"; the scores' scale is 1 unless it says otherwise)
        def scale(key: str, none: float) -> float | None:
            v = _positive_number(d, key, 1.0, bad)
            return None if v == none else v

        cfg.update(embed_scale=scale("embedding_multiplier", 1.0),
                   attn_scale=scale("attention_multiplier", (head_dim or C // NH) ** -0.5),
                   residual_scale=scale("residual_multiplier", 1.0), logits_scaling=scale("logits_scaling", 1.0))
    if kind == "smollm3":
        cfg.update(nope_layers=_nope_layers(d, L, bad) or None)
    if gemma:  # GeGLU, embeddings times sqrt(hidden_size); Gemma 2 and 3: norms after each branch too
        cfg.update(mlp="geglu", embed_scale=float(C) ** 0.5, post_norms=kind != "gemma")
    if kind in ("gemma2", "gemma3_text"):  # soft caps (transformers' defaults: Gemma 2's 50 and 30), query scale
        two = kind == "gemma2"
        scalar = _positive_number(d, "query_pre_attn_scalar", 256, bad)
        # (transformers' Gemma 3 reads attn_logit_softcapping but does not apply it: Gemma 3 has no score cap)
        cfg.update(attn_softcap=_optional_positive(d, "attn_logit_softcapping", 50.0, bad) if two else None,
                   logit_softcap=_optional_positive(d, "final_logit_softcapping", 30.0 if two else None, bad),
                   attn_scale=None if scalar == (head_dim or C // NH) else scalar ** -0.5)
    return cfg


def _optional_positive(d: dict, key: str, default, bad) -> float | None:
    return None if d.get(key, default) is None else _positive_number(d, key, default, bad)


def _layer_type_rope(d: dict, kind: str, bad) -> tuple[float, dict | None, float | None]:
    """Gemma 3's and OLMo 3's (rope_theta, rope_scaling) of the full-attention layers and the RoPE base of the sliding
    ones (unscaled; None: the same tables): transformers 5's rope_parameters {"full_attention": ...,
    "sliding_attention": ...}, or 4's rope_theta + rope_scaling (+ Gemma 3's rope_local_base_freq; OLMo 3's sliding
    layers take rope_theta)."""
    params, default = d.get("rope_parameters"), DEFAULT_THETA[kind]
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & set(params):
        full, local = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        theta, scaling = _rope({"max_position_embeddings": d["max_position_embeddings"], "rope_parameters": full},
                               bad, default)
        local_theta, local_scaling = _rope({"max_position_embeddings": d["max_position_embeddings"],
                                            "rope_parameters": local}, bad, theta if kind == "olmo3" else 1e4)
        if kind == "olmo3" and (local_theta, local_scaling) == (theta, scaling):
            return theta, scaling, None  # every layer the same (scaled) tables
        if local_scaling is not None:
            raise bad(f"rope_parameters.sliding_attention {local} is not supported (only the default RoPE)")
    else:
        theta, scaling = _rope(d, bad, default)
        local_theta = theta if kind == "olmo3" else _positive_number(d, "rope_local_base_freq", 10000.0, bad)
    if kind == "olmo3" and local_theta == theta and scaling is None:
        local_theta = None  # the same tables on every layer
    return theta, scaling, local_theta


def model_type(cfg: GPTConfig, prefer: str | None = None) -> str:
    """The transformers model_type that computes what `cfg` computes (ValueError naming the option when none
    does): gpt2 for GPT-2's choices; llama, qwen2 (q/k/v biases only) or qwen3 (QK-norm) for RoPE + RMSNorm +
    SwiGLU; mistral or phi3 instead of llama when `prefer` says so (a model loaded from such a folder) and it has
    no biases (phi3: and no RoPE scaling); smollm3 for NoPE layers, phi3 for partial rotary dims, arcee for relu2,
    granite for scaled embeddings, scores, residual branches or logits; gemma* for GeGLU; olmo2 / olmo3 (sliding
    layers) for post-norms without pre-norms and QK-norm over all heads, exaone4 with QK-norm per head."""
    if cfg.parallel_residual or cfg.mlp == "gelu_erf" or (prefer == "gpt_neox" and not _neox_differences(cfg)):
        return _family("gpt_neox", f"parallel_residual={cfg.parallel_residual}, mlp={cfg.mlp!r} (GPT-NeoX)",
                       _neox_differences(cfg))
    gpt2 = dict(positions="learned", norm="layernorm", mlp="gelu", qkv_bias=True, proj_bias=True, mlp_bias=True,
                qk_norm=False, tie_embeddings=True, logit_softcap=None, n_kv_head=None, head_dim=None,
                mlp_hidden=None, embed_scale=None, pre_norms=True, post_norms=False, attn_scale=None,
                attn_softcap=None, sliding_window=None, residual_scale=None, logits_scaling=None)  # fmt: skip
    if cfg.positions == "learned":
        diff = [f"{k}={getattr(cfg, k)!r}" for k, v in gpt2.items() if getattr(cfg, k) != v and
                not (k == "n_kv_head" and cfg.kv_heads == cfg.n_head) and
                not (k == "mlp_hidden" and cfg.mlp_width == 4 * cfg.n_embd) and
                not (k == "head_dim" and cfg.head_size * cfg.n_head == cfg.n_embd)]
        if diff:
            raise ValueError(f"no transformers architecture computes this config: learned positions (GPT-2) with "
                             f"{', '.join(diff)}")
        return "gpt2"
    if cfg.mlp == "geglu":
        return _gemma_type(cfg)
    if cfg.post_norms and cfg.pre_norms:
        return _glm4_type(cfg)
    if cfg.post_norms or not cfg.pre_norms or cfg.qk_norm_over == "all":
        return _olmo_type(cfg, prefer)
    if cfg.norm == "layernorm":
        return _layernorm_type(cfg)
    if cfg.embed_scale or cfg.residual_scale or cfg.logits_scaling or prefer == "granite" or \
            (cfg.attn_scale is not None and cfg.attn_scale != cfg.head_size ** -0.5):
        return _granite_type(cfg)
    for key, want in (("norm", "rmsnorm"), ("mlp", "relu2" if cfg.mlp == "relu2" else "swiglu"),
                      ("logit_softcap", None), ("embed_scale", None), ("post_norms", False), ("attn_softcap", None),
                      ("rope_local_theta", None)):
        if getattr(cfg, key) != want:
            raise ValueError(f"no transformers architecture computes this config: rope with {key}="
                             f"{getattr(cfg, key)!r} (Llama, Mistral, Qwen and Phi-3 need {key}={want!r})")
    if cfg.attn_scale is not None and cfg.attn_scale != cfg.head_size ** -0.5:
        raise ValueError(f"no transformers architecture computes this config: attn_scale={cfg.attn_scale} with "
                         f"swiglu (Llama, Mistral, Qwen and Phi-3 scale by 1/sqrt(head_size))")
    if cfg.mlp == "relu2":
        return _arcee_type(cfg)
    if cfg.nope_layers or prefer == "smollm3":  # (SmolLM3: any sliding layers, with layer_types)
        return _smollm3_type(cfg)
    kind = _llama_type(cfg, prefer)
    if prefer == "ernie4_5" and kind == "llama" and cfg.qkv_bias == cfg.mlp_bias and cfg.sliding_window is None and \
            cfg.partial_rotary_factor == 1.0:
        return "ernie4_5"  # (a model loaded from such a folder: the same function as Llama's, saved as it came)
    glm = not (cfg.qk_norm or cfg.proj_bias or cfg.mlp_bias or cfg.sliding_window)  # (GLM's: any rotary part)
    if glm and prefer == "glm":
        return "glm"
    if cfg.partial_rotary_factor != 1.0 and kind != "phi3":
        kind = _llama_type(cfg, "phi3")
        if kind != "phi3" and glm:  # (q/k/v biases or a RoPE scaling Phi-3 has not: GLM's)
            return "glm"
        if kind != "phi3":
            raise ValueError(f"no transformers architecture computes this config: partial_rotary_factor="
                             f"{cfg.partial_rotary_factor} with biases or rope_scaling "
                             f"{(cfg.rope_scaling or {}).get('rope_type')} (Phi-3 has neither)")
    sliding = [cfg.window(layer) is not None for layer in range(cfg.n_layer)]
    if cfg.sliding_window is not None:
        if kind in ("qwen2", "qwen3"):  # sliding from max_window_layers on (transformers 4 can say no other)
            if sliding != sorted(sliding):
                raise ValueError(f"no transformers architecture computes this config: layer_types {cfg.layer_types} "
                                 "(Qwen's sliding layers are the last ones)")
        elif kind == "llama" and not (cfg.qkv_bias or cfg.mlp_bias):
            kind = "mistral" if all(sliding) else "ministral"  # (Ministral: sliding layers as layer_types lists)
        elif kind == "llama" or not all(sliding):
            raise ValueError(f"no transformers architecture computes this config: sliding_window={cfg.sliding_window}"
                             f" on layers {[i for i, s in enumerate(sliding) if s]} of a Llama-family model")
    return kind


def _differences(cfg: GPTConfig, want: dict) -> list[str]:
    """"key=value" for each option of cfg that differs from want's."""
    return [f"{k}={getattr(cfg, k)!r}" for k, v in want.items() if getattr(cfg, k) != v]


def _family(kind: str, what: str, diff: list[str]) -> str:
    """kind, where no option differs from the family's (diff: _differences'); else ValueError naming them and
    `what` led to the family."""
    if diff:
        raise ValueError(f"no transformers architecture computes this config: {what} with {', '.join(diff)}")
    return kind


def _neox_differences(cfg: GPTConfig) -> list[str]:
    """The options of cfg GPT-NeoX has not (_differences')."""
    want = dict(positions="rope", norm="layernorm", mlp_bias=True, proj_bias=cfg.qkv_bias, qk_norm=False,
                logit_softcap=None, embed_scale=None, pre_norms=True, post_norms=False, attn_softcap=None,
                sliding_window=None, rope_local_theta=None, nope_layers=None, residual_scale=None,
                logits_scaling=None)
    diff = _differences(cfg, want)
    if cfg.mlp not in NEOX_ACTIVATIONS.values():
        diff.append(f"mlp={cfg.mlp!r}")
    if cfg.kv_heads != cfg.n_head or cfg.head_size * cfg.n_head != cfg.n_embd:
        diff.append(f"n_kv_head={cfg.n_kv_head!r}, head_dim={cfg.head_dim!r}")
    if cfg.attn_scale is not None and cfg.attn_scale != cfg.head_size ** -0.5:
        diff.append(f"attn_scale={cfg.attn_scale!r}")
    return diff


def _olmo_type(cfg: GPTConfig, prefer: str | None) -> str:
    """olmo2, olmo3 (sliding layers, a RoPE of their own) or exaone4 (QK-norm per head, no biases, no RoPE on the
    full layers where some slide) for a config with norms after each branch only."""
    exaone = cfg.qk_norm_over == "head"
    full = [layer for layer in range(cfg.n_layer) if cfg.window(layer) is None]
    want = dict(norm="rmsnorm", mlp="swiglu", pre_norms=False, post_norms=True, qk_norm=True, mlp_bias=False,
                proj_bias=cfg.qkv_bias, logit_softcap=None, embed_scale=None, attn_softcap=None,
                partial_rotary_factor=1.0, residual_scale=None, logits_scaling=None)
    if exaone:
        want.update(qkv_bias=False, rope_local_theta=None, nope_layers=(full or None) if cfg.sliding_window else None)
    else:
        want.update(nope_layers=None)
    diff = _differences(cfg, want)
    if cfg.attn_scale is not None and cfg.attn_scale != cfg.head_size ** -0.5:
        diff.append(f"attn_scale={cfg.attn_scale!r}")
    olmo3 = cfg.sliding_window is not None or cfg.rope_local_theta is not None or prefer == "olmo3"
    return _family("exaone4" if exaone else "olmo3" if olmo3 else "olmo2",
                   f"post_norms={cfg.post_norms}, pre_norms={cfg.pre_norms}, qk_norm_over={cfg.qk_norm_over!r} "
                   f"({'EXAONE 4' if exaone else 'OLMo 2/3'})", diff)


def _glm4_type(cfg: GPTConfig) -> str:
    """glm4 for a SwiGLU config with norms before and after each branch (Gemma 2's are GeGLU's)."""
    want = dict(norm="rmsnorm", mlp="swiglu", qk_norm=False, proj_bias=False, mlp_bias=False, logit_softcap=None,
                embed_scale=None, attn_softcap=None, attn_scale=None, sliding_window=None, nope_layers=None,
                rope_local_theta=None, residual_scale=None, logits_scaling=None)
    return _family("glm4", f"pre_norms and post_norms with mlp={cfg.mlp!r} (GLM-4)", _differences(cfg, want))


def _layernorm_type(cfg: GPTConfig) -> str:
    """stablelm (SwiGLU, q/k/v biases or none) or starcoder2 (GELU-tanh, every bias or none) for a RoPE config with
    LayerNorms."""
    starcoder = cfg.mlp == "gelu"
    want = dict(qk_norm=False, logit_softcap=None, embed_scale=None, attn_softcap=None, attn_scale=None,
                nope_layers=None, rope_local_theta=None, residual_scale=None, logits_scaling=None)
    if starcoder:
        want.update(proj_bias=cfg.qkv_bias, mlp_bias=cfg.qkv_bias, partial_rotary_factor=1.0)
        sliding = [cfg.window(layer) is not None for layer in range(cfg.n_layer)]
        if any(sliding) and not all(sliding):
            want.update(layer_types=None)
    else:
        want.update(mlp="swiglu", proj_bias=False, mlp_bias=False, sliding_window=None)
    if _differences(cfg, want) and not _neox_differences(cfg):  # (GPT-NeoX's sequential form computes it)
        return "gpt_neox"
    return _family("starcoder2" if starcoder else "stablelm", f"norm='layernorm' with rope and mlp={cfg.mlp!r} "
                   f"({'StarCoder2' if starcoder else 'StableLM'})", _differences(cfg, want))


def _granite_type(cfg: GPTConfig) -> str:
    """granite for a Llama config with scaled embeddings, scores, residual branches or logits."""
    want = dict(norm="rmsnorm", mlp="swiglu", qk_norm=False, proj_bias=cfg.qkv_bias, logit_softcap=None,
                attn_softcap=None, sliding_window=None, nope_layers=None, partial_rotary_factor=1.0,
                rope_local_theta=None)
    return _family("granite", f"embed_scale={cfg.embed_scale}, attn_scale={cfg.attn_scale}, residual_scale="
                   f"{cfg.residual_scale}, logits_scaling={cfg.logits_scaling} (Granite)", _differences(cfg, want))


def _arcee_type(cfg: GPTConfig) -> str:
    """arcee for a Llama config with a relu2 MLP (no gate)."""
    want = dict(qk_norm=False, proj_bias=cfg.qkv_bias, partial_rotary_factor=1.0, nope_layers=None,
                sliding_window=None)
    return _family("arcee", "mlp='relu2' (Arcee)", _differences(cfg, want))


def _smollm3_type(cfg: GPTConfig) -> str:
    """smollm3 for a Llama config with layers without RoPE."""
    want = dict(norm="rmsnorm", mlp="swiglu", qk_norm=False, proj_bias=cfg.qkv_bias, partial_rotary_factor=1.0)
    return _family("smollm3", f"nope_layers={cfg.nope_layers} (SmolLM3)", _differences(cfg, want))


def _gemma_type(cfg: GPTConfig) -> str:
    """gemma, gemma2 (norms after each branch) or gemma3_text (and QK-norm) for a GeGLU config."""
    want = dict(positions="rope", norm="rmsnorm", mlp_bias=False, proj_bias=cfg.qkv_bias,
                post_norms=cfg.qk_norm or cfg.post_norms, pre_norms=True, qk_norm_over="head", nope_layers=None,
                partial_rotary_factor=1.0, residual_scale=None, logits_scaling=None)
    diff = _differences(cfg, want)
    if cfg.embed_scale is None or not math.isclose(cfg.embed_scale, cfg.n_embd ** 0.5, rel_tol=1e-6):
        diff.append(f"embed_scale={cfg.embed_scale!r} (Gemma's is sqrt(n_embd) = {cfg.n_embd ** 0.5:.6g})")
    kind = "gemma3_text" if cfg.qk_norm else "gemma2" if cfg.post_norms else "gemma"
    if kind == "gemma":
        diff += [f"{k}={getattr(cfg, k)!r}" for k in ("logit_softcap", "attn_softcap", "attn_scale", "sliding_window")
                 if getattr(cfg, k) is not None]
    if kind != "gemma3_text" and cfg.rope_local_theta is not None:
        diff.append(f"rope_local_theta={cfg.rope_local_theta!r}")
    if kind == "gemma3_text" and cfg.attn_softcap is not None:  # (transformers' Gemma 3 would not apply it)
        diff.append(f"attn_softcap={cfg.attn_softcap!r} and qk_norm")
    return _family(kind, "geglu (Gemma)", diff)


def _llama_type(cfg: GPTConfig, prefer: str | None) -> str:
    if cfg.qk_norm:
        if cfg.qkv_bias != cfg.proj_bias or cfg.mlp_bias:
            raise ValueError("no transformers architecture computes this config: qk_norm (Qwen3) with qkv_bias="
                             f"{cfg.qkv_bias}, proj_bias={cfg.proj_bias}, mlp_bias={cfg.mlp_bias} (Qwen3 has one "
                             "attention_bias for q, k, v and o, and no MLP biases)")
        return "qwen3"
    if cfg.qkv_bias and not cfg.proj_bias and not cfg.mlp_bias:
        return "qwen2"
    if cfg.qkv_bias != cfg.proj_bias:
        raise ValueError(f"no transformers architecture computes this config: qkv_bias={cfg.qkv_bias} with "
                         f"proj_bias={cfg.proj_bias} (Llama has one attention_bias for q, k, v and o)")
    if prefer == "mistral" and not (cfg.qkv_bias or cfg.mlp_bias):
        return "mistral"
    rope_type = (cfg.rope_scaling or {}).get("rope_type", "default")
    if prefer == "phi3" and not (cfg.qkv_bias or cfg.mlp_bias) and rope_type in ("default", "longrope"):
        return "phi3"
    return "llama"


def config_to_hf(cfg: GPTConfig, eos_token_id: int | list[int] | None = None, bos_token_id: int | None = None,
                 prefer: str | None = None) -> dict:
    """The config.json dict transformers needs for `cfg` (see model_type; no dropout: fastllm has none)."""
    kind = model_type(cfg, prefer)
    if kind == "gpt2":
        if eos_token_id is None and cfg.vocab_size == 50257:
            eos_token_id = 50256  # GPT-2's <|endoftext|>
        return {
            "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
            "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "n_positions": cfg.block_size,
            "n_ctx": cfg.block_size, "n_inner": None, "vocab_size": cfg.vocab_size,
            "layer_norm_epsilon": cfg.layernorm_eps, "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
            "initializer_range": 0.02, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False, "tie_word_embeddings": True, "use_cache": True,
            "bos_token_id": eos_token_id if bos_token_id is None else bos_token_id, "eos_token_id": eos_token_id,
            "fastllm_version": __version__,
        }  # fmt: skip
    if kind == "gpt_neox":  # transformers 4's rotary keys and 5's rope_parameters (5 reads the latter)
        return {
            "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_width, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "max_position_embeddings": cfg.block_size,
            "hidden_act": "gelu" if cfg.mlp == "gelu_erf" else "gelu_new", "layer_norm_eps": cfg.layernorm_eps,
            "rotary_pct": cfg.partial_rotary_factor, "rotary_emb_base": cfg.rope_theta,
            **({"rope_scaling": cfg.rope_scaling} if cfg.rope_scaling else {}),
            "rope_parameters": {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta,
                                "partial_rotary_factor": cfg.partial_rotary_factor},
            "use_parallel_residual": cfg.parallel_residual, "attention_bias": cfg.qkv_bias,
            "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0, "hidden_dropout": 0.0,
            "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32", "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id, "fastllm_version": __version__,
        }  # fmt: skip
    d = {
        "architectures": [ARCHITECTURES[kind][0]], "model_type": kind, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_width, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.layernorm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "fastllm_version": __version__,
    }  # fmt: skip
    kinds = ["full_attention" if cfg.window(layer) is None else "sliding_attention" for layer in range(cfg.n_layer)]
    if kind == "llama":
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    elif kind == "mistral":
        d.update(sliding_window=cfg.sliding_window)
    elif kind == "phi3":
        d.update(sliding_window=cfg.sliding_window, original_max_position_embeddings=cfg.block_size, resid_pdrop=0.0,
                 embd_pdrop=0.0, pad_token_id=None,  # (Phi3Config's default pad id, 32000, is past a smaller vocab)
                 partial_rotary_factor=cfg.partial_rotary_factor)
    elif kind == "smollm3":  # no_rope_layers: 1 where a layer has RoPE; sliding layers as layer_types says
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, use_sliding_window=cfg.sliding_window is not None,
                 sliding_window=cfg.sliding_window, layer_types=kinds, pad_token_id=None,
                 no_rope_layers=[int(cfg.has_rope(layer)) for layer in range(cfg.n_layer)])
    elif kind == "exaone4":  # (with a sliding_window, transformers gives its full layers no RoPE)
        d.update(sliding_window=cfg.sliding_window, layer_types=kinds, sliding_window_pattern=None)
    elif kind == "arcee":
        d.update(hidden_act="relu2", attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    elif kind == "ernie4_5":
        d.update(use_bias=cfg.qkv_bias)
    elif kind in GLMS:
        d.update(attention_bias=cfg.qkv_bias, partial_rotary_factor=cfg.partial_rotary_factor, pad_token_id=None)
    elif kind == "ministral":
        d.update(sliding_window=cfg.sliding_window, layer_types=kinds)
    elif kind in EPS_KEYS:  # LayerNorms: their epsilon under the family's key
        del d["rms_norm_eps"]
        d[EPS_KEYS[kind]] = cfg.layernorm_eps
        if kind == "stablelm":
            d.update(use_qkv_bias=cfg.qkv_bias, qk_layernorm=False, use_parallel_residual=False,
                     partial_rotary_factor=cfg.partial_rotary_factor)
        else:
            d.update(hidden_act="gelu_pytorch_tanh", use_bias=cfg.qkv_bias, sliding_window=cfg.sliding_window)
    elif kind == "granite":
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, embedding_multiplier=cfg.embed_scale or 1.0,
                 attention_multiplier=cfg.attn_scale or cfg.head_size ** -0.5,
                 residual_multiplier=cfg.residual_scale or 1.0, logits_scaling=cfg.logits_scaling or 1.0)
    elif kind in OLMOS:
        d.update(attention_bias=cfg.qkv_bias, pad_token_id=None)  # (Olmo2Config's default pad id 1: a real token)
        if kind == "olmo3":  # (transformers builds a sliding mask even with no sliding layer: give it the context)
            d.update(sliding_window=cfg.sliding_window or cfg.block_size, layer_types=kinds)
            # RoPE per layer type, as transformers 5 keeps it (from transformers 4's rope_theta + rope_scaling keys it
            # gives the sliding layers its default base, 5e5, whatever rope_theta says: OLMo 3's own)
            full = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
            local = full if cfg.rope_local_theta is None else \
                {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
            d.update(rope_parameters={"full_attention": full, "sliding_attention": local})
            del d["rope_theta"], d["rope_scaling"]
    elif kind in ("qwen2", "qwen3"):  # sliding from max_window_layers on, if at all
        first = kinds.index("sliding_attention") if cfg.sliding_window is not None else cfg.n_layer
        d.update(use_sliding_window=first < cfg.n_layer, sliding_window=cfg.sliding_window, max_window_layers=first,
                 layer_types=kinds)
        if kind == "qwen3":
            d.update(attention_bias=cfg.qkv_bias)
    else:  # gemma, gemma2, gemma3_text
        d.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", attention_bias=cfg.qkv_bias)
        if kind != "gemma":  # (transformers builds a sliding mask even with no sliding layer: give it the context)
            scalar = cfg.head_size if cfg.attn_scale is None else cfg.attn_scale ** -2
            d.update(query_pre_attn_scalar=round(scalar) if math.isclose(scalar, round(scalar)) else scalar,
                     sliding_window=cfg.sliding_window or cfg.block_size, layer_types=kinds,
                     final_logit_softcapping=cfg.logit_softcap)
            if kind == "gemma2":
                d.update(attn_logit_softcapping=cfg.attn_softcap)
        if kind == "gemma3_text":
            d.update(rope_local_base_freq=cfg.rope_local_theta or cfg.rope_theta)
    return d


# ---- the tensor map --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where an HF tensor lives in fastllm's parameters: p[param][layer][rows] (the whole tensor when layer or
    rows is None), transposed for GPT-2's Conv1D weights; fastllm's value is the file's plus `offset` (Gemma's norms
    multiply by 1 + weight: fastllm keeps that gain)."""

    param: str
    layer: int | None = None
    rows: tuple[int, int] | None = None
    transpose: bool = False
    offset: float = 0.0
    perm: tuple[int, ...] | None = None  # fastllm's rows are the file's rows[perm] (interleaved RoPE: INTERLEAVED)

    def view(self, p: dict) -> np.ndarray:
        """fastllm's region for the tensor (in fastllm's row order)."""
        v = p[self.param] if self.layer is None else p[self.param][self.layer]
        v = v if self.rows is None else v[self.rows[0]:self.rows[1]]
        return v.T if self.transpose else v

    def hf(self, p: dict) -> np.ndarray:
        """view(p) with its rows in the file's order (the offset not undone: a gradient's layout too)."""
        return self.view(p) if self.perm is None else self.view(p)[np.argsort(self.perm)]


def _pairs_to_halves(heads: int, head_size: int, rotary: int) -> tuple[int, ...]:
    """The row order that turns RoPE on interleaved pairs (2i, 2i+1) into rotate-half pairs (i, i + rotary/2): per
    head its first `rotary` rows even ones first, then odd ones, the rest as they are. q.k is the same in either
    order, so the model computes what the file's computes."""
    head = [*range(0, rotary, 2), *range(1, rotary, 2), *range(rotary, head_size)]
    return tuple(h * head_size + r for h in range(heads) for r in head)


def tensor_map(cfg: GPTConfig, prefer: str | None = None) -> dict[str, Slot]:
    """HF tensor name -> Slot for every tensor of the config's transformers model (lm_head.weight only when
    untied), in the order transformers writes them; `prefer` as model_type's."""
    kind, L = model_type(cfg, prefer), cfg.n_layer  # (Mistral's names are Llama's; Phi-3 fuses q|k|v and gate|up)
    out: dict[str, Slot] = {}
    if kind == "gpt2":
        out["transformer.wte.weight"] = Slot("wte")
        out["transformer.wpe.weight"] = Slot("wpe")
        for layer in range(L):
            for name in ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
                         "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                         "mlp.c_proj.weight", "mlp.c_proj.bias"):  # fmt: skip
                conv1d = name.endswith(".weight") and not name.startswith("ln_")  # (in, out) in the file
                out[f"transformer.h.{layer}.{name}"] = Slot(name, layer, transpose=conv1d)
        out["transformer.ln_f.weight"] = Slot("ln_f.weight")
        out["transformer.ln_f.bias"] = Slot("ln_f.bias")
        return out
    if kind == "gpt_neox":
        return _neox_tensor_map(cfg)
    NH, NKV, hd, H = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.mlp_width
    qkv = {"q": (0, NH * hd), "k": (NH * hd, (NH + NKV) * hd), "v": ((NH + NKV) * hd, (NH + 2 * NKV) * hd)}
    gemma = kind in GEMMAS
    norm = 1.0 if gemma else 0.0  # the offset of every norm's weight
    out["model.embed_tokens.weight"] = Slot("wte")
    for layer in range(L):
        pre = f"model.layers.{layer}."
        if cfg.pre_norms:  # (OLMo 2/3 have none)
            out[pre + "input_layernorm.weight"] = Slot("ln_1.weight", layer, offset=norm)
            if cfg.norm == "layernorm":  # (StableLM, StarCoder2)
                out[pre + "input_layernorm.bias"] = Slot("ln_1.bias", layer)
        fused_mlp = {pre + "post_attention_layernorm.weight": Slot("ln_2.weight", layer),  # (Phi-3, GLM-4: the MLP's
                     pre + "mlp.gate_up_proj.weight": Slot("mlp.c_fc.weight", layer),  # pre-norm; gate|up rows in
                     pre + "mlp.down_proj.weight": Slot("mlp.c_proj.weight", layer)}  # one tensor, fastllm's layout)
        if kind == "phi3":  # fastllm's own layout: q|k|v rows, gate|up rows
            out[pre + "self_attn.qkv_proj.weight"] = Slot("attn.c_attn.weight", layer)
            out[pre + "self_attn.o_proj.weight"] = Slot("attn.c_proj.weight", layer)
            out.update(fused_mlp)
            continue
        for x, rows in qkv.items():
            heads = {"q": NH, "k": NKV}.get(x) if kind in INTERLEAVED else None
            perm = _pairs_to_halves(heads, hd, cfg.rotary_dims) if heads else None
            out[pre + f"self_attn.{x}_proj.weight"] = Slot("attn.c_attn.weight", layer, rows, perm=perm)
            if cfg.qkv_bias:
                out[pre + f"self_attn.{x}_proj.bias"] = Slot("attn.c_attn.bias", layer, rows, perm=perm)
        if cfg.qk_norm:
            out[pre + "self_attn.q_norm.weight"] = Slot("attn.q_norm.weight", layer, offset=norm)
            out[pre + "self_attn.k_norm.weight"] = Slot("attn.k_norm.weight", layer, offset=norm)
        out[pre + "self_attn.o_proj.weight"] = Slot("attn.c_proj.weight", layer)
        if cfg.proj_bias:
            out[pre + "self_attn.o_proj.bias"] = Slot("attn.c_proj.bias", layer)
        if kind in GLMS:  # (GLM-4-0414: post-norms of their own names)
            if kind == "glm4":
                out[pre + "post_self_attn_layernorm.weight"] = Slot("attn.post_norm.weight", layer)
            out.update(fused_mlp)
            if kind == "glm4":
                out[pre + "post_mlp_layernorm.weight"] = Slot("mlp.post_norm.weight", layer)
            continue
        if cfg.post_norms:  # Gemma 2/3, OLMo 2/3: post_attention_layernorm is the attention's post-norm
            out[pre + "post_attention_layernorm.weight"] = Slot("attn.post_norm.weight", layer, offset=norm)
            if cfg.pre_norms:
                out[pre + "pre_feedforward_layernorm.weight"] = Slot("ln_2.weight", layer, offset=norm)
        else:
            out[pre + "post_attention_layernorm.weight"] = Slot("ln_2.weight", layer, offset=norm)
            if cfg.norm == "layernorm":
                out[pre + "post_attention_layernorm.bias"] = Slot("ln_2.bias", layer)
        # the MLP: gate_proj|up_proj rows of c_fc (gated), up_proj alone (Arcee), or StarCoder2's c_fc; down_proj
        fc = (("gate_proj", (0, H)), ("up_proj", (H, 2 * H))) if cfg.mlp in GATED else \
            (("c_fc", None),) if kind == "starcoder2" else (("up_proj", None),)
        down = "c_proj" if kind == "starcoder2" else "down_proj"
        for x, rows in fc:
            out[pre + f"mlp.{x}.weight"] = Slot("mlp.c_fc.weight", layer, rows)
            if cfg.mlp_bias:
                out[pre + f"mlp.{x}.bias"] = Slot("mlp.c_fc.bias", layer, rows)
        out[pre + f"mlp.{down}.weight"] = Slot("mlp.c_proj.weight", layer)
        if cfg.mlp_bias:
            out[pre + f"mlp.{down}.bias"] = Slot("mlp.c_proj.bias", layer)
        if cfg.post_norms:
            out[pre + "post_feedforward_layernorm.weight"] = Slot("mlp.post_norm.weight", layer, offset=norm)
    out["model.norm.weight"] = Slot("ln_f.weight", offset=norm)
    if cfg.norm == "layernorm":
        out["model.norm.bias"] = Slot("ln_f.bias")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = Slot("lm_head.weight")
    return out


def _heads_to_blocks(heads: int, head_size: int) -> tuple[int, ...]:
    """The row order that turns GPT-NeoX's query_key_value rows, per head [q k v] ((heads, 3, head_size) rows), into
    fastllm's [q | k | v] ((3, heads, head_size)): fastllm's row (part, head, r) is the file's (head, part, r)."""
    return tuple(h * 3 * head_size + part * head_size + r
                 for part in range(3) for h in range(heads) for r in range(head_size))


def _neox_tensor_map(cfg: GPTConfig) -> dict[str, Slot]:
    """GPT-NeoX's names (GPTNeoXForCausalLM as transformers writes it: the untied head is embed_out)."""
    out = {"gpt_neox.embed_in.weight": Slot("wte")}
    perm = _heads_to_blocks(cfg.n_head, cfg.head_size)
    names = {"input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "attention.query_key_value": "attn.c_attn",
             "attention.dense": "attn.c_proj", "mlp.dense_h_to_4h": "mlp.c_fc", "mlp.dense_4h_to_h": "mlp.c_proj"}
    for layer in range(cfg.n_layer):
        for theirs, ours in names.items():
            for part in ("weight", "bias"):
                if f"{ours}.{part}" in ("attn.c_attn.bias", "attn.c_proj.bias") and not cfg.qkv_bias:
                    continue
                rows = perm if ours == "attn.c_attn" else None
                out[f"gpt_neox.layers.{layer}.{theirs}.{part}"] = Slot(f"{ours}.{part}", layer, perm=rows)
    out.update({"gpt_neox.final_layer_norm.weight": Slot("ln_f.weight"),
                "gpt_neox.final_layer_norm.bias": Slot("ln_f.bias")})
    if not cfg.tie_embeddings:
        out["embed_out.weight"] = Slot("lm_head.weight")
    return out


def _resolve(name: str, slots: dict[str, Slot]) -> str | None:
    """The tensor_map name of a file's tensor (base-model files lack the transformer./model. prefix; a multimodal
    Gemma 3 keeps its language model under language_model.model. or model.language_model.)."""
    if name in slots:
        return name
    for prefix, to in (("language_model.model.", "model."), ("model.language_model.", "model."),
                       ("language_model.", "")):
        if name.startswith(prefix):
            return _resolve(to + name[len(prefix):], slots)
    for prefix in ("transformer.", "model.", "gpt_neox."):
        if prefix + name in slots:
            return prefix + name
    if name.startswith("lm_head.") and "embed_out." + name[len("lm_head."):] in slots:  # (transformers 5's name of
        return "embed_out." + name[len("lm_head."):]  # GPT-NeoX's head in memory; its files say embed_out)
    return None


# ---- loading ---------------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str]]:
    """model.safetensors, or the shards named by model.safetensors.index.json (and its weight_map)."""
    if (folder / WEIGHTS_FILE).exists():
        return [folder / WEIGHTS_FILE], {}
    index = folder / INDEX_FILE
    if not index.exists():
        hint = " (pytorch_model.bin is never read: no pickle)" if any(folder.glob("pytorch_model*.bin")) else ""
        raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE} or {INDEX_FILE}{hint}")
    doc = read_json(index)
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise ValueError(f"{index}: no weight_map")
    files = []
    for name, f in wmap.items():
        if not isinstance(f, str) or Path(f).name != f or f in ("", ".", ".."):
            raise ValueError(f"{index}: tensor {name!r} maps to a bad file name {f!r}")
        if not (folder / f).exists():
            raise FileNotFoundError(f"{index}: shard {f} of tensor {name!r} is missing")
        if folder / f not in files:
            files.append(folder / f)
    return files, wmap


def is_hf_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a transformers model folder: config.json and safetensors weights (single or sharded)."""
    folder = Path(path)
    return (folder / CONFIG_FILE).is_file() and ((folder / WEIGHTS_FILE).is_file() or (folder / INDEX_FILE).is_file())


def from_pretrained(path: str | os.PathLike, cls: type[GPT] = GPT, weights: str | None = None) -> GPT:
    """Load a transformers folder (config.json + safetensors, single file or sharded; see the module doc) into a
    GPT on the CPU. Errors name the file and the tensor or key.

    weights ("bfloat16", "int8", "w8a8"; None: float32): the four matrices of every block and the lm-head are
    converted a layer at a time, straight from the files, to that decode form (GPT.bf16_weights' and the others')
    and held in it alone: an inference-only model (GPT.hold_weights) in about half ("bfloat16") or a quarter of the
    float32 model's memory -- what runs an 8B model in 24 GB. The numbers are those of the float32 model decoding
    with the same `weights`."""
    if weights is not None and weights not in WEIGHT_FORMS:
        raise ValueError(f"weights must be None or one of {WEIGHT_FORMS}, got {weights!r}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (expected config.json and model.safetensors)")
    cfg_path = folder / CONFIG_FILE
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} not found")
    doc = read_json(cfg_path)
    cfg = config_from_hf(doc, str(cfg_path))
    files, wmap = _weight_files(folder)
    # every name, dtype and shape is checked before the model is allocated: a damaged config.json (vocab_size or
    # n_layer off by a few digits) is refused by name, not by a MemoryError asking for terabytes or a hang
    opened = [(file, load_safetensors(file, mmap=True)[0]) for file in files]
    count = sum(len(tensors) for _, tensors in opened)
    if cfg.n_layer > count:  # (each layer has several tensors; tensor_map's size grows with n_layer)
        raise ValueError(f"{cfg_path}: n_layer={cfg.n_layer}, but the weight files hold only {count} tensors")
    slots = tensor_map(cfg, doc["model_type"])
    shapes = {name: np.broadcast_to(np.float32(0), shape) for name, shape in param_shapes(cfg).items()}  # (no data)
    seen: dict[str, Path] = {}
    filled: dict[str, str] = {}  # tensor_map name -> the file's name for it
    reads = []  # (file, its tensors, name, slot) to copy in
    tied_heads = []
    for file, tensors in opened:
        for name in tensors:
            if name in seen:
                raise ValueError(f"{file}: tensor {name!r} is also in {seen[name]}")
            seen[name] = file
            key = _resolve(name, slots)
            if key is None and _resolve(name, {"lm_head.weight": None, "embed_out.weight": None}) and \
                    cfg.tie_embeddings:
                tied_heads.append((file, tensors, name))  # checked against wte once that is loaded
                continue
            if key is None:
                if _SKIP.fullmatch(name) or (doc["model_type"] == "gemma3" and VISION.fullmatch(name)):
                    continue
                raise ValueError(f"{file}: unexpected tensor {name!r} (not a parameter of the model config.json "
                                 f"describes: model_type {doc['model_type']}, n_layer={cfg.n_layer})")
            if key in filled:
                raise ValueError(f"{file}: tensor {name!r} duplicates {filled[key]!r}")
            dtype = tensors.dtype(name)
            if dtype not in ("F32", "F16", "BF16", "F64"):
                raise ValueError(f"{file}: tensor {name!r} has dtype {dtype}, expected F32, F16, BF16 or F64")
            want = slots[key].view(shapes).shape
            if tensors.shape(name) != want:
                raise ValueError(f"{file}: tensor {name!r} has shape {tensors.shape(name)}, config.json needs "
                                 f"{want}")
            reads.append((file, tensors, name, slots[key]))
            filled[key] = name
    for name, f in wmap.items():
        if name not in seen:
            raise ValueError(f"{folder / f}: tensor {name!r} (listed in {INDEX_FILE}) is not in the file")
    missing = [k for k in slots if k not in filled]
    if missing:
        where = files[0] if not wmap else folder / INDEX_FILE
        raise ValueError(f"{where}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''} of the model "
                         f"config.json describes (model_type {doc['model_type']}, n_layer={cfg.n_layer})")
    model = cls(cfg, init=False)  # (its float32 buffer is untouched until written: pages never written stay free)
    held = () if weights is None else (*MATRICES, *(() if cfg.tie_embeddings else ("lm_head.weight",)))
    # a BF16 file's token embedding of a RoPE model, held too: as its bf16 bits (what float32 holds, exactly)
    if weights is not None and cfg.positions == "rope" and \
            all(t.dtype(n) == "BF16" for _, t, n, slot in reads if slot.param == "wte"):
        held += ("wte",)
    for file, tensors, name, slot in reads:
        if slot.param not in held:
            _read(file, tensors, name, slot, model.p)
    snap = None if weights is None else _held_snapshot(model, reads, held, weights)
    wte = model.p["wte"] if snap is None or TOKEN_TABLE not in snap else snap[TOKEN_TABLE]
    for file, tensors, name in tied_heads:
        same = tensors.shape(name) == wte.shape and \
            all(np.array_equal(a, b) for a, b in _row_blocks(tensors, name, wte))
        if not same:
            raise ValueError(f"{file}: {name} differs from the token embedding, but config.json ties them "
                             f"(tie_word_embeddings): fastllm cannot load an untied head under a tied config")
        tensors.release(name)
    if snap is not None:
        model.hold_weights(snap, weights)
    model.checkpoint_dir = folder
    model.hf_model_type = doc["model_type"]  # save_pretrained writes the same family back where it can
    return model


def _read(file: Path, tensors, name: str, slot: Slot, p: dict) -> None:
    """The file's tensor `name` into its slot of the parameter views p (plus the slot's offset), checked finite."""
    dst = slot.view(p)
    tensors.read_into(name, dst)  # (giving the file's pages back as it goes)
    if slot.perm is not None:  # (the file's row order to fastllm's)
        dst[...] = dst[list(slot.perm)]
    if slot.offset:
        dst += np.float32(slot.offset)
    if not _all_finite(dst):
        raise ValueError(f"{file}: tensor {name!r} holds NaN or infinite values")


def _row_blocks(tensors, name: str, like: np.ndarray, rows: int = 4096):
    """(the file's rows, like's rows) as float32 pairs, a block at a time (like: float32, bf16 bits or Bf16Panels)."""
    panels = isinstance(like, ops.Bf16Panels)
    n = like.rows if panels else len(like)
    for r0 in range(0, n, rows):  # (rows: a multiple of the panels' 32)
        part = ops.unpack_bf16(ops.Bf16Panels(like.data[r0:r0 + rows], min(rows, n - r0))) if panels else \
            like[r0:r0 + rows]
        out = np.empty(part.shape, np.float32)
        tensors.read_into(name, out, start=r0)
        yield out, ops.from_bf16(part) if part.dtype == np.uint16 else part


def _held_snapshot(model: GPT, reads: list, held: tuple[str, ...], weights: str) -> dict:
    """The decode snapshot of form `weights` of the matrices `held` (per block, stacked, and an untied lm-head) read
    from the files one layer at a time into a float32 scratch (stacked_snapshot); with "wte" held, the token
    embedding as the file's bf16 bits (TOKEN_TABLE); a tied lm-head is wte's. A tied bf16 head packed for the GEMM
    (ops.Bf16Panels) is the token table too: the embedding reads its rows there, one bf16 copy instead of two."""
    convert, snap = snapshot_convert(weights), {}
    parts: dict[tuple[str, int | None], list] = {}  # (param, layer) -> its reads
    for r in reads:
        if r[3].param in held:
            parts.setdefault((r[3].param, r[3].layer), []).append(r)

    def fill(param: str, layer: int | None, scratch: np.ndarray) -> None:
        for file, tensors, name, slot in parts[(param, layer)]:
            _read(file, tensors, name, slot, {param: {layer: scratch}} if layer is not None else {param: scratch})

    C = model.config.n_embd
    packed_table = model.config.tie_embeddings and weights == "bfloat16" and C % 2 == 0 and ops.bf16_panels_preferred()
    for param in held:
        shape = model.p[param].shape  # (a view: its pages stay untouched)
        if param == "wte" and not packed_table:  # the bits as they are in the file, checked finite
            snap[TOKEN_TABLE] = table = np.empty(shape, np.uint16)
            (file, tensors, name, _), = parts[("wte", None)]
            tensors.read_into(name, table)
            if not all(np.isfinite(ops.from_bf16(table[r:r + 4096])).all() for r in range(0, len(table), 4096)):
                raise ValueError(f"{file}: tensor {name!r} holds NaN or infinite values")
        elif param in MATRICES:
            snap[param] = stacked_snapshot(convert, shape[0], shape[1:], lambda l, s, n=param: fill(n, l, s))
        else:  # an lm-head, in blocks of rows (a float32 copy of it would be a large transient): the untied one, or a
            # tied one in bf16 panels, which is the token table too (bf16 in: exact)
            snap[param] = _blockwise(convert, shape, lambda r0, out, n=param: _read_rows(parts[(n, None)], r0, out))
            if param == "wte":
                snap[TOKEN_TABLE] = snap["wte"]
    if model.config.tie_embeddings and "wte" not in snap:  # the head: wte's float32, or its bf16 bits (converted a
        # block at a time)
        table = snap.get(TOKEN_TABLE)
        snap["wte"] = convert(model.p["wte"]) if table is None else convert(table) if weights == "bfloat16" else \
            _blockwise(convert, table.shape, lambda r0, out: np.copyto(out, ops.from_bf16(table[r0:r0 + len(out)])))
    return snap


def _blockwise(convert, shape: tuple[int, int], fill):
    """convert (snapshot_convert's) of a (V, C) matrix, fill(r0, out) writing its rows r0 .. r0 + len(out) - 1, a
    block of ops.ROW_BLOCK rows at a time (ops.join_row_blocks)."""
    V, C, blk = *shape, ops.ROW_BLOCK

    def block(i: int, scratch: np.ndarray) -> None:
        n = min(blk, V - i * blk)
        fill(i * blk, scratch[:n])
        scratch[n:] = 0.0  # (the last block's padding, cut off again)

    return ops.join_row_blocks(stacked_snapshot(convert, -(-V // blk), (blk, C), block), V)


def _read_rows(reads: list, r0: int, out: np.ndarray) -> None:
    """Rows r0 .. r0 + len(out) - 1 of the one whole-matrix tensor `reads` holds (an lm-head), checked finite."""
    (file, tensors, name, slot), = reads
    tensors.read_into(name, out, start=r0)
    if not _all_finite(out):
        raise ValueError(f"{file}: tensor {name!r} holds NaN or infinite values (rows {r0}..{r0 + len(out) - 1})")


def _all_finite(a: np.ndarray, rows: int = 4096) -> bool:
    """np.isfinite(a).all() a block of rows at a time (no tensor-sized temporary)."""
    return all(np.isfinite(a[i:i + rows]).all() for i in range(0, max(1, len(a)), rows)) if a.ndim else \
        bool(np.isfinite(a))


# ---- saving ----------------------------------------------------------------------------------------------


def hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's tensors under transformers' names and layouts (see tensor_map; the tied lm-head left out)."""
    p = model.state_dict()
    return {name: slot.hf(p) - np.float32(slot.offset) if slot.offset else np.ascontiguousarray(slot.hf(p))
            for name, slot in tensor_map(model.config, getattr(model, "hf_model_type", None)).items()}


_SIZE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
               "TIB": 2**40}  # as transformers' max_shard_size reads them


def _size_in_bytes(size: int | str) -> int:
    """A size in bytes from an int or transformers' spelling ("5GB": 10**9 bytes a GB, "500MiB": 2**20 a MiB).

    >>> _size_in_bytes("20KB")
    20000
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]i?B)\s*", size, re.IGNORECASE) if isinstance(size, str) else None
    if m is not None:
        return int(float(m[1]) * _SIZE_UNITS[m[2].upper()])
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"max_shard_size must be a number of bytes > 0 or a size like '5GB' or '500MiB', got {size!r}")
    return size


def save_pretrained(model: GPT, path: str | os.PathLike, tokenizer=None, max_shard_bytes: int | None = None,
                    eos_token_id: int | list[int] | None = None, max_shard_size: int | str | None = None) -> Path:
    """Write `model` as a transformers folder (config.json, model.safetensors or shards + index, in float32; with a
    `tokenizer`, also tokenizer.json and tokenizer_config.json, with the chat templates and the special tokens'
    names of the folder the model was loaded from, if it has them). Shards of at most max_shard_size (transformers'
    name and spelling: "5GB", or bytes; or max_shard_bytes) when the tensors are larger, else one file.
    eos_token_id: written to config.json and generation_config.json (default: the EOS ids of the folder the model
    was loaded from, else the tokenizer's <|endoftext|>). Every file is written atomically; stale shards of an
    earlier save are removed (a sharded save interrupted midway leaves no index, so that nothing loads a mix of old
    and new shards). ValueError when no transformers architecture computes the
    config."""

    cfg = model.config
    if max_shard_size is not None:
        if max_shard_bytes is not None:
            raise ValueError("give max_shard_size or max_shard_bytes, not both")
        max_shard_bytes = _size_in_bytes(max_shard_size)
    if tokenizer is not None and tokenizer.n_vocab > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.n_vocab} ids but the model's vocab_size is {cfg.vocab_size}")
    model_type(cfg, getattr(model, "hf_model_type", None))  # refuse before writing anything
    model._check_float32("save_pretrained")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(model)
    meta = {"format": "pt"}  # transformers refuses safetensors files without it
    old = set(folder.glob("model-*-of-*.safetensors"))
    total = sum(a.nbytes for a in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_safetensors(folder / WEIGHTS_FILE, state, meta)
        (folder / INDEX_FILE).unlink(missing_ok=True)
        written = set()
    else:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name, arr in state.items():
            if shards[-1] and size + arr.nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = arr
            size += arr.nbytes
        n = len(shards)
        # the old index goes first: a save killed midway leaves shards without one (refused by name), never an
        # index over a mix of new and old shards of the same names (loaded without a word)
        (folder / INDEX_FILE).unlink(missing_ok=True)
        wmap, written = {}, set()
        for k, shard in enumerate(shards, 1):
            fname = f"model-{k:05d}-of-{n:05d}.safetensors"
            save_safetensors(folder / fname, shard, meta)
            wmap.update({name: fname for name in shard})
            written.add(folder / fname)
        write_json(folder / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": wmap})
        (folder / WEIGHTS_FILE).unlink(missing_ok=True)
    for f in old - written:
        f.unlink(missing_ok=True)
    source = getattr(model, "checkpoint_dir", None)  # the folder it came from: its EOS ids and template go along
    names = special_tokens(source)  # and the names of its special tokens, which its templates read
    if eos_token_id is not None:
        names.pop("eos_token", None)  # (the given one's)
    if eos_token_id is None:
        eos_token_id = eos_token_ids(source, tokenizer) or None
        if eos_token_id is not None and len(eos_token_id) == 1:
            eos_token_id = eos_token_id[0]
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = tokenizer.eot_token
    bos = tokenizer.bos_token if tokenizer is not None else None
    write_json(folder / CONFIG_FILE, config_to_hf(cfg, eos_token_id, bos, getattr(model, "hf_model_type", None)))
    if eos_token_id is not None:
        write_json(folder / GENERATION_FILE, {"eos_token_id": eos_token_id, **({"bos_token_id": bos} if bos else {})})
    if tokenizer is not None:
        templates = read_templates(source) if source is not None else None
        save_tokenizer(tokenizer, folder, cfg.block_size, eos_token_id, templates[0] if templates else None, names)
    return folder


# ---- LoRA adapters: PEFT's folders -------------------------------------------------------------------------

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_TENSOR = re.compile(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight")  # PEFT's names (adapter name cut)
_PEFT_REFUSED = {  # adapter_config.json keys that, when set, make an adapter compute more than scale * B A x
    "use_dora": "DoRA", "lora_bias": "a bias on lora_B", "modules_to_save": "whole modules saved with the adapter",
    "trainable_token_indices": "trained token embeddings", "layer_replication": "replicated layers",
    "target_parameters": "adapters on parameters (MoE experts)", "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA"}


def _lora_slots(model: GPT) -> dict[str, Slot]:
    """{transformers module name: its Slot, untransposed} for the linear layers a Lora adapts (the blocks' matrices;
    a LoRA's B is (out, r) whatever the layout of the module's weight: GPT-2's Conv1D too)."""
    slots = tensor_map(model.config, getattr(model, "hf_model_type", None))
    return {name[:-len(".weight")]: replace(slot, transpose=False) for name, slot in slots.items()
            if slot.param in MATRICES}


def _slot_rows(slot: Slot, shapes: dict) -> tuple[int, int]:
    return slot.rows or (0, shapes[slot.param][1])


def _layer_free(module: str) -> str:
    """The module's name below its layer ('model.layers.3.self_attn.q_proj' -> 'self_attn.q_proj'): the same in
    every layer, a PEFT target or pattern key that names no other module."""
    return re.sub(r"^.*?\.\d+\.", "", module)


def _pattern(patterns: dict, module: str, default, where: str):
    """PEFT's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the value of the first key (a
    regex) that matches the end of the module's name, else default."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        except re.error as e:
            raise ValueError(f"{where}: pattern {key!r} is not a regular expression ({e})") from None
    return default


def save_adapter(model: GPT, path: str | os.PathLike, base: str | None = None) -> Path:
    """Write the model's LoRA adapters (model.lora) as a PEFT adapter folder (adapter_config.json and
    adapter_model.safetensors, float32) with which peft's PeftModel.from_pretrained(<the base model in
    transformers>, path) computes what the model computes: one module per transformers projection whose rows the
    adapters train (q_proj and v_proj of attn.c_attn with the same lora_A; Phi-3's qkv_proj or GLM's gate_up_proj
    whole), lora_B its rows of B in the file's order; every module's scale is the Lora's (rank_pattern and
    alpha_pattern for the modules whose rank is not config r). base: base_model_name_or_path. Each file is written
    atomically. ValueError when the model has no adapters, or where B has nonzero values in rows no module holds."""
    lora = model.lora
    if lora is None:
        raise ValueError("save_adapter: the model has no LoRA adapters (add_lora or load_adapter first)")
    state, shapes = lora.state_dict(), model.shapes
    tensors, ranks, written = {}, {}, {m: np.zeros(shapes[m][1], bool) for m in lora.ranks}
    for module, slot in _lora_slots(model).items():
        r0, r1 = _slot_rows(slot, shapes)
        if slot.param not in lora.ranks or not any(a < r1 and r0 < b for a, b in lora.rows[slot.param]):
            continue
        stem = slot.param[:-len(".weight")]
        tensors[f"base_model.model.{module}.lora_A.weight"] = state[stem + ".lora_A"][slot.layer]
        tensors[f"base_model.model.{module}.lora_B.weight"] = slot.hf({slot.param: state[stem + ".lora_B"]})
        ranks[_layer_free(module)] = lora.ranks[slot.param]
        written[slot.param][r0:r1] = True
    for m, rows in written.items():
        if state[m[:-len(".weight")] + ".lora_B"][:, ~rows].any():
            raise ValueError(f"save_adapter: the adapter of {m} has nonzero rows of B outside the projections it "
                             f"adapts ({lora.rows[m]}): no PEFT module holds them")
    c = lora.config
    pattern = {key: r for key, r in ranks.items() if r != c.r}
    doc = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base or "", "r": int(c.r),
           "lora_alpha": int(c.alpha) if float(c.alpha).is_integer() else c.alpha, "use_rslora": c.rslora,
           "rank_pattern": pattern,
           "alpha_pattern": {key: lora.scale * (math.sqrt(r) if c.rslora else r) for key, r in pattern.items()},
           "target_modules": sorted(ranks), "fan_in_fan_out": model_type(model.config) == "gpt2", "bias": "none",
           "lora_dropout": 0.0, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
           "layers_pattern": None, "init_lora_weights": True, "inference_mode": True}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(folder / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    write_json(folder / ADAPTER_CONFIG, doc)
    return folder


def _adapter_config(doc, where: str) -> tuple[int, float, bool, dict, dict]:
    """(r, lora_alpha, use_rslora, rank_pattern, alpha_pattern) of an adapter_config.json, PEFT's defaults for what
    it leaves out; ValueError naming the key for what fastllm does not compute (see _PEFT_REFUSED)."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: not a JSON object")
    if doc.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type {doc.get('peft_type')!r}: only LORA adapters are read")
    if doc.get("bias", "none") != "none":
        raise ValueError(f"{where}: bias {doc['bias']!r}: adapters that train the base's biases are not supported "
                         f"(bias must be 'none')")
    for key, what in _PEFT_REFUSED.items():
        if doc.get(key):
            raise ValueError(f"{where}: {key}={doc[key]!r}: {what} is not supported (plain LoRA only)")
    r, alpha, rslora = doc.get("r", 8), doc.get("lora_alpha", 8), doc.get("use_rslora", False)
    ranks, alphas = doc.get("rank_pattern") or {}, doc.get("alpha_pattern") or {}
    if not isinstance(ranks, dict) or not isinstance(alphas, dict):
        raise ValueError(f"{where}: rank_pattern and alpha_pattern must be objects")
    for key, v in [("r", r), *((f"rank_pattern[{k!r}]", v) for k, v in ranks.items())]:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{where}: {key} must be an integer >= 1, got {v!r}")
    for key, v in [("lora_alpha", alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in alphas.items())]:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{where}: {key} must be a number > 0, got {v!r}")
    if not isinstance(rslora, bool):
        raise ValueError(f"{where}: use_rslora must be true or false, got {rslora!r}")
    return r, float(alpha), rslora, ranks, alphas


def _lora_scale(alpha: float, r: int, rslora: bool) -> float:
    """A module's scale as PEFT computes it (and LoraConfig.scale): alpha / r, alpha / sqrt(r) with rslora."""
    return alpha / (math.sqrt(r) if rslora else r)


def _not_adapted(module: str, model: GPT) -> str:
    """Why an adapter file's module is none fastllm adapts (for errors)."""
    kind = model_type(model.config, getattr(model, "hf_model_type", None))
    slot = tensor_map(model.config, kind).get(module + ".weight")
    if (slot is not None and slot.param in ("wte", "wpe")) or "embed" in module:
        return "an embedding: fastllm adapts the blocks' linear layers only"
    if module.rsplit(".", 1)[-1] == "lm_head":
        return "the lm-head: fastllm adapts the blocks' linear layers only"
    return f"no linear layer of this model (model_type {kind}, n_layer={model.config.n_layer})"


def load_adapter(model: GPT, path: str | os.PathLike, attach: bool = True) -> Lora:
    """Read a PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors; adapter_model.bin is never
    read: no pickle) and attach it to `model` (model.add_lora): the model then computes what peft's PeftModel
    computes. attach=False: only make the Lora, on the model's device, leaving the model as it is (a server's
    adapters, each request with its own: fastllm.serve; model.with_lora(lora) runs passes with it). Per fastllm
    matrix, the modules the file has: one A where, in every layer, their lora_A are equal (PEFT's q_proj and v_proj
    as fastllm saves them), else their A's concatenated (the rank their sum) and each module's B in its own rows
    and columns of the matrix's B; each module's scale (lora_alpha / r, rank_pattern, alpha_pattern, use_rslora)
    relative to the Lora's (config r and lora_alpha) folded into its B; zeros in the layers without it
    (layers_to_transform). ValueError naming the file and the key or tensor for what fastllm does not compute
    (DoRA, biases, modules_to_save, embeddings or the lm-head adapted, ...) and for tensors that do not fit the
    model (unknown modules, shapes, non-finite values, a lora_A without its lora_B). Returns the Lora."""
    folder = Path(path)
    conf_path, file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not conf_path.is_file():
        raise FileNotFoundError(f"{conf_path} not found (not a PEFT adapter folder)")
    if not file.is_file():
        hint = " (adapter_model.bin is never read: no pickle)" if (folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{file} not found{hint}")
    r, alpha, rslora, rank_pattern, alpha_pattern = _adapter_config(read_json(conf_path), str(conf_path))
    tensors, _ = load_safetensors(file)
    slots, shapes = _lora_slots(model), model.shapes
    pairs: dict[str, dict[str, tuple[str, np.ndarray]]] = {}  # module -> {lora_A: (name, tensor), lora_B: ...}
    for name, t in tensors.items():
        match = _LORA_TENSOR.fullmatch(name)
        if match is None:
            what = "a LoRA on an embedding: fastllm adapts the blocks' linear layers only" if "lora_embedding" in \
                name else "not a LoRA tensor (base_model.model.<module>.lora_A.weight or .lora_B.weight)"
            raise ValueError(f"{file}: tensor {name!r} is {what}")
        module, which = match[1], match[2]
        if module not in slots:
            raise ValueError(f"{file}: tensor {name!r}: module {module!r} is {_not_adapted(module, model)}")
        if t.dtype.kind != "f":
            raise ValueError(f"{file}: tensor {name!r} has dtype {t.dtype}, expected floats")
        pairs.setdefault(module, {})[which] = (name, t)
    if not pairs:
        raise ValueError(f"{file}: no LoRA tensors")
    parts: dict[str, list[tuple[Slot, np.ndarray, np.ndarray]]] = {}  # matrix -> [(slot, A, B scaled)]
    for module, pair in pairs.items():
        if len(pair) == 1:
            (which, (name, _)), = pair.items()
            other = "lora_B" if which == "lora_A" else "lora_A"
            raise ValueError(f"{file}: tensor {name!r} has no {other} partner (base_model.model.{module}.{other}"
                             f".weight)")
        slot, rank = slots[module], _pattern(rank_pattern, module, r, str(conf_path))
        r0, r1 = _slot_rows(slot, shapes)
        for which, want in (("lora_A", (rank, shapes[slot.param][2])), ("lora_B", (r1 - r0, rank))):
            name, t = pair[which]
            if t.shape != want:
                raise ValueError(f"{file}: tensor {name!r} has shape {t.shape}; the model and adapter_config.json "
                                 f"(r={rank} for {module}) need {want}")
            if not np.isfinite(t).all():
                raise ValueError(f"{file}: tensor {name!r} holds NaN or infinite values")
        factor = _lora_scale(_pattern(alpha_pattern, module, alpha, str(conf_path)), rank, rslora) / \
            _lora_scale(alpha, r, rslora)
        B = pair["lora_B"][1] if factor == 1.0 else pair["lora_B"][1].astype(np.float64) * factor
        parts.setdefault(slot.param, []).append((slot, pair["lora_A"][1], B))
    state, ranks, rows = {}, {}, {}
    for m, items in parts.items():
        L, out, inp = shapes[m]
        kinds = sorted({_slot_rows(slot, shapes) for slot, _, _ in items})  # the projections (row ranges)
        per_layer: dict[int, list[np.ndarray]] = {}
        for slot, A, _ in items:
            per_layer.setdefault(slot.layer, []).append(A)
        shared = len({A.shape for _, A, _ in items}) == 1 and \
            all(np.array_equal(As[0], A) for As in per_layer.values() for A in As[1:])
        width = {k: max(A.shape[0] for slot, A, _ in items if _slot_rows(slot, shapes) == k) for k in kinds}
        offset = dict(zip(kinds, [0] * len(kinds) if shared else np.cumsum([0, *width.values()])[:-1].tolist()))
        ranks[m], rows[m] = items[0][1].shape[0] if shared else sum(width.values()), kinds
        A_all, B_all = np.zeros((L, ranks[m], inp), np.float32), np.zeros((L, out, ranks[m]), np.float32)
        for slot, A, B in items:
            o = offset[_slot_rows(slot, shapes)]
            A_all[slot.layer, o:o + len(A)] = A
            slot.view({m: B_all[:, :, o:o + len(A)]})[...] = B if slot.perm is None else B[list(slot.perm)]
        stem = m[:-len(".weight")]
        state[stem + ".lora_A"], state[stem + ".lora_B"] = A_all, B_all
    cfg, targets = model.config, []  # (LoraConfig's: the projections the modules cover)
    for target in TARGETS:
        if target != "gate" or cfg.fc_width == 2 * cfg.mlp_width:
            m, (a, b) = target_rows(cfg, target)
            targets += [target] if any(r0 <= a and b <= r1 for r0, r1 in rows.get(m, ())) else []
    config = LoraConfig(r=r, alpha=alpha, targets=tuple(targets), rslora=rslora)
    lora = model.add_lora(config, ranks=ranks, rows=rows) if attach else Lora(model, config, ranks=ranks, rows=rows)
    return lora.load_state_dict(state, str(file))


def is_adapter_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a PEFT adapter folder (adapter_config.json in it)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | os.PathLike) -> str:
    """The base_model_name_or_path of a PEFT adapter folder: the model it adapts (a hub name or a folder; "" if
    unset)."""
    doc = read_json(Path(path) / ADAPTER_CONFIG)
    base = doc.get("base_model_name_or_path") if isinstance(doc, dict) else None
    return base if isinstance(base, str) else ""


# ---- tokenizer files and generation settings -------------------------------------------------------------


def save_tokenizer(tokenizer, folder: str | os.PathLike, model_max_length: int | None = None,
                   eos_token_id: int | list[int] | None = None, chat_template: str | dict[str, str] | None = None,
                   names: dict[str, str] | None = None) -> None:
    """tokenizer.json (Tokenizer.save_hf) plus a tokenizer_config.json so AutoTokenizer finds it: eos_token is the
    special token of the first of `eos_token_id` (default <|endoftext|>), chat_template the template if given (or
    the named templates, {"default": ..., "tool_use": ...}, written as transformers does), `names` the special
    tokens' names to keep (fastllm.chat.special_tokens of the folder the model came from: bos_token, ...)."""
    folder = Path(folder)
    tokenizer.save_hf(folder / "tokenizer.json")
    conf: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if model_max_length:
        conf["model_max_length"] = model_max_length
    names_of = {i: s for s, i in tokenizer.special_tokens.items()}
    eot = "<|endoftext|>" if tokenizer.eot_token is not None else None
    if eot:
        conf.update(bos_token=eot, eos_token=eot, unk_token=eot)
    if tokenizer.bos_token is not None:
        conf["bos_token"] = names_of[tokenizer.bos_token]
    eos = eos_token_id[0] if isinstance(eos_token_id, list) and eos_token_id else eos_token_id
    if eos in names_of:
        conf["eos_token"] = names_of[eos]
    if names:  # the source's names, and none it does not set (a template may test `bos_token is defined`)
        conf = {k: v for k, v in conf.items() if k not in ("bos_token", "unk_token")} | names
    if isinstance(chat_template, dict) and list(chat_template) == ["default"]:
        chat_template = chat_template["default"]
    if isinstance(chat_template, dict):
        conf["chat_template"] = [{"name": k, "template": v} for k, v in chat_template.items()]
    elif chat_template is not None:
        conf["chat_template"] = chat_template
    write_json(folder / "tokenizer_config.json", conf)


__all__ = ["from_pretrained", "save_pretrained", "config_from_hf", "config_to_hf", "model_type", "tensor_map",
           "hf_state_dict", "save_tokenizer", "is_hf_folder", "MODEL_TYPES", "save_adapter", "load_adapter",
           "is_adapter_folder", "adapter_base"]
