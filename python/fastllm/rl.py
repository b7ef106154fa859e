"""Post-training with reinforcement learning: GRPO on verifiable rewards, and a reward model from preferences.

GRPO (Shao et al. 2024, DeepSeekMath; used by DeepSeek-R1). Per step, for each of P prompts sample a group of G
completions (batched, KV cache, temperature), score each with a reward function (prompt, completion) -> float and
normalise within the group into advantages A_i = (r_i - mean_g r) / (std_g r + eps) (std_g: the sample standard
deviation, as TRL's; no value network). Then maximise, over completion tokens only,

    J = 1/N sum_i 1/|o_i| sum_t [ min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) - beta KL_t ]
    rho_t = exp(logp_t - old_t)                         (ratio to the policy that sampled o_i)
    KL_t  = exp(ref_t - logp_t) - (ref_t - logp_t) - 1  (k3 estimator of KL(policy || ref), >= 0)

with `ref` a frozen copy of the starting policy and N = P * G completions. J is a sum of per-token functions of
logp_t, so its gradient is sum_t J_t'(logp_t) grad logp_t: the weighted cross-entropy of
GPT.forward(idx, targets, weights=w) (fastllm's fused lm-head + CE kernel, per-row gradient weights) with
w_t = J_t'(logp_t) / (N |o_i|) backpropagates exactly grad(-J); see `grpo_token_terms` for the derivation.
Per-token log-probs come from the same kernel's per-row losses (logp = -CE). No PyTorch.

logp, old and ref are all log-probs at the rollouts' sampling temperature T, log softmax(logits / T) (the logits
after any soft cap, as fastllm.sample draws), as TRL's GRPOTrainer computes them: the ratio rho is then that of the
policy to the distribution that actually produced o_i, and the KL that of the tempered policies
(GPT.forward(..., temperature=T); its gradient carries the 1/T of d logp / d logits).

Reward model (RLHF): a GPT backbone + scalar head on the final hidden state of the last token (<|endoftext|>
appended to prompt + completion), trained on JSONL preference pairs {"prompt", "chosen", "rejected"} with the
Bradley-Terry loss -log sigmoid(r_chosen - r_rejected); `RewardScorer` turns it into a reward function for GRPO.

Prompts: a chat model (a checkpoint folder with its own chat template, or a tokenizer with fastllm's ChatML tokens
from `fastllm sft`) gets each problem as a user turn followed by the assistant header, and its completions end at
the template's end-of-turn tokens, as in `fastllm chat` and `fastllm eval`; a base model gets the plain text and
stops at <|endoftext|> (or its folder's EOS ids) (`--chat` / `--no-chat` to choose).

Tasks and rewards live in fastllm.tasks: the built-in "addition" ("12+34=" -> "46") and "sort" ("sort 3142=" ->
"1234"), JSONL problems (`--data`, {"prompt", "answer"} or GSM8K's form) with exact-match + format rewards, and
your own reward function (`--reward module:function`).

Both train through fastllm.train's loop (GRPOStage, RewardModelStage): checkpoints, exact resume, log.jsonl,
`--device cuda`.

>>> summary = train_grpo(RLConfig(ckpt="out_sft", task="addition", out="out_rl", steps=100))
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checks, distributed
from .chat import eos_token_ids, validate_conversation
from .checkpoint import (
    STATE_FILE,
    checkpoint_tokenizer,
    find_tokenizer,
    load_heads,
    load_model,
    load_start,
    resolve,
)
from .data import Epochs
from .eval import TrainEval, chat_of, check_train_eval, prompt_ids
from .fileio import iter_records, write_json
from .lora import LoraConfig
from .model import GPT
from .optim import AdamW
from .options import (
    BASE_FORMS,
    BASE_WEIGHTS,
    CKPT_EVERY,
    DEVICE,
    DTYPE,
    EVAL_TASK,
    EVAL_TASK_DATA,
    EVAL_TASK_LIMIT,
    GRAD_CLIP,
    KEEP_CKPTS,
    LORA_ALPHA,
    LORA_R,
    LORA_TARGETS,
    RESUME,
    SEED,
    SYSTEM,
    THREADS,
    ZERO,
    option,
)
from .sample import generate
from .tasks import TASKS, AdditionTask, ProblemSet, RewardFn, SortTask, load_reward, make_task  # noqa: F401 (re-export)
from .train import ExtraParams, Loop, Stage, fit, last_task_metrics, series, setup_run, update

HEAD = "reward_head"  # the reward model's head in heads.safetensors


class RewardError(ValueError):
    """A reward function raised, or returned something that is not a finite number; names the prompt."""


# ---- GRPO math (numpy, float64) ----------------------------------------------------------------------------


def group_advantages(rewards, eps: float = 1e-4) -> np.ndarray:
    """rewards (P, G >= 2) -> advantages (r - mean) / (std + eps) per row, with the sample standard deviation
    (n - 1 in the denominator) as TRL's GRPOTrainer takes it (torch's std). A group whose rewards are all equal
    gets zeros: it carries no signal about which completion is better.

    >>> group_advantages([[1.0, 0.0]], eps=0).round(4).tolist()
    [[0.7071, -0.7071]]
    """
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, group >= 2), got shape {r.shape}")
    return (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + eps)


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


def pack(prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]], adv) -> Batch:
    """Rows prompt + completion -> Batch (inputs are the row without its last token, right-padded with token 0
    after its end: causal attention keeps the padding out of the row's logits, and it has no targets)."""
    rows = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    if any(len(c) == 0 for c in completion_ids):
        raise ValueError("every completion needs at least one token")
    N, T = len(rows), max(len(r) for r in rows) - 1
    idx = np.zeros((N, T), np.int32)
    targets = np.full((N, T), -1, np.int32)
    for i, (r, p) in enumerate(zip(rows, prompt_ids)):
        idx[i, : len(r) - 1] = r[:-1]
        targets[i, len(p) - 1 : len(r) - 1] = r[len(p) :]
    lengths = np.array([len(c) for c in completion_ids], np.float64)
    return Batch(idx, targets, targets != -1, lengths, np.asarray(adv, np.float64).reshape(N))


def token_logprobs(model: GPT, idx, targets, temperature: float = 1.0) -> np.ndarray:
    """log p(targets) (N, T) float64 under `model` at sampling temperature `temperature`, log softmax(logits / T)
    (0 where targets == -1), through the fused lm-head + CE."""
    was = model.training
    model.eval()
    model.forward(idx, targets, temperature=temperature)
    model.train(was)
    return -model.token_losses.astype(np.float64)


def policy_backward(model: GPT, batch: Batch, old_logp, ref_logp, clip_eps: float, beta: float, logp=None,
                    temperature: float = 1.0) -> dict:
    """Accumulate (+=) into model.grads the gradient of the GRPO loss L = -J (module docstring) on `batch`;
    returns the loss and statistics. logp: the current log-probs if already known (else read by the same forward
    that takes the gradient: GPT.forward's weights as a function of its token losses); temperature: that of the
    rollouts, which logp, old_logp and ref_logp are all taken at."""
    c, m, out = batch.norm, batch.mask, {}

    def weights(token_losses) -> np.ndarray:
        now = -token_losses.astype(np.float64) if logp is None else logp
        J, dJ, kl, clipped = grpo_token_terms(now, old_logp, ref_logp, batch.adv[:, None], clip_eps, beta)
        out.update(loss=float(-(c * J).sum()), kl=float(kl[m].mean()), clip_frac=float(clipped[m].mean()))
        return (c * dJ).astype(np.float32)  # dL/dCE_t (grpo_token_terms): zero outside completions

    model.train()  # (with logp known, the weights are known before the forward: one lm-head pass)
    model.forward(batch.idx, batch.targets, weights=weights if logp is None else weights(None),
                  temperature=temperature)
    model.backward()
    return out


# ---- rollouts -----------------------------------------------------------------------------------------------


def reward_name(reward_fn) -> str:
    """How an error names a reward function: its qualified name (a callable object: its class)."""
    return getattr(reward_fn, "__qualname__", None) or type(reward_fn).__name__


def score(reward_fn: RewardFn, prompts: Sequence[str], completions: Sequence[Sequence[str]]) -> np.ndarray:
    """rewards (P, G); a raising reward function, or one returning something that is not a finite number (NaN, inf,
    None, a string) -> RewardError naming the function, the prompt and the completion."""
    out = np.empty((len(prompts), len(completions[0]) if completions else 0), np.float64)
    for i, (p, group) in enumerate(zip(prompts, completions)):
        for j, c in enumerate(group):
            where = f"reward function {reward_name(reward_fn)}"
            try:
                got = reward_fn(p, c)
            except Exception as e:
                raise RewardError(f"{where} failed on prompt {p!r} (completion {c!r}): {type(e).__name__}: {e}") from e
            try:
                if isinstance(got, (str, bytes)) or got is None:
                    raise ValueError(f"a {type(got).__name__} is not a number")
                r = float(got)
            except (TypeError, ValueError) as e:
                raise RewardError(f"{where} returned {got!r} for prompt {p!r} (completion {c!r}); rewards must be "
                                  f"finite numbers ({type(e).__name__}: {e})") from e
            if not math.isfinite(r):
                raise RewardError(
                    f"{where} returned {r} for prompt {p!r} (completion {c!r}); rewards must be finite numbers"
                )
            out[i, j] = r
    return out


def end_tokens(model: GPT, tokenizer) -> tuple[int, ...]:
    """The ids that end a plain-text sequence: <|endoftext|>, else (a hub folder's tokenizer without it: Llama 3)
    the EOS ids its checkpoint folder names; ValueError when there are none."""
    if tokenizer.eot_token is not None:
        return (tokenizer.eot_token,)
    folder = getattr(model, "checkpoint_dir", None)
    ends = tuple(eos_token_ids(folder, tokenizer))
    if not ends:
        raise ValueError("no token ends a sequence: the tokenizer has no <|endoftext|> and the checkpoint names no "
                         "EOS id")
    return ends


def sample_completions(
    model: GPT,
    tokenizer,
    prompts: Sequence[str],
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int | None = None,
    chat=None,
    system: str | None = None,
):
    """G completions per prompt in one batched, KV-cached generation, the prompts in the chat format `chat`
    (fastllm.eval.chat_of) or, None, as plain text, after the `system` message if given (eval.prompt_ids).
    Returns (prompt_ids (P*G rows), completion_ids (P*G, with the final stop token if generated: the format's end
    of turn, else <|endoftext|> or the checkpoint's EOS), texts (P lists of G strings, without it))."""
    stops = tuple(chat.stop_tokens) if chat else end_tokens(model, tokenizer)
    ids = [prompt_ids(tokenizer, p, chat, system=system).tolist() for p in prompts]
    rows = [r for r in ids for _ in range(group_size)]
    was = model.training
    out = generate(model.eval(), rows, max_new_tokens, temperature=temperature, stop_tokens=stops, seed=seed)
    model.train(was)
    comps = [o[len(r) :] for o, r in zip(out, rows)]
    texts = [tokenizer.decode(c[:-1] if c and c[-1] in stops else c, skip_special_tokens=True)  # (as TRL's)
             for c in comps]
    return rows, comps, [texts[i * group_size : (i + 1) * group_size] for i in range(len(prompts))]


def evaluate(
    model: GPT, tokenizer, task, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
    chat=None, system: str | None = None,
) -> float:
    """Fraction of prompts whose completion the task marks correct (greedy by default)."""
    _, _, texts = sample_completions(model, tokenizer, prompts, 1, max_new_tokens, temperature, seed, chat, system)
    return float(np.mean([task.correct(p, t[0]) for p, t in zip(prompts, texts)]))


# ---- GRPO training -----------------------------------------------------------------------------------------


@dataclass
class RLConfig:
    ckpt: str = option(help="starting policy: a checkpoint (or run folder); also the frozen reference of the KL "
                            "penalty")
    out: str = option("out_rl", "output folder: checkpoints, log.jsonl, rl.png")
    task: str = option("addition", "built-in verifiable task, addition or sort: it makes the prompts, checks the "
                                   "answers (held-out accuracy) and, without --reward or --reward-model, gives the "
                                   "reward (not used with --data)")
    digits: int = option(2, "task size: digits per operand (addition), digits to sort (sort)")
    data: str | None = option(None, "your own problems instead of --task: JSONL, one {\"prompt\", \"answer\"} or "
                                    "GSM8K {\"question\", \"answer\": \"... #### 42\"} per line; the answer in a "
                                    "completion is the text after ####, else the last \\boxed{}, else the last "
                                    "number (fastllm.tasks; default: none, --task makes the problems)")
    eval_data: str | None = option(None, "held-out problems JSONL (as --data) for the accuracy evaluations "
                                         "(default: prompts drawn from the task or --data)")
    reward: str | None = option(None, "your own reward function, module:function or path/file.py:function, "
                                      "(prompt, completion[, answer]) -> float (default: exact answer 1 + well-formed "
                                      "0.1)")
    reward_model: str | None = option(None, "reward-model folder (from `fastllm reward-model`) whose score is the "
                                            "reward (default: the task's exact-answer reward)")
    steps: int = option(100, "GRPO steps, each one batch of rollouts")
    prompts_per_step: int = option(8, "P: prompts per step")
    group_size: int = option(8, "G: completions sampled per prompt (>= 2: advantages compare them)")
    max_new_tokens: int = option(8, "tokens per completion at most")
    temperature: float = option(1.0, "sampling temperature of the rollouts (> 0: greedy rollouts of a group are "
                                      "all the same, their advantages 0); the policy, old-policy and reference "
                                      "log-probs are taken at it too, log softmax(logits / T), as TRL's")
    chat: bool | None = option(None, "prompts as a user turn in the checkpoint's chat template or ChatML, "
                                     "completions ending at its end of turn (default: when it has one)")
    system: str | None = option(None, SYSTEM)
    lr: float = option(1e-4, "AdamW learning rate (constant)")
    beta: float = option(0.04, "weight of the per-token KL penalty to the reference policy (k3 estimator)")
    clip_eps: float = option(0.2, "PPO clip: probability ratios to the sampling policy are clipped to "
                                  "[1 - eps, 1 + eps]")
    iterations: int = option(1, "policy updates per batch of rollouts (GRPO's mu)")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    grad_clip: float = option(1.0, GRAD_CLIP)
    eval_every: int = option(20, "steps between greedy accuracy evaluations on held-out prompts, also at the start "
                                 "and the end (0: never)")
    eval_prompts: int = option(64, "held-out prompts per evaluation (the same set every time)")
    eval_task: str | None = option(None, EVAL_TASK)
    eval_task_data: Sequence[str] | None = option(None, EVAL_TASK_DATA)
    eval_task_limit: int | None = option(None, EVAL_TASK_LIMIT)
    ckpt_every: int = option(50, CKPT_EVERY)
    keep_ckpts: int = option(2, KEEP_CKPTS)
    seed: int = option(1337, SEED)
    threads: int | None = option(None, THREADS)
    resume: bool = option(False, RESUME)
    device: str = option("cpu", DEVICE + " (the policy, the reference and a reward model)", choices=checks.DEVICES)
    dtype: str | None = option(None, DTYPE, choices=checks.DTYPES)
    zero: bool = option(False, ZERO)
    lora_r: int = option(0, LORA_R + "; the reference policy is then the model without its adapters (no second "
                            "copy of it)")
    lora_alpha: float = option(32.0, LORA_ALPHA)
    lora_targets: str = option("all", LORA_TARGETS)
    base_weights: str | None = option(None, BASE_WEIGHTS, choices=BASE_FORMS)

    def __post_init__(self) -> None:
        checks.output_dir(self)
        if self.data is None:
            make_task(self.task, self.digits)  # an unknown task, digits it cannot draw
        if self.reward and self.reward_model:
            raise ValueError("give --reward or --reward-model, not both")
        checks.at_least(self, 1, "steps", "prompts_per_step", "max_new_tokens", "iterations", "eval_prompts",
                        "keep_ckpts", "threads")
        checks.at_least(self, 2, "group_size")  # advantages compare the completions of a group
        checks.at_least(self, 0, "eval_every", "ckpt_every", "seed", "lora_r")
        LoraConfig.of(self)  # its alpha, targets and base_weights
        checks.number(self, "lr", "temperature", low_open=True)  # temperature 0: G equal greedy rollouts, no signal
        checks.number(self, "beta", "weight_decay", "grad_clip")
        checks.number(self, "clip_eps", low_open=True, high=1.0, high_open=True)
        checks.device(self)
        check_train_eval(self)


class GRPO:
    """One GRPO step at a time on a policy, against a frozen reference (ref; None: the policy without its LoRA
    adapters), with AdamW.

    >>> g = GRPO(policy, ref, tokenizer, AdditionTask(2), RLConfig(ckpt=""))
    >>> stats = g.step(["12+34=", "5+7="], seed=0)

    chat: the prompts' chat format (None: plain text); "auto": eval.chat_of(model, tokenizer, cfg.chat).
    """

    def __init__(
        self, model: GPT, ref: GPT, tokenizer, reward_fn: RewardFn, cfg: RLConfig, task=None, opt: AdamW | None = None,
        chat="auto",
    ):
        if ref is None and model.lora is None:
            raise ValueError("GRPO needs a reference model (ref=None: the policy without its LoRA adapters, and this "
                             "one has none)")
        self.model, self.ref, self.tokenizer, self.reward_fn, self.cfg = model, ref, tokenizer, reward_fn, cfg
        if ref is not None:
            ref.eval()
        self.task = task
        self.opt = opt or AdamW(model, cfg.lr, weight_decay=cfg.weight_decay)
        self.chat = chat_of(model, tokenizer, cfg.chat) if chat == "auto" else chat

    def step(self, prompts: Sequence[str], seed: int | None = None, lr: float | None = None) -> dict:
        """Roll out, score and update (cfg.iterations AdamW updates at `lr`, default cfg.lr); returns statistics
        (loss, kl, clip_frac and grad_norm averaged over the updates: the first sees ratios of 1, never clipped)."""
        cfg, model = self.cfg, self.model
        t0 = time.time()
        rows, comp_ids, texts = sample_completions(
            model, self.tokenizer, prompts, cfg.group_size, cfg.max_new_tokens, cfg.temperature, seed, self.chat,
            cfg.system)
        rewards = score(self.reward_fn, prompts, texts)
        adv = group_advantages(rewards)
        batch = pack(rows, comp_ids, adv)
        old = token_logprobs(model, batch.idx, batch.targets, cfg.temperature)  # log-probs of the sampled
        with contextlib.nullcontext(self.ref) if self.ref is not None else model.without_lora() as ref_model:
            ref = token_logprobs(ref_model, batch.idx, batch.targets, cfg.temperature)  # distributions (at T)
        sums: dict[str, float] = {}
        for it in range(cfg.iterations):
            loss = functools.partial(policy_backward, model, batch, old, ref, cfg.clip_eps, cfg.beta,
                                     logp=old if it == 0 else None, temperature=cfg.temperature)
            st = update(model, self.opt, loss, cfg.lr if lr is None else lr, cfg.grad_clip)
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + v
        stats = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std()),
            **{k: v / cfg.iterations for k, v in sums.items()},  # loss, kl, clip_frac, grad_norm: over the updates
            "completion_len": float(batch.lengths.mean()),
            "dt": time.time() - t0,
        }
        if hasattr(self.task, "correct"):
            stats["accuracy"] = float(np.mean([self.task.correct(p, c) for p, g in zip(prompts, texts) for c in g]))
        return stats


