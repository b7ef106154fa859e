"""The `fastllm` command line: parses arguments and dispatches to the library.

Each command is a `run(args)` function registered with `@command(name, purpose, examples, args=...)`;
`fastllm --help` lists the commands in PIPELINE order (a new command adds its name there). Options that mirror
a config dataclass (TrainConfig, RLConfig, CleanConfig, EvalConfig, ServeConfig, ...) are generated from its
fields, help text included (fastllm.options), so the CLI never drifts from the API. Every option's help ends
with its default. Whatever goes wrong inside a command ends as one `fastllm: error: ...` line (`main`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import traceback
import types
import typing
import warnings
from collections.abc import Callable, Sequence

from . import distributed, info, set_num_threads
from .chat import IM_END, IM_START, ChatTemplate, chat_format, eos_token_ids, has_chatml
from .checkpoint import checkpoint_tokenizer, convert, load_model
from .clean import CleanConfig, clean
from .cuda import CudaUnavailableError
from .data import _input_files, builtin_corpus, iter_documents, prepare
from .demo import DemoConfig, run_demo
from .dpo import DPOConfig, train_dpo
from .eval import EvalConfig, evaluate, format_report
from .eval import load as load_eval
from .options import THREADS, field_metadata
from .rl import RewardModelConfig, RLConfig, train_grpo, train_reward_model
from .sample import DECODE_DTYPES, SamplingParams, check_decode_dtype, check_seed, held_weights, stream_text
from .serve import ServeConfig, serve
from .sft import ChatSession, SFTConfig, chat_loop, sft
from .tokenizer import Tokenizer
from .train import MODEL_OPTIONS, TrainConfig, TrainingError, train
from .version import __version__

# the order in which a model is built; `fastllm --help` lists commands in this order, unknown ones last
PIPELINE = ("clean", "tokenizer", "prepare", "train", "sample", "sft", "chat", "rl", "reward-model", "dpo", "eval",
            "serve", "convert", "info", "demo")
NO_PROGRESS = "no progress bar (for logs and pipes)"


@dataclasses.dataclass
class Command:
    name: str
    purpose: str  # one line: what the command does
    examples: tuple[str, ...]  # command lines that work (tests parse them)
    add_args: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int] | None  # None: the command only groups subcommands


COMMANDS: dict[str, Command] = {}


def command(name: str, purpose: str, examples: Sequence[str], args: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated `run(args) -> exit code` as `fastllm NAME`; `args(parser)` adds its options."""

    def register(run):
        COMMANDS[name] = Command(name, purpose, tuple(examples), args, run)
        return run

    return register


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's example lines as written, ends each option's help with its default (like
    argparse.ArgumentDefaultsHelpFormatter) unless the help already says what the default is, and names an
    option's value by its type (INT, FLOAT, TEXT)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if ("default" in text or not action.option_strings or action.required or d is None or d is False
                or d is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return {int: "INT", float: "FLOAT"}.get(action.type, "TEXT")  # --lr FLOAT, not --lr LR


def add_command_parser(sub, name: str, purpose: str, examples: Sequence[str]) -> argparse.ArgumentParser:
    """A subcommand parser with a one-line purpose and its examples in the epilog."""
    epilog = "example" + ("s" if len(examples) > 1 else "") + ":\n" + "\n".join("  " + e for e in examples)
    return sub.add_parser(name, help=purpose, description=purpose[0].upper() + purpose[1:] + ".", epilog=epilog,
                          formatter_class=HelpFormatter)


def pipeline_position(name: str) -> int:
    return PIPELINE.index(name) if name in PIPELINE else len(PIPELINE)


# ---- options from config dataclasses ---------------------------------------------------------------------


def _flag_type(hint) -> tuple[type, bool]:
    """(element type, is a list) of a field's type hint: `int | None` -> (int, False), `tuple[str, ...]` and
    `Sequence[str]` -> (str, True)."""
    typ = hint
    if typing.get_origin(hint) in (typing.Union, getattr(types, "UnionType", typing.Union)):
        typ = next(t for t in typing.get_args(hint) if t is not type(None))
    if typing.get_origin(typ) in (tuple, list, Sequence):
        return typing.get_args(typ)[0], True
    return typ, False


