"""The serving engine: continuous batching of many generation requests on one model.

One scheduler thread owns the model and one batched KV cache of `max_batch` rows ("slots") of `max_len`
tokens. Requests are queued by `submit` (any thread); at every step boundary the scheduler
  1. drops the sequences of cancelled requests (a client that went away frees its slot at once),
  2. admits waiting prompts into free slots (FIFO): each prompt is prefilled alone in its row, and its n
     choices are copies of that row (one prefill for n samples),
  3. samples one token for every sequence (just prefilled: from the prefill's logits, so its first token goes
     out at once; else from the batched decode of step 4) with that sequence's own SamplingParams and random
     generator, turns it into text (whole UTF-8 characters, stop strings held back) and hands the pieces to
     the request's `emit` callback, then retires finished sequences, moving the last active row into the hole
     (KVCacheBase.copy_row) so that the active rows stay 0 .. n-1,
  4. decodes the last token of all active sequences in one batched pass (KVCacheBase.decode_rows).
Multi-LoRA serving: a request may run with a LoRA adapter of the model (Request.lora, a fastllm.lora.Lora loaded
beside the model: fastllm.hf.load_adapter(model, path, attach=False)); requests with different adapters, or none,
share the cache and every decode pass. The rows of each adapter's sequences are kept adjacent -- a newcomer gets
a row at the end of its adapter's run, a leaver's hole is filled from the end of its run, and each run below
shifts by a row or so with copy_row -- so a pass computes the base model's matmuls once over all rows and each
adapter's two small products on a view of its own rows (fastllm.lora.LoraRuns: Punica's and S-LoRA's segmented
GEMM, with no gather or scatter). The adapter's rows compute what they compute in a model with only that adapter
(model.add_lora, fastllm.sample.generate), and the others what they compute without it.
Batching does not change the math of a row: every kernel computes a row the same way whatever the batch
(matmuls reduce each row in the same order; attention, layernorm and GELU are per row), prompts are prefilled
alone, and with bf16 weights decode passes are cut at KVCache.BF16_MAX_ROWS rows (the size above which the
cache switches to float32), so a seeded request gives the same tokens alone or in a batch -- the same as
`fastllm.sample.generate(model, prompt, n, seed=seed, ...)` for its first choice (with the request's adapter
attached to the model, if it has one).

The native kernels release the GIL, so the HTTP thread stays responsive while the scheduler runs the model.
Memory is bounded: the KV cache is allocated once (2 * n_layer * max_batch * max_len * n_kv_head * head_size floats), at
most `max_queue` requests wait beyond it (`QueueFull` after that).

>>> engine = Engine(model, tokenizer, max_batch=8).start()
>>> for events in engine.stream(Request(prompts=[tokenizer.encode("Hi")], max_tokens=20, seed=0)):
...     print("".join(e.text for e in events if isinstance(e, Chunk)), end="")
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from .. import get_num_threads, set_num_threads
from ..checkpoint import checkpoint_tokenizer, load_model
from ..grammar import Constraint
from ..lora import Lora
from ..model import kv_rows
from ..sample import SamplingParams, StopStrings, TextStreamer, sample_next


def load(ckpt, tokenizer=None, weights: str | None = None):
    """(model in eval mode, tokenizer) of a fastllm checkpoint folder (or run folder): the one place the
    server loads weights. tokenizer: a path overriding the copy inside the checkpoint; weights: hold the matrices in
    that decode form alone (checkpoint.load_model)."""
    model = load_model(ckpt, weights=weights).eval()
    return model, checkpoint_tokenizer(model.checkpoint_dir, tokenizer)


# ---- what goes in and what comes out ------------------------------------------------------------------


@dataclass
class TokenLogprob:
    """A token and its log-probability under the model (log-softmax of the raw logits, before temperature,
    penalties and filtering, as OpenAI reports them), with the `top` most likely alternatives; over the
    tokenizer's ids (the rows of a padded vocabulary beyond them are no tokens, never sampled)."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Chunk:
    """What one step produced for choice `index` (prompt p, sample i -> index p * n + i)."""

    index: int
    text: str  # new text: whole UTF-8 characters, never a piece of a stop string
    tokens: list[int]  # the token sampled (counted in usage, a terminating stop token included)
    # of the sampled tokens, a terminating stop token included (as vLLM's: its text is left out, its logprob is not)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (stop token or string) | "length" (max_tokens) when finished
    # vLLM's stop_reason: the stop string or the stop token id that ended it (None: the tokenizer's own EOS
    # (Request.eos_token_id), max_tokens, not finished)
    stop_reason: int | str | None = None


