"""Post-training with reinforcement learning: GRPO on verifiable rewards, and a reward model from preferences.

GRPO (Shao et al. 2024, DeepSeekMath; used by DeepSeek-R1). Per step, for each of P prompts sample a group of G
completions (batched, KV cache, temperature), score each with a reward function (prompt, completion) -> float and
normalise within the group into advantages A_i = (r_i - mean_g r) / (std_g r + eps) (no value network). Then
maximise, over completion tokens only,

    J = 1/N sum_i 1/|o_i| sum_t [ min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta KL_t ]
    rho_t = exp(logp_t - old_t)                         (ratio to the policy that sampled o_i)
    KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (k3 estimator of KL(policy || ref), >= 0)

with `ref` a frozen copy of the starting policy and N = P * G completions. J is a sum of per-token functions of
logp_t, so its gradient is sum_t J_t'(logp_t) grad logp_t: the weighted cross-entropy of
GPT.forward(idx, targets, weights=w) (fastllm's fused lm-head + CE kernel, per-row gradient weights) with
w_t = J_t'(logp_t) / (N |o_i|) backpropagates exactly grad(-J); see `grpo_token_terms` for the derivation.
Per-token log-probs come from the same kernel's per-row losses (logp = -CE). No PyTorch.

Reward model (RLHF): a GPT backbone + scalar head on the final hidden state of the last token (<|endoftext|>
appended to prompt + completion), trained on JSONL preference pairs {"prompt", "chosen", "rejected"} with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected); `RewardScorer` turns it into a reward function for GRPO.

Built-in verifiable tasks with generated data: "addition" ("12+34=" -> "46") and "sort" ("sort 3142=" ->
"1234"); reward 1 for the exact answer + 0.1 for a well-formed one (digits only).

>>> summary = train_grpo(RLConfig(ckpt="out_sft", task="addition", out="out_rl", steps=100))
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import ops, set_num_threads
from .data import checkpoint_tokenizer, find_tokenizer
from .fileio import iter_jsonl, load_safetensors, save_safetensors, write_json
from .model import GPT
from .optim import AdamW, grad_norm
from .options import CKPT_EVERY, GRAD_CLIP, KEEP_CKPTS, RESUME, SEED, THREADS, option
from .plot import plot_reward_model, plot_rl
from .train import RunLog, TrainingError, latest_checkpoint, load_model, save_checkpoint

RewardFn = Callable[[str, str], float]


class RewardError(ValueError):
    """A reward function raised, or returned something that is not a finite number; names the prompt."""


# ---- tasks -----------------------------------------------------------------------------------------------


class AdditionTask:
    """ "a+b=" -> "a+b" for `digits`-digit operands. reward = 1 (exact) + 0.1 (digits only).

    >>> AdditionTask(2).reward("12+34=", "46")
    1.1
    """

    name = "addition"
    _re = re.compile(r"^(\d+)\+(\d+)=$")

    def __init__(self, digits: int = 2):
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
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
        return float(self.correct(prompt, completion)) + (0.1 if re.fullmatch(r"\d+", completion) else 0.0)

    __call__ = reward


class SortTask(AdditionTask):
    """ "sort 3142=" -> "1234": sort `digits` random digits. Same rewards as AdditionTask."""

    name = "sort"
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
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[name](digits)


# ---- GRPO math (numpy, float64) ----------------------------------------------------------------------------


def group_advantages(rewards, eps: float = 1e-4) -> np.ndarray:
    """rewards (P, G) -> advantages (r - mean) / (std + eps) per row (population std). A group whose rewards
    are all equal gets zeros: it carries no signal about which completion is better.

    >>> group_advantages([[1.0, 0.0]], eps=0).tolist()
    [[1.0, -1.0]]
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2:
        raise ValueError(f"rewards must be (prompts, group), got shape {r.shape}")
    return (r - r.mean(1, keepdims=True)) / (r.std(1, keepdims=True) + eps)