def _add_dataclass_args(p: argparse.ArgumentParser, cls, skip: Sequence[str] = (), required: Sequence[str] = (),
                        progress: bool = True) -> None:
    """One --flag per field of the dataclass `cls` (type, default, help and choices from the field, see
    fastllm.options); bool fields become switches (--x, or --x/--no-x when on, or unset, by default)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = field_metadata(cls, f.name)
        kw: dict = {"help": meta["help"].replace("%", "%%") if meta.get("help") else None}
        typ, many = _flag_type(hints[f.name])
        if typ is bool:
            kw.update(default=f.default, action="store_true" if f.default is False else argparse.BooleanOptionalAction)
        else:
            must = f.default is dataclasses.MISSING or f.name in required
            kw.update(type=typ, required=must, default=None if f.default is dataclasses.MISSING else f.default)
            if "choices" in meta:
                kw["choices"] = meta["choices"]
            if many:
                kw["nargs"] = "+"
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    if progress:
        p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)


def _fields_of(cls, **kw) -> Callable[[argparse.ArgumentParser], None]:
    """`args=` of a command whose options are the fields of the dataclass `cls`; kw as in _add_dataclass_args."""
    return lambda p: _add_dataclass_args(p, cls, **kw)


def _config(args: argparse.Namespace, cls, **overrides):
    """The dataclass `cls` filled from the parsed flags of the same names (plus overrides)."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**kw, **overrides})