class GRPOStage(Stage):
    """GRPO for fastllm.train.fit: prompts drawn from the task with the run's generator, the reference model
    recorded in checkpoints, greedy accuracy on a fixed held-out prompt set as the evaluation. With several ranks
    each rolls out and scores an equal share of the step's prompts (sampling with a seed of its own) and of the
    evaluation set; the statistics are those of all of them."""

    kind = "grpo"
    show = ("reward", "kl", "accuracy", "eval_accuracy")

    def __init__(self, cfg: RLConfig, task, reward_fn: RewardFn, tokenizer, eval_task=None,
                 task_eval: TrainEval | None = None, log=print):
        self.cfg, self.task, self.reward_fn, self.tokenizer, self.log = cfg, task, reward_fn, tokenizer, log
        self.task_eval = task_eval  # --eval-task
        self.eval_task = eval_task or task
        if eval_task is not None:  # held-out problems (--eval-data)
            self.eval_set = eval_task.prompts[: cfg.eval_prompts]
        else:
            erng = np.random.default_rng(cfg.seed + 1)  # a fixed evaluation set, from its own RNG stream
            self.eval_set = [task.sample(erng) for _ in range(cfg.eval_prompts)]

    def init_model(self) -> GPT:
        model = load_start(self.cfg.ckpt, LoraConfig.of(self.cfg), self.cfg.seed, self.cfg.base_weights)
        self.ref_dir = model.checkpoint_dir
        return model

    def load_state_dict(self, state: dict, folder: Path) -> None:
        if not isinstance(state.get("ref"), str):
            raise ValueError(f"{folder / STATE_FILE}: no 'ref' (the GRPO reference checkpoint) in 'stage'")
        self.ref_dir = Path(state["ref"])

    def start(self, model: GPT, opt: AdamW) -> None:
        super().start(model, opt)
        ranks = distributed.world().size
        if self.cfg.prompts_per_step % ranks:
            raise ValueError(f"prompts_per_step={self.cfg.prompts_per_step} must be a multiple of the {ranks} ranks, "
                             "which each roll out an equal share")
        chat = chat_of(model, self.tokenizer, self.cfg.chat)
        longest = max((len(prompt_ids(self.tokenizer, p, chat, system=self.cfg.system)) for p in self.eval_set),
                      default=0)
        if longest + self.cfg.max_new_tokens > model.config.block_size:
            raise ValueError(f"prompts of {longest} tokens + max_new_tokens={self.cfg.max_new_tokens} do not fit "
                             f"the model's context of {model.config.block_size} tokens (fewer --digits?)")
        # the reference: the policy without its LoRA adapters, or the starting checkpoint loaded once more
        ref = None if model.lora is not None else load_model(self.ref_dir, self.cfg.device,
                                                               checks.compute_dtype(self.cfg))
        self.grpo = GRPO(model, ref, self.tokenizer, self.reward_fn, self.cfg, self.task, opt, chat)
        self.log(f"prompts: {f'chat ({chat.name})' if chat else 'plain text'}")

    def step(self, step: int, lr: float, rng: np.random.Generator) -> dict:
        world = distributed.world()
        prompts = [self.task.sample(rng) for _ in range(self.cfg.prompts_per_step)]  # alike on every rank
        seed = world.rank_seed(int(rng.integers(1 << 31)))
        stats = self.grpo.step(world.share(prompts), seed=seed, lr=lr)  # loss, kl, grad_norm: over all ranks
        if world.size > 1:  # the rollout statistics of all ranks (equal shares: means of the means)
            keys = [k for k in ("reward", "completion_len", "accuracy") if k in stats]
            mean = world.sum([stats[k] for k in keys] + [stats["reward_std"] ** 2 + stats["reward"] ** 2]) / world.size
            stats.update(zip(keys, mean.tolist()))
            stats["reward_std"] = math.sqrt(max(0.0, mean[-1] - stats["reward"] ** 2))
        return stats

    def evaluate(self, step: int) -> dict:
        acc = distributed.world().average(  # each rank scores its share of the held-out set
            self.eval_set, lambda part: evaluate(self.model, self.tokenizer, self.eval_task, part,
                                                 self.cfg.max_new_tokens, chat=self.grpo.chat,
                                                 system=self.cfg.system))
        return {"eval_accuracy": acc, **self.task_metrics()}

    def state_dict(self) -> dict:
        return {"ref": str(self.ref_dir)}

    def fingerprint(self) -> dict:
        return {"task": self.task.name, "eval_set": distributed.fingerprint(np.frombuffer(
            "\n".join(self.eval_set).encode(), np.uint8))}


