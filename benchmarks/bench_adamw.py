"""AdamW step over a flat parameter buffer, and the global gradient norm, fastllm vs PyTorch on the same device:
    python benchmarks/bench_adamw.py [--threads 2] [--quick] [--device cpu|cuda] [--smoke]

torch: torch.optim.AdamW stepping the same parameters split into 16 tensors the way a model holds them
(foreach=True on the CPU, fused=True on the GPU), and the norm as torch.linalg.vector_norm over
torch._foreach_norm of the grads. fastllm: one adamw_step over the flat buffer (also with the bf16 compute copy
the next forward reads, params_copy), sum_squares for the norm. Sizes: 32 Mi parameters on the CPU, GPT-2 124M's
124,439,808 on the GPU. GB/s: AdamW reads p, m, v, g and writes p, m, v (28 bytes/parameter, +2 for the bf16
copy); the norm reads 4 bytes/parameter. Parameters and optimizer state are float32 on both devices."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import cli, header, print_table, ratio_row, set_threads, time_fns, torch_on  # noqa: E402

from fastllm import backend  # noqa: E402

SIZES = {"cpu": [32 * 1024 * 1024], "cuda": [124_439_808]}
QUICK = {"cpu": [1 << 22], "cuda": [124_439_808]}
SMOKE = [10007]


def _rows(n: int, device: str, repeats: int) -> list[list[str]]:
    bk = backend.get(device)
    rng = np.random.default_rng(0)
    p_np, g_np = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32) * 1e-2
    p, g, m, v = bk.to_device(p_np), bk.to_device(g_np), bk.zeros((n,)), bk.zeros((n,))
    copy = bk.empty((n,), "bfloat16")
    hp = dict(lr=1e-4, t=10, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    cases = {
        "adamw step": ({"fastllm": lambda: bk.adamw_step(p, g, m, v, **hp)}, 28),
        "adamw step + bf16 copy": ({"fastllm": lambda: bk.adamw_step(p, g, m, v, params_copy=copy, **hp)}, 30),
        "grad norm": ({"fastllm": lambda: bk.sum_squares(g)}, 4),
    }
    torch = torch_on(device)
    if torch is not None:
        sizes = [n // 16] * 16  # a model's tensors: 16 chunks, the last one ragged
        sizes[-1] += n - sum(sizes)
        params = [torch.nn.Parameter(t.clone().to(device)) for t in torch.from_numpy(p_np).split(sizes)]
        for t, gr in zip(params, torch.from_numpy(g_np).split(sizes)):
            t.grad = gr.clone().to(device)
        fast = dict(fused=True) if device == "cuda" else dict(foreach=True)
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **fast)
        grads = [t.grad for t in params]
        cases["adamw step"][0]["torch"] = cases["adamw step + bf16 copy"][0]["torch"] = opt.step
        cases["grad norm"][0]["torch"] = lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    rows = []
    for name, (fns, bpe) in cases.items():
        if name.endswith("copy") and device == "cpu":
            continue  # the CPU model computes in float32: it has no bf16 copy to keep
        t = time_fns(fns, device, repeats=repeats, warmup=0 if repeats == 1 else 2)
        rows.append(ratio_row([f"{n}", name], t, bpe * n))
    return rows


def run(threads: int = 2, quick: bool = False, device: str = "cpu", dtype: str = "float32",
        smoke: bool = False) -> None:
    set_threads(threads)
    sizes = SMOKE if smoke else (QUICK if quick else SIZES)[device]
    repeats = 1 if smoke else 5 if quick else 11
    print(header("adamw step / grad norm (float32 parameters)", threads, device, "float32"))
    with torch_no_grad():
        rows = [r for n in sizes for r in _rows(n, device, repeats)]
    print_table(rows, ["params", "op", "fastllm ms", "torch ms", "torch/fastllm", "GB/s"])


def torch_no_grad():
    try:
        import torch

        return torch.no_grad()
    except ImportError:
        import contextlib

        return contextlib.nullcontext()


if __name__ == "__main__":
    cli(run, __doc__, device=True)