@contextlib.contextmanager
def _warnings_to_stderr():
    """Library warnings as one `fastllm: warning: ...` line each, as they happen."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: print(f"fastllm: warning: {message}", file=sys.stderr)
        yield


def _add_dask_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--dask", default=None, metavar="local|tcp://HOST:PORT",
                   help=f"{what} on a Dask cluster: 'local' (a LocalCluster) or a scheduler's address "
                        "(default: this machine, without Dask)")


# ---- commands, in pipeline order ---------------------------------------------------------------------------


def _clean_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", help="files or folders of any kind (HTML, RSS/Atom, WARC, JSONL with "
                   "html/text, plain text; gzip/bz2/xz/zstd), told by content")
    p.add_argument("--out", required=True, help="output folder (clean_NNNNNN.jsonl shards, summary.json)")
    _add_dataclass_args(p, CleanConfig)
    p.add_argument("--keep-pii", dest="scrub_pii", action="store_false", help="the same as --no-scrub-pii")
    _add_dask_arg(p, "run the pipeline (--processes workers for 'local')")


@command("clean", "web pages (HTML, WARC, JSONL) -> clean, deduplicated JSONL text shards",
         ["fastllm clean crawl/ --out corpus/ --lang en",
          "fastllm clean pages.warc.gz --out corpus/ --min-words 100 --no-dedup",
          "fastllm clean crawl/ --out corpus/ --dask local --processes 8"], args=_clean_args)
def _cmd_clean(args: argparse.Namespace) -> int:
    cfg = _config(args, CleanConfig, lang=tuple(args.lang) if args.lang else None)
    with _warnings_to_stderr():
        s = clean(args.inputs, args.out, cfg, progress=not args.no_progress, dask=args.dask)
    print(s.table())
    print(f"{s.documents:,} documents in {len(s.shards)} shards from {s.files} files ({s.skipped} already done) "
          f"in {s.seconds:.1f}s -> {s.out_dir}")
    return 0


def _tokenizer_args(p: argparse.ArgumentParser) -> None:
    tsub = p.add_subparsers(dest="tok_command", metavar="COMMAND", required=True, title="commands")
    t = add_command_parser(tsub, "train", "train a byte-level BPE vocabulary (tiktoken format)",
                           ["fastllm tokenizer train corpus/ --vocab-size 32768 --out tok.tiktoken",
                            "fastllm tokenizer train --vocab-size 4096 --out tok.tiktoken"])
    t.add_argument("corpus", nargs="*", help="files or folders: .txt, .md, .jsonl (\"text\"; also .gz/.bz2/.xz/.zst; "
                                             "C4's and Dolma's .json.gz), .parquet (\"text\"), as `fastllm prepare` "
                                             "reads them (default: the built-in corpus, Python's documentation)")
    t.add_argument("--vocab-size", type=int, required=True, help="tokens in all: 256 bytes + merges + special tokens")
    t.add_argument("--pattern", default="gpt4", help="pre-tokenizer: gpt4, gpt2 or a custom regex")
    t.add_argument("--special", nargs="*", default=["<|endoftext|>"], metavar="TOKEN",
                   help="special tokens, given the last ids")
    t.add_argument("--out", required=True, help="output tokenizer file (+ a .json sidecar)")
    t.add_argument("--max-chars", type=int, default=None, metavar="N",
                   help="train on the corpus' first N characters (documents in order, the last one cut), as "
                        "nanochat's tok_train does: the counts of a few GB of text give the vocabulary of a web "
                        "corpus, and the texts are held in memory (default: all of it)")
    t.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    t.set_defaults(func=_cmd_tokenizer_train)


command("tokenizer", "tokenizer tools: train a BPE vocabulary",
        ["fastllm tokenizer train corpus/ --vocab-size 32768 --out tok.tiktoken"], args=_tokenizer_args)(None)


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    t0 = time.time()
    if args.max_chars is not None and args.max_chars < 1:
        raise ValueError(f"--max-chars must be >= 1, got {args.max_chars}")
    docs = iter_documents(_input_files(args.corpus)) if args.corpus else builtin_corpus()
    texts = list(_first_chars(docs, args.max_chars))
    tok = Tokenizer.train(texts, args.vocab_size, pattern=args.pattern, special_tokens=args.special,
                          progress=not args.no_progress)
    tok.save(args.out)
    print(f"trained a {tok.n_vocab}-token vocabulary on {len(texts):,} documents ({sum(map(len, texts)):,} "
          f"characters) in {time.time() - t0:.1f}s -> {args.out}")
    return 0


def _first_chars(docs, limit: int | None):
    """The documents up to `limit` characters in all (the last one cut there); all of them for None."""
    n = 0
    for d in docs:
        if limit is not None and n + len(d) >= limit:
            yield d[: limit - n]
            return
        n += len(d)
        yield d


def _prepare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("corpus", nargs="*",
                   help="files or folders: .txt, .md, .jsonl (also .gz/.bz2/.xz/.zst; C4's and Dolma's .json.gz), "
                        ".parquet (default: the built-in corpus)")
    p.add_argument("--tokenizer", required=True, help="tokenizer file (from `fastllm tokenizer train`)")
    p.add_argument("--out", required=True, help="output folder (train_NNNNNN.bin, val_NNNNNN.bin, manifest.json)")
    p.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the text for validation: whole documents, or the end of each when there are few")
    p.add_argument("--shard-tokens", type=int, default=50_000_000, help="tokens per shard file")
    p.add_argument("--threads", type=int, default=None, help=THREADS)
    _add_dask_arg(p, "tokenize and write shards")
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)


@command("prepare", "tokenize text files, folders or JSONL into train/val token shards",
         ["fastllm prepare corpus/ --tokenizer tok.tiktoken --out data/"], args=_prepare_args)
def _cmd_prepare(args: argparse.Namespace) -> int:
    with _warnings_to_stderr():
        st = prepare(args.corpus or None, args.tokenizer, args.out, val_fraction=args.val_fraction,
                     shard_tokens=args.shard_tokens, threads=args.threads, progress=not args.no_progress,
                     dask=args.dask)
    split = {"documents": "whole documents", "within": "the end of each document", "none": "none"}[st.split]
    print(f"{st.train_tokens:,} train and {st.val_tokens:,} val tokens (val split: {split}) from {st.documents} "
          f"documents in {len(st.shards)} shards ({st.skipped} already done) -> {st.out_dir}")
    return 0


@command("train", "pre-train a GPT on token shards (from `fastllm prepare`)",
         ["fastllm train --data data/ --out run/ --model small --batch-size 8 --seq-len 256 --max-steps 2000",
          "fastllm train --data data/ --out run/ --eval-task mc --eval-task-data hellaswag_val.jsonl "
          "--eval-task-limit 500",
          "fastllm train --data data/ --out run/ --resume"], args=_fields_of(TrainConfig))
def _cmd_train(args: argparse.Namespace) -> int:
    s = train(_config(args, TrainConfig), progress=not args.no_progress)
    _print_summary(s)
    return 0


def _print_summary(s: dict) -> None:
    val = s.get("val_loss")
    val = "no validation" if val is None or math.isnan(val) else f"val loss {val:.4f}"
    print(f"done: {s['steps']} steps, {s['tokens']:,} tokens in {s['seconds']:.1f}s ({s['tok_per_s']:,.0f} tok/s); "
          f"loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}, {val}")
    _print_task_metrics(s)
    print(f"checkpoint: {s['checkpoint']}\nloss curve: {s['loss_curve']}\nlog: {s['log']}")


def _print_task_metrics(s: dict) -> None:
    """The last --eval-task metrics of a training summary, if any (stderr aside)."""
    m = {k: v for k, v in s.get("eval_task", {}).items() if not k.endswith("_stderr")}
    if m:
        print("eval task: " + ", ".join(f"{k} {v:,.0f}" if abs(v) >= 1000 else f"{k} {v:.4f}" for k, v in m.items()))


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float) -> None:
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the copy inside the checkpoint)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most")
    _add_dataclass_args(p, SamplingParams, progress=False)
    p.set_defaults(temperature=temperature)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: a fresh random one)")
    p.add_argument("--skip-special-tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="leave special tokens the model writes (<|im_start|>, <|eot_id|>, ...) out of the text, as "
                        "transformers' pipelines and `transformers chat` do (default: yes; --no-skip-special-tokens "
                        "shows them)")
    p.add_argument("--dtype", choices=DECODE_DTYPES, default=None,
                   help="weights for decoding; CPU (default: float32): bfloat16 decodes with bf16 weight copies "
                        "(faster, logits within ~1%%), int8 with int8 ones (weight-only, a scale per output row: "
                        "fastest where reading the weights is the cost), w8a8 with int8 weights and int8 activations "
                        "(integer products: fastest for batches and prompts, coarser); on the CPU a Hugging Face "
                        "folder is then loaded with its matrices in that form only (half the memory of float32, or "
                        "less); GPU (default: bfloat16): the compute dtype of the GPU model")


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags, checked (ValueError naming the bad one) before any model is loaded."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingParams) if hasattr(args, f.name)}
    SamplingParams(**kw)
    check_seed(args.seed)
    return kw


def _unescape(text: str) -> str:
    """A flag's "\\n" and "\\t" (a shell passes "\n" as two characters) as a newline and a tab."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _sample_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint folder, or a run folder (its newest checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, start a new document)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to generate, one after the other")
    p.add_argument("--stop", nargs="*", default=[], metavar="TEXT", help="stop at any of these strings, e.g. "
                                                                         "'\\n\\n' (default: none)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="run the model on the CPU or a GPU")
    _add_sampling_args(p, max_new_tokens=200, temperature=0.8)


@command("sample", "generate text from a checkpoint, streamed to the terminal",
         ['fastllm sample --ckpt run/ --prompt "The meaning of" -n 200 --temperature 0.8 --top-k 40',
          'fastllm sample --ckpt run/ --prompt "The" --dtype bfloat16'], args=_sample_args)
def _cmd_sample(args: argparse.Namespace) -> int:
    sampling = _sampling_kwargs(args)  # checked before loading anything
    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    check_decode_dtype(args.dtype, args.device)
    model = load_model(args.ckpt, args.device, (args.dtype or "bfloat16") if args.device == "cuda" else None,
                       held_weights(args.dtype, args.device)).eval()
    tok = checkpoint_tokenizer(model.checkpoint_dir, args.tokenizer)
    ids = tok.encode_prompt(args.prompt)  # BOS first as HF's tokenizer encodes it; no prompt: a new document
    context = model.config.block_size
    if ids.size >= context:
        raise ValueError(f"--prompt is {ids.size} tokens but the model's context is {context} tokens: give a prompt "
                         f"of at most {context - 1} tokens to leave room for new ones")
    n = min(args.max_new_tokens, context - ids.size)
    if n < args.max_new_tokens:
        print(f"(--max-new-tokens {args.max_new_tokens} lowered to {n}: the prompt's {ids.size} tokens and the new "
              f"ones fill the model's context of {context} tokens)", file=sys.stderr)
    stops = eos_token_ids(model.checkpoint_dir, tok)  # an HF folder's EOS ids (generation_config.json), if any
    stop = [_unescape(t) for t in args.stop]
    for i in range(args.num_samples):
        t0, stats = time.time(), {}
        print(args.prompt, end="", flush=True)
        for piece in stream_text(model, tok, ids, n, stop=stop, stats=stats, stop_tokens=stops,
                                 seed=None if args.seed is None else args.seed + i, weights=args.dtype or "float32",
                                 skip_special_tokens=args.skip_special_tokens, **sampling):
            print(piece, end="", flush=True)
        dt = time.time() - t0
        print(f"\n--- {stats['tokens']} tokens in {dt:.2f}s ({stats['tokens'] / max(dt, 1e-9):.1f} tokens/s)",
              file=sys.stderr)
    return 0


@command("sft", "fine-tune a checkpoint on conversations (JSONL of {\"messages\": [...]})",
         ["fastllm sft --base run/ --data chats.jsonl --out chat/ --max-steps 300 --lr 1e-4"],
         args=_fields_of(SFTConfig, skip=("model", *MODEL_OPTIONS), required=("base",)))
def _cmd_sft(args: argparse.Namespace) -> int:
    s = sft(_config(args, SFTConfig), progress=not args.no_progress)
    _print_summary(s)
    return 0


def _chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="fine-tuned checkpoint folder, an `fastllm sft` output folder, or a "
                                                 "Hugging Face chat model's folder (its own chat template)")
    p.add_argument("--system", default=None, help="system message (default: none)")
    p.add_argument("--chat-template-kwargs", default=None, type=_json_object, metavar="JSON",
                   help="variables for the checkpoint's chat template, as transformers' apply_chat_template(**kwargs) "
                        "takes them: '{\"enable_thinking\": false}' (Qwen3); default: none")
    _add_sampling_args(p, max_new_tokens=256, temperature=0.7)


