"""Drawing the next token from logits (fastllm.sample.sample_next: temperature, top-k / top-p / min-p, one draw)
against what a transformers user runs on the CPU: its logits processors (TemperatureLogitsWarper, TopKLogitsWarper,
TopPLogitsWarper: a full torch.sort for top-p) then softmax and torch.multinomial, on the same float32 logits.
Vocabularies of 32k (Llama 2 / Mistral) and 152k (Qwen2.5) tokens; rows of 1 (one sequence) and 16 (a serving
batch). The logits are N(0, 4^2) draws: like a trained model's, a few hundred tokens hold most of the mass.
    python benchmarks/bench_sampling.py [--threads 2] [--quick]"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
from common import bench, cli, header, load_note, print_table  # noqa: E402

from fastllm.sample import SamplingParams, sample_next  # noqa: E402

SETTINGS = {"T=0.8": {}, "T=0.8 top_p=0.95": {"top_p": 0.95}, "T=0.8 top_k=50": {"top_k": 50},
            "T=0.8 min_p=0.05": {"min_p": 0.05}}


def torch_sampler(torch, kw: dict):
    """transformers' sampling step: its warpers on the scores, softmax, multinomial (None without transformers)."""
    try:
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )
    except ImportError:
        return None
    procs = LogitsProcessorList([TemperatureLogitsWarper(0.8)])
    if "top_k" in kw:
        procs.append(TopKLogitsWarper(kw["top_k"]))
    if "top_p" in kw:
        procs.append(TopPLogitsWarper(kw["top_p"]))
    if "min_p" in kw:
        procs.append(MinPLogitsWarper(kw["min_p"]))
    gen = torch.Generator().manual_seed(0)

    def draw(scores):
        probs = torch.softmax(procs(None, scores), -1)
        return torch.multinomial(probs, 1, generator=gen)
    return draw


def run(threads: int, quick: bool) -> None:
    import torch

    torch.set_num_threads(threads)
    print(header("sampling one token per row from float32 logits (fastllm.sample.sample_next vs transformers' "
                 "warpers + torch.multinomial)", threads))
    rng = np.random.default_rng(0)
    rows = []
    for V in (32000, 151936):
        for B in (1, 16):
            logits = (rng.standard_normal((B, V)) * 4).astype(np.float32)
            scores = torch.from_numpy(logits.copy())
            for name, kw in SETTINGS.items():
                sp, gen = SamplingParams(0.8, **kw), np.random.default_rng(0)
                fns = {"fastllm": lambda sp=sp, gen=gen, x=logits: sample_next(x, gen, sp)}
                draw = torch_sampler(torch, kw)
                if draw is not None:
                    fns["torch"] = lambda draw=draw, x=scores: draw(x)
                t = bench(fns, repeats=5 if quick else 20)
                ours = t["fastllm"]["median"]
                theirs = t["torch"]["median"] if "torch" in t else float("nan")
                rows.append([f"V={V}", f"{B}", name, f"{ours * 1e3:.2f}", f"{theirs * 1e3:.2f}",
                             f"{theirs / ours:.2f}x"])
    print_table(rows, ["vocab", "rows", "sampling", "fastllm ms", "transformers ms", "speedup"])
    print(f"(medians of interleaved runs; {load_note()})")


if __name__ == "__main__":
    cli(run, __doc__)
