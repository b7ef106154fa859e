"""AdamW step over a flat parameter buffer, and the global gradient norm, vs PyTorch (same threads).
    python benchmarks/bench_adamw.py [--threads 2] [--quick]

torch: torch.optim.AdamW(foreach=True) stepping the same parameters split into GPT-2-like tensors (the way a
model holds them; foreach batches them), and torch.linalg.vector_norm over the grads via torch._foreach_norm.
fastllm: one adamw_step over the flat buffer, sum_squares for the norm. GB/s: AdamW reads p, m, v, g and
writes p, m, v (28 bytes/parameter); the norm reads 4 bytes/parameter."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, header, print_table, ratio_row, set_threads  # noqa: E402

from fastllm import _C  # noqa: E402


def _rows(n: int, quick: bool) -> list[list[str]]:
    rng = np.random.default_rng(0)
    p, g = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32) * 1e-2
    m, v = np.zeros_like(p), np.zeros_like(p)
    step = {"fastllm": lambda: _C.adamw_step(p, m, v, g, 1e-4, 0.9, 0.95, 1e-8, 0.1, 10, 1.0)}
    norm = {"fastllm": lambda: _C.sum_squares(g)}
    try:
        import torch

        # GPT-2-small-like split: blocks of (768*768*4, 768*768*3, ...) -> use 16 equal chunks + a ragged tail
        sizes = [n // 16] * 16
        sizes[-1] += n - sum(sizes)
        params = [torch.nn.Parameter(t.clone()) for t in torch.from_numpy(p).split(sizes)]
        for t, gr in zip(params, torch.from_numpy(g).split(sizes)):
            t.grad = gr.clone()
        opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, foreach=True)
        grads = [t.grad for t in params]
        step["torch"] = opt.step
        norm["torch"] = lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    except ImportError:
        pass
    rows = []
    for name, fns, bpe in (("adamw step", step, 28), ("grad norm", norm, 4)):
        t = bench(fns, repeats=5 if quick else 11, warmup=2)
        rows.append(ratio_row([f"{n}", name], t, bpe * n))
    return rows


def run(threads: int, quick: bool) -> None:
    set_threads(threads)
    sizes = [1 << 22] if quick else [32 * 1024 * 1024]  # 32 Mi parameters (GPT-2 small has 124 M)
    print(header("adamw step / grad norm", threads))
    with torch_no_grad():
        rows = [r for n in sizes for r in _rows(n, quick)]
    print_table(rows, ["params", "op", "fastllm ms", "torch ms", "torch/fastllm", "GB/s"])


def torch_no_grad():
    try:
        import torch

        return torch.no_grad()
    except ImportError:
        import contextlib

        return contextlib.nullcontext()


if __name__ == "__main__":
    cli(run, __doc__)
