"""Causal self-attention, fastllm vs torch SDPA (is_causal=True) on the same device:
    python benchmarks/bench_attention.py [--threads 2] [--quick] [--device cpu|cuda] [--dtype ...] [--smoke]
                                         [--simple] [--window W] [--softcap C]
--dtype bfloat16 on the CPU: fastllm's mixed-precision attention (fp32 arrays, the tile products on bf16-rounded
operands where the CPU has AVX512_BF16: info()["bf16_attention"] in the header) vs torch SDPA on bf16 tensors.
Shapes (B, NH, T, hs): on the CPU (4, 12, T, 64) for T in 512, 1024; on the GPU hs 64 and 128 with NH*hs in
768 .. 2048 and T = 1024 .. 8192 at B*T = 16384 tokens (torch with the flash backend forced for bfloat16,
FlashAttention-2). fwd and fwd+bwd. GFLOP/s (TFLOP/s on the GPU) counts the matmul flops of the visible
query-key pairs, T^2/2 causal: fwd 2*B*NH*T^2*hs (QK^T and PV), bwd 2.5x that (five products), exp not counted.
Ratio = torch ms / fastllm ms (above 1: fastllm faster). torch gets q, k, v as strided views of one packed qkv
tensor, like fastllm; its backward allocates the gradient, fastllm's zeroes a preallocated dqkv each call and
accumulates into it.
--window W (sliding window: query t sees keys t - W < s <= t) and --softcap C (scores -> C * tanh(scores / C)),
alone or together: fastllm's options against what a PyTorch user runs for them: torch SDPA with a boolean
sliding-window causal attn_mask for the window alone (HF's sdpa path for Mistral / Gemma sliding layers), and with
a softcap, which SDPA lacks, HF Gemma 2's eager attention (q k^T * scale, C * tanh(. / C), the mask, softmax in
float32, @ v). GFLOP/s then counts the visible (windowed causal) pairs only, T*W - W^2/2 for W < T, for both sides
(a rate of useful work: torch's eager path computes all T^2 scores). --window adds shapes where the window
matters: (1, 8, 4096, hs) on the CPU for hs 128 and 256 (Gemma's; --quick: 128 only), (B*T = 16384, 8, T, hs) on the
GPU for T 4096, 8192 and hs 128, 256 (--quick: T 4096, hs 128) (hs 256 runs fastllm's rows kernels: the tensor-core
ones take hs 64 and 128).
--simple (GPU) adds the reference rows kernels (FASTLLM_CUDA_ATTN=simple) at the smallest T (they are slow)."""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import cli, header, print_table, set_threads, sliding_mask, time_fns, to_torch, torch_attention, torch_on  # noqa: E402

from fastllm import backend  # noqa: E402

