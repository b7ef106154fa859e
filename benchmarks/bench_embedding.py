"""Token + position embedding forward and backward vs PyTorch (same threads).
    python benchmarks/bench_embedding.py [--threads 2] [--quick]

torch forward: wte[tokens] + wpe[:T] through F.embedding (one gather, one broadcast add). torch backward: aten
embedding_dense_backward (what autograd runs for F.embedding; it allocates and zeroes a fresh (V, C) gradient)
plus dout.sum(0) for wpe. fastllm accumulates into existing dwte/dwpe (the training loop zeroes them once).
GB/s: forward reads a wte row, a wpe row and writes out (12 B*T*C bytes); backward reads dout and
read-modify-writes the touched dwte/dwpe rows (20 B*T*C bytes)."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, header, print_table, ratio_row, set_threads  # noqa: E402

from fastllm import _C  # noqa: E402


def _rows(B: int, T: int, C: int, V: int, quick: bool) -> list[list[str]]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    wte, wpe = rng.standard_normal((V, C), dtype=np.float32), rng.standard_normal((T, C), dtype=np.float32)
    dout = rng.standard_normal((B, T, C), dtype=np.float32)
    out, dwte, dwpe = np.empty((B, T, C), np.float32), np.zeros_like(wte), np.zeros_like(wpe)
    fwd = {"fastllm": lambda: _C.embedding_forward(out, tokens, wte, wpe)}
    bwd = {"fastllm": lambda: _C.embedding_backward(dwte, dwpe, dout, tokens)}
    try:
        import torch
        import torch.nn.functional as F

        tk, te, pe, dy = (
            torch.from_numpy(tokens.astype(np.int64)),
            torch.from_numpy(wte),
            torch.from_numpy(wpe),
            torch.from_numpy(dout),
        )
        pos = torch.arange(T)
        fwd["torch"] = lambda: F.embedding(tk, te) + F.embedding(pos, pe)
        bwd["torch"] = lambda: (torch.ops.aten.embedding_dense_backward(dy, tk, V, -1, False), dy.sum(0))
    except ImportError:
        pass
    rows = []
    for name, fns, nbytes in (("fwd", fwd, 12 * B * T * C), ("bwd", bwd, 20 * B * T * C)):
        t = bench(fns, repeats=5 if quick else 15, warmup=2)
        rows.append(ratio_row([f"({B}, {T}, {C}, {V})", name], t, nbytes))
    return rows


def run(threads: int, quick: bool) -> None:
    set_threads(threads)
    shapes = [(4, 256, 768, 50304)] if quick else [(8, 1024, 768, 50304)]
    print(header("embedding fwd / bwd", threads))
    rows = [r for s in shapes for r in _rows(*s, quick)]
    print_table(rows, ["shape (B, T, C, V)", "pass", "fastllm ms", "torch ms", "torch/fastllm", "GB/s"])


if __name__ == "__main__":
    cli(run, __doc__)
