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
    mistral  MistralForCausalLM  Llama's, without biases; a sliding_window smaller than max_position_embeddings
                                 (v0.1, Zephyr) becomes the context (block_size): up to it, sliding attention is
                                 full attention
    qwen2    Qwen2ForCausalLM    Llama's with q/k/v biases (and no others); sliding-window layers as mistral's
    qwen3    Qwen3ForCausalLM    Llama's with QK-norm (RMSNorm over head_dim on q and k), attention_bias;
                                 sliding-window layers as mistral's
    phi3     Phi3ForCausalLM     Mistral's, q|k|v and gate|up each in one tensor (fastllm's layout); longrope
                                 (Phi-3-128k, Phi-3.5) with original_max_position_embeddings as the context (its
                                 short factors); Phi-4-mini's partial rotary is refused
Keys of config.json that change the computation are mapped or refused by name (other rope types, MoE model
types, quantization, activations, partial rotary); the others (dropout, initializer range, token
ids, generation defaults, bookkeeping) do not affect the model and are not read.

Weights: per layer, HF keeps one tensor per projection where fastllm stacks the layers (L, ...) and concatenates
q|k|v into attn.c_attn and gate|up into mlp.c_fc (the row blocks of the spec in fastllm.model); RoPE is HF's
rotate-half layout, so q/k rows need no permutation. GPT-2's Conv1D weights are (in, out), the transpose of
fastllm's. Loading maps each file (fastllm.fileio.load_safetensors(mmap=True)) and converts tensor by tensor
straight into the model's flat float32 buffer, giving each tensor's pages back after it is copied: the peak is
about one float32 model (measured in tests/test_hf_models.py), whatever the stored dtype. No pickle: never
pytorch_model.bin.

>>> model = GPT.from_pretrained("Qwen2.5-0.5B-Instruct/")   # or hf.from_pretrained(path)
>>> model.save_pretrained("out", tokenizer=tok)              # transformers can load "out"
>>> tok = Tokenizer.from_pretrained("Qwen2.5-0.5B-Instruct/")
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .chat import eos_token_ids, read_templates, special_tokens
from .fileio import load_safetensors, read_json, save_safetensors, write_json
from .model import GPT, GPTConfig, param_shapes
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
}
MODEL_TYPES = tuple(ARCHITECTURES)
GPT2_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both GELU's tanh approximation, as fastllm's kernel
_GPT2_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                      layer_norm_epsilon=1e-5)  # fmt: skip
_SKIP = re.compile(r"(transformer\.)?h\.\d+\.attn\.(bias|masked_bias)|(model\.)?layers\.\d+\.self_attn\.rotary_emb"
                   r"\.inv_freq")  # buffers old checkpoints carry: causal masks, RoPE frequencies (recomputed)


# ---- config ----------------------------------------------------------------------------------------------


def _positive_number(d: dict, key: str, default, bad) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise bad(f"{key} must be a positive number, got {v!r}")
    return float(v)