def _json_object(text: str) -> dict:
    try:
        v = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return v


@command("chat", "chat in the terminal with a fine-tuned checkpoint (reads stdin)",
         ['fastllm chat --ckpt chat/ --system "You are helpful." --temperature 0.7'], args=_chat_args)
def _cmd_chat(args: argparse.Namespace) -> int:
    sampling = _sampling_kwargs(args)  # checked before loading anything
    model = load_model(args.ckpt, weights=held_weights(args.dtype, "cpu")).eval()
    tok = checkpoint_tokenizer(model.checkpoint_dir, args.tokenizer)
    # its own template, or ChatML
    fmt = chat_format(model.checkpoint_dir, tok, args.chat_template_kwargs) if args.tokenizer is None else None
    if args.chat_template_kwargs and not isinstance(fmt, ChatTemplate):
        raise ValueError(f"--chat-template-kwargs: {model.checkpoint_dir} has no chat template to pass them to "
                         f"(fastllm's ChatML takes no options)")
    if fmt is None and not has_chatml(tok):
        raise ValueError(f"{model.checkpoint_dir}: no chat template (chat_template.jinja, or chat_template in "
                         f"tokenizer_config.json) and no ChatML tokens ({IM_START}, {IM_END}) in its tokenizer: a base "
                         f"model; fine-tune it for chat with `fastllm sft`")
    session = ChatSession(model, tok, system=args.system, max_new_tokens=args.max_new_tokens, seed=args.seed,
                          weights=args.dtype or "float32", chat=fmt, skip_special_tokens=args.skip_special_tokens,
                          **sampling)
    if sys.stdin.isatty():
        print(f"chatting with {model.checkpoint_dir} ({model.num_parameters / 1e6:.2f}M parameters, context "
              f"{model.config.block_size} tokens); /reset clears the history, Ctrl-C stops an answer, /quit or "
              "Ctrl-D ends", file=sys.stderr)
    return chat_loop(session, sys.stdin, sys.stdout, sys.stderr)