def grpo_token_terms(logp, old_logp, ref_logp, adv, clip_eps: float = 0.2, beta: float = 0.04):
    """Per-token GRPO objective J_t and its derivative dJ_t/dlogp_t (arrays broadcast together):

        rho = exp(logp - old),  S = min(rho A, clip(rho, 1-eps, 1+eps) A),  d = ref - logp,
        KL = exp(d) - d - 1,    J = S - beta KL.

    Derivation. d rho / d logp = rho. The min selects the unclipped term rho A unless the clipped one is
    smaller, which happens exactly when the clip is active in the direction that would grow the objective
    (A > 0 and rho > 1 + eps, or A < 0 and rho < 1 - eps); there the selected term is a constant and its
    gradient is 0. So dS/dlogp = rho A where rho A <= clip(rho) A, else 0. For the KL term,
    dKL/dlogp = (exp(d) - 1) * dd/dlogp = 1 - exp(d). Hence dJ/dlogp = [unclipped] rho A - beta (1 - exp(d)).
    With CE_t = -logp_t, the loss L = -sum_t c_t J_t has dL/dCE_t = c_t dJ_t/dlogp_t: that is the per-token
    weight of the weighted cross-entropy backward (see `policy_backward`).

    Returns (J, dJ_dlogp, kl, clipped) where clipped marks tokens whose surrogate gradient is cut.
    """
    logp, old, ref = (np.asarray(x, np.float64) for x in (logp, old_logp, ref_logp))
    adv = np.asarray(adv, np.float64)
    rho = np.exp(logp - old)
    unclipped = rho * adv
    clipped_term = np.clip(rho, 1.0 - clip_eps, 1.0 + clip_eps) * adv
    active = unclipped <= clipped_term
    d = ref - logp
    kl = np.exp(d) - d - 1.0
    J = np.minimum(unclipped, clipped_term) - beta * kl
    dJ = np.where(active, unclipped, 0.0) - beta * (1.0 - np.exp(d))
    return J, dJ, kl, ~active


@dataclass
class Batch:
    """Completions packed for the model: row i is prompt_i + completion_i (right-padded), next-token targets
    on completion tokens only (-1 elsewhere)."""

    idx: np.ndarray  # (N, T) int32 inputs
    targets: np.ndarray  # (N, T) int32, -1 outside completions
    mask: np.ndarray  # (N, T) bool, targets != -1
    lengths: np.ndarray  # (N,) completion lengths |o_i| (>= 1)
    adv: np.ndarray  # (N,) advantage of each completion

    @property
    def norm(self) -> np.ndarray:
        """(N, T) per-token factor 1 / (N |o_i|) on completion tokens, 0 elsewhere."""
        return self.mask / (self.lengths[:, None] * len(self.lengths))


def pack(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], adv, pad: int = 0) -> Batch:
    """Rows prompt + completion -> Batch (inputs are the row without its last token)."""
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    if any(len(c) == 0 for c in completion_ids):
        raise ValueError("every completion needs at least one token")
    N, T = len(rows), max(len(r) for r in rows) - 1
    idx = np.full((N, T), pad, np.int32)
    targets = np.full((N, T), -1, np.int32)
    for i, (r, p) in enumerate(zip(rows, prompt_ids)):
        idx[i, : len(r) - 1] = r[:-1]
        targets[i, len(p) - 1 : len(r) - 1] = r[len(p) :]
    lengths = np.array([len(c) for c in completion_ids], np.float64)
    return Batch(idx, targets, targets != -1, lengths, np.asarray(adv, np.float64).reshape(N))


def token_logprobs(model: GPT, idx, targets) -> np.ndarray:
    """log p(targets) (N, T) float64 under `model` (0 where targets == -1), through the fused lm-head + CE."""
    was = model.training
    model.eval()
    model.forward(idx, targets)
    model.train(was)
    return -model.token_losses.astype(np.float64)


