"""`fastllm serve` throughput: requests/s, output tokens/s and time to first token with 1, 4 and 16 concurrent
streaming clients, against the same requests sent one at a time (1 client), and the library's own generate()
one request at a time in this process (no HTTP) for scale. The server runs in a subprocess with a random-weight
`small` model (6 layers, 384 wide, context 256, a 4096-token BPE vocabulary trained on Python's docs); each
request is a ~32-token prompt and exactly N new tokens (<|endoftext|> is masked with logit_bias), temperature
0.8, its own seed. Rounds are interleaved (1, 4, 16 clients, then again) and medians reported.
    python benchmarks/bench_serve.py [--threads 2] [--quick]"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from common import cli, header, load_note, print_table  # noqa: E402

import fastllm  # noqa: E402
from fastllm.model import GPT, GPTConfig  # noqa: E402


def make_checkpoint(d: Path):
    """A random-weight `small` GPT and a 4096-token BPE tokenizer, saved like a training run's checkpoint."""
    from fastllm.data import builtin_corpus
    from fastllm.optim import AdamW
    from fastllm.tokenizer import Tokenizer
    from fastllm.train import save_checkpoint

    docs = builtin_corpus()
    tok = Tokenizer.train(docs, 4096, special_tokens=("<|endoftext|>",), progress=False)
    tok.save(d / "tok.tiktoken")
    model = GPT(GPTConfig.preset("small", vocab_size=tok.n_vocab), seed=0)
    ckpt = save_checkpoint(d / "small", 0, model, AdamW(model, 1e-4), {"step": 0}, d / "tok.tiktoken")
    prompts = [tok.decode(tok.encode(doc)[:32]) for doc in docs[:64]]
    return ckpt, tok, prompts


async def one_request(client, url: str, body: dict) -> dict:
    """Stream one completion; time to first text, total time, output tokens (from the usage chunk)."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and ttft is None:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens}


async def run_clients(url: str, bodies: list[dict], clients: int) -> dict:
    """Send `bodies` with `clients` concurrent clients (each takes the next request when done)."""
    import httpx

    queue = list(reversed(bodies))
    results: list[dict] = []
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients)) as client:
        async def worker():
            while queue:
                results.append(await one_request(client, url + "/v1/completions", queue.pop()))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"wall": wall, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "ttft": [r["ttft"] for r in results], "latency": [r["latency"] for r in results]}


def in_process(ckpt: Path, tok, bodies: list[dict]) -> dict:
    """The same requests through fastllm.sample.generate, one at a time, no HTTP (this process)."""
    from fastllm.sample import generate
    from fastllm.train import load_model

    model = load_model(ckpt).eval()
    t0 = time.perf_counter()
    tokens = 0
    for b in bodies:
        ids = tok.encode(b["prompt"])
        out = generate(model, ids, b["max_tokens"], temperature=b["temperature"], seed=b["seed"])
        tokens += len(out) - len(ids)
    wall = time.perf_counter() - t0
    return {"wall": wall, "requests": len(bodies), "tokens": tokens, "ttft": [], "latency": []}


def run(threads: int, quick: bool) -> None:
    from serve_process import Server

    fastllm.set_num_threads(threads)
    n_requests, new_tokens, rounds = (16, 48, 2) if quick else (32, 128, 3)
    levels = (1, 4, 16)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, tok, prompts = make_checkpoint(Path(tmp))
        eot = tok.special_tokens["<|endoftext|>"]
        model_id = "small/ckpt_000000"
        bodies = [{"model": model_id, "prompt": prompts[i % len(prompts)], "max_tokens": new_tokens,
                   "temperature": 0.8, "seed": i, "stream": True, "stream_options": {"include_usage": True},
                   "logit_bias": {str(eot): -100}} for i in range(n_requests)]
        server = Server(ckpt, "--max-batch", "16", threads=threads)
        try:
            print(header(f"fastllm serve: {n_requests} requests x {new_tokens} new tokens, small model (6L-384, "
                         f"V={tok.n_vocab}), --max-batch 16", threads))
            asyncio.run(run_clients(server.url, bodies[:4], 4))  # warm-up
            runs: dict[str, list[dict]] = {str(c): [] for c in levels}
            runs["generate"] = []
            loads = []
            for r in range(rounds):
                for c in levels:
                    runs[str(c)].append(asyncio.run(run_clients(server.url, bodies, c)))
                    loads.append(load_note())
                runs["generate"].append(in_process(ckpt, tok, [{**b, "stream": False} for b in bodies]))
                print(f"round {r + 1}: " + ", ".join(f"{k}: {v[-1]['tokens'] / v[-1]['wall']:,.0f} tok/s"
                                                     for k, v in runs.items()) + f" ({loads[-1]})", flush=True)
        finally:
            server.stop()

    def median(key: str, f) -> float:
        return statistics.median(f(r) for r in runs[key])

    base = median("1", lambda r: r["tokens"] / r["wall"])
    rows = []
    for key in ["generate", *map(str, levels)]:
        tps = median(key, lambda r: r["tokens"] / r["wall"])
        rps = median(key, lambda r: r["requests"] / r["wall"])
        ttft = [t for r in runs[key] for t in r["ttft"]]
        lat = [t for r in runs[key] for t in r["latency"]]
        q = (lambda xs, p: sorted(xs)[int(p * (len(xs) - 1))]) if ttft else None
        label = "generate() in process, 1 at a time" if key == "generate" else \
            f"{key} client{'s' if key != '1' else ''}" + (" (one at a time)" if key == "1" else "")
        rows.append([label, f"{rps:.2f}", f"{tps:,.0f}", f"{tps / base:.2f}x",
                     f"{q(ttft, 0.5) * 1e3:.0f}" if q else "-", f"{q(ttft, 0.9) * 1e3:.0f}" if q else "-",
                     f"{q(lat, 0.5):.2f}" if q else "-"])
    print_table(rows, ["clients", "req/s", "out tok/s", "vs 1 at a time", "TTFT p50 ms", "TTFT p90 ms",
                       "latency p50 s"])
    print(f"({rounds} interleaved rounds, medians; load during the rounds: {', '.join(loads)})")


if __name__ == "__main__":
    cli(run, __doc__)