@command("rl", "GRPO post-training on verifiable problems (built-in tasks or your JSONL), or against a reward model",
         ["fastllm rl --ckpt chat/ --task addition --out rl/ --steps 200 --group-size 8 --lr 1e-4 --beta 0.04",
          "fastllm rl --ckpt chat/ --data gsm8k_train.jsonl --eval-data gsm8k_test.jsonl --max-new-tokens 256 "
          "--out rl_gsm8k/",
          "fastllm rl --ckpt chat/ --task addition --reward my_rewards.py:score --out rl_mine/",
          "fastllm rl --ckpt chat/ --task addition --reward-model rm/ --out rl_rm/"], args=_fields_of(RLConfig))
def _cmd_rl(args: argparse.Namespace) -> int:
    s = train_grpo(_config(args, RLConfig), progress=not args.no_progress)
    print(f"done: {s['steps']} GRPO steps in {s['seconds']:.1f}s; last reward {s['reward']:.3f}, kl {s['kl']:.4f}; "
          f"held-out accuracy {s['eval_accuracy_start']:.3f} -> {s['eval_accuracy']:.3f}")
    _print_task_metrics(s)
    print(f"checkpoint: {s['checkpoint']}\nplots: {s['plot']}\nlog: {s['log']}")
    return 0


@command("reward-model", "train a reward model on JSONL preference pairs (Bradley-Terry)",
         ["fastllm reward-model --base chat/ --data prefs.jsonl --out rm/"], args=_fields_of(RewardModelConfig))
