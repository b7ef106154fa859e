"""fastllm.tasks: answer extraction and comparison, JSONL problems in both forms (bad lines name file:line and the
field), rewards, the --reward hook (functions in temporary modules), and RL on your own data: GRPO from a JSONL of
generated arithmetic problems raises the accuracy on held-out problems; `fastllm rl --data --reward` end to end."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from tiny import byte_tokenizer, one_thread, supervised_batch, write_jsonl  # noqa: F401 (fixture)

import fastllm
from fastllm import rl, tasks
from fastllm.checkpoint import load_model, save
from fastllm.cli import main
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW
from fastllm.tasks import (
    FORMAT_REWARD,
    Problem,
    ProblemSet,
    extract_answer,
    load_problems,
    load_reward,
    normalize_answer,
    same_answer,
    well_formed,
)

# ---- answers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,answer", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72", "72"),
    ("#### 1,000\nmore text", "1,000"),
    ("first #### 3 then #### 4", "4"),  # the last marker
    ("#### 42 dollars", "42"), ("#### $1,200.", "$1,200"), ("#### -3.5 m", "-3.5"),  # the number it starts with
    ("#### x = 7", "x = 7"),  # no number first: the line
    ("so the answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{3} or rather \\boxed{5}", "5"),
    ("\\boxed{unbalanced", "\\boxed{unbalanced"),  # no closing brace, no number: the whole text
    ("It costs $1,200.50 in total.", "$1,200.50"),
    ("We get -3 and then 7.", "7"),
    ("x = .5", ".5"),
    ("  Paris  ", "Paris"),
    ("", ""),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_normalize_and_compare():
    assert normalize_answer("$1,000.50") == "1000.5"
    assert normalize_answer("42.0") == normalize_answer("42") == normalize_answer(" 42. ") == "42"
    assert normalize_answer("-0") == "0" and normalize_answer("1e3") == "1e3"  # only plain decimals are numbers
    assert normalize_answer("New   York.") == "New York"
    assert same_answer("The total is 1,000 dollars.", "1000")
    assert same_answer("#### 72", "72.00") and not same_answer("#### 72", "7.2")
    assert same_answer("Paris", "Paris") and not same_answer("It is Paris", "Paris")
    assert well_formed("46") and well_formed("so #### 46") and well_formed("\\boxed{x}") and not well_formed("4 6")


@pytest.mark.parametrize("got,want,equal", [
    ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
    ("\\frac12", "\\frac{1}{2}", True),
    ("1/2", "\\frac{1}{2}", True),
    ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),  # MATH-500's first answer
    ("10\\%", "10", True),
    ("90^\\circ", "90", True),
    ("x = 5", "5", True),
    ("\\sqrt2", "\\sqrt{2}", True),
    ("5\\text{ cm}", "5", True),
    ("\\$18.90", "18.90", True),
    ("\\frac{1}{3}", "\\frac{1}{2}", False),
    ("\\text{(C)}", "\\text{(D)}", False),
    ("2\\sqrt{2}", "\\sqrt{8}", False),  # equal in value, not in form (as lm-eval judges it)
])
def test_math_answers_compare_as_lm_evals_hendrycks_math(got, want, equal):
    """MATH answers in other LaTeX spellings of the same form are right, as lm-eval's hendrycks_math (and
    hendrycks_math500) is_equiv judges them; checked against it where lm-eval is installed."""
    assert same_answer(f"so the answer is $\\boxed{{{got}}}$.", want) is equal
    try:
        from lm_eval.tasks.hendrycks_math.utils import is_equiv
    except ImportError:
        return
    assert is_equiv(got, want) is equal


# ---- problems -------------------------------------------------------------------------------------------------------


def test_problem_formats_and_rewards(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "6*7=", "answer": "42"},
        {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
        {"prompt": "12+30=", "answer": 42},  # a number
        {"prompt": "Capital of France?", "answer": "Paris"},
        {"prompt": "6*7=", "answer": "42.0"},  # a duplicate with the same answer is fine
        {"problem": "Halve 1.", "solution": "It is $\\boxed{3}$, no: $\\boxed{\\frac{1}{2}}$.", "level": "Level 1"},
        {"problem": "Double 2.", "solution": "...", "answer": "4"},  # MATH-500: the answer given
    ])
    task = ProblemSet.load(path)
    assert task.name == "p.jsonl" and len(task.problems) == 7 and task.problems[1].answer == "7"
    assert [p.answer for p in task.problems[5:]] == ["\\frac{1}{2}", "4"]
    assert task.correct("Halve 1.", "so the answer is \\boxed{\\frac{1}{2}}")
    assert task.problems[0].where.endswith("p.jsonl:1")
    assert task.reward("6*7=", "42") == pytest.approx(1 + FORMAT_REWARD)
    assert task.reward("6*7=", "I think 42") == pytest.approx(1.0)  # right, not well-formed
    assert task.reward("6*7=", "41") == pytest.approx(FORMAT_REWARD)
    assert task.reward("6*7=", "no idea") == 0.0
    assert task.correct(task.problems[1].prompt, "3+4 is 7\n#### 7") and task.correct("12+30=", "\\boxed{42}")
    assert task.correct("Capital of France?", "Paris.")
    rng = np.random.default_rng(0)
    assert {task.sample(rng) for _ in range(100)} == set(task.prompts)
    with pytest.raises(ValueError, match="no problem with the prompt"):
        task.answer("7*7=")
    assert len(load_problems(path, limit=2)) == 2


@pytest.mark.parametrize("line,match", [
    ('{"answer": "4"}', r"missing field 'prompt' \(or GSM8K's 'question', MATH's 'problem'\)"),
    ('{"problem": "2+2?", "solution": "it is 4"}', r"field 'solution' has no \\boxed\{...\} final answer"),
    ('{"prompt": "2+2="}', "missing field 'answer'"),
    ('{"prompt": "", "answer": "4"}', "field 'prompt' must be a non-empty string"),
    ('{"prompt": "2+2=", "answer": ["4"]}', "field 'answer' must be a string or a number"),
    ('{"prompt": "2+2=", "answer": true}', "field 'answer' must be a string or a number"),
    ('{"prompt": "2+2=", "answer": " "}', "field 'answer' is empty"),
    ('{"question": "2+2?", "answer": "4"}', "field 'answer' has no '#### <final answer>'"),
    ('"2+2=4"', "expected a JSON object"),
    ('{"prompt": "2+2=", "answer": "4"', "bad JSON"),
])
def test_bad_problem_lines_name_file_line_and_field(tmp_path, line, match):
    f = tmp_path / "problems.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"problems.jsonl:3: {match}"):
        load_problems(f)


def test_conflicting_duplicates_and_empty_files(tmp_path):
    f = write_jsonl(tmp_path / "dup.jsonl", [{"prompt": "2+2=", "answer": "4"}, {"prompt": "2+2=", "answer": "5"}])
    with pytest.raises(ValueError, match=r"dup.jsonl:2: .*also at .*dup.jsonl:1"):
        ProblemSet.load(f)
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(ValueError, match="no problems"):
        load_problems(tmp_path / "empty.jsonl")


def test_builtin_tasks_still_importable_from_rl():
    assert rl.AdditionTask is tasks.AdditionTask and rl.SortTask is tasks.SortTask and rl.make_task is tasks.make_task
    assert rl.make_task("sort", 3).answer("sort 312=") == "123"


# ---- the --reward hook ---------------------------------------------------------------------------------------------


def test_load_reward_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def short(prompt, completion):\n    return 1.0 / (1 + len(completion))\n\n"
        "def exact(prompt, completion, answer):\n    return float(completion.strip() == answer)\n\n"
        "def bad_arity(prompt):\n    return 0.0\n\nNOT_A_FUNCTION = 3\n")
    f = load_reward(f"{tmp_path / 'my_rewards.py'}:short")
    assert f("p", "abc") == pytest.approx(0.25)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_rewards", raising=False)
    assert load_reward("my_rewards:short")("p", "") == 1.0
    task = ProblemSet([Problem("2+2=", "4")])
    g = load_reward("my_rewards:exact", task)
    assert g("2+2=", " 4") == 1.0 and g("2+2=", "5") == 0.0
    with pytest.raises(rl.RewardError, match=r"reward function exact failed on prompt '2\+2=' .*AttributeError"):
        rl.score(g, ["2+2="], [["4", None]])  # an error in the (prompt, completion, answer) function names it
    with pytest.raises(ValueError, match="needs a task with answers"):
        load_reward("my_rewards:exact")
    with pytest.raises(ValueError, match="takes 1 required arguments"):
        load_reward("my_rewards:bad_arity")
    with pytest.raises(ValueError, match="'NOT_A_FUNCTION' is a int, not a function"):
        load_reward("my_rewards:NOT_A_FUNCTION")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        load_reward("my_rewards:nope")
    with pytest.raises(ValueError, match="module:function"):
        load_reward("my_rewards")
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_xyz'"):
        load_reward("no_such_module_xyz:f")
    with pytest.raises(FileNotFoundError, match="no file"):
        load_reward(f"{tmp_path / 'missing.py'}:f")


# ---- RL on your own verifiable data ------------------------------------------------------------------------------


def carry_free_additions():
    """Two-digit additions whose digit sums need no carry ("23+45=" -> "68"): 1,980 problems that share 55
    one-digit facts, so a tiny model can answer problems it never saw."""
    return [Problem(f"{a}+{b}=", str(a + b)) for a in range(10, 100) for b in range(10, 100)
            if a % 10 + b % 10 <= 9 and a // 10 + b // 10 <= 9]


def write_problems(path, problems) -> str:
    """Half the lines in each form: {"prompt", "answer"} and GSM8K's {"question", "answer ... #### N"}."""
    return write_jsonl(path, [{"prompt": p.prompt, "answer": p.answer} if i % 2 else
                              {"question": p.prompt, "answer": f"{p.prompt}{p.answer}\n#### {p.answer}"}
                              for i, p in enumerate(problems)])


