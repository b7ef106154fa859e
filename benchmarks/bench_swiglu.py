"""SwiGLU, GeGLU and ReLU^2 forward/backward, fastllm vs PyTorch (same threads; --device cuda: on the GPU in bf16).
    python benchmarks/bench_swiglu.py [--threads 2] [--quick] [--device cuda]

Shapes (N, H): N = B*T = 4096 tokens, H = the MLP width of SmolLM2-135M (1536) and Qwen2.5-0.5B (4864).
torch SwiGLU is HF LlamaMLP's F.silu(gate) * up on the halves of one (N, 2H) tensor (two kernels and a
temporary); its backward is autograd through that. GeGLU is HF GemmaMLP's F.gelu(gate, approximate="tanh") * up,
the same way. ReLU^2 is nanochat's F.relu(x).square(). GB/s: SwiGLU/GeGLU forward reads 2H and writes H per row
(12 N H bytes fp32), backward reads gate_up, dout and read-modify-writes dgate_up (28 N H); ReLU^2 8 and 16 bytes
per element. Ratio > 1: fastllm faster."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, cuda_time_ms, gpu_or_exit, gpu_row, header, print_table, ratio_row, set_threads  # noqa: E402

from fastllm import ops  # noqa: E402

SHAPES = [(4096, 1536), (4096, 4864)]
QUICK = [(2048, 1536)]


def _torch_fns(gu, dout, H):
    """torch forward / backward callables for SwiGLU and GeGLU on gate_up (N, 2H) and ReLU^2 on its first H
    columns."""
    import torch.nn.functional as F

    gu_g = gu.clone().requires_grad_()
    y = F.silu(gu_g[:, :H]) * gu_g[:, H:]
    yg = F.gelu(gu_g[:, :H], approximate="tanh") * gu_g[:, H:]
    x = gu[:, :H].contiguous()
    x_g = x.clone().requires_grad_()
    r = F.relu(x_g).square()
    return {"swiglu fwd": lambda: F.silu(gu[:, :H]) * gu[:, H:],
            "swiglu bwd": lambda: y.backward(dout, retain_graph=True),
            "geglu fwd": lambda: F.gelu(gu[:, :H], approximate="tanh") * gu[:, H:],
            "geglu bwd": lambda: yg.backward(dout, retain_graph=True),
            "relu2 fwd": lambda: F.relu(x).square(),
            "relu2 bwd": lambda: r.backward(dout, retain_graph=True)}


def cpu_rows(N: int, H: int, quick: bool) -> list[list[str]]:
    rng = np.random.default_rng(0)
    gu = rng.standard_normal((N, 2 * H), dtype=np.float32)
    dout = rng.standard_normal((N, H), dtype=np.float32)
    x = np.ascontiguousarray(gu[:, :H])
    out, dgu, dx = np.empty((N, H), np.float32), np.zeros_like(gu), np.zeros_like(x)
    fns = {"swiglu fwd": {"fastllm": lambda: ops.swiglu_forward(gu, out=out)},
           "swiglu bwd": {"fastllm": lambda: ops.swiglu_backward(dout, gu, dgate_up=dgu)},
           "geglu fwd": {"fastllm": lambda: ops.geglu_forward(gu, out=out)},
           "geglu bwd": {"fastllm": lambda: ops.geglu_backward(dout, gu, dgate_up=dgu)},
           "relu2 fwd": {"fastllm": lambda: ops.relu2_forward(x, out=out)},
           "relu2 bwd": {"fastllm": lambda: ops.relu2_backward(dout, x, dx=dx)}}
    try:
        import torch

        for k, f in _torch_fns(torch.from_numpy(gu), torch.from_numpy(dout), H).items():
            fns[k]["torch"] = f
    except ImportError:
        pass
    nbytes = {"swiglu fwd": 12 * N * H, "swiglu bwd": 28 * N * H, "geglu fwd": 12 * N * H, "geglu bwd": 28 * N * H,
              "relu2 fwd": 8 * N * H, "relu2 bwd": 16 * N * H}
    return [ratio_row([f"({N}, {H})", k], bench(f, repeats=5 if quick else 15, warmup=2), nbytes[k])
            for k, f in fns.items()]


def cuda_rows(N: int, H: int, quick: bool) -> list[list[str]]:
    torch, cuda = gpu_or_exit("bench_swiglu")
    reps = 10 if quick else 50
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    gu = torch.randn(N, 2 * H, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(N, H, device="cuda", dtype=torch.bfloat16)
    x = gu[:, :H].contiguous()
    out, dgu, dx = torch.empty_like(dout), torch.zeros_like(gu), torch.zeros_like(x)
    W = cuda.from_dlpack
    guo, do, xo, oo, dguo, dxo = W(gu), W(dout), W(x), W(out), W(dgu), W(dx)
    ours = {"swiglu fwd": lambda: cuda.swiglu_forward(guo, out=oo),
            "swiglu bwd": lambda: cuda.swiglu_backward(do, guo, dgate_up=dguo),
            "geglu fwd": lambda: cuda.geglu_forward(guo, out=oo),
            "geglu bwd": lambda: cuda.geglu_backward(do, guo, dgate_up=dguo),
            "relu2 fwd": lambda: cuda.relu2_forward(xo, out=oo),
            "relu2 bwd": lambda: cuda.relu2_backward(do, xo, dx=dxo)}
    theirs = _torch_fns(gu, dout, H)
    nbytes = {"swiglu fwd": 6 * N * H, "swiglu bwd": 14 * N * H, "geglu fwd": 6 * N * H, "geglu bwd": 14 * N * H,
              "relu2 fwd": 4 * N * H, "relu2 bwd": 8 * N * H}
    return [gpu_row([f"({N}, {H})", k], cuda_time_ms(f, reps, 3, before=flush.zero_),
                    cuda_time_ms(theirs[k], reps, 3, before=flush.zero_), nbytes[k]) for k, f in ours.items()]


def run(threads: int = 2, quick: bool = False, device: str = "cpu", dtype: str = "float32",
        smoke: bool = False) -> None:
    if device == "cuda" and dtype != "bfloat16":
        raise SystemExit("bench_swiglu.py: error: the GPU rows are bfloat16 only")
    quick = quick or smoke  # the smallest shapes this benchmark has
    set_threads(threads)
    rows_of = cuda_rows if device == "cuda" else cpu_rows
    rows = [r for N, H in (QUICK if quick else SHAPES) for r in rows_of(N, H, quick)]
    print(header("swiglu / geglu / relu2 fwd, bwd" + (", GPU bf16" if device == "cuda" else ""), threads))
    print_table(rows, ["shape (N, H)", "op", "fastllm ms", "torch ms", "torch/fastllm", "GB/s"])


if __name__ == "__main__":
    cli(run, __doc__, device=True)
