"""Training, fastllm vs PyTorch and the GPT-2 presets vs their modern (Llama-style) twins, in one process:
    python benchmarks/bench_train.py [--threads 2] [--quick] [--gpt2] [--autocast auto|on|off]
                                     [--race off|mini|small] [--steps N] [--no-table]
1. Tokens/s of a full training step (forward + backward + AdamW), fastllm in float32 and in mixed precision
   (GPT(dtype="bfloat16"): bf16 matmuls, fp32 master weights) vs a PyTorch eager twin of the same model
   (tests/torch_gpt.py: SDPA attention, torch.optim.AdamW) with the same weights, same threads, in float32 and
   under torch.autocast("cpu", dtype=torch.bfloat16) (the forward in autocast, backward and AdamW outside it:
   PyTorch's mixed-precision recipe, fp32 master weights; by default only on a CPU with bf16 hardware,
   AVX512_BF16 or AMX: elsewhere torch emulates bf16 and nobody would train that way), interleaved: the GPT-2-style
   presets mini and small beside their modern twins nano and micro (RoPE, RMSNorm, SwiGLU, grouped-query attention,
   no biases; the same depth and width), small at vocab 50257 too, and with --gpt2, GPT-2 124M at T=1024.
2. --race mini (or small): the GPT-2 preset against its modern twin at equal wall time on the demo's corpus and
   recipe (fastllm.demo: the built-in corpus, its 4096-token BPE, 16x128 tokens per step, lr 2e-3, warmup 60,
   cosine): the GPT-2 preset trains --steps steps (the demo's 800); the twin gets the steps that take the same time,
   from the two models' step times measured interleaved (so the other load on the machine slows both alike). Both
   run through fastllm.train.train; the table gives each one's final train and validation loss."""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from common import AUTOCAST_OPTION, bench, cli, header, print_table, set_threads, with_autocast  # noqa: E402

from fastllm.model import GPT, GPTConfig  # noqa: E402
from fastllm.optim import AdamW  # noqa: E402

PROVIDERS = ("fastllm", "fastllm bf16", "torch", "torch autocast")
RATIOS = (("torch", "fastllm"), ("torch", "fastllm bf16"), ("torch autocast", "fastllm bf16"),
          ("fastllm", "fastllm bf16"))  # (numerator, denominator) time ratios, where both ran
TWINS = {"mini": "nano", "small": "micro"}  # GPT-2-style preset -> the modern preset of its depth and width


def case(name: str, cfg: GPTConfig, B: int, T: int, repeats: int, providers=PROVIDERS) -> list[str]:
    import torch
    import torch_gpt

    model = GPT(cfg, seed=0)
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (B, T))
    y = rng.integers(0, cfg.vocab_size, (B, T))

    def ours(dtype: str):
        m = GPT(cfg, seed=0, dtype=dtype)  # each variant its own weights and optimizer
        opt = AdamW(m, lr=1e-4, weight_decay=0.1)

        def step():
            m.forward(x, y)
            m.zero_grad()
            m.backward()
            opt.step()

        return step

    tx, ty = torch.as_tensor(x), torch.as_tensor(y)

    def theirs(autocast: bool):
        fwd, params = torch_gpt.build(model, sdpa=True)  # each variant its own weights and optimizer
        topt = torch.optim.AdamW(list(params.values()), lr=1e-4, weight_decay=0.1)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = fwd(tx, ty)
            topt.zero_grad(set_to_none=True)
            loss.backward()
            topt.step()

        return step

    fns = {"fastllm": lambda: ours("float32"), "fastllm bf16": lambda: ours("bfloat16"),
           "torch": lambda: theirs(False), "torch autocast": lambda: theirs(True)}
    r = bench({k: fns[k]() for k in providers}, repeats=repeats, warmup=1)
    ms = {k: v["median"] * 1e3 for k, v in r.items()}
    tok = B * T
    return [name, f"{B}x{T}", f"{model.num_parameters / 1e6:.1f}M", *(f"{ms[k]:.0f}" for k in providers),
            *(f"{tok / ms[k] * 1e3:,.0f}" for k in providers),
            *(f"{ms[a] / ms[b]:.2f}x" for a, b in RATIOS if a in providers and b in providers)]