def train_grpo(
    cfg: RLConfig, reward_fn: RewardFn | None = None, task=None, tokenizer=None, progress: bool = True, log=print
) -> dict:
    """GRPO from cfg.ckpt (or resume from cfg.out): checkpoints OUT/ckpt_NNNNNN as in pre-training, a
    log.jsonl row per step (reward, kl, completion_len, accuracy, ...). reward_fn defaults to the task's
    verifiable reward, or to the reward model of cfg.reward_model. Returns a summary dict."""
    log = setup_run(cfg, log)
    if task is None:
        task = ProblemSet.load(cfg.data) if cfg.data else make_task(cfg.task, cfg.digits)
    eval_task = ProblemSet.load(cfg.eval_data) if cfg.eval_data else None
    if reward_fn is None and cfg.reward:
        reward_fn = load_reward(cfg.reward, task)
    start = resolve(cfg.ckpt)
    tok_path = find_tokenizer(start)  # also copied into every checkpoint
    if tokenizer is None:
        tokenizer = checkpoint_tokenizer(start)
    if reward_fn is None:
        reward_fn = RewardScorer.load(cfg.reward_model, cfg.device, checks.compute_dtype(cfg)) \
            if cfg.reward_model else task.reward
    log(
        f"GRPO: task {task.name}, reward "
        f"{'model ' + cfg.reward_model if cfg.reward_model else cfg.reward or 'verifiable'}, "
        f"{cfg.prompts_per_step} prompts x {cfg.group_size} completions per step"
    )
    stage = GRPOStage(cfg, task, reward_fn, tokenizer, eval_task, TrainEval.of(cfg, tokenizer), log)
    r = fit(stage, Loop.of(cfg, tokenizer=tok_path), progress, log)
    last = next((row for row in reversed(r["rows"]) if "reward" in row), {})
    acc = series(r["rows"], "eval_accuracy")
    nan = float("nan")
    return {
        "steps": cfg.steps,
        "seconds": r["seconds"],
        "reward": last.get("reward", nan),
        "kl": last.get("kl", nan),
        "eval_accuracy_start": acc[0] if acc else nan,
        "eval_accuracy": acc[-1] if acc else nan,
        "eval_task": last_task_metrics(r["rows"]),
        "checkpoint": r["checkpoint"],
        "log": r["log"],
        "plot": r["plot"],
    }