@pytest.fixture(scope="module")
def warm_adder(tmp_path_factory):
    """A tiny GPT warmed up (supervised, 100 steps) on 64 of the problems; JSONL files of 100 held-out problems and
    of the rest (the RL pool). Returns (checkpoint, pool file, held-out file)."""
    fastllm.set_num_threads(1)
    d = tmp_path_factory.mktemp("adder")
    tok = byte_tokenizer()
    tok.save(d / "tok.tiktoken")
    rng = np.random.default_rng(0)
    probs = carry_free_additions()
    perm = rng.permutation(len(probs))
    held, warm, pool = ([probs[i] for i in perm[a:b]] for a, b in ((0, 100), (100, 164), (164, len(probs))))
    m = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=2, n_head=2, n_embd=64), seed=0)
    opt = AdamW(m, 3e-3, weight_decay=0.0)
    for _ in range(100):
        batch = [warm[i] for i in rng.integers(0, len(warm), 16)]
        m.zero_grad()
        m.forward(*supervised_batch(tok, [(p.prompt, p.answer) for p in batch]))
        m.backward()
        opt.step()
    ck = save(d / "warm", 100, m, opt, {}, kind="sft", tokenizer=d / "tok.tiktoken")
    return ck, write_problems(d / "pool.jsonl", pool), write_problems(d / "held.jsonl", held)


