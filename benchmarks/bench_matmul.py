"""Matmul (fully connected layer) forward and backward, fastllm vs PyTorch on the same device, GPT-2 shapes:
    python benchmarks/bench_matmul.py [--threads 2] [--quick] [--device cpu|cuda] [--dtype ...] [--smoke]

Forward: out = inp @ weight^T (torch: F.linear). Backward: the two GEMMs torch autograd runs for F.linear,
dinp = dout @ weight and dweight = dout^T @ inp (fastllm: matmul_backward without dbias, accumulating into
preallocated buffers, dweight in float32; torch: matmuls into preallocated `out=` buffers of the dtype).
GFLOP/s (TFLOP/s on the GPU) = 2*N*C*OC per GEMM / median time; ratio = torch ms / fastllm ms (above 1: fastllm
faster). On the CPU also "fastllm bf16", fastllm's mixed precision (backend.get("cpu", "bfloat16"): the fp32
arrays rounded to bf16 as the GEMM packs them, fp32 sums; VDPBF16PS where the CPU has AVX512_BF16), and "torch
bf16": the same GEMMs with bfloat16 operands (what torch.autocast("cpu", dtype=torch.bfloat16) runs for F.linear;
oneDNN, AMX or AVX512_BF16 where the CPU has them), the operands cast once outside the timing; torch bf16 is
compared with fastllm bf16. Shapes (N, C, OC): the fc, fc-projection and lm-head layers (CPU: 2048 rows); on the
GPU the qkv, attention-projection, fc and fc-projection layers of GPT-2 124M at B*T = 16384 rows.
With --device cuda also the GEMM itself (fastllm.cuda.gemm: 'auto' = tensor cores at 2 blocks/SM, 'tc1' = the
1 block/SM build) vs torch.matmul on every GEMM of those layers (forward, dinp, dweight) plus 4096^3 (and 8192^3
without --quick), and the FFMA kernel (the fp32 path and the fallback) for scale. Inputs are 25-400 MB, far
beyond the L2, which is flushed anyway."""

from __future__ import annotations

import os
import sys
from functools import partial

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import cli, header, print_table, set_threads, time_fns, to_torch, torch_on  # noqa: E402

from fastllm import backend  # noqa: E402

GPT2_LAYERS = [("qkv", 2304, 768), ("attproj", 768, 768), ("fc", 3072, 768), ("fcproj", 768, 3072)]  # (OC, C)
SHAPES = {"cpu": [(2048, 768, 3072), (2048, 3072, 768), (2048, 768, 50304)],
          "cuda": [(16384, c, oc) for _, oc, c in GPT2_LAYERS]}  # (N, C, OC)
QUICK = {"cpu": [(512, 768, 3072), (512, 3072, 768), (512, 768, 8192)], "cuda": SHAPES["cuda"]}
SMOKE = [(37, 64, 72)]


def providers(shape, which: str, device: str, dtype: str):
    bk = backend.get(device)
    N, C, OC = shape
    rng = np.random.default_rng(0)
    inp_np = rng.standard_normal((N, C), dtype=np.float32)
    weight_np = rng.standard_normal((OC, C), dtype=np.float32) * 0.02
    dout_np = rng.standard_normal((N, OC), dtype=np.float32)
    inp, weight, dout = (bk.to_device(a, dtype) for a in (inp_np, weight_np, dout_np))
    out, dinp, dweight = bk.empty((N, OC), dtype), bk.zeros((N, C), dtype), bk.zeros((OC, C))
    # the CPU's mixed precision (fp32 arrays, bf16 products) beside fp32: backend.get("cpu", "bfloat16")
    kinds = {"fastllm": bk, "fastllm bf16": backend.get("cpu", "bfloat16")} if device == "cpu" and \
        dtype == "float32" else {"fastllm": bk}
    if which == "fwd":
        fns = {k: partial(b.matmul_forward, inp, weight, out=out) for k, b in kinds.items()}
    else:
        fns = {k: partial(b.matmul_backward, dout, inp, weight, dinp=dinp, dweight=dweight, need_bias=False)
               for k, b in kinds.items()}
    if torch_on(device) is not None:
        fns["torch"] = torch_fn(which, inp_np, weight_np, dout_np, device, dtype)
        if device == "cpu" and dtype == "float32":
            fns["torch bf16"] = torch_fn(which, inp_np, weight_np, dout_np, device, "bfloat16")
    return fns


