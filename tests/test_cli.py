"""The command line teaches: every option of every command (also ones added later) has a help line that says its
default, every command has a purpose and examples that parse, and `fastllm --help` lists the commands in
pipeline order. Config fields carry their help (fastllm.options)."""

import argparse
import dataclasses
import shlex
import subprocess
import sys

import pytest

from fastllm import cli
from fastllm.options import field_metadata, option


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
    order = [c for c in ("clean", "tokenizer", "prepare", "train", "sample", "sft", "chat", "rl", "convert", "info")]
    assert [c for c in listed if c in order] == order
    out = subprocess.run([sys.executable, "-m", "fastllm", "--help"], capture_output=True, text=True, check=True).stdout
    positions = [out.index(f"\n    {c} ") if f"\n    {c} " in out else out.index(f"\n    {c}\n") for c in listed]
    assert positions == sorted(positions)


def test_a_command_added_later_is_checked_and_ordered(monkeypatch):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))

    def args(p):
        p.add_argument("--port", type=int, default=8000)  # no help: the walk must catch it

    cli.command("serve", "serve a checkpoint over HTTP", ["fastllm serve --port 8080"], args=args)(lambda a: 0)
    parser = cli.build_parser()
    listed = [a.dest for a in parser._subparsers._group_actions[0]._choices_actions]
    assert listed.index("serve") == listed.index("convert") - 1  # between rl/reward-model and convert
    serve = dict(commands(parser))["fastllm serve"]
    with pytest.raises(AssertionError, match="--port: no help"):
        test_every_option_has_help_with_its_default("fastllm serve", serve)


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
    from fastllm.rl import RewardModelConfig, RLConfig
    from fastllm.sample import SamplingParams
    from fastllm.sft import SFTConfig
    from fastllm.train import TrainConfig

    for cls in (TrainConfig, SFTConfig, RLConfig, RewardModelConfig, CleanConfig, DemoConfig, SamplingParams):
        for f in dataclasses.fields(cls):
            assert field_metadata(cls, f.name).get("help"), f"{cls.__name__}.{f.name} has no help"


def test_bad_flag_value_is_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--data", "d", "--max-steps", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--max-steps: invalid int value: 'many'" in err and "Traceback" not in err