# ---- reward model (RLHF) ---------------------------------------------------------------------------------


def load_preferences(path: str | Path) -> list[dict]:
    """JSONL (or Parquet) preference pairs, one {"prompt", "chosen", "rejected"} object (strings) per line, or
    without "prompt" (Anthropic's hh-rlhf: whole dialogues; the reward model scores prompt + completion either
    way); blank lines are skipped. Conversational pairs are read as the same texts: "chosen" and "rejected" as
    message lists (HuggingFaceH4/ultrafeedback_binarized, trl-lib's) give their last, assistant, message, and the
    prompt is the "prompt" string, else the contents of the messages before it (a "prompt" message list too), joined
    by blank lines. A malformed line raises ValueError naming file:line."""
    pairs = []
    for where, obj in iter_records(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        prompt = obj.get("prompt")
        if isinstance(prompt, list):
            prompt = _context(validate_conversation(prompt, f"{where}: 'prompt'", need_assistant=False))
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f"{where}: field 'prompt' must be a string or a list of messages, got "
                             f"{type(prompt).__name__}")
        pair, context = {}, {}
        for k in ("chosen", "rejected"):
            v = obj.get(k)
            if isinstance(v, list):
                msgs = validate_conversation(v, f"{where}: {k!r}", need_assistant=False)
                if msgs[-1]["role"] != "assistant":
                    raise ValueError(f"{where}: {k!r} must end with an assistant message, got {msgs[-1]['role']!r}")
                v, context[k] = msgs[-1]["content"], _context(msgs[:-1])
            if not isinstance(v, str):
                got = "missing" if k not in obj else type(v).__name__
                raise ValueError(f"{where}: field {k!r} must be a string or a list of messages, got {got}")
            pair[k] = v
        if prompt is None and len(set(context.values())) > 1:
            raise ValueError(f"{where}: 'chosen' and 'rejected' answer different prompts (the messages before their "
                             "last differ)")
        pairs.append({"prompt": prompt if prompt is not None else next(iter(context.values()), ""), **pair})
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs


def _context(messages: list[dict]) -> str:
    """The text of the messages before a preference pair's answers: their contents, joined by blank lines."""
    return "\n\n".join(m["content"] for m in messages)


class RewardModel:
    """GPT backbone + scalar head: r = w . h_last + b, h_last the final hidden state (after ln_f) of the last
    token of prompt + completion + <|endoftext|> (or the checkpoint's first EOS id: end_tokens). head = [w (C), b]
    in one flat array (so AdamW's kernel updates it like any parameter)."""

    def __init__(self, backbone: GPT, head: np.ndarray | None = None):
        C = backbone.config.n_embd
        self.backbone = backbone
        self.head = np.zeros(C + 1, np.float32) if head is None else np.ascontiguousarray(head, np.float32)
        if self.head.shape != (C + 1,):
            raise ValueError(f"head must have shape ({C + 1},), got {self.head.shape}")
        self.head_grad = np.zeros_like(self.head)
        self._end: tuple = (None, None)  # (tokenizer, its end token): end_tokens may read the checkpoint's files

    def encode(self, tokenizer, prompt: str, completion: str) -> list[int]:
        if self._end[0] is not tokenizer:
            self._end = (tokenizer, end_tokens(self.backbone, tokenizer)[0])
        ids = [int(t) for t in tokenizer.encode(prompt + completion)] + [self._end[1]]
        return ids[-self.backbone.config.block_size :]  # too long: keep the end (the scored token)

    def _batch(self, seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        T = max(len(s) for s in seqs)
        idx = np.zeros((len(seqs), T), np.int32)  # right-padded with 0: causal attention keeps it out of h_last
        for i, s in enumerate(seqs):
            idx[i, : len(s)] = s
        return idx, np.array([len(s) - 1 for s in seqs])

    def forward(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
        """Rewards (B,) float64 of token sequences; keeps what backward() needs."""
        idx, last = self._batch(seqs)
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

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str | None = None) -> RewardModel:
        """The reward model of a `fastllm reward-model` run folder (its latest checkpoint) or checkpoint folder."""
        backbone = load_model(path, device, dtype).eval()
        file = backbone.checkpoint_dir / "heads.safetensors"
        heads = load_heads(backbone.checkpoint_dir)
        if HEAD not in heads:
            raise ValueError(f"{file}: no {HEAD!r} tensor (not a reward model?)")
        return cls(backbone, heads[HEAD])


class RewardScorer:
    """A reward model as a GRPO reward function (prompt, completion) -> float."""

    def __init__(self, rm: RewardModel, tokenizer):
        self.rm, self.tokenizer = rm, tokenizer
        rm.backbone.eval()

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str | None = None) -> RewardScorer:
        rm = RewardModel.load(path, device, dtype)
        return cls(rm, checkpoint_tokenizer(rm.backbone.checkpoint_dir))

    def __call__(self, prompt: str, completion: str) -> float:
        seq = self.rm.encode(self.tokenizer, prompt, completion)
        return float(self.rm.forward([seq])[0])