def _cmd_reward_model(args: argparse.Namespace) -> int:
    s = train_reward_model(_config(args, RewardModelConfig), progress=not args.no_progress)
    print(f"done: {s['steps']} steps on {s['train_pairs']} pairs in {s['seconds']:.1f}s; held-out accuracy "
          f"{s['val_accuracy']:.3f} on {s['val_pairs']} pairs (train {s['train_accuracy']:.3f}) -> {s['out']}")
    print(f"checkpoint: {s['checkpoint']}\nplots: {s['plot']}\nlog: {s['log']}")
    return 0


@command("dpo", "Direct Preference Optimization on JSONL preference pairs (no reward model)",
         ["fastllm dpo --base chat/ --data prefs.jsonl --out dpo/ --beta 0.1 --lr 1e-6",
          "fastllm dpo --base Qwen2.5-0.5B-Instruct/ --data prefs.jsonl --out dpo_lora/ --lora-r 16 --lr 5e-5"],
         args=_fields_of(DPOConfig))
def _cmd_dpo(args: argparse.Namespace) -> int:
    s = train_dpo(_config(args, DPOConfig), progress=not args.no_progress)
    print(f"done: {s['steps']} DPO steps on {s['train_pairs']} pairs in {s['seconds']:.1f}s; held-out accuracy "
          f"{s['val_accuracy_start']:.3f} -> {s['val_accuracy']:.3f}, margin {s['val_margin_start']:.3f} -> "
          f"{s['val_margin']:.3f} on {s['val_pairs']} pairs")
    print(f"checkpoint: {s['checkpoint']}\nplots: {s['plot']}\nlog: {s['log']}")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True,
                   help="fastllm checkpoint or run folder, or a Hugging Face model folder (Llama, Qwen, GPT-2, ...)")
    p.add_argument("--out", default=None, help="write the report (metrics + per-example records) as JSON here; an "
                   "interrupted run with the same --out resumes (default: print only)")
    p.add_argument("--tokenizer", default=None, help="tokenizer file (default: the copy in the checkpoint)")
    _add_dataclass_args(p, EvalConfig, progress=False)
    p.add_argument("--include-path", default=None,
                   help="lm-eval: a folder of your own task YAML files (default: none, the harness's tasks only)")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="lm-eval: few-shot examples per prompt (default: the task's)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="run the model on the CPU or a GPU")
    p.add_argument("--dtype", choices=DECODE_DTYPES, default=None,
                   help="compute dtype (default: float32 on the CPU, where bfloat16 runs the matmuls in bf16; "
                        "bfloat16 on a GPU); on the CPU also int8 or w8a8: the quantized weights decoding streams "
                        "(see fastllm sample --dtype), to measure what they cost")
    p.add_argument("--threads", type=int, default=None, help=THREADS)
    p.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)


