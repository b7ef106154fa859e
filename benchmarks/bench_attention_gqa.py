"""Grouped-query causal attention, fastllm vs torch SDPA (same threads; --device cuda: on the GPU in bf16).
    python benchmarks/bench_attention_gqa.py [--threads 2] [--quick] [--device cuda]

Training shapes (B, T, NH, NKV, hs): SmolLM2-135M (9 query heads, 3 kv heads), Qwen2.5-0.5B (14, 2), and MQA (8, 1),
at T = 512; fwd and fwd+bwd. fastllm reads packed qkv (B, T, (NH + 2 NKV) hs) and never repeats K/V; torch runs
F.scaled_dot_product_attention(is_causal=True, enable_gqa=True) on strided views of the same packed tensor (its
backward allocates the gradient; fastllm's zeroes a preallocated dqkv per call). The "torch repeat_kv" column is
HF's eager path (repeat_kv, then SDPA), forward only.
Decoding: one new token per sequence against a KV cache of L positions that holds only the kv heads: fastllm
attention_kv_forward (appends the token's k, v, then attends) vs torch SDPA (enable_gqa) of the query over the cache.
GFLOP/s: causal fwd 2*B*NH*T^2*hs, bwd 2.5x that. Ratio > 1: fastllm faster."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, cuda_time_ms, gpu_or_exit, header, print_table, set_threads  # noqa: E402

from fastllm import ops  # noqa: E402

SHAPES = [(4, 512, 9, 3, 64), (4, 512, 14, 2, 64), (4, 512, 8, 1, 64)]
DECODE = [(1, 1024, 14, 2, 64), (8, 1024, 14, 2, 64)]  # (B, L, NH, NKV, hs)
QUICK, QUICK_DECODE = [(2, 256, 9, 3, 64)], [(1, 256, 14, 2, 64)]


def _views(x, NH, NKV, hs):
    """q (B, NH, T, hs), k, v (B, NKV, T, hs) strided views of packed x (B, T, (NH + 2 NKV) hs)."""
    B, T, _ = x.shape
    h = x.view(B, T, NH + 2 * NKV, hs).transpose(1, 2)
    return h[:, :NH], h[:, NH:NH + NKV], h[:, NH + NKV:]


def _torch_train(x, dout, NH, NKV, hs):
    import torch
    import torch.nn.functional as F

    B, T, _ = x.shape

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(*_views(x, NH, NKV, hs), is_causal=True, enable_gqa=True)

    def fwdbwd():
        xg = x.detach().requires_grad_(True)
        y = F.scaled_dot_product_attention(*_views(xg, NH, NKV, hs), is_causal=True, enable_gqa=True)
        y.transpose(1, 2).reshape(B, T, NH * hs).backward(dout)

    def repeat_kv():
        q, k, v = _views(x, NH, NKV, hs)
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k.repeat_interleave(NH // NKV, 1), v.repeat_interleave(NH // NKV, 1),
                                           is_causal=True)

    return fwd, fwdbwd, repeat_kv


def cpu_train_rows(shape, quick: bool) -> list[list[str]]:
    B, T, NH, NKV, hs = shape
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, (NH + 2 * NKV) * hs), dtype=np.float32)
    dout = rng.standard_normal((B, T, NH * hs), dtype=np.float32)
    out, lse, dqkv = np.empty((B, T, NH * hs), np.float32), np.empty((B, NH, T), np.float32), np.zeros_like(qkv)

    def f_fwd():
        ops.attention_forward(qkv, NH, out=out, lse=lse, n_kv_head=NKV)

    def f_fwdbwd():
        f_fwd()
        dqkv.fill(0.0)
        ops.attention_backward(dout, qkv, out, lse, NH, dqkv=dqkv, n_kv_head=NKV)

    fns = {"fwd": {"fastllm": f_fwd}, "fwd+bwd": {"fastllm": f_fwdbwd}}
    try:
        import torch

        t_fwd, t_fwdbwd, t_rep = _torch_train(torch.from_numpy(qkv), torch.from_numpy(dout), NH, NKV, hs)
        fns["fwd"].update(torch=t_fwd, repeat_kv=t_rep)
        fns["fwd+bwd"]["torch"] = t_fwdbwd
    except ImportError:
        pass
    rows, flops = [], 2.0 * B * NH * T * T * hs
    for mode, f in fns.items():
        res = bench(f, repeats=3 if quick else 7, warmup=1)
        ours, t = res["fastllm"]["median"], res.get("torch", {}).get("median", float("nan"))
        rep = res.get("repeat_kv", {}).get("median")
        fl = flops * (1.0 if mode == "fwd" else 3.5)
        rows.append([str(shape), mode, f"{ours * 1e3:.2f}", f"{t * 1e3:.2f}", f"{rep * 1e3:.2f}" if rep else "-",
                     f"{t / ours:.2f}x", f"{fl / ours / 1e9:.1f}"])
    return rows


def cpu_decode_rows(shape, quick: bool) -> list[list[str]]:
    B, L, NH, NKV, hs = shape
    rng = np.random.default_rng(0)
    kc = rng.standard_normal((B, NKV, L + 1, hs), dtype=np.float32)
    vc = rng.standard_normal((B, NKV, L + 1, hs), dtype=np.float32)
    qkv = rng.standard_normal((B, 1, (NH + 2 * NKV) * hs), dtype=np.float32)
    out, pos = np.empty((B, 1, NH * hs), np.float32), np.full(B, L, np.int32)
    fns = {"fastllm": lambda: ops.attention_kv_forward(qkv, kc, vc, pos, out=out, n_kv_head=NKV)}
    try:
        import torch
        import torch.nn.functional as F

        q = torch.from_numpy(qkv[:, :, :NH * hs]).view(B, 1, NH, hs).transpose(1, 2)
        k, v = torch.from_numpy(kc), torch.from_numpy(vc)

        def t_dec():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        fns["torch"] = t_dec
    except ImportError:
        pass
    res = bench(fns, repeats=5 if quick else 30, warmup=2)
    ours, t = res["fastllm"]["median"], res.get("torch", {}).get("median", float("nan"))
    cache_bytes = 2 * B * NKV * (L + 1) * hs * 4
    return [[f"{shape} decode", "1 token", f"{ours * 1e3:.3f}", f"{t * 1e3:.3f}", "-", f"{t / ours:.2f}x",
             f"{cache_bytes / ours / 1e9:.1f} GB/s"]]


def cuda_rows(shape, quick: bool) -> list[list[str]]:
    torch, cuda = gpu_or_exit("bench_attention_gqa")
    B, T, NH, NKV, hs = shape
    reps = 10 if quick else 30
    x = torch.randn(B, T, (NH + 2 * NKV) * hs, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(B, T, NH * hs, device="cuda", dtype=torch.bfloat16)
    xo, do = cuda.from_dlpack(x), cuda.from_dlpack(dout)
    out, lse = cuda.empty((B, T, NH * hs), "bfloat16"), cuda.empty((B, NH, T), "float32")
    dq = cuda.zeros(tuple(x.shape), "bfloat16")

    def f_fwdbwd():
        cuda.attention_forward(xo, NH, out=out, lse=lse, n_kv_head=NKV)
        cuda.attention_backward(do, xo, out, lse, NH, dqkv=dq, n_kv_head=NKV)

    t_fwd, t_fwdbwd, t_rep = _torch_train(x, dout, NH, NKV, hs)
    fl = 2.0 * B * NH * T * T * hs
    rows = []
    for mode, ours, theirs, k in (("fwd", lambda: cuda.attention_forward(xo, NH, out=out, lse=lse, n_kv_head=NKV),
                                   t_fwd, 1.0), ("fwd+bwd", f_fwdbwd, t_fwdbwd, 3.5)):
        f, t = cuda_time_ms(ours, reps, 3), cuda_time_ms(theirs, reps, 3)
        r = cuda_time_ms(t_rep, reps, 3) if mode == "fwd" else None
        rows.append([str(shape), mode, f"{f:.3f}", f"{t:.3f}", f"{r:.3f}" if r else "-", f"{t / f:.2f}x",
                     f"{fl * k / f / 1e9:.0f}"])
    return rows


def run(threads: int = 2, quick: bool = False, device: str = "cpu") -> None:
    set_threads(threads)
    head = ["shape (B,T,NH,NKV,hs)", "mode", "fastllm ms", "torch ms", "torch repeat_kv ms", "torch/fastllm",
            "fastllm GFLOP/s"]
    if device == "cuda":
        rows = [r for shape in (QUICK if quick else SHAPES) for r in cuda_rows(shape, quick)]
        print(header("grouped-query attention (causal), GPU bf16", threads))
        print_table(rows, head)
        return
    print(header("grouped-query attention (causal)", threads))
    rows = [r for shape in (QUICK if quick else SHAPES) for r in cpu_train_rows(shape, quick)]
    rows += [r for shape in (QUICK_DECODE if quick else DECODE) for r in cpu_decode_rows(shape, quick)]
    print_table(rows, head)


if __name__ == "__main__":
    cli(run, __doc__, device=True)
