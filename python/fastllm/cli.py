"""The `fastllm` command line: parses arguments and dispatches to the library."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
import typing
import warnings
from pathlib import Path

import numpy as np

from . import distributed, info
from .checkpoint import checkpoint_tokenizer, convert, load_model
from .clean import CleanConfig, clean
from .cuda import CudaUnavailableError
from .data import builtin_corpus, prepare
from .demo import DemoConfig, run_demo
from .rl import RewardModelConfig, RLConfig, train_grpo, train_reward_model
from .sample import SamplingParams, check_seed, stream_text
from .serve import ServeConfig, serve
from .sft import ChatSession, SFTConfig, chat_loop, sft
from .tokenizer import Tokenizer
from .train import TrainConfig, TrainingError, train
from .version import __version__


def _cmd_info(args: argparse.Namespace) -> int:
    d = info()
    if args.json:
        print(json.dumps(d, indent=2))
    else:
        for k, v in d.items():
            print(f"{k:14s} {v}")
    return 0


def _add_dataclass_args(p: argparse.ArgumentParser, cls, skip: tuple[str, ...] = ()) -> None:
    """One --flag per dataclass field (types from the defaults), so the CLI never drifts from the API."""
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
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _config(args: argparse.Namespace, cls, **overrides):
    """The dataclass `cls` filled from the parsed flags of the same names (plus overrides)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**kw, **overrides})


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    p.add_argument("--tokenizer", default=None, help="default: the copy inside the checkpoint")
    p.add_argument("-n", "--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=temperature)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--min-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="CPU (default float32): bfloat16 decodes with bf16 weight copies (faster, logits within ~1%%); "
                        "GPU (default bfloat16): the compute dtype of the GPU model")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags, checked (ValueError naming the bad one) before any model is loaded."""
    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
              repetition_penalty=args.repetition_penalty)
    SamplingParams(**kw)
    check_seed(args.seed)
    return kw


def _cmd_train(args: argparse.Namespace) -> int:
    s = train(_config(args, TrainConfig), progress=not args.no_progress)
    _print_summary(s)
    return 0


def _print_summary(s: dict) -> None:
    print(f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.1f}s ({s['tok_per_s']:,.0f} tok/s); "
          f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, val loss {s['val_loss']:.4f}")
    print(f"checkpoint: {s['checkpoint']}\nloss curve: {s['loss_curve']}\nlog: {s['log']}")


def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(_config(args, DemoConfig), progress=not args.no_progress)
    return 0


@contextlib.contextmanager
def _warnings_to_stderr():
    """Library warnings as one `fastllm: warning: ...` line each, as they happen."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: print(f"fastllm: warning: {message}", file=sys.stderr)
        yield


def _cmd_prepare(args: argparse.Namespace) -> int:
    with _warnings_to_stderr():
        st = prepare(args.corpus or None, args.tokenizer, args.out, val_fraction=args.val_fraction,
                     shard_tokens=args.shard_tokens, threads=args.threads, progress=not args.no_progress,
                     dask=args.dask)
    split = {"documents": "whole documents", "within": "the end of each document", "none": "none"}[st.split]
    print(f"{st.train_tokens:,} train and {st.val_tokens:,} val tokens (val split: {split}) from {st.documents} "
          f"documents in {len(st.shards)} shards ({st.skipped} already done) -> {st.out_dir}")
    return 0