def policy_backward(model: GPT, batch: Batch, old_logp, ref_logp, clip_eps: float, beta: float, logp=None) -> dict:
    """Accumulate (+=) into model.grads the gradient of the GRPO loss L = -J (module docstring) on `batch`;
    returns the loss and statistics. logp: the current log-probs if already known (else one forward)."""
    if logp is None:
        logp = token_logprobs(model, batch.idx, batch.targets)
    J, dJ, kl, clipped = grpo_token_terms(logp, old_logp, ref_logp, batch.adv[:, None], clip_eps, beta)
    c = batch.norm
    weights = (c * dJ).astype(np.float32)  # dL/dCE_t (grpo_token_terms): zero outside completions
    model.train()
    model.forward(batch.idx, batch.targets, weights=weights)
    model.backward()
    m = batch.mask
    return {"loss": float(-(c * J).sum()), "kl": float(kl[m].mean()), "clip_frac": float(clipped[m].mean())}


# ---- rollouts -----------------------------------------------------------------------------------------------


def score(reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> np.ndarray:
    """rewards (P, G); a raising reward function or a non-finite reward -> RewardError naming the prompt."""
    out = np.empty((len(prompts), len(completions[0]) if completions else 0), np.float64)
    for i, (p, group) in enumerate(zip(prompts, completions)):
        for j, c in enumerate(group):
            try:
                r = float(reward_fn(p, c))
            except Exception as e:
                raise RewardError(
                    f"reward function failed on prompt {p!r} (completion {c!r}): {type(e).__name__}: {e}"
                ) from e
            if not math.isfinite(r):
                raise RewardError(
                    f"reward function returned {r} for prompt {p!r} (completion {c!r}); rewards must be finite numbers"
                )
            out[i, j] = r
    return out


def sample_completions(
    model: GPT,
    tokenizer,
    prompts: Sequence[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int | None = None,
):
    """G completions per prompt in one batched, KV-cached generation. Returns (prompt_ids (P*G rows),
    completion_ids (P*G, with the final <|endoftext|> if generated), texts (P lists of G strings, without it))."""
    from .sample import generate

    eot = tokenizer.eot_token
    if eot is None:
        raise ValueError("the tokenizer has no <|endoftext|> token to end completions with")
    ids = [[int(t) for t in tokenizer.encode(p)] for p in prompts]
    rows = [r for r in ids for _ in range(group_size)]
    was = model.training
    out = generate(model.eval(), rows, max_new_tokens, temperature=temperature, stop_tokens=(eot,), seed=seed)
    model.train(was)
    comps = [o[len(r) :] for o, r in zip(out, rows)]
    texts = [tokenizer.decode(c[:-1] if c and c[-1] == eot else c) for c in comps]
    return rows, comps, [texts[i * group_size : (i + 1) * group_size] for i in range(len(prompts))]


def evaluate(
    model: GPT, tokenizer, task, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0
) -> float:
    """Fraction of prompts whose completion the task marks correct (greedy by default)."""
    _, _, texts = sample_completions(model, tokenizer, prompts, 1, max_new_tokens, temperature, seed)
    return float(np.mean([task.correct(p, t[0]) for p, t in zip(prompts, texts)]))


# ---- GRPO training -----------------------------------------------------------------------------------------


@dataclass
class RLConfig:
    ckpt: str = option(help="starting policy: a checkpoint (or run folder); also the frozen reference of the KL "
                            "penalty")
    out: str = option("out_rl", "output folder: checkpoints, log.jsonl, rl.png")
    task: str = option("addition", "built-in verifiable task, addition or sort: it makes the prompts, checks the "
                                   "answers (held-out accuracy) and, without --reward-model, gives the reward")
    digits: int = option(2, "task size: digits per operand (addition), digits to sort (sort)")
    reward_model: str | None = option(None, "reward-model folder (from `fastllm reward-model`) whose score is the "
                                            "reward (default: the task's exact-answer reward)")
    steps: int = option(100, "GRPO steps, each one batch of rollouts")
    prompts_per_step: int = option(8, "P: prompts per step")
    group_size: int = option(8, "G: completions sampled per prompt (>= 2: advantages compare them)")
    max_new_tokens: int = option(8, "tokens per completion at most")
    temperature: float = option(1.0, "sampling temperature of the rollouts")
    lr: float = option(1e-4, "AdamW learning rate (constant)")
    beta: float = option(0.04, "weight of the per-token KL penalty to the reference policy (k3 estimator)")
    clip_eps: float = option(0.2, "PPO clip: probability ratios to the sampling policy are clipped to "
                                  "[1 - eps, 1 + eps]")
    iterations: int = option(1, "policy updates per batch of rollouts (GRPO's mu)")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    grad_clip: float = option(1.0, GRAD_CLIP)
    eval_every: int = option(20, "steps between greedy accuracy evaluations on held-out prompts (0: never)")
    eval_prompts: int = option(64, "held-out prompts per evaluation (the same set every time)")
    ckpt_every: int = option(50, CKPT_EVERY)
    keep_ckpts: int = option(2, KEEP_CKPTS)
    seed: int = option(1337, SEED)
    threads: int | None = option(None, THREADS)
    resume: bool = option(False, RESUME)


class GRPO:
    """One GRPO step at a time on a policy, against a frozen reference, with AdamW.

    >>> g = GRPO(policy, ref, tokenizer, AdditionTask(2), RLConfig(ckpt=""))
    >>> stats = g.step(["12+34=", "5+7="], seed=0)
    """

    def __init__(
        self, model: GPT, ref: GPT, tokenizer, reward_fn: RewardFn, cfg: RLConfig, task=None, opt: AdamW | None = None
    ):
        if cfg.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare completions), got {cfg.group_size}")
        if cfg.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
        self.model, self.ref, self.tokenizer, self.reward_fn, self.cfg = model, ref.eval(), tokenizer, reward_fn, cfg
        self.task = task
        self.opt = opt or AdamW(model, cfg.lr, weight_decay=cfg.weight_decay)

    def step(self, prompts: Sequence[str], seed: int | None = None) -> dict:
        cfg, model = self.cfg, self.model
        t0 = time.time()
        prompt_ids, comp_ids, texts = sample_completions(
            model, self.tokenizer, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, seed
        )
        rewards = score(self.reward_fn, prompts, texts)
        adv = group_advantages(rewards)
        batch = pack(prompt_ids, comp_ids, adv, pad=self.tokenizer.eot_token)
        old = token_logprobs(model, batch.idx, batch.targets)
        ref = token_logprobs(self.ref, batch.idx, batch.targets)
        for it in range(cfg.iterations):
            model.zero_grad()
            st = policy_backward(model, batch, old, ref, cfg.clip_eps, cfg.beta, logp=old if it == 0 else None)
            norm = grad_norm(model)
            if not (math.isfinite(st["loss"]) and math.isfinite(norm)):
                raise TrainingError(f"GRPO loss={st['loss']} grad_norm={norm} is not finite; try a lower --lr")
            clip = min(1.0, cfg.grad_clip / (norm + 1e-6)) if cfg.grad_clip > 0 else 1.0
            self.opt.step(cfg.lr, grad_scale=clip)
            if it == 0:
                first = dict(st, grad_norm=norm)
        stats = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            **first,
            "completion_len": float(batch.lengths.mean()),
            "dt": time.time() - t0,
        }
        if self.task is not None and hasattr(self.task, "correct"):
            stats["accuracy"] = float(np.mean([self.task.correct(p, c) for p, g in zip(prompts, texts) for c in g]))
        return stats


