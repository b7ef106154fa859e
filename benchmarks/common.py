"""Shared benchmark helpers: timing (warm-up, interleaved repeats, median and p20/p80), a machine header,
and a table printer. Ratios above 1 mean fastllm is faster. Benchmarks are not tests: nothing here asserts."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_note() -> str:
    """1-minute load average vs cores: a busy machine makes OpenMP code look slow."""
    try:
        la = os.getloadavg()[0]
        return f"load {la:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "load unknown"


def header(title: str, threads: int) -> str:
    import numpy as np

    import fastllm

    parts = [title, f"threads={threads}", cpu_name(), f"fastllm {fastllm.__version__} ({fastllm.info()['simd']})",
             f"numpy {np.__version__}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    parts.append(load_note())
    return " | ".join(parts)


def bench(fns: dict[str, Callable[[], object]], repeats: int = 10, warmup: int = 2,
          min_time: float = 0.0) -> dict[str, dict[str, float]]:
    """Time each callable `repeats` times, interleaving providers so that machine noise hits all alike.
    Returns {name: {"median": s, "p20": s, "p80": s}}."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    start = time.perf_counter()
    r = 0
    while r < repeats or time.perf_counter() - start < min_time:
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        r += 1
    out = {}
    for k, ts in times.items():
        ts.sort()
        out[k] = {"median": statistics.median(ts), "p20": ts[int(0.2 * (len(ts) - 1))],
                  "p80": ts[int(0.8 * (len(ts) - 1))]}
    return out


def cuda_time_ms(fn: Callable[[], object], reps: int = 20, warmup: int = 2,
                 before: Callable[[], object] | None = None) -> float:
    """Median milliseconds of fn() on the GPU: torch CUDA events around each call, after `warmup` untimed calls;
    before() (e.g. an L2 flush) runs untimed ahead of each timed call."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    events = []
    for _ in range(reps):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        events.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def set_threads(n: int) -> None:
    """Same thread count for fastllm (OpenMP) and torch."""
    import fastllm

    fastllm.set_num_threads(n)
    try:
        import torch

        torch.set_num_threads(n)
    except ImportError:
        pass


def print_table(rows: list[list[str]], head: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("  ".join(str(h).ljust(w) for h, w in zip(head, widths)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def cli(run: Callable[..., None], doc: str | None, device: bool = False, **flags: str) -> None:
    """The command line of a bench_<op>.py: --threads N, --quick, plus boolean --flags (name -> help), and with
    device=True --device cpu|cuda; calls run(threads=..., quick=..., [device=...], **flags)."""
    import argparse

    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller shapes")
    if device:
        p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                       help="cuda: fastllm.cuda vs torch on the GPU (CUDA events, bf16)")
    for name, help_text in flags.items():
        p.add_argument("--" + name.replace("_", "-"), action="store_true", help=help_text)
    run(**vars(p.parse_args()))


def gpu_or_exit(name: str):
    """(torch, fastllm.cuda) when both see a GPU; otherwise prints why `name` is skipped and exits 0."""
    import sys

    try:
        import torch
    except ImportError:
        torch = None
    from fastllm import cuda

    why = ("no torch" if torch is None else "torch has no CUDA" if not torch.cuda.is_available() else
           "fastllm was built without CUDA or sees no GPU" if not cuda.is_available() else None)
    if why:
        print(f"{name}: skipped ({why})")
        sys.exit(0)
    return torch, cuda


def gpu_row(labels: list[str], fast_ms: float, torch_ms: float, nbytes: float) -> list[str]:
    """labels + [fastllm ms, torch ms, torch/fastllm, fastllm GB/s] from GPU milliseconds."""
    return [*labels, f"{fast_ms:.3f}", f"{torch_ms:.3f}", f"{torch_ms / fast_ms:.2f}x", f"{nbytes / fast_ms / 1e6:.0f}"]


def ratio_row(labels: list[str], t: dict[str, dict[str, float]], nbytes: float) -> list[str]:
    """labels + [fastllm ms, torch ms, torch/fastllm, fastllm GB/s] from bench() results (torch optional)."""
    f, tt = t["fastllm"]["median"], t.get("torch", {}).get("median")
    return [*labels, f"{f * 1e3:.3f}", f"{tt * 1e3:.3f}" if tt else "-", f"{tt / f:.2f}x" if tt else "-",
            f"{nbytes / f / 1e9:.1f}"]
