"""A plain PyTorch transformer (nanoGPT-style, test-only oracle) that takes its weights from a fastllm GPT: GPT-2 and
every architecture option of GPTConfig (rope, rmsnorm, GQA, QK-norm, gelu/swiglu/relu2, biases, untied lm-head,
logit soft-capping), written from the definitions, independently of fastllm's kernels. HF transformers' Llama /
Qwen2 / Qwen3 / Mistral (tests/test_model_arch.py) check it where a family exists."""

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
    C, NH, NKV, hd, H, eps = cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_size, cfg.mlp_width, cfg.layernorm_eps
    head = params["wte" if cfg.tie_embeddings else "lm_head.weight"]
    if cfg.positions == "rope":  # HF's rotate-half RoPE: angle = position * inv_freq, cos/sin over [freqs, freqs]
        freq = torch.tensor(rope.inv_freq(hd, cfg.rope_theta, cfg.rope_scaling))
        ang = torch.arange(cfg.block_size, dtype=torch.float32)[:, None] * freq[None, :]
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def p(name, l=None):
        t = params.get(name)
        return t if t is None or l is None else t[l]

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def norm(x, w, b):
        return F.layer_norm(x, (x.shape[-1],), w, b, eps) if cfg.norm == "layernorm" else rmsnorm(x, w)

    def rotate(x, T):  # x (B, heads, T, hd)
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos[:T] + rot * sin[:T]

    def forward(idx, targets=None, hidden=False):
        """logits (B, T, V), or the mean CE loss given targets, or the final hidden states (B, T, C) if hidden."""
        idx = torch.as_tensor(np.asarray(idx, np.int64))
        B, T = idx.shape
        x = params["wte"][idx]
        if cfg.positions == "learned":
            x = x + params["wpe"][:T]
        for l in range(cfg.n_layer):
            h = norm(x, p("ln_1.weight", l), p("ln_1.bias", l))
            qkv = F.linear(h, p("attn.c_attn.weight", l), p("attn.c_attn.bias", l))
            q, k, v = qkv.split([NH * hd, NKV * hd, NKV * hd], dim=2)
            q, k, v = q.view(B, T, NH, hd), k.view(B, T, NKV, hd), v.view(B, T, NKV, hd)
            if cfg.qk_norm:
                q, k = rmsnorm(q, p("attn.q_norm.weight", l)), rmsnorm(k, p("attn.k_norm.weight", l))
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if cfg.positions == "rope":
                q, k = rotate(q, T), rotate(k, T)
            k, v = k.repeat_interleave(NH // NKV, dim=1), v.repeat_interleave(NH // NKV, dim=1)
            if sdpa:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
                att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
                y = att @ v
            y = y.transpose(1, 2).reshape(B, T, NH * hd)
            x = x + F.linear(y, p("attn.c_proj.weight", l), p("attn.c_proj.bias", l))
            h = norm(x, p("ln_2.weight", l), p("ln_2.bias", l))
            u = F.linear(h, p("mlp.c_fc.weight", l), p("mlp.c_fc.bias", l))
            if cfg.mlp == "gelu":
                u = F.gelu(u, approximate="tanh")
            elif cfg.mlp == "relu2":
                u = F.relu(u).square()
            else:
                gate, up = u.split(H, dim=-1)
                u = F.silu(gate) * up
            x = x + F.linear(u, p("mlp.c_proj.weight", l), p("mlp.c_proj.bias", l))
        x = norm(x, params["ln_f.weight"], params.get("ln_f.bias"))
        if hidden:
            return x
        logits = x @ head.T
        if cfg.logit_softcap is not None:
            logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        if targets is None:
            return logits
        t = torch.as_tensor(np.asarray(targets, np.int64))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), t.view(-1), ignore_index=-1)

    return forward, params
