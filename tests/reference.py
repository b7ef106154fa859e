"""Float64 numpy references for every kernel, written for clarity (the spec the native code must meet).
PyTorch autograd is the second oracle for gradients (tests import it with pytest.importorskip)."""

from __future__ import annotations

import math

import numpy as np

GELU_K = np.sqrt(2.0 / np.pi)


def f64(*arrays):
    return [None if a is None else np.asarray(a, np.float64) for a in arrays]


def matmul_forward(inp, weight, bias=None):
    inp, weight, bias = f64(inp, weight, bias)
    out = inp @ weight.T
    return out if bias is None else out + bias


def matmul_backward(dout, inp, weight):
    dout, inp, weight = f64(dout, inp, weight)
    return dout @ weight, dout.T @ inp, dout.sum(0)


def attention_forward(qkv, n_head, scale=None, softcap=None, window=None):
    """qkv (B, T, 3C) -> out (B, T, C), lse (B, NH, T); causal, scores as in attention_scores (multi-head attention is
    grouped-query attention with n_kv_head = n_head: the same qkv layout)."""
    return gqa_attention_forward(qkv, n_head, n_head, scale, softcap, window)


def attention_backward(dout, qkv, n_head, scale=None, softcap=None, window=None):
    return gqa_attention_backward(dout, qkv, n_head, n_head, scale, softcap, window)


def softmax_ce(logits, targets, grad_scale=1.0, ignore_index=-1):
    """-> (losses (N,), dlogits (N, V)) for logits (N, V)."""
    (logits,) = f64(logits)
    targets = np.asarray(targets).reshape(-1)
    logits = logits.reshape(len(targets), -1)
    mx = logits.max(-1, keepdims=True)
    lse = mx[:, 0] + np.log(np.exp(logits - mx).sum(-1))
    keep = targets != ignore_index
    safe = np.where(keep, targets, 0)
    losses = np.where(keep, lse - logits[np.arange(len(targets)), safe], 0.0)
    d = np.exp(logits - lse[:, None])
    d[np.arange(len(targets)), safe] -= 1.0
    d = np.where(keep[:, None], d, 0.0) * grad_scale
    return losses, d


def softmax_ce_tempered(logits, targets, temperature=1.0, softcap=None, grad_scale=1.0, ignore_index=-1):
    """softmax_ce of u = z / temperature, z = softcap * tanh(logits / softcap) (or the logits): the losses
    -log softmax(u)[target] and the gradient with respect to the logits, du/dz = 1 / temperature times
    dz/dlogits = 1 - (z / softcap)^2."""
    (z,) = f64(logits)
    z = z.reshape(len(np.asarray(targets).reshape(-1)), -1)
    if softcap is not None:
        z = softcap * np.tanh(z / softcap)
    losses, du = softmax_ce(z / temperature, targets, grad_scale, ignore_index)
    dz = du / temperature
    return losses, dz if softcap is None else dz * (1.0 - (z / softcap) ** 2)


def layernorm_forward(x, w, b, eps=1e-5):
    x, w, b = f64(x, w, b)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    return (x - mean) * rstd * w + b, mean[..., 0], rstd[..., 0]


def layernorm_backward(dout, x, w, eps=1e-5):
    dout, x, w = f64(dout, x, w)
    C = x.shape[-1]
    mean = x.mean(-1, keepdims=True)
    rstd = 1.0 / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    g = dout * w
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    red = tuple(range(x.ndim - 1))
    return dx, (dout * xhat).sum(red).reshape(C), dout.sum(red).reshape(C)


def gelu_forward(x):
    (x,) = f64(x)
    return 0.5 * x * (1 + np.tanh(GELU_K * (x + 0.044715 * x**3)))


def gelu_backward(dout, x):
    dout, x = f64(dout, x)
    th = np.tanh(GELU_K * (x + 0.044715 * x**3))
    return dout * (0.5 * (1 + th) + 0.5 * x * (1 - th**2) * GELU_K * (1 + 3 * 0.044715 * x**2))


def normal_cdf(x):
    """Phi(x) = 0.5 erfc(-x / sqrt(2)), the standard normal CDF, in float64 (math.erfc: accurate in the tail)."""
    return 0.5 * np.vectorize(math.erfc, otypes=[np.float64])(-np.asarray(x, np.float64) / math.sqrt(2.0))


def gelu_erf_forward(x):
    """The exact GELU: x Phi(x)."""
    (x,) = f64(x)
    return x * normal_cdf(x)