def _rope(d: dict, bad) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 4's rope_theta + rope_scaling keys or 5's rope_parameters."""
    params = d.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise bad(f"rope_parameters must be an object, got {params!r}")
    params = dict(params or {})
    theta = params.pop("rope_theta", None)
    if theta is not None and "rope_theta" in d and d["rope_theta"] != theta:
        raise bad(f"rope_theta={d['rope_theta']} differs from rope_parameters.rope_theta={theta}")
    theta = _positive_number(d if theta is None else {"rope_theta": theta}, "rope_theta", 10000.0, bad)
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


def _full_attention_context(d: dict, n_layer: int, context: int, bad) -> int:
    """The longest context over which every layer attends to every earlier token: max_position_embeddings, or for
    configs with sliding-window layers (Mistral v0.1, Zephyr, Qwen with use_sliding_window) their window, where
    sliding and full attention are the same computation (a token attends to itself and the window - 1 before it)."""
    window = d.get("sliding_window")
    kinds = d.get("layer_types")
    if kinds is not None:
        sliding = [i for i, k in enumerate(kinds) if k != "full_attention"]
        if sliding and any(k != "sliding_attention" for k in kinds if k != "full_attention"):
            raise bad(f"layer_types {sorted(set(kinds))} are not supported (only full_attention)")
    elif d.get("model_type") in ("qwen2", "qwen3"):  # transformers 4's spelling of the same
        first = d.get("max_window_layers", n_layer)
        sliding = list(range(first, n_layer)) if d.get("use_sliding_window") else []
    else:  # mistral: every layer slides when sliding_window is set
        sliding = list(range(n_layer)) if window is not None else []
    if not sliding:
        return context
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise bad(f"sliding_window={window!r} on layers {sliding[:4]}{'...' if len(sliding) > 4 else ''} must be a "
                  "positive integer")
    return min(window, context)


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
    try:
        cfg = _gpt2_config(d, bad) if kind == "gpt2" else _llama_config(d, kind, bad)
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


def _llama_config(d: dict, kind: str, bad) -> dict:
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "max_position_embeddings")
    missing = [k for k in required if k not in d]
    if missing:
        raise bad(f"missing {', '.join(missing)}")
    C, NH, L = d["hidden_size"], d["num_attention_heads"], d["num_hidden_layers"]
    act = d.get("hidden_act", "silu")
    if act != "silu":
        raise bad(f"hidden_act {act!r} is not supported (only 'silu': SwiGLU)")
    params = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    partial = d.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))  # (Phi-4-mini: 0.75)
    if partial != 1.0:
        raise bad(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    context = d["max_position_embeddings"]
    if "sliding_window" in d or "layer_types" in d or "use_sliding_window" in d:
        context = _full_attention_context(d, L, context, bad)
    attention_bias = d.get("attention_bias", False)
    mlp_bias = d.get("mlp_bias", False)
    if kind in ("mistral", "qwen2", "phi3") and attention_bias:
        raise bad(f"attention_bias={attention_bias!r} is not supported for {kind} (transformers' {kind} has "
                  f"{'q/k/v biases only' if kind == 'qwen2' else 'no attention biases'})")
    if kind != "llama" and mlp_bias:
        raise bad(f"mlp_bias={mlp_bias!r} is not supported for {kind} (its MLP has no biases)")
    for key, value in (("attention_bias", attention_bias), ("mlp_bias", mlp_bias)):
        if not isinstance(value, bool):
            raise bad(f"{key} must be true or false, got {value!r}")
    theta, scaling = _rope(d, bad)
    rope_type = scaling and scaling.get("rope_type", scaling.get("type"))
    if context < d["max_position_embeddings"] and rope_type == "dynamic":
        raise bad("sliding_window with dynamic RoPE scaling is not supported (it scales past max_position_embeddings, "
                  "which the window keeps fastllm from reaching)")
    if rope_type == "longrope":  # LongRoPE's short factors hold up to the original context; fastllm stops there
        context = min(context, int(scaling["original_max_position_embeddings"]))
        scaling["attention_factor"] = attention_scaling(scaling)  # (from the full context's factor: kept on save)
    head_dim, n_kv = d.get("head_dim"), d.get("num_key_value_heads")
    if isinstance(C, int) and isinstance(NH, int) and NH > 0 and C % NH == 0 and head_dim == C // NH:
        head_dim = None  # the defaults: keep the config canonical
    if n_kv == NH:
        n_kv = None
    qkv_bias = True if kind == "qwen2" else attention_bias
    return dict(
        block_size=context, vocab_size=d["vocab_size"], n_layer=L, n_head=NH, n_embd=C,
        layernorm_eps=_positive_number(d, "rms_norm_eps", 1e-6, bad), n_kv_head=n_kv,
        head_dim=head_dim, positions="rope", rope_theta=theta, rope_scaling=scaling, norm="rmsnorm", mlp="swiglu",
        mlp_hidden=d["intermediate_size"], qkv_bias=qkv_bias, proj_bias=attention_bias and kind != "qwen2",
        mlp_bias=mlp_bias, qk_norm=kind == "qwen3", tie_embeddings=bool(d.get("tie_word_embeddings", False)),
    )


def model_type(cfg: GPTConfig, prefer: str | None = None) -> str:
    """The transformers model_type that computes what `cfg` computes (ValueError naming the option when none
    does): gpt2 for GPT-2's choices; llama, qwen2 (q/k/v biases only) or qwen3 (QK-norm) for RoPE + RMSNorm +
    SwiGLU; mistral or phi3 instead of llama when `prefer` says so (a model loaded from such a folder) and it has
    no biases (phi3: and no RoPE scaling)."""
    gpt2 = dict(positions="learned", norm="layernorm", mlp="gelu", qkv_bias=True, proj_bias=True, mlp_bias=True,
                qk_norm=False, tie_embeddings=True, logit_softcap=None, n_kv_head=None, head_dim=None,
                mlp_hidden=None)  # fmt: skip
    if cfg.positions == "learned":
        diff = [f"{k}={getattr(cfg, k)!r}" for k, v in gpt2.items() if getattr(cfg, k) != v and
                not (k == "n_kv_head" and cfg.kv_heads == cfg.n_head) and
                not (k == "mlp_hidden" and cfg.mlp_width == 4 * cfg.n_embd) and
                not (k == "head_dim" and cfg.head_size * cfg.n_head == cfg.n_embd)]
        if diff:
            raise ValueError(f"no transformers architecture computes this config: learned positions (GPT-2) with "
                             f"{', '.join(diff)}")
        return "gpt2"
    for key, want in (("norm", "rmsnorm"), ("mlp", "swiglu"), ("logit_softcap", None)):
        if getattr(cfg, key) != want:
            raise ValueError(f"no transformers architecture computes this config: rope with {key}="
                             f"{getattr(cfg, key)!r} (Llama, Qwen2 and Qwen3 need {key}={want!r})")
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
    d = {
        "architectures": [ARCHITECTURES[kind][0]], "model_type": kind, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd, "intermediate_size": cfg.mlp_width, "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
        "hidden_act": "silu", "max_position_embeddings": cfg.block_size, "rms_norm_eps": cfg.layernorm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "fastllm_version": __version__,
    }  # fmt: skip
    if kind == "llama":
        d.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, pretraining_tp=1)
    elif kind == "mistral":
        d.update(sliding_window=None)
    elif kind == "phi3":
        d.update(sliding_window=None, original_max_position_embeddings=cfg.block_size, resid_pdrop=0.0,
                 embd_pdrop=0.0, pad_token_id=None)  # (Phi3Config's default pad id, 32000, is past a smaller vocab)
    else:  # qwen2, qwen3: full attention on every layer
        d.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layer)
        if kind == "qwen3":
            d.update(attention_bias=cfg.qkv_bias)
    return d


# ---- the tensor map --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """Where an HF tensor lives in fastllm's parameters: p[param][layer][rows] (the whole tensor when layer or
    rows is None), transposed for GPT-2's Conv1D weights."""

    param: str
    layer: int | None = None
    rows: tuple[int, int] | None = None
    transpose: bool = False

    def view(self, p: dict) -> np.ndarray:
        v = p[self.param] if self.layer is None else p[self.param][self.layer]
        v = v if self.rows is None else v[self.rows[0]:self.rows[1]]
        return v.T if self.transpose else v


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
    NH, NKV, hd, H = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.mlp_width
    qkv = {"q": (0, NH * hd), "k": (NH * hd, (NH + NKV) * hd), "v": ((NH + NKV) * hd, (NH + 2 * NKV) * hd)}
    out["model.embed_tokens.weight"] = Slot("wte")
    for layer in range(L):
        pre = f"model.layers.{layer}."
        out[pre + "input_layernorm.weight"] = Slot("ln_1.weight", layer)
        if kind == "phi3":  # fastllm's own layout: q|k|v rows, gate|up rows
            out[pre + "self_attn.qkv_proj.weight"] = Slot("attn.c_attn.weight", layer)
            out[pre + "self_attn.o_proj.weight"] = Slot("attn.c_proj.weight", layer)
            out[pre + "post_attention_layernorm.weight"] = Slot("ln_2.weight", layer)
            out[pre + "mlp.gate_up_proj.weight"] = Slot("mlp.c_fc.weight", layer)
            out[pre + "mlp.down_proj.weight"] = Slot("mlp.c_proj.weight", layer)
            continue
        for x, rows in qkv.items():
            out[pre + f"self_attn.{x}_proj.weight"] = Slot("attn.c_attn.weight", layer, rows)
            if cfg.qkv_bias:
                out[pre + f"self_attn.{x}_proj.bias"] = Slot("attn.c_attn.bias", layer, rows)
        if cfg.qk_norm:
            out[pre + "self_attn.q_norm.weight"] = Slot("attn.q_norm.weight", layer)
            out[pre + "self_attn.k_norm.weight"] = Slot("attn.k_norm.weight", layer)
        out[pre + "self_attn.o_proj.weight"] = Slot("attn.c_proj.weight", layer)
        if cfg.proj_bias:
            out[pre + "self_attn.o_proj.bias"] = Slot("attn.c_proj.bias", layer)
        out[pre + "post_attention_layernorm.weight"] = Slot("ln_2.weight", layer)
        for x, rows in (("gate", (0, H)), ("up", (H, 2 * H))):
            out[pre + f"mlp.{x}_proj.weight"] = Slot("mlp.c_fc.weight", layer, rows)
            if cfg.mlp_bias:
                out[pre + f"mlp.{x}_proj.bias"] = Slot("mlp.c_fc.bias", layer, rows)
        out[pre + "mlp.down_proj.weight"] = Slot("mlp.c_proj.weight", layer)
        if cfg.mlp_bias:
            out[pre + "mlp.down_proj.bias"] = Slot("mlp.c_proj.bias", layer)
    out["model.norm.weight"] = Slot("ln_f.weight")
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = Slot("lm_head.weight")
    return out


