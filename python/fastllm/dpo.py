"""Direct Preference Optimization (Rafailov et al. 2023): learn from preference pairs without a reward model.

For a prompt x with a chosen answer y_c and a rejected one y_r, the policy pi is pushed to raise log pi(y_c|x)
against log pi(y_r|x) relative to a frozen reference pi_ref (the starting model):

    h = (log pi(y_c|x) - log pi_ref(y_c|x)) - (log pi(y_r|x) - log pi_ref(y_r|x)),   z = beta * h
    sigmoid (DPO):  L = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)     (eps: label_smoothing, cDPO)
    ipo (IPO):      L = (h - 1 / (2 beta))^2, with log pi the MEAN token log-prob of each answer (as TRL's)
    hinge (SLiC):   L = max(0, 1 - z)

log pi(y|x) is the sum of the answer's token log-probs (its end-of-turn token included; the prompt's are not
counted). The reference log-probs are computed once, at the start, for every pair (TRL's precompute_ref_log_probs):
then no second model is kept -- and with LoRA (--lora-r) the reference is the model without its adapters anyway.
Logged like TRL's DPOTrainer: loss, the implicit rewards beta * (log pi - log pi_ref) of the chosen and rejected
answers, their margin, and accuracy (the fraction of pairs whose chosen reward is the higher); the same on the
held-out pairs every --eval-every steps (val_*).

Gradient: L depends on the weights only through the answers' log-probs, so its gradient is that of
sum_s dL/dlogpi_s * log pi_s -- the model's weighted cross-entropy (GPT.forward(idx, targets, weights)) with each
answer token weighted by -dL/dlogpi_s of its sequence, weights that GPT.forward computes from the same forward's
token log-probs (the lm-head runs twice, the rest of the model once), then one backward.

Prompts: a chat model's (its template, or ChatML) get the prompt as a user turn and each answer as the assistant's,
ending with the format's end of turn; a base model gets prompt + answer as plain text, ending with <|endoftext|>.

>>> fastllm dpo --base sft/ --data prefs.jsonl --out dpo/ --beta 0.1 --lr 1e-6       # also --lora-r 16
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checks, distributed
from .checkpoint import checkpoint_tokenizer, find_tokenizer, load_start, resolve
from .eval import chat_of, prompt_ids
from .fileio import write_json
from .model import GPT
from .ops import IGNORE_INDEX
from .optim import AdamW
from .options import LORA_R, SYSTEM, option
from .rl import PreferenceConfig, PreferenceStage, end_tokens, load_preferences, token_logprobs
from .train import Loop, fit, series, setup_run, update

LOSSES = ("sigmoid", "ipo", "hinge")
STATS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy")  # per pair, averaged (TRL's names aside)


@dataclass
class DPOConfig(PreferenceConfig):
    base: str = option(help="starting policy, also the frozen reference: a checkpoint (or run folder), e.g. the SFT "
                            "model")
    out: str = option("out_dpo", "output folder: checkpoints, log.jsonl, loss.png, dpo.json")
    val_fraction: float = option(0.1, "fraction of --data held out when --val-data is not given (0: none)")
    epochs: int = 1
    batch_size: int = 8
    lr: float = option(1e-6, "AdamW learning rate (TRL's DPO default; adapters take more, e.g. 5e-5 with --lora-r)")
    eval_every: int = option(50, "steps between held-out evaluations (loss, rewards, accuracy), also at the start and "
                                 "the end (0: never)")
    lora_r: int = option(0, LORA_R + "; the reference is then the model without its adapters")
    warmup_steps: int = option(0, "linear learning-rate warmup steps (then constant)")
    beta: float = option(0.1, "DPO's beta: the strength of the pull to the reference (the implicit reward's scale)")
    loss: str = option("sigmoid", "sigmoid (DPO), ipo (IPO, on mean token log-probs) or hinge (SLiC)",
                       choices=LOSSES)
    label_smoothing: float = option(0.0, "sigmoid loss: the assumed fraction of flipped preference labels (cDPO), "
                                         "in [0, 0.5)")
    chat: bool | None = option(None, "prompts as a user turn and answers as the assistant's in the checkpoint's chat "
                                     "template or ChatML (default: when it has one)")
    system: str | None = option(None, SYSTEM)

    def __post_init__(self) -> None:
        super().__post_init__()
        checks.at_least(self, 0, "warmup_steps")
        checks.number(self, "beta", low_open=True)
        checks.number(self, "label_smoothing", high=0.5, high_open=True)
        checks.one_of(self, "loss", LOSSES)
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing is for the sigmoid loss, not {self.loss!r}")


def dpo_terms(pi_c, pi_r, ref_c, ref_r, beta: float, loss: str = "sigmoid", label_smoothing: float = 0.0):
    """The per-pair losses and their derivatives by the policy's log-probs of the chosen and rejected answers:
    (losses, dL/dpi_c, dL/dpi_r), float64 arrays (see the module doc for the losses)."""
    h = (np.asarray(pi_c, np.float64) - ref_c) - (np.asarray(pi_r, np.float64) - ref_r)
    z = beta * h
    if loss == "sigmoid":
        eps = label_smoothing  # -log sigmoid(x) = logaddexp(0, -x), stable; sigmoid(-z) = 1 / (1 + e^z)
        losses = (1 - eps) * np.logaddexp(0.0, -z) + eps * np.logaddexp(0.0, z)
        dh = beta * (-(1 - eps) / (1.0 + np.exp(z)) + eps / (1.0 + np.exp(-z)))
    elif loss == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
        dh = 2.0 * (h - 1.0 / (2.0 * beta))
    elif loss == "hinge":
        losses = np.maximum(0.0, 1.0 - z)
        dh = np.where(z < 1.0, -beta, 0.0)
    else:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return losses, dh, -dh


@dataclass
class Pairs:
    """Preference pairs as token sequences: row 2i is pair i's prompt + chosen answer, row 2i+1 its prompt + rejected
    answer; `start[row]` where the answer starts (the first target is the answer's first token)."""

    seqs: list[list[int]]
    start: list[int]
    truncated: int = 0  # pairs whose answers were cut to fit the context

    def batch(self, pairs: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(idx, targets) (2B, T) for the pairs `pairs`: right-padded; targets the next token on answer positions,
        -1 elsewhere."""
        rows = [r for i in pairs for r in (2 * i, 2 * i + 1)]
        T = max(len(self.seqs[r]) for r in rows) - 1
        idx = np.zeros((len(rows), T), np.int32)
        tgt = np.full((len(rows), T), IGNORE_INDEX, np.int32)
        for j, r in enumerate(rows):
            s = self.seqs[r]
            idx[j, : len(s) - 1] = s[:-1]
            tgt[j, self.start[r] - 1 : len(s) - 1] = s[self.start[r] :]
        return idx, tgt


def encode_pairs(pairs: Sequence[dict], model: GPT, tokenizer, chat=None, system: str | None = None) -> Pairs:
    """Pairs of {"prompt", "chosen", "rejected"} as token sequences (see the module doc for the format). An answer
    too long for the context is cut (counted); a prompt that leaves no room for an answer token raises ValueError."""
    end = chat.stop_tokens[0] if chat else end_tokens(model, tokenizer)[0]
    n = model.config.block_size + 1  # tokens of a sequence: block_size inputs, the last one a target only
    seqs, start, truncated = [], [], 0
    for i, p in enumerate(pairs):
        prompt = [int(t) for t in prompt_ids(tokenizer, p["prompt"], chat, system=system)]
        if len(prompt) + 1 > n - 1:
            raise ValueError(f"pair {i}: its prompt of {len(prompt)} tokens leaves no room for an answer in the "
                             f"model's context of {model.config.block_size} tokens")
        cut = False
        for k in ("chosen", "rejected"):
            answer = [int(t) for t in tokenizer.encode_ordinary(p[k])] + [end]
            cut |= len(prompt) + len(answer) > n
            seqs.append((prompt + answer)[:n])
            start.append(len(prompt))
        truncated += cut
    return Pairs(seqs, start, truncated)


def sequence_logps(model: GPT, idx, targets, mean: bool = False) -> np.ndarray:
    """log pi(answer | prompt) per row (float64): the sum (mean) of the target tokens' log-probs, in eval mode."""
    logp = token_logprobs(model, idx, targets).sum(1)  # (0 where targets are -1)
    return logp / np.maximum((targets != IGNORE_INDEX).sum(1), 1) if mean else logp


def dpo_backward(model: GPT, idx, targets, ref, cfg: DPOConfig, scale: float = 1.0) -> dict:
    """Accumulate into the model's gradients `scale` times the gradient of the mean DPO loss over the pairs of the
    batch (rows 2i, 2i+1: pair i's chosen and rejected answers; ref: their reference log-probs, (2B,)). Returns the
    batch's stats (loss, rewards, margin, accuracy): means over its pairs."""
    mask = targets != IGNORE_INDEX
    n = np.maximum(mask.sum(1), 1) if cfg.loss == "ipo" else 1  # (IPO: mean token log-probs)
    out = {}

    def weights(token_losses: np.ndarray) -> np.ndarray:  # of this very forward's log-probs (GPT.forward)
        logp = -(token_losses.astype(np.float64) * mask).sum(1) / n
        losses, dc, dr = dpo_terms(logp[0::2], logp[1::2], ref[0::2], ref[1::2], cfg.beta, cfg.loss,
                                   cfg.label_smoothing)
        d = np.empty(len(logp))
        d[0::2], d[1::2] = dc, dr
        out.update(pair_stats(losses, logp, ref, cfg.beta))
        # sum_s d_s * logpi_s = sum_s sum_t (-d_s / n_s) * CE_t: the weighted cross-entropy
        return ((-d / n * scale / len(losses))[:, None] * mask).astype(np.float32)

    model.forward(idx, targets, weights=weights)
    model.backward()
    return out


def pair_stats(losses, logp, ref, beta: float) -> dict:
    """STATS of a batch: mean loss, implicit rewards beta * (log pi - log pi_ref) of the chosen and rejected answers,
    their margin, and the fraction of pairs whose chosen reward is the higher."""
    rc, rr = beta * (logp[0::2] - ref[0::2]), beta * (logp[1::2] - ref[1::2])
    return {"loss": float(np.mean(losses)), "chosen_reward": float(np.mean(rc)), "rejected_reward": float(np.mean(rr)),
            "margin": float(np.mean(rc - rr)), "accuracy": float(np.mean(rc > rr))}


def reference_logps(model: GPT, pairs: Pairs, mean: bool, batch_size: int = 16, desc: str = "reference",
                    progress: bool = True) -> np.ndarray:
    """log pi_ref of every answer of `pairs` (rows as Pairs), under `model`, in batches of batch_size pairs (with a
    progress bar)."""
    from tqdm.auto import tqdm  # here: a slow import

    n = len(pairs.seqs) // 2
    out = np.empty(2 * n)
    for i in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        chunk = range(i, min(n, i + batch_size))
        out[2 * i : 2 * chunk.stop] = sequence_logps(model, *pairs.batch(chunk), mean)
    return out


class DPOStage(PreferenceStage):
    """DPO for fastllm.train.fit: batches of pairs in epochs, the reference log-probs computed at the start, held-out
    loss, rewards and accuracy as the evaluation. With several ranks each takes its share of a step's pairs."""

    kind = "dpo"
    show = ("loss", "accuracy", "margin", "val_accuracy")

    def __init__(self, cfg: DPOConfig, tokenizer, pairs: Sequence[dict], val_pairs: Sequence[dict], B: int, log=print,
                 progress: bool = True):
        super().__init__(cfg, tokenizer, pairs, val_pairs, B)
        self.log = log
        self.progress = progress and distributed.world().is_main  # (of the reference log-probs)

    def start(self, model: GPT, opt: AdamW) -> None:
        super().start(model, opt)
        cfg = self.cfg
        self.chat = chat_of(model, self.tokenizer, cfg.chat)
        self.train_set = encode_pairs(self.pairs, model, self.tokenizer, self.chat, cfg.system)
        self.val_set = encode_pairs(self.val_pairs, model, self.tokenizer, self.chat, cfg.system)
        # the reference: the policy without its LoRA adapters, or the starting model (loaded again when resuming)
        if model.lora is not None:
            with model.without_lora():
                self.ref = self._reference(model)
        else:
            ref = load_start(cfg.base).to(cfg.device, checks.compute_dtype(cfg)) if self.resumed else model
            self.ref = self._reference(ref)
        cut = self.train_set.truncated + self.val_set.truncated
        self.log(f"dpo: {len(self.pairs)} train / {len(self.val_pairs)} held-out pairs, "
                 f"{'chat (' + self.chat.name + ')' if self.chat else 'plain text'}"
                 + (f"; {cut} pairs with answers cut to the context" if cut else ""))

    def _reference(self, model: GPT) -> dict[str, np.ndarray]:
        mean = self.cfg.loss == "ipo"
        return {"train": reference_logps(model, self.train_set, mean, desc="reference (train)", progress=self.progress),
                "val": reference_logps(model, self.val_set, mean, desc="reference (held out)", progress=self.progress)}

    def step(self, step: int, lr: float, rng: np.random.Generator) -> dict:
        chunk = self.order.take(self.B, cross=False)  # an epoch's last: fewer
        world = distributed.world()
        mine = world.share(list(chunk))  # this rank's pairs; update() averages the ranks' means, so each is
        w = len(mine) * world.size / len(chunk)  # weighted by its share of the chunk (w = 1 in one process)
        ref = self.ref["train"]

        def micro_batch() -> dict:
            if not mine:
                return dict.fromkeys(STATS, 0.0)
            idx, tgt = self.train_set.batch(mine)
            rows = np.array([r for i in mine for r in (2 * i, 2 * i + 1)])
            stats = dpo_backward(self.model, idx, tgt, ref[rows], self.cfg, scale=w)
            return {k: v * w for k, v in stats.items()}

        row = update(self.model, self.opt, micro_batch, lr, self.cfg.grad_clip)
        row["tokens"] = sum(len(self.train_set.seqs[r]) for i in chunk for r in (2 * i, 2 * i + 1))
        return row

    def evaluate(self, step: int) -> dict:
        if not self.val_pairs:
            return {}
        cfg, world, n = self.cfg, distributed.world(), len(self.val_pairs)
        sums = dict.fromkeys(STATS, 0.0)  # over this rank's share of the held-out pairs
        part = world.share(list(range(n)))
        for i in range(0, len(part), 16):
            chunk = part[i : i + 16]
            rows = np.array([r for j in chunk for r in (2 * j, 2 * j + 1)])
            logp = sequence_logps(self.model, *self.val_set.batch(chunk), cfg.loss == "ipo")
            ref = self.ref["val"][rows]
            losses, _, _ = dpo_terms(logp[0::2], logp[1::2], ref[0::2], ref[1::2], cfg.beta, cfg.loss,
                                     cfg.label_smoothing)
            for k, v in pair_stats(losses, logp, ref, cfg.beta).items():
                sums[k] += v * len(chunk)
        totals = world.sum([sums[k] for k in STATS])  # every rank's, added
        return {f"val_{k}": float(v) / n for k, v in zip(STATS, totals)}

    def fingerprint(self) -> dict:
        flat = [t for s in self.train_set.seqs for t in s + [-1]]
        return {"pairs": len(self.pairs), "val_pairs": len(self.val_pairs),
                "encoded": distributed.fingerprint(np.array(flat, np.int64))}


def train_dpo(cfg: DPOConfig, tokenizer=None, pairs: Sequence[dict] | None = None,
              val_pairs: Sequence[dict] | None = None, progress: bool = True, log=print) -> dict:
    """DPO on preference pairs for cfg.epochs epochs (see the module doc). The run folder cfg.out holds checkpoints
    (resume with cfg.resume; the adapters alone with cfg.lora_r), log.jsonl, loss.png and dpo.json (the summary)."""
    log = setup_run(cfg, log)
    pairs = list(pairs) if pairs is not None else load_preferences(cfg.data)
    if val_pairs is None and cfg.val_data:
        val_pairs = load_preferences(cfg.val_data)
    if val_pairs is None:
        perm = np.random.default_rng(cfg.seed).permutation(len(pairs))
        n_val = int(round(len(pairs) * cfg.val_fraction))
        if n_val >= len(pairs):
            raise ValueError(f"{len(pairs)} pairs are too few to hold out {n_val}")
        val_pairs = [pairs[i] for i in perm[:n_val]]
        pairs = [pairs[i] for i in perm[n_val:]]
    base = resolve(cfg.base)
    tok_path = find_tokenizer(base)  # copied into the checkpoints
    tokenizer = tokenizer or checkpoint_tokenizer(base)
    B = max(1, min(cfg.batch_size, len(pairs)))
    stage = DPOStage(cfg, tokenizer, pairs, val_pairs, B, log, progress)
    steps = cfg.epochs * math.ceil(len(pairs) / B)
    r = fit(stage, Loop.of(cfg, steps=steps, tokenizer=tok_path), progress, log)
    nan = float("nan")
    val = {k: series(r["rows"], "val_" + k) for k in ("loss", "accuracy", "margin")}
    summary = {
        "steps": steps, "train_pairs": len(pairs), "val_pairs": len(val_pairs), "seconds": r["seconds"],
        "train_loss": float(np.mean(series(r["rows"], "loss")[-max(1, steps // cfg.epochs):])),
        **{f"val_{k}_start": v[0] if v else nan for k, v in val.items()},
        **{f"val_{k}": v[-1] if v else nan for k, v in val.items()},
        "base": str(base), "checkpoint": r["checkpoint"],
    }
    if distributed.world().is_main:
        write_json(Path(cfg.out) / "dpo.json", summary)
    log(f"dpo: held-out accuracy {summary['val_accuracy_start']:.3f} -> {summary['val_accuracy']:.3f}, margin "
        f"{summary['val_margin_start']:.3f} -> {summary['val_margin']:.3f}; saved to {cfg.out}")
    return {**summary, "log": r["log"], "plot": r["plot"]}


__all__ = ["DPOConfig", "LOSSES", "Pairs", "dpo_backward", "dpo_terms", "encode_pairs", "reference_logps",
           "sequence_logps", "train_dpo"]
