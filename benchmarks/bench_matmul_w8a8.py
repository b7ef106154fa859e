"""Inference matmuls with quantized weights, one layer at a time, fastllm vs PyTorch on the CPU (same process, same
threads, interleaved): out = x @ W^T for x of N rows (1 and 8: decode steps; 64 and 512: prompts), GPT-2's layer
shapes and its lm-head.
    python benchmarks/bench_matmul_w8a8.py [--threads 2] [--quick]

fastllm: float32 weights, bf16 weights (model.bf16_weights()' layout: ops.pack_bf16 where that is preferred, else
to_bf16), int8 weight-only (ops.quantize_int8, fp32 activations) and w8a8 (ops.pack_int8: each row of x quantized to
int8 at every call, exact int32 sums; VPDPBUSD on AVX512-VNNI). torch: F.linear in float32 and on bfloat16 tensors,
and torch.ao.quantization's dynamic int8 linear (the kernel quantize_dynamic puts in a model: int8 weights per
channel, x quantized per call) -- the scheme w8a8 computes. GOP/s = 2*N*C*OC / median time. The weights are made
once, outside the timing; W is cold in cache only where it exceeds the L3 (the lm-head)."""

from __future__ import annotations

import os
import sys
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, header, print_table, set_threads  # noqa: E402

from fastllm import ops  # noqa: E402

SHAPES = [(768, 2304), (768, 3072), (3072, 768), (768, 50257)]  # (C, OC): qkv, fc, fc-projection, lm-head
ROWS = (1, 8, 64, 512)


def providers(N: int, C: int, OC: int) -> dict:
    import torch
    import torch.nn.functional as F

    warnings.filterwarnings("ignore", message="torch.quantize_per_tensor")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C), dtype=np.float32)
    w = rng.standard_normal((OC, C), dtype=np.float32) * 0.02
    w16 = ops.pack_bf16(w) if ops.bf16_panels_preferred() else ops.to_bf16(w)
    w8, wq = ops.quantize_int8(w), ops.pack_int8(w)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    tx16, tw16 = tx.bfloat16(), tw.bfloat16()
    qw = torch.quantize_per_channel(tw, (tw.abs().amax(1) / 127).double().clamp_min(1e-12),
                                    torch.zeros(OC, dtype=torch.long), 0, torch.qint8)
    packed = torch.ops.quantized.linear_prepack(qw, None)
    return {"fastllm": lambda: ops.matmul_forward(x, w), "fastllm bf16w": lambda: ops.matmul_forward(x, w16),
            "fastllm int8w": lambda: ops.matmul_forward(x, w8), "fastllm w8a8": lambda: ops.matmul_forward(x, wq),
            "torch": lambda: F.linear(tx, tw), "torch bf16": lambda: F.linear(tx16, tw16),
            "torch int8": lambda: torch.ops.quantized.linear_dynamic(tx, packed, True)}


def run(threads: int = 2, quick: bool = False) -> None:
    import torch

    set_threads(threads)
    torch.set_num_threads(threads)
    print(header("inference matmul with quantized weights (GOP/s)", threads))
    rows = []
    for C, OC in SHAPES[:2] if quick else SHAPES:
        for N in ROWS[::3] if quick else ROWS:
            fns = providers(N, C, OC)
            s = {k: v["median"] for k, v in bench(fns, repeats=5 if quick else 15, warmup=2).items()}
            gops = {k: f"{2 * N * C * OC / v / 1e9:.0f}" for k, v in s.items()}
            ratios = [f"{s[k] / s['fastllm w8a8']:.2f}x" for k in ("fastllm", "fastllm bf16w", "torch int8",
                                                                       "torch bf16")]
            rows.append([f"({N}, {C}, {OC})", *gops.values(), *ratios])
    print("x (N, C) @ W (OC, C)^T; w8a8 = int8 weights and activations (integer products), int8w = int8 weights, fp32 "
          "activations; torch int8 = torch.ops.quantized.linear_dynamic (quantize_dynamic's kernel)")
    print_table(rows, ["shape (N,C,OC)", *fns, "fastllm/w8a8", "bf16w/w8a8", "torch int8/fastllm w8a8",
                       "torch bf16/fastllm w8a8"])


if __name__ == "__main__":
    cli(run, __doc__)
