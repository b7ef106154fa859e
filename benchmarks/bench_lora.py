"""LoRA fine-tuning step, fastllm vs transformers + peft (what a PyTorch user runs), in one process:
    python benchmarks/bench_lora.py [--threads 2] [--quick] [--layers 30] [--batch 4] [--seq 256] [--rank 16]
                                    [--alpha 32] [--repeats 5] [--autocast auto|on|off] [--no-memory] [--dpo]
                                    [--held]
--dpo: a DPO step instead (fastllm.dpo.dpo_backward: sigmoid loss, beta 0.1, fixed reference log-probs as when
they are precomputed) on --batch pairs: 2 * batch sequences of --seq tokens, each pair sharing its first half (the
prompt, not counted); peft's side computes what TRL's DPOTrainer does on a concatenated batch (one forward of all
2B sequences, log-softmax of the answer tokens, the loss, backward). fastllm reads the log-probs in one forward and
then runs forward + backward with per-token weights: one forward more.
One step = forward + backward + AdamW on the adapters (lr 2e-4, betas (0.9, 0.95), no weight decay), on a
SmolLM2-135M-shaped Llama (30 layers, n_embd 576, 9 heads, 3 kv heads, SwiGLU 1536, vocab 49152, RoPE theta 1e5,
tied embeddings; --layers cuts the depth) with random tokens, adapters of rank --rank on all seven projections
(q, k, v, o, gate, up, down), the rest frozen. Providers:
  fastllm lora       GPT(dtype="float32") + add_lora, fastllm.optim.AdamW (it trains model.trainable(): the adapters)
  fastllm lora bf16  the same on GPT(dtype="bfloat16"): bf16 matmuls, fp32 master weights
  fastllm full       full fine-tuning in float32 (every parameter trains): what LoRA saves
  peft               transformers LlamaForCausalLM (float32, attn_implementation="sdpa") with fastllm's weights
                     (tests/torch_gpt.py hf_twin), peft.get_peft_model(LoraConfig(r, lora_alpha, the seven
                     *_proj modules, lora_dropout=0)), torch.optim.AdamW over its trainable parameters,
                     loss = model(input_ids=x, labels=x).loss
  peft autocast      the same with the forward under torch.autocast("cpu", dtype=torch.bfloat16) (backward and
                     AdamW outside it); by default only on a CPU with AVX512_BF16 or AMX (common.with_autocast)
--held: the base held in a low-precision form instead (what a user does to fine-tune a model whose float32 weights
do not fit), against peft on a bf16 base:
  fastllm lora bf16 base   hold_weights(bf16_weights()) (`--base-weights bfloat16`: the matrices in bf16 alone,
                           the norms float32), dtype="bfloat16" (bf16 matmuls, attention, adapters' products)
  fastllm lora int8 base   hold_weights(int8_weights()) (`--base-weights int8`: per-channel int8), dtype="bfloat16"
  fastllm lora             as above: the float32 base, for reference
  peft bf16 base           the transformers model in torch.bfloat16 (from_pretrained(torch_dtype=torch.bfloat16)),
                           get_peft_model (its adapters float32: peft's autocast_adapter_dtype), activations bf16
  (peft on an 8-bit base needs bitsandbytes, whose CPU kernels are not in this environment: not measured.)
The loss is the same on both sides: HF shifts the labels inside (logits[:, :-1] against labels[:, 1:]), so fastllm
gets targets y[:, t] = x[:, t + 1] and the ignore index (-1) at the last position: both average the cross-entropy
over the same B * (T - 1) tokens. Check before timing: the first step's loss (adapters at B = 0, i.e. the base
model) of fastllm lora and peft, which must agree within 1e-3. Tokens/s counts all B * T input tokens.
Trainable parameters differ by design: fastllm keeps q|k|v and gate|up fused, and each fused matrix has ONE
adapter (one A shared by its projections, see fastllm/lora.py), where PEFT gives every projection its own A.

Peak memory: each provider again in a child process of this script (--child PROVIDER; fastllm's children do not
import torch), which builds its model and optimizer, hands freed memory back (gc, malloc_trim), resets the
resident-set high-water mark (/proc/self/clear_refs) and takes 3 steps; "peak MiB" is then VmHWM: weights,
adapters, gradients, optimizer state and the step's activations, plus the imports ("imports MiB": the RSS after
the imports, before the model; "peak-imports MiB" leaves them out). Where the mark cannot be reset, ru_maxrss
(which also counts the build)."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from common import AUTOCAST_OPTION, bench, cli, header, load_note, print_table, set_threads, with_autocast  # noqa: E402

from fastllm import ops  # noqa: E402
from fastllm.dpo import DPOConfig, dpo_backward  # noqa: E402
from fastllm.model import GPT, MODERN, TOKEN_TABLE, GPTConfig  # noqa: E402
from fastllm.ops import IGNORE_INDEX  # noqa: E402
from fastllm.optim import AdamW  # noqa: E402

PROVIDERS = ("fastllm lora", "fastllm lora bf16", "fastllm full", "peft", "peft autocast")
RATIOS = (("peft", "fastllm lora"), ("peft autocast", "fastllm lora bf16"),
          ("fastllm full", "fastllm lora"))  # (numerator, denominator), where both ran
HELD = ("fastllm lora bf16 base", "fastllm lora int8 base", "fastllm lora bf16", "fastllm lora", "peft bf16 base")
HELD_RATIOS = (("peft bf16 base", "fastllm lora bf16 base"), ("peft bf16 base", "fastllm lora int8 base"),
               ("fastllm lora", "fastllm lora bf16 base"))
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, BETAS = 2e-4, (0.9, 0.95)
MEMORY_STEPS = 3


def smollm2(layers: int, T: int) -> GPTConfig:
    """SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M's config.json), `layers` deep, RoPE tables for T."""
    return GPTConfig(block_size=T, vocab_size=49152, n_layer=layers, n_head=9, n_kv_head=3, n_embd=576,
                     mlp="swiglu", mlp_hidden=1536, rope_theta=100000.0, layernorm_eps=1e-5, tie_embeddings=True,
                     **MODERN)


