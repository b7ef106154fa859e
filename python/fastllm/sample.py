"""Samplers and text generation.

`SamplingParams` says how the next token is drawn from the logits: greedy (temperature 0), temperature,
top-k, top-p (nucleus), min-p, repetition penalty (HF/CTRL), presence and frequency penalties (OpenAI);
`sample_next` applies it to a batch of logits (vectorized numpy, float64). `generate` / `stream` run the model
with its KV cache: the prompt is prefilled in one pass, then tokens are decoded one at a time. `stream_text`
decodes tokens to text incrementally (`TextStreamer` holds back bytes of a UTF-8 character split across tokens,
`StopStrings` holds back text that may still become a stop string).

>>> ids = generate(model, [1, 2, 3], max_new_tokens=20, temperature=0.8, top_k=40, seed=0)
"""

from __future__ import annotations

import codecs
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from .options import option
from .tokenizer import byte_run_text


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
    presence_penalty: float = option(0.0, "OpenAI's: subtracted from the logit of every token already generated "
                                          "(0: off)")
    frequency_penalty: float = option(0.0, "OpenAI's: subtracted from a token's logit once per earlier occurrence "
                                           "in the generated tokens (0: off)")

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer, got {self.top_k}")
        if self.top_k is not None:
            self.top_k = int(self.top_k)  # (a float 4.0 from JSON: an index for np.partition)
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not np.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be finite, got {getattr(self, name)}")

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def penalize(logits: np.ndarray, sp: SamplingParams, history: Sequence[Sequence[int]] | None = None,
             output: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """Logits (B, V) as float64 with the penalties applied: repetition_penalty over `history` (each row's prompt
    and generated tokens), presence/frequency penalties over `output` (the generated tokens; default history)."""
    z = np.array(logits, np.float64, copy=True, ndmin=2)
    if sp.repetition_penalty != 1.0 and history is not None:
        for b, seen in enumerate(history):
            ids = np.unique(np.asarray(seen, np.int64))
            if ids.size:
                v = z[b, ids]
                z[b, ids] = np.where(v > 0, v / sp.repetition_penalty, v * sp.repetition_penalty)
    output = history if output is None else output
    if (sp.presence_penalty or sp.frequency_penalty) and output is not None:
        for b, seen in enumerate(output):
            ids, counts = np.unique(np.asarray(seen, np.int64), return_counts=True)
            if ids.size:
                z[b, ids] -= sp.frequency_penalty * counts + sp.presence_penalty
    return z


def probabilities(logits: np.ndarray, sp: SamplingParams, history: Sequence[Sequence[int]] | None = None,
                  output: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """The distribution (B, V) that sample_next draws from: penalties, temperature, then top-k / top-p / min-p
    filtering, renormalised. (Greedy is handled by sample_next, not here.)"""
    z = penalize(logits, sp, history, output)
    z /= max(sp.temperature, 1e-12)
    if sp.top_k is not None and sp.top_k < z.shape[-1]:
        kth = np.partition(z, -sp.top_k, axis=-1)[:, -sp.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    # exp in float32 (relative error ~1e-7): numpy's float32 exp is SIMD on every x86, its float64 exp is scalar
    # libm on AVX2 hosts, ~8x slower -- 0.7 ms a row at a 32k vocabulary, the larger part of a sampled token
    p = np.exp((z - z.max(-1, keepdims=True)).astype(np.float32)).astype(np.float64)
    p /= p.sum(-1, keepdims=True)
    if sp.top_p is not None and sp.top_p < 1.0:
        p = np.where(np.stack([_nucleus(row, sp.top_p) for row in p]), p, 0.0)
    if sp.min_p is not None and sp.min_p > 0:
        p = np.where(p >= sp.min_p * p.max(-1, keepdims=True), p, 0.0)
    return p / p.sum(-1, keepdims=True)


def _nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """(V,) bool: the smallest prefix of p's tokens, most likely first (ties: lower id first), whose mass reaches
    top_p. Sorting only the 1024 most likely tokens gives the prefix a full sort gives as long as it ends on a token
    strictly more likely than the 1024th (else all are sorted): a trained model's nucleus is almost always in its
    first few hundred tokens, and sorting a 150k vocabulary takes ~15 ms on one core."""
    V = p.size
    for k in (min(1024, V), V):
        top = np.argpartition(-p, k - 1)[:k] if k < V else np.arange(V)
        order = top[np.lexsort((top, -p[top]))]
        q = p[order]
        n = int(np.count_nonzero(np.cumsum(q) - q < top_p))  # the prefix (the condition holds on a prefix)
        if k == V or (n < k and q[n] > q[-1]):  # decided before the k-th token's value: as a full sort decides
            break
    keep = np.zeros(V, bool)
    keep[order[:n]] = True
    return keep


def sample_next(logits: np.ndarray, rng: np.random.Generator, sp: SamplingParams,
                history: Sequence[Sequence[int]] | None = None,
                output: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """One token id per row of logits (B, V). history: each row's tokens so far (for repetition_penalty);
    output: its generated tokens (for presence/frequency penalties; default history)."""
    logits = np.atleast_2d(np.asarray(logits))
    if sp.greedy:
        return penalize(logits, sp, history, output).argmax(-1) if sp.penalized else logits.argmax(-1)
    u = rng.random(logits.shape[0])
    filtered = sp.top_k is not None or sp.top_p is not None or sp.min_p is not None
    out = np.empty(logits.shape[0], np.int64)
    for b in range(logits.shape[0]):  # a row at a time: its float64 temporaries stay in the L2 cache
        row = probabilities(logits[b:b + 1], sp, None if history is None else history[b:b + 1],
                            None if output is None else output[b:b + 1])[0]
        ids = np.flatnonzero(row) if filtered else np.arange(row.size)  # (filtered: only the tokens left)
        out[b] = ids[min(int(np.count_nonzero(np.cumsum(row[ids]) < u[b])), ids.size - 1)]  # cumulative p passes u
    return out


def check_seed(seed) -> None:
    """A sampling seed is None (fresh randomness) or an integer >= 0 (ValueError otherwise)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"seed must be an integer >= 0 (leave it unset for a random seed), got {seed!r}")


DECODE_DTYPES = ("float32", "bfloat16", "int8", "w8a8")  # --dtype of sample/chat/serve: the weights decoding streams


def check_decode_dtype(dtype: str | None, device: str) -> None:
    """A decoding --dtype for `device`, checked before any model is loaded (None: the device's default)."""
    if dtype not in (None, *DECODE_DTYPES):
        raise ValueError(f"--dtype must be one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")
    if dtype in ("int8", "w8a8") and device != "cpu":
        raise ValueError(f"--dtype {dtype} (int8 weight copies) is for decoding on the CPU; on a GPU use bfloat16 "
                         "or float32")


def held_weights(dtype: str | None, device: str) -> str | None:
    """The form a decoding --dtype holds a CPU model's matrices in alone (load_model's weights=): bfloat16, int8 or
    w8a8; None (float32, or a GPU, whose model computes in its own dtype)."""
    return dtype if device == "cpu" and dtype in DECODE_DTYPES and dtype != "float32" else None


def _check_finite(logits: np.ndarray, alive: np.ndarray, step: int) -> None:
    """Non-finite logits mean NaN/Inf weights or activations: raise rather than sample garbage (argmax of NaN
    is token 0, forever)."""
    bad = np.flatnonzero(alive & ~np.isfinite(logits).all(-1))
    if bad.size:
        raise FloatingPointError(
            f"the model's logits are not finite (NaN or Inf) at generation step {step} (sequence {int(bad[0])}): "
            "its weights or activations hold NaN/Inf"
        )


def _as_rows(prompt_ids) -> tuple[list[list[int]], bool]:
    """One prompt (a sequence of ids) or a batch (a sequence of sequences) -> (list of id lists, single?). Arrays
    of other libraries (a torch tensor: HF's input_ids, or a row of it) are read as numpy arrays."""
    if not isinstance(prompt_ids, (list, tuple)) and hasattr(prompt_ids, "__array__"):
        prompt_ids = np.asarray(prompt_ids)
    if isinstance(prompt_ids, np.ndarray):
        single = prompt_ids.ndim == 1
        prompts = [prompt_ids] if single else list(prompt_ids)
    else:
        prompts = list(prompt_ids)
        single = not prompts or np.ndim(prompts[0]) == 0  # ids (ints, numpy or torch scalars), else prompts
        prompts = [prompts] if single else prompts
    rows = []
    for p in prompts:
        a = np.asarray(p)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise TypeError(f"prompt_ids must hold integer token ids, got dtype {a.dtype}")
        rows.append([int(t) for t in a.reshape(-1)])
    return rows, single


def _token_ids(ids: int | Sequence[int] | None, name: str) -> list[int]:
    """An id, a sequence of ids or None (as HF's eos_token_id) -> a list of ints; TypeError naming `name` otherwise."""
    if ids is None:
        return []
    if isinstance(ids, (int, np.integer)) and not isinstance(ids, bool):
        return [int(ids)]
    a = np.asarray(ids)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must be a token id or a sequence of them, got {ids!r}")
    return [int(t) for t in a]


def _check_prompts(model, rows: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise TypeError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
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
           stop_tokens: int | Sequence[int] | None = (), seed: int | None = None, weights: str = "float32",
           presence_penalty: float = 0.0, frequency_penalty: float = 0.0) -> Iterator[np.ndarray]:
    """Yield, per decoding step, the new token of each sequence (array (B,), -1 for sequences that stopped).

    prompt_ids: one sequence of ids, or a list of sequences of different lengths (batched generation).
    Sampling options: see SamplingParams (repetition_penalty over each prompt and its new tokens, presence and
    frequency penalties over the new tokens). stop_tokens: an id or ids that end a sequence (included in it).
    weights="bfloat16" decodes with bf16 copies of the weight matrices (about half the memory traffic per step;
    logits within ~1% of float32, so sampled tokens can differ where two candidates are nearly tied); weights="int8"
    with int8 copies (a quarter of the traffic; per-row scales, see ops.quantize_int8), the prompt included;
    weights="w8a8" with those and int8 activations (integer products, see model.w8a8_weights).
    Logits that are not finite (NaN/Inf weights) raise FloatingPointError naming the step."""
    sp = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty)
    check_seed(seed)
    rows = _check_prompts(model, _as_rows(prompt_ids)[0], max_new_tokens)
    rng = np.random.default_rng(seed)
    stop = set(_token_ids(stop_tokens, "stop_tokens"))
    # the cache holds what this call needs (longest prompt + new tokens), not a full context
    cache = model.kv_cache(len(rows), weights=weights, max_len=max(len(r) for r in rows) + max_new_tokens)
    logits = cache.prefill(rows)  # (B, V) logits of each prompt's last token
    alive = np.ones(len(rows), bool)
    new: list[list[int]] = [[] for _ in rows]  # each row's new tokens (presence/frequency penalties)
    for step in range(max_new_tokens):
        _check_finite(logits, alive, step)
        output = new if presence_penalty or frequency_penalty else None
        nxt = sample_next(logits, rng, sp, rows if repetition_penalty != 1.0 else None, output).astype(np.int64)
        nxt[~alive] = -1
        for b in np.flatnonzero(alive):
            rows[b].append(int(nxt[b]))
            new[b].append(int(nxt[b]))
            if nxt[b] in stop:
                alive[b] = False
        yield nxt
        if not alive.any() or step == max_new_tokens - 1:
            break
        logits = cache.decode(np.where(nxt < 0, 0, nxt))


def generate(model, prompt_ids, max_new_tokens: int, **kw) -> list[int] | list[list[int]]:
    """Prompt plus generated ids (a list, or a list of lists for a batch of prompts). Keyword arguments as in
    `stream`: temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty, frequency_penalty,
    stop_tokens, seed, weights."""
    rows, single = _as_rows(prompt_ids)
    for step in stream(model, prompt_ids, max_new_tokens, **kw):
        for b, t in enumerate(step):
            if t >= 0:
                rows[b].append(int(t))
    return rows[0] if single else rows


class TextStreamer:
    """Turns a stream of token ids into text pieces, never splitting a UTF-8 character: bytes of an
    incomplete character are held back until the token that completes them arrives. Bytes that cannot become
    UTF-8 are U+FFFD at once, as a whole decode replaces them (Python's incremental UTF-8 decoder): the pieces
    join to tokenizer.decode(ids, skip_special_tokens=skip_special_tokens). A run of SentencePiece byte-fallback
    tokens is held until it ends and decoded as a whole, as HF's ByteFallback decoder does.
    skip_special_tokens: leave out special tokens (tokenizer.special_ids; default False: they are shown, as by
    transformers' TextStreamer, whose decode_kwargs default to none), except those named in `keep` (the tags a
    tool-call or reasoning parser reads). continues=True: the ids continue a prompt, so the leading space that a
    SentencePiece tokenizer's decode strips from a text's start is kept (as vLLM's streams keep it)."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False, keep: Collection[str] = (),
                 continues: bool = False):
        self.tokenizer = tokenizer
        self.strip = not continues and tokenizer.strips_leading_space  # until the first text
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.fallback = tokenizer.byte_fallback_ids
        self.run = bytearray()
        self.skip: frozenset[int] = frozenset()
        if skip_special_tokens:
            names = tokenizer.special_tokens
            self.skip = tokenizer.special_ids - {names[s] for s in keep if s in names}

    def push(self, token_id: int) -> str:
        if token_id in self.skip:
            return ""
        try:
            b = self.tokenizer.decode_bytes([int(token_id)])
        except ValueError:  # an embedding row with no token (Qwen's vocab_size 151936 > its ~151665 tokens): no
            return ""  # text, as transformers' decode skips it
        if int(token_id) in self.fallback:
            self.run += b
            return ""
        return self._stripped(self._end_run() + self.decoder.decode(b))

    def _stripped(self, text: str) -> str:
        if self.strip and text:
            self.strip, text = False, text[1:] if text[0] == " " else text
        return text

    def _end_run(self) -> str:
        text = byte_run_text(bytes(self.run)) if self.run else ""
        self.run.clear()
        return text

    def flush(self) -> str:
        return self._stripped(self._end_run() + self.decoder.decode(b"", final=True))


class StopStrings:
    """Cuts a stream of text pieces at the first occurrence of any of the `stop` strings (not included; a str is
    one stop string, as OpenAI's `stop`; include=True: included, as vLLM's include_stop_str_in_output, and the
    rest of the piece that completes it is dropped).
    push(piece) returns (text that is safe to show now, stopped); text whose end could still grow into a stop
    string is held back until the next piece decides it (include=True: nothing is held, the stop string is
    shown anyway); flush() returns what is held at the end of the stream. `hit` is the stop string found.
    push(piece, check=False) shows the piece without looking for stop strings in it (vLLM's min_tokens: a stop
    string within the first min_tokens tokens' text does not stop; one that ends after it does, where it starts).

    >>> s = StopStrings(["\\n\\n"]); s.push("Hi\\n"), s.push("\\nBye")
    (('Hi', False), ('', True))
    """

    def __init__(self, stop: str | Sequence[str] = (), include: bool = False):
        self.stop = [x for x in ([stop] if isinstance(stop, str) else stop) if x]  # (not one stop per character)
        self.include = include
        self.text, self.emitted, self.stopped, self.hit = "", 0, False, None
        self.checked = 0  # a stop string found must end after text[:checked] (searched, or left unchecked)

    def push(self, piece: str, check: bool = True) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.text += piece
        if check:
            floor = 0 if self.include else self.emitted  # (held-back text starts at emitted)
            hits = [(h, x) for x in self.stop if (h := self.text.find(x, max(floor, self.checked - len(x) + 1))) >= 0]
            if hits:
                h, x = min(hits, key=lambda hx: hx[0])
                end = h + len(x) if self.include else h
                self.stopped, self.hit = True, x
                out, self.emitted = self.text[self.emitted:end], end
                return out, True
        self.checked = len(self.text)
        # hold back the longest tail that is a proper prefix of some stop string
        tail = self.text[self.emitted:]
        hold = 0 if self.include else max((k for x in self.stop for k in range(min(len(x) - 1, len(tail)), 0, -1)
                                           if tail.endswith(x[:k])), default=0)
        out = tail[:len(tail) - hold]
        self.emitted += len(out)
        return out, False

    def flush(self) -> str:
        if self.stopped:
            return ""
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


def stream_text(model, tokenizer, prompt: str | Sequence[int], max_new_tokens: int,
                stop: str | Sequence[str] = (), stats: dict | None = None, skip_special_tokens: bool = True,
                continues: bool = True, **kw) -> Iterator[str]:
    """Yield decoded text pieces as tokens are generated (single prompt: token ids, or text, encoded as `fastllm
    sample` and HF's tokenizer(text) encode it: tokenizer.encode_prompt, special tokens matched, a Llama 3 BOS
    first, "" a new document); stops at `stop` strings (not included in the output), at <|endoftext|> and at
    `stop_tokens` (their text not included either). `stats["tokens"]` counts the tokens generated.
    skip_special_tokens (default True): special tokens the model writes (tokenizer.special_ids) are left out of
    the text, as transformers' text-generation pipeline and vLLM leave them out; `stop` strings are found in the
    text shown (as vLLM finds them). continues=False: the text is one of its own (a chat answer), not the rest of
    the prompt's: the leading space of a SentencePiece tokenizer's first word is dropped, as its decode does."""
    stats = {} if stats is None else stats
    stats["tokens"] = 0
    eot = tokenizer.special_tokens.get("<|endoftext|>")
    stop_tokens = (*_token_ids(kw.pop("stop_tokens", ()), "stop_tokens"), *(() if eot is None else (eot,)))
    ends = set(stop_tokens)
    ids = tokenizer.encode_prompt(prompt) if isinstance(prompt, str) else prompt
    streamer, cutter = TextStreamer(tokenizer, skip_special_tokens, continues=continues), StopStrings(stop)
    for step in stream(model, ids, max_new_tokens, stop_tokens=stop_tokens, **kw):
        t = int(step[0])
        stats["tokens"] += 1
        if t < 0 or t in ends:
            break
        text, stopped = cutter.push(streamer.push(t))
        if text:
            yield text
        if stopped:
            return
    text, _ = cutter.push(streamer.flush())
    yield text + cutter.flush()