def _cmd_clean(args: argparse.Namespace) -> int:
    cfg = _config(args, CleanConfig, lang=tuple(args.lang) if args.lang else None, dedup=not args.no_dedup,
                  scrub_pii=not args.keep_pii, lang_rules=not args.no_lang_rules)
    with _warnings_to_stderr():
        s = clean(args.inputs, args.out, cfg, progress=not args.no_progress, dask=args.dask)
    print(s.table())
    print(f"{s.documents:,} documents in {len(s.shards)} shards from {s.files} files ({s.skipped} already done) "
          f"in {s.seconds:.1f}s -> {s.out_dir}")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    t0 = time.time()
    texts = [Path(p) for p in args.corpus] or builtin_corpus()
    tok = Tokenizer.train(texts, args.vocab_size, pattern=args.pattern, special_tokens=args.special,
                          progress=not args.no_progress)
    tok.save(args.out)
    print(f"trained a {tok.n_vocab}-token vocabulary in {time.time() - t0:.1f}s -> {args.out}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    sampling = _sampling_kwargs(args)  # checked before loading anything
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    gpu = args.device == "cuda"
    model = load_model(args.ckpt, args.device, (args.dtype or "bfloat16") if gpu else None).eval()
    tok = checkpoint_tokenizer(model.checkpoint_dir, args.tokenizer)
    ids = tok.encode(args.prompt, allowed_special="all")
    if ids.size == 0 and tok.eot_token is not None:  # no prompt: start a new document
        ids = np.array([tok.eot_token])
    context = model.config.block_size
    if ids.size >= context:
        raise ValueError(f"--prompt is {ids.size} tokens but the model's context is {context} tokens: give a prompt "
                         f"of at most {context - 1} tokens to leave room for new ones")
    n = min(args.max_new_tokens, context - ids.size)
    for i in range(args.num_samples):
        t0, stats = time.time(), {}
        print(args.prompt, end="", flush=True)
        for piece in stream_text(model, tok, ids, n, stop=args.stop, stats=stats,
                                 seed=None if args.seed is None else args.seed + i, weights=args.dtype or "float32",
                                 **sampling):
            print(piece, end="", flush=True)
        dt = time.time() - t0
        print(f"\n--- {stats['tokens']} tokens in {dt:.2f}s ({stats['tokens'] / max(dt, 1e-9):.1f} tokens/s)",
              file=sys.stderr)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    out = convert(args.src, args.dst, to=args.to)
    print(f"{args.src} -> {out} ({'transformers GPT-2 folder' if args.to == 'hf' else 'fastllm checkpoint'})")
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    s = sft(_config(args, SFTConfig), progress=not args.no_progress)
    _print_summary(s)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    _sampling_kwargs(args)  # checked before loading anything
    model = load_model(args.ckpt).eval()
    session = ChatSession(model, checkpoint_tokenizer(model.checkpoint_dir, args.tokenizer), system=args.system,
                          max_new_tokens=args.max_new_tokens, seed=args.seed, weights=args.dtype or "float32",
                          **_sampling_kwargs(args))
    if sys.stdin.isatty():
        print(f"chatting with {model.checkpoint_dir} ({model.num_parameters / 1e6:.2f}M parameters, context "
              f"{model.config.block_size} tokens); /reset clears the history, /quit or Ctrl-D ends", file=sys.stderr)
    return chat_loop(session, sys.stdin, sys.stdout, sys.stderr)


def _cmd_serve(args: argparse.Namespace) -> int:
    serve(_config(args, ServeConfig, allow_origins=tuple(args.allow_origin)))
    return 0


def _add_serve_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--ckpt", required=True, help="checkpoint folder or training run folder (its latest checkpoint)")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0: all)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000; 0: any free port, printed)")
    s.add_argument("--model-name", default=None, help="model id for clients (default: the checkpoint folder's name)")
    s.add_argument("--tokenizer", default=None, help="default: the copy inside the checkpoint")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on the API (default: $FASTLLM_API_KEY if set)")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together, i.e. KV cache slots (16)")
    s.add_argument("--max-len", type=int, default=None,
                   help="tokens per sequence, prompt + completion (default: the model's context)")
    s.add_argument("--kv-budget-mb", type=float, default=None,
                   help="cap on the KV cache memory in MiB (fewer slots than --max-batch if needed)")
    s.add_argument("--max-queue", type=int, default=256, help="requests that may wait for a slot; more get 429")
    s.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="run the model on the CPU or a GPU")
    s.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="CPU (default float32): bfloat16 decodes with bf16 weight copies (faster, logits within ~1%%); "
                        "GPU (default bfloat16): the model's compute dtype")
    s.add_argument("--threads", type=int, default=None, help="OpenMP threads for the model")
    s.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="CORS: let web pages from ORIGIN call the API (repeatable; '*' for any)")
    s.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def _cmd_rl(args: argparse.Namespace) -> int:
    s = train_grpo(_config(args, RLConfig), progress=not args.no_progress)
    print(f"done: {s['steps']} GRPO steps in {s['seconds']:.1f}s; last reward {s['reward']:.3f}, kl {s['kl']:.4f}; "
          f"held-out accuracy {s['eval_accuracy_start']:.3f} -> {s['eval_accuracy']:.3f}")
    print(f"checkpoint: {s['checkpoint']}\nlog: {s['log']}")
    return 0


