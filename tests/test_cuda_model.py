"""The one GPT on the GPU (device="cuda": marked cuda, skipped without a GPU or the CUDA emulator), against the
same model on the CPU.

Tolerances: float32 mode uses the GPU's fp32 GEMM path (FFMA), so ~2e-3 relative on losses and gradients;
bfloat16 mode (bf16 weights/activations, fp32 accumulation and master weights) ~2e-2 relative on the loss over
20 training steps. Every failure message prints the error size. Head size 64 throughout (GPT-2's).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fastllm import cuda
from fastllm.model import GPT, MODERN, GPTConfig
from fastllm.optim import AdamW
from fastllm.sample import generate

pytestmark = pytest.mark.cuda

V = 1000  # not a multiple of 64: odd vocabulary tails in the lm-head


# the options of the modern family, together (head size 64: the bf16 tensor-core attention, MQA)
MODERN_OPTIONS = dict(MODERN, n_kv_head=1, mlp="swiglu", mlp_hidden=256, qk_norm=True, tie_embeddings=False,
                      logit_softcap=30.0)
# Gemma 2/3's options on top (GeGLU, embedding scale, post-norms, the scores' scale and soft cap, a sliding layer with
# its own RoPE base: T = 97 spans the window)
GEMMA_OPTIONS = dict(MODERN_OPTIONS, mlp="geglu", embed_scale=128 ** 0.5, post_norms=True, attn_scale=0.1,
                     attn_softcap=20.0, sliding_window=40, layer_types=["sliding_attention", "full_attention"],
                     rope_local_theta=1e4)
# GPT-NeoX's (Pythia's): LayerNorms, attention and MLP side by side, the exact GELU, RoPE on a quarter of each head
NEOX_OPTIONS = dict(positions="rope", mlp="gelu_erf", parallel_residual=True, partial_rotary_factor=0.25,
                    tie_embeddings=False)


def small_config(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(block_size=128, vocab_size=V, n_layer=2, n_head=2, n_embd=128), **kw})


def on_gpu(cpu: GPT, dtype: str = "float32") -> GPT:
    """A GPU copy of a CPU model (same weights)."""
    return GPT(cpu.config, init=False, device="cuda", dtype=dtype).load_state_dict(cpu.state_dict())


def learnable_batches(n: int, B: int, T: int, seed: int = 0):
    """Batches of a predictable stream (next = 5*cur + 3 mod V, restarting at random points): the loss falls."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        cur = rng.integers(0, V, (B, 1))
        steps = [cur]
        for _ in range(T):
            cur = np.where(rng.random((B, 1)) < 0.02, rng.integers(0, V, (B, 1)), (5 * cur + 3) % V)
            steps.append(cur)
        seq = np.concatenate(steps, 1)
        out.append((seq[:, :-1].copy(), seq[:, 1:].copy()))
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def grads_rel_err(gpu: GPT, cpu: GPT) -> dict[str, float]:
    return {name: rel(cuda.to_numpy(gpu.g[name]), cpu.g[name]) for name in cpu.g}


@pytest.mark.parametrize("arch", ["gpt2", pytest.param("modern", marks=pytest.mark.gpu_scale)])  # emulator: ~6 min
@pytest.mark.parametrize("dtype,tol", [("float32", 2e-3), ("bfloat16", 2e-2)])
def test_first_20_steps_match_cpu(dtype, tol, arch):
    opts = MODERN_OPTIONS if arch == "modern" else {}
    cpu = GPT(small_config(**opts), seed=0)
    gpu = GPT(small_config(**opts), seed=0, device="cuda", dtype=dtype)  # the same init, placed on the GPU
    cpu_opt, gpu_opt = AdamW(cpu, lr=1e-3), AdamW(gpu, lr=1e-3)
    worst = 0.0
    losses = []
    for step, (x, y) in enumerate(learnable_batches(20, B=2, T=128)):
        cpu.zero_grad()
        gpu.zero_grad()
        lc, lg = cpu.forward(x, y), gpu.forward(x, y)
        assert math.isfinite(lg), f"step {step}: GPU loss {lg}"
        err = abs(lg - lc) / lc
        worst = max(worst, err)
        assert err < tol, f"step {step}: GPU loss {lg:.6f} vs CPU {lc:.6f} (rel err {err:.2e} > {tol})"
        cpu.backward()
        gpu.backward()
        nc, ng = cpu.grad_norm(), gpu.grad_norm()
        assert abs(ng - nc) / nc < 5 * tol, f"step {step}: grad norm {ng} vs CPU {nc}"
        cpu_opt.step(grad_scale=min(1.0, 1.0 / (nc + 1e-6)))
        gpu_opt.step(grad_scale=min(1.0, 1.0 / (ng + 1e-6)))
        losses.append(lg)
    assert losses[-1] < losses[0] - 0.5, losses
    for k in ("m", "v"):  # the optimizer states followed each other too
        assert rel(gpu_opt.state_dict()[k], cpu_opt.state_dict()[k]) < 50 * tol, k
    print(f"{dtype}: worst loss rel err over 20 steps {worst:.2e}")