def tokens(cfg: GPTConfig, B: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Random tokens x (B, T) and fastllm's targets for HF's loss on labels=x: x shifted left, -1 at the end."""
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (B, T))
    y = np.full_like(x, IGNORE_INDEX)
    y[:, :-1] = x[:, 1:]
    return x, y


def dpo_tokens(cfg: GPTConfig, B: int, T: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x (2B, T), fastllm's targets (answer tokens only), fixed reference log-probs (2B,)) of B random pairs whose
    two sequences share their first T // 2 tokens (the prompt)."""
    x, y = tokens(cfg, 2 * B, T)
    x[1::2, : T // 2] = x[0::2, : T // 2]
    y[:, : T // 2 - 1] = IGNORE_INDEX
    y[:, T // 2 - 1 : -1] = x[:, T // 2 :]
    return x, y, np.random.default_rng(1).normal(-1300.0, 5.0, 2 * B)


def make(provider: str, cfg: GPTConfig, x, y, rank: int, alpha: float, ref=None):
    """-> (step() returning the step's loss, trainable parameter count): the provider's own model and optimizer. ref
    (the reference log-probs): a DPO step on the pairs of x (dpo_tokens) instead of a next-token step."""
    if provider.startswith("fastllm"):
        model = GPT(cfg, seed=0, dtype="bfloat16" if "bf16" in provider or "int8" in provider else "float32")
        if provider.endswith(" base"):  # held as `--base-weights` loads a hub folder stored in bf16 (SmolLM2's)
            form = "bfloat16" if "bf16" in provider else "int8"
            snapshot = model.decode_weights(form)
            # the file's bf16 token embedding: in bf16 the tied head itself (fastllm.hf), beside an int8 head
            snapshot[TOKEN_TABLE] = snapshot["wte"] if form == "bfloat16" else ops.to_bf16(model.p["wte"])
            full, model = model, GPT(cfg, init=False, dtype=model.dtype)  # (zeros never written: not resident)
            for name, v in full.state_dict().items():
                if name not in snapshot:  # the norms
                    model.p[name][...] = v
            model.hold_weights(snapshot, form)
            del full
        if "lora" in provider:
            model.add_lora(r=rank, alpha=alpha, targets=("all",))
        model.train()
        opt = AdamW(model, lr=LR, betas=BETAS, weight_decay=0.0)
        dpo = DPOConfig(base="-", data="-", beta=0.1)

        def step():
            model.zero_grad()
            if ref is None:
                loss = model.forward(x, y)
                model.backward()
            else:
                loss = dpo_backward(model, x, y, ref, dpo)["loss"]
            opt.step()
            return loss

        return step, model.trainable().num_parameters
    import peft
    import torch
    import torch_gpt

    hf = torch_gpt.hf_twin(GPT(cfg, seed=0), "llama", attn="sdpa")  # the same weights as fastllm's seed 0
    if provider == "peft bf16 base":
        hf = hf.to(torch.bfloat16)
    model = peft.get_peft_model(hf, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=HF_TARGETS,
                                                    lora_dropout=0.0)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=BETAS, weight_decay=0.0)
    ids, autocast = torch.as_tensor(x), provider == "peft autocast"

    targets = torch.as_tensor(y[:, :-1], dtype=torch.int64)  # (DPO: the answer tokens, shifted as HF's labels)
    mask = targets != IGNORE_INDEX
    ref_t = None if ref is None else torch.as_tensor(ref)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if ref is None:
                loss = model(input_ids=ids, labels=ids).loss
            else:  # TRL's concatenated forward: the answers' log-probs, then the sigmoid loss
                logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
                seq = (logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask).sum(1)
                h = (seq[0::2] - ref_t[0::2]) - (seq[1::2] - ref_t[1::2])
                loss = -torch.nn.functional.logsigmoid(0.1 * h).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step, sum(p.numel() for p in params)


def proc_status_mib(field: str) -> float | None:
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Hand freed heap memory back to the OS and reset the high-water mark of the resident set (Linux >= 4.0)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def steady_state(provider: str, layers: int, batch_size: int, seq: int, rank: int, alpha: float, threads: int,
                 dpo: bool) -> None:
    """One provider's steady state (build, reset the peak, MEMORY_STEPS steps); prints its memory as a JSON line."""
    import fastllm

    if provider.startswith("peft"):  # what a peft user has imported
        import peft  # noqa: F401
        import torch
        import transformers  # noqa: F401

        torch.set_num_threads(threads)
    fastllm.set_num_threads(threads)
    imports = proc_status_mib("VmRSS")
    cfg = smollm2(layers, seq)
    x, y, ref = dpo_tokens(cfg, batch_size, seq) if dpo else (*tokens(cfg, batch_size, seq), None)
    step, _ = make(provider, cfg, x, y, rank, alpha, ref)
    reset = reset_peak()
    for _ in range(MEMORY_STEPS):
        step()
    peak = proc_status_mib("VmHWM") if reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "imports": imports, "reset": reset}))


