"""Decode tokens/s with a KV cache, fastllm vs a PyTorch eager decoder with its own KV cache (same weights, same
process, same threads): greedy decoding of N tokens after a prompt, batch 1 and 8. Both in float32, both with bf16
weights (fastllm: bf16 weight copies for decode steps, fp32 activations rounded to bf16 at each matmul; torch: the
whole model in bfloat16), both with int8 weights (fastllm: weight-only, fp32 activations; torch: the kernels of
torch.ao.quantization.quantize_dynamic, activations quantized too), fastllm w8a8 (int8 weights and activations,
integer products: torch's int8 scheme), and torch's float32 model under
torch.autocast("cpu", dtype=torch.bfloat16) (the weights cast to bf16 at every matmul, as a mixed-precision training
script samples; by default only on a CPU with AVX512_BF16 or AMX), all interleaved. GPT-2 shapes by default; --arch
llama: Llama-family models (RoPE, RMSNorm, SwiGLU, grouped-query attention) with random weights in the shapes of
SmolLM2-135M and Qwen2.5-0.5B, and HF transformers' LlamaForCausalLM / Qwen2ForCausalLM on the same weights as a
further provider; --arch gemma2: Gemma 2's choices (GeGLU, embeddings times sqrt(C), norms after each branch too,
attention scores scaled by query_pre_attn_scalar**-0.5 and soft-capped at 50, final logits at 30, every other layer
sliding) in a small model (--quick) and in Gemma-2-2B's widths with 2 layers and a 32768-token vocabulary, both with a
window of 8 tokens, shorter than the prompt, so that the prefill and every decode step slide; the torch decoder runs
HF Gemma 2's eager attention (SDPA has no soft cap) and transformers' Gemma2ForCausalLM (its default attention,
eager) is the further provider; --arch olmo2: OLMo 2's choices (no norm before a branch, an RMSNorm after each
branch's output, QK-norm over all q and all k channels at once before RoPE, untied lm-head) in OLMo-2-0425-1B's
widths (16 heads of 128, MHA, MLP 8192) with 4 of its 16 layers and a 32768-token vocabulary (and a small model for
--quick), Olmo2ForCausalLM the further provider; --arch smollm3: SmolLM3-3B's (no RoPE in every fourth layer, GQA
16/4, MLP 11008, tied) with 4 of its 36 layers and a 32768-token vocabulary (and a small model), SmolLM3ForCausalLM
the further provider; --arch neox: GPT-NeoX's (LayerNorms, attention and MLP side by side, the exact GELU, RoPE on a
quarter of each head, biases, untied embed_out) in Pythia-70M's and Pythia-160M's shapes, whole (V 50304),
GPTNeoXForCausalLM the further provider. Those real widths in a few layers keep every model of every provider in
memory together (a few GB); a decode step's time is the sum of its layers' and the lm-head's.
    python benchmarks/bench_sample.py [--threads 2] [--quick] [--gpt2] [--arch gpt2|llama|gemma2|olmo2|smollm3|neox]
                                      [--autocast auto|on|off] [--prefill 512]
--prefill T also times the prefill of one T-token prompt (the issue 17 goal: 512 tokens, bf16 vs torch bf16).
    python benchmarks/bench_sample.py --quality-ckpt fastllm-demo/run --quality-data fastllm-demo/data
measures instead what bf16, int8 and w8a8 cost in validation loss on a trained checkpoint (see quality)."""

from __future__ import annotations

import collections
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import (  # noqa: E402
    AUTOCAST_OPTION,
    bench,
    cli,
    header,
    print_table,
    set_threads,
    sliding_mask,
    torch_attention,
    with_autocast,
)

from fastllm import _C, ops  # noqa: E402
from fastllm.model import GPT, MATRICES, MODERN, GPTConfig, KVCache  # noqa: E402

