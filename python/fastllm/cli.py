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