@command("eval", "evaluate a checkpoint: bits per byte, multiple choice, exact match, lm-eval tasks",
         ["fastllm eval --ckpt run/ --task bpb --data data/",
          "fastllm eval --ckpt run/ --task mc --data hellaswag_val.jsonl --out hs.json",
          "fastllm eval --ckpt chat/ --task gen --data gsm8k_test.jsonl --limit 200",
          "fastllm eval --ckpt run/ --task lm-eval:arc_easy --limit 100"], args=_eval_args)
def _cmd_eval(args: argparse.Namespace) -> int:
    if args.threads:
        set_num_threads(args.threads)
    harness = args.task.startswith("lm-eval:")
    args.template, args.stop = _unescape(args.template), [_unescape(t) for t in args.stop]
    if not harness:  # check the options before loading anything
        cfg = _config(args, EvalConfig)
    quantized = args.dtype in ("int8", "w8a8")  # scored through the quantized weights decoding streams, held alone
    check_decode_dtype(args.dtype, args.device)
    model, tok = load_eval(args.ckpt, args.tokenizer, device=args.device, dtype=None if quantized else args.dtype,
                           weights=args.dtype if quantized else None)
    with model.decoding(args.dtype) if quantized else contextlib.nullcontext():
        return _eval_loaded(args, harness, None if harness else cfg, model, tok)


def _eval_loaded(args: argparse.Namespace, harness: bool, cfg, model, tok) -> int:
    if harness:
        from .eval.harness import simple_evaluate
        from .fileio import write_json

        tasks = [t for t in args.task[len("lm-eval:"):].split(",") if t]
        res = simple_evaluate(model, tok, tasks, limit=args.limit, include_path=args.include_path,
                              num_fewshot=args.num_fewshot, batch_tokens=args.batch_tokens,
                              apply_chat_template=bool(args.chat))
        from lm_eval.utils import make_table

        print(make_table(res))
        if args.out:
            keep = {k: res[k] for k in ("results", "versions", "n-shot", "n-samples") if k in res}
            write_json(args.out, json.loads(json.dumps(keep, default=str)))
        return 0
    report = evaluate(model, tok, cfg, out=args.out, progress=not args.no_progress)
    print(format_report(report))
    noun = {"bpb": "document"}.get(cfg.task, "example" if cfg.task == "mc" else "problem")
    print(f"{report['n']:,} {noun}{'s' if report['n'] != 1 else ''} in {report['seconds']:.1f}s ({args.ckpt})" +
          (f"; report: {args.out}" if args.out else ""))
    return 0


def _serve_args(p: argparse.ArgumentParser) -> None:
    _add_dataclass_args(p, ServeConfig, skip=("allow_origins",), progress=False)
    p.add_argument("--allow-origin", dest="allow_origins", action="append", default=[], metavar="ORIGIN",
                   help=field_metadata(ServeConfig, "allow_origins")["help"] + " (repeatable; default: none)")


@command("serve", "serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page",
         ["fastllm serve --ckpt chat/ --port 8000",
          "fastllm serve --ckpt chat/ --host 0.0.0.0 --api-key secret --max-batch 32 --allow-origin '*'",
          "fastllm serve --ckpt base/ --lora-modules sql=sql_lora/ chat=chat_lora/ --allow-runtime-lora"],
         args=_serve_args)
