"""Pre-training loop: AdamW, warmup + cosine LR, global-norm clipping, gradient accumulation, validation,
samples, a JSONL log, a loss-curve PNG, and atomic checkpoints that resume bit-identically.

Checkpoint folder `OUT/ckpt_NNNNNN/` (NNNNNN = the number of optimizer steps taken):
    model.safetensors      parameters (named like GPT.p), metadata: the GPTConfig as JSON
    optimizer.safetensors  AdamW m and v (flat), metadata: t
    state.json             step, data-loader position, sampling RNG state, the TrainConfig
    tokenizer.*            a copy of the tokenizer, so `fastllm sample --ckpt` needs nothing else
It is written to a temporary folder and renamed into place; `OUT/latest` (written atomically) names the
newest complete checkpoint.

>>> summary = train(TrainConfig(data="data", out="out", model="mini", max_steps=100))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import set_num_threads
from .data import DataLoader, copy_tokenizer, find_tokenizer
from .fileio import load_safetensors, save_safetensors, write_json
from .model import GPT, GPTConfig
from .optim import AdamW, grad_norm, lr_schedule
from .options import CKPT_EVERY, GRAD_CLIP, KEEP_CKPTS, RESUME, SEED, THREADS, option


class TrainingError(RuntimeError):
    """Training cannot continue (NaN/Inf loss or gradients); the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    data: str = option(help="folder of train_*.bin / val_*.bin token shards (from `fastllm prepare`)")
    out: str = option("out", "output folder: checkpoints ckpt_NNNNNN/, log.jsonl, loss.png")
    model: str = option("small", "size preset: tiny, mini, small (CPU sizes), gpt2, gpt2-medium, gpt2-large, gpt2-xl")
    n_layer: int | None = option(None, "transformer blocks (default: the preset's)")
    n_head: int | None = option(None, "attention heads per block (default: the preset's)")
    n_embd: int | None = option(None, "embedding width in channels, a multiple of n_head (default: the preset's)")
    batch_size: int = option(8, "B: sequences per micro-batch")
    seq_len: int = option(256, "T: tokens per sequence (raises the preset's context length when larger)")
    total_batch_tokens: int | None = option(None, "tokens per optimizer step, a multiple of B*T: gradient "
                                                  "accumulation (default: B*T, no accumulation)")
    max_steps: int = option(1000, "optimizer steps in all (the cosine LR decay ends here)")
    lr: float = option(1e-3, "peak learning rate, reached at the end of the warmup")
    min_lr: float | None = option(None, "learning rate at the end of the cosine decay (default: lr / 10)")
    warmup_steps: int = option(50, "steps of linear learning-rate warmup from 0")
    weight_decay: float = option(0.1, "AdamW decoupled weight decay, on weight matrices only")
    beta1: float = option(0.9, "AdamW beta1 (decay of the gradient mean)")
    beta2: float = option(0.95, "AdamW beta2 (decay of the squared-gradient mean)")
    grad_clip: float = option(1.0, GRAD_CLIP)
    eval_every: int = option(100, "steps between validation-loss evaluations (0: never)")
    eval_batches: int = option(20, "batches of B x T tokens per validation (fewer if the val split is smaller)")
    sample_every: int = option(0, "steps between printed text samples (0: never)")
    sample_tokens: int = option(64, "tokens per printed sample")
    ckpt_every: int = option(200, CKPT_EVERY)
    keep_ckpts: int = option(2, KEEP_CKPTS)
    seed: int = option(1337, SEED)
    threads: int | None = option(None, THREADS)
    resume: bool = option(False, RESUME)
    device: str = option("cpu", "where to train: cpu, or cuda (a CUDA build of fastllm and an NVIDIA GPU)",
                         choices=("cpu", "cuda"))
    cuda_dtype: str = option("bfloat16", "with --device cuda: compute dtype of weights and activations (master "
                                         "weights and AdamW state stay float32)", choices=("bfloat16", "float32"))
    loss_log_scale: bool = option(False, "draw the loss panel of loss.png on a log scale")

    def model_config(self, vocab_size: int) -> GPTConfig:
        over = {k: v for k, v in (("n_layer", self.n_layer), ("n_head", self.n_head), ("n_embd", self.n_embd)) if v}
        cfg = GPTConfig.preset(self.model, vocab_size=vocab_size, **over)
        if self.seq_len > cfg.block_size:
            cfg.block_size = self.seq_len
        return cfg


# ---- checkpoints ---------------------------------------------------------------------------------------


