"""Samplers and text generation.

`SamplingParams` says how the next token is drawn from the logits: greedy (temperature 0), temperature,
top-k, top-p (nucleus), min-p, repetition penalty; `sample_next` applies it to a batch of logits (vectorized
numpy, float64). `generate` / `stream` run the model with its KV cache: the prompt is prefilled in one pass,
then tokens are decoded one at a time. `stream_text` decodes tokens to text incrementally, holding back bytes
of a UTF-8 character split across tokens.

>>> ids = generate(model, [1, 2, 3], max_new_tokens=20, temperature=0.8, top_k=40, seed=0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .options import option


@dataclass
class SamplingParams:
    temperature: float = option(1.0, "softmax temperature: lower is more conservative (0: greedy, the argmax)")
    top_k: int | None = option(None, "sample only from the k most likely tokens (default: no limit)")
    top_p: float | None = option(None, "nucleus sampling: only the most likely tokens whose probabilities sum to "
                                       "top_p, in (0, 1] (default: no limit)")
    min_p: float | None = option(None, "only tokens with p >= min_p * p(most likely token), in [0, 1] "
                                       "(default: no limit)")
    repetition_penalty: float = option(1.0, "> 1 discourages tokens already in the sequence (CTRL / HF "
                                            "convention; 1: off)")

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def probabilities(logits: np.ndarray, sp: SamplingParams, history: Sequence[Sequence[int]] | None = None
                  ) -> np.ndarray:
    """The distribution (B, V) that sample_next draws from: penalties, temperature, then top-k / top-p / min-p
    filtering, renormalised. (Greedy is handled by sample_next, not here.)"""
    z = np.array(logits, np.float64, copy=True, ndmin=2)
    if sp.repetition_penalty != 1.0 and history is not None:
        for b, seen in enumerate(history):
            ids = np.unique(np.asarray(seen, np.int64))
            if ids.size:
                v = z[b, ids]
                z[b, ids] = np.where(v > 0, v / sp.repetition_penalty, v * sp.repetition_penalty)
    z /= max(sp.temperature, 1e-12)
    if sp.top_k is not None and sp.top_k < z.shape[-1]:
        kth = np.partition(z, -sp.top_k, axis=-1)[:, -sp.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if sp.top_p is not None and sp.top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sorted_p = np.take_along_axis(p, order, -1)
        keep_sorted = np.cumsum(sorted_p, -1) - sorted_p < sp.top_p  # the smallest prefix with mass >= top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, -1)
        p = np.where(keep, p, 0.0)
    if sp.min_p is not None and sp.min_p > 0:
        p = np.where(p >= sp.min_p * p.max(-1, keepdims=True), p, 0.0)
    return p / p.sum(-1, keepdims=True)


def sample_next(logits: np.ndarray, rng: np.random.Generator, sp: SamplingParams,
                history: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """One token id per row of logits (B, V)."""
    logits = np.atleast_2d(np.asarray(logits))
    if sp.greedy:
        if sp.repetition_penalty != 1.0 and history is not None:
            return probabilities(logits, dataclasses.replace(sp, temperature=1.0, top_k=None), history).argmax(-1)
        return logits.argmax(-1)
    p = probabilities(logits, sp, history)
    u = rng.random((p.shape[0], 1))
    return np.minimum((np.cumsum(p, -1) < u).sum(-1), p.shape[-1] - 1)


def _as_rows(prompt_ids) -> tuple[list[list[int]], bool]:
    """One prompt (a sequence of ids) or a batch (a sequence of sequences) -> (list of id lists, single?)."""
    if isinstance(prompt_ids, np.ndarray):
        single = prompt_ids.ndim == 1
        prompts = [prompt_ids] if single else list(prompt_ids)
    else:
        prompts = list(prompt_ids)
        single = not prompts or isinstance(prompts[0], (int, np.integer))
        prompts = [prompts] if single else prompts
    rows = []
    for p in prompts:
        a = np.asarray(p)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"prompt_ids must hold integer token ids, got dtype {a.dtype}")
        rows.append([int(t) for t in a.reshape(-1)])
    return rows, single


def _check_prompts(model, rows: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    V, Tmax = model.config.vocab_size, model.config.block_size
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompt_ids[{i}] is empty: give at least one token (e.g. <|endoftext|>)")
        bad = [t for t in r if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt_ids[{i}] holds token id {bad[0]} outside [0, {V})")
        if len(r) + max_new_tokens > Tmax:
            raise ValueError(f"prompt_ids[{i}] has {len(r)} tokens + max_new_tokens={max_new_tokens} > the model's "
                             f"context block_size={Tmax}")
    return rows


def stream(model, prompt_ids, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
           stop_tokens: Sequence[int] = (), seed: int | None = None, weights: str = "float32"
           ) -> Iterator[np.ndarray]:
    """Yield, per decoding step, the new token of each sequence (array (B,), -1 for sequences that stopped).

    prompt_ids: one sequence of ids, or a list of sequences of different lengths (batched generation).
    weights="bfloat16" decodes with bf16 copies of the weight matrices (about half the memory traffic per step;
    logits within ~1% of float32, so sampled tokens can differ where two candidates are nearly tied)."""
    sp = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty)
    rows = _check_prompts(model, _as_rows(prompt_ids)[0], max_new_tokens)
    rng = np.random.default_rng(seed)
    stop = set(int(s) for s in stop_tokens)
    # the cache holds what this call needs (longest prompt + new tokens), not a full context
    cache = model.kv_cache(len(rows), weights=weights, max_len=max(len(r) for r in rows) + max(max_new_tokens, 1))
    logits = cache.prefill(rows)  # (B, V) logits of each prompt's last token
    alive = np.ones(len(rows), bool)
    for _ in range(max_new_tokens):
        nxt = sample_next(logits, rng, sp, rows if repetition_penalty != 1.0 else None).astype(np.int64)
        nxt[~alive] = -1
        for b in np.flatnonzero(alive):
            rows[b].append(int(nxt[b]))
            if nxt[b] in stop:
                alive[b] = False
        yield nxt
        if not alive.any():
            break
        logits = cache.decode(np.where(nxt < 0, 0, nxt))


def generate(model, prompt_ids, max_new_tokens: int, **kw) -> list[int] | list[list[int]]:
    """Prompt plus generated ids (a list, or a list of lists for a batch of prompts). Keyword arguments as in
    `stream`: temperature, top_k, top_p, min_p, repetition_penalty, stop_tokens, seed, weights."""
    rows, single = _as_rows(prompt_ids)
    for step in stream(model, prompt_ids, max_new_tokens, **kw):
        for b, t in enumerate(step):
            if t >= 0:
                rows[b].append(int(t))
    return rows[0] if single else rows


class TextStreamer:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character: bytes of an
    incomplete character are held back until the token that completes them arrives."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = b""

    def push(self, token_id: int) -> str:
        self.pending += self.tokenizer.decode_bytes([int(token_id)])
        # keep back an incomplete trailing UTF-8 sequence (at most 3 bytes)
        for cut in range(len(self.pending), max(len(self.pending) - 4, -1), -1):
            try:
                text = self.pending[:cut].decode("utf-8")
            except UnicodeDecodeError:
                continue
            self.pending = self.pending[cut:]
            return text
        text = self.pending.decode("utf-8", errors="replace")  # not UTF-8 at all: give up holding it
        self.pending = b""
        return text

    def flush(self) -> str:
        text, self.pending = self.pending.decode("utf-8", errors="replace"), b""
        return text


def stream_text(model, tokenizer, prompt: str | Sequence[int], max_new_tokens: int, stop: Sequence[str] = (),
                stats: dict | None = None, **kw) -> Iterator[str]:
    """Yield decoded text pieces as tokens are generated (single prompt: text, encoded with special tokens
    allowed, or token ids); stops at `stop` strings (not included in the output), at <|endoftext|> and at
    `stop_tokens` (their text not included either). `stats["tokens"]` counts the tokens generated."""
    stats = {} if stats is None else stats
    stats["tokens"] = 0
    eot = tokenizer.special_tokens.get("<|endoftext|>")
    stop_tokens = tuple(int(t) for t in kw.pop("stop_tokens", ())) + ((eot,) if eot is not None else ())
    ends = set(stop_tokens)
    ids = tokenizer.encode(prompt, allowed_special="all") if isinstance(prompt, str) else prompt
    streamer = TextStreamer(tokenizer)
    text, emitted = "", 0
    hold = max((len(s) for s in stop), default=0)
    for step in stream(model, ids, max_new_tokens, stop_tokens=stop_tokens, **kw):
        t = int(step[0])
        stats["tokens"] += 1
        if t < 0 or t in ends:
            break
        text += streamer.push(t)
        hits = [text.find(s, max(0, emitted - len(s))) for s in stop]
        hits = [h for h in hits if h >= 0]
        if hits:
            yield text[emitted:min(hits)]
            return
        safe = len(text) - hold  # keep back what could still become a stop string
        if safe > emitted:
            yield text[emitted:safe]
            emitted = safe
    text += streamer.flush()
    yield text[emitted:]