def _cmd_serve(args: argparse.Namespace) -> int:
    serve(_config(args, ServeConfig, allow_origins=tuple(args.allow_origins), lora_modules=tuple(args.lora_modules)))
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="a transformers folder: GPT-2, Llama, Mistral, Qwen2, Qwen3 (--to fastllm) or a "
                   "fastllm checkpoint (--to hf)")
    p.add_argument("dst", help="output folder (new, or empty)")
    p.add_argument("--to", choices=["fastllm", "hf"], default="fastllm", help="output format")
    p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="--to hf: shards of at most SIZE, as transformers writes them (5GB, 500MiB; default: one "
                        "model.safetensors)")


@command("convert", "convert between a Hugging Face model folder and a fastllm checkpoint",
         ["fastllm convert qwen/ ckpt/", "fastllm convert run/ hf_out/ --to hf --max-shard-size 5GB"],
         args=_convert_args)
def _cmd_convert(args: argparse.Namespace) -> int:
    size = args.max_shard_size
    out = convert(args.src, args.dst, to=args.to, max_shard_size=int(size) if size and size.isdigit() else size)
    print(f"{args.src} -> {out} ({'Hugging Face folder' if args.to == 'hf' else 'fastllm checkpoint'})")
    return 0


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print as JSON")


@command("info", "version, build flags, SIMD level, threads, CUDA", ["fastllm info", "fastllm info --json"],
         args=_info_args)
def _cmd_info(args: argparse.Namespace) -> int:
    if distributed.launched_size() not in (None, 1):  # `mpiexec -n 2 fastllm info`: MPI starts, each rank reports
        distributed.world()
    d = info()
    if args.json:
        text = json.dumps(d, indent=2)
    else:
        text = "\n".join(f"{k:14s} {v}" for k, v in d.items())
    print(text, flush=True)  # one write: the blocks of several ranks do not interleave
    return 0


@command("demo", "the whole pre-training pipeline on Python's own documentation in ~2 minutes: tokenizer, "
                 "shards, a small GPT, a sample", ["fastllm demo", "fastllm demo --out my-demo --max-steps 200"],
         args=_fields_of(DemoConfig))
def _cmd_demo(args: argparse.Namespace) -> int:
    run_demo(_config(args, DemoConfig), progress=not args.no_progress)
    return 0


# ---- parser and entry point --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastllm", formatter_class=HelpFormatter,
        description="Build a GPT end to end on native kernels: clean web text, train a BPE tokenizer, tokenize, "
                    "pre-train, sample, fine-tune, chat, post-train with RL, evaluate and serve.",
        epilog="Run `fastllm COMMAND --help` for a command's options and an example.\n"
               "New here? `fastllm demo` runs the pre-training pipeline on Python's own docs in ~2 minutes.")
    p.add_argument("--version", action="version", version=f"fastllm {__version__}",
                   help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", title="commands, in pipeline order")
    for name in sorted(COMMANDS, key=pipeline_position):
        c = COMMANDS[name]
        s = add_command_parser(sub, name, c.purpose, c.examples)
        c.add_args(s)
        if c.run is not None:  # None: a group, whose subcommands set their own
            s.set_defaults(func=c.run)
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


TRAINING = ("train", "sft", "rl", "reward-model", "dpo")  # the commands that run data-parallel under mpiexec


def _join_ranks() -> None:
    """Under an MPI launcher, join the other ranks (fastllm.distributed); ranks other than 0 print nothing but
    their errors."""
    if not distributed.world().is_main:
        sys.stdout = open(os.devnull, "w")  # for the rest of the process
        warnings.simplefilter("ignore")


def _one_process(command: str) -> None:
    """ValueError (rank 0's line, every rank stopped) when a launcher started several ranks of a command that runs
    in one process: each would run it whole, writing the same files (`fastllm info` reports every rank)."""
    if command in TRAINING or command == "info" or distributed.launched_size() in (None, 1):
        return
    n = distributed.world().size
    if n > 1:
        raise ValueError(f"`fastllm {command}` runs in one process, not as {n} MPI ranks (only train, sft, rl, "
                         "reward-model and dpo run data-parallel): run it without mpiexec, or with -n 1")


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
        _one_process(args.command)
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
