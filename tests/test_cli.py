"""The command line's two contracts.

It teaches: every option of every command (also ones added later) has a help line that says its default, every
command has a purpose and examples that parse, and `fastllm --help` lists the commands in pipeline order. Config
fields carry their help (fastllm.options).

It fails cleanly: whatever goes wrong inside a command ends as exactly one line `fastllm: error: ...` on stderr and
exit code 1 -- no traceback, no second line -- and the line names the culprit (the argument or the file). Every
command is checked twice: with each kind of exception raised where the command hands over to the library, and with
real bad input."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import shlex
import subprocess
import sys

import numpy as np
import pytest

from fastllm import cli
from fastllm.options import field_metadata, option

# command -> (argv, the library function it hands over to, as the CLI module names it: "module:attribute")
COMMANDS = {
    "info": (["info"], "fastllm.cli:info"),
    "train": (["train", "--data", "d", "--out", "o"], "fastllm.cli:train"),
    "sft": (["sft", "--base", "b", "--data", "c.jsonl", "--out", "o"], "fastllm.cli:sft"),
    "chat": (["chat", "--ckpt", "c"], "fastllm.cli:load_model"),
    "demo": (["demo"], "fastllm.cli:run_demo"),
    "prepare": (["prepare", "x", "--tokenizer", "t", "--out", "o"], "fastllm.cli:prepare"),
    "clean": (["clean", "x", "--out", "o"], "fastllm.cli:clean"),
    "tokenizer": (["tokenizer", "train", "x", "--vocab-size", "300", "--out", "t"], "fastllm.cli:_input_files"),
    "sample": (["sample", "--ckpt", "c"], "fastllm.cli:load_model"),
    "convert": (["convert", "s", "d"], "fastllm.cli:convert"),
    "serve": (["serve", "--ckpt", "c"], "fastllm.cli:serve"),
    "rl": (["rl", "--ckpt", "c", "--out", "o"], "fastllm.cli:train_grpo"),
    "eval": (["eval", "--ckpt", "c", "--task", "addition"], "fastllm.cli:load_eval"),
    "reward-model": (["reward-model", "--base", "b", "--data", "p.jsonl", "--out", "o"],
                     "fastllm.cli:train_reward_model"),
    "dpo": (["dpo", "--base", "b", "--data", "p.jsonl", "--out", "o"], "fastllm.cli:train_dpo"),
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
        (["tokenizer", "train", str(a_file), "--vocab-size", "300", "--out", str(tmp_path / "t"), "--max-chars", "0"],
         "--max-chars must be >= 1"),
        (["tokenizer", "train", str(a_file), "--vocab-size", "300", "--out", str(tmp_path / "t"), "--special", ""],
         "special_tokens"),
        (["sample", "--ckpt", nowhere], "nowhere"),
        (["sample", "--ckpt", str(ckpt), "--seed", "-1"], "seed"),
        (["sample", "--ckpt", str(ckpt), "--prompt", "hello " * 40], "context is 16 tokens"),
        (["convert", nowhere, str(tmp_path / "o")], "nowhere"),
        (["convert", str(ckpt), str(ckpt), "--to", "hf"], "source"),
        (["rl", "--ckpt", nowhere, "--out", str(tmp_path / "o")], "nowhere"),
        (["eval", "--ckpt", nowhere, "--task", "addition"], "nowhere"),
        (["eval", "--ckpt", str(ckpt), "--task", "mc", "--data", nowhere], "nowhere"),
        (["eval", "--ckpt", str(ckpt), "--task", "gen", "--data", str(a_file)], "file.txt:1"),
        (["eval", "--ckpt", str(ckpt), "--task", "bpb"], "needs data"),
        (["reward-model", "--base", str(ckpt), "--data", nowhere, "--out", str(tmp_path / "o")], "nowhere"),
        (["dpo", "--base", str(ckpt), "--data", nowhere, "--out", str(tmp_path / "o")], "nowhere"),
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


def test_sample_presence_and_frequency_penalties(ckpt, capsys):
    """`fastllm sample --presence-penalty / --frequency-penalty` (OpenAI's, as `fastllm serve` takes them; the
    terminal's sampler had no such flags) continue the prompt as stream_text with those penalties does."""
    from fastllm.checkpoint import load_model
    from fastllm.sample import stream_text

    model = load_model(ckpt).eval()
    tok = cli.checkpoint_tokenizer(model.checkpoint_dir, None)
    plain = "".join(stream_text(model, tok, "hello", 10, temperature=0))
    for flag, kw in (("--presence-penalty", dict(presence_penalty=50.0)), ("--frequency-penalty",
                                                                           dict(frequency_penalty=50.0))):
        want = "".join(stream_text(model, tok, "hello", 10, temperature=0, **kw))
        assert want != plain
        rc, out, _ = run(["sample", "--ckpt", str(ckpt), "--prompt", "hello", "-n", "10", "--temperature", "0",
                          flag, "50"], capsys)
        assert rc == 0 and out == "hello" + want


def test_sample_stop_reads_escapes(ckpt, capsys, monkeypatch):
    """`fastllm sample --stop '\\n\\n'` stops at a blank line, as `fastllm eval --stop` does (a shell passes "\\n" as
    two characters: sample looked for a backslash and an n)."""
    seen = []

    def stream_text(model, tok, ids, n, stop=(), stats=None, **kw):
        seen.append(stop)
        stats["tokens"] = 1
        yield "a"

    monkeypatch.setattr(cli, "stream_text", stream_text)
    rc, out, _ = run(["sample", "--ckpt", str(ckpt), "-n", "2", "--stop", "\\n\\n", "\\t", "x"], capsys)
    assert rc == 0 and seen == [["\n\n", "\t", "x"]]


def test_sample_and_chat_leave_special_tokens_out(tmp_path, capsys, monkeypatch):
    """`fastllm sample` and `fastllm chat` print the model's text without the special tokens it writes (not stop
    tokens: an <|im_start|> mid-answer), as transformers' pipelines and `transformers chat` decode with
    skip_special_tokens=True; --no-skip-special-tokens shows them."""
    import io
    import json

    import fastllm.sample
    from fastllm import Tokenizer
    from fastllm.fileio import save_safetensors
    from fastllm.model import GPT, GPTConfig
    from fastllm.sft import IM_END, IM_START

    tok = Tokenizer({bytes([b]): b for b in range(256)},
                    special_tokens={"<|endoftext|>": 256, IM_START: 257, IM_END: 258})
    model = GPT(GPTConfig(block_size=64, vocab_size=259, n_layer=1, n_head=2, n_embd=8))
    save_safetensors(tmp_path / "model.safetensors", dict(model.p), {"config": json.dumps(model.config.to_dict())})
    tok.save(tmp_path / "tokenizer.tiktoken")
    answer = [*b"Hi", 257, *b" there", 258, 256]  # (chat stops at <|im_end|>, sample at <|endoftext|>)

    def stream(model, ids, max_new_tokens, stop_tokens=(), **kw):
        for t in answer:
            yield np.array([t])
            if t in stop_tokens:
                return

    monkeypatch.setattr(fastllm.sample, "stream", stream)
    for flag, text, more in (([], "Hi there", ""), (["--no-skip-special-tokens"], f"Hi{IM_START} there", IM_END)):
        rc, out, _ = run(["sample", "--ckpt", str(tmp_path), "-n", "20", *flag], capsys)
        assert rc == 0 and out == text + more
        monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n"))
        rc, out, _ = run(["chat", "--ckpt", str(tmp_path), "-n", "20", *flag], capsys)
        assert rc == 0 and out == text + "\n"


def test_sample_says_when_the_context_cuts_max_new_tokens(ckpt, capsys):
    """-n beyond the context is lowered to what fits, and stderr says so (it was silent)."""
    rc, out, err = run(["sample", "--ckpt", str(ckpt), "--prompt", "hello", "-n", "100", "--seed", "0"], capsys)
    assert rc == 0 and "--max-new-tokens 100 lowered to" in err and "context of 16 tokens" in err
    rc, out, err = run(["sample", "--ckpt", str(ckpt), "--prompt", "hello", "-n", "3", "--seed", "0"], capsys)
    assert rc == 0 and "lowered" not in err


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


# ---- help ----------------------------------------------------------------------------------------------------


def walk(parser: argparse.ArgumentParser, path=("fastllm",)):
    """(command path, parser) for the parser and every subcommand parser below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))


def commands(parser):
    return [(" ".join(path), p) for path, p in walk(parser)]


PARSER = cli.build_parser()
ALL = commands(PARSER)


def test_walk_reaches_every_command():
    names = {name for name, _ in ALL}
    for c in cli.COMMANDS:
        assert f"fastllm {c}" in names
    assert "fastllm tokenizer train" in names


@pytest.mark.parametrize("name,parser", ALL, ids=[n for n, _ in ALL])
def test_every_option_has_help_with_its_default(name, parser):
    fmt = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help.strip(), f"{name} {label}: no help text"
        text = fmt._expand_help(action)  # what --help prints (formats %(default)s, raises on a stray %)
        flag = action.nargs == 0  # switches: --resume, --no-progress, --json, --dedup/--no-dedup
        if action.option_strings and not action.required and not flag:
            assert "default" in text, f"{name} {label}: the help does not say the default: {text!r}"


@pytest.mark.parametrize("name,parser", ALL, ids=[n for n, _ in ALL])
def test_every_command_has_a_purpose_and_examples_that_parse(name, parser):
    if name == "fastllm":
        return
    assert parser.description and len(parser.description.splitlines()) == 1
    assert parser.epilog and parser.epilog.startswith("example")
    examples = [ln.strip() for ln in parser.epilog.splitlines()[1:] if ln.strip()]
    assert examples
    for ex in examples:
        argv = shlex.split(ex)
        assert argv[0] == "fastllm"
        assert " ".join(argv[1:]).startswith(name.split(" ", 1)[1]), ex
        args = PARSER.parse_args(argv[1:])  # SystemExit (a test failure) if the example does not parse
        assert callable(getattr(args, "func", None)), ex


def test_help_lists_commands_in_pipeline_order():
    listed = [a.dest for a in PARSER._subparsers._group_actions[0]._choices_actions]
    assert set(listed) == set(cli.COMMANDS)
    missing = [c for c in cli.COMMANDS if c not in cli.PIPELINE]
    assert not missing, f"add {missing} to fastllm.cli.PIPELINE (the order `fastllm --help` lists commands in)"
    assert listed == sorted(listed, key=cli.PIPELINE.index)
    order = ["clean", "tokenizer", "prepare", "train", "sample", "sft", "chat", "rl", "eval", "serve", "convert",
             "info"]  # issue 24's order
    assert [c for c in listed if c in order] == order
    out = subprocess.run([sys.executable, "-m", "fastllm", "--help"], capture_output=True, text=True, check=True).stdout
    positions = [out.index(f"\n    {c} ") if f"\n    {c} " in out else out.index(f"\n    {c}\n") for c in listed]
    assert positions == sorted(positions)


def test_a_command_added_later_is_checked_and_ordered(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    monkeypatch.setattr(cli, "PIPELINE", cli.PIPELINE[:-1] + ("quantize",) + cli.PIPELINE[-1:])

    def args(p):
        p.add_argument("--bits", type=int, default=8)  # no help: the walk must catch it

    cli.command("quantize", "quantize a checkpoint's weights", ["fastllm quantize --bits 4"], args=args)(lambda a: 0)
    cli.command("bench", "an unordered command", ["fastllm bench"], args=lambda p: None)(lambda a: 0)
    parser = cli.build_parser()
    listed = [a.dest for a in parser._subparsers._group_actions[0]._choices_actions]
    assert listed.index("quantize") == listed.index("demo") - 1 and listed[-1] == "bench"  # not in PIPELINE: last
    quantize = dict(commands(parser))["fastllm quantize"]
    with pytest.raises(AssertionError, match="--bits: no help"):
        test_every_option_has_help_with_its_default("fastllm quantize", quantize)


def test_dataclass_flags_come_from_the_fields():
    @dataclasses.dataclass
    class Config:
        data: str = option(help="input folder")
        steps: int = option(10, "optimizer steps")
        rate: float | None = option(None, "learning rate (default: 1 / steps)")
        langs: tuple[str, ...] | None = option(None, "languages (default: all)")
        sizes: list[int] = option((1, 2), "sizes")
        mode: str = option("fast", "how", choices=("fast", "slow"))
        resume: bool = option(False, "continue")
        dedup: bool = option(True, "remove duplicates")

    @dataclasses.dataclass
    class Child(Config):
        steps: int = 20  # a new default keeps the parent's help

    p = argparse.ArgumentParser(formatter_class=cli.HelpFormatter)
    cli._add_dataclass_args(p, Child)
    a = p.parse_args(["--data", "d", "--langs", "en", "de", "--mode", "slow", "--resume", "--no-dedup", "--sizes", "3",
                      "4"])
    cfg = cli._config(a, Child)
    assert cfg == Child(data="d", steps=20, rate=None, langs=["en", "de"], sizes=[3, 4], mode="slow", resume=True,
                        dedup=False)
    text = p.format_help()
    assert "optimizer steps (default: 20)" in text and "--steps INT" in text and "--rate FLOAT" in text
    assert "learning rate (default: 1 / steps)" in text and "(default: None)" not in text
    assert field_metadata(Child, "steps")["help"] == "optimizer steps"
    with pytest.raises(SystemExit):
        p.parse_args([])  # --data is required
    with pytest.raises(SystemExit):
        p.parse_args(["--data", "d", "--mode", "medium"])
    with pytest.raises(ValueError, match="help"):
        option(1)


def test_config_help_is_on_the_fields():
    from fastllm.clean import CleanConfig
    from fastllm.demo import DemoConfig
    from fastllm.eval import EvalConfig
    from fastllm.rl import RewardModelConfig, RLConfig
    from fastllm.sample import SamplingParams
    from fastllm.serve import ServeConfig
    from fastllm.sft import SFTConfig
    from fastllm.train import TrainConfig

    for cls in (TrainConfig, SFTConfig, RLConfig, RewardModelConfig, CleanConfig, DemoConfig, SamplingParams,
                EvalConfig, ServeConfig):
        for f in dataclasses.fields(cls):
            assert field_metadata(cls, f.name).get("help"), f"{cls.__name__}.{f.name} has no help"


def test_bad_flag_value_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", "d", "--max-steps", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--max-steps: invalid int value: 'many'" in err and "Traceback" not in err