def save_checkpoint(out: Path, step: int, model: GPT, opt: AdamW, state: dict, tokenizer: Path | None) -> Path:
    final = out / f"ckpt_{step:06d}"
    tmp = out / f".ckpt_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_safetensors(tmp / "model.safetensors", dict(model.p), {"config": json.dumps(model.config.to_dict())})
    save_safetensors(tmp / "optimizer.safetensors", {"m": opt.m, "v": opt.v}, {"t": opt.t})
    write_json(tmp / "state.json", state)
    if tokenizer is not None:
        copy_tokenizer(tokenizer, tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(out / ".latest.tmp", "w") as f:
        f.write(final.name + "\n")
    os.replace(out / ".latest.tmp", out / "latest")
    return final


def latest_checkpoint(out: str | os.PathLike) -> Path | None:
    out = Path(out)
    if (out / "latest").exists():
        p = out / (out / "latest").read_text().strip()
        if p.is_dir():
            return p
    ckpts = sorted(out.glob("ckpt_*"))
    return ckpts[-1] if ckpts else None


def load_model(ckpt: str | os.PathLike) -> GPT:
    """A GPT from a checkpoint folder (or a run folder: its latest checkpoint)."""
    path = Path(ckpt)
    if not (path / "model.safetensors").exists():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {path} (expected model.safetensors or ckpt_* folders)")
        path = found
    tensors, meta = load_safetensors(path / "model.safetensors")
    if "config" not in meta:
        raise ValueError(f"{path / 'model.safetensors'}: no model config in the metadata")
    model = GPT(GPTConfig.from_dict(json.loads(meta["config"])), init=False)
    for name, arr in model.p.items():
        if name not in tensors:
            raise ValueError(f"{path / 'model.safetensors'}: missing tensor {name!r}")
        if tensors[name].shape != arr.shape:
            raise ValueError(f"{path / 'model.safetensors'}: tensor {name!r} has shape {tensors[name].shape}, "
                             f"the config needs {arr.shape}")
        arr[...] = tensors[name]
    model.checkpoint_dir = path
    return model


# ---- training ------------------------------------------------------------------------------------------


def _evaluate(model: GPT, loader: DataLoader, batches: int) -> float:
    model.eval()
    loader.reset()
    losses = [model.forward(*loader.next_batch()) for _ in range(min(batches, max(1, len(loader) // loader.B)))]
    model.train()
    return float(np.mean(losses))


class RunLog:
    """`log.jsonl` of a run: one JSON object per line. Opening it for a run that starts (or resumes) at
    `start` drops what a killed run logged at or after that step, so a resumed log equals an uninterrupted one."""

    def __init__(self, path: Path, start: int):
        self.path = path
        self.rows: list[dict] = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                if row.get("step", 0) < start:
                    self.rows.append(row)
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.rows)
        self._f = open(path, "a")

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def train(cfg: TrainConfig, progress: bool = True, log=print, *, loaders=None, init_model=None,
          tokenizer_path: str | os.PathLike | None = None) -> dict:
    """Train (or resume) a GPT on cfg.data; returns a summary dict.

    Hooks for other training stages (fine-tuning, see fastllm.sft), all None for pre-training:
    `loaders` = (train, val or None) objects with DataLoader's interface (next_batch() -> (x, y) with y = -1
    where no loss is taken, __len__, reset, state_dict, load_state_dict, B, vocab_size) instead of shards from
    cfg.data; `init_model()` builds the starting model when not resuming; `tokenizer_path` is copied into
    checkpoints instead of the one beside the shards."""
    from tqdm.auto import tqdm

    from .plot import plot_training

    if cfg.device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {cfg.device!r}")
    if cfg.device == "cuda":
        from . import cuda

        cuda._require()  # RuntimeError now, not after loading the data, if CUDA is not built or no GPU is found
    if cfg.threads:
        set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if loaders is not None:
        train_loader, val_loader = loaders
        val_loader = val_loader if cfg.eval_every else None
    else:
        train_loader = DataLoader(cfg.data, "train", cfg.batch_size, cfg.seq_len, seed=cfg.seed)
        val_loader = None
        if cfg.eval_every and list(Path(cfg.data).glob("val_*.bin")):
            val_loader = DataLoader(cfg.data, "val", cfg.batch_size, cfg.seq_len, shuffle=False)
    tok_path = Path(tokenizer_path) if tokenizer_path is not None else find_tokenizer(cfg.data)
    tokenizer = None
    if tok_path is not None and cfg.sample_every:
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(tok_path)

    BT = cfg.batch_size * cfg.seq_len
    total = cfg.total_batch_tokens or BT
    if total % BT:
        raise ValueError(f"total_batch_tokens={total} must be a multiple of batch_size*seq_len={BT}")
    accum = total // BT
    min_lr = cfg.lr / 10 if cfg.min_lr is None else cfg.min_lr

    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        model = load_model(ckpt)
        opt = AdamW(model, cfg.lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        ot, ometa = load_safetensors(ckpt / "optimizer.safetensors")
        opt.m[...], opt.v[...], opt.t = ot["m"], ot["v"], int(ometa["t"])
        state = json.loads((ckpt / "state.json").read_text())
        start = int(state["step"])
        train_loader.load_state_dict(state["loader"])
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        log(f"resuming from {ckpt} at step {start}")
    else:
        if cfg.resume:
            log(f"no checkpoint in {out}: starting from " + ("scratch" if init_model is None else "the given model"))
        model = init_model() if init_model is not None else GPT(cfg.model_config(train_loader.vocab_size),
                                                                seed=cfg.seed)
        opt = AdamW(model, cfg.lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        start = 0
        rng = np.random.default_rng(cfg.seed)
    if model.config.vocab_size < train_loader.vocab_size:
        raise ValueError(f"model vocab_size {model.config.vocab_size} < data vocab_size {train_loader.vocab_size}")
    host_model, host_opt = model, opt  # what checkpoints save (the GPU state is copied into them first)
    if cfg.device == "cuda":
        from .cuda_model import CudaGPT

        model = CudaGPT(host_model, dtype=cfg.cuda_dtype).load_from(host_model, host_opt)
        opt = model.adamw
        log(f"device: cuda ({cfg.cuda_dtype} compute, float32 master weights and AdamW state)")

    def grad_norm_now() -> float:
        return model.grad_norm() if model is not host_model else grad_norm(model)

    log_path = out / "log.jsonl"
    runlog = RunLog(log_path, start)
    rows, write = runlog.rows, runlog.write

    def state(step: int) -> dict:
        return {"step": step, "loader": train_loader.state_dict(), "rng": rng.bit_generator.state,
                "train_config": dataclasses.asdict(cfg)}

    def checkpoint(step: int) -> None:
        if model is not host_model:
            model.to_cpu(host_model, host_opt)
        if not np.isfinite(host_model.params).all():
            raise TrainingError(f"step {step}: parameters are not finite; not saving. The last good checkpoint is "
                                f"{latest_checkpoint(out)}; try a lower --lr")
        save_checkpoint(out, step, host_model, host_opt, state(step), tok_path)
        for old in sorted(out.glob("ckpt_*"))[:-max(1, cfg.keep_ckpts)]:
            shutil.rmtree(old, ignore_errors=True)

    def plot() -> None:
        plot_training(rows, out / "loss.png", log_scale=cfg.loss_log_scale, title=str(out))

    log(f"model: {model.num_parameters / 1e6:.2f}M parameters {model.config.to_dict()}")
    log(f"data: {len(train_loader)} train windows of T={cfg.seq_len}; {accum} micro-batches of {BT} tokens per step")
    t_start = time.time()
    tokens_done = 0
    val_loss = first_loss = loss = float("nan")
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="train", unit="step",
               disable=not progress, dynamic_ncols=True)
    try:
        for step in bar:
            last = step == cfg.max_steps - 1
            if val_loader is not None and (step % cfg.eval_every == 0 or last):
                val_loss = _evaluate(model, val_loader, cfg.eval_batches)
                write({"step": step, "val_loss": val_loss})
                msg = f"step {step:6d} | val loss {val_loss:.4f}"
                msg += f" | train loss {loss:.4f}" if math.isfinite(loss) else ""
                bar.write(msg) if progress else log(msg)
            if tokenizer is not None and step > 0 and step % cfg.sample_every == 0:
                _print_sample(model, tokenizer, cfg.sample_tokens, rng, bar)
            t0 = time.time()
            model.zero_grad()
            loss = 0.0
            for _ in range(accum):
                loss += model.forward(*train_loader.next_batch()) / accum
                model.backward()
            norm = grad_norm_now() / accum
            if not (math.isfinite(loss) and math.isfinite(norm)):
                raise TrainingError(f"step {step}: loss={loss} grad_norm={norm} is not finite; stopping. The last "
                                    f"good checkpoint is {latest_checkpoint(out)}; try a lower --lr")
            clip = min(1.0, cfg.grad_clip / (norm + 1e-6)) if cfg.grad_clip > 0 else 1.0
            lr = lr_schedule(step, cfg.lr, min_lr, cfg.warmup_steps, cfg.max_steps)
            opt.step(lr, grad_scale=clip / accum)
            dt = time.time() - t0
            tokens_done += total
            if math.isnan(first_loss):
                first_loss = loss
            write({"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "dt": dt, "tok_per_s": total / dt})
            bar.set_postfix(loss=f"{loss:.4f}", val=f"{val_loss:.4f}", tok_s=f"{total / dt:,.0f}")
            done = step + 1
            if done % cfg.ckpt_every == 0 or done == cfg.max_steps:
                checkpoint(done)
                plot()
    finally:
        bar.close()
        runlog.close()
    elapsed = time.time() - t_start
    plot()
    summary = {"steps": cfg.max_steps, "final_loss": loss, "first_loss": first_loss, "val_loss": val_loss,
               "tokens": tokens_done, "seconds": elapsed, "tok_per_s": tokens_done / max(elapsed, 1e-9),
               "checkpoint": str(latest_checkpoint(out)), "loss_curve": str(out / "loss.png"),
               "log": str(log_path)}
    return summary


def _print_sample(model: GPT, tokenizer, n: int, rng: np.random.Generator, bar) -> None:
    from .sample import generate

    eot = tokenizer.special_tokens.get("<|endoftext|>", 0)
    ids = generate(model, [eot], n, temperature=0.8, top_k=40, seed=int(rng.integers(1 << 31)))
    bar.write("sample: " + tokenizer.decode(ids[1:]).replace("\n", " ")[:200])
