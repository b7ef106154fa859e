"""CUDA layernorm fwd/bwd, gelu fwd/bwd, residual and AdamW vs PyTorch on the same GPU, GPT-2 124M shapes.
    python benchmarks/bench_cuda_elementwise.py [--quick] [--dtype bfloat16|float32]

Shapes: N = B*T = 16384 rows, C = 768 (layernorm), 4C = 3072 (gelu), 124,439,808 fp32 parameters (AdamW).
torch side: F.layer_norm forward; aten native_layer_norm_backward (what autograd runs: dx, dweight, dbias);
F.gelu(approximate="tanh") via aten gelu.out into a preallocated buffer; aten gelu_backward; torch.add(out=);
torch.optim.AdamW(fused=True) on one flat parameter. fastllm's tensors are the same memory (cuda.from_dlpack).
Timing: CUDA events around each call, L2 flushed (a 256 MiB write) before every repetition, median of the
repetitions after a warm-up. GB/s = the bytes each implementation must move at least, counted per side:
fastllm's backward kernels accumulate (+=) into dx (one more read than torch's =), so their byte counts differ.
Ratio torch/fastllm > 1 means fastllm is faster. Prints a skip line and exits 0 without torch or a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import cuda_time_ms  # noqa: E402


def _skip(why: str) -> None:
    print(f"bench_cuda_elementwise: skipped ({why})")
    sys.exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rows", type=int, default=16384, help="B*T")
    p.add_argument("--C", type=int, default=768)
    p.add_argument("--params", type=int, default=124_439_808)
    args = p.parse_args()

    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        _skip("no torch")
    import fastllm
    from fastllm import cuda

    if not cuda.is_available():
        _skip("fastllm was built without CUDA or no GPU is visible")
    if not torch.cuda.is_available():
        _skip("torch has no CUDA")

    reps, warm = (10, 3) if args.quick else (50, 5)
    tdt = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    s = 2 if args.dtype == "bfloat16" else 4
    N, C = args.rows, args.C
    dev = "cuda"
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)

    def time_ms(fn) -> float:
        return cuda_time_ms(fn, reps, warm, before=flush.zero_)

    W = cuda.from_dlpack  # zero-copy views of torch tensors
    g = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape, dtype=tdt):
        return torch.randn(*shape, device=dev, generator=g).to(dtype)

    rows = []

    def row(name, shape, f_fn, t_fn, f_bytes, t_bytes):
        fm, tm = time_ms(f_fn), time_ms(t_fn)
        rows.append(
            [
                name,
                shape,
                f"{fm:.3f}",
                f"{tm:.3f}",
                f"{f_bytes / fm / 1e6:.0f}",
                f"{t_bytes / tm / 1e6:.0f}",
                f"{tm / fm:.2f}x",
            ]
        )

    # ---- layernorm (N, C)
    x, w, b = randn(N, C), randn(C), randn(C)
    out, mean, rstd = torch.empty_like(x), torch.empty(N, device=dev), torch.empty(N, device=dev)
    xo, wo, bo, oo, mo, ro = W(x), W(w), W(b), W(out), W(mean), W(rstd)
    nc = N * C
    row(
        "layernorm fwd",
        f"({N}, {C})",
        lambda: cuda.layernorm_forward(oo, mo, ro, xo, wo, bo),
        lambda: F.layer_norm(x, (C,), w, b),
        2 * nc * s + 8 * N,
        2 * nc * s + 8 * N,
    )
    dy, dx = randn(N, C), torch.zeros(N, C, device=dev, dtype=tdt)
    dw, db = torch.zeros(C, device=dev), torch.zeros(C, device=dev)
    _, tmean, trstd = torch.ops.aten.native_layer_norm(x, (C,), w, b, 1e-5)
    dyo, dxo, dwo, dbo = W(dy), W(dx), W(dw), W(db)
    row(
        "layernorm bwd",
        f"({N}, {C})",
        lambda: cuda.layernorm_backward(dxo, dwo, dbo, dyo, xo, wo, mo, ro),
        lambda: torch.ops.aten.native_layer_norm_backward(dy, x, (C,), tmean, trstd, w, b, [True, True, True]),
        4 * nc * s + 8 * N,
        3 * nc * s + 8 * N,
    )

    # ---- gelu, residual (N, 4C)
    n = N * 4 * C
    h, hy = randn(N, 4 * C), torch.empty(N, 4 * C, device=dev, dtype=tdt)
    hd, hdx = randn(N, 4 * C), torch.zeros(N, 4 * C, device=dev, dtype=tdt)
    ho, hyo, hdo, hdxo = W(h), W(hy), W(hd), W(hdx)
    row(
        "gelu fwd",
        f"({N}, {4 * C})",
        lambda: cuda.gelu_forward(hyo, ho),
        lambda: torch.ops.aten.gelu.out(h, approximate="tanh", out=hy),
        2 * n * s,
        2 * n * s,
    )
    row(
        "gelu bwd",
        f"({N}, {4 * C})",
        lambda: cuda.gelu_backward(hdxo, hdo, ho),
        lambda: torch.ops.aten.gelu_backward(hd, h, approximate="tanh"),
        4 * n * s,
        3 * n * s,
    )
    row(
        "residual fwd",
        f"({N}, {4 * C})",
        lambda: cuda.residual_forward(hyo, ho, hdo),
        lambda: torch.add(h, hd, out=hy),
        3 * n * s,
        3 * n * s,
    )

    # ---- AdamW on one flat fp32 buffer (+ the bf16 copy the next forward reads)
    P = args.params
    pt = torch.nn.Parameter(torch.randn(P, device=dev, generator=g) * 0.02)
    pt.grad = torch.randn(P, device=dev, generator=g) * 1e-3
    opt = torch.optim.AdamW([pt], lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    opt.step()  # creates the state (exp_avg, exp_avg_sq)
    fp, fg = torch.randn(P, device=dev, generator=g) * 0.02, torch.randn(P, device=dev, generator=g) * 1e-3
    fm, fv = torch.zeros(P, device=dev), torch.zeros(P, device=dev)
    fcopy = torch.empty(P, device=dev, dtype=torch.bfloat16)
    po, go, mo_, vo_, co = W(fp), W(fg), W(fm), W(fv), W(fcopy)
    step = [1]

    def f_adamw(copy):
        cuda.adamw_step(po, go, mo_, vo_, lr=1e-4, t=step[0], weight_decay=0.1, params_copy=co if copy else None)
        step[0] += 1

    row("adamw", f"({P},)", lambda: f_adamw(False), opt.step, 28 * P, 28 * P)
    row("adamw + bf16 copy", f"({P},)", lambda: f_adamw(True), opt.step, 30 * P, 28 * P)

    print(
        f"bench_cuda_elementwise | {torch.cuda.get_device_name()} | fastllm {fastllm.__version__} | "
        f"torch {torch.__version__} | {args.dtype} activations | median of {reps} (L2 flushed)"
    )
    head = ["op", "shape", "fastllm ms", "torch ms", "fastllm GB/s", "torch GB/s", "torch/fastllm"]
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(v).ljust(wd) for v, wd in zip(r, widths)))


if __name__ == "__main__":
    main()
