"""Post-training: supervised fine-tuning (SFT) on conversations.

Data: JSONL, one conversation per line: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]},
ShareGPT's {"conversations": [{"from", "value"}, ...]}, Alpaca's {"instruction", "input", "output"} or {"prompt",
"completion"} (fastllm.chat.validate_conversation); an assistant message with "weight": 0 is not learned (OpenAI).
Tool calling as in OpenAI's fine-tuning files: {"messages": [...], "tools": [...]} with assistant `tool_calls` and
"tool" results; the model learns to write the calls in its chat format's tool-call format (fastllm.tools; ChatML:
hermes <tool_call> blocks), which `fastllm serve` reads back as tool_calls.
`load_conversations` checks every line (ValueError naming file:line: bad JSON, no "messages" list, empty
conversation, unknown role, non-string content, malformed tools or tool calls, no assistant turn).

Chat format (fastllm.chat): a checkpoint with its own chat template (a Hugging Face model: chat_template.jinja or
tokenizer_config.json, read with the checkpoint's own tokenizer) is trained in that template, the loss on its
assistant turns, and the output keeps the template, tokenizer files and EOS ids; otherwise fastllm's ChatML,
whose `<|im_start|>` and `<|im_end|>` special tokens `add_chat_tokens` adds to a tokenizer that lacks them,
growing the model's embedding. The loss mask is 1 on assistant contents and their end-of-turn token.

Packing: conversations (shuffled once with the seed) are packed whole, first-fit in order, into windows of
T+1 tokens; the rest of a window is padded with `<|endoftext|>` (else the first EOS id; never a target). There
is no attention masking between the conversations of a window (our attention kernel is plain causal): like many
SFT setups we let a conversation see earlier ones, which is harmless because every conversation starts fresh with
`<|endoftext|><|im_start|>` (as documents do in pre-training, where the model learned to ignore what precedes
an `<|endoftext|>`) and only assistant tokens carry loss. A conversation longer than T+1 tokens is truncated
(`too_long="truncate"`, the default; skipped when no assistant token is left) or skipped (`"skip"`), with a
warning and counts in the summary, never silently.

Training is fastllm.train's loop (`LMStage` on the packed conversations, `fit`: the same checkpoints, resume,
progress bar, log.jsonl, loss.png and `--device cuda` as pre-training); checkpoints hold the extended tokenizer.

>>> summary = sft(SFTConfig(base="run/", data="chats.jsonl", out="sft/"))
>>> session = ChatSession(load_model("sft/"), Tokenizer.load("sft/tokenizer.tiktoken"))   # fastllm.chat
>>> print("".join(session.reply("Hello!")))
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checks, distributed
from .chat import (
    EOT,
    IM_END,
    IM_START,
    ChatML,
    ChatSession,
    ChatTemplate,
    chat_format,
    chat_loop,
    conversation_tools,
    render,
    render_prompt,
    validate_conversation,
)
from .checkpoint import (
    TOKENIZER_FILE,
    checkpoint_tokenizer,
    copied_tokenizer,
    copy_tokenizer,
    find_tokenizer,
    load_start,
)
from .data import Epochs
from .eval import TrainEval
from .fileio import iter_records, read_json, write_json
from .lora import LoraConfig
from .model import GPT
from .options import BASE_FORMS, BASE_WEIGHTS, LORA_ALPHA, LORA_R, LORA_TARGETS, option
from .tokenizer import Tokenizer
from .train import MODEL_OPTIONS, LMStage, TrainConfig, fit_lm, setup_run

# ---- conversations -------------------------------------------------------------------------------------


def load_conversations(path: str | os.PathLike) -> list:
    """Conversations from a JSONL file (blank lines skipped): each a message list, or {"messages", "tools"} where
    the record lists tools; ValueError naming file:line on bad input."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file not found: {path}")
    convs = []
    for where, obj in iter_records(path):
        msgs, tools = validate_conversation(obj, where), conversation_tools(obj, where)
        convs.append(msgs if tools is None else {"messages": msgs, "tools": tools})
    if not convs:
        raise ValueError(f"{path}: no conversations")
    return convs


