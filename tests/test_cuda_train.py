"""The training loop on device="cuda" (a GPU, or the CUDA emulator in CI; marked cuda): pre-training, the reward model
and GRPO run through fastllm.train.fit on the GPU model, match the same runs on the CPU (float32: ~2e-3 relative,
the GPU's fp32 GEMM path), and a GPU checkpoint resumes on the CPU. Tiny models: the emulator is slow."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_train import learnable_shards

from fastllm.checkpoint import load_model, save
from fastllm.cli import main
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW
from fastllm.rl import RewardModel, RewardModelConfig, addition_preferences, train_reward_model
from fastllm.tokenizer import Tokenizer
from fastllm.train import TrainConfig, train

pytestmark = pytest.mark.cuda
QUIET = dict(progress=False, log=lambda *a: None)


def rows(out, key):
    return [(r["step"], r[key]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if key in r]


def test_pretraining_on_cuda_matches_cpu_and_resumes_on_cpu(tmp_path):
    (tmp_path / "data").mkdir()
    learnable_shards(tmp_path / "data")

    def cfg(out, **kw):
        return TrainConfig(**{**dict(data=str(tmp_path / "data"), out=str(tmp_path / out), model="tiny", batch_size=4,
                                     seq_len=16, max_steps=4, lr=3e-3, warmup_steps=2, eval_every=2, eval_batches=2,
                                     ckpt_every=2, total_batch_tokens=128), **kw})

    train(cfg("cpu"), **QUIET)
    train(cfg("gpu", device="cuda", dtype="float32"), **QUIET)
    for key in ("loss", "grad_norm", "val_loss"):
        (cs, cv), (gs, gv) = zip(*rows(tmp_path / "cpu", key)), zip(*rows(tmp_path / "gpu", key))
        assert cs == gs
        np.testing.assert_allclose(gv, cv, rtol=2e-3, err_msg=key)
    on_cpu = load_model(tmp_path / "gpu")  # a GPU checkpoint holds float32 host tensors like a CPU one
    np.testing.assert_allclose(on_cpu.params, load_model(tmp_path / "cpu").params, rtol=1e-2, atol=1e-4)
    train(cfg("gpu", max_steps=5, resume=True), **QUIET)  # and resumes on the CPU
    assert load_model(tmp_path / "gpu").checkpoint_dir.name == "ckpt_000005"
    assert [s for s, _ in rows(tmp_path / "gpu", "loss")] == list(range(5))


@pytest.fixture
def small_ckpt(tmp_path):
    """A tiny byte-level GPT checkpoint with its tokenizer (random weights: the loops, not learning, are tested)."""
    tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|endoftext|>": 256})
    tok.save(tmp_path / "tok.tiktoken")
    model = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=2, n_embd=64), seed=0)
    return save(tmp_path / "base", 0, model, AdamW(model), {}, kind="train", tokenizer=tmp_path / "tok.tiktoken")


def test_reward_model_on_cuda_matches_cpu(small_ckpt, tmp_path):
    pairs, val = addition_preferences(32, 1, seed=0), addition_preferences(8, 1, seed=1)
    out = {}
    for dev in ("cpu", "cuda"):
        cfg = RewardModelConfig(base=str(small_ckpt), data="", out=str(tmp_path / dev), epochs=1, batch_size=16,
                                lr=1e-3, eval_every=1, device=dev, dtype="float32")
        out[dev] = train_reward_model(cfg, pairs=pairs, val_pairs=val, **QUIET)
    for key in ("loss", "grad_norm", "val_accuracy"):
        np.testing.assert_allclose([v for _, v in rows(tmp_path / "cuda", key)],
                                   [v for _, v in rows(tmp_path / "cpu", key)], rtol=2e-3, atol=1e-6, err_msg=key)
    heads = [RewardModel.load(tmp_path / d).head for d in ("cpu", "cuda")]
    np.testing.assert_allclose(heads[1], heads[0], rtol=1e-2, atol=1e-5)


def test_grpo_cli_on_cuda_then_resume_on_cpu(small_ckpt, tmp_path):
    args = ["rl", "--ckpt", str(small_ckpt), "--out", str(tmp_path / "rl"), "--digits", "1", "--prompts-per-step",
            "2", "--group-size", "2", "--max-new-tokens", "3", "--eval-every", "2", "--eval-prompts", "4",
            "--no-progress"]
    assert main([*args, "--steps", "2", "--device", "cuda", "--dtype", "float32"]) == 0
    assert main([*args, "--steps", "3", "--resume"]) == 0
    assert load_model(tmp_path / "rl").checkpoint_dir.name == "ckpt_000003"
    assert [s for s, _ in rows(tmp_path / "rl", "reward")] == [0, 1, 2]


def test_bf16_pretraining_resumed_on_cuda_equals_an_uninterrupted_run(tmp_path):
    """A bf16 GPU run resumed from its step-2 checkpoint: the same losses and the same final weights, bit for bit
    (head size 16: the GPU's simple attention kernels, deterministic)."""
    import shutil

    (tmp_path / "data").mkdir()
    learnable_shards(tmp_path / "data")

    def cfg(out, **kw):
        return TrainConfig(**{**dict(data=str(tmp_path / "data"), out=str(tmp_path / out), model="tiny", batch_size=4,
                                     seq_len=16, max_steps=4, lr=3e-3, warmup_steps=2, eval_every=2, eval_batches=2,
                                     ckpt_every=2, total_batch_tokens=128, device="cuda"), **kw})

    train(cfg("full"), **QUIET)
    shutil.copytree(tmp_path / "full", tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "ckpt_000004")
    (tmp_path / "part" / "latest").write_text("ckpt_000002\n")
    train(cfg("part", resume=True), **QUIET)
    for key in ("loss", "grad_norm", "val_loss"):
        assert rows(tmp_path / "part", key) == rows(tmp_path / "full", key), key
    np.testing.assert_array_equal(load_model(tmp_path / "part").params, load_model(tmp_path / "full").params)