def gelu_erf_backward(dout, x):
    """dout * (Phi(x) + x phi(x)), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    dout, x = f64(dout, x)
    return dout * (normal_cdf(x) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi))


def embedding_forward(tokens, wte, wpe, scale=1.0):
    """wte[tokens] * scale + wpe[:T] (wpe None: no position embedding); Gemma's scale is sqrt(C)."""
    wte, wpe = f64(wte, wpe)
    T = tokens.shape[1]
    return wte[tokens] * scale + (0.0 if wpe is None else wpe[:T])


def embedding_backward(dout, tokens, V, maxT, scale=1.0):
    """-> dwte (V, C) (the scattered dout rows * scale), dwpe (maxT, C) (dout summed over the batch, unscaled)."""
    (dout,) = f64(dout)
    B, T, C = dout.shape
    dwte = np.zeros((V, C))
    np.add.at(dwte, tokens.reshape(-1), scale * dout.reshape(-1, C))
    dwpe = np.zeros((maxT, C))
    dwpe[:T] = dout.sum(0)
    return dwte, dwpe


def adamw_step(p, g, m, v, lr, t, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_scale=1.0):
    p, g, m, v = f64(p, g, m, v)
    g = g * grad_scale
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    mhat, vhat = m / (1 - beta1**t), v / (1 - beta2**t)
    p = p - lr * (mhat / (np.sqrt(vhat) + eps) + weight_decay * p)
    return p, m, v


def bf16_round(x):
    """float32 values rounded to the nearest bfloat16 (round to nearest even, like torch and __float2bfloat16_rn),
    returned as float32; NaN stays NaN, overflow rounds to +-inf."""
    x = np.ascontiguousarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), r).reshape(x.shape)


# ---- the Llama and Gemma families: rmsnorm, rope, swiglu, geglu, relu2, grouped-query attention


def rmsnorm_forward(x, w, eps=1e-6):
    """x (..., C) -> (x * rstd * w, rstd (...)), rstd = 1 / sqrt(mean(x^2) + eps)."""
    x, w = f64(x, w)
    rstd = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    return x * rstd * w, rstd[..., 0]


def rmsnorm_backward(dout, x, w, eps=1e-6):
    """-> (dx, dweight (C,))."""
    dout, x, w = f64(dout, x, w)
    rstd = 1.0 / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    xhat, g = x * rstd, dout * w
    dx = rstd * (g - xhat * (g * xhat).mean(-1, keepdims=True))
    return dx, (dout * xhat).reshape(-1, x.shape[-1]).sum(0)


def rope_angles(positions, freq):
    """angle (n, R2) = float32(position) * float32(freq), in float64: the rotation of each position."""
    return (np.asarray(positions, np.float32)[:, None] * np.asarray(freq, np.float32)[None, :]).astype(np.float64)


def rope_forward(qkv, angle, n_head, n_kv_head, inverse=False):
    """qkv (B, T, (NH + 2 NKV) hs); angle (B, T, R2) per token: rotate-half RoPE of the first 2*R2 dims of every q and
    k head (v and the other dims unchanged); inverse=True rotates by -angle (the backward)."""
    (qkv,) = f64(qkv)
    B, T, W = qkv.shape
    hs = W // (n_head + 2 * n_kv_head)
    R2 = angle.shape[-1]
    x = qkv.reshape(B, T, -1, hs).copy()
    qk = x[:, :, :n_head + n_kv_head]
    c, s = np.cos(angle)[:, :, None, :], np.sin(angle)[:, :, None, :] * (-1.0 if inverse else 1.0)
    x1, x2 = qk[..., :R2].copy(), qk[..., R2:2 * R2].copy()
    qk[..., :R2] = x1 * c - x2 * s
    qk[..., R2:2 * R2] = x2 * c + x1 * s
    return x.reshape(B, T, W)


def swiglu_forward(gate_up):
    (gate_up,) = f64(gate_up)
    H = gate_up.shape[-1] // 2
    g, u = gate_up[..., :H], gate_up[..., H:]
    return g / (1 + np.exp(-g)) * u


def swiglu_backward(dout, gate_up):
    """-> dgate_up (..., 2H)."""
    dout, gate_up = f64(dout, gate_up)
    H = gate_up.shape[-1] // 2
    g, u = gate_up[..., :H], gate_up[..., H:]
    s = 1 / (1 + np.exp(-g))
    return np.concatenate([dout * u * s * (1 + g * (1 - s)), dout * g * s], axis=-1)