@dataclass
class PromptLogprobs:
    """Log-probabilities of prompt `prompt`'s tokens (None for the first, which has no context)."""

    prompt: int
    entries: list[TokenLogprob | None]


@dataclass
class Failure:
    """The request failed inside the engine (its other events stop here)."""

    message: str


@dataclass
class Request:
    """One API call: `n` samples of each prompt (token ids). `emit` receives the events of one step as a list
    (Chunk, PromptLogprobs, Failure), on the engine's thread; it must not block."""

    prompts: list[list[int]]
    max_tokens: int | list[int]  # per prompt, or one for all (0: nothing generated, e.g. prompt logprobs only)
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    seed: int | None = None  # choice 0 draws from default_rng(seed), choice i > 0 from default_rng([seed, i])
    stop: Sequence[str] = ()  # stop strings (not included in the text)
    stop_tokens: Sequence[int] = ()  # the model's EOS ids: they end a sequence (their text not included)
    # the one of stop_tokens that is the tokenizer's own EOS: it ends a choice with stop_reason None, the others
    # report their id, as vLLM's generation_config EOS ids do (SamplingParams.update_from_generation_config makes
    # them stop_token_ids); None: every stop token reports its id
    eos_token_id: int | None = None
    # vLLM's sampling extras: the client's own stop ids (stop_reason: the id), EOS ids that do not end a sequence
    # (they are sampled as any token), no EOS / stop id / stop string before min_tokens tokens (the EOS and stop
    # ids are masked out of the logits until then), and stop strings and stop tokens' text kept in the text
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; k >= 0: each sampled token's logprob and its k best alternatives
    prompt_logprobs: bool = False  # also the logprobs of the prompt tokens (one full forward per prompt)
    logit_bias: dict[int, float] | None = None  # added to the logits before sampling (OpenAI logit_bias)
    constraint: Constraint | None = None  # a grammar every choice's text must follow (fastllm.grammar)
    # the LoRA adapter it runs with (a fastllm.lora.Lora made for the engine's model, not attached to it), None: the
    # model alone; the request holds it, so one unloaded meanwhile (fastllm.serve.adapters) still serves it
    lora: Lora | None = None
    # the text leaves out special tokens (tokenizer.special_ids), as vLLM's does by default, except those named in
    # keep_special (the tags a tool-call or reasoning parser reads); stop strings are found in that text
    skip_special_tokens: bool = True
    keep_special: Sequence[str] = ()
    emit: Callable[[list], None] | None = None
    cancelled: bool = False


class QueueFull(RuntimeError):
    """More requests are waiting than the engine's max_queue."""


class EngineClosed(RuntimeError):
    """The engine is not running (not started, stopped, or its thread died)."""


# ---- the scheduler ------------------------------------------------------------------------------------


