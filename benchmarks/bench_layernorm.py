"""LayerNorm forward and backward vs PyTorch (same threads).
    python benchmarks/bench_layernorm.py [--threads 2] [--quick]

torch forward: aten native_layer_norm (what F.layer_norm runs); torch backward: aten
native_layer_norm_backward
with the saved mean/rstd (what autograd runs), so both sides time the kernel alone. GB/s: forward reads x and
writes out (8 N C bytes); backward reads dout, x and read-modify-writes dinp (16 N C bytes; fastllm
accumulates, torch writes fresh buffers)."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, header, print_table, ratio_row, set_threads  # noqa: E402

from fastllm import _C  # noqa: E402


def _row(N: int, C: int, quick: bool) -> list[list[str]]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C), dtype=np.float32)
    w, b = rng.standard_normal(C, dtype=np.float32), rng.standard_normal(C, dtype=np.float32)
    dout = rng.standard_normal((N, C), dtype=np.float32)
    out, mean, rstd = np.empty_like(x), np.empty(N, np.float32), np.empty(N, np.float32)
    dx, dw, db = np.zeros_like(x), np.zeros(C, np.float32), np.zeros(C, np.float32)
    fwd = {"fastllm": lambda: _C.layernorm_forward(out, mean, rstd, x, w, b, 1e-5)}
    bwd = {"fastllm": lambda: _C.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd)}
    try:
        import torch

        xt, wt, bt, dyt = (torch.from_numpy(a) for a in (x, w, b, dout))
        _, mt, rt = torch.ops.aten.native_layer_norm(xt, [C], wt, bt, 1e-5)
        fwd["torch"] = lambda: torch.ops.aten.native_layer_norm(xt, [C], wt, bt, 1e-5)
        bwd["torch"] = lambda: torch.ops.aten.native_layer_norm_backward(
            dyt, xt, [C], mt, rt, wt, bt, [True, True, True]
        )
    except ImportError:
        pass
    rows = []
    for name, fns, nbytes in (("fwd", fwd, 8 * N * C), ("bwd", bwd, 16 * N * C)):
        t = bench(fns, repeats=5 if quick else 15, warmup=2)
        rows.append(ratio_row([f"({N}, {C})", name], t, nbytes))
    return rows


def run(threads: int, quick: bool) -> None:
    set_threads(threads)
    shapes = [(2048, 768)] if quick else [(4 * 1024, 768), (8 * 1024, 768), (1024, 1600)]
    print(header("layernorm fwd / bwd", threads))
    rows = [r for N, C in shapes for r in _row(N, C, quick)]
    print_table(rows, ["shape (N, C)", "pass", "fastllm ms", "torch ms", "torch/fastllm", "GB/s"])


if __name__ == "__main__":
    cli(run, __doc__)
