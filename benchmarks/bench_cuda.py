"""The GPU benchmark driver (one call in a device session): the GPU and versions, the kernel benchmarks
(benchmarks/bench_<op>.py --device cuda for every op family, each with --quick in its own process so one crash
does not end the rest), then GPT-2 124M training at B=16, T=1024: fastllm's GPT(device="cuda") with AdamW against
a PyTorch GPT-2 (eager, bf16 autocast, SDPA flash attention, fused AdamW; torch.compile as an optional second
baseline with --compile), side by side in one process on the same random tokens, and a summary table.

Throughput: tokens/s over timed steps (each a full step: zero grads, forward, loss readback, backward, grad-norm
clipping, AdamW) after warm-up. MFU = model FLOPs per second / the GPU's dense bf16 peak, with model FLOPs per
token = 6 * N (N = parameters that enter matmuls: all but wpe; the tied lm-head counts once) + 12 * L * C * T
for attention (the PaLM / nanoGPT convention: the full T x T score matrix, fwd + bwd), peak 989 TFLOP/s on
H100 SXM / H200 (756 on H100 PCIe, 312 on A100); override with --peak-tflops.

    python benchmarks/bench_cuda.py --quick            # what scripts/gpu_check.sh runs
    python benchmarks/bench_cuda.py --compile --steps 30
    python benchmarks/bench_cuda.py --smoke            # every path once at tiny sizes (e.g. on the CUDA emulator)
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
KERNEL_BENCHES = [f"bench_{op}.py" for op in ("matmul", "attention", "softmax_ce", "layernorm", "gelu", "embedding",
                                               "adamw", "rmsnorm", "rope", "swiglu", "attention_gqa")]


def peak_tflops(name: str) -> float | None:
    n = name.upper()
    if "H100" in n and "PCIE" in n:
        return 756.0
    if "H100" in n or "H200" in n or "GH200" in n:
        return 989.0
    if "A100" in n:
        return 312.0
    return None


def flops_per_token(cfg, num_parameters: int, T: int) -> float:
    n_matmul = num_parameters - cfg.block_size * cfg.n_embd  # position embeddings are a lookup, not a matmul
    return 6.0 * n_matmul + 12.0 * cfg.n_layer * cfg.n_embd * T


def header() -> str | None:
    """Prints the machine; returns the GPU name (None without a usable GPU)."""
    import fastllm
    from fastllm import cuda

    info = fastllm.info()
    print(f"fastllm {fastllm.__version__} | cuda_built={info.get('cuda_built')} gpus={info.get('gpu_count')} | "
          f"numpy {np.__version__} | python {sys.version.split()[0]}")
    name = None
    try:
        import torch

        print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            p = torch.cuda.get_device_properties(0)
            print(f"GPU: {name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
                  f"sm_{p.major}{p.minor}")
    except ImportError:
        print("torch not installed: no PyTorch baseline")
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            print("nvidia-smi:", smi.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    if not cuda.is_available():
        return None
    return name or (info.get("gpus") or ["unknown GPU"])[0]


def run_kernel_benches(quick: bool, smoke: bool, timeout: float) -> dict[str, str]:
    status = {}
    flags = ["--device", "cuda"] + (["--smoke"] if smoke else ["--quick"] if quick else [])
    for fname in KERNEL_BENCHES:
        path = HERE / fname
        if not path.exists():
            status[fname] = "absent"
            continue
        print(f"\n===== {fname} {' '.join(flags)}", flush=True)
        t0 = time.time()
        try:
            r = subprocess.run([sys.executable, str(path)] + flags, timeout=timeout)
            status[fname] = f"rc={r.returncode} in {time.time() - t0:.0f}s"
        except subprocess.TimeoutExpired:
            status[fname] = f"timed out after {timeout:.0f}s"
        print(f"===== {fname}: {status[fname]}", flush=True)
    return status


# ---- fastllm -------------------------------------------------------------------------------------------


def bench_fastllm(cfg, x, y, steps: int, warmup: int, dtype: str) -> dict:
    from fastllm import cuda
    from fastllm.model import GPT
    from fastllm.optim import AdamW

    B, T = x.shape
    free0 = _free_mem()
    t0 = time.time()
    gpu = GPT(cfg, seed=0, device="cuda", dtype=dtype)
    opt = AdamW(gpu, lr=6e-4, weight_decay=0.1)
    print(f"fastllm: model built and placed in {time.time() - t0:.1f}s ({gpu.num_parameters / 1e6:.1f}M params)")
    times, phases, losses = [], [], []
    for i in range(warmup + steps):
        cuda.synchronize()
        t0 = time.perf_counter()
        gpu.zero_grad()
        loss = gpu.forward(x, y)  # reads the losses back: waits for the forward
        t1 = time.perf_counter()
        gpu.backward()
        norm = gpu.grad_norm()  # reads back: waits for the backward
        t2 = time.perf_counter()
        opt.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
        cuda.synchronize()
        t3 = time.perf_counter()
        losses.append(loss)
        if i >= warmup:
            times.append(t3 - t0)
            phases.append((t1 - t0, t2 - t1, t3 - t2))
        if not math.isfinite(loss):
            raise RuntimeError(f"fastllm loss is {loss} at step {i}")
    used = None if free0 is None else (free0 - _free_mem()) / 2**30
    ph = np.median(np.array(phases), 0)
    print(f"fastllm: median step {np.median(times) * 1e3:.1f} ms = forward+loss {ph[0] * 1e3:.1f} + backward+norm "
          f"{ph[1] * 1e3:.1f} + adamw {ph[2] * 1e3:.1f}; losses {losses[0]:.4f} -> {losses[-1]:.4f}"
          + (f"; ~{used:.1f} GiB of GPU memory" if used is not None else ""))
    n = gpu.num_parameters
    del gpu, opt
    gc.collect()
    return {"step_s": float(np.median(times)), "num_parameters": n, "loss": losses[-1], "mem_gib": used}


def _free_mem():
    try:
        import torch

        return torch.cuda.mem_get_info()[0]
    except Exception:
        return None


# ---- PyTorch GPT-2 -------------------------------------------------------------------------------------


def torch_gpt2(cfg):
    """A plain nanoGPT-style GPT-2 (tied lm-head, SDPA causal attention, tanh GELU), the baseline."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    C, NH = cfg.n_embd, cfg.n_head

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, NH, C // NH).transpose(1, 2) for t in (q, k, v))  # (B, NH, T, hs)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
            x = x + self.attn_proj(y)
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT2(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab_size, C)
            self.wpe = nn.Embedding(cfg.block_size, C)
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(C)
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("proj.weight") else 0.02
                    nn.init.normal_(p, 0.0, std)
                elif name.endswith("bias"):
                    nn.init.zeros_(p)

        def forward(self, idx, targets):
            T = idx.shape[1]
            x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
            for blk in self.h:
                x = blk(x)
            logits = self.ln_f(x) @ self.wte.weight.T  # tied lm-head
            return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))

    return GPT2()