# random weights in the shapes of real checkpoints (their config.json), and the HF family that loads them; --quick
# runs the first of an arch
SHAPES = {
    "llama": {
        "SmolLM2-135M": ("llama", dict(vocab_size=49152, n_layer=30, n_head=9, n_kv_head=3, n_embd=576,
                                       mlp_hidden=1536, rope_theta=100000.0, layernorm_eps=1e-5)),
        "Qwen2.5-0.5B": ("qwen2", dict(vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, n_embd=896,
                                       mlp_hidden=4864, rope_theta=1000000.0, layernorm_eps=1e-6, qkv_bias=True)),
    },
    "gemma2": {  # Gemma-2-2B: C 2304, 26 layers, 8 heads and 4 kv heads of 256, MLP 9216, V 256000, window 4096
        "Gemma2-like 4L-576 V=8192": ("gemma2", dict(vocab_size=8192, n_layer=4, n_head=4, n_kv_head=2, head_dim=128,
                                                     n_embd=576, mlp_hidden=2304, sliding_window=8)),
        "Gemma-2-2B 2L V=32768": ("gemma2", dict(vocab_size=32768, n_layer=2, n_head=8, n_kv_head=4, head_dim=256,
                                                 n_embd=2304, mlp_hidden=9216, sliding_window=8)),
    },
    "olmo2": {  # OLMo-2-0425-1B: C 2048, 16 layers, 16 heads of 128 (MHA), MLP 8192, V 100352, untied
        "OLMo2-like 4L-512 V=8192": ("olmo2", dict(vocab_size=8192, n_layer=4, n_head=4, head_dim=128, n_embd=512,
                                                   mlp_hidden=2048)),
        "OLMo-2-1B 4L V=32768": ("olmo2", dict(vocab_size=32768, n_layer=4, n_head=16, head_dim=128, n_embd=2048,
                                               mlp_hidden=8192)),
    },
    "smollm3": {  # SmolLM3-3B: C 2048, 36 layers, 16 heads and 4 kv heads of 128, MLP 11008, V 128256, tied
        "SmolLM3-like 4L-512 V=8192": ("smollm3", dict(vocab_size=8192, n_layer=4, n_head=4, n_kv_head=1,
                                                       head_dim=128, n_embd=512, mlp_hidden=2752)),
        "SmolLM3-3B 4L V=32768": ("smollm3", dict(vocab_size=32768, n_layer=4, n_head=16, n_kv_head=4, head_dim=128,
                                                  n_embd=2048, mlp_hidden=11008)),
    },
    "neox": {  # Pythia-70M and -160M (config.json): 6 / 12 layers, 8 / 12 heads of 64, MLP 4C, V 50304, untied
        "Pythia-70M": ("gpt_neox", dict(vocab_size=50304, n_layer=6, n_head=8, n_embd=512, mlp_hidden=2048)),
        "Pythia-160M": ("gpt_neox", dict(vocab_size=50304, n_layer=12, n_head=12, n_embd=768, mlp_hidden=3072)),
    },
}
# each arch's choices (transformers' config defaults and the checkpoints' config.json): Llama's, Gemma 2's, OLMo 2's
# (OLMo-2-0425-1B: rope_theta 5e5, untied) and SmolLM3's (SmolLM3-3B: rope_theta 5e6, tied)
LLAMA = dict(MODERN, mlp="swiglu")
ARCHS = {
    "llama": LLAMA,
    "gemma2": dict(LLAMA, mlp="geglu", layernorm_eps=1e-6, post_norms=True, attn_softcap=50.0, logit_softcap=30.0),
    "olmo2": dict(LLAMA, layernorm_eps=1e-6, pre_norms=False, post_norms=True, qk_norm=True, qk_norm_over="all",
                  tie_embeddings=False, rope_theta=5e5),
    "smollm3": dict(LLAMA, layernorm_eps=1e-6, rope_theta=5e6),
    "neox": dict(positions="rope", mlp="gelu_erf", parallel_residual=True, partial_rotary_factor=0.25,
                 tie_embeddings=False),
}


def model_config(arch: str, shape: dict) -> GPTConfig:
    """The GPTConfig of a SHAPES entry with its arch's choices; per layer: Gemma 2's layers from the first on slide
    every other one (embeddings times sqrt(C), scores times query_pre_attn_scalar**-0.5 with the scalar the head
    size as in Gemma-2-2B), SmolLM3's every fourth has no RoPE (transformers' no_rope_layer_interval, 4)."""
    L, fields = shape["n_layer"], dict(ARCHS[arch])
    if arch == "gemma2":
        fields.update(embed_scale=shape["n_embd"] ** 0.5, attn_scale=shape["head_dim"] ** -0.5,
                      layer_types=[("sliding_attention", "full_attention")[l % 2] for l in range(L)])
    if arch == "smollm3":
        fields.update(nope_layers=[l for l in range(L) if l % 4 == 3])
    return GPTConfig(**{**fields, "block_size": 2048, **shape})