def torch_fn(which: str, inp_np, weight_np, dout_np, device: str, dtype: str):
    """torch's forward (F.linear) or backward (dinp and dweight GEMMs into preallocated buffers) in `dtype`."""
    import torch

    F = torch.nn.functional
    ti, tw, tdo = (to_torch(a, device, dtype) for a in (inp_np, weight_np, dout_np))
    tdi, tdw = torch.empty_like(ti), torch.empty_like(tw)
    if which == "fwd":
        return lambda: F.linear(ti, tw)

    def torch_bwd():
        torch.mm(tdo, tw, out=tdi)
        torch.mm(tdo.t(), ti, out=tdw)

    return torch_bwd


def run(threads: int = 2, quick: bool = False, device: str = "cpu", dtype: str = "float32",
        smoke: bool = False) -> None:
    set_threads(threads)
    unit, scale = ("GFLOP/s", 1e9) if device == "cpu" else ("TFLOP/s", 1e12)
    print(header(f"matmul fwd/bwd ({unit})", threads, device, dtype))
    repeats = 1 if smoke else 3 if quick else 5
    rows = []
    for shape in SMOKE if smoke else (QUICK if quick else SHAPES)[device]:
        N, C, OC = shape
        for which in ("fwd", "bwd"):
            flops = 2.0 * N * C * OC * (1 if which == "fwd" else 2)
            res = time_fns(providers(shape, which, device, dtype), device, repeats=repeats,
                           warmup=0 if smoke else 1)
            f = res["fastllm"]["median"]
            row = [str(shape), which, f"{f * 1e3:.2f}", f"{flops / f / scale:.1f}"]
            # (name, what its time is divided by): fp32 against fp32, bf16 against fastllm's bf16 where it runs
            f16 = res["fastllm bf16"]["median"] if "fastllm bf16" in res else None
            if f16 is not None:
                row += [f"{f16 * 1e3:.2f}", f"{flops / f16 / scale:.1f}", f"{f / f16:.2f}x"]
            for name, base in (("torch", f), ("torch bf16", f16 or f)) if device == "cpu" else (("torch", f),):
                if name in res:
                    t = res[name]["median"]
                    row += [f"{t * 1e3:.2f}", f"{flops / t / scale:.1f}", f"{t / base:.2f}x"]
                else:
                    row += ["-", "-", "-"]
            rows.append(row)
    head = ["shape (N,C,OC)", "pass", "fastllm ms", f"fastllm {unit}"]
    if device == "cpu" and dtype == "float32":
        head += ["fastllm bf16 ms", f"fastllm bf16 {unit}", "fastllm fp32/bf16"]
    head += ["torch ms", f"torch {unit}", "torch/fastllm"]
    if device == "cpu":
        head += ["torch bf16 ms", f"torch bf16 {unit}",
                 "torch bf16/fastllm bf16" if dtype == "float32" else "torch bf16/fastllm"]
    print_table(rows, head)
    if device == "cuda":
        print()
        run_cuda_gemm(quick, smoke, repeats)


# ---- the GPU's GEMM kernels ----------------------------------------------------------------------------------


def gemm_shapes(rows: int = 16384, quick: bool = False):
    """(name, M, N, K, trans_a, trans_b) of the GPT-2 small layer GEMMs and square ones."""
    out = []
    for layer, oc, ic in GPT2_LAYERS:
        out.append((f"{layer} fwd", rows, oc, ic, False, True))  # inp (rows, ic) @ W (oc, ic)^T
        out.append((f"{layer} dinp", rows, ic, oc, False, False))  # dout (rows, oc) @ W (oc, ic)
        out.append((f"{layer} dweight", oc, ic, rows, True, False))  # dout^T (oc, rows) @ inp (rows, ic)
    out += [("square 4096", 4096, 4096, 4096, False, True), ("square 4096", 4096, 4096, 4096, False, False)]
    if not quick:
        out.append(("square 8192", 8192, 8192, 8192, False, True))
    return out


