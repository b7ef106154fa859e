"""What the shared training loop costs: `fastllm.train.train` (fit + LMStage: RunLog rows, LR schedule, finite check,
clipping, progress bookkeeping, a checkpoint at the end) against a bare nanoGPT-style loop over the same model,
loader and optimizer (forward, backward, grad norm, clip, AdamW, the same final checkpoint), interleaved:
    python benchmarks/bench_loop.py [--threads 2] [--quick]
The ratio bare/loop is 1.00 when the loop adds nothing; the tiny model (a few ms per step) shows the overhead most."""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import bench, cli, header, print_table, set_threads  # noqa: E402

from fastllm import checkpoint  # noqa: E402
from fastllm.data import DataLoader, write_shard  # noqa: E402
from fastllm.model import GPT  # noqa: E402
from fastllm.optim import AdamW, lr_schedule  # noqa: E402
from fastllm.train import TrainConfig, train  # noqa: E402


def case(data: Path, preset: str, B: int, T: int, steps: int, repeats: int, threads: int) -> list[str]:
    cfg = TrainConfig(data=str(data), out=str(data / "run"), model=preset, batch_size=B, seq_len=T, max_steps=steps,
                      eval_every=0, ckpt_every=0, threads=threads, warmup_steps=5)

    def bare():
        shutil.rmtree(data / "bare", ignore_errors=True)
        loader = DataLoader(cfg.data, "train", B, T, seed=cfg.seed)
        model = GPT(cfg.model_config(loader.vocab_size), seed=cfg.seed)
        opt = AdamW(model, cfg.lr, (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        for step in range(steps):
            model.zero_grad()
            loss = model.forward(*loader.next_batch())
            model.backward()
            norm = model.grad_norm()
            assert math.isfinite(loss) and math.isfinite(norm)
            opt.step(lr_schedule(step, cfg.lr, cfg.lr / 10, cfg.warmup_steps, steps),
                     grad_scale=min(1.0, cfg.grad_clip / (norm + 1e-6)))
        checkpoint.save(data / "bare", steps, model, opt, {"loader": loader.state_dict()}, kind="train")

    def loop():
        shutil.rmtree(data / "run", ignore_errors=True)
        train(cfg, progress=False, log=lambda *a: None)

    r = bench({"bare": bare, "loop": loop}, repeats=repeats, warmup=1)
    ms = {k: v["median"] * 1e3 / steps for k, v in r.items()}
    return [preset, f"{B}x{T}", str(steps), f"{ms['bare']:.2f}", f"{ms['loop']:.2f}", f"{ms['bare'] / ms['loop']:.2f}x"]


def run(threads: int = 2, quick: bool = False) -> None:
    set_threads(threads)
    print(header("training loop overhead (fastllm.train vs a bare loop)", threads))
    with tempfile.TemporaryDirectory() as d:
        data = Path(d)
        write_shard(data / "train_000000.bin", np.random.default_rng(0).integers(0, 256, 300_000), 256)
        rows = [case(data, "tiny", 4, 32, 100 if quick else 300, 3 if quick else 7, threads)]
        rows.append(case(data, "mini", 8, 128, 10 if quick else 30, 3 if quick else 5, threads))
    print_table(rows, ["model", "BxT", "steps", "bare ms/step", "loop ms/step", "bare/loop"])


if __name__ == "__main__":
    cli(run, __doc__)
