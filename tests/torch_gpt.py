"""A plain PyTorch transformer (nanoGPT-style, test-only oracle) that takes its weights from a fastllm GPT: GPT-2 and
every architecture option of GPTConfig (rope with partial rotary dims and NoPE layers, rmsnorm, GQA, QK-norm per
head or over all heads, gelu (tanh) / gelu_erf (exact) / swiglu / geglu / relu2, biases, untied lm-head, logit
soft-capping, Gemma's embedding scale, post-norms with or without pre-norms, score scale and soft cap, sliding windows
and local RoPE base, Granite's residual and logit scales, GPT-NeoX's parallel residual),
written from the definitions, independently of fastllm's kernels. HF transformers' Llama /
Qwen2 / Qwen3 / Mistral (hf_twin: the same weights under HF's names) check it where a family exists."""

from __future__ import annotations

import math

import numpy as np


def build(model, sdpa: bool = False):
    """-> (forward function, {fastllm param name: torch leaf tensor}) with the fastllm model's weights (float32).
    sdpa=True uses F.scaled_dot_product_attention (the fast path, as nanoGPT) instead of explicit softmax."""
    import torch
    import torch.nn.functional as F

    from fastllm import rope

    cfg = model.config
    params = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in model.state_dict().items()}
    NH, NKV, hd, H, eps = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.mlp_width, cfg.layernorm_eps
    head = params["wte" if cfg.tie_embeddings else "lm_head.weight"]
    def tables(theta, scaling):  # HF's rotate-half RoPE: angle = position * inv_freq, cos/sin over [freqs, freqs]
        freq = torch.tensor(rope.inv_freq(hd, theta, scaling, cfg.partial_rotary_factor))
        ang = torch.arange(cfg.block_size, dtype=torch.float32)[:, None] * freq[None, :]
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
        return [t * rope.attention_scaling(scaling) for t in (cos, sin)]  # (YaRN's temperature)

    if cfg.positions == "rope":  # per layer: sliding layers may have a base of their own (Gemma 3)
        full = tables(cfg.rope_theta, cfg.rope_scaling)
        local = full if cfg.rope_local_theta is None else tables(cfg.rope_local_theta, None)
        ropes = [full if cfg.window(l) is None else local for l in range(cfg.n_layer)]
        ropes = [r if l not in (cfg.nope_layers or ()) else None for l, r in enumerate(ropes)]  # NoPE layers

    def p(name, l=None):
        t = params.get(name)
        return t if t is None or l is None else t[l]

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def norm(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, eps) if cfg.norm == "layernorm" else rmsnorm(x, w)

    def rotate(x, T, l):  # x (B, heads, T, hd): the first rotary dims turn (rotate-half within them), the rest pass
        if ropes[l] is None:
            return x
        cos, sin = ropes[l]
        r = cos.shape[-1]
        x, rest = x[..., :r], x[..., r:]
        rot = torch.cat([-x[..., r // 2:], x[..., :r // 2]], -1)
        return torch.cat([x * cos[:T] + rot * sin[:T], rest], -1)

    def pre(x, name, l):  # a branch's input: its pre-norm (none in OLMo 2)
        return norm(x, p(f"{name}.weight", l), p(f"{name}.bias", l)) if cfg.pre_norms else x

    def post(x, branch, l):  # Gemma 2/3: a norm on the branch's output
        w = p(f"{branch}.post_norm.weight", l)
        return x if w is None else norm(x, w, p(f"{branch}.post_norm.bias", l))

    def forward(idx, targets=None, hidden=False):
        """logits (B, T, V), or the mean CE loss given targets, or the final hidden states (B, T, C) if hidden."""
        idx = torch.as_tensor(np.asarray(idx, np.int64))
        B, T = idx.shape
        m = cfg.residual_scale or 1.0  # (Granite's residual_multiplier)
        x = params["wte"][idx] * (cfg.embed_scale or 1.0)
        if cfg.positions == "learned":
            x = x + params["wpe"][:T]
        for l in range(cfg.n_layer):
            h = pre(x, "ln_1", l)
            qkv = F.linear(h, p("attn.c_attn.weight", l), p("attn.c_attn.bias", l))
            q, k, v = qkv.split([NH * hd, NKV * hd, NKV * hd], dim=2)
            if cfg.qk_norm and cfg.qk_norm_over == "all":  # OLMo 2: over all q (k) channels, before the head split
                q, k = rmsnorm(q, p("attn.q_norm.weight", l)), rmsnorm(k, p("attn.k_norm.weight", l))
            q, k, v = q.reshape(B, T, NH, hd), k.reshape(B, T, NKV, hd), v.reshape(B, T, NKV, hd)
            if cfg.qk_norm and cfg.qk_norm_over == "head":
                q, k = rmsnorm(q, p("attn.q_norm.weight", l)), rmsnorm(k, p("attn.k_norm.weight", l))
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if cfg.positions == "rope":
                q, k = rotate(q, T, l), rotate(k, T, l)
            k, v = k.repeat_interleave(NH // NKV, dim=1), v.repeat_interleave(NH // NKV, dim=1)
            scale, cap, window = cfg.attn_scale or 1 / math.sqrt(hd), cfg.attn_softcap, cfg.window(l)
            if sdpa and cap is None and window is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
            else:
                att = (q @ k.transpose(-2, -1)) * scale
                if cap is not None:
                    att = cap * torch.tanh(att / cap)
                t = torch.arange(T)
                masked = t[None, :] > t[:, None]  # a key after the query
                if window is not None:
                    masked |= t[:, None] - t[None, :] >= window  # or window or more before it
                y = att.masked_fill(masked, float("-inf")).softmax(-1) @ v
            y = y.transpose(1, 2).reshape(B, T, NH * hd)
            x_in = x  # the block's input: the parallel residual's MLP reads it too
            x = x + post(F.linear(y, p("attn.c_proj.weight", l), p("attn.c_proj.bias", l)), "attn", l) * m
            h = pre(x_in if cfg.parallel_residual else x, "ln_2", l)
            u = F.linear(h, p("mlp.c_fc.weight", l), p("mlp.c_fc.bias", l))
            if cfg.mlp in ("gelu", "gelu_erf"):
                u = F.gelu(u, approximate="tanh" if cfg.mlp == "gelu" else "none")
            elif cfg.mlp == "relu2":
                u = F.relu(u).square()
            else:
                gate, up = u.split(H, dim=-1)
                u = (F.silu(gate) if cfg.mlp == "swiglu" else F.gelu(gate, approximate="tanh")) * up
            x = x + post(F.linear(u, p("mlp.c_proj.weight", l), p("mlp.c_proj.bias", l)), "mlp", l) * m
        x = norm(x, params["ln_f.weight"], params.get("ln_f.bias"))
        if hidden:
            return x
        logits = x @ head.T
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        if cfg.logits_scaling is not None:  # (Granite)
            logits = logits / cfg.logits_scaling
        if targets is None:
            return logits
        t = torch.as_tensor(np.asarray(targets, np.int64))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), t.view(-1), ignore_index=-1)

    return forward, params


def hf_twin(model, family: str, attn: str = "eager"):
    """The transformers model of `family` ("llama", "mistral", "qwen2", "qwen3") with model's weights (float32;
    attn: HF's attention implementation)."""
    import torch
    import transformers

    cfg = model.config
    NH, NKV, hd, H = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.mlp_width
    kw = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=H, num_hidden_layers=cfg.n_layer,
              num_attention_heads=NH, num_key_value_heads=NKV, head_dim=hd, max_position_embeddings=cfg.block_size,
              rms_norm_eps=cfg.layernorm_eps, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling,
              tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu")
    if family == "llama":
        kw.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}[family]
    hf_cfg = getattr(transformers, f"{cls}Config")(**kw)
    hf_cfg._attn_implementation = attn
    hf = getattr(transformers, f"{cls}ForCausalLM")(hf_cfg).float().eval()
    sd = hf_names(model)
    missing, unexpected = hf.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf


def hf_names(model) -> dict[str, np.ndarray]:
    """fastllm tensors under HF Llama-family names (the spec's mapping): q/k/v rows of c_attn, gate/up rows of c_fc."""
    cfg, p = model.config, {k: np.array(v) for k, v in model.state_dict().items()}
    NH, NKV, hd, H = cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.mlp_width
    cuts = [0, NH * hd, (NH + NKV) * hd, (NH + 2 * NKV) * hd]
    out = {"model.embed_tokens.weight": p["wte"], "model.norm.weight": p["ln_f.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = p["lm_head.weight"]
    for l in range(cfg.n_layer):
        pre = f"model.layers.{l}."
        out[pre + "input_layernorm.weight"] = p["ln_1.weight"][l]
        out[pre + "post_attention_layernorm.weight"] = p["ln_2.weight"][l]
        for i, n in enumerate("qkv"):
            out[pre + f"self_attn.{n}_proj.weight"] = p["attn.c_attn.weight"][l][cuts[i]:cuts[i + 1]]
            if cfg.qkv_bias:
                out[pre + f"self_attn.{n}_proj.bias"] = p["attn.c_attn.bias"][l][cuts[i]:cuts[i + 1]]
        out[pre + "self_attn.o_proj.weight"] = p["attn.c_proj.weight"][l]
        if cfg.proj_bias:
            out[pre + "self_attn.o_proj.bias"] = p["attn.c_proj.bias"][l]
        if cfg.qk_norm:
            out[pre + "self_attn.q_norm.weight"] = p["attn.q_norm.weight"][l]
            out[pre + "self_attn.k_norm.weight"] = p["attn.k_norm.weight"][l]
        out[pre + "mlp.gate_proj.weight"] = p["mlp.c_fc.weight"][l][:H]
        out[pre + "mlp.up_proj.weight"] = p["mlp.c_fc.weight"][l][H:]
        out[pre + "mlp.down_proj.weight"] = p["mlp.c_proj.weight"][l]
        if cfg.mlp_bias:
            out[pre + "mlp.gate_proj.bias"] = p["mlp.c_fc.bias"][l][:H]
            out[pre + "mlp.up_proj.bias"] = p["mlp.c_fc.bias"][l][H:]
            out[pre + "mlp.down_proj.bias"] = p["mlp.c_proj.bias"][l]
    return out
