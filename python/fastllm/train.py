"""The training loop every stage shares -- pre-training (here), SFT (fastllm.sft), GRPO and the reward model
(fastllm.rl) -- and pre-training itself.

`fit(stage, loop)` runs a `Stage`, which supplies only its model, batches and loss, for loop.steps steps:
  1. start, or resume from the newest checkpoint of loop.out (model, optimizer, RNG and the stage's data position
     come back, so the resumed run is bit-identical to an uninterrupted one); the model is built or loaded on the
     CPU, then moved to loop.device, and AdamW is made for it there;
  2. per step: evaluation at its cadence (and at the start and the end: the stage's metrics and those of
     --eval-task, fastllm.eval.TrainEval), the stage's step -- one or more `update`s:
     zero the gradients, accumulate the micro-batches' forward + backward, check the loss and gradient norm are
     finite, clip the global norm, AdamW at the schedule's LR (linear warmup, cosine decay) -- a log.jsonl row,
     and a checkpoint at its cadence (older ones pruned, the run's figure redrawn: fastllm.plot.plot_stage);
  3. NaN/Inf stops with a TrainingError naming the last good checkpoint.
Checkpoint files: fastllm.checkpoint. Pre-training: `train(TrainConfig)` (`fastllm train`) on token shards.

Data-parallel (`mpiexec -n N fastllm train ...`, fastllm.distributed): the same loop on every rank. Each rank takes a
disjoint share of every global batch (`--total-batch-tokens`; evaluation batches alike), `update` sums gradients and
statistics over the ranks, every rank applies the same AdamW step (`--zero`: each its 1/N of the AdamW state), and
rank 0 alone prints, shows progress and writes logs, plots and checkpoints (one per save, the optimizer gathered).

>>> summary = train(TrainConfig(data="data", out="out", model="mini", max_steps=100))
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import checkpoint, checks, distributed, ops, set_num_threads
from .data import DataLoader, read_shard
from .eval import TrainEval, check_train_eval
from .model import GPT, MLPS, NORMS, POSITIONS, PRESETS, QK_NORMS, GPTConfig
from .optim import AdamW, lr_schedule
from .options import (
    CKPT_EVERY,
    DEVICE,
    DTYPE,
    EVAL_TASK,
    EVAL_TASK_DATA,
    EVAL_TASK_LIMIT,
    GRAD_CLIP,
    KEEP_CKPTS,
    RESUME,
    SEED,
    THREADS,
    ZERO,
    option,
)
from .plot import figure_path, plot_stage
from .sample import generate
from .tokenizer import Tokenizer


class TrainingError(RuntimeError):
    """Training cannot continue (NaN/Inf loss or gradients); the last good checkpoint is kept."""


# the TrainConfig fields that override the preset's GPTConfig fields of the same names
MODEL_OPTIONS = ("n_layer", "n_head", "n_embd", "n_kv_head", "positions", "rope_theta", "norm", "mlp", "mlp_hidden",
                 "qk_norm", "qk_norm_over", "pre_norms", "post_norms", "tie_embeddings", "logit_softcap")


@dataclass
class TrainConfig:
    data: str = option(help="folder of train_*.bin / val_*.bin token shards (from `fastllm prepare`)")
    out: str = option("out", "output folder: checkpoints ckpt_NNNNNN/, log.jsonl, loss.png")
    model: str = option("small", "preset: tiny, mini, small (GPT-2 style, CPU sizes), nano, micro (Llama style: "
                                 "RoPE, RMSNorm, SwiGLU, GQA), gpt2, gpt2-medium, gpt2-large, gpt2-xl",
                        choices=tuple(PRESETS))
    n_layer: int | None = option(None, "transformer blocks (default: the preset's)")
    n_head: int | None = option(None, "attention heads per block (default: the preset's)")
    n_embd: int | None = option(None, "embedding width in channels, a multiple of n_head (default: the preset's)")
    n_kv_head: int | None = option(None, "key/value heads, dividing n_head: grouped-query attention (1: multi-query; "
                                         "default: the preset's)")
    positions: str | None = option(None, "positions: learned (a wpe table, GPT-2) or rope (rotary, Llama) (default: "
                                         "the preset's)", choices=POSITIONS)
    rope_theta: float | None = option(None, "RoPE base frequency (Llama 3: 500000; default: the preset's)")
    norm: str | None = option(None, "layernorm (GPT-2) or rmsnorm (Llama) (default: the preset's)", choices=NORMS)
    mlp: str | None = option(None, "MLP: gelu (GPT-2), swiglu (Llama), geglu (Gemma) or relu2 (nanochat) (default: "
                                   "the preset's)", choices=MLPS)
    mlp_hidden: int | None = option(None, "MLP hidden width (default: the preset's; 4 * n_embd)")
    qk_norm: bool | None = option(None, "RMSNorm on every query and key head, as Qwen3 (default: the preset's)")
    qk_norm_over: str | None = option(None, "what QK-norm normalises: each head (head, Qwen3) or all the q and all the "
                                            "k channels at once (all, OLMo 2) (default: head)", choices=QK_NORMS)
    pre_norms: bool | None = option(None, "a norm on each branch's input (--no-pre-norms --post-norms: OLMo 2's "
                                          "placement; default: yes)")
    post_norms: bool | None = option(None, "a norm on each branch's output too, before it joins the residual stream "
                                           "(Gemma 2, OLMo 2; default: no)")
    tie_embeddings: bool | None = option(None, "the lm-head is the token embedding (--no-tie-embeddings: its own "
                                               "matrix; default: the preset's)")
    logit_softcap: float | None = option(None, "cap the logits at c * tanh(logits / c), as Gemma 2 and nanochat "
                                               "(default: the preset's, no cap)")
    batch_size: int = option(8, "B: sequences per micro-batch")
    seq_len: int = option(256, "T: tokens per sequence (raises the preset's context length when larger)")
    total_batch_tokens: int | None = option(None, "tokens per optimizer step over all ranks, a multiple of B*T*ranks: "
                                                  "gradient accumulation (default: B*T per rank, no accumulation)")
    max_steps: int = option(1000, "optimizer steps in all (the cosine LR decay ends here)")
    lr: float = option(1e-3, "peak learning rate, reached at the end of the warmup")
    min_lr: float | None = option(None, "learning rate at the end of the cosine decay (default: lr / 10)")
    warmup_steps: int = option(50, "steps of linear learning-rate warmup from 0")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay, on weight matrices only")
    beta1: float = option(0.9, "AdamW beta1 (decay of the gradient mean)")
    beta2: float = option(0.95, "AdamW beta2 (decay of the squared-gradient mean)")
    grad_clip: float = option(1.0, GRAD_CLIP)
    eval_every: int = option(100, "steps between validation-loss evaluations, also at the start and the end "
                                  "(0: never)")
    eval_batches: int = option(20, "batches of B x T tokens per validation (fewer if the val split is smaller)")
    eval_task: str | None = option(None, EVAL_TASK)
    eval_task_data: Sequence[str] | None = option(None, EVAL_TASK_DATA)
    eval_task_limit: int | None = option(None, EVAL_TASK_LIMIT)
    sample_every: int = option(0, "steps between printed text samples (0: never)")
    sample_tokens: int = option(64, "tokens per printed sample")
    ckpt_every: int = option(200, CKPT_EVERY)
    keep_ckpts: int = option(2, KEEP_CKPTS)
    seed: int = option(1337, SEED)
    threads: int | None = option(None, THREADS)
    resume: bool = option(False, RESUME)
    device: str = option("cpu", DEVICE, choices=checks.DEVICES)
    dtype: str | None = option(None, DTYPE, choices=checks.DTYPES)
    loss_log_scale: bool = option(False, "draw the loss panel of loss.png on a log scale")
    zero: bool = option(False, ZERO)

    def __post_init__(self) -> None:
        checks.output_dir(self)
        if self.model not in PRESETS:
            raise ValueError(f"model: unknown preset {self.model!r}; choose from {sorted(PRESETS)}")
        checks.at_least(self, 1, "n_layer", "n_head", "n_embd", "n_kv_head", "mlp_hidden", "batch_size", "seq_len",
                        "total_batch_tokens", "max_steps", "eval_batches", "sample_tokens", "keep_ckpts", "threads")
        checks.at_least(self, 0, "warmup_steps", "eval_every", "sample_every", "ckpt_every", "seed")
        checks.number(self, "lr", low_open=True)
        checks.number(self, "min_lr", "weight_decay", "grad_clip")
        checks.number(self, "beta1", "beta2", high=1.0, high_open=True)
        checks.device(self)
        check_train_eval(self)
        self.model_config(vocab_size=256)  # the architecture options, checked now (ValueError naming the field)
        if self.total_batch_tokens is not None and self.seq_len is not None:
            if self.total_batch_tokens % (self.batch_size * self.seq_len):
                raise ValueError(f"total_batch_tokens={self.total_batch_tokens} must be a multiple of "
                                 f"batch_size*seq_len={self.batch_size * self.seq_len}")

    def model_config(self, vocab_size: int) -> GPTConfig:
        over = {k: getattr(self, k) for k in MODEL_OPTIONS if getattr(self, k) is not None}
        cfg = GPTConfig.preset(self.model, vocab_size=vocab_size, **over)
        if self.seq_len is not None and self.seq_len > cfg.block_size:
            cfg.block_size = self.seq_len
        return cfg


# ---- the loop ----------------------------------------------------------------------------------------------------


@dataclass
class Loop:
    """How fit() runs a stage. Built from a stage's config by Loop.of (the fields of the same names)."""

    out: str  # run folder: checkpoints, log.jsonl, the figure (loss.png; rl.png for GRPO)
    steps: int  # the run ends after this many steps
    lr: float
    min_lr: float | None = None  # where the cosine decay ends at the last step; None: lr (constant after warmup)
    warmup_steps: int = 0
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95
    weight_decay: float = 0.0
    eval_every: int = 0  # steps between evaluations, also at the start and the end (0: never)
    ckpt_every: int = 0  # steps between checkpoints (always one at the end; 0: only that one)
    keep_ckpts: int = 2
    seed: int = 0  # of the run's random generator (checkpointed with it)
    resume: bool = False
    device: str = "cpu"  # cpu | cuda
    dtype: str | None = None  # the compute dtype (None: the device's default); master weights and AdamW state fp32
    base_weights: str | None = None  # a LoRA run's frozen base held in "bfloat16" or "int8" (load_model's weights=)
    zero: bool = False  # with several ranks: ZeRO-1 (fastllm.distributed.ShardedAdamW)
    tokenizer: Path | None = None  # copied into every checkpoint
    loss_log_scale: bool = False  # the loss panel of the run's figure on a log scale
    config: dict = dataclasses.field(default_factory=dict)  # the stage's config, recorded in state.json

    @classmethod
    def of(cls, cfg, **overrides) -> Loop:
        mine = {f.name for f in dataclasses.fields(cls)}
        same = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in mine}
        return cls(**{**same, "config": dataclasses.asdict(cfg), **overrides})


