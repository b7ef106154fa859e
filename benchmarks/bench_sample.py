"""Decode tokens/s with a KV cache, fastllm vs a PyTorch eager GPT-2 with its own KV cache (same weights, same
process, same threads): greedy decoding of N tokens after a prompt, batch 1 and 8.
    python benchmarks/bench_sample.py [--threads 2] [--quick] [--gpt2]"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, header, print_table, set_threads  # noqa: E402

from fastllm.model import GPT, GPTConfig  # noqa: E402


def torch_decoder(model: GPT, B: int):
    """A nanoGPT-style eager decoder with a preallocated KV cache (torch.inference_mode, SDPA)."""
    import torch
    import torch.nn.functional as F

    cfg = model.config
    P = {k: torch.from_numpy(np.array(v)) for k, v in model.p.items()}
    C, NH, L, Tm = cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.block_size
    hs = C // NH
    kc = torch.zeros(L, B, NH, Tm, hs)
    vc = torch.zeros(L, B, NH, Tm, hs)

    @torch.inference_mode()
    def step(idx: torch.Tensor, pos: int) -> torch.Tensor:
        Tn = idx.shape[1]
        x = P["wte"][idx] + P["wpe"][pos:pos + Tn]
        for l in range(L):
            h = F.layer_norm(x, (C,), P["ln_1.weight"][l], P["ln_1.bias"][l])
            q, k, v = F.linear(h, P["attn.c_attn.weight"][l], P["attn.c_attn.bias"][l]).split(C, dim=2)
            q, k, v = (t.view(B, Tn, NH, hs).transpose(1, 2) for t in (q, k, v))
            kc[l, :, :, pos:pos + Tn] = k
            vc[l, :, :, pos:pos + Tn] = v
            y = F.scaled_dot_product_attention(q, kc[l, :, :, :pos + Tn], vc[l, :, :, :pos + Tn], is_causal=Tn > 1)
            x = x + F.linear(y.transpose(1, 2).reshape(B, Tn, C), P["attn.c_proj.weight"][l], P["attn.c_proj.bias"][l])
            h = F.layer_norm(x, (C,), P["ln_2.weight"][l], P["ln_2.bias"][l])
            h = F.gelu(F.linear(h, P["mlp.c_fc.weight"][l], P["mlp.c_fc.bias"][l]), approximate="tanh")
            x = x + F.linear(h, P["mlp.c_proj.weight"][l], P["mlp.c_proj.bias"][l])
        x = F.layer_norm(x[:, -1], (C,), P["ln_f.weight"], P["ln_f.bias"])
        return x @ P["wte"].T

    return step


def case(name: str, cfg: GPTConfig, B: int, prompt: int, n: int, repeats: int) -> list[str]:
    import torch

    model = GPT(cfg, seed=0).eval()
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, prompt))
    tstep = torch_decoder(model, B)

    def ours():
        cache = model.kv_cache(B)
        logits = cache.prefill([list(r) for r in rows])
        for _ in range(n):
            logits = cache.decode(logits.argmax(-1))

    def theirs():
        logits = tstep(torch.from_numpy(rows), 0)
        for i in range(n):
            logits = tstep(logits.argmax(-1)[:, None], prompt + i)

    # same greedy tokens?
    cache = model.kv_cache(B)
    a = cache.prefill([list(r) for r in rows])
    b = tstep(torch.from_numpy(rows), 0).numpy()
    agree = np.array_equal(a.argmax(-1), b.argmax(-1))
    r = bench({"fastllm": ours, "torch": theirs}, repeats=repeats, warmup=1)
    s = {k: v["median"] for k, v in r.items()}
    return [name, str(B), str(prompt), str(n), f"{B * n / s['fastllm']:,.0f}", f"{B * n / s['torch']:,.0f}",
            f"{s['torch'] / s['fastllm']:.2f}x", "yes" if agree else "NO"]


def run(threads: int = 2, quick: bool = False, gpt2: bool = False) -> None:
    set_threads(threads)
    print(header("decode with KV cache (prefill + n greedy tokens)", threads))
    small = GPTConfig(vocab_size=4096, n_layer=6, n_head=6, n_embd=384, block_size=256)
    rows = []
    for B in (1, 8):
        rows.append(case("6L-384 V=4096", small, B, 16, 32 if quick else 100, 3 if quick else 5))
    if gpt2:
        g = GPTConfig.preset("gpt2", vocab_size=50257)
        for B in (1, 8):
            rows.append(case("gpt2 124M", g, B, 16, 50, 3))
    print_table(rows, ["model", "B", "prompt", "new", "fastllm tok/s", "torch tok/s", "torch/fastllm",
                       "same argmax"])


if __name__ == "__main__":
    cli(run, __doc__, gpt2="also GPT-2 124M")