@dataclass
class PreferenceConfig:
    """The options of a run on preference pairs (RewardModelConfig, fastllm.dpo.DPOConfig)."""

    base: str = option(help="the model to start from: a checkpoint (or run folder), e.g. the SFT model")
    data: str = option(help="preference pairs JSONL (or Parquet), one {\"prompt\", \"chosen\", \"rejected\"} per line: "
                            "strings, or message lists as ultrafeedback_binarized's")
    out: str = option("out", "output folder: checkpoints, log.jsonl, loss.png and the run's summary")
    val_data: str | None = option(None, "held-out pairs JSONL (default: --val-fraction of --data)")
    val_fraction: float = option(0.1, "fraction of --data held out when --val-data is not given")
    epochs: int = option(2, "passes over the training pairs")
    batch_size: int = option(16, "preference pairs per step")
    lr: float = option(1e-4, "AdamW learning rate (constant)")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    grad_clip: float = option(1.0, GRAD_CLIP)
    seed: int = option(1337, SEED)
    threads: int | None = option(None, THREADS)
    eval_every: int = option(100, "steps between held-out evaluations, also at the start and the end (0: never)")
    ckpt_every: int = option(0, CKPT_EVERY)
    keep_ckpts: int = option(2, KEEP_CKPTS)
    resume: bool = option(False, RESUME)
    device: str = option("cpu", DEVICE, choices=checks.DEVICES)
    dtype: str | None = option(None, DTYPE, choices=checks.DTYPES)
    zero: bool = option(False, ZERO)
    lora_r: int = option(0, LORA_R)
    lora_alpha: float = option(32.0, LORA_ALPHA)
    lora_targets: str = option("all", LORA_TARGETS)
    base_weights: str | None = option(None, BASE_WEIGHTS, choices=BASE_FORMS)

    def __post_init__(self) -> None:
        checks.output_dir(self)
        checks.at_least(self, 1, "epochs", "batch_size", "keep_ckpts", "threads")
        checks.at_least(self, 0, "eval_every", "ckpt_every", "seed", "lora_r")
        LoraConfig.of(self)  # its alpha, targets and base_weights
        checks.number(self, "lr", low_open=True)
        checks.number(self, "weight_decay", "grad_clip")
        checks.number(self, "val_fraction", high=1.0, high_open=True)
        checks.device(self)


