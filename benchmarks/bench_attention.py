"""Causal self-attention, fastllm (flash-style CPU kernels) vs torch SDPA (is_causal=True):
    python benchmarks/bench_attention.py [--threads 2] [--quick]
Shapes (B, NH, T, hs) = (4, 12, T, 64) for T in 512, 1024; fwd and fwd+bwd. GFLOP/s counts the causal half of
the matmul flops: fwd 2*B*NH*T^2*hs (QK^T and PV), bwd 2.5x that (five products), exp not counted.
Ratio = torch ms / fastllm ms (above 1: fastllm faster). torch gets q, k, v as strided views of one packed qkv
tensor, like fastllm; its backward allocates the gradient, fastllm's zeroes a preallocated dqkv each call."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, header, print_table, set_threads  # noqa: E402

from fastllm import ops  # noqa: E402

SHAPES = [(4, 12, 512, 64), (4, 12, 1024, 64)]
QUICK_SHAPES = [(4, 12, 512, 64)]


def setup(shape):
    B, NH, T, hs = shape
    C = NH * hs
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, 3 * C), dtype=np.float32)
    dout = rng.standard_normal((B, T, C), dtype=np.float32)
    out = np.empty((B, T, C), np.float32)
    lse = np.empty((B, NH, T), np.float32)
    dqkv = np.zeros_like(qkv)

    def f_fwd():
        ops.attention_forward(qkv, NH, out=out, lse=lse)

    def f_fwdbwd():
        ops.attention_forward(qkv, NH, out=out, lse=lse)
        dqkv.fill(0.0)
        ops.attention_backward(dout, qkv, out, lse, NH, dqkv=dqkv)

    fns = {"fwd": {"fastllm": f_fwd}, "fwd+bwd": {"fastllm": f_fwdbwd}}
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return fns
    tqkv = torch.from_numpy(qkv)
    tdout = torch.from_numpy(dout)

    def split(x):  # (B, T, 3C) -> q, k, v as (B, NH, T, hs) views
        return [t.view(B, T, NH, hs).transpose(1, 2) for t in x.split(C, dim=2)]

    def t_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(*split(tqkv), is_causal=True)

    def t_fwdbwd():
        x = tqkv.detach().requires_grad_(True)
        y = F.scaled_dot_product_attention(*split(x), is_causal=True)
        y.transpose(1, 2).reshape(B, T, C).backward(tdout)

    fns["fwd"]["torch"] = t_fwd
    fns["fwd+bwd"]["torch"] = t_fwdbwd
    return fns


def run(threads: int = 2, quick: bool = False) -> None:
    set_threads(threads)
    print(header("attention (causal)", threads))
    rows = []
    for shape in QUICK_SHAPES if quick else SHAPES:
        B, NH, T, hs = shape
        fwd_flops = 2.0 * B * NH * T * T * hs
        for mode, fns in setup(shape).items():
            flops = fwd_flops * (1.0 if mode == "fwd" else 3.5)
            res = bench(fns, repeats=3 if quick else 7, warmup=1, min_time=0.0 if quick else 1.0)
            f = res["fastllm"]["median"]
            t = res["torch"]["median"] if "torch" in res else float("nan")
            ms = [f"{f * 1e3:.2f}", f"{t * 1e3:.2f}", f"{t / f:.2f}x"]
            rows.append([str(shape), mode, *ms, f"{flops / f / 1e9:.1f}", f"{flops / t / 1e9:.1f}"])
    head = [
        "shape (B,NH,T,hs)",
        "mode",
        "fastllm ms",
        "torch ms",
        "torch/fastllm",
        "fastllm GFLOP/s",
        "torch GFLOP/s",
    ]
    print_table(rows, head)


if __name__ == "__main__":
    cli(run, __doc__)