def torch_decoder(model: GPT, B: int, max_len: int, dtype=None, int8: bool = False):
    """A nanoGPT-style eager decoder of model's architecture (GPT-2, the Llama family, Gemma 2, OLMo 2, SmolLM3,
    GPT-NeoX: the parallel residual, the exact GELU) with
    a preallocated KV cache of the kv heads for max_len positions (torch.inference_mode, SDPA with grouped-query
    attention; with Gemma 2's options common.torch_attention: a sliding layer reads the last `window` rows of its
    cache, as HF's sliding-window cache layers hold them, and the soft-capped scores take HF Gemma 2's eager path;
    norms before and/or after each branch, QK-norm per head or over all heads, partial rotary dims and layers without
    RoPE as the config says, the way HF's models of those options compute them). int8: its linear
    layers and lm-head as torch.ao.quantization.quantize_dynamic makes them (the int8 inference a PyTorch user runs
    on a CPU): int8 weights with a scale per output channel, activations quantized per call (fbgemm/x86)."""
    import torch
    import torch.nn.functional as F

    from fastllm import rope

    warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")  # deprecated, still quantize_dynamic's
    warnings.filterwarnings("ignore", message="Mismatch dtype between input and weight")  # autocast: a post-norm's
    # bf16 input with its fp32 weight (torch's unfused rms_norm, as an autocast user gets)
    cfg = model.config
    dtype = dtype or torch.float32
    P = {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in model.p.items()}
    head = "wte" if cfg.tie_embeddings else "lm_head.weight"

    def bias(name, l):  # a matrix's bias where the model has one (the lm-head has none)
        b = name.replace(".weight", ".bias")
        return P[b][l] if name != head and b in P else None

    packed = {}
    for name in (*MATRICES, head) if int8 else ():
        for l, w in enumerate(P[name] if name != head else [P[name]]):
            qw = torch.quantize_per_channel(w, (w.abs().amax(1) / 127).double().clamp_min(1e-12),
                                            torch.zeros(len(w), dtype=torch.long), 0, torch.qint8)
            packed[name, l] = torch.ops.quantized.linear_prepack(qw, bias(name, l))

    def linear(x, name, l=0):
        if int8:
            return torch.ops.quantized.linear_dynamic(x, packed[name, l], True)  # reduce_range, as quantize_dynamic
        return F.linear(x, P[name] if name == head else P[name][l], bias(name, l))

    C, NH, NKV, hs, L, Tm = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.n_layer, max_len
    kc = torch.zeros(L, B, NKV, Tm, hs, dtype=dtype)
    vc = torch.zeros(L, B, NKV, Tm, hs, dtype=dtype)
    if cfg.positions == "rope":
        freq = torch.tensor(rope.inv_freq(hs, cfg.rope_theta, cfg.rope_scaling, cfg.partial_rotary_factor))
        ang = torch.arange(Tm, dtype=torch.float32)[:, None] * freq
        a = rope.attention_scaling(cfg.rope_scaling)  # (YaRN's temperature)
        cos, sin = ((torch.cat([f(ang), f(ang)], -1) * a).to(dtype) for f in (torch.cos, torch.sin))

    def norm(x, name, l=None):
        w = P[name + ".weight"] if l is None else P[name + ".weight"][l]
        if cfg.norm == "rmsnorm":
            return F.rms_norm(x, (C,), w, cfg.layernorm_eps)
        return F.layer_norm(x, (C,), w, P[name + ".bias"] if l is None else P[name + ".bias"][l], cfg.layernorm_eps)

    def rotate(x, pos, Tn):  # rotate-half over the first r dims (all of them but with a partial_rotary_factor)
        r = cos.shape[-1]
        y = x[..., :r]
        y = y * cos[pos:pos + Tn] + torch.cat([-y[..., r // 2:], y[..., :r // 2]], -1) * sin[pos:pos + Tn]
        return y if r == hs else torch.cat([y, x[..., r:]], -1)

    def pre(x, name, l):  # a branch's input: its norm (OLMo 2: none)
        return norm(x, name, l) if cfg.pre_norms else x

    def post(x, branch, l):  # Gemma 2, OLMo 2: a norm on the branch's output
        return norm(x, branch + ".post_norm", l) if cfg.post_norms else x

    def qk_norm(q, k, l, over):  # RMSNorm of the queries and keys over their last dim: at "all" (B, Tn, NH * hs) or
        # at "head" (B, Tn, NH, hs), where the config's qk_norm_over says
        if not cfg.qk_norm or cfg.qk_norm_over != over:
            return q, k
        return (F.rms_norm(t, t.shape[-1:], P[f"attn.{n}_norm.weight"][l], cfg.layernorm_eps) for t, n in
                ((q, "q"), (k, "k")))

    def attend(q, l, pos, Tn, masks):
        """q (B, NH, Tn, hs) of positions pos.. against layer l's cache."""
        window, cap = cfg.window(l), cfg.attn_softcap
        if window is None and cap is None:  # plain causal attention
            return F.scaled_dot_product_attention(q, kc[l, :, :, :pos + Tn], vc[l, :, :, :pos + Tn],
                                                  is_causal=Tn > 1, scale=cfg.attn_scale, enable_gqa=NKV != NH)
        first = 0 if window is None else max(0, pos - window + 1)  # the first row a new query sees
        if Tn > 1 and window not in masks:  # a prefill's mask, made once per step and kind of layer
            masks[window] = sliding_mask(torch, Tn, pos + Tn - first, window)
        return torch_attention(q, kc[l, :, :, first:pos + Tn], vc[l, :, :, first:pos + Tn], masks.get(window),
                               cfg.attn_scale, cap)

    @torch.inference_mode()
    def step(idx: torch.Tensor, pos: int) -> torch.Tensor:
        Tn = idx.shape[1]
        x = P["wte"][idx] * (cfg.embed_scale or 1.0) + (P["wpe"][pos:pos + Tn] if "wpe" in P else 0)
        masks = {}
        for l in range(L):
            qkv = linear(pre(x, "ln_1", l), "attn.c_attn.weight", l)
            q, k, v = qkv.split([NH * hs, NKV * hs, NKV * hs], dim=2)
            q, k = qk_norm(q, k, l, "all")
            q, k, v = q.view(B, Tn, NH, hs), k.view(B, Tn, NKV, hs), v.view(B, Tn, NKV, hs)
            q, k = qk_norm(q, k, l, "head")
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if cfg.has_rope(l):
                q, k = rotate(q, pos, Tn), rotate(k, pos, Tn)
            kc[l, :, :, pos:pos + Tn] = k
            vc[l, :, :, pos:pos + Tn] = v
            y = attend(q, l, pos, Tn, masks)
            x_in = x  # (the parallel residual's MLP reads the block's input)
            x = x + post(linear(y.transpose(1, 2).reshape(B, Tn, NH * hs), "attn.c_proj.weight", l), "attn", l)
            h = linear(pre(x_in if cfg.parallel_residual else x, "ln_2", l), "mlp.c_fc.weight", l)
            if cfg.mlp in ("swiglu", "geglu"):
                gate, up = h.chunk(2, dim=-1)
                h = (F.silu(gate) if cfg.mlp == "swiglu" else F.gelu(gate, approximate="tanh")) * up
            else:
                h = F.gelu(h, approximate="none" if cfg.mlp == "gelu_erf" else "tanh")
            x = x + post(linear(h, "mlp.c_proj.weight", l), "mlp", l)
        logits = linear(norm(x[:, -1], "ln_f"), head).float()
        return logits if cfg.logit_softcap is None else torch.tanh(logits / cfg.logit_softcap) * cfg.logit_softcap

    return step


def hf_decoder(model: GPT, family: str):
    """HF transformers' model of `family` on model's weights (float32; the config and tensors fastllm's
    save_pretrained writes), decoding with its own KV cache, in transformers' default attention: SDPA (Llama, Qwen2,
    OLMo 2, SmolLM3), eager for Gemma 2 (which has no SDPA path: SDPA has no soft cap)."""
    import torch
    import transformers

    from fastllm import hf as fastllm_hf

    config = fastllm_hf.config_to_hf(model.config, prefer=family)
    config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    state = {"lm_head.weight" if k == "embed_out.weight" else k: torch.from_numpy(v)  # (GPT-NeoX's head: embed_out
             for k, v in fastllm_hf.hf_state_dict(model).items()}  # in files, lm_head in transformers' memory)
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # (tied to the embedding)
    hf.float().eval()

    @torch.inference_mode()
    def run(rows: np.ndarray, n: int) -> np.ndarray:
        out = hf(input_ids=torch.from_numpy(rows), use_cache=True, logits_to_keep=1)
        toks = []
        for _ in range(n):
            toks.append(out.logits[:, -1].argmax(-1))
            out = hf(input_ids=toks[-1][:, None], cache=out.cache, use_cache=True)
        return torch.stack(toks).numpy()

    return run


def case(name: str, cfg: GPTConfig, B: int, prompt: int, n: int, repeats: int, family: str | None = None,
         autocast: bool = True) -> list:
    import torch

    model = GPT(cfg, seed=0).eval()
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, prompt))
    w16, w8, wq = model.bf16_weights(), model.int8_weights(), model.w8a8_weights()  # made once, outside the timing
    tsteps = {"f32": torch_decoder(model, B, prompt + n), "bf16": torch_decoder(model, B, prompt + n, torch.bfloat16),
              "int8": torch_decoder(model, B, prompt + n, int8=True)}  # .to(bfloat16) and quantize_dynamic

    def ours(weights):
        def run():
            cache = model.kv_cache(B, weights=weights, max_len=prompt + n)  # sized like generate() does
            logits = cache.prefill([list(r) for r in rows])
            toks = []
            for _ in range(n):
                toks.append(logits.argmax(-1))
                logits = cache.decode(toks[-1])
            return np.stack(toks)
        return run

    def theirs(tstep, autocast: bool = False):
        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                logits = tstep(torch.from_numpy(rows), 0)
                toks = []
                for i in range(n):
                    toks.append(logits.argmax(-1))
                    logits = tstep(toks[-1][:, None], prompt + i)
            return torch.stack(toks).numpy()
        return run

    fns = {"fastllm": ours("float32"), "torch": theirs(tsteps["f32"]), "fastllm bf16": ours(w16),
           "torch bf16": theirs(tsteps["bf16"]), "fastllm int8": ours(w8), "torch int8": theirs(tsteps["int8"]),
           "fastllm w8a8": ours(wq)}
    if autocast:
        fns["torch autocast"] = theirs(torch_decoder(model, B, prompt + n), autocast=True)
    if family:
        hf = hf_decoder(model, family)
        fns["transformers"] = lambda: hf(rows, n)
    toks = {k: f() for k, f in fns.items()}
    same = f"{np.mean(toks['fastllm'] == toks['torch']):.0%}"  # greedy tokens equal to torch fp32's
    same16 = f"{np.mean(toks['fastllm bf16'] == toks['fastllm']):.0%}"
    r = bench(fns, repeats=repeats, warmup=0)
    s = {k: v["median"] for k, v in r.items()}
    tps = {k: f"{B * n / v:,.0f}" for k, v in s.items()}
    row = [name, str(B), str(n), tps["fastllm"], tps["torch"], f"{s['torch'] / s['fastllm']:.2f}x", same,
           tps["fastllm bf16"], tps["torch bf16"], f"{s['torch bf16'] / s['fastllm bf16']:.2f}x",
           f"{s['torch'] / s['fastllm bf16']:.2f}x", same16, tps["fastllm int8"], tps["torch int8"],
           f"{s['torch int8'] / s['fastllm int8']:.2f}x", f"{s['torch bf16'] / s['fastllm int8']:.2f}x",
           f"{np.mean(toks['fastllm int8'] == toks['fastllm']):.0%}", tps["fastllm w8a8"],
           f"{s['torch int8'] / s['fastllm w8a8']:.2f}x", f"{s['torch bf16'] / s['fastllm w8a8']:.2f}x",
           f"{np.mean(toks['fastllm w8a8'] == toks['fastllm']):.0%}"]
    if autocast:
        row += [tps["torch autocast"], f"{s['torch autocast'] / s['fastllm bf16']:.2f}x"]
    if family:
        row += [tps["transformers"], f"{s['transformers'] / s['fastllm']:.2f}x",
                f"{np.mean(toks['fastllm'] == toks['transformers']):.0%}"]
    return row


def prefill_case(name: str, cfg: GPTConfig, T: int, repeats: int, autocast: bool) -> list:
    """The prefill of one T-token prompt (the KV cache filled, the last token's logits): fastllm fp32, with bf16
    weights (over KVCache.BF16_MAX_ROWS rows: the bf16 GEMM on the fp32 weights where the CPU has AMX or AVX512_BF16,
    else the fp32 GEMM) and w8a8 vs torch fp32, torch's bf16 model, its dynamic int8 model and autocast."""
    import torch

    model = GPT(cfg, seed=0).eval()
    row = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T))
    w16, wq = model.bf16_weights(), model.w8a8_weights()
    steps = {"torch": torch_decoder(model, 1, T), "torch bf16": torch_decoder(model, 1, T, torch.bfloat16),
             "torch int8": torch_decoder(model, 1, T, int8=True)}
    fns = {"fastllm": lambda: model.kv_cache(1, max_len=T).prefill([list(row[0])]),
           "fastllm bf16": lambda: model.kv_cache(1, weights=w16, max_len=T).prefill([list(row[0])]),
           "fastllm w8a8": lambda: model.kv_cache(1, weights=wq, max_len=T).prefill([list(row[0])]),
           **{k: (lambda f=f: f(torch.from_numpy(row), 0)) for k, f in steps.items()}}
    if autocast:
        ac = torch_decoder(model, 1, T)

        def torch_autocast():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return ac(torch.from_numpy(row), 0)

        fns["torch autocast"] = torch_autocast
    s = {k: v["median"] for k, v in bench(fns, repeats=repeats, warmup=1).items()}
    out = [name, str(T), *(f"{s[k] * 1e3:.0f}" for k in fns), f"{s['torch'] / s['fastllm']:.2f}x",
           f"{s['torch bf16'] / s['fastllm bf16']:.2f}x", f"{s['torch int8'] / s['fastllm w8a8']:.2f}x",
           f"{s['torch bf16'] / s['fastllm w8a8']:.2f}x"]
    return out + ([f"{s['torch autocast'] / s['fastllm bf16']:.2f}x"] if autocast else [])


