"""LayerNorm forward and backward, fastllm vs PyTorch on the same device:
    python benchmarks/bench_layernorm.py [--threads 2] [--quick] [--device cpu|cuda] [--dtype ...] [--smoke]

torch forward: aten native_layer_norm (what F.layer_norm runs); torch backward: aten native_layer_norm_backward
with the saved mean/rstd (what autograd runs), so both sides time the kernel alone. Shapes (N, C): GPT-2 rows
(CPU: B*T = 4k and 8k; GPU: 16384) at C = 768 and 1600. GB/s for `dtype` size s: forward reads x and writes out
(2 s N C bytes, + 8 N for mean and rstd); backward reads dout, x and read-modify-writes dinp (4 s N C; fastllm
accumulates, torch writes fresh buffers)."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import cli, header, itemsize, print_table, ratio_row, set_threads, time_fns, to_torch, torch_on  # noqa: E402

from fastllm import backend  # noqa: E402

SHAPES = {"cpu": [(4 * 1024, 768), (8 * 1024, 768), (1024, 1600)], "cuda": [(16384, 768), (16384, 1600)]}
QUICK = {"cpu": [(2048, 768)], "cuda": [(16384, 768)]}
SMOKE = [(37, 768)]


def _rows(N: int, C: int, device: str, dtype: str, repeats: int) -> list[list[str]]:
    bk = backend.get(device)
    rng = np.random.default_rng(0)
    x_np, dout_np = rng.standard_normal((N, C), dtype=np.float32), rng.standard_normal((N, C), dtype=np.float32)
    w_np, b_np = rng.standard_normal(C, dtype=np.float32), rng.standard_normal(C, dtype=np.float32)
    x, dout, w, b = (bk.to_device(a, dtype) for a in (x_np, dout_np, w_np, b_np))
    out, mean, rstd = bk.empty((N, C), dtype), bk.empty((N,)), bk.empty((N,))
    dx, dw, db = bk.zeros((N, C), dtype), bk.zeros((C,)), bk.zeros((C,))
    fwd = {"fastllm": lambda: bk.layernorm_forward(x, w, b, 1e-5, out=out, mean=mean, rstd=rstd)}
    bwd = {"fastllm": lambda: bk.layernorm_backward(dout, x, w, mean, rstd, dx=dx, dweight=dw, dbias=db)}
    torch = torch_on(device)
    if torch is not None:
        xt, wt, bt, dyt = (to_torch(a, device, dtype) for a in (x_np, w_np, b_np, dout_np))
        _, mt, rt = torch.ops.aten.native_layer_norm(xt, [C], wt, bt, 1e-5)
        fwd["torch"] = lambda: torch.ops.aten.native_layer_norm(xt, [C], wt, bt, 1e-5)
        bwd["torch"] = lambda: torch.ops.aten.native_layer_norm_backward(
            dyt, xt, [C], mt, rt, wt, bt, [True, True, True]
        )
    s = itemsize(dtype)
    rows = []
    for name, fns, nbytes in (("fwd", fwd, 2 * s * N * C + 8 * N), ("bwd", bwd, 4 * s * N * C + 8 * N)):
        t = time_fns(fns, device, repeats=repeats, warmup=0 if repeats == 1 else 2)
        rows.append(ratio_row([f"({N}, {C})", name], t, nbytes))
    return rows


def run(threads: int = 2, quick: bool = False, device: str = "cpu", dtype: str = "float32",
        smoke: bool = False) -> None:
    set_threads(threads)
    shapes = SMOKE if smoke else (QUICK if quick else SHAPES)[device]
    repeats = 1 if smoke else 5 if quick else 15
    print(header("layernorm fwd / bwd", threads, device, dtype))
    rows = [r for N, C in shapes for r in _rows(N, C, device, dtype, repeats)]
    print_table(rows, ["shape (N, C)", "pass", "fastllm ms", "torch ms", "torch/fastllm", "GB/s"])


if __name__ == "__main__":
    cli(run, __doc__, device=True)
