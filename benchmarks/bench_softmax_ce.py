"""Softmax + cross-entropy forward+backward, and the fused lm-head + cross-entropy, vs PyTorch.
    python benchmarks/bench_softmax_ce.py [--threads 2] [--quick]

softmax_ce: fastllm writes per-row losses and dlogits (out of place into a preallocated buffer, or in place
over the logits); torch runs F.cross_entropy (mean) forward + backward. GB/s counts one read of the logits and
one write of dlogits (the DRAM minimum).
lmhead_ce: fastllm's chunked lm-head + CE (never N x V logits) vs torch F.linear + F.cross_entropy forward +
backward; GFLOP/s counts 6*N*C*V (forward matmul + two backward matmuls). Extra memory: chunk_rows*V*4 bytes
for fastllm vs the N x V logits + N x V gradient torch holds (autograd keeps more temporaries on top)."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, header, print_table, set_threads  # noqa: E402

from fastllm import _C  # noqa: E402


def _ms(t: dict) -> str:
    return f"{t['median'] * 1e3:.2f}"


def run_softmax_ce(threads: int, quick: bool) -> None:
    shapes = [(256, 50304)] if quick else [(512, 50304), (2048, 50304)]
    print(header("softmax_ce fwd+bwd", threads))
    rows = [_softmax_ce_row(N, V, quick) for N, V in shapes]
    print_table(
        rows,
        ["shape (N, V)", "fastllm ms", "inplace ms", "torch ms", "torch/fastllm", "torch/inplace", "GB/s"],
    )


def _softmax_ce_row(N: int, V: int, quick: bool) -> list:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((N, V), dtype=np.float32) * 2
    targets = rng.integers(0, V, N).astype(np.int32)
    losses, dlogits = np.empty(N, np.float32), np.empty_like(logits)
    work = logits.copy()
    fns = {
        "fastllm": lambda: _C.softmax_ce(losses, dlogits, logits, targets, 1.0 / N, -1),
        # in place: after the first call `work` holds gradients; same amount of work per call
        "fastllm_inplace": lambda: _C.softmax_ce(losses, work, work, targets, 1.0 / N, -1),
    }
    try:
        import torch
        import torch.nn.functional as F

        xt = torch.from_numpy(logits.copy()).requires_grad_()
        tt = torch.from_numpy(targets.astype(np.int64))

        def torch_ce():
            xt.grad = None
            F.cross_entropy(xt, tt).backward()

        fns["torch"] = torch_ce
    except ImportError:
        pass
    t = bench(fns, repeats=3 if quick else 7, warmup=1)
    gbs = 2 * N * V * 4 / t["fastllm"]["median"] / 1e9
    tt_ = t.get("torch")
    return [
        f"({N}, {V})",
        _ms(t["fastllm"]),
        _ms(t["fastllm_inplace"]),
        _ms(tt_) if tt_ else "-",
        f"{tt_['median'] / t['fastllm']['median']:.2f}x" if tt_ else "-",
        f"{tt_['median'] / t['fastllm_inplace']['median']:.2f}x" if tt_ else "-",
        f"{gbs:.1f}",
    ]


def run_lmhead_ce(threads: int, quick: bool) -> None:
    shapes = [(32, 768, 50304, 256)] if quick else [(128, 768, 50304, 256)]
    print(header("lmhead_ce fwd+bwd (fused lm-head + cross-entropy)", threads))
    rows = [_lmhead_row(N, C, V, chunk, quick) for N, C, V, chunk in shapes]
    print_table(
        rows,
        [
            "shape (N, C, V)",
            "chunk",
            "fastllm ms",
            "torch ms",
            "torch/fastllm",
            "GFLOP/s",
            "extra mem fastllm vs torch NxV logits+grad",
        ],
    )
    print("(memory at N=8192, V=50304: fastllm chunk 256 -> 49.1 MiB, torch logits+grad -> 3144 MiB)")


def _lmhead_row(N: int, C: int, V: int, chunk: int, quick: bool) -> list:
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((N, C), dtype=np.float32)
    weight = rng.standard_normal((V, C), dtype=np.float32) * 0.02
    targets = rng.integers(0, V, N).astype(np.int32)
    losses, dh, dw = np.empty(N, np.float32), np.zeros_like(hidden), np.zeros_like(weight)
    fns = {"fastllm": lambda: _C.lmhead_ce(losses, dh, dw, hidden, weight, targets, 1.0 / N, -1, chunk)}
    try:
        import torch
        import torch.nn.functional as F

        h = torch.from_numpy(hidden.copy()).requires_grad_()
        w = torch.from_numpy(weight.copy()).requires_grad_()
        tt = torch.from_numpy(targets.astype(np.int64))

        def torch_lmhead():
            h.grad = w.grad = None
            F.cross_entropy(F.linear(h, w), tt).backward()

        fns["torch"] = torch_lmhead
    except ImportError:
        pass
    t = bench(fns, repeats=2 if quick else 3, warmup=1)
    gflops = 6 * N * C * V / t["fastllm"]["median"] / 1e9
    tt_ = t.get("torch")
    ours_mb = min(chunk, N) * V * 4 / 2**20
    torch_mb = 2 * N * V * 4 / 2**20
    return [
        f"({N}, {C}, {V})",
        chunk,
        _ms(t["fastllm"]),
        _ms(tt_) if tt_ else "-",
        f"{tt_['median'] / t['fastllm']['median']:.2f}x" if tt_ else "-",
        f"{gflops:.1f}",
        f"{ours_mb:.1f} MiB vs {torch_mb:.1f} MiB",
    ]


def run(threads: int, quick: bool) -> None:
    set_threads(threads)
    run_softmax_ce(threads, quick)
    print()
    run_lmhead_ce(threads, quick)


if __name__ == "__main__":
    cli(run, __doc__)
