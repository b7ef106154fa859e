"""Multiple-choice scoring (HellaSwag-shaped) examples/s: fastllm.eval vs PyTorch/transformers on the same weights
(GPT-2 124M shape, random weights), same process, same threads, interleaved repeats.

An example is a context of 20-60 tokens and 4 endings of 8-30 tokens (random ids; the cost does not depend on
them); the score of an ending is the summed log-probability of its tokens. Providers:
    fastllm        fastllm.eval.score_continuations: several examples per forward (batch_tokens), the fused
                   lm-head + cross-entropy kernel (no (B, T, V) logits)
    torch/example  transformers GPT2LMHeadModel, one example (4 padded rows) per forward, log_softmax over the
                   logits, as llm.c's hellaswag.py does
    torch/batched  the same, with fastllm's batches (same rows, same padding)
Scores of all three agree (checked before timing).
    python benchmarks/bench_eval.py [--threads 2] [--quick]"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, header, print_table, set_threads  # noqa: E402

from fastllm.eval.scoring import _batches, score_continuations  # noqa: E402
from fastllm.model import GPT, GPTConfig  # noqa: E402


def examples(n: int, V: int, seed: int = 0) -> tuple[list, list[int]]:
    rng = np.random.default_rng(seed)
    reqs, groups = [], []
    for e in range(n):
        ctx = rng.integers(0, V, int(rng.integers(20, 61)))
        for _ in range(4):
            reqs.append((ctx, rng.integers(0, V, int(rng.integers(8, 31)))))
            groups.append(e)
    return reqs, groups


def torch_scorer(hf, reqs, batches):
    """Summed log p of each continuation with transformers, one forward per batch of request indexes."""
    import torch

    def run():
        out = [0.0] * len(reqs)
        with torch.inference_mode():
            for batch in batches:
                rows = [np.concatenate(reqs[i]) for i in batch]
                T = max(len(r) for r in rows) - 1
                idx = torch.zeros((len(rows), T), dtype=torch.long)
                for b, r in enumerate(rows):
                    idx[b, :len(r) - 1] = torch.from_numpy(r[:-1])
                logp = torch.log_softmax(hf(idx).logits, -1)
                for b, i in enumerate(batch):
                    n, r = len(reqs[i][1]), rows[b]
                    pos = torch.arange(len(r) - 1 - n, len(r) - 1)
                    out[i] = float(logp[b, pos, torch.from_numpy(r[len(r) - n:])].sum())
        return out

    return run


def run(threads: int, quick: bool) -> None:
    import torch
    import transformers

    from fastllm.hf import config_to_hf, hf_state_dict

    set_threads(threads)
    cfg = GPTConfig.preset("gpt2")
    model = GPT(cfg, seed=0).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(cfg))).eval()
    missing, unexpected = hf.load_state_dict({k: torch.from_numpy(v) for k, v in hf_state_dict(model).items()},
                                             strict=False)
    assert not unexpected and all(k == "lm_head.weight" or k.endswith("attn.bias") for k in missing), missing
    hf.tie_weights()
    n_ex = 4 if quick else 8
    reqs, groups = examples(n_ex, cfg.vocab_size)
    batch_tokens = 2048
    lengths = [len(c) + len(t) - 1 for c, t in reqs]
    fused = _batches(lengths, groups, batch_tokens)
    per_example = _batches(lengths, groups, 1)  # each group alone
    ours = [float(lp.sum()) for lp in score_continuations(model, reqs, groups=groups, batch_tokens=batch_tokens)]
    ref = torch_scorer(hf, reqs, per_example)()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)
    fns = {
        "fastllm": lambda: score_continuations(model, reqs, groups=groups, batch_tokens=batch_tokens),
        "torch/example": torch_scorer(hf, reqs, per_example),
        "torch/batched": torch_scorer(hf, reqs, fused),
    }
    t = bench(fns, repeats=2 if quick else 4, warmup=1)
    tokens = sum(lengths)
    print(header("multiple-choice scoring (GPT-2 124M, random weights, 4 endings per example)", threads))
    rows = []
    for k in fns:
        s = t[k]["median"]
        rows.append([k, f"{n_ex}", f"{tokens}", f"{s:.2f}", f"{n_ex / s:.2f}", f"{tokens / s:,.0f}",
                     f"{t[k]['median'] / t['fastllm']['median']:.2f}x"])
    print_table(rows, ["provider", "examples", "tokens", "s (median)", "examples/s", "tokens/s", "time / fastllm"])
    print(f"fastllm: {len(fused)} forwards of <= {batch_tokens} tokens; torch/example: {len(per_example)} forwards")


if __name__ == "__main__":
    cli(run, __doc__)
