"""BPE on pathological text -- long runs of one character and long lines without spaces, each a single chunk of
the pre-tokenizer -- against HF tokenizers' BpeTrainer and tiktoken, in one process:
    python benchmarks/bench_bpe_long.py [--threads N] [--quick]
Per input: training time (fastllm vs HF BpeTrainer, same vocabulary size, GPT-4 pattern, full byte alphabet),
then for the run of one character, building the tokenizer from the trained ranks (fastllm's Tokenizer(ranks),
which precomputes every split of every token into two tokens, vs tiktoken.Encoding) and encoding the text.
Sizes double, so near-linear code doubles its time and quadratic code quadruples it; a provider whose
previous size took over --budget seconds is skipped at the larger sizes ("-")."""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def hf_trainer(vocab: int):
    """HF's BpeTrainer set up like fastllm's training (GPT-4 pattern, byte-level alphabet, no specials)."""
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    from fastllm.tokenizer import GPT4_PATTERN, _to_hf_regex

    tok = tokenizers.Tokenizer(models.BPE())
    split = pre_tokenizers.Split(tokenizers.Regex(_to_hf_regex(GPT4_PATTERN)), "isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return lambda text: tok.train_from_iterator([text], trainer=trainer)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smaller inputs")
    p.add_argument("--budget", type=float, default=30.0, help="seconds after which a provider stops growing")
    args = p.parse_args()

    from common import header, print_table, set_threads

    from fastllm import Tokenizer

    set_threads(args.threads)
    print(header("BPE on long chunks", args.threads))
    scale = 4 if args.quick else 1
    vocab = 1000
    slow: set[str] = set()

    def run(name: str, fn, *fn_args) -> str:
        """Seconds of fn(*fn_args), or "-" once this provider took longer than the budget."""
        if name in slow:
            return "-"
        t = timed(lambda: fn(*fn_args))
        if t > args.budget:
            slow.add(name)
        return f"{t:.2f}"

    def train(text: str) -> Tokenizer:
        return Tokenizer.train([text], vocab, special_tokens=(), progress=False, threads=args.threads)

    hf_train = hf_trainer(vocab)
    print(f"\ntraining a {vocab}-token vocabulary on a run of one character ('a' * n), then building the tokenizer "
          "from its ranks and encoding the run:")
    rows = []
    for n in [x // scale for x in (100_000, 200_000, 400_000, 800_000, 1_600_000)]:
        text = "a" * n
        tok = train(text)
        ranks = {tok.token_to_bytes(i): i for i in range(tok.n_vocab)}
        enc = _tiktoken(ranks)
        rows.append([f"{n:,}", f"{max(map(len, ranks)):,}", run("fastllm train", train, text),
                     run("HF train", hf_train, text), run("fastllm build", Tokenizer, ranks),
                     run("tiktoken build", _tiktoken, ranks), run("fastllm encode", tok.encode, text),
                     run("tiktoken encode", enc.encode, text)])
    print_table(rows, ["n", "longest token", "fastllm train s", "HF train s", "fastllm build s", "tiktoken build s",
                       "fastllm encode s", "tiktoken encode s"])

    print(f"\ntraining a {vocab}-token vocabulary on one line of n random lowercase letters (one chunk):")
    rows = []
    rnd = random.Random(0)
    for n in [x // scale for x in (250_000, 500_000, 1_000_000, 2_000_000, 4_000_000)]:
        text = "".join(rnd.choices("abcdefghijklmnopqrstuvwxyz", k=n))
        f, h = run("fastllm line", train, text), run("HF line", hf_train, text)
        rows.append([f"{n / 1e6:.2f} MB", f, h, f"{float(h) / float(f):.1f}x" if "-" not in (f, h) else "-"])
    print_table(rows, ["line", "fastllm train s", "HF train s", "HF/fastllm"])


def _tiktoken(ranks: dict[bytes, int]):
    import tiktoken

    from fastllm.tokenizer import GPT4_PATTERN

    return tiktoken.Encoding("bench", pat_str=GPT4_PATTERN, mergeable_ranks=ranks, special_tokens={})


if __name__ == "__main__":
    main()
