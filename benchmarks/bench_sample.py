"""Decode tokens/s with a KV cache, fastllm vs a PyTorch eager GPT-2 with its own KV cache (same weights, same
process, same threads): greedy decoding of N tokens after a prompt, batch 1 and 8. Both in float32, and both with
bf16 weights (fastllm: bf16 weight copies for decode steps, fp32 activations rounded to bf16 at each matmul;
torch: the whole model in bfloat16), and torch's float32 model under torch.autocast("cpu", dtype=torch.bfloat16)
(the weights cast to bf16 at every matmul, as a mixed-precision training script samples), all five interleaved.
    python benchmarks/bench_sample.py [--threads 2] [--quick] [--gpt2]"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, header, print_table, set_threads  # noqa: E402

from fastllm.model import GPT, GPTConfig  # noqa: E402


def torch_decoder(model: GPT, B: int, dtype=None):
    """A nanoGPT-style eager decoder with a preallocated KV cache (torch.inference_mode, SDPA)."""
    import torch
    import torch.nn.functional as F

    cfg = model.config
    dtype = dtype or torch.float32
    P = {k: torch.from_numpy(np.array(v)).to(dtype) for k, v in model.p.items()}
    C, NH, L, Tm = cfg.n_embd, cfg.n_head, cfg.n_layer, cfg.block_size
    hs = C // NH
    kc = torch.zeros(L, B, NH, Tm, hs, dtype=dtype)
    vc = torch.zeros(L, B, NH, Tm, hs, dtype=dtype)

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
        return (x @ P["wte"].T).float()

    return step


def case(name: str, cfg: GPTConfig, B: int, prompt: int, n: int, repeats: int) -> list[str]:
    import torch

    model = GPT(cfg, seed=0).eval()
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, prompt))
    w16 = model.bf16_weights()  # snapshots made once, outside the timing, like torch's .to(bfloat16)
    tsteps = {"f32": torch_decoder(model, B), "bf16": torch_decoder(model, B, torch.bfloat16)}

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
           "torch bf16": theirs(tsteps["bf16"]), "torch autocast": theirs(torch_decoder(model, B), autocast=True)}
    toks = {k: f() for k, f in fns.items()}
    same = f"{np.mean(toks['fastllm'] == toks['torch']):.0%}"  # greedy tokens equal to torch fp32's
    same16 = f"{np.mean(toks['fastllm bf16'] == toks['fastllm']):.0%}"
    r = bench(fns, repeats=repeats, warmup=0)
    s = {k: v["median"] for k, v in r.items()}
    tps = {k: f"{B * n / v:,.0f}" for k, v in s.items()}
    return [name, str(B), str(n), tps["fastllm"], tps["torch"], f"{s['torch'] / s['fastllm']:.2f}x", same,
            tps["fastllm bf16"], tps["torch bf16"], f"{s['torch bf16'] / s['fastllm bf16']:.2f}x",
            f"{s['torch'] / s['fastllm bf16']:.2f}x", same16, tps["torch autocast"],
            f"{s['torch autocast'] / s['fastllm bf16']:.2f}x"]


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
            rows.append(case("gpt2 124M", g, B, 16, 50, 5))
    print("prompt 16 tokens; tok/s = B * new / time (prefill included); 'same' = greedy tokens equal to torch fp32's"
          " (fastllm fp32) and to fastllm fp32's (bf16)")
    print_table(rows, ["model", "B", "new", "fastllm", "torch", "torch/fastllm", "same", "fastllm bf16w",
                       "torch bf16", "torch bf16/fastllm bf16w", "torch fp32/fastllm bf16w", "same bf16",
                       "torch autocast", "torch autocast/fastllm bf16w"])


if __name__ == "__main__":
    cli(run, __doc__, gpt2="also GPT-2 124M")
