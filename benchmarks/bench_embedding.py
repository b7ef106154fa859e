"""Token + position embedding forward and backward, fastllm vs PyTorch on the same device:
    python benchmarks/bench_embedding.py [--threads 2] [--quick] [--device cpu|cuda] [--dtype ...] [--smoke]

torch forward: wte[tokens] + wpe[:T] through F.embedding (one gather, one broadcast add). torch backward: aten
embedding_dense_backward (what autograd runs for F.embedding; it allocates and zeroes a fresh (V, C) gradient)
plus dout.sum(0) for wpe. fastllm accumulates into existing float32 dwte/dwpe (the training loop zeroes them
once). GB/s for activations of `dtype` size s: forward reads a wte row, a wpe row and writes out (3 s B T C
bytes); backward reads dout and read-modify-writes the touched float32 dwte/dwpe rows ((s + 16) B T C)."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import cli, header, itemsize, print_table, ratio_row, set_threads, time_fns, to_torch, torch_on  # noqa: E402

from fastllm import backend  # noqa: E402

SHAPES = {"cpu": [(8, 1024, 768, 50304)], "cuda": [(16, 1024, 768, 50257)]}  # (B, T, C, V)
QUICK = {"cpu": [(4, 256, 768, 50304)], "cuda": [(16, 1024, 768, 50257)]}
SMOKE = [(2, 16, 64, 1000)]


def _rows(B: int, T: int, C: int, V: int, device: str, dtype: str, repeats: int) -> list[list[str]]:
    bk = backend.get(device)
    rng = np.random.default_rng(0)
    tokens_np = rng.integers(0, V, (B, T)).astype(np.int32)
    wte_np, wpe_np = rng.standard_normal((V, C), dtype=np.float32), rng.standard_normal((T, C), dtype=np.float32)
    dout_np = rng.standard_normal((B, T, C), dtype=np.float32)
    tokens = bk.to_device(tokens_np)
    wte, wpe, dout = (bk.to_device(a, dtype) for a in (wte_np, wpe_np, dout_np))
    out, dwte, dwpe = bk.empty((B, T, C), dtype), bk.zeros((V, C)), bk.zeros((T, C))
    fwd = {"fastllm": lambda: bk.embedding_forward(tokens, wte, wpe, out=out)}
    bwd = {"fastllm": lambda: bk.embedding_backward(dout, tokens, dwte, dwpe)}
    torch = torch_on(device)
    if torch is not None:
        F = torch.nn.functional
        tk = to_torch(tokens_np, device)
        te, pe, dy = (to_torch(a, device, dtype) for a in (wte_np, wpe_np, dout_np))
        pos = torch.arange(T, device=device)
        fwd["torch"] = lambda: F.embedding(tk, te) + F.embedding(pos, pe)
        bwd["torch"] = lambda: (torch.ops.aten.embedding_dense_backward(dy, tk, V, -1, False), dy.sum(0))
    s = itemsize(dtype)
    rows = []
    for name, fns, nbytes in (("fwd", fwd, 3 * s * B * T * C), ("bwd", bwd, (s + 16) * B * T * C)):
        t = time_fns(fns, device, repeats=repeats, warmup=0 if repeats == 1 else 2)
        rows.append(ratio_row([f"({B}, {T}, {C}, {V})", name], t, nbytes))
    return rows


def run(threads: int = 2, quick: bool = False, device: str = "cpu", dtype: str = "float32",
        smoke: bool = False) -> None:
    set_threads(threads)
    shapes = SMOKE if smoke else (QUICK if quick else SHAPES)[device]
    repeats = 1 if smoke else 5 if quick else 15
    print(header("embedding fwd / bwd", threads, device, dtype))
    rows = [r for s in shapes for r in _rows(*s, device, dtype, repeats)]
    print_table(rows, ["shape (B, T, C, V)", "pass", "fastllm ms", "torch ms", "torch/fastllm", "GB/s"])


if __name__ == "__main__":
    cli(run, __doc__, device=True)