def _resolve(name: str, slots: dict[str, Slot]) -> str | None:
    """The tensor_map name of a file's tensor (base-model files lack the transformer./model. prefix)."""
    if name in slots:
        return name
    for prefix in ("transformer.", "model."):
        if prefix + name in slots:
            return prefix + name
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


def from_pretrained(path: str | os.PathLike, cls: type[GPT] = GPT) -> GPT:
    """Load a transformers folder (config.json + safetensors, single file or sharded; see the module doc) into a
    GPT on the CPU. Errors name the file and the tensor or key."""
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
            if key is None and _resolve(name, {"lm_head.weight": None}) and cfg.tie_embeddings:
                tied_heads.append((file, tensors, name))  # checked against wte once that is loaded
                continue
            if key is None:
                if _SKIP.fullmatch(name):
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
    model = cls(cfg, init=False)
    for file, tensors, name, slot in reads:
        dst = slot.view(model.p)
        tensors.read_into(name, dst)  # (giving the file's pages back as it goes)
        if not _all_finite(dst):
            raise ValueError(f"{file}: tensor {name!r} holds NaN or infinite values")
    for file, tensors, name in tied_heads:
        if tensors.shape(name) != model.p["wte"].shape or not np.array_equal(tensors[name], model.p["wte"]):
            raise ValueError(f"{file}: {name} differs from the token embedding, but config.json ties them "
                             f"(tie_word_embeddings): fastllm cannot load an untied head under a tied config")
        tensors.release(name)
    model.checkpoint_dir = folder
    model.hf_model_type = doc["model_type"]  # save_pretrained writes the same family back where it can
    return model


def _all_finite(a: np.ndarray, rows: int = 4096) -> bool:
    """np.isfinite(a).all() a block of rows at a time (no tensor-sized temporary)."""
    return all(np.isfinite(a[i:i + rows]).all() for i in range(0, max(1, len(a)), rows)) if a.ndim else \
        bool(np.isfinite(a))


# ---- saving ----------------------------------------------------------------------------------------------


def hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """The model's tensors under transformers' names and layouts (see tensor_map; the tied lm-head left out)."""
    p = model.state_dict()
    return {name: np.ascontiguousarray(slot.view(p))
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
    model_type(cfg)  # refuse before writing anything
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
           "hf_state_dict", "save_tokenizer", "is_hf_folder", "MODEL_TYPES"]
