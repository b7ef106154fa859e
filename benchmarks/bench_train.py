"""Tokens/s of a full training step (forward + backward + AdamW), fastllm vs a PyTorch eager GPT-2 (SDPA attention,
torch.optim.AdamW) with the same weights, in float32 and under torch.autocast("cpu", dtype=torch.bfloat16) (the
forward in autocast, backward and AdamW outside it: PyTorch's mixed-precision recipe, fp32 master weights), all
three interleaved in one process, same threads:
    python benchmarks/bench_train.py [--threads 2] [--quick] [--gpt2]
Shapes: a 6-layer 384-wide model at T=256 (vocab 4096 and 50257), and with --gpt2, GPT-2 124M at T=1024."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from common import bench, cli, header, print_table, set_threads  # noqa: E402

from fastllm.model import GPT, GPTConfig  # noqa: E402
from fastllm.optim import AdamW  # noqa: E402

PROVIDERS = ("fastllm", "torch", "torch autocast")


def case(name: str, cfg: GPTConfig, B: int, T: int, repeats: int) -> list[str]:
    import torch
    import torch_gpt

    model = GPT(cfg, seed=0)
    opt = AdamW(model, lr=1e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (B, T))
    y = rng.integers(0, cfg.vocab_size, (B, T))

    def ours():
        model.forward(x, y)
        model.zero_grad()
        model.backward()
        opt.step()

    tx, ty = torch.as_tensor(x), torch.as_tensor(y)

    def theirs(autocast: bool):
        fwd, params = torch_gpt.build(model, sdpa=True)  # each variant its own weights and optimizer
        topt = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.1)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = fwd(tx, ty)
            topt.zero_grad(set_to_none=True)
            loss.backward()
            topt.step()

        return step

    r = bench({"fastllm": ours, "torch": theirs(False), "torch autocast": theirs(True)}, repeats=repeats, warmup=1)
    ms = {k: v["median"] * 1e3 for k, v in r.items()}
    tok = B * T
    return [name, f"{B}x{T}", f"{model.num_parameters / 1e6:.1f}M", *(f"{ms[k]:.0f}" for k in PROVIDERS),
            *(f"{tok / ms[k] * 1e3:,.0f}" for k in PROVIDERS), f"{ms['torch'] / ms['fastllm']:.2f}x",
            f"{ms['torch autocast'] / ms['fastllm']:.2f}x"]


def run(threads: int = 2, quick: bool = False, gpt2: bool = False) -> None:
    set_threads(threads)
    print(header("train step (fwd+bwd+AdamW)", threads))
    rows = []
    small = dict(n_layer=6, n_head=6, n_embd=384, block_size=256)
    rows.append(case("6L-384 V=4096", GPTConfig(vocab_size=4096, **small), 4 if quick else 8, 256, 3 if quick else 5))
    if not quick:
        rows.append(case("6L-384 V=50257", GPTConfig(vocab_size=50257, **small), 8, 256, 3))
    if gpt2:
        rows.append(case("gpt2 124M", GPTConfig.preset("gpt2", vocab_size=50257), 4, 1024, 2))
    print("torch autocast = torch.autocast('cpu', dtype=torch.bfloat16) around the forward (bf16 GEMMs)")
    print_table(rows, ["model", "BxT", "params", *(f"{k} ms" for k in PROVIDERS), *(f"{k} tok/s" for k in PROVIDERS),
                       "torch/fastllm", "torch autocast/fastllm"])


if __name__ == "__main__":
    cli(run, __doc__, gpt2="also GPT-2 124M at T=1024 (slow, ~10 GB RAM)")
