"""Verifiable tasks: prompts whose completions a program can check, for RL rewards (fastllm.rl) and generative
evaluation (fastllm.eval).

A task has `name`, `sample(rng) -> prompt`, `answer(prompt) -> str`, `correct(prompt, completion) -> bool` and
`reward(prompt, completion) -> float` (also its `__call__`): 1 for a correct answer + FORMAT_REWARD (0.1) for a
well-formed one. Built in, with generated prompts:
    addition  "12+34=" -> "46" (operands of `digits` digits); a completion is correct if it IS the sum
    sort      "sort 3142=" -> "1234" (`digits` random digits)
From files (`ProblemSet.load(path)`), JSONL with one problem per line (or Parquet rows, as the Hugging Face Hub
ships them), in any of these forms:
    {"prompt": "What is 6 times 7?", "answer": "42"}                       (answer: a string or a number)
    {"question": "Natalia sold ...", "answer": "She sold ... #### 72"}     (GSM8K: the answer after ####)
    {"problem": "Compute ...", "solution": "... \\boxed{\\frac{1}{2}}"}      (MATH: the last \\boxed{}; or an "answer")
A bad line raises ValueError naming file:line and the field.

Answers in completions (`extract_answer`, documented order): the text after the last `####` (to the end of its
line), else the content of the last `\\boxed{...}`, else the last number in the text, else the whole stripped text.
Comparison (`same_answer`): numbers numerically after dropping thousands separators and a leading `$`
("1,000" == "1000.0"), other answers as text with surrounding whitespace and a trailing period ignored, or equal
in the canonical LaTeX form of lm-eval's MATH tasks (`latex_answer`: "\\dfrac{1}{2}" == "\\frac12").
A completion is well-formed (the format reward) when it is a bare number or marks its answer with `####` or
`\\boxed{}`.

Your own reward: `load_reward("module:function")` (or "path/to/file.py:function") imports a Python function
`(prompt, completion) -> float`, or `(prompt, completion, answer) -> float` to also get the reference answer.

>>> task = ProblemSet.load("gsm8k_train.jsonl")
>>> task.reward(task.problems[0].prompt, "... so the answer is #### 72")
1.1
"""

from __future__ import annotations

import decimal
import functools
import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .fileio import iter_records

RewardFn = Callable[[str, str], float]
FORMAT_REWARD = 0.1  # added to the reward of a well-formed completion, right or wrong

