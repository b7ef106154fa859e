"""DPO (fastllm.dpo): the losses and their derivatives against torch autograd; the model's gradient against PyTorch
autograd through tests/torch_gpt.py (every loss, a GPT-2 and a Llama-style model); training that makes a warmed-up
model prefer correct sums on held-out pairs (full and LoRA), logging, checkpoints and a bit-identical resume; the
CLI and its refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from test_model_arch import make, rel_err
from test_rl import warm  # noqa: F401 (a fixture: a tiny model warmed up on one-digit additions)
from tiny import byte_tokenizer, one_thread  # noqa: F401 (one_thread: a fixture)

from fastllm import GPT
from fastllm.checkpoint import load_model
from fastllm.cli import main
from fastllm.dpo import DPOConfig, Pairs, dpo_backward, dpo_terms, encode_pairs, train_dpo
from fastllm.rl import addition_preferences

torch = pytest.importorskip("torch")

SETTINGS = [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)]


@pytest.mark.parametrize("loss,eps", SETTINGS)
def test_terms_match_torch(loss, eps):
    rng = np.random.default_rng(0)
    pc, pr, rc, rr = (rng.normal(-20, 5, 64) for _ in range(4))
    beta = 0.3
    tc, tr = torch.tensor(pc, requires_grad=True), torch.tensor(pr, requires_grad=True)
    h = (tc - torch.tensor(rc)) - (tr - torch.tensor(rr))
    if loss == "sigmoid":
        want = -(1 - eps) * torch.nn.functional.logsigmoid(beta * h) - eps * torch.nn.functional.logsigmoid(-beta * h)
    elif loss == "ipo":
        want = (h - 1 / (2 * beta)) ** 2
    else:
        want = torch.relu(1 - beta * h)
    want.sum().backward()
    losses, dc, dr = dpo_terms(pc, pr, rc, rr, beta, loss, eps)
    np.testing.assert_allclose(losses, want.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dc, tc.grad.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dr, tr.grad.numpy(), rtol=1e-12, atol=1e-12)


def random_pairs(V: int, n: int, T: int, seed: int = 0) -> Pairs:
    """n pairs of random tokens: prompts of 2-5 tokens, answers of 1 to T - prompt tokens."""
    rng = np.random.default_rng(seed)
    seqs, start = [], []
    for _ in range(n):
        p = list(rng.integers(0, V, rng.integers(2, 6)))
        for _ in range(2):
            seqs.append(p + list(rng.integers(0, V, rng.integers(1, T + 1 - len(p)))))
            start.append(len(p))
    return Pairs(seqs, start)


@pytest.mark.parametrize("loss,eps", SETTINGS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gradient_matches_torch(arch, loss, eps):
    import torch_gpt

    model = make(arch)
    cfg = DPOConfig(base="x", data="x", beta=0.5, loss=loss, label_smoothing=eps)
    pairs = random_pairs(model.config.vocab_size, 3, model.config.block_size)
    idx, tgt = pairs.batch(range(3))
    ref = np.random.default_rng(1).normal(-30, 3, 6) / (10 if loss == "ipo" else 1)
    model.zero_grad()
    stats = dpo_backward(model, idx, tgt, ref, cfg)
    fwd, params = torch_gpt.build(model)
    logits = fwd(idx)
    t = torch.tensor(tgt, dtype=torch.int64)
    mask = t != -1
    lp = torch.log_softmax(logits, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0] * mask
    seq = lp.sum(1) / (mask.sum(1) if loss == "ipo" else 1)
    h = (seq[0::2] - torch.tensor(ref[0::2])) - (seq[1::2] - torch.tensor(ref[1::2]))
    if loss == "sigmoid":
        L = -(1 - eps) * torch.nn.functional.logsigmoid(0.5 * h) - eps * torch.nn.functional.logsigmoid(-0.5 * h)
    elif loss == "ipo":
        L = (h - 1.0) ** 2
    else:
        L = torch.relu(1 - 0.5 * h)
    L.mean().backward()
    assert stats["loss"] == pytest.approx(float(L.mean()), rel=1e-4)
    for name, p in params.items():
        assert rel_err(model.g[name], p.grad.numpy()) < 2e-4, name


def test_encoding_masks_the_prompt_and_ends_the_answer():
    tok = byte_tokenizer()
    model = make("gpt2", vocab_size=257, block_size=12)
    pairs = encode_pairs([{"prompt": "1+2=", "chosen": "3", "rejected": "456789101112"}], model, tok)
    assert pairs.seqs[0] == [*b"1+2=3", tok.eot_token] and pairs.start == [4, 4]
    assert len(pairs.seqs[1]) == 13 and pairs.truncated == 1  # cut to the context (12 inputs + the last target)
    idx, tgt = pairs.batch([0])
    assert idx.shape == tgt.shape == (2, 12)
    assert list(tgt[0]) == [-1, -1, -1, ord("3"), tok.eot_token] + [-1] * 7
    with pytest.raises(ValueError, match="leaves no room"):
        encode_pairs([{"prompt": "1" * 12, "chosen": "3", "rejected": "4"}], model, tok)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dpo_prefers_correct_sums_on_held_out_pairs(warm, tmp_path, lora):  # noqa: F811 (the fixture)
    ck, _, _ = warm
    pairs = addition_preferences(600, 1, seed=5)  # (each of the 100 prompts in ~6 pairs: held-out pairs ask known
    # sums with other wrong answers; a tiny model does not generalise addition to sums it never saw)
    kw = dict(base=str(ck), data="(given)", out=str(tmp_path / "dpo"), batch_size=32, epochs=3, beta=0.5,
              lr=3e-3 if lora else 1e-3, eval_every=15, val_fraction=0.2, threads=1,
              **(dict(lora_r=8, lora_alpha=16) if lora else {}))
    s = train_dpo(DPOConfig(**kw), pairs=pairs, progress=False, log=lambda *a: None)
    print(f"\nDPO ({'LoRA' if lora else 'full'}): held-out accuracy {s['val_accuracy_start']:.3f} -> "
          f"{s['val_accuracy']:.3f}, margin {s['val_margin_start']:.3f} -> {s['val_margin']:.3f}")
    assert s["val_margin_start"] == pytest.approx(0.0, abs=1e-9)  # the policy starts as the reference
    assert s["val_accuracy"] >= 0.75 and s["val_margin"] > 0.3
    rows = [json.loads(x) for x in (tmp_path / "dpo" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(s["steps"]))
    assert all(k in steps[0] for k in ("chosen_reward", "rejected_reward", "margin", "accuracy", "grad_norm"))
    assert (tmp_path / "dpo" / "loss.png").exists() and json.loads((tmp_path / "dpo" / "dpo.json").read_text())
    tuned = load_model(s["checkpoint"])
    assert (tuned.lora is not None) == lora


def test_resume_is_bit_identical(warm, tmp_path):  # noqa: F811 (the fixture)
    """A run cut after its checkpoint at step 3 and resumed ends where the straight run ends (the reference
    log-probs computed again from the starting model, the pairs' order restored)."""
    ck, _, _ = warm
    pairs = addition_preferences(60, 1, seed=6)
    kw = dict(base=str(ck), data="(given)", batch_size=8, epochs=1, lr=1e-3, eval_every=3, val_fraction=0.2,
              ckpt_every=3, threads=1)
    a = train_dpo(DPOConfig(out=str(tmp_path / "a"), **kw), pairs=pairs, progress=False, log=lambda *a: None)
    (tmp_path / "b").mkdir()
    shutil.copytree(tmp_path / "a" / "ckpt_000003", tmp_path / "b" / "ckpt_000003")
    b = train_dpo(DPOConfig(out=str(tmp_path / "b"), resume=True, **kw), pairs=pairs, progress=False,
                  log=lambda *a: None)
    assert b["steps"] == a["steps"] == 6
    np.testing.assert_array_equal(load_model(a["checkpoint"]).params, load_model(b["checkpoint"]).params)


def test_cli_and_bad_values(warm, tmp_path, capsys):  # noqa: F811 (the fixture)
    ck, _, _ = warm
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in addition_preferences(20, 1)))
    args = ["dpo", "--base", str(ck), "--data", str(tmp_path / "prefs.jsonl"), "--out", str(tmp_path / "o"),
            "--batch-size", "4", "--lr", "1e-3", "--eval-every", "2", "--threads", "1", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "DPO steps on 18 pairs" in out and "held-out accuracy" in out
    for extra, msg in [(["--beta", "0"], "beta"), (["--label-smoothing", "0.5"], "label_smoothing"),
                       (["--loss", "ipo", "--label-smoothing", "0.1"], "label_smoothing is for the sigmoid"),
                       (["--val-fraction", "0.99"], "too few")]:
        assert main(args + extra) == 1
        assert msg in capsys.readouterr().err


@pytest.mark.cuda
def test_gradient_on_the_gpu_equals_the_cpus():
    """dpo_backward on the CUDA backend (float32): the forward's weights from its own token losses there too."""
    cfg = DPOConfig(base="x", data="x", beta=0.5)
    cpu = make("llama")
    gpu = GPT(cpu.config, init=False, device="cuda", dtype="float32").load_state_dict(cpu.state_dict())
    pairs = random_pairs(cpu.config.vocab_size, 3, cpu.config.block_size)
    idx, tgt = pairs.batch(range(3))
    ref = np.random.default_rng(1).normal(-30, 3, 6)
    stats = []
    for m in (cpu, gpu):
        m.zero_grad()
        stats.append(dpo_backward(m, idx, tgt, ref, cfg))
    assert stats[1]["loss"] == pytest.approx(stats[0]["loss"], rel=1e-5)
    for name, g in cpu.g.items():
        assert rel_err(gpu.bk.to_numpy(gpu.g[name]), g) < 1e-4, name
