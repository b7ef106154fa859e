"""Shared benchmark helpers: timing (warm-up, interleaved repeats, median and p20/p80; on the GPU CUDA events with
the L2 flushed before each call), a machine header, the command line (--threads, --quick, and for the op
benchmarks --device cpu|cuda, --dtype, --smoke) and a table printer. Ratios above 1 mean fastllm is faster.
Benchmarks are not tests: nothing here asserts.

An op benchmark runs the same code on either device: fastllm through `backend.get(device)` (fastllm.ops or
fastllm.cuda: the same functions), torch on the same device (`torch_on`: None where torch or its CUDA is
missing, then only fastllm is timed). --smoke runs the smallest shapes once, to check that every path still runs
(the CUDA emulator, FASTLLM_CUDA=emulate, is far too slow to time: there the host clock is used)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable


def cpu_name() -> str:
    """The CPU model (fastllm.info()["cpu"], the CPUID brand string), with /proc/cpuinfo's family and model numbers
    where Linux has them (a virtual machine's brand string may be as short as "AMD EPYC")."""
    import fastllm

    name = fastllm.info()["cpu"] or platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "cpu family" in fields and "model" in fields:
            name += f" (family {fields['cpu family']} model {fields['model']})"
    except OSError:
        pass
    return name


def simd_note() -> str:
    """The SIMD level in use, the bf16 kernels (decode weights and their layout, mixed-precision GEMM and attention)
    and the bf16 hardware, the w8a8 kernel: e.g. "simd avx2, bf16 matmul avx2 (rows), bf16 gemm avx2, bf16 attention
    fp32, no avx512_bf16, no amx, w8a8 avx2"."""
    import fastllm

    d = fastllm.info()
    f = d["cpu_features"]
    parts = [f"simd {fastllm.get_simd()}", f"bf16 matmul {d['bf16_matmul']} ({d['bf16_weights']})",
             f"bf16 gemm {d['bf16_gemm']}", f"bf16 attention {d['bf16_attention']}",
             "avx512_bf16" if f["avx512_bf16"] else "no avx512_bf16"]
    if f["amx_bf16"]:
        parts.append("amx_bf16 " + ("(tiles granted)" if d["amx_permission"] else "(tile permission denied)"))
    else:
        parts.append("no amx")
    parts.append(f"w8a8 {d['w8a8']}")
    return ", ".join(parts)


BF16_HARDWARE = ("avx512_bf16", "amx_bf16")  # where torch.autocast("cpu", dtype=torch.bfloat16) runs bf16 natively
AUTOCAST_OPTION = ("time torch.autocast bf16 too: auto = only where the CPU has AVX512_BF16 or AMX", "auto", "auto",
                   "on", "off")


def with_autocast(autocast: str) -> bool:
    """Whether to time torch.autocast: "on", "off", or "auto" (only where the CPU has bf16 hardware: elsewhere
    torch emulates bf16, far slower than float32, and nobody would run it that way)."""
    import fastllm

    if autocast != "auto":
        return autocast == "on"
    features = fastllm.info()["cpu_features"]
    if any(features[f] for f in BF16_HARDWARE):
        return True
    print("torch autocast not timed: this CPU has neither AVX512_BF16 nor AMX, so torch would emulate bf16 "
          "(--autocast on times it anyway)")
    return False


def load_note() -> str:
    """1-minute load average vs cores: a busy machine makes OpenMP code look slow."""
    try:
        la = os.getloadavg()[0]
        return f"load {la:.2f} on {os.cpu_count()} cores"
    except OSError:
        return "load unknown"


def gpu_name() -> str:
    torch = torch_on("cuda")
    if torch is not None:
        return torch.cuda.get_device_name()
    import fastllm

    return (fastllm.info().get("gpus") or ["no GPU"])[0]


def header(title: str, threads: int, device: str = "cpu", dtype: str = "float32") -> str:
    import numpy as np

    import fastllm

    if device == "cpu":
        parts = [title, f"threads={threads}", cpu_name(), simd_note(), f"fastllm {fastllm.__version__}"]
    else:
        timing = "CUDA events, L2 flushed" if torch_on("cuda") is not None else "host clock (no CUDA torch)"
        parts = [title, gpu_name(), dtype, timing, f"fastllm {fastllm.__version__}"]
    parts.append(f"numpy {np.__version__}")
    try:
        import torch

        parts.append(f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if device == "cuda" else ""))
    except ImportError:
        pass
    parts.append(load_note())
    return " | ".join(parts)


def torch_on(device: str):
    """The torch module if torch can run on `device` (the baseline), else None."""
    try:
        import torch
    except ImportError:
        return None
    if device == "cuda" and not torch.cuda.is_available():
        return None
    return torch


