"""Text generation: greedy, temperature, top-k and top-p sampling, one token at a time.

>>> ids = generate(model, [1, 2, 3], max_new_tokens=20, temperature=0.8, top_k=40, seed=0)
"""

from __future__ import annotations

import numpy as np

from .model import GPT


def sample_next(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None) -> np.ndarray:
    """Draw one token id per row of logits (B, V). temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.partition(z, -top_k, axis=-1)[:, -top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < top_p  # smallest set with mass >= top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(-1, keepdims=True)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


def generate(model: GPT, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int | None = None) -> list[int]:
    """Continue `prompt_ids` by `max_new_tokens` tokens (the context is cropped to block_size)."""
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("prompt_ids must hold at least one token")
    rng = np.random.default_rng(seed)
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_tokens):
            ctx = np.asarray(ids[-model.config.block_size:], np.int32)[None]
            logits = model.logits_last(ctx)
            ids.append(int(sample_next(logits, rng, temperature, top_k, top_p)[0]))
    finally:
        model.train(was_training)
    return ids
