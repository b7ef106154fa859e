"""`fastllm demo`: the whole pre-training pipeline in about two minutes on 2 CPU cores, on the built-in
corpus (Python's own documentation: the pydoc topics and the standard library's docstrings, ~2 MB of English
that ships with every Python -- no download; see fastllm.corpus):
train a BPE tokenizer -> tokenize into train/val shards -> train a small Llama-style GPT -> compare train and
validation loss with the unigram entropy, bits per byte of the validation text -> sample.

The schedule is sized so the model sees the training split about 3 times: validation loss follows training
loss (the gap is printed) instead of the model memorising a small corpus.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import load_model
from .data import DataLoader, PrepareStats, builtin_corpus, prepare, read_shard
from .eval import evaluate
from .options import SEED, THREADS, option
from .sample import generate
from .tokenizer import Tokenizer
from .train import TrainConfig, mean_loss, train

EVAL_BATCHES = 32  # batches of B x T tokens per loss evaluation (the whole validation split of the built-in corpus)


@dataclass
class DemoConfig:
    out: str = option("fastllm-demo", "output folder: tokenizer, data/ (shards), run/ (checkpoints, log.jsonl, "
                                      "loss.png)")
    vocab_size: int = option(4096, "BPE vocabulary size in tokens")
    model: str = option("nano", "GPT size preset (nano: Llama-style, RoPE, RMSNorm, SwiGLU, 2 KV heads of 4, 4 layers, "
                                "128 channels, 1.26M parameters; mini: its GPT-2-style twin, 0.41 nats behind at "
                                "equal time: benchmarks/RESULTS.md)")
    seq_len: int = option(128, "T: tokens per training sequence")
    batch_size: int = option(16, "B: sequences per step")
    max_steps: int = option(800, "optimizer steps (B x T tokens each)")
    lr: float = option(2e-3, "peak learning rate (warmup, then cosine decay to lr / 10)")
    warmup_steps: int = option(60, "steps of linear learning-rate warmup")
    val_fraction: float = option(0.1, "fraction of documents held out for validation")
    threads: int | None = option(None, THREADS)
    seed: int = option(1337, SEED)
    prompt: str = option("The", "text the final sample continues")
    sample_tokens: int = option(120, "tokens in the final sample")


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the token frequency distribution: the loss of the best model that ignores context."""
    counts = np.bincount(np.asarray(tokens, np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def demo_data(
    out: Path, vocab_size: int, val_fraction: float, progress: bool = True
) -> tuple[Tokenizer, Path, Path, PrepareStats, int]:
    """Steps 1-2 of the demo: a BPE tokenizer trained on the built-in corpus (out/tokenizer.tiktoken) and the
    corpus tokenized into out/data/ train/val shards. -> (tokenizer, its path, the data folder, the shards' stats,
    the corpus's size in bytes). benchmarks/bench_train.py --race uses it too."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    docs = builtin_corpus()
    n_bytes = sum(len(d.encode()) for d in docs)
    print(f"[1/4] tokenizer: byte-level BPE, vocab {vocab_size}, on Python's documentation: {len(docs)} "
          f"documents (pydoc topics, standard-library docstrings), {n_bytes / 1e6:.2f} MB")
    tok = Tokenizer.train(docs, vocab_size, pattern="gpt4", special_tokens=["<|endoftext|>"], progress=progress)
    tok_path = out / "tokenizer.tiktoken"
    tok.save(tok_path)
    print(f"      saved {tok_path} ({time.time() - t0:.1f}s)")

    print("[2/4] data: tokenizing into train/val shards")
    data = out / "data"
    stats = prepare(None, tok_path, data, val_fraction=val_fraction, progress=progress)
    return tok, tok_path, data, stats, n_bytes


def train_config(cfg: DemoConfig, data: Path, run: Path) -> TrainConfig:
    """Step 3's training run: cfg's model and schedule on the shards in `data`, checkpoints in `run`."""
    return TrainConfig(data=str(data), out=str(run), model=cfg.model, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                       max_steps=cfg.max_steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, eval_every=100,
                       eval_batches=EVAL_BATCHES, ckpt_every=max(cfg.max_steps // 4, 1), sample_every=0,
                       threads=cfg.threads, seed=cfg.seed)


def final_losses(model, cfg: DemoConfig, data: Path) -> tuple[float, float]:
    """(train, validation) mean loss of the trained model: EVAL_BATCHES random training batches, and the
    validation split from its start (all of it for the built-in corpus)."""
    train_loss = mean_loss(model, DataLoader(data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed + 1),
                           EVAL_BATCHES)
    val_loss = mean_loss(model, DataLoader(data, "val", cfg.batch_size, cfg.seq_len, shuffle=False), EVAL_BATCHES)
    return train_loss, val_loss


def run_demo(cfg: DemoConfig, progress: bool = True) -> dict:
    out = Path(cfg.out)
    t0 = time.time()
    tok, tok_path, data, stats, n_bytes = demo_data(out, cfg.vocab_size, cfg.val_fraction, progress)
    train_tokens = np.concatenate([read_shard(p) for p in sorted(data.glob("train_*.bin"))])
    h1 = unigram_entropy(train_tokens)
    seen = cfg.max_steps * cfg.batch_size * cfg.seq_len
    print(f"      {stats.train_tokens:,} train / {stats.val_tokens:,} validation tokens "
          f"({n_bytes / max(stats.train_tokens + stats.val_tokens, 1):.2f} bytes/token); "
          f"unigram entropy {h1:.3f} nats")

    print(f"[3/4] training a '{cfg.model}' GPT for {cfg.max_steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens "
          f"({seen / max(stats.train_tokens, 1):.1f} passes over the training split)")
    s = train(train_config(cfg, data, out / "run"), progress=progress)
    model = load_model(out / "run")
    train_loss, val_loss = final_losses(model, cfg, data)
    bpb = evaluate(model, tok, "bpb", data=str(data))["metrics"]  # all of the val shards, sliding windows
    print(f"      train loss {train_loss:.3f}, validation loss {val_loss:.3f} nats/token (gap "
          f"{val_loss - train_loss:.3f}); unigram entropy {h1:.3f}; {s['tok_per_s']:,.0f} tok/s")
    print(f"      validation: {bpb['bpb']:.3f} bits per byte ({bpb['nats_per_token']:.3f} nats per token, "
          f"{bpb['bytes_per_token']:.2f} bytes per token; fastllm eval --task bpb)")

    print("[4/4] sample (temperature 0.8, top-k 40):")
    ids = generate(model, tok.encode_ordinary(cfg.prompt), cfg.sample_tokens, temperature=0.8, top_k=40,
                   seed=cfg.seed)
    print("-" * 80)
    print(tok.decode(ids))
    print("-" * 80)
    summary = {**s, "train_loss": train_loss, "val_loss": val_loss, "unigram_entropy": h1, "val_bpb": bpb["bpb"],
               "tokenizer": str(tok_path), "data": str(data), "total_seconds": time.time() - t0}
    print(f"outputs in {out}/: tokenizer {tok_path.name}, data/ (shards), run/ (checkpoints, log.jsonl, loss.png)")
    print(f"try: fastllm sample --ckpt {out / 'run'} --prompt \"The\"      (total {summary['total_seconds']:.0f}s)")
    return summary
