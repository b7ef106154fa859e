"""The `fastllm` command line: parses arguments and dispatches to the library."""

from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import fastllm

    d = fastllm.info()
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        for k, v in d.items():
            print(f"{k:14s} {v}")
    return 0


def _add_dataclass_args(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --flag per dataclass field (types from the defaults), so the CLI never drifts from the API."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        base = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
        typ = base[0]
        required = f.default is dataclasses.MISSING
        if typ is bool:
            p.add_argument(flag, action="store_true", default=f.default)
        else:
            p.add_argument(flag, type=typ, required=required, default=None if required else f.default,
                           metavar=f.name.upper())


def _cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .train import TrainConfig, train

    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})
    s = train(cfg, progress=not args.no_progress)
    _print_summary(s)
    return 0


def _print_summary(s: dict) -> None:
    print(f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.1f}s ({s['tok_per_s']:,.0f} tok/s); "
          f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, val loss {s['val_loss']:.4f}")
    print(f"checkpoint: {s['checkpoint']}\nloss curve: {s['loss_curve']}\nlog: {s['log']}")


def _cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from .demo import DemoConfig, run_demo

    run_demo(DemoConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DemoConfig)}),
             progress=not args.no_progress)
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from .data import prepare

    st = prepare(args.corpus or None, args.tokenizer, args.out, val_fraction=args.val_fraction,
                 shard_tokens=args.shard_tokens, threads=args.threads, progress=not args.no_progress)
    print(f"{st.train_tokens:,} train and {st.val_tokens:,} val tokens from {st.documents} documents in "
          f"{len(st.shards)} shards ({st.skipped} already done) -> {st.out_dir}")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import time

    from .data import builtin_corpus
    from .tokenizer import Tokenizer

    t0 = time.time()
    from pathlib import Path

    texts = [Path(p) for p in args.corpus] or builtin_corpus()
    tok = Tokenizer.train(texts, args.vocab_size, pattern=args.pattern, special_tokens=args.special,
                          progress=not args.no_progress)
    tok.save(args.out)
    print(f"trained a {tok.n_vocab}-token vocabulary in {time.time() - t0:.1f}s -> {args.out}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import time

    from .data import find_tokenizer
    from .sample import stream_text
    from .tokenizer import Tokenizer
    from .train import load_model

    model = load_model(args.ckpt).eval()
    tok_path = args.tokenizer or find_tokenizer(model.checkpoint_dir)
    if tok_path is None:
        raise FileNotFoundError(f"no tokenizer in {model.checkpoint_dir}; pass --tokenizer")
    tok = Tokenizer.load(tok_path)
    n = min(args.max_new_tokens, model.config.block_size - len(tok.encode(args.prompt, allowed_special="all")))
    for i in range(args.num_samples):
        t0, stats = time.time(), {}
        print(args.prompt, end="", flush=True)
        for piece in stream_text(model, tok, args.prompt, n, stop=args.stop, stats=stats, temperature=args.temperature,
                                 top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                                 repetition_penalty=args.repetition_penalty,
                                 seed=None if args.seed is None else args.seed + i):
            print(piece, end="", flush=True)
        dt = time.time() - t0
        print(f"\n--- {stats['tokens']} tokens in {dt:.2f}s ({stats['tokens'] / max(dt, 1e-9):.1f} tokens/s)",
              file=sys.stderr)
    return 0


def _cmd_rl(args: argparse.Namespace) -> int:
    import dataclasses

    from .rl import RLConfig, train_grpo

    cfg = RLConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RLConfig)})
    s = train_grpo(cfg, progress=not args.no_progress)
    print(f"done: {s['steps']} GRPO steps in {s['seconds']:.1f}s; last reward {s['reward']:.3f}, kl {s['kl']:.4f}; "
          f"held-out accuracy {s['eval_accuracy_start']:.3f} -> {s['eval_accuracy']:.3f}")
    print(f"checkpoint: {s['checkpoint']}\nlog: {s['log']}")
    return 0


def _cmd_reward_model(args: argparse.Namespace) -> int:
    import dataclasses

    from .rl import RewardModelConfig, train_reward_model

    cfg = RewardModelConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RewardModelConfig)})
    s = train_reward_model(cfg, progress=not args.no_progress)
    print(f"done: {s['steps']} steps on {s['train_pairs']} pairs in {s['seconds']:.1f}s; held-out accuracy "
          f"{s['val_accuracy']:.3f} on {s['val_pairs']} pairs (train {s['train_accuracy']:.3f}) -> {s['out']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="fastllm", description="Train, tokenize and sample small GPTs, fast.")
    p.add_argument("--version", action="version", version=f"fastllm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="version, build flags, SIMD level, threads, CUDA")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=_cmd_info)

    from .train import TrainConfig

    s = sub.add_parser("train", help="pre-train a GPT on token shards (see `fastllm prepare`)")
    _add_dataclass_args(s, TrainConfig)
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_train)

    from .demo import DemoConfig

    s = sub.add_parser("demo", help="tokenizer + shards + a small GPT + samples on the built-in corpus, in minutes")
    _add_dataclass_args(s, DemoConfig)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("prepare", help="tokenize text files/folders/JSONL into train/val token shards")
    s.add_argument("corpus", nargs="*", help="files or folders (.txt, .md, .jsonl); none: the built-in corpus")
    s.add_argument("--tokenizer", required=True, help="tokenizer file (fastllm tokenizer train)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--val-fraction", type=float, default=0.05)
    s.add_argument("--shard-tokens", type=int, default=50_000_000)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = s.add_subparsers(dest="tok_command", metavar="COMMAND", required=True)
    t = tsub.add_parser("train", help="train a byte-level BPE vocabulary")
    t.add_argument("corpus", nargs="*", help="text files; none: the built-in corpus")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--pattern", default="gpt4", help="gpt4 | gpt2 | a custom regex")
    t.add_argument("--special", nargs="*", default=["<|endoftext|>"], help="special tokens")
    t.add_argument("--out", required=True, help="output tokenizer file")
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_tokenizer_train)

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--ckpt", required=True, help="checkpoint folder or training output folder")
    s.add_argument("--prompt", default="")
    s.add_argument("--tokenizer", default=None, help="default: the copy inside the checkpoint")
    s.add_argument("-n", "--max-new-tokens", type=int, default=200)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--min-p", type=float, default=None)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--stop", nargs="*", default=[], help="stop strings")
    s.add_argument("--seed", type=int, default=None)
    s.set_defaults(func=_cmd_sample)

    from .rl import RewardModelConfig, RLConfig

    s = sub.add_parser("rl", help="GRPO post-training on a verifiable task (or against a reward model)")
    _add_dataclass_args(s, RLConfig)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_rl)

    s = sub.add_parser("reward-model", help="train a reward model on JSONL preference pairs (Bradley-Terry)")
    _add_dataclass_args(s, RewardModelConfig)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=_cmd_reward_model)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, KeyboardInterrupt) as e:
        if isinstance(e, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        print(f"fastllm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