@dataclass
class RewardModelConfig(PreferenceConfig):
    base: str = option(help="backbone checkpoint (or run folder), e.g. the SFT model")
    out: str = option("out_rm", "output folder: checkpoints (backbone + heads.safetensors), log.jsonl, loss.png, "
                                "reward_model.json")
    eval_every: int = option(100, "steps between held-out preference-accuracy evaluations, also at the start and "
                                  "the end (0: never)")
    lora_r: int = option(0, LORA_R + "; the head trains whole")

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.number(self, "val_fraction", low_open=True, high=1.0, high_open=True)  # (its accuracy is the point)


def preference_accuracy(rm: RewardModel, tokenizer, pairs: Sequence[dict], batch_size: int = 64) -> float:
    """Fraction of pairs with r(chosen) > r(rejected) (ties count half)."""
    was = rm.backbone.training
    rm.backbone.eval()
    wins = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        seqs = [rm.encode(tokenizer, p["prompt"], p[k]) for k in ("chosen", "rejected") for p in chunk]
        r = rm.forward(seqs)
        d = r[: len(chunk)] - r[len(chunk) :]
        wins += list((d > 0) + 0.5 * (d == 0))  # a tie counts half
    rm.backbone.train(was)
    return float(np.mean(wins))


class PreferenceStage(Stage):
    """A stage on preference pairs (RewardModelStage, fastllm.dpo.DPOStage): batches of B pairs in epochs (the
    order checkpointed), the model from cfg.base (LoRA adapters on it with cfg.lora_r)."""

    def __init__(self, cfg: PreferenceConfig, tokenizer, pairs: Sequence[dict], val_pairs: Sequence[dict], B: int):
        self.cfg, self.tokenizer, self.pairs, self.val_pairs = cfg, tokenizer, pairs, val_pairs
        self.B, self.order = B, Epochs(len(pairs), cfg.seed)
        self.resumed = False  # from a checkpoint (load_state_dict)

    def init_model(self) -> GPT:
        return load_start(self.cfg.base, LoraConfig.of(self.cfg), self.cfg.seed, self.cfg.base_weights)

    def load_state_dict(self, state: dict, folder: Path) -> None:
        try:
            if state["loader"]["n"] != len(self.pairs):
                raise ValueError(f"it is for {state['loader']['n']} pairs, this run has {len(self.pairs)}")
            self.order.seek(state["loader"]["epoch"], state["loader"]["pos"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{folder / STATE_FILE}: bad pair-loader state ({type(e).__name__}: {e})") from None
        self.resumed = True

    def state_dict(self) -> dict:
        return {"loader": {**self.order.state_dict(), "n": len(self.pairs)}}


class RewardModelStage(PreferenceStage):
    """Bradley-Terry training of a reward model for fastllm.train.fit: the loss -log sigmoid(r_chosen - r_rejected)
    over batches of pairs; the head trains beside the backbone (ExtraParams, checkpointed in heads.safetensors);
    held-out preference accuracy as the evaluation."""

    kind = "reward-model"
    show = ("loss", "accuracy", "val_accuracy")

    def __init__(self, cfg: RewardModelConfig, tokenizer, pairs: Sequence[dict], val_pairs: Sequence[dict], B: int):
        super().__init__(cfg, tokenizer, pairs, val_pairs, B)
        self._saved_head: tuple[dict, str] | None = None

    def load_state_dict(self, state: dict, folder: Path) -> None:
        super().load_state_dict(state, folder)
        self._saved_head = (load_heads(folder), str(folder / "heads.safetensors"))

    def start(self, model: GPT, opt: AdamW) -> None:
        super().start(model, opt)
        self.rm = RewardModel(model)
        self.head = ExtraParams(HEAD, self.rm.head, self.rm.head_grad)
        if self._saved_head is not None:
            self.head.load_state_dict(*self._saved_head)
        enc = self.rm.encode
        self.encoded = [(enc(self.tokenizer, p["prompt"], p["chosen"]), enc(self.tokenizer, p["prompt"], p["rejected"]))
                        for p in self.pairs]

    def step(self, step: int, lr: float, rng: np.random.Generator) -> dict:
        chunk = [self.encoded[i] for i in self.order.take(self.B, cross=False)]  # an epoch's last: fewer
        world = distributed.world()
        mine = world.share(chunk)  # this rank's pairs; update() averages the ranks' means, so each is weighted by
        b, w = len(mine), len(mine) * world.size / len(chunk)  # its share of the chunk (w = 1 in one process)

        def micro_batch() -> dict:
            if not mine:
                return {"loss": 0.0, "accuracy": 0.0}
            r = self.rm.forward([c for c, _ in mine] + [r_ for _, r_ in mine])
            diff = r[:b] - r[b:]
            loss = float(np.mean(np.logaddexp(0.0, -diff)))  # -log sigmoid(diff), stable
            g = -1.0 / (1.0 + np.exp(diff)) / b * w  # dloss/ddiff = -sigmoid(-diff) / b
            self.rm.backward(np.concatenate([g, -g]))
            return {"loss": loss * w, "accuracy": float(np.mean((diff > 0) + 0.5 * (diff == 0))) * w}  # a tie: half

        return update(self.model, self.opt, micro_batch, lr, self.cfg.grad_clip, extra=(self.head,))

    def evaluate(self, step: int) -> dict:
        acc = distributed.world().average(self.val_pairs, lambda part: preference_accuracy(self.rm, self.tokenizer,
                                                                                          part))
        return {"val_accuracy": acc}

    def fingerprint(self) -> dict:
        flat = [t for c, r in self.encoded for t in c + [-1] + r + [-1]]
        return {"pairs": len(self.pairs), "val_pairs": len(self.val_pairs),
                "encoded": distributed.fingerprint(np.array(flat, np.int64))}

    def heads(self) -> dict[str, np.ndarray]:
        return self.head.state_dict()


def train_reward_model(
    cfg: RewardModelConfig,
    tokenizer=None,
    pairs: Sequence[dict] | None = None,
    val_pairs: Sequence[dict] | None = None,
    progress: bool = True,
    log=print,
) -> dict:
    """Bradley-Terry training of a reward head (and the backbone) on preference pairs for cfg.epochs epochs;
    reports held-out accuracy. The run folder cfg.out holds checkpoints (backbone + heads.safetensors; resume
    with cfg.resume), log.jsonl and reward_model.json (the summary); RewardModel.load(cfg.out) reads it."""
    log = setup_run(cfg, log)
    rng = np.random.default_rng(cfg.seed)
    pairs = list(pairs) if pairs is not None else load_preferences(cfg.data)
    if val_pairs is None and cfg.val_data:
        val_pairs = load_preferences(cfg.val_data)
    if val_pairs is None:
        perm = rng.permutation(len(pairs))
        n_val = max(1, int(round(len(pairs) * cfg.val_fraction)))
        if n_val >= len(pairs):
            raise ValueError(f"{len(pairs)} pairs are too few to hold out {n_val}")
        val_pairs = [pairs[i] for i in perm[:n_val]]
        pairs = [pairs[i] for i in perm[n_val:]]
    base = resolve(cfg.base)
    tok_path = find_tokenizer(base)  # also copied into the reward model's checkpoints
    if tokenizer is None:
        tokenizer = checkpoint_tokenizer(base)
    B = max(1, min(cfg.batch_size, len(pairs)))
    stage = RewardModelStage(cfg, tokenizer, pairs, val_pairs, B)
    steps_per_epoch = math.ceil(len(pairs) / B)
    log(f"reward model: {len(pairs)} train / {len(val_pairs)} held-out pairs, {steps_per_epoch} steps per epoch")
    r = fit(stage, Loop.of(cfg, steps=cfg.epochs * steps_per_epoch, tokenizer=tok_path), progress, log)
    val = series(r["rows"], "val_accuracy")
    nan = float("nan")
    metrics = {
        "steps": cfg.epochs * steps_per_epoch,
        "train_pairs": len(pairs),
        "val_pairs": len(val_pairs),
        "val_accuracy_start": val[0] if val else nan,
        "val_accuracy": val[-1] if val else nan,
        "train_loss": float(np.mean(series(r["rows"], "loss")[-steps_per_epoch:])),
        "train_accuracy": float(np.mean(series(r["rows"], "accuracy")[-steps_per_epoch:])),
        "seconds": r["seconds"],
        "base": str(base),
        "checkpoint": r["checkpoint"],
    }
    if distributed.world().is_main:
        write_json(Path(cfg.out) / "reward_model.json", metrics)
    held_out = (f"held-out accuracy {metrics['val_accuracy_start']:.3f} -> {metrics['val_accuracy']:.3f} "
                f"({len(val_pairs)} pairs)" if val else "held-out accuracy not measured (no held-out pairs or "
                "--eval-every 0)")
    log(f"{held_out}; saved to {cfg.out}")
    return {**metrics, "out": str(cfg.out), "log": r["log"], "plot": r["plot"], "model": stage.rm}


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
