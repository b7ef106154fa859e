"""`fastllm demo`: the whole pre-training pipeline in a few minutes on the embedded corpus (Python's own
documentation topics, `pydoc_data.topics`, shipped with every Python -- no download):
train a BPE tokenizer -> tokenize into shards -> train a small GPT -> compare with the unigram entropy -> sample.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import load_model
from .data import builtin_corpus, prepare, read_shard
from .sample import generate
from .tokenizer import Tokenizer
from .train import TrainConfig, train


@dataclass
class DemoConfig:
    out: str = "fastllm-demo"  # everything goes here: tokenizer, data/, run/ (checkpoints, log, loss.png)
    vocab_size: int = 4096
    model: str = "mini"  # preset: 4 layers, 4 heads, 128 channels
    seq_len: int = 128
    batch_size: int = 16
    max_steps: int = 800
    lr: float = 2e-3
    threads: int | None = None
    seed: int = 1337
    prompt: str = "The"
    sample_tokens: int = 120


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the token frequency distribution: the loss of the best model that ignores context."""
    counts = np.bincount(np.asarray(tokens, np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    docs = builtin_corpus()
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"[1/4] tokenizer: byte-level BPE, vocab {cfg.vocab_size}, on {len(docs)} pydoc topics "
          f"({n_bytes / 1e6:.2f} MB)")
    tok = Tokenizer.train(docs, cfg.vocab_size, pattern="gpt4", special_tokens=["<|endoftext|>"], progress=progress)
    tok_path = out / "tokenizer.tiktoken"
    tok.save(tok_path)
    print(f"      saved {tok_path} ({time.time() - t0:.1f}s)")

    print("[2/4] data: tokenizing into train/val shards")
    stats = prepare(None, tok_path, out / "data", val_fraction=0.1, progress=progress)
    train_tokens = np.concatenate([read_shard(p) for p in sorted((out / "data").glob("train_*.bin"))])
    h1 = unigram_entropy(train_tokens)
    print(f"      {stats.train_tokens:,} train / {stats.val_tokens:,} val tokens "
          f"({n_bytes / max(stats.train_tokens + stats.val_tokens, 1):.2f} bytes/token); "
          f"unigram entropy {h1:.3f} nats")

    print(f"[3/4] training a '{cfg.model}' GPT for {cfg.max_steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens")
    tcfg = TrainConfig(data=str(out / "data"), out=str(out / "run"), model=cfg.model, batch_size=cfg.batch_size,
                       seq_len=cfg.seq_len, max_steps=cfg.max_steps, lr=cfg.lr, warmup_steps=30,
                       eval_every=100, eval_batches=10, ckpt_every=200, sample_every=0, threads=cfg.threads,
                       seed=cfg.seed)
    s = train(tcfg, progress=progress)
    print(f"      loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}; val loss {s['val_loss']:.3f} vs unigram "
          f"entropy {h1:.3f} nats ({s['tok_per_s']:,.0f} tok/s)")

    print("[4/4] sample (temperature 0.8, top-k 40):")
    model = load_model(out / "run")
    ids = generate(model, tok.encode_ordinary(cfg.prompt), cfg.sample_tokens, temperature=0.8, top_k=40,
                   seed=cfg.seed)
    print("-" * 80)
    print(tok.decode(ids))
    print("-" * 80)
    summary = {**s, "unigram_entropy": h1, "tokenizer": str(tok_path), "data": str(out / "data"),
               "total_seconds": time.time() - t0}
    print(f"outputs in {out}/: tokenizer {tok_path.name}, data/ (shards), run/ (checkpoints, log.jsonl, loss.png)")
    print(f"try: fastllm sample --ckpt {out / 'run'} --prompt \"The\"      (total {summary['total_seconds']:.0f}s)")
    return summary