class _Seq:
    """One choice being generated: its row in the cache, tokens, random generator and text state."""

    def __init__(self, req: Request, index: int, prompt: list[int], max_tokens: int, tokenizer,
                 mask: np.ndarray | None, vocab: int):
        self.req, self.index, self.prompt, self.max_tokens = req, index, prompt, max_tokens
        i = index % req.n
        seed = req.seed if req.seed is None or i == 0 else [req.seed, i]
        self.rng = np.random.default_rng(seed)
        self.out: list[int] = []
        self.streamer = TextStreamer(tokenizer, req.skip_special_tokens, req.keep_special, continues=True)
        self.cutter = StopStrings(req.stop, req.include_stop_str_in_output)
        eos, self.stop_ids = frozenset(req.stop_tokens), frozenset(req.stop_token_ids)
        self.ends = frozenset() if req.ignore_eos else eos  # the EOS ids that end it (stop_reason None)
        # vLLM's min_tokens masks every EOS id (ignore_eos or not) and stop id until then; only those rows pay it
        early = [t for t in eos | self.stop_ids if t < vocab]
        self.early = np.array(sorted(early), np.int64) if req.min_tokens and early else None
        self.row = -1
        self.logits: np.ndarray | None = None
        self.bias = mask  # -inf on ids the tokenizer cannot decode, if the model has such ids
        self.n_vocab = tokenizer.n_vocab  # logprobs are over these ids (padding rows are no tokens)
        self.matcher = None if req.constraint is None else req.constraint.matcher()
        if req.logit_bias:
            self.bias = np.zeros(vocab, np.float32) if mask is None else mask.copy()
            for t, b in req.logit_bias.items():
                self.bias[t] += b

    def sample(self) -> int:
        sp = self.req.params
        logits = self.logits if self.bias is None else self.logits + self.bias
        early = self.early is not None and len(self.out) < self.req.min_tokens
        if early:  # min_tokens: no EOS or stop id yet
            logits = logits.copy() if logits is self.logits else logits  # (n choices share their prefill's row)
            logits[self.early] = -np.inf
        if self.matcher is not None:  # the grammar's next tokens only (none left: it ends here)
            allowed = self.matcher.allowed(len(logits))
            if early:
                allowed = allowed.copy()
                allowed[self.early] = False
            if not allowed.any():  # (the tokenizer's own EOS where it is a stop token)
                stops = self.req.stop_tokens
                return self.req.eos_token_id if self.req.eos_token_id in stops else min(stops)
            logits = np.where(allowed, logits, np.float32(-np.inf))
        history = [self.prompt + self.out] if sp.repetition_penalty != 1.0 else None
        output = [self.out] if sp.presence_penalty or sp.frequency_penalty else None
        return int(sample_next(logits[None], self.rng, sp, history, output)[0])

    def step(self, t: int) -> Chunk:
        """Record token t; the text it completes and whether the sequence is finished."""
        req = self.req
        self.out.append(t)
        eos = t in self.ends
        stop_id = not eos and t in self.stop_ids
        shown = not (eos or stop_id) or req.include_stop_str_in_output  # a stop token's text: vLLM's option
        if self.matcher is not None and not (eos or stop_id):
            self.matcher.accept(t)
        lps = [] if req.logprobs is None else [logprob_of(self.logits[:self.n_vocab], t, req.logprobs)]
        check = len(self.out) > req.min_tokens  # (vLLM: stop strings in the first min_tokens tokens' text are not)
        text, stopped = self.cutter.push(self.streamer.push(t) if shown else "", check)
        if stopped:
            return Chunk(self.index, text, [t], lps, "stop", self.cutter.hit)
        if eos or stop_id or len(self.out) >= self.max_tokens:
            more, stopped = self.cutter.push(self.streamer.flush(), check)
            reason = self.cutter.hit if stopped else t if stop_id or eos and t != req.eos_token_id else None
            return Chunk(self.index, text + more + self.cutter.flush(), [t], lps,
                         "stop" if stopped or eos or stop_id else "length", reason)
        return Chunk(self.index, text, [t], lps)


def logprob_of(logits: np.ndarray, token: int, top: int) -> TokenLogprob:
    """TokenLogprob of `token` under logits (V,), with the `top` most likely tokens (most likely first)."""
    z = logits.astype(np.float64)
    m = z.max()
    lp = z - (m + np.log(np.exp(z - m).sum()))
    best: list[tuple[int, float]] = []
    if top > 0:
        k = min(top, lp.size)
        idx = np.argpartition(-lp, k - 1)[:k]
        idx = idx[np.lexsort((idx, -lp[idx]))]
        best = [(int(i), float(lp[i])) for i in idx]
    return TokenLogprob(int(token), float(lp[token]), best)


def kv_slot_bytes(model, max_len: int) -> int:
    """Bytes of one KV cache slot: the keys and values of max_len tokens in every full layer, of a sliding layer's
    ring in the others (model.kv_rows)."""
    cfg, size = model.config, 2 if getattr(model, "act_dtype", "float32") == "bfloat16" else 4
    return 2 * sum(kv_rows(cfg, max_len)) * cfg.kv_heads * cfg.head_size * size


