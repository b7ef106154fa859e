"""RMSNorm forward and backward, fastllm vs PyTorch (same threads; --device cuda: on the GPU in bf16).
    python benchmarks/bench_rmsnorm.py [--threads 2] [--quick] [--device cuda]

Shapes: the hidden rows of SmolLM2-135M (C = 576) and Qwen2.5-0.5B (C = 896) at N = B*T = 4096 tokens, a 2048-wide
model, and Qwen3's QK-norm rows (hs = 128). torch: F.rms_norm (aten's fused kernel) forward; backward = autograd
through it (what training runs). The HF formula (LlamaRMSNorm: pow, mean, rsqrt, two muls) is timed as a second
torch column, forward only. GB/s: forward reads x and writes out (8 N C bytes fp32), backward reads dout, x and
read-modify-writes dx (16 N C; fastllm accumulates, torch writes fresh buffers). Ratio > 1: fastllm faster."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, cuda_time_ms, gpu_or_exit, gpu_row, header, print_table, set_threads  # noqa: E402

from fastllm import ops  # noqa: E402

SHAPES = [(4096, 576), (4096, 896), (4096, 2048), (4 * 512 * 16, 128)]
QUICK = [(4096, 576)]


def _hf_rmsnorm(x, w, eps=1e-6):
    import torch

    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def cpu_rows(N: int, C: int, quick: bool) -> list[list[str]]:
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((N, C), dtype=np.float32), rng.standard_normal(C, dtype=np.float32)
    dout = rng.standard_normal((N, C), dtype=np.float32)
    out, rstd = np.empty_like(x), np.empty(N, np.float32)
    dx, dw = np.zeros_like(x), np.zeros(C, np.float32)
    fwd = {"fastllm": lambda: ops.rmsnorm_forward(x, w, out=out, rstd=rstd)}
    bwd = {"fastllm": lambda: ops.rmsnorm_backward(dout, x, w, rstd, dx=dx, dweight=dw)}
    hf = None
    try:
        import torch
        import torch.nn.functional as F

        xt, wt, dyt = (torch.from_numpy(a) for a in (x, w, dout))
        xg, wg = xt.clone().requires_grad_(), wt.clone().requires_grad_()
        yg = F.rms_norm(xg, (C,), wg, 1e-6)
        fwd["torch"] = lambda: F.rms_norm(xt, (C,), wt, 1e-6)
        hf = lambda: _hf_rmsnorm(xt, wt)  # noqa: E731
        bwd["torch"] = lambda: yg.backward(dyt, retain_graph=True)
    except ImportError:
        pass
    rows = []
    for name, fns, nbytes in (("fwd", fwd, 8 * N * C), ("bwd", bwd, 16 * N * C)):
        if name == "fwd" and hf:
            fns = {**fns, "hf": hf}
        t = bench(fns, repeats=5 if quick else 15, warmup=2)
        f, tt = t["fastllm"]["median"], t.get("torch", {}).get("median")
        h = t.get("hf", {}).get("median")
        rows.append([f"({N}, {C})", name, f"{f * 1e3:.3f}", f"{tt * 1e3:.3f}" if tt else "-",
                     f"{h * 1e3:.3f}" if h else "-", f"{tt / f:.2f}x" if tt else "-", f"{h / f:.2f}x" if h else "-",
                     f"{nbytes / f / 1e9:.1f}"])
    return rows


def cuda_rows(N: int, C: int, quick: bool) -> list[list[str]]:
    torch, cuda = gpu_or_exit("bench_rmsnorm")
    F = torch.nn.functional

    reps = 10 if quick else 50
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    w, dy = torch.randn(C, device="cuda", dtype=torch.bfloat16), torch.randn_like(x)
    out, rstd = torch.empty_like(x), torch.empty(N, device="cuda")
    dx, dw = torch.zeros_like(x), torch.zeros(C, device="cuda")
    W = cuda.from_dlpack
    xo, wo, oo, ro, dyo, dxo, dwo = W(x), W(w), W(out), W(rstd), W(dy), W(dx), W(dw)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    yg = F.rms_norm(xg, (C,), wg, 1e-6)

    def ms(fn):
        return cuda_time_ms(fn, reps, 3, before=flush.zero_)

    f = ms(lambda: cuda.rmsnorm_forward(xo, wo, out=oo, rstd=ro))
    t = ms(lambda: F.rms_norm(x, (C,), w, 1e-6))
    fb = ms(lambda: cuda.rmsnorm_backward(dyo, xo, wo, ro, dx=dxo, dweight=dwo))
    tb = ms(lambda: yg.backward(dy, retain_graph=True))
    return [gpu_row([f"({N}, {C})", "fwd"], f, t, 4 * N * C), gpu_row([f"({N}, {C})", "bwd"], fb, tb, 8 * N * C)]


def run(threads: int = 2, quick: bool = False, device: str = "cpu") -> None:
    set_threads(threads)
    shapes = QUICK if quick else SHAPES
    if device == "cuda":
        rows = [r for N, C in shapes for r in cuda_rows(N, C, quick)]
        print(header("rmsnorm fwd / bwd, GPU bf16", threads))
        print_table(rows, ["shape (N, C)", "pass", "fastllm ms", "torch ms", "torch/fastllm", "GB/s"])
        return
    print(header("rmsnorm fwd / bwd", threads))
    rows = [r for N, C in shapes for r in cpu_rows(N, C, quick)]
    print_table(rows, ["shape (N, C)", "pass", "fastllm ms", "torch ms", "HF formula ms", "torch/fastllm",
                       "HF/fastllm", "GB/s"])


if __name__ == "__main__":
    cli(run, __doc__, device=True)