def _cmd_reward_model(args: argparse.Namespace) -> int:
    s = train_reward_model(_config(args, RewardModelConfig), progress=not args.no_progress)
    print(f"done: {s['steps']} steps on {s['train_pairs']} pairs in {s['seconds']:.1f}s; held-out accuracy "
          f"{s['val_accuracy']:.3f} on {s['val_pairs']} pairs (train {s['train_accuracy']:.3f}) -> {s['out']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastllm", description="Train, tokenize and sample small GPTs, fast.")
    p.add_argument("--version", action="version", version=f"fastllm {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="version, build flags, SIMD level, threads, CUDA")
    s.add_argument("--json", action="store_true", help="print as JSON")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("train", help="pre-train a GPT on token shards (see `fastllm prepare`)")
    _add_dataclass_args(s, TrainConfig)
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("sft", help="fine-tune a checkpoint on conversations (JSONL of {\"messages\": [...]})")
    s.add_argument("--base", required=True, help="checkpoint (or training run folder) to fine-tune")
    _add_dataclass_args(s, SFTConfig, skip=("base", "model", "n_layer", "n_head", "n_embd"))
    s.set_defaults(func=_cmd_sft)

    s = sub.add_parser("chat", help="chat in the terminal with a fine-tuned checkpoint (reads stdin)")
    s.add_argument("--ckpt", required=True, help="checkpoint folder or fine-tuning output folder")
    s.add_argument("--system", default=None, help="system message")
    _add_sampling_args(s, max_new_tokens=256, temperature=0.7)
    s.set_defaults(func=_cmd_chat)

    s = sub.add_parser("demo", help="tokenizer + shards + a small GPT + samples on the built-in corpus, in minutes")
    _add_dataclass_args(s, DemoConfig)
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("prepare", help="tokenize text files/folders/JSONL into train/val token shards")
    s.add_argument("corpus", nargs="*", help="files or folders (.txt, .md, .jsonl); none: the built-in corpus")
    s.add_argument("--tokenizer", required=True, help="tokenizer file (fastllm tokenizer train)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the text for validation: whole documents, or the end of each when there are few")
    s.add_argument("--shard-tokens", type=int, default=50_000_000)
    s.add_argument("--threads", type=int, default=None)
    s.add_argument("--dask", default=None, metavar="local|tcp://HOST:PORT",
                   help="tokenize and write shards on a Dask cluster: 'local' (a LocalCluster) or a scheduler")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_prepare)

    s = sub.add_parser("clean", help="web pages (HTML, WARC, JSONL) -> clean, deduplicated JSONL text shards")
    s.add_argument("inputs", nargs="+", help="files or folders of any kind (HTML, RSS/Atom, WARC, JSONL with "
                   "html/text, plain text; gzip/bz2/xz/zstd), told by content")
    s.add_argument("--out", required=True, help="output folder (clean_NNNNNN.jsonl, summary.json)")
    s.add_argument("--lang", nargs="+", default=None, help="keep only these languages (ISO 639-1, e.g. en de)")
    _add_dataclass_args(s, CleanConfig, skip=("lang", "dedup", "scrub_pii", "lang_rules"))
    s.add_argument("--no-dedup", action="store_true", help="keep exact and near duplicates")
    s.add_argument("--keep-pii", action="store_true", help="do not replace e-mail and IP addresses")
    s.add_argument("--no-lang-rules", action="store_true",
                   help="the English thresholds for every language (default: FineWeb-2's per language)")
    s.add_argument("--dask", default=None, metavar="local|tcp://HOST:PORT",
                   help="run on a Dask cluster: 'local' (a LocalCluster of --processes workers) or a scheduler")
    s.set_defaults(func=_cmd_clean)

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
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--stop", nargs="*", default=[], help="stop strings")
    s.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="run the model on the CPU or a GPU")
    _add_sampling_args(s, max_new_tokens=200, temperature=0.8)
    s.set_defaults(func=_cmd_sample)

    s = sub.add_parser("convert", help="convert between a Hugging Face GPT-2 folder and a fastllm checkpoint")
    s.add_argument("src", help="a transformers GPT-2 folder (--to fastllm) or a fastllm checkpoint (--to hf)")
    s.add_argument("dst", help="output folder")
    s.add_argument("--to", choices=["fastllm", "hf"], default="fastllm", help="output format (default fastllm)")
    s.set_defaults(func=_cmd_convert)

    s = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page")
    _add_serve_args(s)
    s.set_defaults(func=_cmd_serve)

    s = sub.add_parser("rl", help="GRPO post-training on a verifiable task (or against a reward model)")
    _add_dataclass_args(s, RLConfig)
    s.set_defaults(func=_cmd_rl)

    s = sub.add_parser("reward-model", help="train a reward model on JSONL preference pairs (Bradley-Terry)")
    _add_dataclass_args(s, RewardModelConfig)
    s.set_defaults(func=_cmd_reward_model)
    return p