class Stage:
    """What a training stage supplies to fit(): its model, batches and loss. LMStage (pre-training, SFT),
    rl.GRPOStage, rl.RewardModelStage."""

    kind = "train"  # recorded in checkpoints (resume refuses another kind); the progress bar's label
    show: tuple[str, ...] = ("loss",)  # row keys shown on the progress bar
    write = staticmethod(print)  # prints a line without breaking the progress bar (fit sets it)
    task_eval: TrainEval | None = None  # --eval-task, run by evaluate() beside the stage's own metrics
    tokenizer: Tokenizer | None = None

    def init_model(self) -> GPT:
        """The model to start from when not resuming, on the CPU."""
        raise NotImplementedError

    def load_state_dict(self, state: dict, folder: Path) -> None:
        """Resuming from the checkpoint `folder`: restore what state_dict() returned (and heads())."""

    def start(self, model: GPT, opt: AdamW) -> None:
        """The model, on its device, and its optimizer are ready."""
        self.model, self.opt = model, opt

    def step(self, step: int, lr: float, rng: np.random.Generator) -> dict:
        """One training step at learning rate `lr`: draw batches (random choices from `rng`, the run's checkpointed
        generator), run one or more `update`s, return the row to log ("loss", ...; "tokens" adds tok_per_s)."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict:
        """Evaluation metrics of the current model ({}: none)."""
        return {}

    def task_metrics(self) -> dict[str, float]:
        """The --eval-task metrics of the current model ({"mc/acc": ..., ...}; {} without a task_eval)."""
        return {} if self.task_eval is None else self.task_eval(self.model, self.tokenizer)

    def state_dict(self) -> dict:
        """JSON-able state for checkpoints (a data loader's position, ...)."""
        return {}

    def heads(self) -> dict[str, np.ndarray]:
        """Arrays trained beside the GPT, for checkpoints (heads.safetensors)."""
        return {}

    def fingerprint(self) -> dict:
        """What must be equal on every rank of a data-parallel run (sizes, checksums of the data), JSON-able."""
        return {}


class ExtraParams:
    """A float32 array trained beside the GPT by `update`, with AdamW (default betas/eps, no weight decay): a reward
    model's scalar head. It stays on the host; `g` receives its gradient."""

    def __init__(self, name: str, p: np.ndarray, g: np.ndarray):
        self.name, self.p, self.g = name, p, g
        self.m, self.v = np.zeros_like(p), np.zeros_like(p)

    def state_dict(self) -> dict[str, np.ndarray]:
        return {self.name: self.p, f"{self.name}.m": self.m, f"{self.name}.v": self.v}

    def load_state_dict(self, tensors: dict, where: str) -> None:
        for key, arr in (("", self.p), (".m", self.m), (".v", self.v)):
            t = tensors.get(self.name + key)
            if t is None or t.shape != arr.shape:
                got = "missing" if t is None else f"shape {t.shape}"
                raise ValueError(f"{where}: tensor {self.name + key!r} must have shape {arr.shape}, got {got}")
            arr[...] = t


def update(model: GPT, opt: AdamW, micro_batch: Callable[[], dict], lr: float, grad_clip: float,
           micro_batches: int = 1, extra: Sequence[ExtraParams] = ()) -> dict:
    """One optimizer update: zero the gradients, run `micro_batch` (forward + backward of one micro-batch, returning
    its stats, "loss" among them) `micro_batches` times, clip the global gradient norm of the mean to grad_clip
    (0: no clipping), AdamW step at `lr`. Returns the stats averaged over the micro-batches, lr and grad_norm;
    TrainingError if the loss or the norm is not finite. With several ranks (fastllm.distributed) each runs its own
    micro-batches and the gradients and stats are summed over all of them: N ranks with k micro-batches each take
    the step one process takes with N*k.

    >>> def micro_batch():
    ...     loss = model.forward(*loader.next_batch()); model.backward(); return {"loss": loss}
    >>> update(model, opt, micro_batch, lr=1e-3, grad_clip=1.0, micro_batches=4)["grad_norm"]
    """
    model.zero_grad()
    for e in extra:
        e.g.fill(0.0)
    sums: dict[str, float] = {}
    for _ in range(micro_batches):
        for k, v in micro_batch().items():
            sums[k] = sums.get(k, 0.0) + v
    n, sums = distributed.world().sum_stats(micro_batches, sums)  # over the ranks (one process: as they are)
    stats = {k: v / n for k, v in sums.items()}
    norm = distributed.reduce_gradients(model, opt, extra) / n  # the gradients summed over the ranks
    loss = stats.get("loss", 0.0)
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise TrainingError(f"loss={loss} grad_norm={norm} is not finite; try a lower --lr")
    clip = min(1.0, grad_clip / (norm + 1e-6)) if grad_clip > 0 else 1.0
    opt.step(lr, grad_scale=clip / n)
    for e in extra:
        ops.adamw_step(e.p, e.g, e.m, e.v, lr=lr, t=opt.t, grad_scale=clip / n)
    return {**stats, "lr": lr, "grad_norm": norm}


class RunLog:
    """`log.jsonl` of a run: one JSON object per line. Opening it for a run that starts (or resumes) at
    `start` drops what a killed run logged at or after that step, so a resumed log equals an uninterrupted one.
    write=False (ranks other than 0): the rows are kept in memory only."""

    def __init__(self, path: Path, start: int, write: bool = True):
        self.path = path
        self.rows: list[dict] = []
        self._f = None
        if not write:
            return
        if path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < start:
                    self.rows.append(row)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        self._f = open(path, "a")

    def write(self, row: dict) -> None:
        self.rows.append(row)
        if self._f is not None:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def series(rows: list[dict], key: str) -> list[float]:
    """The values of `key` in log rows, in order."""
    return [r[key] for r in rows if key in r]


def last_task_metrics(rows: list[dict]) -> dict[str, float]:
    """The last logged value of each --eval-task metric ("mc/acc", ...) in log rows."""
    return {k: v for r in rows for k, v in r.items() if "/" in k}


def setup_run(cfg, log=print):
    """Before any data is read: fail now if cfg.device cannot run here, join the other ranks if launched by MPI (and
    take this rank's GPU), and set the threads (cfg.threads; with several ranks on a node, by default their share
    of the cores). Returns `log` on rank 0 and a no-op on the others, which print nothing."""
    checks.require_device(cfg.device)
    world = distributed.world()
    world.use_device(cfg.device)
    threads = cfg.threads or world.default_threads()
    if threads:
        set_num_threads(threads)
    return log if world.is_main else _quiet


def _quiet(*args, **kwargs) -> None:
    pass


def _fmt(v) -> str:
    return f"{v:,.0f}" if isinstance(v, float) and abs(v) >= 1000 else f"{v:.4f}" if isinstance(v, float) else str(v)


def fit(stage: Stage, loop: Loop, progress: bool = True, log=print) -> dict:
    """Run `stage` for loop.steps steps (see the module doc). Returns {"steps", "seconds", "rows" (the log rows,
    with those of earlier runs when resuming), "checkpoint", "log", "plot" (the figure, see fastllm.plot)}.

    >>> stage = LMStage("train", cfg, lambda: GPT(config), DataLoader("data", "train", 8, 256))
    >>> fit(stage, Loop.of(cfg, steps=cfg.max_steps))["checkpoint"]
    """
    from tqdm.auto import tqdm  # here: a slow import

    world = distributed.world()  # the ranks of an MPI launch, or this one process
    world.use_device(loop.device)  # each rank its GPU (done already when setup_run ran)
    if not world.is_main:  # rank 0 alone prints, shows progress and writes files
        progress, log = False, _quiet
    out = Path(loop.out)
    out.mkdir(parents=True, exist_ok=True)

    # the model: the stage's, or the newest checkpoint's when resuming; made on the CPU, then moved to its device
    ckpt = checkpoint.latest(out) if loop.resume else None
    world.agree(resume_from=ckpt and ckpt.name)  # every rank sees the same (shared) run folder
    if ckpt is None:
        if loop.resume:
            log(f"no checkpoint in {out}: starting afresh")
        elif old := checkpoint.checkpoints(out):  # nothing is deleted: a forgotten --resume must lose nothing
            log(f"warning: {out} holds {len(old)} checkpoint(s) of an earlier run (newest {old[-1].name}); this run "
                "starts afresh at step 0 and overwrites those of the steps it saves, the others stay (and count for "
                "--keep-ckpts). Use --resume to continue that run, or another --out.")
        model, start, rng = stage.init_model(), 0, np.random.default_rng(loop.seed)
    else:
        state = checkpoint.load_state(ckpt, stage.kind)
        model, start, rng = checkpoint.load_model(ckpt, weights=loop.base_weights), state["step"], state["rng"]
        stage.load_state_dict(state["stage"], ckpt)
        log(f"resuming from {ckpt} at step {start}")
    model.to(loop.device, checks.compute_dtype(loop)).train()  # (a model loaded with held weights starts in eval)
    opt = distributed.optimizer(model, loop.lr, (loop.beta1, loop.beta2), loop.weight_decay, loop.zero)
    if ckpt is not None:
        checkpoint.load_optimizer(ckpt, opt)
    stage.start(model, opt)
    distributed.agree_on_run(loop.config, model, stage.fingerprint())
    lora = model.lora
    log(f"{stage.kind}: {model.num_parameters / 1e6:.2f}M parameters {model.config.to_dict()} on {loop.device}"
        + (f"; LoRA {lora.config.to_dict()}: {lora.num_parameters / 1e6:.3f}M trained "
           f"({lora.num_parameters / model.num_parameters:.2%}), the rest frozen" if lora is not None else "")
        + (f" ({model.dtype} compute, float32 master weights and AdamW state)" if model.dtype != "float32" else "")
        + (f"; {world.size} ranks" + (" (ZeRO-1)" if isinstance(opt, distributed.ShardedAdamW) else "")
           if world.size > 1 else ""))
    min_lr = loop.lr if loop.min_lr is None else loop.min_lr
    runlog = RunLog(out / "log.jsonl", start, write=world.is_main)
    bar = tqdm(range(start, loop.steps), initial=min(start, loop.steps), total=loop.steps, desc=stage.kind,
               unit="step", disable=not progress, dynamic_ncols=True)
    stage.write = bar.write if progress else log
    shown: dict = {}

    def evaluate(step: int) -> None:
        row = stage.evaluate(step)
        if row:
            runlog.write({"step": step, **row})
            shown.update(row)
            stage.write(f"step {step:6d} | " + " | ".join(f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in row.items()))

    def save(step: int) -> None:
        if not all(np.isfinite(a).all() for a in model.trainable().state_dict().values()):
            raise TrainingError(f"step {step}: parameters are not finite; not saving. The last good checkpoint is "
                                f"{checkpoint.latest(out)}; try a lower --lr")
        opt_state = opt.state_dict()  # a sharded optimizer gathers its state on rank 0: every rank takes part
        if not world.is_main:
            return
        checkpoint.save(out, step, model, opt_state, stage.state_dict(), kind=stage.kind, rng=rng,
                        config=loop.config, heads=stage.heads(), tokenizer=loop.tokenizer)
        checkpoint.prune(out, loop.keep_ckpts)
        if step < loop.steps:  # the last one is drawn at the end, after the final evaluation
            draw()

    def draw() -> Path:  # the run's figure, per stage kind (fastllm.plot.plot_stage)
        return plot_stage(stage.kind, runlog.rows, out, log_scale=loop.loss_log_scale)

    t_start = time.time()
    try:
        for step in bar:
            world.where = f"step {step}"
            if loop.eval_every and step % loop.eval_every == 0:
                evaluate(step)
            t0 = time.time()
            try:
                row = stage.step(step, lr_schedule(step, loop.lr, min_lr, loop.warmup_steps, loop.steps), rng)
            except TrainingError as e:
                raise TrainingError(f"step {step}: {e}; stopping. The last good checkpoint is "
                                    f"{checkpoint.latest(out)}") from None
            row["dt"] = time.time() - t0
            if "tokens" in row:
                row["tok_per_s"] = row["tokens"] / row["dt"]
            runlog.write({"step": step, **row})
            shown.update(row)
            bar.set_postfix({k: _fmt(shown[k]) for k in stage.show if k in shown})
            done = step + 1
            if done == loop.steps or (loop.ckpt_every and done % loop.ckpt_every == 0):
                save(done)
        if loop.eval_every and start <= loop.steps:
            evaluate(loop.steps)
    finally:
        bar.close()
        runlog.close()
    seconds = time.time() - t_start
    world.barrier()  # the last checkpoint is written
    return {"steps": loop.steps, "seconds": seconds, "rows": runlog.rows, "checkpoint": str(checkpoint.latest(out)),
            "log": str(runlog.path), "plot": str(draw() if world.is_main else figure_path(stage.kind, out))}


# ---- pre-training (and SFT): next-token prediction -----------------------------------------------------------------


class LMStage(Stage):
    """Next-token prediction on (x, y) batches, y = -1 where no loss is taken, from loaders with DataLoader's
    interface (next_batch, __len__, reset, state_dict, load_state_dict, B, vocab_size): pre-training on token
    shards, and SFT on packed conversations. `cfg` (TrainConfig) gives the batch shape, accumulation, clipping,
    evaluation batches and samples."""

    show = ("loss", "val_loss", "tok_per_s")

    def __init__(self, kind: str, cfg: TrainConfig, init_model: Callable[[], GPT], train_loader, val_loader=None,
                 tokenizer: Tokenizer | None = None, task_eval: TrainEval | None = None):
        self.kind, self.cfg, self.init_model = kind, cfg, init_model  # (Stage.init_model)
        self.train_loader, self.val_loader, self.tokenizer = train_loader, val_loader, tokenizer
        self.task_eval = task_eval
        ranks, micro = distributed.world().size, cfg.batch_size * cfg.seq_len
        self.tokens_per_step = cfg.total_batch_tokens or micro * ranks  # the global batch (all ranks)
        self.accum = self.tokens_per_step // micro  # its micro-batches, shared out equally among the ranks
        if self.accum % ranks:
            raise ValueError(f"total_batch_tokens={self.tokens_per_step} is {self.accum} micro-batches of "
                             f"batch_size*seq_len={micro} tokens, which {ranks} ranks cannot share equally: make it a "
                             f"multiple of {micro * ranks}")
        self.tokens = 0  # trained on by this run

    def load_state_dict(self, state: dict, folder: Path) -> None:
        try:
            self.train_loader.load_state_dict(state["loader"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{folder / checkpoint.STATE_FILE}: bad data-loader state ({type(e).__name__}: {e})"
                             ) from None
        saved = state.get("tokens_per_step", self.tokens_per_step)
        if self.cfg.total_batch_tokens is None and saved != self.tokens_per_step:
            raise ValueError(f"{folder / checkpoint.STATE_FILE}: the run was trained with {saved} tokens per step; "
                             f"with {distributed.world().size} rank(s) the default is {self.tokens_per_step}: pass "
                             f"--total-batch-tokens {saved} to resume it")

    def start(self, model: GPT, opt: AdamW) -> None:
        super().start(model, opt)
        if model.config.vocab_size < self.train_loader.vocab_size:
            raise ValueError(f"model vocab_size {model.config.vocab_size} < data vocab_size "
                             f"{self.train_loader.vocab_size}")

    def step(self, step: int, lr: float, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        if self.tokenizer is not None and cfg.sample_every and step > 0 and step % cfg.sample_every == 0:
            start = self.tokenizer.start_token  # what every document of the shards starts with
            ids = generate(self.model, [0 if start is None else start], cfg.sample_tokens, temperature=0.8, top_k=40,
                           seed=int(rng.integers(1 << 31)))
            self.write("sample: " + self.tokenizer.decode(ids[1:]).replace("\n", " ")[:200])

        world = distributed.world()
        mine = iter(world.share([self.train_loader.next_batch() for _ in range(self.accum)]))  # of the global batch

        def micro_batch() -> dict:
            loss = self.model.forward(*next(mine))
            self.model.backward()
            return {"loss": loss}

        row = update(self.model, self.opt, micro_batch, lr, cfg.grad_clip, self.accum // world.size)
        self.tokens += self.tokens_per_step
        return {**row, "tokens": self.tokens_per_step}

    def evaluate(self, step: int) -> dict:
        row = {}
        if self.val_loader is not None:
            row["val_loss"] = mean_loss(self.model, self.val_loader, self.cfg.eval_batches)
        return {**row, **self.task_metrics()}

    def state_dict(self) -> dict:
        return {"loader": self.train_loader.state_dict(), "tokens_per_step": self.tokens_per_step}

    def fingerprint(self) -> dict:
        loader, state = self.train_loader, self.train_loader.state_dict()
        first = loader.next_batch()  # the next batch, then back: the data, its order and position
        loader.load_state_dict(state)
        return {"windows": len(loader), "vocab_size": loader.vocab_size, "next_batch": distributed.fingerprint(*first),
                "val_windows": len(self.val_loader) if self.val_loader is not None else None}


def mean_loss(model: GPT, loader, batches: int) -> float:
    """The mean loss of `model` (in eval mode) on the first `batches` batches of `loader` after a reset (fewer if
    the loader holds fewer). With several ranks each reads them all and forwards its share; all get the mean."""
    was = model.training
    model.eval()
    loader.reset()
    every = [loader.next_batch() for _ in range(min(batches, max(1, len(loader) // loader.B)))]
    loss = distributed.world().average(every, lambda part: float(np.mean([model.forward(*b) for b in part])))
    model.train(was)
    return loss


def fit_lm(stage: LMStage, cfg: TrainConfig, tokenizer: Path | None, progress: bool = True, log=print) -> dict:
    """fit() an LMStage with cfg's schedule; the summary pre-training and SFT report."""
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr
    r = fit(stage, Loop.of(cfg, steps=cfg.max_steps, min_lr=min_lr, tokenizer=tokenizer), progress, log)
    losses, val = series(r["rows"], "loss"), series(r["rows"], "val_loss")
    nan = float("nan")
    return {"steps": cfg.max_steps, "first_loss": losses[0] if losses else nan,
            "final_loss": losses[-1] if losses else nan, "val_loss": val[-1] if val else nan,
            "tokens": stage.tokens, "seconds": r["seconds"], "tok_per_s": stage.tokens / max(r["seconds"], 1e-9),
            "checkpoint": r["checkpoint"], "loss_curve": r["plot"], "log": r["log"],
            "eval_task": last_task_metrics(r["rows"])}


def train(cfg: TrainConfig, progress: bool = True, log=print) -> dict:
    """Pre-train (or resume, cfg.resume) a GPT on the token shards of cfg.data; returns a summary dict."""
    log = setup_run(cfg, log)
    train_loader = DataLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed)
    val_loader, val_paths = None, sorted(Path(cfg.data).glob("val_*.bin"))
    if cfg.eval_every and val_paths:
        if max(read_shard(p).size for p in val_paths) > cfg.seq_len:
            val_loader = DataLoader(cfg.data, "val", cfg.batch_size, cfg.seq_len, shuffle=False)
        else:  # a small corpus, a long --seq-len: train all the same
            log(f"warning: no val shard ({', '.join(p.name for p in val_paths)}) holds a window of T+1="
                f"{cfg.seq_len + 1} tokens: no validation loss")
        if val_loader is not None and val_loader.vocab_size != train_loader.vocab_size:
            raise ValueError(f"{val_loader.paths[0]}: val shard of a {val_loader.vocab_size}-token vocabulary, the "
                             f"train shards of {train_loader.vocab_size}: made with another tokenizer? re-run "
                             "`fastllm prepare`")
    tok_path = checkpoint.find_tokenizer(cfg.data)
    if cfg.eval_task and tok_path is None:
        raise ValueError(f"eval_task needs the data's tokenizer: no {checkpoint.TOKENIZER_FILE} or tokenizer.json in "
                         f"{cfg.data} (`fastllm prepare` puts one there)")
    need_tok = tok_path is not None and (cfg.sample_every or cfg.eval_task)
    tokenizer = Tokenizer.from_pretrained(tok_path) if need_tok else None
    task_eval = TrainEval.of(cfg, tokenizer)  # its data read and checked now, before the first step
    model_config = cfg.model_config(train_loader.vocab_size)
    stage = LMStage("train", cfg, lambda: GPT(model_config, seed=cfg.seed), train_loader, val_loader, tokenizer,
                    task_eval)
    log(f"data: {len(train_loader)} train windows of T={cfg.seq_len}; {stage.accum} micro-batches of "
        f"{cfg.batch_size * cfg.seq_len} tokens per step")
    return fit_lm(stage, cfg, tok_path, progress, log)