def quality(ckpt: str, data: str, B: int, T: int) -> None:
    """What low-precision weights cost in quality, on a trained checkpoint: the mean cross-entropy of B windows of T
    tokens of the validation split (data: a prepared data folder, e.g. fastllm demo's out/data) through each
    decoder's KV cache, one token per step -- the exact path of generation -- fastllm with float32, bf16 and int8
    weights and w8a8, and torch's float32, bf16 and quantize_dynamic int8 models."""
    import torch

    from fastllm import load_model
    from fastllm.data import DataLoader

    model = load_model(ckpt).eval()
    T = min(T, model.config.block_size)
    x, y = DataLoader(data, "val", B, T, shuffle=False).next_batch()

    def fastllm_step(weights):
        cache = model.kv_cache(B, weights=weights, max_len=T)
        return lambda ids, pos: cache.prefill([[int(t)] for t in ids]) if pos == 0 else cache.decode(ids)

    def torch_step(**kw):
        step = torch_decoder(model, B, T, **kw)
        return lambda ids, pos: step(torch.from_numpy(ids[:, None].astype(np.int64)), pos).numpy()

    steps = {"fastllm fp32": fastllm_step("float32"), "fastllm bf16w": fastllm_step("bfloat16"),
             "fastllm int8w": fastllm_step("int8"), "fastllm w8a8": fastllm_step("w8a8"), "torch fp32": torch_step(),
             "torch bf16": torch_step(dtype=torch.bfloat16), "torch int8 (dynamic)": torch_step(int8=True)}
    rows, base = [], None
    for name, step in steps.items():
        nll = np.zeros((B, T))
        for t in range(T):
            z = step(x[:, t], t).astype(np.float64)
            z -= z.max(1, keepdims=True)
            nll[:, t] = np.log(np.exp(z).sum(1)) - z[np.arange(B), y[:, t]]
        base = nll if base is None else base
        diff = nll - base  # paired, token by token: its standard error says whether a difference is real
        rows.append([name, f"{nll.mean():.4f}", f"{np.exp(nll.mean()):.3f}", f"{diff.mean():+.5f}",
                     f"{diff.std() / np.sqrt(diff.size):.5f}"])
    print(f"\nquality on the validation split: {ckpt} ({model.num_parameters / 1e6:.2f}M parameters), {B} x {T} "
          "tokens of " + data + ", decoded token by token through each KV cache")
    print_table(rows, ["decoder", "val loss", "perplexity", "vs fastllm fp32", "stderr of that"])