def memory(provider: str, layers: int, batch_size: int, seq: int, rank: int, alpha: float, threads: int,
           dpo: bool) -> dict:
    """The child's JSON, or {} (with its error printed) if it failed."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", provider, "--layers", str(layers), "--batch",
           str(batch_size), "--seq", str(seq), "--rank", str(rank), "--alpha", str(alpha), "--threads", str(threads),
           *(["--dpo"] if dpo else [])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout.strip():
        print(f"memory of {provider}: child failed (exit {r.returncode}): {r.stderr.strip()[-2000:]}")
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])


def above(m: dict) -> float:
    """MiB of the peak above the imports: the model, its training state and the step."""
    return m["peak"] - m["imports"]


def run(threads: int = 2, quick: bool = False, layers: int = 0, batch: int = 4, seq: int = 256, rank: int = 16,
        alpha: float = 32.0, repeats: int = 0, autocast: str = "auto", no_memory: bool = False,
        child: str = "", dpo: bool = False, held: bool = False) -> None:
    layers = layers or (4 if quick else 30)
    repeats = repeats or (3 if quick else 5)
    if child:
        return steady_state(child, layers, batch, seq, rank, alpha, threads, dpo)
    set_threads(threads)
    print(header(f"LoRA {'DPO' if dpo else 'fine-tuning'} step (fwd+bwd+AdamW on the adapters)", threads))
    providers = HELD if held else PROVIDERS if with_autocast(autocast) else PROVIDERS[:4]
    ratios = HELD_RATIOS if held else RATIOS
    cfg = smollm2(layers, seq)
    B, T = batch, seq
    x, y, ref = dpo_tokens(cfg, B, T) if dpo else (*tokens(cfg, B, T), None)
    n_params = GPT(cfg, seed=0, init=False).num_parameters
    print(f"SmolLM2-135M-shaped Llama, {layers} layers, {n_params / 1e6:.1f}M parameters, "
          + (f"{B} pairs (2B = {2 * B} sequences) of T={T}, beta 0.1" if dpo else f"B={B} T={T}")
          + f", LoRA r={rank} alpha={alpha} on q,k,v,o,gate,up,down; {repeats} interleaved repeats, medians")

    mem = {}
    if not no_memory:  # first, while this process is small
        mem = {p: memory(p, layers, B, T, rank, alpha, threads, dpo) for p in providers}
        if any(m and not m["reset"] for m in mem.values()):
            print("peak memory: the high-water mark could not be reset: ru_maxrss, the model's build included")

    steps, trainable = {}, {}
    for p in providers:
        steps[p], trainable[p] = make(p, cfg, x, y, rank, alpha, ref)
    first = {p: steps[p]() for p in providers}  # the first step: the loss of the base model (B = 0), and warm-up
    ours, theirs, tol = ("fastllm lora bf16 base", "peft bf16 base", 2e-2) if held else ("fastllm lora", "peft", 1e-3)
    diff = abs(first[ours] - first[theirs])
    print(f"first-step loss: {ours} {first[ours]:.6f}, {theirs} {first[theirs]:.6f}, |diff| {diff:.2e} "
          f"({'ok' if diff <= tol else 'MISMATCH'}: within {tol:g})")

    r = bench(steps, repeats=repeats, warmup=1)
    ms = {p: v["median"] * 1e3 for p, v in r.items()}
    rows = [[p, f"{trainable[p] / 1e6:.2f}M", f"{ms[p]:.0f}", f"{r[p]['p20'] * 1e3:.0f}-{r[p]['p80'] * 1e3:.0f}",
             f"{x.size / ms[p] * 1e3:,.0f}", f"{mem[p]['peak']:.0f}" if mem.get(p) else "-",
             f"{mem[p]['imports']:.0f}" if mem.get(p) else "-",
             f"{above(mem[p]):.0f}" if mem.get(p) else "-", f"{first[p]:.4f}"] for p in providers]
    print_table(rows, ["provider", "trainable", "ms/step", "p20-p80", "tok/s", "peak MiB", "imports MiB",
                       "peak-imports MiB", "first loss"])
    ratios = [[f"{a} / {b}", f"{ms[a] / ms[b]:.2f}x",
               f"{mem[a]['peak'] / mem[b]['peak']:.2f}x" if mem.get(a) and mem.get(b) else "-",
               f"{above(mem[a]) / above(mem[b]):.2f}x" if mem.get(a) and mem.get(b) else "-"]
              for a, b in ratios if a in providers and b in providers]
    print_table(ratios, ["ratio", "time", "peak memory", "peak-imports"])
    print(f"after timing: {load_note()}")


if __name__ == "__main__":
    cli(run, __doc__,
        layers=("transformer blocks (SmolLM2-135M: 30; 0 = 30, --quick: 4)", 0),
        batch=("sequences per step", 4),
        seq=("tokens per sequence", 256),
        rank=("LoRA rank r", 16),
        alpha=("LoRA alpha (scale = alpha / r)", 32.0),
        repeats=("timed steps per provider (0 = 5, --quick: 3)", 0),
        autocast=AUTOCAST_OPTION,
        no_memory="skip the peak-memory children",
        child=("internal: run this provider's steady state and print its peak memory as JSON", ""),
        dpo="a DPO step on --batch pairs instead of a next-token step",
        held="the base held in bf16 / int8 (--base-weights) against peft on a bf16 base")