@pytest.mark.parametrize("arch", ["gpt2", "modern", "gemma", "neox"])
def test_fp32_gradients_match_cpu_per_tensor(arch):
    """One forward/backward in float32: every gradient tensor, by name (finds a miswired backward fast)."""
    options = {"gpt2": {}, "modern": MODERN_OPTIONS, "gemma": GEMMA_OPTIONS, "neox": NEOX_OPTIONS}[arch]
    cpu = GPT(small_config(**options), seed=1)
    gpu = on_gpu(cpu)
    x, y = learnable_batches(1, B=3, T=97, seed=1)[0]  # odd T
    y[0, :5] = -1  # ignored targets
    cpu.zero_grad()
    gpu.zero_grad()
    lc, lg = cpu.forward(x, y), gpu.forward(x, y)
    assert abs(lg - lc) / lc < 1e-3, (lg, lc)
    np.testing.assert_allclose(gpu.token_losses, cpu.token_losses, rtol=2e-3, atol=2e-3)
    cpu.backward()
    gpu.backward()
    bad = {k: f"{v:.2e}" for k, v in grads_rel_err(gpu, cpu).items() if not v < 5e-3}
    assert not bad, f"gradients off (rel err): {bad}"


def test_weighted_ce_and_hidden_state_gradients_match_cpu():
    """What GRPO and the reward model use: forward(..., weights=) (per-row weighted CE) and
    hidden_states + backward(dhidden), every gradient tensor against the CPU."""
    cpu = GPT(small_config(), seed=5)
    gpu = on_gpu(cpu)
    rng = np.random.default_rng(5)
    x, y = learnable_batches(1, B=2, T=40, seed=5)[0]
    y[1, :10] = -1
    w = rng.standard_normal((2, 40)).astype(np.float32)
    for model in (cpu, gpu):
        model.zero_grad()
        model.forward(x, y, weights=w)
        model.backward()
    np.testing.assert_allclose(gpu.token_losses, cpu.token_losses, rtol=2e-3, atol=2e-3)
    bad = {k: f"{v:.2e}" for k, v in grads_rel_err(gpu, cpu).items() if not v < 5e-3}
    assert not bad, f"weighted-CE gradients off (rel err): {bad}"

    dh = rng.standard_normal((2, 40, 128)).astype(np.float32)
    for model in (cpu, gpu):
        model.zero_grad()
        h = model.hidden_states(x)
        model.backward(dhidden=dh)
    assert rel(gpu.hidden_states(x), cpu.hidden_states(x)) < 2e-3
    errs = grads_rel_err(gpu, cpu)
    bad = {k: f"{v:.2e}" for k, v in errs.items() if not v < 5e-3}
    assert not bad and h.shape == (2, 40, 128), f"hidden-state gradients off (rel err): {bad}"


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_grpo_step_matches_cpu(T):
    """One GRPO policy update (weighted CE through the fused lm-head, AdamW) on both devices, at sampling
    temperature T (the log-probs and their gradient of softmax(logits / T))."""
    from fastllm.rl import Batch, policy_backward, token_logprobs

    cpu = GPT(small_config(), seed=6)
    gpu = on_gpu(cpu)
    x, _ = learnable_batches(1, B=4, T=24, seed=6)[0]
    targets = np.full_like(x, -1)
    targets[:, 8:] = x[:, 8:]  # "completions": the last 16 tokens of each row
    batch = Batch(x.astype(np.int32), targets.astype(np.int32), targets != -1, np.full(4, 16.0),
                  np.array([1.0, -1.0, 0.5, -0.5]))
    stats = []
    for model in (cpu, gpu):
        old = token_logprobs(model, batch.idx, batch.targets, temperature=T)
        model.zero_grad()
        stats.append(policy_backward(model, batch, old, old - 0.01, clip_eps=0.2, beta=0.04, temperature=T))
        AdamW(model, lr=1e-3).step()
    assert abs(stats[1]["loss"] - stats[0]["loss"]) < 1e-3 * max(1.0, abs(stats[0]["loss"])), stats
    assert rel(gpu.state_dict()["wte"], cpu.state_dict()["wte"]) < 1e-3


def test_eval_logits_match_cpu():
    cpu = GPT(small_config(), seed=2).eval()
    gpu = on_gpu(cpu).eval()
    x, _ = learnable_batches(1, B=2, T=33)[0]
    err = rel(gpu.forward(x), cpu.forward(x))
    assert err < 2e-3, f"logits rel err {err:.2e}"


def test_to_moves_between_devices():
    model = GPT(small_config(), seed=3)
    ref = {k: v.copy() for k, v in model.state_dict().items()}
    model.to("cuda", "bfloat16")
    assert model.device == "cuda" and model.dtype == "bfloat16"
    model.to("cpu")
    assert model.device == "cpu" and isinstance(model.params, np.ndarray)
    for k, v in model.state_dict().items():  # the float32 master weights survive the trip exactly
        np.testing.assert_array_equal(v, ref[k], err_msg=k)


