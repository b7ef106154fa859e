"""CUDA GEMM and fused classifier vs torch (cuBLAS, F.cross_entropy), bf16.

1. TFLOP/s of fastllm.cuda.gemm ('auto' = tensor cores for 2 blocks/SM, 'tc1' = the 1 block/SM build) vs
   torch.matmul on GPT-2 124M training shapes (B*T = 16384 rows, C = 768): the forward (out = inp @ W^T), the
   input gradient (dinp = dout @ W) and the weight gradient (dweight += dout^T @ inp, fp32 output for fastllm,
   bf16 for torch) of the qkv, attention-projection, fc and fc-projection layers, plus 4096^3 and 8192^3.
2. The classifier at V = 50257, C = 768, N = 16384 (8192 with --quick): fastllm.cuda.lmhead_cross_entropy
   (forward + backward, chunked, never N x V) vs torch F.linear + F.cross_entropy(logits.float()) + backward
   (what autocast does): time and extra device memory.
Ratios above 1 mean fastllm is faster. Timing: torch.cuda.Event around each call on the default stream (fastllm
launches there too), warm-up first, median of the repetitions. Inputs are 25-400 MB, far beyond L2 (50 MB), so
they are not rotated. Without a GPU (or without torch with CUDA) it prints a skip line and exits 0.
    python benchmarks/bench_cuda_matmul.py [--quick] [--reps N]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import cuda_time_ms  # noqa: E402


def gpt2_shapes(rows: int = 16384, C: int = 768):
    """(name, M, N, K, trans_a, trans_b) of the GPT-2 small layer GEMMs."""
    out = []
    for layer, oc, ic in [("qkv", 3 * C, C), ("attproj", C, C), ("fc", 4 * C, C), ("fcproj", C, 4 * C)]:
        out.append((f"{layer} fwd", rows, oc, ic, False, True))  # inp (rows, ic) @ W (oc, ic)^T
        out.append((f"{layer} dinp", rows, ic, oc, False, False))  # dout (rows, oc) @ W (oc, ic)
        out.append((f"{layer} dweight", oc, ic, rows, True, False))  # dout^T (oc, rows) @ inp (rows, ic)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no 8192^3, classifier at N=8192")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 20, quick 6)")
    args = ap.parse_args()
    reps = args.reps or (6 if args.quick else 20)

    from fastllm import cuda

    if not cuda.is_available():
        print("bench_cuda_matmul: skipped (no CUDA build of fastllm or no GPU)")
        return 0
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("bench_cuda_matmul: skipped (torch is not installed)")
        return 0
    if not torch.cuda.is_available():
        print("bench_cuda_matmul: skipped (torch has no CUDA)")
        return 0

    dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    print(f"bench_cuda_matmul | {torch.cuda.get_device_name()} | torch {torch.__version__} | reps={reps}")

    def timed(fn) -> float:
        """median milliseconds of fn() over reps, after 2 warm-up calls"""
        return cuda_time_ms(fn, reps, 2)

    rng = np.random.default_rng(0)

    def rand(shape, scale=1.0):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    # ---- 1. GEMM
    shapes = gpt2_shapes()
    shapes += [("square 4096", 4096, 4096, 4096, False, True), ("square 4096", 4096, 4096, 4096, False, False)]
    if not args.quick:
        shapes += [("square 8192", 8192, 8192, 8192, False, True)]
    print(
        f"\n{'gemm (M x N x K, op)':<38}{'auto ms':>9}{'tc1 ms':>9}{'torch ms':>10}"
        f"{'auto TF/s':>11}{'tc1 TF/s':>10}{'torch TF/s':>11}{'torch/auto':>11}"
    )

    def run_shape(M, N, K, ta, tb, weight_grad):
        """{impl: ms} for fastllm 'auto', 'tc1' and torch"""
        a_np = rand((K, M) if ta else (M, K))
        b_np = rand((N, K) if tb else (K, N), 1 / np.sqrt(K))
        a, b = cuda.to_device(a_np, "bfloat16"), cuda.to_device(b_np, "bfloat16")
        c = cuda.zeros((M, N), "float32" if weight_grad else "bfloat16")
        ta_t = torch.from_numpy(a_np).to(dev, torch.bfloat16)
        tb_t = torch.from_numpy(b_np).to(dev, torch.bfloat16)
        opa, opb = (ta_t.t() if ta else ta_t), (tb_t.t() if tb else tb_t)
        tc_t = torch.empty((M, N), device=dev, dtype=torch.bfloat16)
        res = {}
        for impl in ("auto", "tc1"):
            old = cuda.gemm_impl(impl)
            res[impl] = timed(lambda: cuda.gemm(c, a, b, trans_a=ta, trans_b=tb, accumulate=weight_grad))
            cuda.gemm_impl(old)
        res["torch"] = timed(lambda: torch.matmul(opa, opb, out=tc_t))
        return res

    ratios = []
    for name, M, N, K, ta, tb in shapes:
        weight_grad = "dweight" in name
        res = run_shape(M, N, K, ta, tb, weight_grad)
        tf = {k: 2 * M * N * K / (v * 1e-3) / 1e12 for k, v in res.items()}
        ratios.append(res["torch"] / res["auto"])
        op = ("t" if ta else "n") + ("t" if tb else "n")
        label = f"{name} {M}x{N}x{K} {op}" + (" (f32 +=)" if weight_grad else "")
        print(
            f"{label:<38}{res['auto']:>9.3f}{res['tc1']:>9.3f}{res['torch']:>10.3f}"
            f"{tf['auto']:>11.1f}{tf['tc1']:>10.1f}{tf['torch']:>11.1f}{ratios[-1]:>10.2f}x",
            flush=True,
        )
    print(f"geometric mean torch/auto over {len(ratios)} shapes: {np.exp(np.mean(np.log(ratios))):.2f}x")

    def run_ffma(M, N, K, dtype):
        """the FFMA kernel (the reference for bf16, the fp32 path) on one shape, for scale"""
        a, b = cuda.to_device(rand((M, K)), dtype), cuda.to_device(rand((N, K)), dtype)
        c = cuda.zeros((M, N), dtype)
        old = cuda.gemm_impl("simple")
        ms = timed(lambda: cuda.gemm(c, a, b, trans_b=True))
        cuda.gemm_impl(old)
        print(f"FFMA kernel {M}x{N}x{K} nt {dtype}: {ms:.3f} ms, {2 * M * N * K / ms / 1e9:.1f} TFLOP/s")

    run_ffma(4096, 4096, 1024, "bfloat16")
    run_ffma(4096, 4096, 1024, "float32")

    # ---- 2. classifier
    Nr, C, V = (8192 if args.quick else 16384), 768, 50257
    h_np, w_np = rand((Nr, C)), rand((V, C), 0.02)
    t_np = rng.integers(0, V, Nr).astype(np.int32)
    scale = 1.0 / Nr
    h, w = cuda.to_device(h_np, "bfloat16"), cuda.to_device(w_np, "bfloat16")
    targets = cuda.to_device(t_np)
    losses, dh, dw = cuda.empty((Nr,)), cuda.zeros((Nr, C), "bfloat16"), cuda.zeros((V, C))
    scratch = cuda.lmhead_scratch(Nr, V, "bfloat16")
    ours = timed(lambda: cuda.lmhead_cross_entropy(losses, dh, dw, h, w, targets, scale, -100, scratch))
    ours_fwd = timed(lambda: cuda.lmhead_cross_entropy(losses, None, None, h, w, targets, scale, -100, scratch))
    ours_mem = scratch.nbytes

    th = torch.from_numpy(h_np).to(dev, torch.bfloat16).requires_grad_()
    tw = torch.from_numpy(w_np).to(dev, torch.bfloat16).requires_grad_()
    tt = torch.from_numpy(t_np).to(dev, torch.int64)

    def torch_step():
        th.grad = tw.grad = None
        loss = F.cross_entropy(F.linear(th, tw).float(), tt)
        loss.backward()

    def torch_fwd():
        with torch.no_grad():
            F.cross_entropy(F.linear(th, tw).float(), tt)

    theirs = timed(torch_step)
    theirs_fwd = timed(torch_fwd)
    th.grad = tw.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch_step()
    torch.cuda.synchronize()
    theirs_mem = torch.cuda.max_memory_allocated() - base

    flops = 3 * 2 * Nr * V * C
    print(f"\nclassifier N={Nr} V={V} C={C} bf16 (fastllm scratch {scratch.shape[0]} rows)")
    print(f"{'':<22}{'fastllm ms':>12}{'torch ms':>10}{'torch/fastllm':>15}")
    print(f"{'forward (loss)':<22}{ours_fwd:>12.3f}{theirs_fwd:>10.3f}{theirs_fwd / ours_fwd:>14.2f}x")
    print(
        f"{'forward + backward':<22}{ours:>12.3f}{theirs:>10.3f}{theirs / ours:>14.2f}x"
        f"   (fastllm {flops / ours / 1e9:.0f} TFLOP/s)"
    )
    print(
        f"{'extra memory MiB':<22}{ours_mem / 2**20:>12.0f}{theirs_mem / 2**20:>10.0f}"
        f"{theirs_mem / max(ours_mem, 1):>14.1f}x   (fastllm: the scratch; torch: peak above inputs)"
    )
    # loss agreement, as a sanity check of the timed code
    cuda.lmhead_cross_entropy(losses, None, None, h, w, targets, scale, -100, scratch)
    ref = F.cross_entropy(F.linear(th, tw).float(), tt, reduction="none").detach().cpu().numpy()
    print(f"mean loss fastllm {losses.numpy().mean():.5f} torch {ref.mean():.5f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