def gemm_with(impl: str, c, a, b, **kw) -> None:
    """One fastllm.cuda.gemm with the kernel `impl` ('auto', 'tc1' or 'simple')."""
    from fastllm import cuda

    old = cuda.gemm_impl(impl)
    try:
        cuda.gemm(a, b, **kw, out=c)
    finally:
        cuda.gemm_impl(old)


def run_cuda_gemm(quick: bool, smoke: bool, repeats: int) -> None:
    """TFLOP/s of fastllm.cuda.gemm ('auto', 'tc1') vs torch.matmul (bf16; dweight GEMMs accumulate into fp32 in
    fastllm, torch writes bf16), then the FFMA kernel."""
    from fastllm import cuda

    torch = torch_on("cuda")
    rng = np.random.default_rng(0)
    shapes = [("smoke", 136, 264, 40, False, True), ("smoke", 64, 40, 136, True, False)] if smoke else \
        gemm_shapes(quick=quick)

    def rand(shape, scale=1.0):
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    rows, ratios = [], []
    for name, M, N, K, ta, tb in shapes:
        weight_grad = "dweight" in name
        a_np, b_np = rand((K, M) if ta else (M, K)), rand((N, K) if tb else (K, N), 1 / np.sqrt(K))
        a, b = cuda.to_device(a_np, "bfloat16"), cuda.to_device(b_np, "bfloat16")
        c = cuda.zeros((M, N), "float32" if weight_grad else "bfloat16")
        fns = {impl: partial(gemm_with, impl, c, a, b, trans_a=ta, trans_b=tb, accumulate=weight_grad)
               for impl in ("auto", "tc1")}
        if torch is not None:
            ta_t, tb_t = to_torch(a_np, "cuda", "bfloat16"), to_torch(b_np, "cuda", "bfloat16")
            opa, opb = (ta_t.t() if ta else ta_t), (tb_t.t() if tb else tb_t)
            tc_t = torch.empty((M, N), device="cuda", dtype=torch.bfloat16)
            fns["torch"] = lambda opa=opa, opb=opb, tc_t=tc_t: torch.matmul(opa, opb, out=tc_t)
        res = {k: v["median"] for k, v in time_fns(fns, "cuda", repeats=repeats, warmup=0 if smoke else 2).items()}
        tf = {k: 2 * M * N * K / v / 1e12 for k, v in res.items()}
        op = ("t" if ta else "n") + ("t" if tb else "n")
        row = [f"{name} {M}x{N}x{K} {op}" + (" (f32 +=)" if weight_grad else "")]
        row += [f"{res[k] * 1e3:.3f}" for k in ("auto", "tc1")] + [f"{tf[k]:.1f}" for k in ("auto", "tc1")]
        if "torch" in res:
            ratios.append(res["torch"] / res["auto"])
            row += [f"{res['torch'] * 1e3:.3f}", f"{tf['torch']:.1f}", f"{ratios[-1]:.2f}x"]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    print("cuda.gemm, bf16 operands")
    print_table(rows, ["gemm (M x N x K, op)", "auto ms", "tc1 ms", "auto TF/s", "tc1 TF/s", "torch ms", "torch TF/s",
                       "torch/auto"])
    if ratios:
        print(f"geometric mean torch/auto over {len(ratios)} shapes: {np.exp(np.mean(np.log(ratios))):.2f}x")
    M, N, K = (64, 72, 40) if smoke else (4096, 4096, 1024)
    for dtype in ("bfloat16", "float32"):  # the FFMA kernel (the reference for bf16, the fp32 path), for scale
        a, b = cuda.to_device(rand((M, K)), dtype), cuda.to_device(rand((N, K)), dtype)
        ffma = partial(gemm_with, "simple", cuda.zeros((M, N), dtype), a, b, trans_b=True)
        ms = time_fns({"ffma": ffma}, "cuda", repeats=repeats, warmup=0 if smoke else 2)["ffma"]["median"] * 1e3
        print(f"FFMA kernel {M}x{N}x{K} nt {dtype}: {ms:.3f} ms, {2 * M * N * K / ms / 1e9:.1f} TFLOP/s")


if __name__ == "__main__":
    cli(run, __doc__, device=True)
