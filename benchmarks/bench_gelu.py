"""GELU (tanh approximation) and residual add, forward and backward, vs PyTorch (same threads).
    python benchmarks/bench_gelu.py [--threads 2] [--quick]

torch: aten gelu.out(approximate="tanh") into a preallocated buffer (F.gelu's kernel without the allocation),
aten gelu_backward (what autograd runs), torch.add(out=) for the residual and two add_ for its accumulating
backward. GB/s: gelu fwd 8 bytes/element, gelu bwd 16 (reads x, dout, read-modify-writes dinp), residual fwd
12, residual bwd 20."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, header, print_table, ratio_row, set_threads  # noqa: E402

from fastllm import _C  # noqa: E402


def _rows(n: int, quick: bool) -> list[list[str]]:
    rng = np.random.default_rng(0)
    x, dout = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    y, dx, dx2 = np.empty_like(x), np.zeros_like(x), np.zeros_like(x)
    cases = {
        "gelu fwd": ({"fastllm": lambda: _C.gelu_forward(y, x)}, 8),
        "gelu bwd": ({"fastllm": lambda: _C.gelu_backward(dx, x, dout)}, 16),
        "residual fwd": ({"fastllm": lambda: _C.residual_forward(y, x, dout)}, 12),
        "residual bwd": ({"fastllm": lambda: _C.residual_backward(dx, dx2, dout)}, 20),
    }
    try:
        import torch

        xt, dyt, yt, dxt, dx2t = (torch.from_numpy(a) for a in (x, dout, y.copy(), dx.copy(), dx2.copy()))
        cases["gelu fwd"][0]["torch"] = lambda: torch.ops.aten.gelu.out(xt, approximate="tanh", out=yt)
        cases["gelu bwd"][0]["torch"] = lambda: torch.ops.aten.gelu_backward(dyt, xt, approximate="tanh")
        cases["residual fwd"][0]["torch"] = lambda: torch.add(xt, dyt, out=yt)
        cases["residual bwd"][0]["torch"] = lambda: (dxt.add_(dyt), dx2t.add_(dyt))
    except ImportError:
        pass
    rows = []
    for name, (fns, bpe) in cases.items():
        t = bench(fns, repeats=5 if quick else 15, warmup=2)
        rows.append(ratio_row([f"{n}", name], t, bpe * n))
    return rows


def run(threads: int, quick: bool) -> None:
    set_threads(threads)
    sizes = [1 << 22] if quick else [8 * 1024 * 3072, 1 << 20]  # (B*T, 4C) of GPT-2 small at B=8, T=1024
    print(header("gelu / residual fwd, bwd", threads))
    rows = [r for n in sizes for r in _rows(n, quick)]
    print_table(rows, ["elements", "op", "fastllm ms", "torch ms", "torch/fastllm", "GB/s"])


if __name__ == "__main__":
    cli(run, __doc__)