def sliding_mask(torch, Tq: int, Tk: int, window: int | None = None, device: str = "cpu"):
    """(Tq, Tk) bool, True where a query sees a key, the queries being the last Tq of the Tk positions (a KV cache's
    new rows): query t sees key s iff s <= t and t - s < window (None: every s <= t), as fastllm's attention.
    >>> sliding_mask(torch, 3, 3, 2).int().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]"""
    t = torch.arange(Tk - Tq, Tk, device=device)[:, None]
    gap = t - torch.arange(Tk, device=device)[None, :]
    return (gap >= 0) & (gap < window) if window else gap >= 0


def torch_attention(q, k, v, mask=None, scale: float | None = None, softcap: float | None = None):
    """What a PyTorch user runs for attention with these options, q (B, NH, Tq, hs), k, v (B, NKV, Tk, hs) ->
    (B, NH, Tq, hs); mask: a sliding_mask, True = visible (None: every key visible). Without a softcap SDPA, the mask
    as a boolean attn_mask (HF's sdpa path for sliding layers); with one, which SDPA lacks, HF Gemma 2's eager
    attention: q k^T * scale, softcap * tanh(. / softcap), the mask, softmax in float32, @ v (kv heads repeated)."""
    import torch
    import torch.nn.functional as F

    NH, NKV = q.shape[1], k.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=NKV != NH)
    if NKV != NH:
        k, v = k.repeat_interleave(NH // NKV, dim=1), v.repeat_interleave(NH // NKV, dim=1)
    att = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    att = torch.tanh(att / softcap) * softcap
    if mask is not None:
        att = torch.where(mask, att, float("-inf"))
    return att.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


def to_torch(x, device: str, dtype: str = "float32"):
    """A numpy array as a torch tensor on `device` (float arrays in `dtype`, integer arrays as int64)."""
    import numpy as np
    import torch

    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.is_floating_point():
        t = t.to(getattr(torch, dtype))
    else:
        t = t.to(torch.int64)
    return t.to(device)


def itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else 4


def time_fns(fns: dict[str, Callable[[], object]], device: str, repeats: int = 10, warmup: int = 2,
             min_time: float = 0.0) -> dict[str, dict[str, float]]:
    """bench() on the CPU; on the GPU each call timed with CUDA events (L2 flushed before it), providers
    interleaved, or with the host clock around call + synchronize where torch has no CUDA (the emulator)."""
    if device == "cpu":
        return bench(fns, repeats, warmup, min_time)
    from fastllm import cuda

    torch = torch_on("cuda")
    for f in fns.values():
        for _ in range(warmup):
            f()
    cuda.synchronize()
    flush = None if torch is None else torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    marks: dict[str, list] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            if torch is None:
                t0 = time.perf_counter()
                f()
                cuda.synchronize()
                marks[k].append(time.perf_counter() - t0)
                continue
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            marks[k].append((start, end))
    if torch is not None:
        torch.cuda.synchronize()
    out = {}
    for k, ms in marks.items():
        ts = sorted(m if isinstance(m, float) else m[0].elapsed_time(m[1]) * 1e-3 for m in ms)
        out[k] = {"median": statistics.median(ts), "p20": ts[int(0.2 * (len(ts) - 1))],
                  "p80": ts[int(0.8 * (len(ts) - 1))]}
    return out


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
    before() (e.g. an L2 flush) runs untimed ahead of each timed call (one provider; time_fns interleaves several)."""
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


def cli(run: Callable[..., None], doc: str | None, device: bool = False, **flags: str | tuple[str, ...]) -> None:
    """The command line of a benchmark: --threads N, --quick, plus --flags (name -> help: a boolean flag; name ->
    (help, default, choice, ...): an option of default's type, with those choices if any); with device=True also
    --device, --dtype and --smoke (see add_device_args). Calls run(threads=..., quick=..., **the rest)."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer repeats, smaller shapes")
    for name, help_text in flags.items():
        if isinstance(help_text, tuple):
            text, default, *choices = help_text
            p.add_argument("--" + name.replace("_", "-"), default=default, type=type(default), choices=choices or None,
                           help=f"{text} (default: {default})")
        else:
            p.add_argument("--" + name.replace("_", "-"), action="store_true", help=help_text)
    if device:
        add_device_args(p)
    args = p.parse_args()
    if device:
        check_device_args(p, args)
    run(**vars(args))


def add_device_args(p) -> None:
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: fastllm.cuda against torch on the GPU (CUDA events)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="activations' dtype (default: the device's, float32 on the CPU, bfloat16 on the GPU)")
    p.add_argument("--smoke", action="store_true",
                   help="the smallest shapes, timed once: checks that every path runs (e.g. on the CUDA emulator)")


def check_device_args(p, args) -> None:
    """Fills in args.dtype; a clear one-line error (exit 2) for a device or dtype this build cannot run."""
    from fastllm import backend, cuda

    if args.device == "cuda" and not cuda.is_available():
        why = "fastllm was built without CUDA" if not cuda.is_built() else "no CUDA GPU is visible"
        p.error(f"--device cuda: {why} (build with FASTLLM_CUDA=on on a machine with an NVIDIA GPU)")
    try:
        args.dtype = backend.check_dtype(args.device, args.dtype)
    except ValueError as e:
        p.error(str(e))


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
