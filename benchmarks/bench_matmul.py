"""Matmul (fully connected layer) forward and backward, fastllm vs PyTorch, GPT-2 shapes:
    python benchmarks/bench_matmul.py [--threads 2] [--quick]
Forward: out = inp @ weight^T (torch: F.linear). Backward: the two GEMMs torch autograd runs for F.linear,
dinp = dout @ weight and dweight = dout^T @ inp (fastllm: matmul_backward without dbias, accumulating into
preallocated buffers; torch: matmuls into preallocated `out=` buffers). GFLOP/s = 2*N*C*OC per GEMM / median
time; ratio = fastllm GFLOP/s / torch GFLOP/s (above 1: fastllm faster)."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

import common  # noqa: E402

from fastllm import _C  # noqa: E402

SHAPES = [(2048, 768, 3072), (2048, 3072, 768), (2048, 768, 50304)]
QUICK_SHAPES = [(512, 768, 3072), (512, 3072, 768), (512, 768, 8192)]


def setup(shape):
    N, C, OC = shape
    rng = np.random.default_rng(0)
    inp = rng.standard_normal((N, C), dtype=np.float32)
    weight = rng.standard_normal((OC, C), dtype=np.float32) * 0.02
    dout = rng.standard_normal((N, OC), dtype=np.float32)
    return inp, weight, dout


def providers(shape, which: str):
    inp, weight, dout = setup(shape)
    N, C, OC = shape
    out = np.empty((N, OC), np.float32)
    dinp = np.zeros((N, C), np.float32)
    dweight = np.zeros((OC, C), np.float32)
    fns = {}
    if which == "fwd":
        fns["fastllm"] = lambda: _C.matmul_forward(out, inp, weight, None)
    else:
        fns["fastllm"] = lambda: _C.matmul_backward(dinp, dweight, None, dout, inp, weight)
    try:
        import torch
        import torch.nn.functional as F

        ti, tw, tdo = torch.from_numpy(inp), torch.from_numpy(weight), torch.from_numpy(dout)
        tdi, tdw = torch.empty(N, C), torch.empty(OC, C)
        if which == "fwd":
            fns["torch"] = lambda: F.linear(ti, tw)
        else:

            def torch_bwd():
                torch.mm(tdo, tw, out=tdi)
                torch.mm(tdo.t(), ti, out=tdw)

            fns["torch"] = torch_bwd
    except ImportError:
        pass
    return fns


def run(threads: int = 2, quick: bool = False) -> None:
    common.set_threads(threads)
    print(common.header("matmul fwd/bwd (GFLOP/s)", threads))
    rows = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        N, C, OC = shape
        for which in ("fwd", "bwd"):
            flops = 2.0 * N * C * OC * (1 if which == "fwd" else 2)
            fns = providers(shape, which)
            res = common.bench(fns, repeats=3 if quick else 5, warmup=1)
            f = res["fastllm"]["median"]
            row = [str(shape), which, f"{f * 1e3:.1f}", f"{flops / f / 1e9:.1f}"]
            if "torch" in res:
                t = res["torch"]["median"]
                row += [f"{t * 1e3:.1f}", f"{flops / t / 1e9:.1f}", f"{t / f:.2f}x"]
            else:
                row += ["-", "-", "-"]
            rows.append(row)
    common.print_table(
        rows,
        [
            "shape (N,C,OC)",
            "pass",
            "fastllm ms",
            "fastllm GFLOP/s",
            "torch ms",
            "torch GFLOP/s",
            "fastllm/torch",
        ],
    )


if __name__ == "__main__":
    common.cli(run, __doc__)
