"""Constrained decoding's cost: the serving engine's output tokens/s with a JSON schema (fastllm.grammar on
llguidance: a token mask every step) against the same engine decoding freely, one request at a time and 16 at
once, and the mask's own time per token. A random-weight `small` model (6 layers, 384 wide) over a ~32k-token
BPE vocabulary trained on Python's docs (the mask's cost grows with the vocabulary); each request is a 32-token
prompt and at most N new tokens, temperature 0.8, its own seed; constrained ones end when their JSON is complete,
and each free request (its stop tokens masked) makes exactly as many tokens as the constrained one of its seed,
so both keep the same rows busy for the same steps. Rounds are interleaved, medians reported.
    python benchmarks/bench_grammar.py [--threads 2] [--quick]"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import cli, header, load_note, print_table  # noqa: E402

import fastllm  # noqa: E402
from fastllm.model import GPT, GPTConfig  # noqa: E402

SCHEMA = {  # a typical extraction schema: bounded strings, numbers, an enum array, a nested object
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,12}@[a-z]{1,12}\\.(com|org|net)$"},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest", "bot"]}, "maxItems": 4},
        "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
    },
    "required": ["name", "age", "email", "tags", "address"], "additionalProperties": False,
}


def requests(tok, prompts, new_tokens: list[int], constraint):
    """One request per prompt; free ones (constraint None) cannot stop, so they make exactly new_tokens[i]."""
    from fastllm.sample import SamplingParams
    from fastllm.serve import Request

    eot, end = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|im_end|>"]
    return [Request(prompts=[p], max_tokens=n, seed=i, params=SamplingParams(temperature=0.8),
                    stop_tokens=[end], constraint=constraint,
                    logit_bias=None if constraint else {eot: -100.0, end: -100.0})
            for i, (p, n) in enumerate(zip(prompts, new_tokens))]


def run_engine(engine, reqs, at_once: bool) -> tuple[float, list[int]]:
    """(seconds, tokens of each request) to serve `reqs` one at a time or all submitted at once."""
    tokens = [0] * len(reqs)

    def one(i: int) -> None:
        tokens[i] = sum(len(e.tokens) for events in engine.stream(reqs[i]) for e in events)

    t0 = time.perf_counter()
    if at_once:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(reqs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i in range(len(reqs)):
            one(i)
    return time.perf_counter() - t0, tokens


def mask_times(constraint, tok, n: int) -> list[float]:
    """Seconds per step of allowed() + accept() along n random walks through the grammar."""
    import numpy as np

    rng, out = np.random.default_rng(0), []
    end = tok.special_tokens["<|im_end|>"]
    for _ in range(n):
        m = constraint.matcher()
        for _ in range(200):
            t0 = time.perf_counter()
            allowed = m.allowed(tok.n_vocab)
            t = int(rng.choice(np.flatnonzero(allowed)))
            if t != end:
                m.accept(t)
            out.append(time.perf_counter() - t0)
            if t == end:
                break
    return out


def run(threads: int, quick: bool) -> None:
    from fastllm.data import builtin_corpus
    from fastllm.grammar import Guide
    from fastllm.serve import Engine
    from fastllm.tokenizer import Tokenizer

    fastllm.set_num_threads(threads)
    n_requests, new_tokens, rounds = (8, 48, 2) if quick else (16, 128, 3)
    docs = builtin_corpus()
    tok = Tokenizer.train(docs, 32768, special_tokens=("<|endoftext|>", "<|im_start|>", "<|im_end|>"), progress=False)
    model = GPT(GPTConfig.preset("small", vocab_size=tok.n_vocab), seed=0).eval()
    prompts = [tok.encode(doc)[:32].tolist() for doc in docs[:n_requests]]
    t0 = time.perf_counter()
    guide = Guide(tok, [tok.special_tokens["<|im_end|>"]])
    t_guide = time.perf_counter() - t0
    t0 = time.perf_counter()
    constraint = guide.json_schema(SCHEMA)
    t_compile = time.perf_counter() - t0
    engine = Engine(model, tok, max_batch=16, threads=threads).start()
    print(header(f"constrained decoding: {n_requests} requests x <= {new_tokens} new tokens, small model (6L-384, "
                 f"V={tok.n_vocab}), Engine with 16 slots", threads))
    runs: dict[tuple[str, bool], list[float]] = {}
    loads = []
    try:
        # the constrained answers' lengths (seeded, so the same every round): the free requests make as many
        # tokens each, so both keep the same rows busy for the same steps
        _, lengths = run_engine(engine, requests(tok, prompts, [new_tokens] * n_requests, constraint), True)
        for r in range(rounds):
            for at_once in (False, True):
                for mode in ("free", "json schema"):
                    reqs = requests(tok, prompts, lengths, constraint if mode == "json schema" else None)
                    wall, tokens = run_engine(engine, reqs, at_once)
                    assert tokens == lengths, (mode, tokens, lengths)
                    runs.setdefault((mode, at_once), []).append(sum(tokens) / wall)
            loads.append(load_note())
            print(f"round {r + 1}: " + ", ".join(f"{m} {'16 at once' if a else '1 at a time'}: {v[-1]:,.0f} tok/s"
                                                 for (m, a), v in runs.items()) + f" ({loads[-1]})", flush=True)
    finally:
        engine.stop()
    rows = []
    for mode in ("free", "json schema"):
        row = [mode]
        for at_once in (False, True):
            tps = statistics.median(runs[(mode, at_once)])
            free = statistics.median(runs[("free", at_once)])
            row += [f"{tps:,.0f}", f"{tps / free:.2f}x"]
        rows.append(row)
    print_table(rows, ["decoding", "1 at a time tok/s", "vs free", "16 at once tok/s", "vs free"])
    steps = sorted(mask_times(constraint, tok, 4 if quick else 16))
    print(f"mask + advance per token: median {statistics.median(steps) * 1e6:.0f} us, p90 "
          f"{steps[int(0.9 * (len(steps) - 1))] * 1e6:.0f} us over {len(steps)} steps (V={tok.n_vocab}); "
          f"tokenizer setup {t_guide * 1e3:.0f} ms (once per server), schema compile {t_compile * 1e3:.1f} ms")
    print(f"({rounds} interleaved rounds, medians; load: {', '.join(loads)})")


if __name__ == "__main__":
    cli(run, __doc__)
