"""A plain PyTorch GPT-2 (nanoGPT-style, test-only oracle) that takes its weights from a fastllm GPT."""

from __future__ import annotations

import math

import numpy as np


def build(model, sdpa: bool = False):
    """-> (forward function, {fastllm param name: torch leaf tensor}) with the fastllm model's weights (float32).
    sdpa=True uses F.scaled_dot_product_attention (the fast path, as nanoGPT) instead of explicit softmax."""
    import torch
    import torch.nn.functional as F

    cfg = model.config
    params = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in model.p.items()}
    C, NH = cfg.n_embd, cfg.n_head

    def forward(idx, targets=None, hidden=False):
        """logits (B, T, V), or the mean CE loss given targets, or the final hidden states (B, T, C) if hidden."""
        idx = torch.as_tensor(np.asarray(idx, np.int64))
        B, T = idx.shape
        x = params["wte"][idx] + params["wpe"][:T]
        for l in range(cfg.n_layer):
            h = F.layer_norm(x, (C,), params["ln_1.weight"][l], params["ln_1.bias"][l], cfg.layernorm_eps)
            qkv = F.linear(h, params["attn.c_attn.weight"][l], params["attn.c_attn.bias"][l])
            q, k, v = qkv.split(C, dim=2)
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))
            if sdpa:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = (q @ k.transpose(-2, -1)) / math.sqrt(C // NH)
                att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
                y = att @ v
            y = y.transpose(1, 2).reshape(B, T, C)
            x = x + F.linear(y, params["attn.c_proj.weight"][l], params["attn.c_proj.bias"][l])
            h = F.layer_norm(x, (C,), params["ln_2.weight"][l], params["ln_2.bias"][l], cfg.layernorm_eps)
            h = F.gelu(F.linear(h, params["mlp.c_fc.weight"][l], params["mlp.c_fc.bias"][l]), approximate="tanh")
            x = x + F.linear(h, params["mlp.c_proj.weight"][l], params["mlp.c_proj.bias"][l])
        x = F.layer_norm(x, (C,), params["ln_f.weight"], params["ln_f.bias"], cfg.layernorm_eps)
        if hidden:
            return x
        logits = x @ params["wte"].T
        if targets is None:
            return logits
        t = torch.as_tensor(np.asarray(targets, np.int64))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), t.view(-1), ignore_index=-1)

    return forward, params