@pytest.mark.gpu_scale
def test_gpt2_124m_training_step():
    """GPT-2 124M, B=16, T=1024, bf16: a full step runs, the loss starts near ln(V) and stays finite."""
    cfg = GPTConfig.preset("gpt2", vocab_size=50257)
    gpu = GPT(cfg, seed=0, device="cuda")
    opt = AdamW(gpu, lr=6e-4)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 50257, (16, 1024))
    y = np.roll(x, -1, 1)
    for _ in range(2):
        gpu.zero_grad()
        loss = gpu.forward(x, y)
        assert math.isfinite(loss) and abs(loss - math.log(50257)) < 1.0, loss
        gpu.backward()
        norm = gpu.grad_norm()
        assert math.isfinite(norm) and norm > 0, norm
        opt.step(grad_scale=min(1.0, 1.0 / (norm + 1e-6)))
    assert np.isfinite(gpu.token_losses).all()


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_generate_fp32_equals_cpu_greedy(arch):
    cpu = GPT(small_config(**(MODERN_OPTIONS if arch == "modern" else {})), seed=4).eval()
    cpu.params *= 3.0  # sharper logits: greedy does not hinge on near-ties
    gpu = on_gpu(cpu).eval()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9], [11, 12, 13]]
    err = rel(gpu.kv_cache(3).prefill(prompts), cpu.kv_cache(3).prefill(prompts))
    assert err < 2e-3, f"prefill logits rel err {err:.2e}"
    assert_same_greedy(cpu, prompts, generate(gpu, prompts, 12, temperature=0), 12)
    bf16 = on_gpu(cpu, "bfloat16").eval()
    out = bf16.generate(prompts, 12, temperature=0)
    assert [len(r) for r in out] == [19, 13, 15]


def assert_same_greedy(cpu, prompts, got, n):
    """got (GPU greedy) equals the CPU's greedy continuation, except after a near-tie: at the first token where
    they part, the CPU logit of the GPU's pick must be within 1e-2 (relative) of the CPU's best."""
    want = generate(cpu, prompts, n, temperature=0)
    for row, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w), (row, g, w)
        if g == w:
            continue
        i = next(k for k in range(len(g)) if g[k] != w[k])
        logits = cpu.forward(np.array([g[:i]]))[0, -1]
        gap = float(logits[w[i]] - logits[g[i]])
        assert gap <= 1e-2 * float(np.abs(logits).max()), f"row {row} token {i}: GPU chose {g[i]}, CPU {w[i]}, " \
            f"logit gap {gap:.3g} is no near-tie"


def make_checkpoint(tmp_path, n_embd: int = 32, n_head: int = 2):
    """A checkpoint folder with a small random model (sharp logits) and a byte-level tokenizer."""
    from fastllm.checkpoint import TOKENIZER_FILE, save
    from fastllm.tokenizer import Tokenizer

    tok = Tokenizer.train(["the cat sat on the mat, the dog ate the hat. " * 20], 300, pattern="gpt4",
                          special_tokens=[], progress=False)
    (tmp_path / "tok").mkdir()
    tok.save(tmp_path / "tok" / TOKENIZER_FILE)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=2, n_head=n_head, n_embd=n_embd), seed=0)
    model.params *= 4.0
    tok_file = tmp_path / "tok" / TOKENIZER_FILE
    return save(tmp_path / "run", 0, model, AdamW(model), {}, kind="train", tokenizer=tok_file)


def test_sample_cli_cuda_equals_cpu(tmp_path, capsys):
    from fastllm.cli import main

    ckpt = make_checkpoint(tmp_path, n_embd=128, n_head=2)
    outs = []
    for dev in ("cpu", "cuda"):
        assert main(["sample", "--ckpt", str(ckpt), "--prompt", "the ", "-n", "8", "--temperature", "0",
                     "--device", dev, "--dtype", "float32"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1], outs


def test_train_cli_on_cuda(tmp_path):
    pytest.importorskip("tqdm")  # train() draws a progress bar (scripts/gpu_check.sh shims it if missing)
    from test_train import learnable_shards

    from fastllm.checkpoint import load_model
    from fastllm.cli import main

    (tmp_path / "data").mkdir()
    learnable_shards(tmp_path / "data")
    args = ["train", "--no-progress", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--model",
            "tiny", "--n-embd", "128", "--n-head", "2", "--batch-size", "4", "--seq-len", "32", "--max-steps", "30",
            "--lr", "3e-3", "--warmup-steps", "5", "--eval-every", "10", "--eval-batches", "2", "--ckpt-every", "10",
            "--device", "cuda"]
    assert main(args) == 0
    assert load_model(tmp_path / "out").checkpoint_dir.name == "ckpt_000030"
    assert main(args[:-2] + ["--max-steps", "35", "--resume", "--device", "cuda"]) == 0
    assert load_model(tmp_path / "out").checkpoint_dir.name == "ckpt_000035"