# ---- tokens --------------------------------------------------------------------------------------------


def with_chat_tokens(tokenizer):
    """`tokenizer` if it has <|im_start|> and <|im_end|>, else a copy with them added (ids from n_vocab up)."""
    specials = tokenizer.special_tokens
    missing = [s for s in (IM_START, IM_END) if s not in specials]
    if not missing:
        return tokenizer
    if not getattr(tokenizer, "_is_ranks", True):
        raise ValueError(
            "cannot add chat tokens to a tokenizer loaded from a HF tokenizer.json; train or load one "
            f"with the special tokens {IM_START} and {IM_END}"
        )
    ranks = {}
    taken = set(specials.values())
    for i in range(tokenizer.n_vocab):
        if i in taken:
            continue
        try:
            ranks[tokenizer.token_to_bytes(i)] = i
        except ValueError:
            continue  # a gap in the ids
    for k, s in enumerate(missing):
        specials[s] = tokenizer.n_vocab + k
    return Tokenizer(ranks, tokenizer.pattern, specials)


def grow_vocab(
    model: GPT, vocab_size: int, init_rows: Sequence[int] = (), seed: int = 0, mean_rows: int | None = None
) -> GPT:
    """A new GPT with `vocab_size` >= the model's rows of wte (and of an untied lm-head), every parameter copied.

    New rows and the rows in `init_rows` are set to the mean of the first `mean_rows` (default: all old) rows
    plus normal(0, 0.002) noise: a new token's logit starts near the average logit and its embedding near
    the average input, so the old model's behaviour is barely disturbed (and old tokens' logits are
    unchanged: their rows and every other weight are copied as they are)."""
    model._check_float32("new tokens' embeddings (grow_vocab)")
    old = model.config.vocab_size
    if vocab_size < old:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the model's {old}")
    tensors = dict(model.state_dict())
    rows = sorted(set(range(old, vocab_size)) | {int(r) for r in init_rows})
    rng = np.random.default_rng(seed)
    for name in ("wte", "lm_head.weight") if "lm_head.weight" in tensors else ("wte",):
        grown = np.empty((vocab_size, model.config.n_embd), np.float32)
        grown[:old] = tensors[name]
        if rows:
            noise = rng.standard_normal((len(rows), model.config.n_embd)) * 0.002
            grown[rows] = tensors[name][: mean_rows or old].mean(0, dtype=np.float64) + noise
        tensors[name] = grown
    new = GPT(dataclasses.replace(model.config, vocab_size=vocab_size), init=False)
    new.load_state_dict(tensors, where="grow_vocab")
    if hasattr(model, "checkpoint_dir"):
        new.checkpoint_dir = model.checkpoint_dir
    return new


def add_chat_tokens(tokenizer, model: GPT | None = None, seed: int = 0):
    """(tokenizer with <|im_start|>/<|im_end|>, model whose embedding covers them). Returns the inputs as they
    are when nothing is missing; new token ids get freshly initialised embedding rows (see grow_vocab)."""
    new_tok = with_chat_tokens(tokenizer)
    if model is None:
        return new_tok, None
    added = [i for s, i in new_tok.special_tokens.items() if s not in tokenizer.special_tokens]
    need = max(new_tok.n_vocab, model.config.vocab_size)
    if need == model.config.vocab_size and not added:
        return new_tok, model
    return new_tok, grow_vocab(
        model, need, init_rows=added, seed=seed, mean_rows=min(tokenizer.n_vocab, model.config.vocab_size)
    )


# ---- packing -------------------------------------------------------------------------------------------


@dataclass
class PackStats:
    conversations: int = 0  # given
    used: int = 0  # packed (whole or truncated)
    truncated: int = 0  # longer than the window, cut to it
    skipped: int = 0  # longer than the window and dropped
    windows: int = 0
    tokens: int = 0  # conversation tokens packed
    loss_tokens: int = 0  # of which carry loss

    @property
    def fill(self) -> float:
        """Fraction of window tokens that are conversation tokens (the rest is padding)."""
        return self.tokens / max(1, self.windows * self._window)

    _window: int = 0