class OpTimer:
    """Stands in for a model's CPU backend (fastllm.ops; its kernels run synchronously) and adds up the seconds of
    each call by op; a matmul's op name carries its weight's shape, so the lm-head and each projection show apart."""

    def __init__(self, bk):
        self.bk, self.seconds = bk, collections.defaultdict(float)

    def __getattr__(self, name):
        f = getattr(self.bk, name)
        if not callable(f):
            return f

        def timed(*args, **kwargs):
            op = name
            if name == "matmul_forward" and hasattr(args[1], "shape"):
                op = f"matmul {tuple(args[1].shape)}"
            t0 = time.perf_counter()
            out = f(*args, **kwargs)
            self.seconds[op] += time.perf_counter() - t0
            return out

        return timed


def profile_step(name: str, cfg: GPTConfig, B: int, prompt: int, n: int) -> None:
    """Where one decode step's time goes: fastllm by op (fp32 and bf16 weights, the mean of n steps after a prompt)
    beside torch.profiler's table of the eager decoder's steps."""
    import torch

    model = GPT(cfg, seed=0).eval()
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, prompt))
    print(f"\n{name}, B={B}: one decode step at position {prompt}..{prompt + n}, ms per step")
    for weights in ("float32", model.bf16_weights()):
        cache = model.kv_cache(B, weights=weights, max_len=prompt + n + 1)
        tok = cache.prefill([list(r) for r in rows]).argmax(-1)
        tok = cache.decode(tok).argmax(-1)  # warm-up
        timer, bk = OpTimer(model.bk), model.bk
        model.bk = timer
        t0 = time.perf_counter()
        try:
            for _ in range(n):
                tok = cache.decode(tok).argmax(-1)
        finally:
            model.bk = bk
        total = (time.perf_counter() - t0) / n
        ops = sorted(timer.seconds.items(), key=lambda kv: -kv[1]) + [("python, the rest", total * n - sum(
            timer.seconds.values()))]
        label = "fp32" if weights == "float32" else "bf16 weights"
        print(f"fastllm {label}: {total * 1e3:.1f} ms/step = " + ", ".join(f"{op} {t / n * 1e3:.2f}" for op, t in ops))
    step = torch_decoder(model, B, prompt + n + 1)
    tok = step(torch.from_numpy(rows), 0).argmax(-1)
    tok = step(tok[:, None], prompt).argmax(-1)  # warm-up
    with torch.profiler.profile() as prof:
        for i in range(n):
            tok = step(tok[:, None], prompt + 1 + i).argmax(-1)
    print(f"torch fp32 (self CPU time of the {n} steps):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


def run(threads: int = 2, quick: bool = False, gpt2: bool = False, arch: str = "gpt2", profile: bool = False,
        autocast: str = "auto", prefill: int = 0, quality_ckpt: str = "", quality_data: str = "") -> None:
    set_threads(threads)
    print(header("decode with KV cache (prefill + n greedy tokens)", threads))
    if quality_ckpt:
        quality(quality_ckpt, quality_data, 8 if quick else 16, 256)
        return
    if profile:
        shapes = arch if arch in SHAPES else "llama"
        for name, (_, shape) in SHAPES[shapes].items():
            profile_step(name, model_config(shapes, shape), 1, 16, 8)
        return
    ac = with_autocast(autocast)
    head = ["model", "B", "new", "fastllm", "torch", "torch/fastllm", "same", "fastllm bf16w", "torch bf16",
            "torch bf16/fastllm bf16w", "torch fp32/fastllm bf16w", "same bf16", "fastllm int8w", "torch int8",
            "torch int8/fastllm int8w", "torch bf16/fastllm int8w", "same int8", "fastllm w8a8",
            "torch int8/fastllm w8a8", "torch bf16/fastllm w8a8", "same w8a8"]
    head += ["torch autocast", "torch autocast/fastllm bf16w"] if ac else []
    rows = []
    if arch in SHAPES:
        for name, (family, shape) in list(SHAPES[arch].items())[:1 if quick else None]:
            cfg = model_config(arch, shape)
            for B in (1, 8):
                rows.append(case(name, cfg, B, 16, 16 if quick else 32, 2 if quick else 3, family, ac))
        head += ["transformers", "transformers/fastllm", "same hf"]
    else:
        small = GPTConfig(vocab_size=4096, n_layer=6, n_head=6, n_embd=384, block_size=256)
        for B in (1, 8):
            rows.append(case("6L-384 V=4096", small, B, 16, 32 if quick else 100, 3 if quick else 5, autocast=ac))
        if gpt2:
            g = GPTConfig.preset("gpt2", vocab_size=50257)
            for B in (1, 8):
                rows.append(case("gpt2 124M", g, B, 16, 50, 5, autocast=ac))
    print("prompt 16 tokens; tok/s = B * new / time (prefill included); 'same' = greedy tokens equal to torch fp32's"
          " (fastllm fp32), to fastllm fp32's (bf16, int8) and, 'same hf', transformers' equal to fastllm fp32's; "
          "int8w = int8 weight-only (per-row scales, fp32 activations), torch int8 = quantize_dynamic's kernels "
          "(int8 weights per channel, activations quantized per call), w8a8 = fastllm's int8 weights and int8 "
          "activations (per row, integer products)")
    print_table(rows, head)
    if prefill:
        cfgs = {n: model_config(arch, sh) for n, (_, sh) in SHAPES[arch].items()} if arch in SHAPES else \
            {"6L-384 V=4096": small, **({"gpt2 124M": GPTConfig.preset("gpt2", vocab_size=50257)} if gpt2 else {})}
        rows = [prefill_case(n, c, min(prefill, c.block_size), 2 if quick else 3, ac) for n, c in cfgs.items()]
        how = ("the snapshot packed for the bf16 GEMM (ops.Bf16Panels), every row on it" if ops.bf16_panels_preferred()
               else f"over {KVCache.BF16_MAX_ROWS} rows the bf16 GEMM on the fp32 weights where the CPU has AMX or "
               "AVX512_BF16, else the fp32 GEMM")
        print(f"\nprefill of one prompt, ms (batch 1); 'fastllm bf16' = bf16 weights ({how}; bf16 GEMM kernel "
              f"{_C.bf16_gemm_path()})")
        print_table(rows, ["model", "T", "fastllm", "fastllm bf16", "fastllm w8a8", "torch", "torch bf16", "torch int8"]
                    + (["torch autocast"] if ac else []) + ["torch/fastllm", "torch bf16/fastllm bf16",
                                                            "torch int8/fastllm w8a8", "torch bf16/fastllm w8a8"]
                    + (["torch autocast/fastllm bf16"] if ac else []))


if __name__ == "__main__":
    cli(run, __doc__, gpt2="also GPT-2 124M", autocast=AUTOCAST_OPTION,
        profile="instead of the table: where one decode step's time goes, by op, in the --arch shapes (llama's for "
                "gpt2; B=1)",
        prefill=("also time the prefill of one prompt of this many tokens (at most the block size; 0: no), e.g. 512",
                 0),
        quality_ckpt=("instead of the table: validation loss of the decoders (fp32, bf16, int8 weights) on this "
                      "trained checkpoint, e.g. fastllm-demo/run after `fastllm demo`", ""),
        quality_data=("the prepared data folder whose val split --quality-ckpt reads, e.g. fastllm-demo/data", ""),
        arch=("the model family: gpt2 (GPT-2 shapes), llama (SmolLM2-135M and Qwen2.5-0.5B shapes), gemma2 "
              "(Gemma 2's options, a small model and Gemma-2-2B's widths in 2 layers), olmo2 (OLMo 2's options, a "
              "small model and OLMo-2-0425-1B's widths in 4 layers) or smollm3 (NoPE every 4th layer, a small model "
              "and SmolLM3-3B's widths in 4 layers) or neox (GPT-NeoX's options in Pythia-70M's and -160M's shapes), "
              "random weights", "gpt2", "gpt2", "llama", "gemma2", "olmo2", "smollm3", "neox"))
