"""RoPE on the packed qkv buffer, fastllm vs PyTorch (HF apply_rotary_pos_emb), and its cost next to attention
(same threads; --device cuda: on the GPU in bf16).
    python benchmarks/bench_rope.py [--threads 2] [--quick] [--device cuda]

Shapes (B, T, NH, NKV, hs): the attention of SmolLM2-135M (9, 3, 64), Qwen2.5-0.5B (14, 2, 64) and Llama-3.2-1B
(32, 8, 64) at B = 4, T = 512. fastllm rotates q and k in place in qkv (B, T, (NH + 2 NKV) hs) with cos/sin tables
(fastllm.rope); torch runs transformers' apply_rotary_pos_emb (q*cos + rotate_half(q)*sin) on the q and k views
of the same tensor, with the (B, T, hs) cos/sin HF's rotary embedding returns (precomputed, as HF does once per
forward), and autograd for the backward. "rope/attn" is fastllm's rope forward time over fastllm's attention
forward on the same qkv: the measurement behind keeping RoPE its own op rather than fusing it into the attention
kernels (see csrc/cpu/rope.cpp). GB/s: each q/k element read and written once (fp32: 8 bytes). Ratio > 1: fastllm
faster."""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, cuda_time_ms, gpu_or_exit, gpu_row, header, print_table, set_threads  # noqa: E402

from fastllm import ops, rope  # noqa: E402

SHAPES = [(4, 512, 9, 3, 64), (4, 512, 14, 2, 64), (4, 512, 32, 8, 64)]
QUICK = [(2, 256, 9, 3, 64)]


def _torch_rope(x, cos, sin, NH, NKV, hs):
    """HF's rotary application on the q/k views of packed x (B, T, W); returns (q, k) like apply_rotary_pos_emb."""
    import torch

    B, T, _ = x.shape
    heads = x.view(B, T, NH + 2 * NKV, hs).transpose(1, 2)
    q, k = heads[:, :NH], heads[:, NH:NH + NKV]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)

    def rotate_half(t):
        return torch.cat((-t[..., hs // 2:], t[..., :hs // 2]), dim=-1)

    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def _tables(T, hs, torch=None, device="cpu", dtype=None):
    cos, sin = rope.rope_tables(rope.inv_freq(hs, 10000.0), T)
    if torch is None:
        return cos, sin
    full = [torch.from_numpy(np.concatenate([a, a], -1)).to(device, dtype) for a in (cos, sin)]  # HF's (T, hs)
    return cos, sin, full


def cpu_rows(shape, quick: bool) -> list[list[str]]:
    B, T, NH, NKV, hs = shape
    W = (NH + 2 * NKV) * hs
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((B, T, W), dtype=np.float32)
    dout = rng.standard_normal((B, T, W), dtype=np.float32)
    cos, sin = _tables(T, hs)
    out, lse = np.empty((B, T, NH * hs), np.float32), np.empty((B, NH, T), np.float32)
    fwd = {"fastllm": lambda: ops.rope_forward(qkv, cos, sin, NH, out=qkv, n_kv_head=NKV)}
    bwd = {"fastllm": lambda: ops.rope_backward(dout, cos, sin, NH, dqkv=dout, n_kv_head=NKV)}
    try:
        import torch

        _, _, (tc, ts) = _tables(T, hs, torch)
        tc, ts = tc.expand(B, T, hs), ts.expand(B, T, hs)
        x = torch.from_numpy(qkv)
        xg = x.clone().requires_grad_()
        qg, kg = _torch_rope(xg, tc, ts, NH, NKV, hs)
        gq, gk = torch.randn_like(qg), torch.randn_like(kg)
        fwd["torch"] = lambda: _torch_rope(x, tc, ts, NH, NKV, hs)
        bwd["torch"] = lambda: torch.autograd.backward([qg, kg], [gq, gk], retain_graph=True)
    except ImportError:
        pass
    reps = 5 if quick else 15
    attn = bench({"fastllm": lambda: ops.attention_forward(qkv, NH, out=out, lse=lse, n_kv_head=NKV)}, repeats=3,
                 warmup=1)["fastllm"]["median"]
    rows, nbytes = [], 8 * B * T * (NH + NKV) * hs
    for name, fns in (("fwd", fwd), ("bwd", bwd)):
        t = bench(fns, repeats=reps, warmup=2)
        f, tt = t["fastllm"]["median"], t.get("torch", {}).get("median")
        rows.append([str(shape), name, f"{f * 1e3:.3f}", f"{tt * 1e3:.3f}" if tt else "-",
                     f"{tt / f:.2f}x" if tt else "-", f"{nbytes / f / 1e9:.1f}",
                     f"{100 * f / attn:.1f}%" if name == "fwd" else "-"])
    return rows


def cuda_rows(shape, quick: bool) -> list[list[str]]:
    torch, cuda = gpu_or_exit("bench_rope")
    B, T, NH, NKV, hs = shape
    reps = 10 if quick else 50
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    x = torch.randn(B, T, (NH + 2 * NKV) * hs, device="cuda", dtype=torch.bfloat16)
    cos, sin, (tc, ts) = _tables(T, hs, torch, "cuda", torch.bfloat16)
    tc, ts = tc.expand(B, T, hs), ts.expand(B, T, hs)
    c, s = cuda.to_device(cos), cuda.to_device(sin)
    xo = cuda.from_dlpack(x)
    out, lse = cuda.empty((B, T, NH * hs), "bfloat16"), cuda.empty((B, NH, T), "float32")

    def ms(fn):
        return cuda_time_ms(fn, reps, 3, before=flush.zero_)

    f = ms(lambda: cuda.rope_forward(xo, c, s, NH, out=xo, n_kv_head=NKV))
    t = ms(lambda: _torch_rope(x, tc, ts, NH, NKV, hs))
    fb = ms(lambda: cuda.rope_backward(xo, c, s, NH, dqkv=xo, n_kv_head=NKV))
    xg = x.clone().requires_grad_()
    qg, kg = _torch_rope(xg, tc, ts, NH, NKV, hs)
    gq, gk = torch.randn_like(qg), torch.randn_like(kg)
    tb = ms(lambda: torch.autograd.backward([qg, kg], [gq, gk], retain_graph=True))
    a = ms(lambda: cuda.attention_forward(xo, NH, out=out, lse=lse, n_kv_head=NKV))
    nbytes = 4 * B * T * (NH + NKV) * hs
    return [[*gpu_row([str(shape), "fwd"], f, t, nbytes), f"{100 * f / a:.1f}%"],
            [*gpu_row([str(shape), "bwd"], fb, tb, nbytes), "-"]]


def run(threads: int = 2, quick: bool = False, device: str = "cpu") -> None:
    set_threads(threads)
    rows_of = cuda_rows if device == "cuda" else cpu_rows
    rows = [r for shape in (QUICK if quick else SHAPES) for r in rows_of(shape, quick)]
    print(header("rope (in place on packed qkv)" + (", GPU bf16" if device == "cuda" else ""), threads))
    print_table(rows, ["shape (B,T,NH,NKV,hs)", "pass", "fastllm ms", "torch ms", "torch/fastllm", "GB/s",
                       "rope/attn"])


if __name__ == "__main__":
    cli(run, __doc__, device=True)
