"""Evaluation tasks during training (`fastllm train/sft/rl --eval-task T --eval-task-data FILE`, eval.TrainEval):
the task's metrics are logged at every evaluation step (the start, every --eval-every steps, the end) with the values
a direct `fastllm.eval.evaluate` gives on the checkpoint of that step; a bad file is refused, naming file:line, before
step 0; the run's figure draws the metrics; bad option combinations name the option."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from tiny import EOT, byte_tokenizer, one_thread, write_jsonl  # noqa: F401 (one_thread: one OpenMP thread per test)

from fastllm.checkpoint import checkpoint_tokenizer, load_model
from fastllm.data import write_shard
from fastllm.eval import TrainEval, evaluate
from fastllm.model import GPT
from fastllm.plot import task_metric_keys, training_figure
from fastllm.rl import RLConfig, train_grpo
from fastllm.sft import SFTConfig, sft
from fastllm.train import TrainConfig, train

SOUNDS = {"cat": "meow", "dog": "woof", "cow": "moo", "duck": "quack", "owl": "hoot", "bee": "buzz"}
QUIET = dict(progress=False, log=lambda *a: None)


def rows_of(out) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def logged(rows: list[dict], prefix: str) -> dict[int, dict]:
    """step -> the metrics "<prefix>/..." logged at that step."""
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(prefix + "/")} for r in rows
            if any(k.startswith(prefix + "/") for k in r)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Token shards of "the cat says meow." sentences with a byte-level tokenizer beside them, and a multiple-choice
    file on the same animals (13 examples: an odd count, which 2 ranks share unequally)."""
    d = tmp_path_factory.mktemp("train_eval")
    tok = byte_tokenizer()
    rng = np.random.default_rng(0)
    animals = list(SOUNDS)
    ids = []
    for _ in range(400):
        a = animals[rng.integers(len(animals))]
        ids += tok.encode(f"the {a} says {SOUNDS[a]}.").tolist() + [EOT]
    (d / "data").mkdir()
    write_shard(d / "data" / "train_000000.bin", np.array(ids[:-400]), EOT + 1)
    write_shard(d / "data" / "val_000000.bin", np.array(ids[-400:]), EOT + 1)
    tok.save(d / "data" / "tokenizer.tiktoken")
    sounds = list(SOUNDS.values())
    mc = []
    for k in (0, 1):
        for i, a in enumerate(animals):  # the animal's sound among three others, at place (i + k) % 4
            others = [x + "." for x in sounds if x != SOUNDS[a]][2 * k: 2 * k + 3]
            at = (i + k) % 4
            mc.append({"context": f"the {a} says", "choices": others[:at] + [SOUNDS[a] + "."] + others[at:],
                       "answer": at})
    mc.append({"context": "the cat", "choices": ["says moo.", "says meow."], "answer": "says meow."})
    write_jsonl(d / "mc.jsonl", mc)
    (d / "text.txt").write_text("the dog says woof. the owl says hoot.<|endoftext|>the bee says buzz.")
    write_jsonl(d / "text.jsonl", [{"text": "the cow says moo."}, {"text": "the duck says quack."}])
    write_jsonl(d / "bad.jsonl", [mc[0], {"context": "x", "choices": ["a", "b"]}])
    chats = [{"messages": [{"role": "user", "content": a}, {"role": "assistant", "content": s}]}
             for a, s in SOUNDS.items()]
    write_jsonl(d / "chats.jsonl", chats * 3)
    return d


def train_config(d, **kw) -> TrainConfig:
    base = dict(data=str(d / "data"), out=str(d / "run"), model="tiny", batch_size=4, seq_len=32, max_steps=300,
                lr=1e-2, warmup_steps=10, eval_every=100, eval_batches=2, ckpt_every=100, keep_ckpts=5, threads=1,
                eval_task="mc", eval_task_data=[str(d / "mc.jsonl")])
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def run(files):
    cfg = train_config(files)
    summary = train(cfg, **QUIET)
    return files, cfg, summary