def error_line(e: BaseException) -> str:
    """The one line `main` prints for an exception: its message (which names the argument or file) for the
    errors bad input raises; the exception type too for anything else, which is a bug worth reporting.

    >>> error_line(KeyError("rng"))
    "fastllm: error: KeyError: 'rng' (unexpected: FASTLLM_DEBUG=1 shows the traceback)"
    """
    msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, (ValueError, TypeError, OSError, ImportError, FloatingPointError, CudaUnavailableError,
                      TrainingError)):
        return f"fastllm: error: {msg or type(e).__name__}"
    return f"fastllm: error: {type(e).__name__}{': ' + msg if msg else ''} (unexpected: FASTLLM_DEBUG=1 shows the " \
           "traceback)"


TRAINING = ("train", "sft", "rl", "reward-model")  # the commands that run data-parallel under mpiexec


def _join_ranks() -> None:
    """Under an MPI launcher, join the other ranks (fastllm.distributed); ranks other than 0 print nothing but
    their errors."""
    if not distributed.world().is_main:
        sys.stdout = open(os.devnull, "w")  # for the rest of the process
        warnings.simplefilter("ignore")


def main(argv: list[str] | None = None) -> int:
    """Run one command. Whatever goes wrong ends as one `fastllm: error: ...` line on stderr and exit code 1
    (Ctrl-C: 130; bad flags: argparse's usage message and 2); FASTLLM_DEBUG=1 also prints the traceback. Under
    mpiexec with several ranks, an error on any rank is printed with the rank and stops them all (MPI_Abort)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if args.command in TRAINING:
            _join_ranks()
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _stop_ranks("interrupted")
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fastllm sample ... | head`: the reader is gone; stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        except (OSError, ValueError):
            pass
        return 141
    except Exception as e:
        if os.environ.get("FASTLLM_DEBUG"):
            traceback.print_exc()
        _stop_ranks(error_line(e).removeprefix("fastllm: error: "))
        print(error_line(e), file=sys.stderr)
        return 1


def _stop_ranks(message: str) -> None:
    """With several MPI ranks, the others wait for this one: print the error with the rank and end them all."""
    world = distributed.current()
    if world is not None and world.distributed:
        world.fail(message)


if __name__ == "__main__":
    sys.exit(main())