TOKENS = 16384
SHAPES = {"cpu": [(4, 12, 512, 64), (4, 12, 1024, 64)],
          "cuda": [(TOKENS // T, NH, T, hs) for hs, NH in [(64, 12), (64, 16), (128, 8), (128, 16)]
                   for T in (1024, 2048, 4096, 8192)]}
QUICK = {"cpu": [(4, 12, 512, 64)],
         "cuda": [(TOKENS // T, NH, T, hs) for hs, NH in [(64, 12), (128, 8)] for T in (1024, 2048)]}
SMOKE = [(1, 2, 64, 64), (1, 2, 65, 32)]
WINDOWED = {"cpu": [(1, 8, 4096, 128), (1, 8, 4096, 256)],  # added with --window: T well past the window
            "cuda": [(TOKENS // T, 8, T, hs) for hs in (128, 256) for T in (4096, 8192)]}
WINDOWED_QUICK = {"cpu": [(1, 8, 4096, 128)], "cuda": [(TOKENS // 4096, 8, 4096, 128)]}


def visible_pairs(T: int, window: int | None) -> float:
    """Query-key pairs the queries see, counted as the causal half T^2/2: T*w - w^2/2 with w = min(window, T)."""
    w = min(window or T, T)
    return T * w - w * w / 2


def setup(shape, device: str, dtype: str, window: int | None = None, softcap: float | None = None):
    """{mode: {provider: callable}} for mode fwd and fwd+bwd, and a check() printing max |fastllm - torch|; with a
    window or softcap torch runs torch_attention (SDPA with a mask, or the eager path), else SDPA is_causal."""
    bk = backend.get(device, dtype)  # the CPU in bfloat16: CpuBf16 (float32 arrays, bf16 tile products)
    store = backend.storage_dtype(device, dtype)
    B, NH, T, hs = shape
    C = NH * hs
    rng = np.random.default_rng(0)
    qkv_np = rng.standard_normal((B, T, 3 * C), dtype=np.float32)
    dout_np = rng.standard_normal((B, T, C), dtype=np.float32)
    qkv, dout = bk.to_device(qkv_np, store), bk.to_device(dout_np, store)
    out, lse, dqkv = bk.empty((B, T, C), store), bk.empty((B, NH, T)), bk.zeros((B, T, 3 * C), store)

    opts = dict(window=window, softcap=softcap)

    def f_fwd():
        bk.attention_forward(qkv, NH, out=out, lse=lse, **opts)

    def f_fwdbwd():
        bk.attention_forward(qkv, NH, out=out, lse=lse, **opts)
        bk.zero_(dqkv)
        bk.attention_backward(dout, qkv, out, lse, NH, dqkv=dqkv, **opts)

    fns = {"fwd": {"fastllm": f_fwd}, "fwd+bwd": {"fastllm": f_fwdbwd}}
    torch = torch_on(device)
    if torch is None:
        return fns, lambda: None
    F = torch.nn.functional
    tqkv, tdout = to_torch(qkv_np, device, dtype), to_torch(dout_np, device, dtype)

    if window is None and softcap is None:
        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        mask = sliding_mask(torch, T, T, window, device)  # made once, as HF makes it once per forward

        def attend(q, k, v):
            return torch_attention(q, k, v, mask, softcap=softcap)

    def split(x):  # (B, T, 3C) -> q, k, v as (B, NH, T, hs) views
        return [t.view(B, T, NH, hs).transpose(1, 2) for t in x.split(C, dim=2)]

    def t_fwd():
        with torch.no_grad(), sdpa_backend(torch, device, dtype, masked=window is not None):
            return attend(*split(tqkv))

    def t_fwdbwd():
        x = tqkv.detach().requires_grad_(True)
        with sdpa_backend(torch, device, dtype, masked=window is not None):
            y = attend(*split(x))
            y.transpose(1, 2).reshape(B, T, C).backward(tdout)

    def check():
        f_fwd()
        ref = t_fwd().transpose(1, 2).reshape(B, T, C).float().cpu().numpy()
        err = float(np.abs(np.asarray(bk.to_numpy(out), np.float32) - ref).max())
        print(f"check {shape}: max |fastllm - torch| = {err:.3g} ({dtype} outputs)")

    fns["fwd"]["torch"], fns["fwd+bwd"]["torch"] = t_fwd, t_fwdbwd
    return fns, check


def sdpa_backend(torch, device: str, dtype: str, masked: bool = False):
    """torch's flash attention (FlashAttention-2) for bfloat16 on the GPU; its default choice otherwise (and with a
    mask, which the flash backend does not take)."""
    if device == "cuda" and dtype == "bfloat16" and not masked:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    return contextlib.nullcontext()


def run(threads: int = 2, quick: bool = False, device: str = "cpu", dtype: str = "float32", smoke: bool = False,
        simple: bool = False, window: int = 0, softcap: float = 0.0) -> None:
    set_threads(threads)
    window, softcap = window or None, softcap or None
    unit, scale = ("GFLOP/s", 1e9) if device == "cpu" else ("TFLOP/s", 1e12)
    what = "".join([f", window {window}" if window else "", f", softcap {softcap:g}" if softcap else ""])
    print(header(f"attention (causal{what}, {unit})", threads, device, dtype))
    if window or softcap:
        print("torch: " + ("HF Gemma 2's eager attention (softcap; SDPA has none)" if softcap else
                           "SDPA with a boolean sliding-window causal attn_mask") + f"; {unit} of the visible pairs")
    shapes = SMOKE if smoke else (QUICK if quick else SHAPES)[device]
    if window:
        shapes = shapes + ([(1, 2, window + 33, 64)] if smoke else (WINDOWED_QUICK if quick else WINDOWED)[device])
    repeats = 1 if smoke else 3 if quick else 7
    rows = []
    for i, shape in enumerate(shapes):
        B, NH, T, hs = shape
        fwd_flops = 4.0 * B * NH * visible_pairs(T, window) * hs
        fns, check = setup(shape, device, dtype, window, softcap)
        if i == 0 or T > (window or T):
            check()  # the two sides compute the same thing (where the window cuts, too)
        for mode, provs in fns.items():
            if simple and device == "cuda" and T == shapes[0][2]:
                provs = {**provs, "simple": simple_kernels(provs["fastllm"])}
            flops = fwd_flops * (1.0 if mode == "fwd" else 3.5)
            res = time_fns(provs, device, repeats=repeats, warmup=0 if smoke else 1,
                           min_time=0.0 if quick or smoke else 1.0)
            f = res["fastllm"]["median"]
            row = [str(shape), mode, f"{f * 1e3:.2f}", "-", "-", f"{flops / f / scale:.1f}", "-"]
            if "torch" in res:
                t = res["torch"]["median"]
                row[3:5], row[6] = [f"{t * 1e3:.2f}", f"{t / f:.2f}x"], f"{flops / t / scale:.1f}"
            if simple:
                s = res.get("simple", {}).get("median")
                row.append(f"{flops / s / scale:.1f}" if s else "-")
            rows.append(row)
    head = ["shape (B,NH,T,hs)", "mode", "fastllm ms", "torch ms", "torch/fastllm", f"fastllm {unit}", f"torch {unit}"]
    print_table(rows, head + ([f"simple {unit}"] if simple else []))


def simple_kernels(fn):
    """fn run with the GPU's reference rows kernels (FASTLLM_CUDA_ATTN=simple, read at every launch)."""
    def run_simple():
        os.environ["FASTLLM_CUDA_ATTN"] = "simple"
        try:
            fn()
        finally:
            del os.environ["FASTLLM_CUDA_ATTN"]

    return run_simple


if __name__ == "__main__":
    cli(run, __doc__, device=True, simple="GPU: also time the reference rows kernels at the smallest T",
        window=("sliding window W: query t sees keys t - W < s <= t (0: full causal)", 0),
        softcap=("attention soft cap C: scores -> C * tanh(scores / C) (0: none; Gemma 2: 50)", 0.0))