def geglu_forward(gate_up):
    """gelu_tanh(gate) * up, GELU's tanh approximation (gelu_forward above)."""
    (gate_up,) = f64(gate_up)
    H = gate_up.shape[-1] // 2
    return gelu_forward(gate_up[..., :H]) * gate_up[..., H:]


def geglu_backward(dout, gate_up):
    """-> dgate_up (..., 2H) = [dout * up * gelu'(gate) | dout * gelu(gate)]."""
    dout, gate_up = f64(dout, gate_up)
    H = gate_up.shape[-1] // 2
    g, u = gate_up[..., :H], gate_up[..., H:]
    return np.concatenate([gelu_backward(dout * u, g), dout * gelu_forward(g)], axis=-1)


def relu2_forward(x):
    (x,) = f64(x)
    return np.maximum(x, 0) ** 2


def relu2_backward(dout, x):
    dout, x = f64(dout, x)
    return 2 * np.maximum(x, 0) * dout


def gqa_split(qkv, n_head, n_kv_head):
    """packed qkv (B, T, (NH + 2 NKV) hs) -> q (B, NH, T, hs), k, v (B, NKV, T, hs)."""
    B, T, W = qkv.shape
    hs = W // (n_head + 2 * n_kv_head)
    x = qkv.reshape(B, T, -1, hs).transpose(0, 2, 1, 3)
    return x[:, :n_head], x[:, n_head:n_head + n_kv_head], x[:, n_head + n_kv_head:]


def attention_scores(q, k, scale=None, softcap=None, window=None):
    """Scores (..., T, T) of q, k (..., T, hs) and d score / d (q . k): (q . k) * scale (None: 1/sqrt(hs)), then
    softcap * tanh(score / softcap) if softcap; -inf where key s is not visible to query t: s > t, or t - s >= window
    (sliding window, transformers' kv_idx > q_idx - sliding_window)."""
    T, hs = q.shape[-2], q.shape[-1]
    scale = 1.0 / np.sqrt(hs) if scale is None else scale
    att = q @ np.swapaxes(k, -1, -2) * scale
    grad = np.full_like(att, scale)
    if softcap is not None:
        th = np.tanh(att / softcap)
        att, grad = softcap * th, grad * (1 - th**2)
    t, s = np.arange(T)[:, None], np.arange(T)[None, :]
    visible = (s <= t) & ((t - s < window) if window is not None else True)
    return np.where(visible, att, -np.inf), grad


def gqa_attention_forward(qkv, n_head, n_kv_head, scale=None, softcap=None, window=None):
    """Causal grouped-query attention: query head h uses kv head h // (NH / NKV) (K/V repeated, as HF repeat_kv).
    -> out (B, T, NH hs), lse (B, NH, T) of the final scores (attention_scores)."""
    (qkv,) = f64(qkv)
    B, T, _ = qkv.shape
    q, k, v = gqa_split(qkv, n_head, n_kv_head)
    G = n_head // n_kv_head
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    hs = q.shape[-1]
    att, _ = attention_scores(q, k, scale, softcap, window)
    mx = att.max(-1, keepdims=True)
    lse = (mx + np.log(np.exp(att - mx).sum(-1, keepdims=True)))[..., 0]
    out = np.exp(att - lse[..., None]) @ v
    return out.transpose(0, 2, 1, 3).reshape(B, T, n_head * hs), lse


def gqa_attention_backward(dout, qkv, n_head, n_kv_head, scale=None, softcap=None, window=None):
    """-> dqkv (B, T, (NH + 2 NKV) hs); dk, dv of a kv head summed over its G query heads."""
    dout, qkv = f64(dout, qkv)
    B, T, W = qkv.shape
    q, k, v = gqa_split(qkv, n_head, n_kv_head)
    G, hs = n_head // n_kv_head, q.shape[-1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    dy = dout.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)
    att, grad = attention_scores(q, k, scale, softcap, window)
    p = np.exp(att - att.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dv = p.transpose(0, 1, 3, 2) @ dy
    dp = dy @ v.transpose(0, 1, 3, 2)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True)) * grad  # d loss / d (q . k)
    dq, dk = ds @ k, ds.transpose(0, 1, 3, 2) @ q
    dk = dk.reshape(B, n_kv_head, G, T, hs).sum(2)
    dv = dv.reshape(B, n_kv_head, G, T, hs).sum(2)
    return np.concatenate([dq, dk, dv], axis=1).transpose(0, 2, 1, 3).reshape(B, T, W)