def test_train_logs_the_metric_equal_to_evaluate_on_each_checkpoint(run):
    d, cfg, summary = run
    rows = rows_of(d / "run")
    got = logged(rows, "mc")
    assert sorted(got) == [0, 100, 200, 300]  # the start, every eval_every steps, the end
    assert all("val_loss" in r for r in rows if "mc/acc" in r)  # beside the validation loss
    tok = checkpoint_tokenizer(d / "data")
    start = GPT(cfg.model_config(EOT + 1), seed=cfg.seed)  # what step 0 evaluated: the initial model
    for step, model in [(0, start)] + [(s, load_model(d / "run" / f"ckpt_{s:06d}")) for s in (100, 200, 300)]:
        want = evaluate(model, tok, "mc", data=str(d / "mc.jsonl"))["metrics"]
        assert got[step] == {f"mc/{k}": pytest.approx(v, rel=1e-12) for k, v in want.items()}, step
    assert set(got[300]) == {"mc/acc", "mc/acc_stderr", "mc/acc_norm", "mc/acc_norm_stderr", "mc/acc_norm_chars",
                             "mc/acc_norm_chars_stderr"}
    assert got[0]["mc/acc"] < 0.5 < 0.8 < got[300]["mc/acc"]  # the model learns the sounds: the metric moves
    assert summary["eval_task"] == got[300]


