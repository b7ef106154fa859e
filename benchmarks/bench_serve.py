"""`fastllm serve` throughput: requests/s, output tokens/s and time to first token with 1, 4 and 16 concurrent
streaming clients, against the same requests sent one at a time (1 client), and the library's own generate()
one request at a time in this process (no HTTP) for scale. The server runs in a subprocess with a random-weight
`small` model (6 layers, 384 wide, context 256, a 4096-token BPE vocabulary trained on Python's docs); each
request is a ~32-token prompt and exactly N new tokens (<|endoftext|> is masked with logit_bias), temperature
0.8, its own seed. Without HTTP, for scale: the same requests through fastllm.sample.generate one at a time, and
all at once through a fastllm.serve Engine (16 slots) in this process. Rounds are interleaved (1, 4, 16
clients, generate, Engine, then again) and medians reported. --dtype: the weights decoding streams, for all three
(`fastllm serve --dtype`: float32, bfloat16, int8 or w8a8).
--loras N: multi-LoRA serving instead (`fastllm serve --lora-modules`, N random rank-16 adapters on every
projection): 16 clients all on the base model, all on one adapter, and spread over the N adapters (request i on
adapter i % N: every decode pass mixes them), from one server; the baseline is fastllm's own base-model throughput.
    python benchmarks/bench_serve.py [--threads 2] [--quick] [--dtype float32] [--loras 4]"""

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
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))  # serve_process: the server subprocess

from common import cli, header, load_note, print_table  # noqa: E402

import fastllm  # noqa: E402
from fastllm.model import GPT, GPTConfig  # noqa: E402


def make_checkpoint(d: Path):
    """A random-weight `small` GPT and a 4096-token BPE tokenizer, saved like a training run's checkpoint."""
    from fastllm.checkpoint import save
    from fastllm.data import builtin_corpus
    from fastllm.optim import AdamW
    from fastllm.tokenizer import Tokenizer

    docs = builtin_corpus()
    tok = Tokenizer.train(docs, 4096, special_tokens=("<|endoftext|>",), progress=False)
    tok.save(d / "tok.tiktoken")
    model = GPT(GPTConfig.preset("small", vocab_size=tok.n_vocab), seed=0)
    ckpt = save(d / "small", 0, model, AdamW(model, 1e-4), {}, kind="train", tokenizer=d / "tok.tiktoken")
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