def tokenize_conversations(
    convs, tokenizer, T: int, too_long: str = "truncate", warn=print, name: str = "data", chat=None
) -> tuple[list[tuple[np.ndarray, np.ndarray]], PackStats]:
    """Render each conversation in the chat format `chat` (default: ChatML on `tokenizer`); ones longer than a
    window of T+1 tokens are truncated or skipped (with a warning). Returns the (ids, mask) pairs and the counts."""
    chat = chat if chat is not None else ChatML(tokenizer)
    if too_long not in ("truncate", "skip"):
        raise ValueError(f"too_long must be 'truncate' or 'skip', got {too_long!r}")
    st = PackStats(conversations=len(convs), _window=T + 1)
    out = []
    longest = 0
    for conv in convs:
        ids, mask = chat.render(validate_conversation(conv, need_assistant=False), conversation_tools(conv))
        if ids.size > T + 1:
            longest = max(longest, ids.size)
            if too_long == "skip" or not mask[: T + 1].any():
                st.skipped += 1
                continue
            ids, mask = ids[: T + 1], mask[: T + 1]
            st.truncated += 1
        out.append((ids, mask))
    st.used = len(out)
    if st.truncated or st.skipped:
        warn(
            f"warning: {name}: {st.truncated + st.skipped} of {len(convs)} conversations are longer than the "
            f"context window of {T + 1} tokens (longest {longest}): {st.truncated} truncated, {st.skipped} skipped"
        )
    return out, st