def bench_torch(cfg, x, y, steps: int, warmup: int, compile_: bool) -> dict:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    dev = torch.device("cuda")
    torch.cuda.reset_peak_memory_stats()
    model = torch_gpt2(cfg).to(dev)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    fwd = torch.compile(model) if compile_ else model
    xi = torch.from_numpy(x.astype(np.int64)).to(dev)
    yi = torch.from_numpy(y.astype(np.int64)).to(dev)
    times, losses = [], []
    label = "torch.compile" if compile_ else "torch eager"
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = fwd(xi, yi)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lv = loss.item()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        losses.append(lv)
    mem = torch.cuda.max_memory_allocated() / 2**30
    print(f"{label}: median step {np.median(times) * 1e3:.1f} ms; losses {losses[0]:.4f} -> {losses[-1]:.4f}; "
          f"peak {mem:.1f} GiB allocated")
    n = sum(p.numel() for p in model.parameters())
    del model, opt, fwd
    gc.collect()
    torch.cuda.empty_cache()
    return {"step_s": float(np.median(times)), "num_parameters": n, "loss": losses[-1], "mem_gib": mem}


# ---- main ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps; kernel benchmarks with --quick")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (adds ~1 min of compiling)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20, --quick 6)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="fastllm compute dtype")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by name)")
    ap.add_argument("--skip-kernels", action="store_true", help="skip the kernel benchmark scripts")
    ap.add_argument("--skip-torch", action="store_true", help="no PyTorch baseline")
    ap.add_argument("--kernel-timeout", type=float, default=120.0, help="seconds per kernel benchmark script")
    ap.add_argument("--smoke", action="store_true", help="a 2-layer model at B=2, T=64, one step, kernel "
                    "benchmarks with --smoke: checks that every path runs (the CUDA emulator is too slow to time)")
    args = ap.parse_args(argv)

    if not _importable("fastllm"):  # run from a source checkout without PYTHONPATH=python
        sys.path.insert(0, str(HERE.parent / "python"))
    name = header()
    if name is None:
        ap.error("needs a CUDA build of fastllm and a GPU (fastllm.cuda.is_available() is False)")
    steps = args.steps or (1 if args.smoke else 6 if args.quick else 20)
    warmup = 1 if args.smoke else 2 if args.quick else 3

    kern = {} if args.skip_kernels else run_kernel_benches(args.quick, args.smoke, args.kernel_timeout)

    from fastllm.model import GPTConfig

    if args.smoke:
        cfg, B, T = GPTConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=2, n_embd=128), 2, 64
    else:
        cfg, B, T = GPTConfig.preset("gpt2", vocab_size=50257), args.batch_size, args.seq_len
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    y = np.roll(x, -1, 1).astype(np.int32)
    model = "a 2-layer GPT" if args.smoke else "GPT-2 124M"
    print(f"\n===== {model} training, B={B}, T={T}, {steps} timed steps after {warmup} warm-up")
    results: dict[str, dict] = {}
    runs = [(f"fastllm GPT cuda ({args.dtype})", lambda: bench_fastllm(cfg, x, y, steps, warmup, args.dtype))]
    if not args.skip_torch and _torch_cuda():
        runs.append(("torch eager (bf16 autocast, SDPA, fused AdamW)",
                     lambda: bench_torch(cfg, x, y, steps, warmup, False)))
        if args.compile:
            runs.append(("torch.compile (bf16 autocast, SDPA, fused AdamW)",
                         lambda: bench_torch(cfg, x, y, steps, warmup + 3, True)))
    for label, fn in runs:
        try:
            results[label] = fn()
        except Exception as e:  # keep going: the device session wants every number it can get
            traceback.print_exc()
            results[label] = {"error": f"{type(e).__name__}: {e}"}

    peak = args.peak_tflops or peak_tflops(name)
    base = next((r["step_s"] for k, r in results.items() if k.startswith("torch eager") and "step_s" in r), None)
    rows = []
    for label, r in results.items():
        if "error" in r:
            rows.append([label, "error", r["error"][:60], "", "", ""])
            continue
        tok_s = B * T / r["step_s"]
        tflops = flops_per_token(cfg, r["num_parameters"], T) * tok_s / 1e12
        rows.append([label, f"{r['step_s'] * 1e3:.1f}", f"{tok_s:,.0f}", f"{tflops:.1f}",
                     f"{100 * tflops / peak:.1f}%" if peak else "-",
                     f"{base / r['step_s']:.2f}x" if base else "-"])
    print(f"\n===== summary: {name}, {model}, B={B} T={T}, peak {peak or '?'} TFLOP/s bf16 dense")
    head = ["run", "ms/step", "tokens/s", "TFLOP/s", "MFU", "vs torch eager"]
    widths = [max(len(str(v)) for v in col) for col in zip(head, *rows)]
    for row in [head] + rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)))
    for k, v in kern.items():
        print(f"kernel benchmark {k}: {v}")
    failed = [k for k, r in results.items() if "error" in r] + [k for k, v in kern.items() if not v.startswith("rc=0")]
    if failed:
        print(f"bench_cuda: failed: {', '.join(failed)}")
    return 1 if failed else 0


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _importable(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