def in_process(model, tok, bodies: list[dict], engine=None, dtype: str = "float32") -> dict:
    """The same requests without HTTP, in this process: through fastllm.sample.generate one at a time, or (engine
    given) all submitted at once to a fastllm.serve Engine (16 slots, the rest queued)."""
    import threading

    from fastllm.sample import SamplingParams, generate
    from fastllm.serve import Request

    prompts = [tok.encode(b["prompt"]).tolist() for b in bodies]
    eot = tok.special_tokens["<|endoftext|>"]
    t0 = time.perf_counter()
    tokens = [0] * len(bodies)

    def one(i: int, b: dict) -> None:
        if engine is None:
            out = generate(model, prompts[i], b["max_tokens"], temperature=b["temperature"], seed=b["seed"],
                           weights=dtype)
            tokens[i] = len(out) - len(prompts[i])
            return
        req = Request(prompts=[prompts[i]], max_tokens=b["max_tokens"], seed=b["seed"],
                      params=SamplingParams(temperature=b["temperature"]), logit_bias={eot: -100.0})
        tokens[i] = sum(len(e.tokens) for events in engine.stream(req) for e in events)

    if engine is None:
        for i, b in enumerate(bodies):
            one(i, b)
    else:
        threads = [threading.Thread(target=one, args=(i, b)) for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    return {"wall": wall, "requests": len(bodies), "tokens": sum(tokens), "ttft": [], "latency": []}


def make_adapters(ckpt: Path, d: Path, n: int, rank: int = 16) -> list[Path]:
    """n PEFT adapter folders of rank `rank` on every projection of the checkpoint's model, B random (nonzero)."""
    import numpy as np

    from fastllm import hf
    from fastllm.checkpoint import load_model

    out = []
    for i in range(n):
        model = load_model(ckpt)
        lora = model.add_lora(r=rank, alpha=2 * rank, seed=i)
        for name, v in lora.p.items():
            if name.endswith("lora_B"):
                v[...] = np.random.default_rng(i).normal(0, 0.02, v.shape)
        out.append(hf.save_adapter(model, d / f"adapter{i}"))
    return out


def run_loras(threads: int, quick: bool, dtype: str, loras: int) -> None:
    """16 clients on the base model, on one adapter, and spread over `loras` adapters, from one server."""
    from serve_process import Server

    n_requests, new_tokens, rounds = (16, 48, 2) if quick else (32, 128, 3)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, tok, prompts = make_checkpoint(Path(tmp))
        paths = make_adapters(ckpt, Path(tmp), loras)
        eot = tok.special_tokens["<|endoftext|>"]
        models = {"base model": lambda i: "small/ckpt_000000", "1 adapter": lambda i: "a0",
                  f"{loras} adapters": lambda i: f"a{i % loras}"}
        bodies = {label: [{"model": pick(i), "prompt": prompts[i % len(prompts)], "max_tokens": new_tokens,
                           "temperature": 0.8, "seed": i, "stream": True, "stream_options": {"include_usage": True},
                           "logit_bias": {str(eot): -100}} for i in range(n_requests)]
                  for label, pick in models.items()}
        server = Server(ckpt, "--max-batch", "16", "--dtype", dtype, "--lora-modules",
                        *(f"a{i}={p}" for i, p in enumerate(paths)), threads=threads)
        try:
            print(header(f"fastllm serve --lora-modules: {n_requests} requests x {new_tokens} new tokens, 16 clients, "
                         f"small model (6L-384, V={tok.n_vocab}), {loras} adapters of rank 16 on every projection, "
                         f"--dtype {dtype}", threads))
            asyncio.run(run_clients(server.url, bodies[f"{loras} adapters"][:4], 4))  # warm-up
            runs: dict[str, list[dict]] = {label: [] for label in bodies}
            loads = []
            for r in range(rounds):
                for label, b in bodies.items():
                    runs[label].append(asyncio.run(run_clients(server.url, b, 16)))
                loads.append(load_note())
                print(f"round {r + 1}: " + ", ".join(f"{k}: {v[-1]['tokens'] / v[-1]['wall']:,.0f} tok/s"
                                                     for k, v in runs.items()) + f" ({loads[-1]})", flush=True)
        finally:
            server.stop()
    base = statistics.median(r["tokens"] / r["wall"] for r in runs["base model"])
    rows = []
    for label, rs in runs.items():
        tps = statistics.median(r["tokens"] / r["wall"] for r in rs)
        ttft = sorted(t for r in rs for t in r["ttft"])
        rows.append([label, f"{statistics.median(r['requests'] / r['wall'] for r in rs):.2f}", f"{tps:,.0f}",
                     f"{tps / base:.2f}x", f"{ttft[len(ttft) // 2] * 1e3:.0f}"])
    print_table(rows, ["16 clients on", "req/s", "out tok/s", "vs base model", "TTFT p50 ms"])
    print(f"({rounds} interleaved rounds, medians; load during the rounds: {', '.join(loads)})")


def run(threads: int, quick: bool, dtype: str = "float32", loras: int = 0) -> None:
    from serve_process import Server

    from fastllm.checkpoint import load_model
    from fastllm.serve import Engine

    fastllm.set_num_threads(threads)
    if loras:
        return run_loras(threads, quick, dtype, loras)
    n_requests, new_tokens, rounds = (16, 48, 2) if quick else (32, 128, 3)
    levels = (1, 4, 16)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, tok, prompts = make_checkpoint(Path(tmp))
        eot = tok.special_tokens["<|endoftext|>"]
        model_id = "small/ckpt_000000"
        bodies = [{"model": model_id, "prompt": prompts[i % len(prompts)], "max_tokens": new_tokens,
                   "temperature": 0.8, "seed": i, "stream": True, "stream_options": {"include_usage": True},
                   "logit_bias": {str(eot): -100}} for i in range(n_requests)]
        model = load_model(ckpt).eval()
        snapshot = model.decode_weights(dtype) or "float32"  # taken once, as the server does
        engine = Engine(model, tok, max_batch=16, threads=threads, weights=dtype).start()
        server = Server(ckpt, "--max-batch", "16", "--dtype", dtype, threads=threads)
        try:
            print(header(f"fastllm serve: {n_requests} requests x {new_tokens} new tokens, small model (6L-384, "
                         f"V={tok.n_vocab}), --max-batch 16, --dtype {dtype}", threads))
            asyncio.run(run_clients(server.url, bodies[:4], 4))  # warm-up
            runs: dict[str, list[dict]] = {str(c): [] for c in levels}
            runs["generate"], runs["engine"] = [], []
            loads = []
            for r in range(rounds):
                for c in levels:
                    runs[str(c)].append(asyncio.run(run_clients(server.url, bodies, c)))
                    loads.append(load_note())
                runs["generate"].append(in_process(model, tok, bodies, dtype=snapshot))
                runs["engine"].append(in_process(model, tok, bodies, engine))
                print(f"round {r + 1}: " + ", ".join(f"{k}: {v[-1]['tokens'] / v[-1]['wall']:,.0f} tok/s"
                                                     for k, v in runs.items()) + f" ({loads[-1]})", flush=True)
        finally:
            server.stop()
            engine.stop()

    def median(key: str, f) -> float:
        return statistics.median(f(r) for r in runs[key])

    base = median("1", lambda r: r["tokens"] / r["wall"])
    rows = []
    for key in ["generate", "engine", *map(str, levels)]:
        tps = median(key, lambda r: r["tokens"] / r["wall"])
        rps = median(key, lambda r: r["requests"] / r["wall"])
        ttft = [t for r in runs[key] for t in r["ttft"]]
        lat = [t for r in runs[key] for t in r["latency"]]
        q = (lambda xs, p: sorted(xs)[int(p * (len(xs) - 1))]) if ttft else None
        label = {"generate": "generate() in process, 1 at a time", "engine": "Engine in process, all at once",
                 "1": "1 client (one at a time)"}.get(key, f"{key} clients")
        rows.append([label, f"{rps:.2f}", f"{tps:,.0f}", f"{tps / base:.2f}x",
                     f"{q(ttft, 0.5) * 1e3:.0f}" if q else "-", f"{q(ttft, 0.9) * 1e3:.0f}" if q else "-",
                     f"{q(lat, 0.5):.2f}" if q else "-"])
    print_table(rows, ["clients", "req/s", "out tok/s", "vs 1 at a time", "TTFT p50 ms", "TTFT p90 ms",
                       "latency p50 s"])
    print(f"({rounds} interleaved rounds, medians; load during the rounds: {', '.join(loads)})")


if __name__ == "__main__":
    cli(run, __doc__, dtype=("the weights decoding streams", "float32", "float32", "bfloat16", "int8", "w8a8"),
        loras=("multi-LoRA serving with this many adapters (0: the usual client levels)", 0))
