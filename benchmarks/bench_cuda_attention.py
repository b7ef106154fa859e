"""CUDA causal attention, bfloat16: fastllm (csrc/cuda/attention.cu) vs torch SDPA with the flash backend forced
(torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION), FlashAttention-2):
    python benchmarks/bench_cuda_attention.py [--quick] [--simple]
Shapes: hs 64 and 128, T = 1024 .. 8192 with B*T = 16384 tokens, C = NH*hs in 768 .. 2048. TFLOP/s counts the
causal half of the matmul flops: fwd 4*B*NH*T^2*hs/2 (QK^T and PV), bwd 2.5x that (five products), fwd+bwd 3.5x;
softmax/exp not counted. Ratio = torch ms / fastllm ms (above 1: fastllm faster); the issue's goal is >= 0.9x.
Both sides read the same packed qkv (B, T, 3C): torch gets q, k, v as strided (B, NH, T, hs) views of one tensor,
fastllm the same memory through DLPack when fastllm.cuda.from_dlpack exists (else a bitwise-equal copy).
fwd+bwd: fastllm runs attention_forward + attention_backward (accumulating into a preallocated dqkv); torch runs
SDPA + autograd backward with q, k, v as leaf views (its backward allocates the three gradients).
Timing: CUDA events around each call, median of the repeats after a warm-up; inputs (>= 100 MB) exceed the L2.
--simple adds the reference rows kernels (FASTLLM_CUDA_ATTN=simple) at the smallest T only (they are slow)."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import cuda_time_ms  # noqa: E402

# (hs, NH) x T, B = TOKENS // T
HEADS = [(64, 12), (64, 16), (128, 8), (128, 16)]
TS = [1024, 2048, 4096, 8192]
TOKENS = 16384


def _fastllm_view(cuda, t):
    """A DeviceArray on the torch tensor's memory (DLPack) or, without DLPack support, an equal copy."""
    try:
        return cuda.from_dlpack(t), True
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return cuda.to_device(t.float().cpu().numpy(), dtype="bfloat16"), False


def run(quick: bool, simple: bool) -> None:
    try:
        import torch
    except ImportError:
        print("bench_cuda_attention: skipped (torch is not installed)")
        return
    from fastllm import cuda

    if not (torch.cuda.is_available() and cuda.is_available()):
        print("bench_cuda_attention: skipped (needs a GPU, a CUDA torch and a CUDA build of fastllm)")
        return
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fastllm

    reps, warmup = (5, 2) if quick else (20, 3)
    heads = HEADS[::2] if quick else HEADS
    ts = TS[:2] if quick else TS
    print(
        f"attention causal bf16 | {torch.cuda.get_device_name()} | fastllm {fastllm.__version__} | "
        f"torch {torch.__version__} | reps {reps} (median)"
    )
    head = ["hs", "NH", "C", "B", "T", "fwd fastllm", "fwd torch", "ratio", "fwd+bwd fastllm", "fwd+bwd torch", "ratio"]
    if simple:
        head += ["fwd simple", "fwd+bwd simple"]
    rows = []
    shared = None
    for hs, NH in heads:
        for T in ts:
            B = TOKENS // T
            C = NH * hs
            torch.manual_seed(0)
            qkv_t = torch.randn(B, T, 3 * C, device="cuda", dtype=torch.bfloat16)
            dout_t = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)
            qkv, shared = _fastllm_view(cuda, qkv_t)
            dout, _ = _fastllm_view(cuda, dout_t)
            out = cuda.empty((B, T, C), "bfloat16")
            lse = cuda.empty((B, NH, T), "float32")
            dqkv = cuda.zeros((B, T, 3 * C), "bfloat16")

            def views(x, C=C, B=B, T=T, NH=NH, hs=hs):
                return [x[..., i * C : (i + 1) * C].view(B, T, NH, hs).transpose(1, 2) for i in range(3)]

            q, k, v = views(qkv_t)
            ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))  # leaf views of the same memory
            dout4 = dout_t.view(B, T, NH, hs).transpose(1, 2)

            def f_fwd(qkv=qkv, out=out, lse=lse, NH=NH):
                cuda.attention_forward(out, lse, qkv, NH)

            def f_fwdbwd(qkv=qkv, out=out, lse=lse, dqkv=dqkv, dout=dout, NH=NH):
                cuda.attention_forward(out, lse, qkv, NH)
                cuda.attention_backward(dqkv, dout, qkv, out, lse, NH)

            def t_fwd(q=q, k=k, v=v):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

            def t_fwdbwd(ql=ql, kl=kl, vl=vl, dout4=dout4):
                ql.grad = kl.grad = vl.grad = None
                F.scaled_dot_product_attention(ql, kl, vl, is_causal=True).backward(dout4)

            flops = 4 * B * NH * T * T * hs / 2
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                if not rows:  # sanity: the two sides compute the same thing
                    f_fwd()
                    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
                    got = torch.tensor(out.numpy(), device="cuda")
                    err = (got - ref.float()).abs().max().item()
                    print(f"check (hs={hs}, T={T}): max |fastllm - torch| = {err:.3g} (bf16 outputs)")
                ms = {
                    "f": cuda_time_ms(f_fwd, reps, warmup),
                    "t": cuda_time_ms(t_fwd, reps, warmup),
                    "fb": cuda_time_ms(f_fwdbwd, reps, warmup),
                    "tb": cuda_time_ms(t_fwdbwd, reps, warmup),
                }
            row = [hs, NH, C, B, T]
            row += [f"{flops / ms['f'] / 1e9:.0f}", f"{flops / ms['t'] / 1e9:.0f}", f"{ms['t'] / ms['f']:.2f}x"]
            row += [
                f"{3.5 * flops / ms['fb'] / 1e9:.0f}",
                f"{3.5 * flops / ms['tb'] / 1e9:.0f}",
                f"{ms['tb'] / ms['fb']:.2f}x",
            ]
            if simple:
                if T == ts[0]:
                    os.environ["FASTLLM_CUDA_ATTN"] = "simple"
                    try:
                        s1 = cuda_time_ms(f_fwd, 3, 1)
                        s2 = cuda_time_ms(f_fwdbwd, 3, 1)
                    finally:
                        del os.environ["FASTLLM_CUDA_ATTN"]
                    row += [f"{flops / s1 / 1e9:.1f}", f"{3.5 * flops / s2 / 1e9:.1f}"]
                else:
                    row += ["-", "-"]
            rows.append([str(x) for x in row])
            del qkv_t, dout_t, qkv, dout, out, lse, dqkv, q, k, v, ql, kl, vl
            torch.cuda.empty_cache()
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print("TFLOP/s (causal); ratio = torch ms / fastllm ms")
    print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
    for r in rows:
        print("  ".join(x.rjust(w) for x, w in zip(r, widths)))
    print(f"inputs shared through DLPack: {shared}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    p.add_argument("--simple", action="store_true", help="also time the reference rows kernels (smallest T)")
    a = p.parse_args(argv)
    run(a.quick, a.simple)


if __name__ == "__main__":
    sys.exit(main())