class Engine:
    """Continuous batching over one model (see the module doc). Thread-safe: submit / cancel / stats from any
    thread; the model is only touched by the engine's own thread."""

    def __init__(self, model, tokenizer, max_batch: int = 16, max_len: int | None = None, max_queue: int = 256,
                 weights: str = "float32", threads: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if tokenizer.n_vocab > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.n_vocab} ids but the model only {model.config.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        V = model.config.vocab_size  # rows of the lm-head beyond the tokenizer's ids (padding) are never sampled
        self.mask = None if tokenizer.n_vocab >= V else \
            np.where(np.arange(V) < tokenizer.n_vocab, 0.0, -np.inf).astype(np.float32)
        # OpenMP's thread count is per thread: the engine's thread sets its own (default: the creator's)
        self.threads = threads or get_num_threads()
        self.cache = model.kv_cache(max_batch, weights=weights, max_len=max_len)
        self.max_batch, self.max_len, self.max_queue = max_batch, self.cache.max_len, max_queue
        # CPU bf16 decode passes stop at the row count up to which the cache uses bf16 weights (see module doc)
        cpu_bf16 = weights == "bfloat16" and getattr(model, "device", "cpu") == "cpu"
        self.decode_rows = min(max_batch, self.cache.BF16_MAX_ROWS) if cpu_bf16 else max_batch
        self._waiting: collections.deque[tuple[Request, int]] = collections.deque()  # (request, prompt index)
        self._queued: dict[int, int] = {}  # id(request) -> prompts still waiting
        self._active: list[_Seq] = []  # row i holds _active[i]
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters = {"requests": 0, "tokens": 0, "steps": 0, "failures": 0}
        self.started_at = time.time()

    @property
    def kv_bytes(self) -> int:
        """Bytes of the KV cache (keys and values)."""
        return self.max_batch * kv_slot_bytes(self.model, self.max_len)

    # ---- control (any thread) ---------------------------------------------------------------------------

    def start(self) -> Engine:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._run, name="fastllm-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the scheduler; requests still waiting or running get a Failure."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def check(self, req: Request) -> None:
        """ValueError naming what is wrong with `req` for this engine (submit calls it)."""
        if not req.prompts:
            raise ValueError("no prompts")
        if not 1 <= req.n <= self.max_batch:
            raise ValueError(f"n={req.n} is more than the {self.max_batch} sequences this server decodes at once")
        maxes = req.max_tokens if isinstance(req.max_tokens, list) else [req.max_tokens] * len(req.prompts)
        if len(maxes) != len(req.prompts):
            raise ValueError(f"{len(maxes)} max_tokens for {len(req.prompts)} prompts")
        V = self.tokenizer.n_vocab  # (a padded vocabulary's extra rows are no tokens)
        for p, (ids, m) in enumerate(zip(req.prompts, maxes)):
            if not ids:
                raise ValueError(f"prompt {p} is empty")
            if min(ids) < 0 or max(ids) >= V:
                raise ValueError(f"prompt {p} holds token ids outside [0, {V})")
            if m < 0 or len(ids) + m > self.max_len:
                raise ValueError(f"prompt {p}: {len(ids)} tokens + max_tokens={m} do not fit the context of "
                                 f"{self.max_len} tokens")
        if req.logit_bias and any(not 0 <= t < V for t in req.logit_bias):
            raise ValueError(f"logit_bias holds token ids outside [0, {V})")
        if req.constraint is not None and not req.stop_tokens:
            raise ValueError("a constrained request needs stop tokens to end on")
        if req.stop_token_ids and any(not 0 <= t < V for t in req.stop_token_ids):
            raise ValueError(f"stop_token_ids holds token ids outside [0, {V})")
        if not 0 <= req.min_tokens <= min(maxes):
            raise ValueError(f"min_tokens={req.min_tokens} is not within [0, max_tokens={min(maxes)}]")
        if req.lora is not None and self.model.lora is not None:
            raise ValueError("a request's LoRA adapter needs a model without adapters of its own")
        if req.constraint is not None and req.ignore_eos:
            raise ValueError("a constrained request ends where its grammar ends: it cannot ignore EOS")
        req.max_tokens = maxes
        req.stop_tokens = frozenset(int(t) for t in req.stop_tokens)
        req.stop_token_ids = frozenset(int(t) for t in req.stop_token_ids)

    def submit(self, req: Request) -> Request:
        """Queue `req` (its events go to req.emit). QueueFull / EngineClosed / ValueError."""
        self.check(req)
        with self._cond:
            if not self.running:
                raise EngineClosed("the engine is not running")
            # what the free slots take at the next step does not wait; max_queue requests may wait beyond that
            if len(self._queued) >= self.max_queue + self.max_batch - len(self._active):
                raise QueueFull(f"{len(self._queued)} requests are waiting (max_queue={self.max_queue})")
            for p in range(len(req.prompts)):
                self._waiting.append((req, p))
            self._queued[id(req)] = len(req.prompts)
            self.counters["requests"] += 1
            self._cond.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Stop generating for `req`: its slots are freed at the next step boundary, no more events."""
        with self._cond:
            req.cancelled = True
            self._cond.notify_all()

    def stream(self, req: Request, timeout: float | None = None) -> Iterator[list]:
        """Submit req and yield its event lists until every choice has finished (a blocking convenience for
        scripts and tests; the HTTP server uses emit with its event loop instead)."""
        q: queue.Queue = queue.Queue()
        req.emit = q.put
        self.submit(req)
        left = len(req.prompts) * req.n
        try:
            while left:
                events = q.get(timeout=timeout)
                yield events
                for e in events:
                    if isinstance(e, Failure):
                        return
                    if isinstance(e, Chunk) and e.finish_reason is not None:
                        left -= 1
        finally:
            if left:
                self.cancel(req)

    def stats(self) -> dict:
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting), "slots": self.max_batch,
                    "max_len": self.max_len, "running": self.running, **self.counters,
                    "uptime_s": round(time.time() - self.started_at, 1)}

    # ---- the scheduler thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        set_num_threads(self.threads)
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._active:
                        self._cond.wait()
                    if self._stopping:
                        break
                self._drop_cancelled()
                with self._cond:
                    admit = self._take_admissible()
                try:
                    self._admit(admit)
                    if self._active:
                        self._step()
                except Exception as e:  # a bug or a bad state: fail the requests in flight, keep serving
                    self._fail_all(f"engine error: {type(e).__name__}: {e}", [r for r, _ in admit])
        finally:
            with self._cond:
                self._stopping = True
                pending = [r for r, _ in self._waiting] + [s.req for s in self._active]
                self._waiting.clear()
            self._fail_all("the server is shutting down", pending)

    def _take_admissible(self) -> list[tuple[Request, int]]:
        """(request, prompt) pairs that fit the free slots now, FIFO (a prompt with n choices waits for n)."""
        free, out = self.max_batch - len(self._active), []
        while self._waiting:
            req, p = self._waiting[0]
            if req.n > free and not req.cancelled:
                break
            self._waiting.popleft()
            self._dequeued(req)
            if not req.cancelled:
                out.append((req, p))
                free -= req.n
        return out

    def _dequeued(self, req: Request) -> None:
        left = self._queued.get(id(req), 1) - 1
        if left:
            self._queued[id(req)] = left
        else:
            self._queued.pop(id(req), None)

    def _drop_cancelled(self) -> None:
        for s in sorted((s for s in self._active if s.req.cancelled), key=lambda s: -s.row):
            self._retire(s)

    def _admit(self, admit: list[tuple[Request, int]]) -> None:
        V = self.model.config.vocab_size
        for req, p in admit:
            if req.cancelled:
                continue
            events: list = []
            prompt = list(req.prompts[p])
            if req.prompt_logprobs:  # (a full forward, with the request's adapter)
                with self.model.with_lora(req.lora) if req.lora is not None else contextlib.nullcontext():
                    logits = self.model.forward(np.asarray([prompt], np.int32))
                logits = logits[0, :, :self.tokenizer.n_vocab]  # (T, V)
                top = req.logprobs or 0
                entries = [None] + [logprob_of(logits[t - 1], prompt[t], top) for t in range(1, len(prompt))]
                events.append(PromptLogprobs(p, entries))
            if req.max_tokens[p] == 0:  # nothing to generate: no slot, every choice ends at once
                self._emit(req, events + [Chunk(p * req.n + i, "", [], finish_reason="length") for i in range(req.n)])
                continue
            seqs = [_Seq(req, p * req.n + i, prompt, req.max_tokens[p], self.tokenizer, self.mask, V)
                     for i in range(req.n)]
            first = self._open_rows(req.lora, len(seqs))
            for i, s in enumerate(seqs):
                s.row = first + i
                self._active[s.row] = s
            self.cache.reset_row(first)
            logits = self.cache.prefill_row(first, prompt, req.lora)
            for s in seqs:
                s.logits = logits
                if s.row != first:
                    self.cache.copy_row(first, s.row)
            if events:
                self._emit(req, events)
            self._sample(seqs)  # its first tokens go out now, not after the other admissions' prefills

    def _step(self) -> None:
        """Decode the last token of every active sequence in batched passes, then sample their next tokens."""
        tokens, loras = [s.out[-1] for s in self._active], [s.req.lora for s in self._active]
        for r0 in range(0, len(tokens), self.decode_rows):
            r1 = r0 + self.decode_rows
            logits = self.cache.decode_rows(tokens[r0:r1], r0, loras[r0:r1] if any(loras) else None)
            for i, row in enumerate(logits):
                self._active[r0 + i].logits = row
        self.counters["steps"] += 1
        self._sample(list(self._active))

    def _sample(self, seqs: list[_Seq]) -> None:
        """Sample a token for each of `seqs`, emit the pieces (one call per request), retire the finished."""
        by_req: dict[int, tuple[Request, list]] = {}
        done = []
        for s in seqs:
            chunk = s.step(s.sample())
            by_req.setdefault(id(s.req), (s.req, []))[1].append(chunk)
            if chunk.finish_reason is not None:
                done.append(s)
        self.counters["tokens"] += len(seqs)
        for req, events in by_req.values():
            self._emit(req, events)
        for s in sorted(done, key=lambda s: -s.row):
            self._retire(s)

    # The active rows are 0 .. n-1, and the rows of the sequences of one adapter (or of none) are one run of
    # adjacent rows (see the module doc). Rows within a run are in no order.

    def _run_end(self, row: int) -> int:
        """The row after the run that `row` is in."""
        rows, lora = self._active, self._active[row].req.lora
        while row < len(rows) and rows[row].req.lora is lora:
            row += 1
        return row

    def _move(self, s: _Seq, row: int) -> None:
        self.cache.copy_row(s.row, row)
        s.row, self._active[row] = row, s

    def _open_rows(self, lora: Lora | None, n: int) -> int:
        """The first of n free rows made at the end of `lora`'s run (a new run after the last, if it has none); the
        runs below move down by n rows, each moving its first min(n, length) sequences just past its end."""
        rows = self._active
        end = next((r + 1 for r in range(len(rows) - 1, -1, -1) if rows[r].req.lora is lora), len(rows))
        b = len(rows)
        rows += [None] * n  # (filled by the caller)
        while b > end:  # the runs below, from the last one up: [a, b) -> [a + n, b + n)
            a = b - 1
            while a > end and rows[a - 1].req.lora is rows[b - 1].req.lora:
                a -= 1
            for i in range(min(n, b - a)):
                self._move(rows[a + i], max(b, a + n) + i)
            b = a
        return end

    def _retire(self, s: _Seq) -> None:
        """Free s's row: the last sequence of its run moves into it, then the last of each run below into the hole
        just above that run, so the active rows stay 0 .. n-1 and each run adjacent rows."""
        rows, hole, end = self._active, s.row, self._run_end(s.row)
        while True:
            if end - 1 != hole:
                self._move(rows[end - 1], hole)
            hole = end - 1
            if end == len(rows):
                break
            end = self._run_end(end)
        rows.pop()
        self.cache.reset_row(len(rows))

    def _emit(self, req: Request, events: list) -> None:
        if req.cancelled or req.emit is None:
            return
        try:
            req.emit(events)
        except Exception:  # the receiver is gone (e.g. its event loop closed): stop generating for it
            req.cancelled = True

    def _fail_all(self, message: str, extra: list[Request]) -> None:
        reqs = {id(r): r for r in [s.req for s in self._active if s is not None] + extra}  # (None: a row being made)
        for i in range(len(self._active)):
            self.cache.reset_row(i)
        self._active.clear()
        self.counters["failures"] += len(reqs)
        for r in reqs.values():
            self._emit(r, [Failure(message)])
            r.cancelled = True
