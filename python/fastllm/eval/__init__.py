"""Evaluation: measure a model the way the field does, on fastllm's own kernels (batched forwards, any model
fastllm loads: its checkpoints, converted or Hugging Face model folders, on the CPU or a GPU: GPT.to("cuda")).

Tasks (`evaluate(model, tokenizer, task, data=..., ...)`, `fastllm eval --task T`):
    bpb       bits per byte of text files / JSONL / token shards: the summed cross-entropy of every non-special
              token divided by ln 2 and by the tokens' UTF-8 bytes, so models with different tokenizers compare
              (nanochat's measure). Documents longer than the context are scored with sliding windows (stride
              new tokens per window, default block_size // 2). Also reported: nats per token, tokens, bytes.
    mc        multiple choice (HellaSwag, ARC, MMLU, generic JSONL; see eval.data): each choice scored by the
              summed log-probability of its tokens after the context; acc picks the highest sum, acc_norm the
              highest per-token mean (llm.c's hellaswag.py), acc_norm_chars the highest sum per character of the
              choice (lm-eval's acc_norm); all choices of an example in one forward.
    gen       generative exact match on JSONL problems ({"prompt", "answer"} or GSM8K's question / "#### 42"):
              the answer is extracted from the completion as RL rewards do (fastllm.tasks), greedy
              (exact_match) or `samples` completions at `temperature` (pass@1 and pass@k, Chen et al.'s unbiased
              estimator). Chat models get their checkpoint folder's chat template, or fastllm's ChatML
              (tokenizers with <|im_start|>/<|im_end|>; fastllm.chat.chat_format); base models the prompt
              text (through `template`, e.g. "Question: {prompt}\\nAnswer:").
    addition, sort   the RL tasks of fastllm.tasks on `limit` generated prompts (default 200, `seed`), as gen.
Accuracies come with their standard error (sample standard deviation / sqrt(n), as lm-eval reports).

The report is a dict: task, metrics, n, seconds, and one record per example (the scores behind the metrics).
With `out=`, records are appended to OUT.partial.jsonl as they are computed, so an interrupted evaluation that
is run again with the same settings continues where it stopped; the report is then written atomically to OUT.

During training (`fastllm train/sft/rl --eval-task T --eval-task-data FILE`): `TrainEval(task, data=..., limit=...)`
loads the data once; calling it with (model, tokenizer) returns {"<name>/<metric>": value} to log (all ranks of a
data-parallel run share the work). EleutherAI's lm-evaluation-harness: fastllm.eval.harness.

>>> model, tok = load("run/")
>>> report = evaluate(model, tok, "mc", data="hellaswag_val.jsonl", limit=1000)
>>> report["metrics"]["acc_norm"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import checks, distributed
from ..chat import chat_format, eos_token_ids
from ..fileio import write_json
from ..options import SYSTEM, option
from .data import Choice, load_documents, load_multiple_choice, token_bytes
from .scoring import generate_until, score_continuations, window_requests

KINDS = ("bpb", "mc", "gen")  # plus the built-in generated tasks of fastllm.tasks.TASKS


@dataclass
class EvalConfig:
    task: str = option(help="bpb (bits per byte of text), mc (multiple choice: HellaSwag, ARC, MMLU, generic "
                            "JSONL), gen (exact match on JSONL problems, e.g. GSM8K), addition or sort (the generated "
                            "RL tasks), or lm-eval:NAME[,NAME...] (lm-evaluation-harness tasks; pip install "
                            "'fastllm[eval]')")
    data: Sequence[str] = option((), "input files or folders (bpb: .txt/.md/.jsonl or token shards; mc: .jsonl/.csv; "
                                     "gen: .jsonl) (default: none)")
    limit: int | None = option(None, "evaluate the first N examples: bpb documents (or tokens per shard), mc "
                                     "examples, gen problems, addition/sort generated prompts (default: all; "
                                     "addition/sort: 200)")
    batch_tokens: int = option(2048, "bpb, mc, lm-eval: tokens per forward pass (rows x longest row)")
    stride: int | None = option(None, "bpb: new tokens per sliding window (default: half the context)")
    delimiter: str = option(" ", "mc: text between a context and each choice (default: a space; HellaSwag endings "
                                 "always get one)")
    split: str = option("val", "bpb on a shard folder: which split's shards")
    max_new_tokens: int | None = option(None, "gen: completion length limit in tokens (default: 256 or half the "
                                              "context, whichever is less)")
    samples: int = option(1, "gen: completions per problem; > 1 reports pass@k (needs --temperature > 0)")
    temperature: float = option(0.0, "gen: sampling temperature (0: greedy)")
    chat: bool | None = option(None, "gen: chat prompts, in the checkpoint's chat template or ChatML (default: when "
                                     "it has one)")
    system: str | None = option(None, "gen: " + SYSTEM)
    template: str = option("{prompt}", "gen: prompt text around each problem, e.g. 'Question: {prompt}\\nAnswer:' "
                                       "(\\n and \\t stand for a newline and a tab on the command line)")
    stop: Sequence[str] = option((), "gen: stop strings, e.g. '\\n\\n' (<|endoftext|> and <|im_end|> always stop) "
                                     "(default: none)")
    batch_size: int = option(32, "gen: prompts per batched generation")
    digits: int = option(2, "addition: operand digits; sort: list length")
    seed: int = option(0, "addition, sort: the generated prompts; gen: sampling")

    def __post_init__(self) -> None:
        if self.task not in _task_names():
            raise ValueError(f"unknown evaluation task {self.task!r}; choose from {_task_names()} "
                             f"(or lm-eval:NAME for the harness)")
        self.data = [os.fspath(d) for d in ([self.data] if isinstance(self.data, (str, os.PathLike)) else self.data)]
        if self.task in KINDS and not self.data:
            raise ValueError(f"task {self.task!r} needs data (--data FILE ...)")
        checks.at_least(self, 1, "limit", "batch_tokens", "stride", "max_new_tokens", "samples", "batch_size",
                        "digits")
        checks.at_least(self, 0, "seed")
        checks.number(self, "temperature")
        if self.samples > 1 and self.temperature <= 0:
            raise ValueError(f"samples={self.samples} needs a temperature > 0 (greedy completions are all the same)")
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)


def load(ckpt: str | os.PathLike, tokenizer: str | os.PathLike | None = None, device: str = "cpu",
         dtype: str | None = None, weights: str | None = None):
    """(model, tokenizer) from a fastllm checkpoint or run folder, or a Hugging Face model folder (config.json);
    the tokenizer from `tokenizer` if given, else the one in the folder. device="cuda" runs the model on the GPU
    (dtype: bfloat16 by default, or float32; see GPT.to). weights: an inference-only model holding its matrices in
    that decode form (checkpoint.load_model)."""
    from ..checkpoint import checkpoint_tokenizer, load_model

    path = Path(ckpt)
    if (path / "config.json").exists():  # Hugging Face: tokenizer.json or GPT-2's vocab.json + merges.txt
        from ..model import GPT
        from ..tokenizer import Tokenizer

        model = GPT.from_pretrained(path, weights=weights)
        model.checkpoint_dir = path
        tok = Tokenizer.from_pretrained(tokenizer or path)
    else:
        model = load_model(path, weights=weights)
        tok = checkpoint_tokenizer(model.checkpoint_dir, tokenizer)
    return model.to(device, dtype).eval(), tok


# ---- per-task records ----------------------------------------------------------------------------------------


def bpb_records(model, tokenizer, docs: Sequence[np.ndarray], stride: int | None = None, batch_tokens: int = 2048,
                bar=None) -> list[dict]:
    """Per document (a token sequence starting with its context token): nats (summed cross-entropy of its
    non-special tokens), bytes (their UTF-8 bytes) and tokens (their number)."""
    T = model.config.block_size
    nbytes = token_bytes(tokenizer, model.config.vocab_size)
    reqs, owner = [], []
    for d, ids in enumerate(docs):
        w = window_requests(ids, T, stride or max(1, T // 2))
        reqs += w
        owner += [d] * len(w)
    logps = score_continuations(model, reqs, batch_tokens=batch_tokens, progress=bar)
    recs = [{"nats": 0.0, "bytes": 0, "tokens": 0} for _ in docs]
    for d, (_, cont), lp in zip(owner, reqs, logps):
        b = nbytes[np.asarray(cont)]
        keep = b > 0
        recs[d]["nats"] += float(-lp[keep].sum())
        recs[d]["bytes"] += int(b.sum())
        recs[d]["tokens"] += int(keep.sum())
    return recs


def mc_records(model, tokenizer, examples: Sequence[Choice], batch_tokens: int = 2048, bar=None) -> list[dict]:
    """Per example: label, and per choice the summed log-probability of its tokens, their number and the choice's
    characters (its text as the data has it, without the delimiter).
    Tokens as lm-eval's _encode_pair has them: the context's trailing whitespace moved to the choice, context +
    choice encoded whole and split after the context's tokens (so "is " + "Paris" scores " Paris", as the text is
    tokenized), all after the tokenizer's BOS where it has one (as `tokenizer(text)`); an empty context is the BOS,
    else <|endoftext|>."""
    bos = [] if tokenizer.bos_token is None else [tokenizer.bos_token]
    start = [] if tokenizer.start_token is None else [tokenizer.start_token]
    reqs, groups = [], []
    for e, ex in enumerate(examples):
        ctxs = ex.contexts or (ex.context,) * len(ex.choices)
        heads = [c.rstrip() for c in ctxs]
        whole = tokenizer.encode_batch([c + ch for c, ch in zip(ctxs, ex.choices)], disallowed_special=())
        ctx_ids = {h: tokenizer.encode_ordinary(h).tolist() if h else [] for h in set(heads)}
        for j, (head, ids) in enumerate(zip(heads, whole)):
            ctx, cont = bos + ctx_ids[head], ids.tolist()[len(ctx_ids[head]):]
            if not ctx:
                if not start:
                    raise ValueError(f"{ex.where}: empty context and no BOS or <|endoftext|> token to start from")
                ctx = start
            if not 0 < len(cont) <= model.config.block_size:
                raise ValueError(f"{ex.where}: choice {j} has {len(cont)} tokens; it needs 1 to the model's context "
                                 f"of {model.config.block_size}")
            reqs.append((ctx, cont))
            groups.append(e)
    logps = score_continuations(model, reqs, groups=groups, batch_tokens=batch_tokens, progress=bar)
    recs, k = [], 0
    for ex in examples:
        lps = logps[k: k + len(ex.choices)]
        k += len(ex.choices)
        recs.append({"label": ex.label, "logprob": [float(lp.sum()) for lp in lps], "tokens": [len(lp) for lp in lps],
                     "chars": [len(t) for t in ex.texts or ex.choices]})
    return recs


def chat_of(model, tokenizer, chat: bool | None = None):
    """The chat format generative prompts use (fastllm.chat): the checkpoint folder's own template, else ChatML
    where the tokenizer has <|im_start|>/<|im_end|>; None for plain text (a base model, or chat=False)."""
    if chat is False:
        return None
    fmt = chat_format(getattr(model, "checkpoint_dir", None), tokenizer)
    if chat and fmt is None:
        raise ValueError("chat prompts need a chat template: a checkpoint folder with one, or a tokenizer with "
                         "<|im_start|> and <|im_end|> (a fine-tuned checkpoint)")
    return fmt


def prompt_ids(tokenizer, prompt: str, chat=None, template: str = "{prompt}", system: str | None = None
               ) -> np.ndarray:
    """The tokens a generative task feeds the model: the template around the prompt, as a user turn followed by
    the assistant header in the chat format `chat` (chat_of) for chat models, else (None) as plain text.
    `system`: a system message before the user turn, or for plain text its text and a blank line before the
    prompt (as lm-eval's --system_instruction)."""
    text = template.replace("{prompt}", prompt)
    if not chat:  # after the tokenizer's BOS where it has one (Llama 3), as tokenizer(text) encodes it
        ids = tokenizer.encode_ordinary(f"{system}\n\n{text}" if system else text)
        return ids if tokenizer.bos_token is None else np.concatenate([[tokenizer.bos_token], ids]).astype(ids.dtype)
    system_turn = [{"role": "system", "content": system}] if system else []
    return chat.prompt(system_turn + [{"role": "user", "content": text}])


def gen_records(model, tokenizer, task, prompts: Sequence[str], cfg: EvalConfig, seed: int = 0, bar=None
                ) -> list[dict]:
    """Per prompt: the reference answer, `cfg.samples` completions and whether each is correct (task.correct)."""
    chat = chat_of(model, tokenizer, cfg.chat)
    rows = [prompt_ids(tokenizer, p, chat, cfg.template, cfg.system) for p in prompts for _ in range(cfg.samples)]
    folder = getattr(model, "checkpoint_dir", None)  # plain text: the folder's EOS ids (generation_config.json)
    stop_tokens = tuple(chat.stop_tokens) if chat else tuple(eos_token_ids(folder, tokenizer))
    n_new = cfg.max_new_tokens or min(256, model.config.block_size // 2)
    comps = generate_until(model, tokenizer, rows, n_new, stop=cfg.stop, stop_tokens=stop_tokens,
                           temperature=cfg.temperature, seed=seed, batch_size=cfg.batch_size, progress=bar)
    recs = []
    for i, p in enumerate(prompts):
        cs = comps[i * cfg.samples: (i + 1) * cfg.samples]
        recs.append({"prompt": p, "answer": task.answer(p), "completions": cs,
                     "correct": [bool(task.correct(p, c)) for c in cs]})
    return recs


# ---- metrics ---------------------------------------------------------------------------------------------------


def _stderr(x) -> float:
    x = np.asarray(x, np.float64)
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def metrics(kind: str, records: Sequence[dict]) -> dict[str, float]:
    """The task's metrics from its per-example records."""
    if kind == "bpb":
        nats = sum(r["nats"] for r in records)
        nbytes, ntok = sum(r["bytes"] for r in records), sum(r["tokens"] for r in records)
        return {"bpb": nats / math.log(2) / max(nbytes, 1), "nats_per_token": nats / max(ntok, 1),
                "bytes_per_token": nbytes / max(ntok, 1), "tokens": ntok, "bytes": nbytes}
    if kind == "mc":
        lp = [np.asarray(r["logprob"]) for r in records]
        acc = [float(np.argmax(x) == r["label"]) for x, r in zip(lp, records)]
        acc_norm = [float(np.argmax(x / np.asarray(r["tokens"])) == r["label"]) for x, r in zip(lp, records)]
        out = {"acc": float(np.mean(acc)), "acc_stderr": _stderr(acc), "acc_norm": float(np.mean(acc_norm)),
               "acc_norm_stderr": _stderr(acc_norm)}
        if all("chars" in r for r in records):  # (records of a partial file from before "chars")
            chars = [float(np.argmax(x / np.maximum(r["chars"], 1)) == r["label"]) for x, r in zip(lp, records)]
            out.update(acc_norm_chars=float(np.mean(chars)), acc_norm_chars_stderr=_stderr(chars))
        return out
    n = len(records[0]["correct"])
    if n == 1:
        em = [float(r["correct"][0]) for r in records]
        return {"exact_match": float(np.mean(em)), "exact_match_stderr": _stderr(em)}
    out = {}
    for k in sorted({1, n}):
        v = [pass_at_k(n, sum(r["correct"]), k) for r in records]
        out[f"pass@{k}"], out[f"pass@{k}_stderr"] = float(np.mean(v)), _stderr(v)
    return out


# ---- evaluate ----------------------------------------------------------------------------------------------------


class _Partial:
    """OUT.partial.jsonl: a fingerprint line, then one record per line, appended as they are computed."""

    def __init__(self, out: str | os.PathLike | None, fingerprint: str):
        self.path = None if out is None else Path(str(out) + ".partial.jsonl")
        self.records: list[dict] = []
        if self.path is None:
            return
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            if lines and lines[0] == json.dumps({"fingerprint": fingerprint}):
                for line in lines[1:]:
                    try:
                        self.records.append(json.loads(line))
                    except json.JSONDecodeError:
                        break  # a line cut by a kill: recompute from there
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
            f.writelines(json.dumps(r) + "\n" for r in self.records)

    def add(self, recs: list[dict]) -> None:
        self.records += recs
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in recs)
                f.flush()
                os.fsync(f.fileno())

    def finish(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def _fingerprint(model, cfg: EvalConfig) -> str:
    parts = {"config": dataclasses.asdict(cfg), "model": str(getattr(model, "checkpoint_dir", "")),
             "model_config": model.config.to_dict()}
    weights = Path(parts["model"]) / "model.safetensors"  # a model built in memory has no checkpoint_dir
    known = parts["model"] and weights.exists()
    parts["weights"] = [(str(weights), weights.stat().st_size, weights.stat().st_mtime_ns)] if known else []
    parts["data"] = [(d, os.path.getsize(d), os.stat(d).st_mtime_ns) if os.path.isfile(d) else d for d in cfg.data]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_items(cfg: EvalConfig, tokenizer=None):
    """What the task evaluates: token sequences (bpb), Choice examples (mc), or (task, prompts) (gen, built-in)."""
    from ..tasks import ProblemSet, load_problems, make_task

    if cfg.task == "bpb":
        return load_documents(cfg.data, tokenizer, cfg.limit, cfg.split)
    if cfg.task == "mc":
        return load_multiple_choice(cfg.data, cfg.limit, cfg.delimiter)
    if cfg.task == "gen":
        problems = [p for d in cfg.data for p in load_problems(d)]
        task = ProblemSet(problems[: cfg.limit], ", ".join(Path(d).name for d in cfg.data))
        return task, task.prompts
    task = make_task(cfg.task, cfg.digits)
    rng = np.random.default_rng(cfg.seed)
    return task, [task.sample(rng) for _ in range(cfg.limit or 200)]


def evaluate(model, tokenizer, task: str | EvalConfig, data=(), limit: int | None = None, out=None,
             progress: bool = False, items=None, **options) -> dict:
    """Evaluate `model` on a task (module doc); options are EvalConfig's fields. Returns the report dict
    {"task", "metrics", "n", "seconds", "data", "records"}; with `out`, resumable and written there as JSON."""
    from tqdm.auto import tqdm

    cfg = task if isinstance(task, EvalConfig) else EvalConfig(task=task, data=data, limit=limit, **options)
    t0 = time.time()
    items = load_items(cfg, tokenizer) if items is None else items
    kind = _kind(cfg.task)
    task_obj, units = items if kind == "gen" else (None, items)
    partial = _Partial(out, _fingerprint(model, cfg) if out is not None else "")
    done = len(partial.records)
    if kind == "bpb":
        stride = cfg.stride or max(1, model.config.block_size // 2)  # bpb_records' default
        work, unit = sum(math.ceil((len(u) - 1) / stride) for u in units[done:]), "window"
    elif kind == "mc":
        work, unit = sum(len(u.choices) for u in units[done:]), "choice"
    else:
        work, unit = cfg.samples * (len(units) - done), "completion"
    chunk = {"bpb": 64, "mc": 256, "gen": cfg.batch_size}[kind]  # units per checkpointed piece of work
    with tqdm(total=work, desc=f"eval {cfg.task}", unit=unit, disable=not progress, dynamic_ncols=True,
              leave=False) as bar:
        for start in range(done, len(units), chunk):
            part = units[start: start + chunk]
            if kind == "bpb":
                recs = bpb_records(model, tokenizer, part, cfg.stride, cfg.batch_tokens, bar)
            elif kind == "mc":
                recs = mc_records(model, tokenizer, part, cfg.batch_tokens, bar)
            else:
                recs = gen_records(model, tokenizer, task_obj, part, cfg, cfg.seed + start, bar)
            partial.add(recs)
    records = partial.records
    report = {"task": cfg.task, "data": cfg.data, "checkpoint": str(getattr(model, "checkpoint_dir", "")),
              "n": len(records), "metrics": metrics(kind, records), "seconds": time.time() - t0,
              "config": dataclasses.asdict(cfg), "records": records}
    if out is not None:
        write_json(out, report)
        partial.finish()
    return report


def format_report(report: dict) -> str:
    """The report's metrics as a small table (value ± stderr)."""
    m = report["metrics"]
    rows = [f"{'task':10s} {'n':>7s}  {'metric':16s} {'value':>12s}  stderr"]
    for i, k in enumerate(k for k in m if not k.endswith("_stderr")):
        v, se = m[k], m.get(k + "_stderr")
        val = f"{v:12,d}" if isinstance(v, int) else f"{v:12.4f}"
        rows.append(f"{report['task'] if i == 0 else '':10s} {report['n'] if i == 0 else '':>7}  {k:16s} {val}  "
                    + (f"{se:.4f}" if se is not None and math.isfinite(se) else ""))
    return "\n".join(rows)


def _kind(task: str) -> str:
    """bpb, mc, or gen (JSONL problems and the generated tasks alike)."""
    return task if task in ("bpb", "mc") else "gen"


def _task_names() -> list[str]:
    from ..tasks import TASKS

    return list(KINDS) + sorted(TASKS)


# ---- during training ---------------------------------------------------------------------------------------------


def check_train_eval(cfg) -> None:
    """The eval_task, eval_task_data and eval_task_limit fields of a training config (TrainConfig, SFTConfig,
    RLConfig; the --eval-task options), checked without reading a file: ValueError naming the field.
    eval_task_data becomes a list of str (or stays None)."""
    data = cfg.eval_task_data
    if data is not None:
        cfg.eval_task_data = [str(data)] if isinstance(data, (str, os.PathLike)) else [str(d) for d in data]
    checks.at_least(cfg, 1, "eval_task_limit")
    if cfg.eval_task is None:
        if cfg.eval_task_data or cfg.eval_task_limit is not None:
            raise ValueError("eval_task_data and eval_task_limit need eval_task (--eval-task mc, bpb, gen, ...)")
        return
    if cfg.eval_task not in _task_names():
        raise ValueError(f"eval_task: unknown task {cfg.eval_task!r}; choose from {_task_names()}")
    if cfg.eval_task in KINDS and not cfg.eval_task_data:
        raise ValueError(f"eval_task={cfg.eval_task!r} needs its files: --eval-task-data FILE ...")
    if not cfg.eval_every:
        raise ValueError(f"eval_task={cfg.eval_task!r} runs every eval_every steps, but eval_every=0 (never)")


class TrainEval:
    """An evaluation a training loop calls every N steps (`fastllm train/sft/rl --eval-task`): the data is loaded
    and checked once, here (a bad file fails before training starts, naming file:line; bpb documents are
    tokenized here when `tokenizer` is given, else at the first call).

    Calling it with (model, tokenizer) returns {"<name>/<metric>": value} to log, the metrics `evaluate` gives.
    With several ranks (fastllm.distributed) each rank scores its share of the examples and the per-example
    records of all are gathered, so every rank returns the metrics of the whole set (those one process gives;
    sampled gen completions, --temperature > 0, draw other samples).

    >>> ev = TrainEval("mc", data="hellaswag_val.jsonl", limit=500)
    >>> ev(model, tokenizer)
    {'mc/acc': 0.27, 'mc/acc_stderr': 0.02, 'mc/acc_norm': 0.28, 'mc/acc_norm_stderr': 0.02}
    """

    def __init__(self, task: str, data=(), limit: int | None = None, name: str | None = None, tokenizer=None,
                 **options):
        self.config = EvalConfig(task=task, data=data, limit=limit, **options)
        self.name = name or task
        self._tokenizer = tokenizer
        self._items = None if task == "bpb" and tokenizer is None else load_items(self.config, tokenizer)

    @classmethod
    def of(cls, cfg, tokenizer) -> TrainEval | None:
        """The evaluation a training config's --eval-task options ask for (see check_train_eval); None without
        eval_task."""
        if cfg.eval_task is None:
            return None
        return cls(cfg.eval_task, data=cfg.eval_task_data or (), limit=cfg.eval_task_limit, tokenizer=tokenizer)

    def __call__(self, model, tokenizer) -> dict[str, float]:
        kind = _kind(self.config.task)
        if self._items is None or (kind == "bpb" and tokenizer is not self._tokenizer):  # bpb: tokenized by it
            self._items, self._tokenizer = load_items(self.config, tokenizer), tokenizer
        world = distributed.world()
        task_obj, units = self._items if kind == "gen" else (None, self._items)
        mine = world.share(units)
        records = []
        if mine:
            items = (task_obj, mine) if kind == "gen" else mine
            records = evaluate(model, tokenizer, self.config, items=items)["records"]
        records = [r for part in world.allgather(records) for r in part]  # in rank order: the examples' order
        return {f"{self.name}/{k}": float(v) for k, v in metrics(kind, records).items()}


__all__ = ["EvalConfig", "TrainEval", "check_train_eval", "evaluate", "format_report", "load", "load_items",
           "metrics", "pass_at_k", "prompt_ids", "chat_of",
           "bpb_records", "mc_records", "gen_records", "score_continuations", "window_requests", "generate_until"]