# ---- answers --------------------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\$?\.\d+")
_BOXED = "\\boxed{"


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (braces inside balanced), or None."""
    i = text.rfind(_BOXED)
    if i < 0:
        return None
    depth, start = 1, i + len(_BOXED)
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[start:j]
    return None  # unbalanced: not an answer


def extract_answer(text: str) -> str:
    """The final answer in a completion (or a GSM8K reference answer): after the last `####` (the number it starts
    with, as lm-eval's gsm8k strict-match reads it: "#### 42 dollars" is 42; else the rest of its line), else the
    last `\\boxed{}`, else the last number, else the whole text (stripped).

    >>> extract_answer("3 + 4 = 7, then 7 * 2 = 14.\\n#### 14"), extract_answer("so $\\\\boxed{\\\\frac{1}{2}}$")
    ('14', '\\\\frac{1}{2}')
    >>> extract_answer("He pays $1,200 in total."), extract_answer("Paris")
    ('$1,200', 'Paris')
    """
    if "####" in text:
        line = text.rsplit("####", 1)[1].strip().split("\n", 1)[0].strip()
        number = _NUMBER.match(line)
        return number.group() if number else line
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    return text.strip()


def normalize_answer(answer: str) -> str:
    """Canonical form for comparison: a number as its plain decimal value ("$1,000.50" -> "1000.5",
    "42.0" -> "42"); other text stripped of surrounding whitespace and a trailing period, inner runs of
    whitespace collapsed.

    >>> normalize_answer(" $1,000.50 "), normalize_answer("-0"), normalize_answer("New  York.")
    ('1000.5', '0', 'New York')
    """
    s = " ".join(str(answer).split()).rstrip(".").strip()
    num = s.replace("$", "", 1).replace(",", "") if re.fullmatch(r"-?\$?[\d,]*\.?\d+", s) else None
    if num is not None:
        try:
            d = decimal.Decimal(num).normalize()
        except decimal.InvalidOperation:
            return s
        d = d.quantize(decimal.Decimal(1)) if d == d.to_integral_value() else d
        return "0" if d.is_zero() else format(d, "f")
    return s


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{72} -> \\frac{1}{72} (lm-eval's hendrycks_math fix_fracs)."""
    head, *rest = s.split("\\frac")
    out = head
    for sub in rest:
        out += "\\frac"
        if sub[:1] == "{":
            out += sub
        elif len(sub) < 2:
            return s
        elif sub[1] != "{":
            out += "{" + sub[0] + "}{" + sub[1] + "}" + sub[2:]
        else:
            out += "{" + sub[0] + "}" + sub[1:]
    return out


def latex_answer(answer: str) -> str:
    r"""A (MATH-style) LaTeX answer in the canonical form of lm-eval's hendrycks_math `strip_string`: no spaces,
    \left/\right, degrees, \$, \% or units (`\text{ ...}`), dfrac/tfrac as frac, \frac12 and 1/2 as
    \frac{1}{2}, \sqrt2 as \sqrt{2}, a leading "x =" dropped, .5 as 0.5 (and 0.5 as \frac{1}{2}).

    >>> latex_answer(r"\dfrac12"), latex_answer(r"\left( 3, \frac{\pi}{2} \right)"), latex_answer("x = 1/2")
    ('\\frac{1}{2}', '(3,\\frac{\\pi}{2})', '\\frac{1}{2}')
    """
    s = str(answer).replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    for a, b in (("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""),
                 ("^\\circ", ""), ("\\$", "")):
        s = s.replace(a, b)
    if s.count("\\text{ ") == 1:  # units on the right
        s = s.split("\\text{ ")[0]
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    s = "0" + s if s.startswith(".") else s
    if s.count("=") == 1 and len(s.split("=")[0]) <= 2:  # "k = 5"
        s = s.split("=")[1]
    head, *rest = s.split("\\sqrt")
    s = head + "".join("\\sqrt" + (r if r[:1] in ("{", "") else "{" + r[0] + "}" + r[1:]) for r in rest)
    s = _fix_fracs(s.replace(" ", ""))
    if s == "0.5":
        s = "\\frac{1}{2}"
    m = re.fullmatch(r"(-?\d+)/(-?\d+)", s)
    return "\\frac{" + m.group(1) + "}{" + m.group(2) + "}" if m else s


def same_answer(completion: str, answer: str) -> bool:
    """Whether the answer extracted from `completion` equals the reference `answer`: both normalized
    (normalize_answer), or both in the canonical LaTeX form of lm-eval's MATH tasks (latex_answer:
    "\\dfrac{1}{2}" == "\\frac12", "\\left( 3, \\pi \\right)" == "(3,\\pi)", "10\\%" == "10")."""
    got = extract_answer(completion)
    return (normalize_answer(got) == normalize_answer(answer)
            or normalize_answer(latex_answer(got)) == normalize_answer(latex_answer(answer)))


def well_formed(completion: str) -> bool:
    """A bare number, or an answer marked with `####` or `\\boxed{}`: what the format reward pays for."""
    c = completion.strip()
    return bool(_NUMBER.fullmatch(c)) or re.search(r"####\s*\S", c) is not None or _last_boxed(c) is not None


# ---- built-in tasks with generated prompts ------------------------------------------------------------------


class AdditionTask:
    """ "a+b=" -> "a+b" for `digits`-digit operands. reward = 1 (exact) + 0.1 (digits only).

    >>> AdditionTask(2).reward("12+34=", "46")
    1.1
    """

    name = "addition"
    max_digits: int | None = 18  # operands below 10**18: numpy's int64 draws them
    _re = re.compile(r"^(\d+)\+(\d+)=$")

    def __init__(self, digits: int = 2):
        top = self.max_digits
        if isinstance(digits, bool) or not isinstance(digits, int) or digits < 1 or (top and digits > top):
            raise ValueError(f"digits must be an integer in [1, {top or 'inf'}] for the {self.name} task, "
                             f"got {digits!r}")
        self.digits = digits

    def sample(self, rng: np.random.Generator) -> str:
        a, b = rng.integers(0, 10**self.digits, 2)
        return f"{a}+{b}="

    def answer(self, prompt: str) -> str:
        m = self._re.match(prompt)
        if not m:
            raise ValueError(f"not an addition prompt: {prompt!r}")
        return str(int(m.group(1)) + int(m.group(2)))

    def correct(self, prompt: str, completion: str) -> bool:
        return completion.strip() == self.answer(prompt)

    def reward(self, prompt: str, completion: str) -> float:
        return float(self.correct(prompt, completion)) + (FORMAT_REWARD if re.fullmatch(r"\d+", completion) else 0.0)

    __call__ = reward


class SortTask(AdditionTask):
    """ "sort 3142=" -> "1234": sort `digits` random digits. Same rewards as AdditionTask."""

    name = "sort"
    max_digits = None
    _re = re.compile(r"^sort (\d+)=$")

    def sample(self, rng: np.random.Generator) -> str:
        return "sort " + "".join(str(d) for d in rng.integers(0, 10, self.digits)) + "="

    def answer(self, prompt: str) -> str:
        m = self._re.match(prompt)
        if not m:
            raise ValueError(f"not a sort prompt: {prompt!r}")
        return "".join(sorted(m.group(1)))


TASKS = {"addition": AdditionTask, "sort": SortTask}


def make_task(name: str, digits: int = 2):
    """A built-in task by name (TASKS)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](digits)


# ---- problems from JSONL ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    prompt: str
    answer: str  # the reference final answer (for GSM8K, what follows ####)
    where: str = ""  # file:line it came from


def parse_problem(obj, where: str) -> Problem:
    """One JSONL object -> Problem: {"prompt", "answer"}, GSM8K's {"question", "answer ... #### 42"}, or MATH's
    {"problem", "solution ... \\boxed{42}"} (or {"problem", "answer"}, as MATH-500 has it)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    key = next((k for k in ("prompt", "question", "problem") if k in obj), None)
    if key is None:
        raise ValueError(f"{where}: missing field 'prompt' (or GSM8K's 'question', MATH's 'problem'); fields: "
                         f"{sorted(obj)}")
    if not isinstance(obj[key], str) or not obj[key]:
        raise ValueError(f"{where}: field {key!r} must be a non-empty string, got {obj[key]!r}")
    if key == "problem" and "answer" not in obj and "solution" in obj:
        boxed = _last_boxed(obj["solution"]) if isinstance(obj["solution"], str) else None
        if boxed is None or not boxed.strip():
            raise ValueError(f"{where}: field 'solution' has no \\boxed{{...}} final answer (MATH form)")
        return Problem(obj[key], boxed.strip(), where)
    if "answer" not in obj:
        raise ValueError(f"{where}: missing field 'answer'")
    ans = obj["answer"]
    if isinstance(ans, bool) or not isinstance(ans, (str, int, float)):
        raise ValueError(f"{where}: field 'answer' must be a string or a number, got {ans!r}")
    ans = str(ans)
    if key == "question" or "####" in ans:
        if "####" not in ans:
            raise ValueError(f"{where}: field 'answer' has no '#### <final answer>' (GSM8K form)")
        ans = extract_answer(ans)
    if not ans.strip():
        raise ValueError(f"{where}: field 'answer' is empty")
    return Problem(obj[key], ans, where)


def load_problems(path: str | os.PathLike, limit: int | None = None) -> list[Problem]:
    """Problems of a JSONL file (the first `limit`); ValueError naming file:line for a bad line or an empty file."""
    problems = []
    for where, obj in iter_records(path):
        if limit is not None and len(problems) >= limit:
            break
        problems.append(parse_problem(obj, where))
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


class ProblemSet:
    """A verifiable task over a fixed list of problems: sample() draws one of them, correct() compares the
    extracted answer (module doc), reward() = 1 (correct) + 0.1 (well-formed).

    >>> task = ProblemSet([Problem("6*7=", "42")])
    >>> task.reward("6*7=", "#### 42"), task.reward("6*7=", "41")
    (1.1, 0.1)
    """

    def __init__(self, problems: Sequence[Problem], name: str = "problems"):
        self.problems, self.name = list(problems), name
        if not self.problems:
            raise ValueError(f"{name}: no problems")
        self._answers: dict[str, Problem] = {}
        for p in self.problems:
            seen = self._answers.setdefault(p.prompt, p)
            if normalize_answer(seen.answer) != normalize_answer(p.answer):
                raise ValueError(f"{p.where}: prompt {p.prompt[:60]!r} also at {seen.where} with another answer "
                                 f"({p.answer!r} vs {seen.answer!r})")

    @classmethod
    def load(cls, path: str | os.PathLike, limit: int | None = None) -> ProblemSet:
        return cls(load_problems(path, limit), Path(path).name)

    @property
    def prompts(self) -> list[str]:
        return [p.prompt for p in self.problems]

    def sample(self, rng: np.random.Generator) -> str:
        return self.problems[int(rng.integers(len(self.problems)))].prompt

    def answer(self, prompt: str) -> str:
        if prompt not in self._answers:
            raise ValueError(f"{self.name}: no problem with the prompt {prompt[:60]!r}")
        return self._answers[prompt].answer

    def correct(self, prompt: str, completion: str) -> bool:
        return same_answer(completion, self.answer(prompt))

    def reward(self, prompt: str, completion: str) -> float:
        return float(self.correct(prompt, completion)) + (FORMAT_REWARD if well_formed(completion) else 0.0)

    __call__ = reward


# ---- reward functions from Python modules --------------------------------------------------------------------


def _import(module: str, spec: str):
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise FileNotFoundError(f"--reward {spec}: no file {path}")
        mspec = importlib.util.spec_from_file_location(f"fastllm_reward_{path.stem}", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        return mod
    if os.getcwd() not in sys.path and "" not in sys.path:  # console scripts do not put the cwd on sys.path
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise ImportError(f"--reward {spec}: cannot import module {module!r} ({e})") from e


def load_reward(spec: str, task=None) -> RewardFn:
    """The reward function named by "module:function" or "path/to/file.py:function". It is called as
    f(prompt, completion) -> float, or f(prompt, completion, answer) when it takes three arguments (then `task`
    must know the answers: a ProblemSet or a built-in task).

    >>> reward = load_reward("my_rewards:length_penalty")
    """
    module, _, name = spec.rpartition(":")
    if not module or not name:
        raise ValueError(f"--reward must be module:function or path/to/file.py:function, got {spec!r}")
    fn = getattr(_import(module, spec), name, None)
    if fn is None:
        raise ValueError(f"--reward {spec}: {module!r} has no attribute {name!r}")
    if not callable(fn):
        raise ValueError(f"--reward {spec}: {name!r} is a {type(fn).__name__}, not a function")
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
        n_args = len(params)
    except (TypeError, ValueError):  # builtins without a signature: assume (prompt, completion)
        n_args = 2
    if n_args == 2:
        return fn
    if n_args == 3:
        if task is None or not hasattr(task, "answer"):
            raise ValueError(f"--reward {spec}: a function of (prompt, completion, answer) needs a task with answers")

        @functools.wraps(fn)  # errors name the user's function (fastllm.rl.score)
        def with_answer(prompt: str, completion: str):
            return fn(prompt, completion, task.answer(prompt))

        return with_answer
    raise ValueError(f"--reward {spec}: the function must take (prompt, completion) or (prompt, completion, "
                     f"answer), but it takes {n_args} required arguments")
