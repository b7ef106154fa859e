"""The command line's error contract: whatever goes wrong inside a command ends as exactly one line
`fastllm: error: ...` on stderr and exit code 1 -- no traceback, no second line -- and the line names the
culprit (the argument or the file). Every command is checked twice: with each kind of exception raised where
the command hands over to the library, and with real bad input."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest

from fastllm import cli

# command -> (argv, the library function it hands over to, as the CLI module names it: "module:attribute")
COMMANDS = {
    "info": (["info"], "fastllm.cli:info"),
    "train": (["train", "--data", "d", "--out", "o"], "fastllm.cli:train"),
    "sft": (["sft", "--base", "b", "--data", "c.jsonl", "--out", "o"], "fastllm.cli:sft"),
    "chat": (["chat", "--ckpt", "c"], "fastllm.cli:load_model"),
    "demo": (["demo"], "fastllm.cli:run_demo"),
    "prepare": (["prepare", "x", "--tokenizer", "t", "--out", "o"], "fastllm.cli:prepare"),
    "clean": (["clean", "x", "--out", "o"], "fastllm.cli:clean"),
    "tokenizer": (["tokenizer", "train", "x", "--vocab-size", "300", "--out", "t"],
                  "fastllm.tokenizer:Tokenizer.train"),
    "sample": (["sample", "--ckpt", "c"], "fastllm.cli:load_model"),
    "convert": (["convert", "s", "d"], "fastllm.cli:convert"),
    "rl": (["rl", "--ckpt", "c", "--out", "o"], "fastllm.cli:train_grpo"),
    "reward-model": (["reward-model", "--base", "b", "--data", "p.jsonl", "--out", "o"],
                     "fastllm.cli:train_reward_model"),
}


def patch(monkeypatch, spec: str, fn) -> None:
    """Replace the object named by "module:attr.attr" with fn."""
    module, _, path = spec.partition(":")
    owner, *names = [importlib.import_module(module), *path.split(".")]
    for name in names[:-1]:
        owner = getattr(owner, name)
    monkeypatch.setattr(owner, names[-1], fn)

ERRORS = [
    ValueError("bad value for --x"),
    TypeError("x must be an int"),
    FileNotFoundError(2, "No such file or directory", "missing.txt"),
    OSError(28, "No space left on device"),
    KeyError("rng"),
    RuntimeError("first line\nsecond line\n\nthird"),
    ZeroDivisionError("division by zero"),
    MemoryError("Unable to allocate 16.0 TiB"),
    FloatingPointError("logits are NaN"),
    AssertionError(),
    Exception(""),
]


def test_every_command_is_listed():
    """A new command must be added to COMMANDS (and so to these tests)."""
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)


def run(argv, capsys) -> tuple[int, str, str]:
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("fastllm: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("exc", ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_any_exception_is_one_line(command, exc, monkeypatch, capsys):
    argv, spec = COMMANDS[command]

    def boom(*args, **kwargs):
        raise exc

    patch(monkeypatch, spec, boom)
    rc, out, err = run(argv, capsys)
    assert rc == 1
    line = one_error_line(err)
    if str(exc).strip():
        assert str(exc).splitlines()[0] in line  # the message survives
    if isinstance(exc, (KeyError, RuntimeError, ZeroDivisionError, MemoryError, AssertionError)):
        assert type(exc).__name__ in line  # an unexpected exception says what it was
    if isinstance(exc, FileNotFoundError):
        assert "missing.txt" in line


def test_debug_shows_the_traceback(monkeypatch, capsys):
    patch(monkeypatch, "fastllm.cli:convert", lambda *a, **k: {}["rng"])
    monkeypatch.setenv("FASTLLM_DEBUG", "1")
    rc, _, err = run(["convert", "a", "b"], capsys)
    assert rc == 1 and "Traceback" in err and err.rstrip().splitlines()[-1].startswith("fastllm: error: KeyError")


def test_keyboard_interrupt(monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    patch(monkeypatch, "fastllm.cli:convert", interrupted)
    rc, _, err = run(["convert", "a", "b"], capsys)
    assert rc == 130 and err.strip() == "interrupted"


@pytest.fixture
def ckpt(tmp_path_factory):
    """A tiny checkpoint (a fastllm model.safetensors with its config) and its tokenizer."""
    import json

    from fastllm import Tokenizer
    from fastllm.fileio import save_safetensors
    from fastllm.model import GPT, GPTConfig

    d = tmp_path_factory.mktemp("ckpt")
    tok = Tokenizer.train(["hello world, the end. " * 50], vocab_size=280, progress=False)
    model = GPT(GPTConfig(block_size=16, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=8))
    save_safetensors(d / "model.safetensors", dict(model.p), {"config": json.dumps(model.config.to_dict())})
    tok.save(d / "tokenizer.tiktoken")
    return d


def bad_inputs(tmp_path, ckpt) -> list[tuple[list[str], str]]:
    """(argv, what the error line must name) for real bad input to every command."""
    nowhere = str(tmp_path / "nowhere")
    a_file = tmp_path / "file.txt"
    a_file.write_text("hello\n")
    return [
        (["train", "--data", nowhere, "--out", str(tmp_path / "o")], "nowhere"),
        (["train", "--data", nowhere, "--out", str(tmp_path / "o"), "--threads", "100000"], "threads"),
        (["sft", "--base", nowhere, "--data", str(a_file), "--out", str(tmp_path / "o")], "nowhere"),
        (["chat", "--ckpt", nowhere], "nowhere"),
        (["chat", "--ckpt", str(ckpt), "--temperature", "nan"], "temperature"),
        (["demo", "--out", str(a_file), "--no-progress"], "file.txt"),
        (["prepare", str(a_file), "--tokenizer", nowhere, "--out", str(tmp_path / "o")], "nowhere"),
        (["tokenizer", "train", nowhere, "--vocab-size", "300", "--out", str(tmp_path / "t")], "nowhere"),
        (["tokenizer", "train", str(a_file), "--vocab-size", "300", "--out", str(tmp_path / "t"), "--special", ""],
         "special_tokens"),
        (["sample", "--ckpt", nowhere], "nowhere"),
        (["sample", "--ckpt", str(ckpt), "--seed", "-1"], "seed"),
        (["sample", "--ckpt", str(ckpt), "--prompt", "hello " * 40], "context is 16 tokens"),
        (["convert", nowhere, str(tmp_path / "o")], "nowhere"),
        (["convert", str(ckpt), str(ckpt), "--to", "hf"], "source"),
        (["rl", "--ckpt", nowhere, "--out", str(tmp_path / "o")], "nowhere"),
        (["reward-model", "--base", str(ckpt), "--data", nowhere, "--out", str(tmp_path / "o")], "nowhere"),
    ]


def test_real_bad_input(tmp_path, ckpt, capsys):
    for argv, culprit in bad_inputs(tmp_path, ckpt):
        rc, out, err = run(argv, capsys)
        assert rc == 1, argv
        assert culprit in one_error_line(err), (argv, err)


def test_nan_weights_never_print_garbage(ckpt, tmp_path, capsys):
    """NaN weights: `sample` stops with an error naming them, printing no NUL (token 0) characters. (Loading
    refuses them, naming the file and tensor; generate's own check on non-finite logits is in test_sample.py.)"""
    import json

    from fastllm.fileio import load_safetensors, save_safetensors

    bad = tmp_path / "nan"
    bad.mkdir()
    tensors, meta = load_safetensors(ckpt / "model.safetensors")
    tensors = {k: np.array(v) for k, v in tensors.items()}
    tensors["ln_f.weight"][:] = np.nan
    save_safetensors(bad / "model.safetensors", tensors, meta)
    (bad / "tokenizer.tiktoken").write_bytes((ckpt / "tokenizer.tiktoken").read_bytes())
    (bad / "tokenizer.tiktoken.json").write_bytes((ckpt / "tokenizer.tiktoken.json").read_bytes())
    assert json.loads(meta["config"])["vocab_size"] > 0
    rc, out, err = run(["sample", "--ckpt", str(bad), "--prompt", "hello", "-n", "5", "--seed", "0"], capsys)
    assert rc == 1 and "\x00" not in out
    line = one_error_line(err)
    assert "model.safetensors" in line and "'ln_f.weight'" in line and "NaN" in line


def test_chat_bad_option_fails_once(ckpt):
    """`chat --temperature nan` fails before reading any message (it used to repeat the error per message)."""
    p = subprocess.run([sys.executable, "-m", "fastllm", "chat", "--ckpt", str(ckpt), "--temperature", "nan"],
                       input="hi\nhello\n", capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    assert one_error_line(p.stderr).count("temperature") == 1


def test_error_line_examples():
    assert cli.error_line(ValueError("a\n  b")) == "fastllm: error: a b"
    assert cli.error_line(OSError(2, "No such file or directory", "x")) == \
        "fastllm: error: [Errno 2] No such file or directory: 'x'"
    assert cli.error_line(KeyError("k")).startswith("fastllm: error: KeyError: 'k' (unexpected")