def race_presets(gpt2: str, steps: int, threads: int, repeats: int) -> None:
    """The GPT-2-style preset `gpt2` for `steps` steps vs its modern twin for the same wall time, demo recipe."""
    from fastllm.checkpoint import load_model
    from fastllm.data import DataLoader
    from fastllm.demo import DemoConfig, demo_data, final_losses, train_config
    from fastllm.train import train, update

    names = (gpt2, TWINS[gpt2])
    with tempfile.TemporaryDirectory(prefix="bench_train_race_") as tmp:
        out = Path(tmp)
        base = DemoConfig(out=tmp, threads=threads, max_steps=steps)
        _, _, data, stats, _ = demo_data(out, base.vocab_size, base.val_fraction, progress=False)
        vocab = DataLoader(data, "val", 1, base.seq_len).vocab_size
        cfgs = {n: dataclasses.replace(base, model=n) for n in names}
        steppers = {}
        for n, c in cfgs.items():  # one optimizer step of each, as train() takes it, for the interleaved timing
            model = GPT(train_config(c, data, out / n).model_config(vocab), seed=c.seed)
            opt, loader = AdamW(model, lr=c.lr, weight_decay=0.1), DataLoader(data, "train", c.batch_size, c.seq_len)

            def micro_batch(model=model, loader=loader):
                loss = model.forward(*loader.next_batch())
                model.backward()
                return {"loss": loss}

            steppers[n] = lambda model=model, opt=opt, mb=micro_batch, lr=c.lr: update(model, opt, mb, lr, 1.0)
        step_s = {k: v["median"] for k, v in bench(steppers, repeats=repeats, warmup=2).items()}
        for c in cfgs.values():
            c.max_steps = round(steps * step_s[gpt2] / step_s[c.model])
        print("step time, interleaved: " + ", ".join(f"{n} {t * 1e3:.0f} ms" for n, t in step_s.items()) + " -> "
              + ", ".join(f"{n} {c.max_steps} steps" for n, c in cfgs.items()), flush=True)
        rows = []
        for n, c in cfgs.items():
            load0, t0 = os.getloadavg()[0], time.perf_counter()
            s = train(train_config(c, data, out / n), progress=False, log=lambda *a, **k: None)
            wall, load1 = time.perf_counter() - t0, os.getloadavg()[0]
            model = load_model(out / n)
            train_loss, val_loss = final_losses(model, c, data)
            arch = "GPT-2" if model.config.positions == "learned" else "modern"
            rows.append([n, arch, f"{model.num_parameters / 1e6:.2f}M", f"{step_s[n] * 1e3:.0f}", str(c.max_steps),
                         f"{c.max_steps * step_s[n]:.0f}", f"{wall:.0f}", f"{load0:.1f}-{load1:.1f}",
                         f"{s['tok_per_s']:,.0f}", f"{train_loss:.3f}", f"{val_loss:.3f}"])
    print(f"race at equal wall time on the demo corpus ({stats.train_tokens:,} train / {stats.val_tokens:,} "
          f"validation tokens, vocab {vocab}), {base.batch_size}x{base.seq_len} tokens per step, lr "
          f"{base.lr}; 'time' = steps x the interleaved step time, 'wall' = the run's own (evaluations included)")
    print_table(rows, ["preset", "arch", "params", "ms/step", "steps", "time s", "wall s", "load", "tok/s",
                       "train loss", "val loss"])


def run(threads: int = 2, quick: bool = False, gpt2: bool = False, autocast: str = "auto", race: str = "off",
        steps: int = 800, no_table: bool = False) -> None:
    set_threads(threads)
    print(header("train step (fwd+bwd+AdamW)", threads))
    if not no_table:
        providers = PROVIDERS if with_autocast(autocast) else PROVIDERS[:3]
        shapes = [("mini", 16, 128), ("nano", 16, 128), ("small", 4 if quick else 8, 256),
                  ("micro", 4 if quick else 8, 256)]
        rows = [case(f"{n} V=4096", GPTConfig.preset(n, vocab_size=4096), B, T, 3 if quick else 5, providers)
                for n, B, T in shapes]
        if not quick:
            rows.append(case("small V=50257", GPTConfig.preset("small", vocab_size=50257), 8, 256, 3, providers))
        if gpt2:
            rows.append(case("gpt2 124M", GPTConfig.preset("gpt2", vocab_size=50257), 4, 1024, 2, providers))
        if "torch autocast" in providers:
            print("torch autocast = torch.autocast('cpu', dtype=torch.bfloat16) around the forward (bf16 GEMMs)")
        print("fastllm bf16 = GPT(dtype='bfloat16'): bf16 matmuls (operands rounded as packed, fp32 sums; kernel: "
              "info()['bf16_gemm'] in the header) and attention products (info()['bf16_attention']), fp32 master "
              "weights, AdamW, norms, softmax and loss")
        print_table(rows, ["model", "BxT", "params", *(f"{k} ms" for k in providers),
                           *(f"{k} tok/s" for k in providers),
                           *(f"{a}/{b}" for a, b in RATIOS if a in providers and b in providers)])
    if race != "off":
        race_presets(race, steps // 4 if quick else steps, threads, 5 if quick else 10)


if __name__ == "__main__":
    cli(run, __doc__, gpt2="also GPT-2 124M at T=1024 (slow, ~10 GB RAM)",
        autocast=AUTOCAST_OPTION,
        no_table="skip the step-time table (e.g. to run only --race)",
        race=("the GPT-2-style preset to race against its modern twin (mini: nano, small: micro) at equal wall time "
              "on the demo corpus", "off", "off", "mini", "small"),
        steps=("--race: the GPT-2-style preset's steps (the demo's 800; --quick: a quarter)", 800))