def test_grpo_on_jsonl_problems_raises_held_out_accuracy(warm_adder, tmp_path):
    """`--data pool.jsonl --eval-data held.jsonl`: GRPO samples the pool's problems only; the greedy accuracy on the
    100 held-out problems rises (measured, seeds 0-5 of this setup with 150 warm-up steps: 0.28->0.63,
    0.42->0.80, 0.27->0.73, 0.13->0.39, ...; this one, 100 warm-up steps: 0.26 -> 0.68, ~10 s on one core)."""
    ck, pool, held = warm_adder
    cfg = rl.RLConfig(ckpt=str(ck), out=str(tmp_path / "rl"), data=pool, eval_data=held, steps=150, prompts_per_step=8,
                      group_size=16, max_new_tokens=4, lr=5e-4, beta=0.01, eval_every=150, eval_prompts=100,
                      ckpt_every=150)
    s = rl.train_grpo(cfg, progress=False, log=lambda *_: None)
    print(f"\nGRPO on {pool}: held-out greedy accuracy {s['eval_accuracy_start']:.2f} -> {s['eval_accuracy']:.2f}")
    assert s["eval_accuracy_start"] < 0.5
    assert s["eval_accuracy"] >= s["eval_accuracy_start"] + 0.15
    # the same figure through fastllm eval's generative task on the held-out file
    from fastllm.eval import evaluate

    rep = evaluate(load_model(s["checkpoint"]), byte_tokenizer(), "gen", data=held, max_new_tokens=4)
    assert rep["metrics"]["exact_match"] == pytest.approx(s["eval_accuracy"])
    rows = [json.loads(x) for x in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["reward"]) for r in rows if "reward" in r)


def test_cli_rl_with_data_and_a_reward_function(warm_adder, tmp_path, capsys):
    ck, pool, held = warm_adder
    (tmp_path / "rewards.py").write_text(
        "calls = []\n"
        "def digits_then_answer(prompt, completion, answer):\n"
        "    calls.append(prompt)\n"
        "    return float(completion.strip() == answer) + 0.5 * completion.isdigit()\n")
    base = ["rl", "--ckpt", str(ck), "--data", pool, "--eval-data", held, "--steps", "2", "--prompts-per-step", "2",
            "--group-size", "3", "--max-new-tokens", "4", "--eval-every", "2", "--eval-prompts", "10", "--no-progress"]
    rc = main(base + ["--out", str(tmp_path / "a"), "--reward", f"{tmp_path / 'rewards.py'}:digits_then_answer"])
    out = capsys.readouterr().out
    assert rc == 0 and "held-out accuracy" in out
    state = json.loads((tmp_path / "a" / "ckpt_000002" / "state.json").read_text())
    assert state["config"]["data"] == pool and state["config"]["reward"].endswith(":digits_then_answer")
    # bad inputs: one line each
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "1+1=", "answer": "2"}, {"prompt": "2+2="}])
    for extra, msg in [(["--data", bad], "bad.jsonl:2: missing field 'answer'"),
                       (["--reward", "nope_module_xyz:f"], "cannot import module"),
                       (["--reward", "x:y", "--reward-model", str(tmp_path)], "not both")]:
        rc = main(base + ["--out", str(tmp_path / "b")] + extra)
        err = capsys.readouterr().err
        assert rc == 1 and msg in err and err.startswith("fastllm: error:"), err
