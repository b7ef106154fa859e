"""Batched token scoring and generation for evaluation, on any fastllm GPT (CPU or GPU): every number comes
from `model.forward(idx, targets)` (the fused lm-head + cross-entropy, per-token losses in model.token_losses)
or, where the greedy token is asked for, from the logits of `model.forward(idx)`; no Python loop over tokens.

A request is (context ids, continuation ids): the log-probabilities of the continuation tokens given the
context and each other. Requests are packed into right-padded (B, T) batches of at most `batch_tokens` tokens
(padding carries target -1; attention is causal, so it never changes a row's scores), longest first; the
requests of one group (the choices of a multiple-choice example) always share a forward. A request longer than
the context window keeps its last block_size + 1 tokens (the context is cut on the left), as lm-eval does.

Long documents are scored with sliding windows (`window_requests`): every token is predicted exactly once,
with at least block_size - stride tokens of context (stride = block_size: lm-eval's loglikelihood_rolling).

>>> logps = score_continuations(model, [([50256, 464], [3290, 318]), ([464], [3797])])
>>> [lp.sum() for lp in logps]   # log p(continuation | context), nats
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Request = tuple[Sequence[int], Sequence[int]]


def _rows(requests: Sequence[Request], block_size: int) -> list[tuple[np.ndarray, int]]:
    """(tokens of the row incl. its last target, number of scored tokens) per request, cut to block_size + 1."""
    rows = []
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = np.asarray(ctx, np.int64).reshape(-1), np.asarray(cont, np.int64).reshape(-1)
        if len(ctx) == 0:
            raise ValueError(f"request {i}: empty context (start it with a token such as <|endoftext|>)")
        if len(cont) > block_size:
            raise ValueError(f"request {i}: continuation of {len(cont)} tokens > the model's context "
                             f"block_size={block_size}")
        rows.append((np.concatenate([ctx, cont])[-(block_size + 1):], len(cont)))
    return rows


def _batches(lengths: Sequence[int], groups: Sequence[int] | None, batch_tokens: int) -> list[list[int]]:
    """Request indexes per forward: whole groups, longest first, padded rows x longest <= batch_tokens (a group
    larger than that gets a batch of its own)."""
    by_group: dict[int, list[int]] = {}
    for i in range(len(lengths)):
        by_group.setdefault(i if groups is None else int(groups[i]), []).append(i)
    order = sorted(by_group.values(), key=lambda g: (-max(lengths[i] for i in g), g[0]))
    batches: list[list[int]] = []
    width = 0  # the longest row of the last batch: its first group's, as the groups come longest first
    for g in order:
        if not batches or width * (len(batches[-1]) + len(g)) > batch_tokens:
            batches.append([])
            width = max(lengths[i] for i in g)
        batches[-1] += g
    return batches


def _log_softmax_at(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log p(targets) for rows of logits (n, V), in float64."""
    z = logits.astype(np.float64)
    m = z.max(-1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(-1))
    return z[np.arange(len(targets)), targets] - lse