class PackedLoader:
    """(B, T) batches of packed conversations with targets -1 where the mask is 0; DataLoader's interface
    (next_batch, __len__, reset, state_dict / load_state_dict for bit-identical resume, B, T, vocab_size).

    Windows are built once (conversations shuffled with `seed`, packed whole and in order; see the module
    doc); every epoch visits them in an order drawn from (seed, epoch)."""

    def __init__(
        self,
        examples: list[tuple[np.ndarray, np.ndarray]],
        B: int,
        T: int,
        pad_id: int,
        vocab_size: int,
        seed: int = 0,
        shuffle: bool = True,
        stats: PackStats | None = None,
    ):
        if B < 1 or T < 1:
            raise ValueError(f"B and T must be positive, got B={B} T={T}")
        if not examples:
            raise ValueError("no conversations to train on (all skipped or none given)")
        self.B, self.T, self.seed, self.shuffle, self.vocab_size = B, T, seed, shuffle, vocab_size
        W = T + 1
        order = np.random.default_rng([seed, 1 << 20]).permutation(len(examples)) if shuffle else range(len(examples))
        windows: list[list[int]] = []
        cur: list[int] = []
        cur_len = 0
        for i in order:
            n = examples[i][0].size
            if n > W:
                raise ValueError(f"conversation {i} has {n} tokens > the window of T+1={W} (truncate it first)")
            if cur_len + n > W:
                windows.append(cur)
                cur, cur_len = [], 0
            cur.append(int(i))
            cur_len += n
        windows.append(cur)
        self.tokens = np.full((len(windows), W), pad_id, np.int32)
        self.mask = np.zeros((len(windows), W), bool)
        for w, members in enumerate(windows):
            off = 0
            for i in members:
                ids, m = examples[i]
                self.tokens[w, off : off + ids.size] = ids
                self.mask[w, off : off + ids.size] = m.astype(bool)
                off += ids.size
        self.stats = stats if stats is not None else PackStats(len(examples), len(examples), _window=W)
        self.stats.windows = len(windows)
        self.stats.tokens = sum(e[0].size for e in examples)
        self.stats.loss_tokens = int(self.mask[:, 1:].sum())
        self.epochs = Epochs(len(windows), seed, shuffle)

    def __len__(self) -> int:
        return len(self.tokens)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        rows = self.epochs.take(self.B)
        w, m = self.tokens[rows], self.mask[rows]
        return w[:, :-1].copy(), np.where(m[:, 1:], w[:, 1:], -1).astype(np.int32)

    def reset(self) -> None:
        self.epochs.seek(0, 0)

    def state_dict(self) -> dict:
        return {
            **self.epochs.state_dict(),
            "seed": self.seed,
            "T": self.T,
            "B": self.B,
            "windows": len(self.tokens),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("T", self.T) != self.T or state.get("windows", len(self)) != len(self):
            raise ValueError(
                f"loader state is for T={state.get('T')} and {state.get('windows')} windows, this "
                f"loader has T={self.T} and {len(self)} (different data?)"
            )
        self.epochs.seek(state["epoch"], state["pos"])


# ---- training ------------------------------------------------------------------------------------------


DEFAULT_SEQ_LEN = 1024  # SFT windows when --seq-len is not given (and the base model's context is longer)


@dataclass
class SFTConfig(TrainConfig):
    """TrainConfig for fine-tuning: `data` is a conversations JSONL file, the model comes from `base`
    (its architecture: model and the model options of TrainConfig may not be set). Defaults suit fine-tuning:
    lower LR, no weight decay."""

    data: str = option(help="conversations JSONL (or Parquet), one {\"messages\": [{\"role\", \"content\"}, ...]} "
                            "per line (also ShareGPT's {\"conversations\"}, Alpaca's {\"instruction\", \"input\", "
                            "\"output\"}, {\"prompt\", \"completion\"})")
    seq_len: int | None = option(None, "T: tokens per packed window (default: the base model's context length, at "
                                       "most 1024 as in TRL's SFTTrainer: a hub model's 8k-32k context times the "
                                       "batch would not fit in memory)")
    max_steps: int = 300
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    eval_every: int = 50
    ckpt_every: int = 100
    base: str = option("", "checkpoint to fine-tune (or a training run folder: its newest checkpoint)")
    tokenizer: str | None = option(None, "tokenizer file (default: the copy inside the base checkpoint)")
    val_data: str | None = option(None, "validation conversations JSONL (default: every 20th conversation of "
                                        "--data, see --val-fraction)")
    val_fraction: float = option(0.05, "fraction of --data held out for validation when --val-data is not given "
                                       "(0: no validation)")
    too_long: str = option("truncate", "conversations longer than a window: truncate them or skip them",
                           choices=("truncate", "skip"))
    lora_r: int = option(0, LORA_R)
    lora_alpha: float = option(32.0, LORA_ALPHA)
    lora_targets: str = option("all", LORA_TARGETS)
    base_weights: str | None = option(None, BASE_WEIGHTS, choices=BASE_FORMS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.base:
            raise ValueError("base: give the checkpoint to fine-tune (--base)")
        fixed = [k for k in MODEL_OPTIONS if getattr(self, k) is not None]
        if fixed:
            raise ValueError(f"{', '.join(fixed)}: the architecture comes from the base model; do not set these")
        checks.number(self, "val_fraction", high=1.0, high_open=True)
        checks.one_of(self, "too_long", ("truncate", "skip"))
        checks.at_least(self, 0, "lora_r")
        LoraConfig.of(self)  # its alpha, targets and base_weights


def sft(cfg: SFTConfig, progress: bool = True, log=print) -> dict:
    """Fine-tune cfg.base on the conversations in cfg.data; returns train()'s summary plus packing counts."""
    log = setup_run(cfg, log)
    base = load_start(cfg.base, weights=cfg.base_weights)
    tok_path = cfg.tokenizer or find_tokenizer(base.checkpoint_dir)
    base_tok = checkpoint_tokenizer(base.checkpoint_dir, tok_path)
    if base_tok.n_vocab > base.config.vocab_size:
        raise ValueError(
            f"tokenizer {tok_path} has {base_tok.n_vocab} ids but the base model only {base.config.vocab_size}"
        )
    chat = chat_format(base.checkpoint_dir, base_tok) if cfg.tokenizer is None else None
    if isinstance(chat, ChatTemplate):  # the checkpoint's own template: nothing to add
        tok, model = base_tok, base
    else:
        tok, model = add_chat_tokens(base_tok, base, seed=cfg.seed)
        chat = ChatML(tok)
    if cfg.lora_r:
        if model is not base:
            raise ValueError(f"--lora-r: the base {base.checkpoint_dir} has no chat format of its own, and the chat "
                             "tokens fine-tuning adds need their embeddings trained, which LoRA freezes: fine-tune it "
                             "without --lora-r, or LoRA-tune a model with a chat template (an instruct model) or "
                             "with fastllm's chat tokens")
        model.add_lora(LoraConfig.of(cfg), seed=cfg.seed)
    T = cfg.seq_len or min(model.config.block_size, DEFAULT_SEQ_LEN)
    if not 1 <= T <= model.config.block_size:
        raise ValueError(f"seq_len={T} must be in [1, the base model's block_size={model.config.block_size}]")
    cfg = dataclasses.replace(cfg, seq_len=T)
    task_eval = TrainEval.of(cfg, tok)  # --eval-task: its data read and checked now

    convs = load_conversations(cfg.data)
    if cfg.val_data:
        val_convs = load_conversations(cfg.val_data)
    elif cfg.val_fraction > 0 and len(convs) >= 2:
        every = max(2, round(1 / cfg.val_fraction))
        val_convs = convs[every - 1 :: every]
        convs = [c for i, c in enumerate(convs) if i % every != every - 1]
    else:
        val_convs = []
    pad = tok.special_tokens.get(EOT, chat.stop_tokens[0])  # never a target
    examples, stats = tokenize_conversations(convs, tok, T, cfg.too_long, log, name=str(cfg.data), chat=chat)
    train_loader = PackedLoader(examples, cfg.batch_size, T, pad, model.config.vocab_size, seed=cfg.seed, stats=stats)
    val_loader = None
    if val_convs:
        vex, _ = tokenize_conversations(val_convs, tok, T, cfg.too_long, log, name="validation", chat=chat)
        if vex:
            val_loader = PackedLoader(vex, cfg.batch_size, T, pad, model.config.vocab_size, shuffle=False)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    main = distributed.world().is_main  # rank 0 writes; every rank reads the same tokenizer path
    if isinstance(chat, ChatTemplate):  # the checkpoint's tokenizer files and template, and the EOS ids it stops at
        tok_file = copy_tokenizer(tok_path, out) if main else copied_tokenizer(tok_path, out)
        gen = out / "generation_config.json"
        if main:
            write_json(gen, {**(read_json(gen) if gen.is_file() else {}), "eos_token_id": list(chat.stop_tokens)})
    else:
        tok_file = out / TOKENIZER_FILE
        if main:
            tok.save(tok_file)
    s = train_loader.stats
    log(
        f"sft: {s.used} conversations ({s.truncated} truncated, {s.skipped} skipped) in {s.windows} windows of "
        f"T+1={T + 1} tokens ({s.fill:.0%} filled, {s.loss_tokens} loss tokens); "
        f"{len(val_convs)} validation conversations; base {base.checkpoint_dir}; format {chat.name}"
    )
    stage = LMStage("sft", cfg, lambda: model, train_loader, val_loader, tok, task_eval)
    summary = fit_lm(stage, cfg, tok_file, progress, log)
    summary.update(
        conversations=s.used, truncated=s.truncated, skipped=s.skipped, windows=s.windows, loss_tokens=s.loss_tokens
    )
    return summary


__all__ = [
    "IM_START",
    "IM_END",
    "SFTConfig",
    "ChatSession",
    "PackedLoader",
    "PackStats",
    "add_chat_tokens",
    "chat_loop",
    "grow_vocab",
    "load_conversations",
    "render",
    "render_prompt",
    "sft",
    "tokenize_conversations",
    "validate_conversation",
    "with_chat_tokens",
]
