"""Softmax + cross-entropy forward+backward, and the fused lm-head + cross-entropy, fastllm vs PyTorch on the same
device:
    python benchmarks/bench_softmax_ce.py [--threads 2] [--quick] [--device cpu|cuda] [--dtype ...] [--smoke]

softmax_ce: fastllm writes per-row losses and dlogits, out of place into a preallocated buffer (the native kernel:
the wrapper allocates dlogits unless in place) or in place over the logits; torch runs F.cross_entropy (mean)
forward + backward on the logits (bf16 logits are cast to float32 first, as autocast does). GB/s counts one read
of the logits and one write of dlogits (the DRAM minimum).
lmhead_ce: fastllm's chunked lm-head + CE (never N x V logits; the GPU's scratch of lmhead_chunk_rows rows) vs
torch F.linear + F.cross_entropy (on float32 logits) forward + backward, and the forward alone; TFLOP/s (GFLOP/s on
the CPU) counts 6 N C V (the forward matmul and two backward ones). Extra memory: fastllm's scratch vs torch's
N x V logits + gradient (CPU: computed; GPU: the measured peak above the inputs). Shapes: GPT-2's V (50304 padded
on the CPU, 50257 on the GPU), C = 768; N = B*T rows (GPU: 8192 for softmax_ce, 16384 for the lm-head)."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import cli, header, itemsize, print_table, set_threads, time_fns, to_torch, torch_on  # noqa: E402

from fastllm import _C, backend  # noqa: E402

CE_SHAPES = {"cpu": [(512, 50304), (2048, 50304)], "cuda": [(8192, 50257)]}  # (N, V)
CE_QUICK = {"cpu": [(256, 50304)], "cuda": [(4096, 50257)]}
LM_SHAPES = {"cpu": [(128, 768, 50304)], "cuda": [(16384, 768, 50257)]}  # (N, C, V)
LM_QUICK = {"cpu": [(32, 768, 50304)], "cuda": [(8192, 768, 50257)]}
SMOKE_CE, SMOKE_LM = [(9, 1000)], [(9, 64, 1000)]
CPU_CHUNK = 256  # rows of the CPU lm-head scratch


def _ms(t: dict) -> str:
    return f"{t['median'] * 1e3:.2f}"


def _ratio(t: dict, ours: str) -> str:
    return f"{t['torch']['median'] / t[ours]['median']:.2f}x" if "torch" in t else "-"


def run_softmax_ce(threads: int, quick: bool, device: str, dtype: str, smoke: bool) -> None:
    shapes = SMOKE_CE if smoke else (CE_QUICK if quick else CE_SHAPES)[device]
    print(header("softmax_ce fwd+bwd", threads, device, dtype))
    rows = [_softmax_ce_row(N, V, device, dtype, 1 if smoke else 3 if quick else 7) for N, V in shapes]
    print_table(rows, ["shape (N, V)", "fastllm ms", "inplace ms", "torch ms", "torch/fastllm", "torch/inplace",
                       "GB/s"])


def _softmax_ce_row(N: int, V: int, device: str, dtype: str, repeats: int) -> list:
    bk = backend.get(device)
    native = _C.cuda if device == "cuda" else _C
    rng = np.random.default_rng(0)
    logits_np = rng.standard_normal((N, V), dtype=np.float32) * 2
    targets_np = rng.integers(0, V, N).astype(np.int32)
    logits, targets = bk.to_device(logits_np, dtype), bk.to_device(targets_np)
    work = bk.to_device(logits_np, dtype)
    losses, dlogits = bk.empty((N,)), bk.empty((N, V), dtype)
    fns = {
        "fastllm": lambda: native.softmax_ce(losses, dlogits, logits, targets, 1.0 / N, -1),
        # in place: after the first call `work` holds gradients; the same work per call
        "inplace": lambda: bk.softmax_ce(work, targets, grad_scale=1.0 / N, inplace=True, losses=losses),
    }
    torch = torch_on(device)
    if torch is not None:
        F = torch.nn.functional
        xt = to_torch(logits_np, device, dtype).requires_grad_()
        tt = to_torch(targets_np, device)

        def torch_ce():
            xt.grad = None
            F.cross_entropy(xt.float(), tt).backward()

        fns["torch"] = torch_ce
    t = time_fns(fns, device, repeats=repeats, warmup=0 if repeats == 1 else 1)
    gbs = 2 * N * V * itemsize(dtype) / t["fastllm"]["median"] / 1e9
    return [f"({N}, {V})", _ms(t["fastllm"]), _ms(t["inplace"]), _ms(t["torch"]) if "torch" in t else "-",
            _ratio(t, "fastllm"), _ratio(t, "inplace"), f"{gbs:.1f}"]


def run_lmhead_ce(threads: int, quick: bool, device: str, dtype: str, smoke: bool) -> None:
    shapes = SMOKE_LM if smoke else (LM_QUICK if quick else LM_SHAPES)[device]
    print(header("lmhead_ce (fused lm-head + cross-entropy)", threads, device, dtype))
    rows = [r for N, C, V in shapes for r in _lmhead_rows(N, C, V, device, dtype, 1 if smoke else 2 if quick else 5)]
    unit = "GFLOP/s" if device == "cpu" else "TFLOP/s"
    print_table(rows, ["shape (N, C, V)", "pass", "scratch rows", "fastllm ms", "torch ms", "torch/fastllm", unit,
                       "extra memory fastllm vs torch"])


def _lmhead_rows(N: int, C: int, V: int, device: str, dtype: str, repeats: int) -> list[list]:
    bk = backend.get(device)
    rng = np.random.default_rng(0)
    hidden_np = rng.standard_normal((N, C), dtype=np.float32)
    weight_np = rng.standard_normal((V, C), dtype=np.float32) * 0.02
    targets_np = rng.integers(0, V, N).astype(np.int32)
    hidden, weight, targets = bk.to_device(hidden_np, dtype), bk.to_device(weight_np, dtype), bk.to_device(targets_np)
    losses, dh, dw = bk.empty((N,)), bk.zeros((N, C), dtype), bk.zeros((V, C))
    rows_ = CPU_CHUNK if device == "cpu" else bk.lmhead_chunk_rows(N, V, dtype)
    scratch = bk.empty((min(rows_, N), V), dtype)
    step = {"fastllm": lambda: bk.lmhead_ce(hidden, weight, targets, 1.0 / N, dhidden=dh, dweight=dw,
                                            scratch=scratch, losses=losses)}
    fwd = {"fastllm": lambda: bk.lmhead_ce(hidden, weight, targets, 1.0 / N, backward=False, scratch=scratch,
                                           losses=losses)}
    torch = torch_on(device)
    torch_mem = 2 * N * V * 4  # the float32 logits and their gradient
    if torch is not None:
        F = torch.nn.functional
        h = to_torch(hidden_np, device, dtype).requires_grad_()
        w = to_torch(weight_np, device, dtype).requires_grad_()
        tt = to_torch(targets_np, device)

        def torch_step():
            h.grad = w.grad = None
            F.cross_entropy(F.linear(h, w).float(), tt).backward()

        def torch_fwd():
            with torch.no_grad():
                F.cross_entropy(F.linear(h, w).float(), tt)

        step["torch"], fwd["torch"] = torch_step, torch_fwd
        if device == "cuda":  # measured: the peak above what is allocated before the step
            torch_step()
            h.grad = w.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            torch_step()
            torch.cuda.synchronize()
            torch_mem = torch.cuda.max_memory_allocated() - base
    rows = []
    scale = 1e9 if device == "cpu" else 1e12
    for name, fns, flops in (("fwd+bwd", step, 6 * N * C * V), ("fwd", fwd, 2 * N * C * V)):
        t = time_fns(fns, device, repeats=repeats, warmup=0 if repeats == 1 else 1)
        rows.append([f"({N}, {C}, {V})", name, min(rows_, N), _ms(t["fastllm"]),
                     _ms(t["torch"]) if "torch" in t else "-", _ratio(t, "fastllm"),
                     f"{flops / t['fastllm']['median'] / scale:.1f}",
                     f"{scratch.nbytes / 2**20:.0f} MiB vs {torch_mem / 2**20:.0f} MiB"])
    if torch is not None:  # the two sides compute the same losses (a check of the timed code)
        bk.lmhead_ce(hidden, weight, targets, backward=False, scratch=scratch, losses=losses)
        ref = F.cross_entropy(F.linear(h, w).float(), tt, reduction="none").detach().cpu().numpy()
        print(f"mean loss: fastllm {np.asarray(bk.to_numpy(losses)).mean():.5f}, torch {ref.mean():.5f}")
    return rows


def run(threads: int = 2, quick: bool = False, device: str = "cpu", dtype: str = "float32",
        smoke: bool = False) -> None:
    set_threads(threads)
    run_softmax_ce(threads, quick, device, dtype, smoke)
    print()
    run_lmhead_ce(threads, quick, device, dtype, smoke)


if __name__ == "__main__":
    cli(run, __doc__, device=True)