def score_continuations(model, requests: Sequence[Request], groups: Sequence[int] | None = None,
                        batch_tokens: int = 2048, greedy: bool = False, progress=None):
    """Per-token log-probabilities (float64 arrays, one per request) of each continuation given its context.

    groups: a key per request; requests with the same key run in the same forward (e.g. the choices of one
    multiple-choice example). greedy=True also returns, per request, whether every continuation token is the
    model's argmax (lm-eval's is_greedy; computed from full logits, so batches are capped at 2**27 logits).
    progress: a tqdm-like bar, advanced by the number of requests scored."""
    if not requests:
        return ([], []) if greedy else []
    cfg = model.config
    rows = _rows(requests, cfg.block_size)
    budget = max(1, batch_tokens if not greedy else min(batch_tokens, (1 << 27) // cfg.vocab_size))
    was = getattr(model, "training", False)
    model.eval()
    out: list[np.ndarray] = [np.empty(0)] * len(rows)
    is_greedy = [True] * len(rows)
    try:
        for batch in _batches([len(r) - 1 for r, _ in rows], groups, budget):
            T = max(len(rows[i][0]) for i in batch) - 1
            idx = np.zeros((len(batch), T), np.int32)
            targets = np.full((len(batch), T), -1, np.int32)
            for b, i in enumerate(batch):
                seq, n = rows[i]
                idx[b, : len(seq) - 1] = seq[:-1]
                targets[b, len(seq) - 1 - n: len(seq) - 1] = seq[len(seq) - n:]
            if greedy:
                logits = model.forward(idx)  # (B, T, V)
            else:
                model.forward(idx, targets)
                logp = -np.asarray(model.token_losses, np.float64).reshape(len(batch), T)
            for b, i in enumerate(batch):
                seq, n = rows[i]
                cols = slice(len(seq) - 1 - n, len(seq) - 1)
                if greedy:
                    out[i] = _log_softmax_at(logits[b, cols], targets[b, cols])
                    is_greedy[i] = bool((logits[b, cols].argmax(-1) == targets[b, cols]).all())
                else:
                    out[i] = logp[b, cols].copy()
            if progress is not None:
                progress.update(len(batch))
    finally:
        model.train(was)
    return (out, is_greedy) if greedy else out


def window_requests(ids: Sequence[int], block_size: int, stride: int | None = None) -> list[Request]:
    """Sliding windows over a token sequence as scoring requests: tokens 1..n-1 are predicted exactly once
    (token 0, e.g. <|endoftext|>, is the first context), `stride` new tokens per window, each window filled
    with up to block_size tokens of context.

    >>> [(list(c), list(t)) for c, t in window_requests(range(11), 4)]    # lm-eval's example (stride 4)
    [([0], [1, 2, 3, 4]), ([4, 5, 6, 7], [5, 6, 7, 8]), ([6, 7, 8, 9], [9, 10])]
    """
    stride = block_size if stride is None else int(stride)
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride must be in [1, block_size={block_size}], got {stride}")
    ids = np.asarray(ids, np.int64).reshape(-1)
    out, done = [], 0  # targets ids[1..done] are scored
    while done < len(ids) - 1:
        end = min(done + stride, len(ids) - 1)  # score ids[done+1 .. end]
        start = max(0, end - block_size)  # inputs ids[start .. end-1]
        out.append((ids[start: done + 1], ids[done + 1: end + 1]))
        done = end
    return out


def generate_until(model, tokenizer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                   stop: Sequence[str] = (), stop_tokens: Sequence[int] = (), temperature: float = 0.0,
                   seed: int | None = None, batch_size: int = 32, progress=None) -> list[str]:
    """Completions (text) of token prompts, batched with the KV cache: each ends at <|endoftext|>, a stop token
    or the first stop string (neither included), or after max_new_tokens. A batch stops decoding when all of
    its rows have ended. A prompt too long for the context keeps its last block_size - max_new_tokens tokens.
    Special tokens the model writes are left out of the text, as lm-eval's HF model decodes it."""
    from ..sample import stream

    T = model.config.block_size
    if not 1 <= max_new_tokens < T:
        raise ValueError(f"max_new_tokens must be in [1, block_size={T}), got {max_new_tokens}")
    ends = {int(t) for t in stop_tokens} | ({tokenizer.eot_token} if tokenizer.eot_token is not None else set())
    rows = [[int(t) for t in np.asarray(p).reshape(-1)][-(T - max_new_tokens):] for p in prompts]
    if any(not r for r in rows):
        raise ValueError("every prompt needs at least one token")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = [""] * len(rows)
    was = getattr(model, "training", False)
    model.eval()
    try:
        for k in range(0, len(order), batch_size):
            batch = order[k: k + batch_size]
            new: list[list[int]] = [[] for _ in batch]
            done = np.zeros(len(batch), bool)
            texts = [""] * len(batch)
            steps = stream(model, [rows[i] for i in batch], max_new_tokens, temperature=temperature,
                           stop_tokens=tuple(ends), seed=None if seed is None else seed + k)
            for step in steps:
                for b in np.flatnonzero(~done):
                    t = int(step[b])
                    if t < 0 or t in ends:
                        done[b] = True
                        continue
                    new[b].append(t)
                    if stop:
                        texts[b] = tokenizer.decode(new[b], skip_special_tokens=True)
                        done[b] = any(s in texts[b] for s in stop)
                if done.all():
                    break
            for b, i in enumerate(batch):
                text = tokenizer.decode(new[b], skip_special_tokens=True)  # (as lm-eval's HF model decodes)
                cut = min((text.find(s) for s in stop if s in text), default=len(text))
                out[i] = text[:cut]
            if progress is not None:
                progress.update(len(batch))
    finally:
        model.train(was)
    return out