def test_the_figure_draws_the_metric(run):
    d, _, _ = run
    rows = rows_of(d / "run")
    assert task_metric_keys(rows) == ["mc/acc", "mc/acc_norm"]
    fig = training_figure(rows)
    panel = next(ax for ax in fig.axes if ax.get_title() == "evaluation: mc")
    lines = {ln.get_label(): ln for ln in panel.lines}
    for key in ("mc/acc", "mc/acc_norm"):
        steps, values = zip(*[(r["step"], r[key]) for r in rows if key in r])
        np.testing.assert_array_equal(lines[key].get_xdata(), steps)
        np.testing.assert_array_equal(lines[key].get_ydata(), values)
    assert len(fig.axes) == 5  # loss, lr, grad norm, throughput, the task; no empty frame
    assert len(training_figure([r for r in rows if "mc/acc" not in r]).axes) == 4
    assert (d / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_train_bits_per_byte(run, tmp_path):
    """The flags from the command line (--eval-task-data takes several files), bits per byte, and the summary."""
    d, _, _ = run
    out = tmp_path / "bpb"
    r = subprocess.run([sys.executable, "-m", "fastllm", "train", "--no-progress", "--data", str(d / "data"),
                        "--out", str(out), "--model", "tiny", "--batch-size", "4", "--seq-len", "32", "--max-steps",
                        "4", "--eval-every", "2", "--eval-batches", "1", "--ckpt-every", "2", "--threads", "1",
                        "--eval-task", "bpb",
                        "--eval-task-data", str(d / "text.txt"), str(d / "text.jsonl"), "--eval-task-limit", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = logged(rows_of(out), "bpb")
    assert sorted(got) == [0, 2, 4]
    tok = checkpoint_tokenizer(d / "data")
    for step in (2, 4):
        want = evaluate(load_model(out / f"ckpt_{step:06d}"), tok, "bpb", data=[str(d / "text.txt"),
                        str(d / "text.jsonl")], limit=3)["metrics"]
        assert got[step] == {f"bpb/{k}": pytest.approx(v, rel=1e-12) for k, v in want.items()}
    assert got[4]["bpb/bytes"] == len("the dog says woof. the owl says hoot.the bee says buzz.the cow says moo.")
    assert f"eval task: bpb/bpb {want['bpb']:.4f}" in r.stdout


def test_sft_logs_the_metric_equal_to_evaluate(run, tmp_path):
    """Bits per byte (a continuous measure: equal values mean the same weights were evaluated)."""
    d, _, _ = run
    cfg = SFTConfig(base=str(d / "run"), data=str(d / "chats.jsonl"), out=str(tmp_path / "sft"), batch_size=2,
                    seq_len=32, max_steps=4, lr=1e-3, eval_every=2, eval_batches=1, ckpt_every=2, keep_ckpts=3,
                    threads=1, eval_task="bpb", eval_task_data=[str(d / "text.txt")])
    summary = sft(cfg, **QUIET)
    got = logged(rows_of(tmp_path / "sft"), "bpb")
    assert sorted(got) == [0, 2, 4] and len({g["bpb/bpb"] for g in got.values()}) == 3
    for step in (2, 4):
        model = load_model(tmp_path / "sft" / f"ckpt_{step:06d}")
        want = evaluate(model, checkpoint_tokenizer(model.checkpoint_dir), "bpb", data=str(d / "text.txt"))["metrics"]
        assert got[step] == {f"bpb/{k}": pytest.approx(v, rel=1e-12) for k, v in want.items()}
    assert summary["eval_task"] == got[4]


def test_rl_logs_the_metric_equal_to_evaluate(run, tmp_path):
    d, _, _ = run
    cfg = RLConfig(ckpt=str(d / "run"), out=str(tmp_path / "rl"), task="addition", digits=1, steps=2, lr=1e-3,
                   prompts_per_step=2, group_size=2, max_new_tokens=3, eval_every=1, eval_prompts=4, ckpt_every=1,
                   keep_ckpts=3, threads=1, eval_task="bpb", eval_task_data=str(d / "text.jsonl"), eval_task_limit=1)
    summary = train_grpo(cfg, reward_fn=lambda p, c: float(sum(map(ord, c)) % 7), **QUIET)  # rewards that differ
    rows = rows_of(tmp_path / "rl")
    got = logged(rows, "bpb")
    assert sorted(got) == [0, 1, 2] and len({g["bpb/bpb"] for g in got.values()}) == 3
    assert all("eval_accuracy" in r for r in rows if "bpb/bpb" in r)  # beside the held-out accuracy
    for step in (1, 2):
        model = load_model(tmp_path / "rl" / f"ckpt_{step:06d}")
        want = evaluate(model, checkpoint_tokenizer(model.checkpoint_dir), "bpb", data=str(d / "text.jsonl"),
                        limit=1)["metrics"]
        assert got[step] == {f"bpb/{k}": pytest.approx(v, rel=1e-12) for k, v in want.items()}
    assert got[2]["bpb/bytes"] == len("the cow says moo.")  # the limit: the first document only
    assert summary["eval_task"] == got[2]


@pytest.mark.parametrize("command", ["train", "sft", "rl"])
def test_a_bad_file_fails_before_step_0(run, tmp_path, command):
    d, _, _ = run
    out = tmp_path / "out"
    flags = {"train": ["--data", str(d / "data")], "sft": ["--base", str(d / "run"), "--data", str(d / "chats.jsonl")],
             "rl": ["--ckpt", str(d / "run")]}[command]
    r = subprocess.run([sys.executable, "-m", "fastllm", command, "--no-progress", *flags, "--out", str(out),
                        "--threads", "1", "--eval-task", "mc", "--eval-task-data", str(d / "bad.jsonl")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout
    assert r.stderr.startswith("fastllm: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert f"{d / 'bad.jsonl'}:2: missing field 'answer'" in r.stderr
    assert not (out / "log.jsonl").exists() and not list(out.glob("ckpt_*"))


@pytest.mark.parametrize("kw, match", [
    (dict(eval_task="hellaswag"), "eval_task: unknown task 'hellaswag'"),
    (dict(eval_task="mc", eval_task_data=[]), r"eval_task='mc' needs its files: --eval-task-data"),
    (dict(eval_task=None), "eval_task_data and eval_task_limit need eval_task"),
    (dict(eval_task_limit=0), "eval_task_limit must be an integer >= 1"),
    (dict(eval_every=0), "eval_every=0"),
])
def test_bad_options_name_the_option(files, kw, match):
    with pytest.raises(ValueError, match=match):
        train_config(files, **kw)


def test_train_without_a_tokenizer_is_refused(files, tmp_path):
    (tmp_path / "data").mkdir()
    for f in ("train_000000.bin", "val_000000.bin"):
        (tmp_path / "data" / f).write_bytes((files / "data" / f).read_bytes())
    with pytest.raises(ValueError, match="eval_task needs the data's tokenizer"):
        train(train_config(files, data=str(tmp_path / "data"), out=str(tmp_path / "o")), **QUIET)


def test_generated_task_and_tokenizer_given_later(files):
    """addition needs no file; bpb without a tokenizer at construction is tokenized at the first call."""
    tok = byte_tokenizer()
    model = GPT(train_config(files).model_config(EOT + 1), seed=0)
    got = TrainEval("addition", limit=3, max_new_tokens=2)(model, tok)
    assert set(got) == {"addition/exact_match", "addition/exact_match_stderr"}
    late = TrainEval("bpb", data=str(files / "text.txt"))
    assert late(model, tok) == TrainEval("bpb", data=str(files / "text.txt"), tokenizer=tok)(model, tok)
