"""GELU (tanh approximation and exact: gelu_erf) and residual add, forward and backward, fastllm vs PyTorch on the
same device:
    python benchmarks/bench_gelu.py [--threads 2] [--quick] [--device cpu|cuda] [--dtype ...] [--smoke]

torch: aten gelu.out(approximate="tanh" / "none") into a preallocated buffer (F.gelu's kernel without the
allocation), aten gelu_backward (what autograd runs), torch.add(out=) for the residual and two add_ for its accumulating
backward. Sizes: (B*T, 4C) of GPT-2 small (CPU: B=8, T=1024; GPU: B*T = 16384). GB/s per element of `dtype`
size s: gelu (and gelu_erf) fwd 2s (read x, write out), bwd 4s (read x, dout, read-modify-write dinp), residual fwd 3s,
residual bwd 5s."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import cli, header, itemsize, print_table, ratio_row, set_threads, time_fns, to_torch, torch_on  # noqa: E402

from fastllm import backend  # noqa: E402

SIZES = {"cpu": [8 * 1024 * 3072, 1 << 20], "cuda": [16384 * 3072]}
QUICK = {"cpu": [1 << 22], "cuda": [16384 * 3072]}
SMOKE = [4099]


def _rows(n: int, device: str, dtype: str, repeats: int) -> list[list[str]]:
    bk = backend.get(device)
    rng = np.random.default_rng(0)
    x_np, dout_np = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    x, dout = bk.to_device(x_np, dtype), bk.to_device(dout_np, dtype)
    y, dx, dx2 = bk.empty((n,), dtype), bk.zeros((n,), dtype), bk.zeros((n,), dtype)
    s = itemsize(dtype)
    cases = {
        "gelu fwd": ({"fastllm": lambda: bk.gelu_forward(x, out=y)}, 2 * s),
        "gelu bwd": ({"fastllm": lambda: bk.gelu_backward(dout, x, dx=dx)}, 4 * s),
        "gelu_erf fwd": ({"fastllm": lambda: bk.gelu_erf_forward(x, out=y)}, 2 * s),
        "gelu_erf bwd": ({"fastllm": lambda: bk.gelu_erf_backward(dout, x, dx=dx)}, 4 * s),
        "residual fwd": ({"fastllm": lambda: bk.residual_forward(x, dout, out=y)}, 3 * s),
        "residual bwd": ({"fastllm": lambda: bk.residual_backward(dout, dinp1=dx, dinp2=dx2)}, 5 * s),
    }
    torch = torch_on(device)
    if torch is not None:
        xt, dyt = to_torch(x_np, device, dtype), to_torch(dout_np, device, dtype)
        yt, dxt, dx2t = torch.empty_like(xt), torch.zeros_like(xt), torch.zeros_like(xt)
        cases["gelu fwd"][0]["torch"] = lambda: torch.ops.aten.gelu.out(xt, approximate="tanh", out=yt)
        cases["gelu bwd"][0]["torch"] = lambda: torch.ops.aten.gelu_backward(dyt, xt, approximate="tanh")
        cases["gelu_erf fwd"][0]["torch"] = lambda: torch.ops.aten.gelu.out(xt, approximate="none", out=yt)
        cases["gelu_erf bwd"][0]["torch"] = lambda: torch.ops.aten.gelu_backward(dyt, xt, approximate="none")
        cases["residual fwd"][0]["torch"] = lambda: torch.add(xt, dyt, out=yt)
        cases["residual bwd"][0]["torch"] = lambda: (dxt.add_(dyt), dx2t.add_(dyt))
    rows = []
    for name, (fns, bpe) in cases.items():
        t = time_fns(fns, device, repeats=repeats, warmup=0 if repeats == 1 else 2)
        rows.append(ratio_row([f"{n}", name], t, bpe * n))
    return rows


def run(threads: int = 2, quick: bool = False, device: str = "cpu", dtype: str = "float32",
        smoke: bool = False) -> None:
    set_threads(threads)
    sizes = SMOKE if smoke else (QUICK if quick else SIZES)[device]
    repeats = 1 if smoke else 5 if quick else 15
    print(header("gelu / residual fwd, bwd", threads, device, dtype))
    rows = [r for n in sizes for r in _rows(n, device, dtype, repeats)]
    print_table(rows, ["elements", "op", "fastllm ms", "torch ms", "torch/fastllm", "GB/s"])


if __name__ == "__main__":
    cli(run, __doc__, device=True)