def _restore_optimizer(opt: AdamW, ckpt: Path) -> None:
    ot, meta = load_safetensors(ckpt / "optimizer.safetensors")
    opt.m[...], opt.v[...], opt.t = ot["m"], ot["v"], int(meta["t"])


def train_grpo(
    cfg: RLConfig, reward_fn: RewardFn | None = None, task=None, tokenizer=None, progress: bool = True, log=print
) -> dict:
    """GRPO from cfg.ckpt (or resume from cfg.out): checkpoints OUT/ckpt_NNNNNN as in pre-training, a
    log.jsonl row per step (reward, kl, completion_len, accuracy, ...). reward_fn defaults to the task's
    verifiable reward, or to the reward model of cfg.reward_model. Returns a summary dict."""
    from tqdm.auto import tqdm

    if cfg.threads:
        set_num_threads(cfg.threads)
    task = task if task is not None else make_task(cfg.task, cfg.digits)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        model = load_model(ckpt)
        state = json.loads((ckpt / "state.json").read_text())
        ref = load_model(state["ref"])
        start = int(state["step"])
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        log(f"resuming from {ckpt} at step {start}")
    else:
        if cfg.resume:
            log(f"no checkpoint in {out}: starting from {cfg.ckpt}")
        model = load_model(cfg.ckpt)
        ref = load_model(model.checkpoint_dir)
        start, rng = 0, np.random.default_rng(cfg.seed)
    ref_path = str(ref.checkpoint_dir)
    tok_path = find_tokenizer(ref.checkpoint_dir)  # also copied into every checkpoint
    if tokenizer is None:
        tokenizer = checkpoint_tokenizer(ref.checkpoint_dir)
    if reward_fn is None:
        reward_fn = RewardScorer.load(cfg.reward_model) if cfg.reward_model else task.reward
    opt = AdamW(model, cfg.lr, weight_decay=cfg.weight_decay)
    if ckpt is not None:
        _restore_optimizer(opt, ckpt)
    grpo = GRPO(model, ref, tokenizer, reward_fn, cfg, task, opt)
    erng = np.random.default_rng(cfg.seed + 1)  # a fixed evaluation set, from its own RNG stream
    eval_set = [task.sample(erng) for _ in range(cfg.eval_prompts)]

    log_path = out / "log.jsonl"
    runlog = RunLog(log_path, start)
    write = runlog.write

    def checkpoint(step: int) -> None:
        if not np.isfinite(model.params).all():
            raise TrainingError(f"step {step}: parameters are not finite; not saving")
        st = {"step": step, "rng": rng.bit_generator.state, "ref": ref_path, "rl_config": dataclasses.asdict(cfg)}
        save_checkpoint(out, step, model, opt, st, tok_path)
        for old in sorted(out.glob("ckpt_*"))[: -max(1, cfg.keep_ckpts)]:
            shutil.rmtree(old, ignore_errors=True)

    def run_eval(step: int) -> float:
        acc = evaluate(model, tokenizer, task, eval_set, cfg.max_new_tokens)
        write({"step": step, "eval_accuracy": acc})
        return acc

    log(
        f"GRPO: {model.num_parameters / 1e6:.2f}M parameters, task {task.name}, "
        f"reward {'model ' + cfg.reward_model if cfg.reward_model else 'verifiable'}, "
        f"{cfg.prompts_per_step} prompts x {cfg.group_size} completions per step"
    )
    t_start = time.time()
    first_acc = last_acc = float("nan")
    if cfg.eval_every and start == 0:
        first_acc = run_eval(0)
    bar = tqdm(
        range(start, cfg.steps),
        initial=start,
        total=cfg.steps,
        desc="grpo",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    st: dict = {}
    try:
        for step in bar:
            prompts = [task.sample(rng) for _ in range(cfg.prompts_per_step)]
            st = grpo.step(prompts, seed=int(rng.integers(1 << 31)))
            write({"step": step, **st})
            bar.set_postfix(
                reward=f"{st['reward']:.3f}", kl=f"{st['kl']:.4f}", acc=f"{st.get('accuracy', float('nan')):.2f}"
            )
            done = step + 1
            if cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
                last_acc = run_eval(done)
            if done % cfg.ckpt_every == 0 or done == cfg.steps:
                checkpoint(done)
                plot_rl(runlog.rows, out / "rl.png", title=str(out))
    finally:
        bar.close()
        runlog.close()
    return {
        "steps": cfg.steps,
        "seconds": time.time() - t_start,
        "reward": st.get("reward", float("nan")),
        "kl": st.get("kl", float("nan")),
        "eval_accuracy_start": first_acc,
        "eval_accuracy": last_acc,
        "checkpoint": str(latest_checkpoint(out)),
        "log": str(log_path),
        "plot": str(out / "rl.png"),
    }


# ---- reward model (RLHF) ---------------------------------------------------------------------------------


def load_preferences(path: str | Path) -> list[dict]:
    """JSONL preference pairs, one {"prompt", "chosen", "rejected"} object (strings) per line; blank lines are
    skipped. A malformed line raises ValueError naming file:line."""
    pairs = []
    for where, obj in iter_jsonl(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for k in ("prompt", "chosen", "rejected"):
            if not isinstance(obj.get(k), str):
                raise ValueError(f"{where}: field {k!r} must be a string, got {obj.get(k)!r}")
        pairs.append({k: obj[k] for k in ("prompt", "chosen", "rejected")})
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs


class RewardModel:
    """GPT backbone + scalar head: r = w . h_last + b, h_last the final hidden state (after ln_f) of the last
    token of prompt + completion + <|endoftext|>. head = [w (C), b] in one flat array (so AdamW's kernel
    updates it like any parameter)."""

    def __init__(self, backbone: GPT, head: np.ndarray | None = None):
        C = backbone.config.n_embd
        self.backbone = backbone
        self.head = np.zeros(C + 1, np.float32) if head is None else np.ascontiguousarray(head, np.float32)
        if self.head.shape != (C + 1,):
            raise ValueError(f"head must have shape ({C + 1},), got {self.head.shape}")
        self.head_grad = np.zeros_like(self.head)

    def encode(self, tokenizer, prompt: str, completion: str) -> list[int]:
        ids = [int(t) for t in tokenizer.encode(prompt + completion)] + [tokenizer.eot_token]
        return ids[-self.backbone.config.block_size :]  # too long: keep the end (the scored token)

    def _batch(self, seqs: Sequence[Sequence[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
        T = max(len(s) for s in seqs)
        idx = np.full((len(seqs), T), pad, np.int32)
        for i, s in enumerate(seqs):
            idx[i, : len(s)] = s
        return idx, np.array([len(s) - 1 for s in seqs])

    def forward(self, seqs: Sequence[Sequence[int]], pad: int = 0) -> np.ndarray:
        """Rewards (B,) float64 of token sequences; keeps what backward() needs."""
        idx, last = self._batch(seqs, pad)
        h = self.backbone.hidden_states(idx)  # (B, T, C)
        self._h_last, self._last, self._shape = h[np.arange(len(seqs)), last].astype(np.float64), last, h.shape
        return self._h_last @ self.head[:-1] + self.head[-1]

    def backward(self, drewards) -> None:
        """Accumulate the gradient of sum_b drewards[b] * r_b into head_grad and backbone.grads."""
        dr = np.asarray(drewards, np.float64)
        self.head_grad[:-1] += (dr @ self._h_last).astype(np.float32)
        self.head_grad[-1] += float(dr.sum())
        dh = np.zeros(self._shape, np.float32)
        dh[np.arange(len(dr)), self._last] = dr[:, None] * self.head[None, :-1]
        self.backbone.backward(dhidden=dh)

    def save(self, out: str | Path, step: int, opt: AdamW, tokenizer_path, metrics: dict) -> Path:
        """OUT/ckpt_NNNNNN (backbone checkpoint, as pre-training writes it) + OUT/head.safetensors + metrics."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(out, step, self.backbone, opt, {"step": step, "metrics": metrics}, tokenizer_path)
        save_safetensors(out / "head.safetensors", {"head": self.head})
        write_json(out / "reward_model.json", metrics)
        return out

    @classmethod
    def load(cls, path: str | Path) -> RewardModel:
        path = Path(path)
        if not (path / "head.safetensors").exists():
            raise FileNotFoundError(f"{path} is not a reward-model folder (no head.safetensors)")
        backbone = load_model(path).eval()
        t, _ = load_safetensors(path / "head.safetensors")
        if "head" not in t:
            raise ValueError(f"{path / 'head.safetensors'}: no 'head' tensor")
        return cls(backbone, t["head"])


class RewardScorer:
    """A reward model as a GRPO reward function (prompt, completion) -> float."""

    def __init__(self, rm: RewardModel, tokenizer):
        self.rm, self.tokenizer = rm, tokenizer
        rm.backbone.eval()

    @classmethod
    def load(cls, path: str | Path) -> RewardScorer:
        rm = RewardModel.load(path)
        return cls(rm, checkpoint_tokenizer(rm.backbone.checkpoint_dir))

    def __call__(self, prompt: str, completion: str) -> float:
        seq = self.rm.encode(self.tokenizer, prompt, completion)
        return float(self.rm.forward([seq], self.tokenizer.eot_token)[0])


@dataclass
class RewardModelConfig:
    base: str = option(help="backbone checkpoint (or run folder), e.g. the SFT model")
    data: str = option(help="preference pairs JSONL, one {\"prompt\", \"chosen\", \"rejected\"} per line")
    out: str = option("out_rm", "output folder: backbone checkpoint, head.safetensors, log.jsonl, loss.png")
    val_data: str | None = option(None, "held-out pairs JSONL (default: --val-fraction of --data)")
    val_fraction: float = option(0.1, "fraction of --data held out when --val-data is not given")
    epochs: int = option(2, "passes over the training pairs")
    batch_size: int = option(16, "preference pairs per step")
    lr: float = option(1e-4, "AdamW learning rate (constant)")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    grad_clip: float = option(1.0, GRAD_CLIP)
    seed: int = option(1337, SEED)
    threads: int | None = option(None, THREADS)


def preference_accuracy(rm: RewardModel, tokenizer, pairs: Sequence[dict], batch_size: int = 64) -> float:
    """Fraction of pairs with r(chosen) > r(rejected) (ties count half)."""
    was = rm.backbone.training
    rm.backbone.eval()
    wins = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        seqs = [rm.encode(tokenizer, p["prompt"], p[k]) for k in ("chosen", "rejected") for p in chunk]
        r = rm.forward(seqs, tokenizer.eot_token)
        d = r[: len(chunk)] - r[len(chunk) :]
        wins += list((d > 0) + 0.5 * (d == 0))  # a tie counts half
    rm.backbone.train(was)
    return float(np.mean(wins))


def train_reward_model(
    cfg: RewardModelConfig,
    tokenizer=None,
    pairs: Sequence[dict] | None = None,
    val_pairs: Sequence[dict] | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Bradley-Terry training of a reward head (and the backbone) on preference pairs; reports held-out
    accuracy and saves the reward model to cfg.out (see RewardModel.save)."""
    from tqdm.auto import tqdm

    if cfg.threads:
        set_num_threads(cfg.threads)
    rng = np.random.default_rng(cfg.seed)
    pairs = list(pairs) if pairs is not None else load_preferences(cfg.data)
    if val_pairs is None and cfg.val_data:
        val_pairs = load_preferences(cfg.val_data)
    if val_pairs is None:
        if not 0 < cfg.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {cfg.val_fraction}")
        perm = rng.permutation(len(pairs))
        n_val = max(1, int(round(len(pairs) * cfg.val_fraction)))
        if n_val >= len(pairs):
            raise ValueError(f"{len(pairs)} pairs are too few to hold out {n_val}")
        val_pairs = [pairs[i] for i in perm[:n_val]]
        pairs = [pairs[i] for i in perm[n_val:]]
    backbone = load_model(cfg.base)
    tok_path = find_tokenizer(backbone.checkpoint_dir)  # also copied into the reward model's checkpoints
    if tokenizer is None:
        tokenizer = checkpoint_tokenizer(backbone.checkpoint_dir)
    rm = RewardModel(backbone)
    opt = AdamW(backbone, cfg.lr, weight_decay=cfg.weight_decay)
    hm, hv = np.zeros_like(rm.head), np.zeros_like(rm.head)
    eot = tokenizer.eot_token
    enc = [
        (rm.encode(tokenizer, p["prompt"], p["chosen"]), rm.encode(tokenizer, p["prompt"], p["rejected"]))
        for p in pairs
    ]
    B = max(1, min(cfg.batch_size, len(enc)))
    steps_per_epoch = math.ceil(len(enc) / B)
    val0 = val_acc = preference_accuracy(rm, tokenizer, val_pairs)
    log(f"reward model: {len(pairs)} train / {len(val_pairs)} held-out pairs, held-out accuracy at start {val0:.3f}")
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    runlog = RunLog(Path(cfg.out) / "log.jsonl", 0)
    runlog.write({"step": 0, "val_accuracy": val0})
    bar = tqdm(
        total=cfg.epochs * steps_per_epoch, desc="reward-model", unit="step", disable=not progress, dynamic_ncols=True
    )
    t0, step, losses, wins = time.time(), 0, [], []
    backbone.train()
    try:
        for _ in range(cfg.epochs):
            perm = rng.permutation(len(enc))
            for s in range(steps_per_epoch):
                chunk = [enc[i] for i in perm[s * B : (s + 1) * B]]
                b = len(chunk)
                r = rm.forward([c for c, _ in chunk] + [r_ for _, r_ in chunk], eot)
                diff = r[:b] - r[b:]
                loss = float(np.mean(np.logaddexp(0.0, -diff)))  # -log sigmoid(diff), stable
                g = -1.0 / (1.0 + np.exp(diff)) / b  # dloss/ddiff = -sigmoid(-diff) / b
                backbone.zero_grad()
                rm.head_grad.fill(0.0)
                rm.backward(np.concatenate([g, -g]))
                norm = math.sqrt(grad_norm(backbone) ** 2 + float(np.sum(rm.head_grad.astype(np.float64) ** 2)))
                if not (math.isfinite(loss) and math.isfinite(norm)):
                    raise TrainingError(f"reward model step {step}: loss={loss} grad_norm={norm}; try a lower --lr")
                clip = min(1.0, cfg.grad_clip / (norm + 1e-6)) if cfg.grad_clip > 0 else 1.0
                opt.step(cfg.lr, grad_scale=clip)
                ops.adamw_step(rm.head, rm.head_grad, hm, hv, lr=cfg.lr, t=opt.t, grad_scale=clip)
                losses.append(loss)
                wins.append(float(np.mean((diff > 0) + 0.5 * (diff == 0))))  # a tie counts half, as held out
                runlog.write({"step": step, "loss": loss, "accuracy": wins[-1]})
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", acc=f"{wins[-1]:.2f}")
            val_acc = preference_accuracy(rm, tokenizer, val_pairs)
            runlog.write({"step": step, "val_accuracy": val_acc})
    finally:
        bar.close()
        runlog.close()
    plot_reward_model(runlog.rows, Path(cfg.out) / "loss.png", title=str(cfg.out))
    k = max(1, steps_per_epoch)
    metrics = {
        "steps": step,
        "train_pairs": len(pairs),
        "val_pairs": len(val_pairs),
        "val_accuracy_start": val0,
        "val_accuracy": val_acc,
        "train_loss": float(np.mean(losses[-k:])),
        "train_accuracy": float(np.mean(wins[-k:])),
        "seconds": time.time() - t0,
        "base": str(backbone.checkpoint_dir),
    }
    rm.save(cfg.out, step, opt, tok_path, metrics)
    log(f"held-out accuracy {val0:.3f} -> {val_acc:.3f} ({len(val_pairs)} pairs); saved to {cfg.out}")
    return {**metrics, "out": str(cfg.out), "model": rm}


def addition_preferences(n: int, digits: int = 1, seed: int = 0) -> list[dict]:
    """Generated preference pairs for the addition task: chosen = the correct sum, rejected = a wrong one."""
    rng = np.random.default_rng(seed)
    task, pairs = AdditionTask(digits), []
    for _ in range(n):
        p = task.sample(rng)
        ans = int(task.answer(p))
        wrong = ans + int(rng.choice([-3, -2, -1, 1, 2, 3]))
        wrong = wrong if wrong >= 0 else ans + 1
        pairs.append({"prompt": p, "chosen": str(ans), "rejected": str(wrong)})
    return pairs
