"""RL post-training (fastllm.rl): GRPO math against numpy on hand-made numbers, the weighted-CE kernel and the
policy-gradient / reward-model gradients against torch autograd, end to end on a tiny model (a short GRPO run
raises greedy accuracy on prompts that neither the warm-up nor GRPO saw; a reward model learns to prefer correct
sums), checkpoints + resume, the CLI, and bad input."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from tiny import EOT, byte_tokenizer, one_thread  # noqa: F401 (one_thread: a fixture, one OpenMP thread per test)

import fastllm
from fastllm import ops
from fastllm.checkpoint import load_model, save
from fastllm.cli import main
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW
from fastllm.rl import (
    GRPO,
    AdditionTask,
    RewardError,
    RewardModel,
    RewardModelConfig,
    RLConfig,
    SortTask,
    addition_preferences,
    evaluate,
    group_advantages,
    grpo_token_terms,
    load_preferences,
    pack,
    policy_backward,
    sample_completions,
    score,
    token_logprobs,
    train_grpo,
    train_reward_model,
)

# ---- GRPO math vs numpy on hand-made numbers ---------------------------------------------------------------


def test_group_advantages_hand_made():
    r = np.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [2.0, 0.0, 1.0, 1.0]])
    a = group_advantages(r, eps=0.0 + 1e-12)
    np.testing.assert_allclose(a[0], np.array([1, -1, -1, 1]) * math.sqrt(3) / 2, atol=1e-9)  # sample std 1/sqrt(3)
    np.testing.assert_array_equal(a[1], 0.0)  # no signal in a group of equal rewards
    np.testing.assert_allclose(a[2], np.array([1, -1, 0, 0]) * math.sqrt(1.5), atol=1e-9)  # sample std sqrt(2/3)
    eps = 0.1  # TRL's GRPOTrainer: (r - mean) / (torch std, unbiased, + eps) per group
    torch = pytest.importorskip("torch")
    t = torch.tensor(r)
    ref = (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + eps)
    np.testing.assert_allclose(group_advantages(r, eps), ref.numpy())
    for bad in ([1.0, 2.0], [[1.0], [2.0]]):
        with pytest.raises(ValueError, match="rewards"):
            group_advantages(bad)


def test_grpo_token_terms_clip_and_kl_hand_made():
    eps, beta = 0.2, 0.5
    old = np.log(np.full(6, 0.5))
    rho = np.array([1.0, 1.5, 1.5, 0.5, 0.5, 1.1])  # ratios p / p_old
    adv = np.array([1.0, 1.0, -1.0, 1.0, -1.0, -2.0])
    logp = old + np.log(rho)
    ref = logp + np.array([0.0, 0.1, -0.2, 0.3, 0.0, -0.5])  # ref - logp = d
    J, dJ, kl, clipped = grpo_token_terms(logp, old, ref, adv, eps, beta)
    d = ref - logp
    # surrogate min(rho A, clip(rho) A), written out per case
    surr = np.array([1.0, 1.2, -1.5, 0.5, -0.8, -2.2])
    np.testing.assert_allclose(J, surr - beta * (np.exp(d) - d - 1), atol=1e-12)
    np.testing.assert_array_equal(clipped, [False, True, False, False, True, False])
    # gradient: rho A where the unclipped term is selected, 0 where the clip holds it constant
    dsurr = np.array([1.0, 0.0, -1.5, 0.5, 0.0, -2.2])
    np.testing.assert_allclose(dJ, dsurr - beta * (1 - np.exp(d)), atol=1e-12)
    np.testing.assert_allclose(kl[0], 0.0, atol=1e-15)
    assert (kl >= 0).all()
    # dJ is the derivative of J (finite differences away from the clip boundaries)
    h = 1e-6
    Jp = grpo_token_terms(logp + h, old, ref, adv, eps, beta)[0]
    Jm = grpo_token_terms(logp - h, old, ref, adv, eps, beta)[0]
    np.testing.assert_allclose((Jp - Jm) / (2 * h), dJ, atol=1e-6)


# ---- weighted cross-entropy kernel vs torch ------------------------------------------------------------------


@pytest.mark.parametrize("N,C,V,chunk", [(1, 1, 1, 1), (7, 5, 3, 4), (37, 24, 53, 8), (64, 16, 257, 256)])
def test_weighted_ce_gradient_vs_torch(N, C, V, chunk, threads):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(N)
    h = rng.standard_normal((N, C)).astype(np.float32)
    W = (rng.standard_normal((V, C)) * 0.5).astype(np.float32)
    t = rng.integers(0, V, N)
    t[::5] = -1  # ignored rows: no gradient whatever their weight
    w = rng.standard_normal(N).astype(np.float32)
    w[1::4] = 0.0
    scratch = np.empty((chunk, W.shape[0]), np.float32)
    losses, dh, dW = ops.lmhead_ce(h, W, t, grad_scale=0.5, row_weights=w, scratch=scratch)
    ht = torch.tensor(h, dtype=torch.float64, requires_grad=True)
    Wt = torch.tensor(W, dtype=torch.float64, requires_grad=True)
    ce = torch.nn.functional.cross_entropy(ht @ Wt.T, torch.tensor(t), ignore_index=-1, reduction="none")
    (0.5 * (ce * torch.tensor(w, dtype=torch.float64)).sum()).backward()
    np.testing.assert_allclose(losses, ce.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(dh, ht.grad.numpy(), atol=1e-5)
    np.testing.assert_allclose(dW, Wt.grad.numpy(), atol=1e-5)
    # the unfused kernel: dlogits row n scaled by grad_scale * w[n]
    logits = (h @ W.T).astype(np.float32)
    l2, dl = ops.softmax_ce(logits, t, grad_scale=0.5, row_weights=w)
    lt = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    ce2 = torch.nn.functional.cross_entropy(lt, torch.tensor(t), ignore_index=-1, reduction="none")
    (0.5 * (ce2 * torch.tensor(w, dtype=torch.float64)).sum()).backward()
    np.testing.assert_allclose(l2, ce2.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(dl, lt.grad.numpy(), atol=1e-6)


def test_weighted_ce_bad_row_weights():
    logits = np.zeros((4, 5), np.float32)
    t = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="row_weights"):
        ops.softmax_ce(logits, t, row_weights=np.ones(3, np.float32))
    with pytest.raises(TypeError, match="row_weights"):
        ops.softmax_ce(logits, t, row_weights=np.ones(4, np.float64))
    with pytest.raises(ValueError, match="row_weights"):
        fastllm._C.lmhead_ce(
            np.empty(4, np.float32),
            None,
            None,
            np.zeros((4, 2), np.float32),
            np.zeros((5, 2), np.float32),
            np.zeros(4, np.int32),
            1.0,
            -1,
            np.empty((2, 5), np.float32),
            np.ones(5, np.float32),
        )


def test_forward_weights_uniform_equals_mean_loss():
    m = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8), seed=0)
    rng = np.random.default_rng(0)
    idx, tg = rng.integers(0, 11, (3, 8)), rng.integers(0, 11, (3, 8))
    tg[0, :3] = -1
    m.zero_grad()
    loss = m.forward(idx, tg)
    m.backward()
    g = m.grads.copy()
    lp = -m.token_losses
    m.zero_grad()
    n = np.count_nonzero(tg != -1)
    wsum = m.forward(idx, tg, weights=np.full((3, 8), 1.0 / n))
    m.backward()
    assert wsum == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(m.grads, g, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(-m.token_losses, lp)
    assert (m.token_losses[tg == -1] == 0).all()
    with pytest.raises(ValueError, match="weights"):
        m.forward(idx, tg, weights=np.ones((3, 7)))
    with pytest.raises(ValueError, match="weights"):
        m.forward(idx, tg, weights=np.full((3, 8), np.nan))


# ---- gradients of the GRPO loss and of the reward model vs torch -------------------------------------------


# GPT-2, and the modern options together (rope, rmsnorm, MQA, QK-norm, swiglu, no biases, untied, soft-capped)
ARCHS = {"gpt2": {}, "modern": dict(positions="rope", norm="rmsnorm", n_kv_head=1, qk_norm=True, mlp="swiglu",
                                    qkv_bias=False, proj_bias=False, mlp_bias=False, tie_embeddings=False,
                                    logit_softcap=10.0)}


@pytest.mark.parametrize("T", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("arch", ARCHS)
def test_policy_gradient_matches_torch_reference(arch, T):
    """The GRPO loss at sampling temperature T (log-probs log_softmax(logits / T), the logits soft-capped first in
    the modern architecture, as TRL computes them) and its gradient for every parameter, against torch autograd."""
    torch = pytest.importorskip("torch")
    from torch_gpt import build

    rng = np.random.default_rng(0)
    V = 29
    m = GPT(GPTConfig(block_size=16, vocab_size=V, n_layer=2, n_head=2, n_embd=16, **ARCHS[arch]), seed=1)
    prompts = [list(rng.integers(0, V, rng.integers(1, 5))) for _ in range(6)]
    comps = [list(rng.integers(0, V, rng.integers(1, 6))) for _ in range(6)]
    adv = rng.standard_normal(6)
    b = pack(prompts, comps, adv)
    assert b.mask.sum() == sum(map(len, comps))
    logp = token_logprobs(m, b.idx, b.targets, temperature=T)
    # an old policy and a reference that differ from the current one, so clipping and KL both act
    old = logp + rng.normal(0, 0.3, logp.shape) * b.mask
    ref = logp + rng.normal(0, 0.5, logp.shape) * b.mask
    eps, beta = 0.2, 0.1
    m.zero_grad()
    st = policy_backward(m, b, old, ref, eps, beta, temperature=T)
    assert 0 < st["clip_frac"] < 1 and st["kl"] > 0

    fwd, params = build(m)
    lp = torch.log_softmax(fwd(b.idx).double() / T, -1)  # TRL: selective_log_softmax(logits / temperature)
    tg = torch.tensor(b.targets.astype(np.int64))
    lp = lp.gather(-1, tg.clamp(min=0)[..., None])[..., 0]
    np.testing.assert_allclose(logp[b.mask], lp.detach().numpy()[b.mask], atol=1e-5)
    rho = torch.exp(lp - torch.tensor(old))
    A = torch.tensor(adv)[:, None]
    d = torch.tensor(ref) - lp
    J = torch.minimum(rho * A, rho.clamp(1 - eps, 1 + eps) * A) - beta * (torch.exp(d) - d - 1)
    lens = torch.tensor(b.lengths)[:, None]
    loss = -(J * torch.tensor(b.mask) / (lens * len(comps))).sum()
    loss.backward()
    assert st["loss"] == pytest.approx(loss.item(), rel=1e-5)
    for k, v in params.items():
        np.testing.assert_allclose(
            m.g[k], v.grad.numpy(), atol=2e-6 * max(1.0, np.abs(v.grad.numpy()).max()), err_msg=k
        )


@pytest.mark.parametrize("arch", ARCHS)
def test_reward_model_gradient_matches_torch_reference(arch):
    torch = pytest.importorskip("torch")
    from torch_gpt import build

    tok = byte_tokenizer()
    m = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=2, n_head=2, n_embd=16, **ARCHS[arch]), seed=0)
    rm = RewardModel(m, np.random.default_rng(0).standard_normal(17).astype(np.float32))
    seqs = [rm.encode(tok, "3+4=", "7"), rm.encode(tok, "12+9=", "21"), [5, 6, 7, EOT], [9, EOT]]
    r = rm.forward(seqs)
    dr = np.array([0.3, -1.0, 0.5, 2.0])
    m.zero_grad()
    rm.backward(dr)
    fwd, params = build(m)
    idx, last = rm._batch(seqs)
    head = torch.tensor(rm.head, requires_grad=True)
    rt = fwd(idx, hidden=True)[torch.arange(4), torch.tensor(last)] @ head[:-1] + head[-1]
    (rt * torch.tensor(dr, dtype=torch.float32)).sum().backward()
    np.testing.assert_allclose(r, rt.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rm.head_grad, head.grad.numpy(), rtol=1e-5, atol=1e-5)
    for k, v in params.items():
        if v.grad is None:  # an untied lm-head: not on the reward model's path
            assert k == "lm_head.weight" and not m.g[k].any()
            continue
        np.testing.assert_allclose(
            m.g[k], v.grad.numpy(), atol=1e-6 * max(1.0, np.abs(v.grad.numpy()).max()), err_msg=k
        )
    with pytest.raises(ValueError, match="dhidden"):
        m.hidden_states(idx)
        m.backward(dhidden=np.zeros((1, 2, 16), np.float32))


# ---- end to end on a tiny model --------------------------------------------------------------------------------


ALL_PROMPTS = [f"{a}+{b}=" for a in range(10) for b in range(10)]


def sft_batch(tok, task, prompts):
    """Supervised warm-up batch: loss on the answer + <|endoftext|> only (targets -1 on the prompt)."""
    seqs = [list(tok.encode(p)) + list(tok.encode(task.answer(p))) + [EOT] for p in prompts]
    T = max(map(len, seqs)) - 1
    idx = np.full((len(seqs), T), EOT, np.int32)
    tg = np.full((len(seqs), T), -1, np.int32)
    for i, (s, p) in enumerate(zip(seqs, prompts)):
        idx[i, : len(s) - 1] = s[:-1]
        tg[i, len(p) - 1 : len(s) - 1] = s[len(p) :]
    return idx, tg


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """A tiny GPT warmed up (supervised) on 40 of the 100 one-digit additions, saved as a checkpoint with
    its tokenizer. Returns (checkpoint dir, the 40 warm-up prompts, the 60 others)."""
    fastllm.set_num_threads(1)
    d = tmp_path_factory.mktemp("warm")
    tok, task = byte_tokenizer(), AdditionTask(1)
    tok.save(d / "tok.tiktoken")
    rng = np.random.default_rng(3)
    perm = rng.permutation(100)
    sft = [ALL_PROMPTS[i] for i in perm[:40]]
    unseen = [ALL_PROMPTS[i] for i in perm[40:]]
    m = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=2, n_head=2, n_embd=64), seed=3)
    opt = AdamW(m, 3e-3, weight_decay=0.0)
    for _ in range(300):
        m.zero_grad()
        m.forward(*sft_batch(tok, task, [sft[i] for i in rng.integers(0, 40, 16)]))
        m.backward()
        opt.step()
    ck = save(d / "sft", 300, m, opt, {}, kind="sft", tokenizer=d / "tok.tiktoken")
    return ck, sft, unseen


def test_grpo_raises_addition_accuracy_beyond_the_warmup(warm):
    """GRPO samples prompts from ALL 100 one-digit additions, so the 60 evaluated here are unseen by the
    supervised warm-up only, not by GRPO: this measures GRPO filling in a memorised table (a tiny model does
    not generalise one-digit addition to facts it never saw; see the sort test below for truly held-out prompts).
    """
    ck, sft, unseen = warm
    tok, task = byte_tokenizer(), AdditionTask(1)
    model, ref = load_model(ck), load_model(ck)
    before = evaluate(model, tok, task, unseen, 4)
    before_sft = evaluate(model, tok, task, sft, 4)
    cfg = RLConfig(ckpt=str(ck), prompts_per_step=8, group_size=16, max_new_tokens=4, lr=5e-4, beta=0.01)
    g = GRPO(model, ref, tok, task, cfg, task)
    rng = np.random.default_rng(3)
    stats = [g.step([ALL_PROMPTS[i] for i in rng.integers(0, 100, 8)], seed=s) for s in range(200)]
    after = evaluate(model, tok, task, unseen, 4)
    after_sft = evaluate(model, tok, task, sft, 4)
    r0, r1 = np.mean([s["reward"] for s in stats[:20]]), np.mean([s["reward"] for s in stats[-20:]])
    print(
        f"\ngreedy accuracy on the 60 additions not in the warm-up: {before:.3f} -> {after:.3f}; "
        f"on the 40 warm-up ones: {before_sft:.3f} -> {after_sft:.3f}; mean reward {r0:.3f} -> {r1:.3f}; "
        f"final kl {stats[-1]['kl']:.4f}"
    )
    assert after >= before + 0.1
    assert r1 > r0
    assert all(math.isfinite(s["kl"]) and s["kl"] >= 0 for s in stats)


def sort_split(rng, digits: int = 4, n_eval_answers: int = 100, n_warm: int = 64):
    """Prompts of SortTask(digits), split by ANSWER (the sorted digits): evaluation prompts have one of
    `n_eval_answers` sorted answers that no warm-up or GRPO prompt has. Returns (warm-up, GRPO pool, eval 100)."""
    task = SortTask(digits)
    answers = ["".join(c) for c in itertools.combinations_with_replacement("0123456789", digits)]
    held_out = {answers[i] for i in rng.permutation(len(answers))[:n_eval_answers]}
    prompts = ["sort " + "".join(d) + "=" for d in itertools.product("0123456789", repeat=digits)]
    held = [p for p in prompts if task.answer(p) in held_out]
    train = [p for p in prompts if task.answer(p) not in held_out]
    train = [train[i] for i in rng.permutation(len(train))]
    return train[:n_warm], train[n_warm:], [held[i] for i in rng.choice(len(held), 100, replace=False)]


def sort_grpo_run(seed: int, n_warm: int = 64, warm_steps: int = 150, steps: int = 150, lr: float = 5e-4, beta=0.01):
    """Supervised warm-up on `n_warm` 4-digit lists, then `steps` GRPO steps on the pool of `sort_split`.
    Returns (held-out greedy accuracy before, after, mean reward of the first / last 20 steps, step stats)."""
    tok, task = byte_tokenizer(), SortTask(4)
    rng = np.random.default_rng(seed)
    warmup, pool, held = sort_split(rng, n_warm=n_warm)
    assert not {task.answer(p) for p in warmup + pool} & {task.answer(p) for p in held}
    m = GPT(GPTConfig(block_size=24, vocab_size=257, n_layer=2, n_head=2, n_embd=64), seed=seed)
    opt = AdamW(m, 3e-3, weight_decay=0.0)
    for _ in range(warm_steps):
        m.zero_grad()
        m.forward(*sft_batch(tok, task, [warmup[i] for i in rng.integers(0, len(warmup), 16)]))
        m.backward()
        opt.step()
    ref = GPT(m.config, init=False)
    ref.params[:] = m.params
    before, before_warm = evaluate(m, tok, task, held, 7), evaluate(m, tok, task, warmup, 7)
    cfg = RLConfig(ckpt="", prompts_per_step=8, group_size=16, max_new_tokens=7, lr=lr, beta=beta)
    g = GRPO(m, ref, tok, task, cfg, task)
    stats = [g.step([pool[i] for i in rng.integers(0, len(pool), 8)], seed=s) for s in range(steps)]
    after, after_warm = evaluate(m, tok, task, held, 7), evaluate(m, tok, task, warmup, 7)
    r0, r1 = np.mean([s["reward"] for s in stats[:20]]), np.mean([s["reward"] for s in stats[-20:]])
    print(
        f"\nseed {seed}: greedy accuracy on 100 held-out lists (answers unseen by warm-up and GRPO): "
        f"{before:.2f} -> {after:.2f}; on the {len(warmup)} warm-up lists {before_warm:.2f} -> {after_warm:.2f}; "
        f"mean reward {r0:.3f} -> {r1:.3f}; final kl {stats[-1]['kl']:.4f}"
    )
    return before, after, r0, r1, stats


@pytest.mark.parametrize("seed", [0, 1])
def test_grpo_raises_sort_accuracy_on_held_out_prompts(seed):
    """Sorting 4 digits generalises (count each digit, write them in order), unlike a table of additions. A
    tiny GPT is warmed up (supervised) on 64 lists only: it learns the format and memorises those, but gets
    about half of the evaluation lists right. GRPO then samples from ~9,000 other lists, and the greedy
    accuracy on 100 evaluation lists -- whose sorted answers neither the warm-up nor GRPO ever saw -- rises.
    Measured, seeds 0-7: 0.36->0.67, 0.58->0.79, 0.58->0.87, 0.46->0.83, 0.48->0.69, 0.47->0.78, 0.58->0.81,
    0.53->0.72 (gain +0.19 to +0.37); about 10 s per seed on one core."""
    before, after, r0, r1, stats = sort_grpo_run(seed)
    assert before < 0.65
    assert after >= before + 0.1
    assert r1 > r0
    assert all(math.isfinite(s["kl"]) and s["kl"] >= 0 for s in stats)


@pytest.mark.parametrize("lora", [False, True, "int8"], ids=["full", "lora", "lora-int8-base"])
def test_reward_model_prefers_correct_sums(warm, tmp_path, lora):
    """The backbone trained whole, or LoRA adapters on it (--lora-r: the head trains whole; checkpoints hold the
    adapters and the head), also over the backbone's matrices held in int8 (--base-weights)."""
    ck, _, _ = warm
    held = dict(base_weights=lora) if isinstance(lora, str) else {}
    cfg = RewardModelConfig(base=str(ck), data="", out=str(tmp_path / "rm"), epochs=10, lr=3e-3 if lora else 1e-3,
                            batch_size=32, **(dict(lora_r=8, lora_alpha=16, **held) if lora else {}))
    s = train_reward_model(
        cfg, pairs=addition_preferences(1500, 1, seed=0), val_pairs=addition_preferences(200, 1, seed=1), progress=False
    )
    print(
        f"\nreward model ({'LoRA' if lora else 'full'}) held-out accuracy {s['val_accuracy_start']:.3f} -> "
        f"{s['val_accuracy']:.3f} ({s['val_pairs']} pairs), train {s['train_accuracy']:.3f}"
    )
    assert s["val_accuracy"] >= 0.75
    rm = RewardModel.load(tmp_path / "rm")
    assert (rm.backbone.lora is not None) == bool(lora)
    np.testing.assert_array_equal(rm.head, s["model"].head)
    assert json.loads((tmp_path / "rm" / "reward_model.json").read_text())["val_accuracy"] == s["val_accuracy"]


# ---- training loop: log, checkpoints, resume; CLI ---------------------------------------------------------------


def test_train_grpo_log_checkpoints_and_resume_bit_identical(warm, tmp_path):
    ck, _, _ = warm
    kw = dict(
        ckpt=str(ck),
        task="addition",
        digits=1,
        prompts_per_step=2,
        group_size=4,
        max_new_tokens=4,
        lr=1e-3,
        eval_every=3,
        eval_prompts=8,
        ckpt_every=2,
    )
    s = train_grpo(RLConfig(out=str(tmp_path / "a"), steps=5, **kw), progress=False, log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == list(range(5))
    for key in ("reward", "kl", "completion_len", "accuracy", "loss", "clip_frac", "grad_norm"):
        assert all(key in r for r in steps), key
    assert [r["step"] for r in rows if "eval_accuracy" in r] == [0, 3, 5]
    assert Path(s["checkpoint"]).name == "ckpt_000005"
    # interrupted after 2 steps (checkpoint at 2), then resumed to 5: same parameters as the straight run
    train_grpo(RLConfig(out=str(tmp_path / "b"), steps=2, **kw), progress=False, log=lambda *_: None)
    s2 = train_grpo(RLConfig(out=str(tmp_path / "b"), steps=5, resume=True, **kw), progress=False, log=lambda *_: None)
    np.testing.assert_array_equal(load_model(s["checkpoint"]).params, load_model(s2["checkpoint"]).params)
    rows_b = [json.loads(x) for x in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b if "reward" in r] == list(range(5))


def test_grpo_and_reward_model_in_cpu_bf16_follow_fp32(warm, tmp_path):
    """--dtype bfloat16 on the CPU (bf16 matmuls, fp32 master weights) for GRPO and the reward model: the same steps,
    logged like fp32's, with losses within bf16 noise of the fp32 runs."""
    ck, _, _ = warm
    kw = dict(ckpt=str(ck), task="addition", digits=1, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-3,
              eval_every=3, eval_prompts=8, steps=3)
    logs = {}
    for dt in ("float32", "bfloat16"):
        train_grpo(RLConfig(out=str(tmp_path / dt), dtype=dt, **kw), progress=False, log=lambda *_: None)
        cfg = RewardModelConfig(base=str(ck), data="", out=str(tmp_path / f"rm_{dt}"), epochs=1, batch_size=16,
                                lr=1e-3, eval_every=1, dtype=dt)
        train_reward_model(cfg, pairs=addition_preferences(32, 1, seed=0), val_pairs=addition_preferences(8, 1, seed=1),
                           progress=False, log=lambda *_: None)
        logs[dt] = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()]
                    for d in (dt, f"rm_{dt}")]
    for rows32, rows16 in zip(logs["float32"], logs["bfloat16"]):
        loss32, loss16 = ([r["loss"] for r in rows if "loss" in r] for rows in (rows32, rows16))
        assert len(loss16) == len(loss32) > 0
        np.testing.assert_allclose(loss16, loss32, rtol=0.05, atol=5e-3)


def test_cli_reward_model_then_rl_against_it(warm, tmp_path, capsys):
    ck, _, _ = warm
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in addition_preferences(64, 1, seed=0)))
    rc = main(
        [
            "reward-model",
            "--base",
            str(ck),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "rm"),
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "held-out accuracy" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "rm" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(4))  # 58 training pairs / 16 per step
    assert [r["step"] for r in rows if "val_accuracy" in r] == [0, 4]  # at the start and after the epoch
    assert (tmp_path / "rm" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["reward-model", "--base", str(ck), "--data", str(data), "--out", str(tmp_path / "rm0"), "--epochs",
                 "1", "--batch-size", "16", "--eval-every", "0", "--no-progress"]) == 0
    assert "held-out accuracy not measured" in capsys.readouterr().out  # (it printed "nan -> nan")
    rc = main(
        [
            "rl",
            "--ckpt",
            str(ck),
            "--task",
            "sort",
            "--digits",
            "3",
            "--reward-model",
            str(tmp_path / "rm"),
            "--out",
            str(tmp_path / "rl"),
            "--steps",
            "2",
            "--prompts-per-step",
            "2",
            "--group-size",
            "3",
            "--max-new-tokens",
            "4",
            "--eval-every",
            "0",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert (tmp_path / "rl" / "ckpt_000002" / "model.safetensors").exists()
    assert (tmp_path / "rl" / "rl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc = main(["rl", "--ckpt", str(ck), "--task", "nope", "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 1 and "unknown task" in capsys.readouterr().err


# ---- tasks and bad input ---------------------------------------------------------------------------------------


def test_tasks_rewards():
    add, srt = AdditionTask(2), SortTask(4)
    assert add.reward("12+34=", "46") == pytest.approx(1.1)
    assert add.reward("12+34=", "45") == pytest.approx(0.1)
    assert add.reward("12+34=", "46 apples") == 0.0
    assert srt.reward("sort 3142=", "1234") == pytest.approx(1.1)
    assert srt.correct("sort 3142=", "1234") and not srt.correct("sort 3142=", "1243")
    rng = np.random.default_rng(0)
    for _ in range(20):
        p = srt.sample(rng)
        assert srt.correct(p, "".join(sorted(p[5:-1])))
        q = add.sample(rng)
        a, b = q[:-1].split("+")
        assert add.correct(q, str(int(a) + int(b)))
    with pytest.raises(ValueError, match="prompt"):
        add.answer("hello")


@pytest.mark.parametrize(
    "bad,match",
    [
        (lambda p, c: 1 / 0, "ZeroDivisionError"),
        (lambda p, c: float("nan"), "nan"),
        (lambda p, c: float("inf"), "inf"),
        (lambda p, c: "good", "ValueError"),
        (lambda p, c: "1.0", "returned '1.0'"),  # a string that float() would read: still not a number
        (lambda p, c: None, "returned None"),
    ],
)
def test_bad_reward_function_names_the_prompt(bad, match):
    with pytest.raises(RewardError, match=match) as e:
        score(bad, ["7+8=", "1+1="], [["15", "x"], ["2", "3"]])
    assert "'7+8='" in str(e.value) and "'15'" in str(e.value)
    assert str(e.value).startswith("reward function <lambda> ")  # names the function
    # also through a GRPO step
    m = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=2, n_embd=8), seed=0)
    g = GRPO(m, m, byte_tokenizer(), bad, RLConfig(ckpt="", group_size=2, max_new_tokens=2))
    with pytest.raises(RewardError, match=r"prompt '3\+4='"):
        g.step(["3+4="], seed=0)


def test_rollouts_of_a_chat_model_are_user_turns():
    """A tokenizer with ChatML's tokens (a `fastllm sft` model): each prompt is rolled out as a user turn followed by
    the assistant header, ending at <|im_end|> or <|endoftext|>; RLConfig(chat=False) keeps plain text. A tokenizer
    without <|endoftext|> and no checkpoint folder naming an EOS has nothing to stop at: a clear error."""
    from fastllm.chat import ChatML
    from fastllm.sft import with_chat_tokens

    tok = with_chat_tokens(byte_tokenizer())
    m = GPT(GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=8), seed=0)
    reward = lambda p, c: 0.0  # noqa: E731
    g = GRPO(m, m, tok, reward, RLConfig(ckpt="", group_size=2, max_new_tokens=3))
    assert isinstance(g.chat, ChatML) and set(g.chat.stop_tokens) == {tok.special_tokens["<|im_end|>"], EOT}
    rows, comps, texts = sample_completions(m, tok, ["3+4="], 2, 3, seed=0, chat=g.chat)
    assert rows == [g.chat.prompt([{"role": "user", "content": "3+4="}]).tolist()] * 2
    assert rows[0].count(tok.special_tokens["<|im_start|>"]) == 2  # the user's turn, the assistant's header
    system = {"role": "system", "content": "Answer with digits."}
    rows = sample_completions(m, tok, ["3+4="], 2, 3, seed=0, chat=g.chat, system=system["content"])[0]
    assert rows == [g.chat.prompt([system, {"role": "user", "content": "3+4="}]).tolist()] * 2
    plain = GRPO(m, m, tok, reward, RLConfig(ckpt="", group_size=2, max_new_tokens=3, chat=False))
    assert plain.chat is None
    assert sample_completions(m, tok, ["3+4="], 2, 3, seed=0)[0] == [tok.encode_ordinary("3+4=").tolist()] * 2
    bare = fastllm.Tokenizer({bytes([b]): b for b in range(256)})
    with pytest.raises(ValueError, match="no token ends a sequence"):
        sample_completions(m, bare, ["3+4="], 2, 3, seed=0)


def test_malformed_preferences_name_the_line(tmp_path):
    good = json.dumps({"prompt": "1+1=", "chosen": "2", "rejected": "3"})
    cases = {
        "bad json": (good + "\n{not json\n", 2),
        "not an object": ("\n" + good + "\n[1, 2]\n", 3),
        "missing field": (good + "\n" + json.dumps({"prompt": "a", "chosen": "b"}) + "\n", 2),
        "wrong type": (json.dumps({"prompt": "a", "chosen": 1, "rejected": "c"}) + "\n", 1),
    }
    for name, (text, line) in cases.items():
        f = tmp_path / f"{name.replace(' ', '_')}.jsonl"
        f.write_text(text)
        with pytest.raises(ValueError, match=rf"{f.name}:{line}:"):
            load_preferences(f)
    f = tmp_path / "ok.jsonl"
    hh = json.dumps({"chosen": "\n\nHuman: 1+1?\n\nAssistant: 2", "rejected": "\n\nHuman: 1+1?\n\nAssistant: 3"})
    f.write_text(good + "\n\n" + good + "\n" + hh + "\n")  # hh-rlhf's form: no prompt, whole dialogues
    assert len(load_preferences(f)) == 3 and load_preferences(f)[2]["prompt"] == ""
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no preference pairs"):
        load_preferences(tmp_path / "empty.jsonl")


def test_conversational_preferences(tmp_path):
    """Preference pairs as message lists (HuggingFaceH4/ultrafeedback_binarized: a prompt string and whole
    conversations; trl-lib's: conversations only, or a prompt list and the answers) are read as the same (prompt,
    completion) texts the reward model scores (they were refused, the error line holding the whole conversation)."""
    def conv(*turns):
        return [{"role": r, "content": c} for r, c in turns]

    want = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    records = [
        {"prompt": "1+1=", "chosen": conv(("user", "1+1="), ("assistant", "2")),
         "rejected": conv(("user", "1+1="), ("assistant", "3")), "score_chosen": 8.0},
        {"chosen": conv(("user", "1+1="), ("assistant", "2")), "rejected": conv(("user", "1+1="), ("assistant", "3"))},
        {"prompt": conv(("user", "1+1=")), "chosen": conv(("assistant", "2")), "rejected": conv(("assistant", "3"))},
    ]
    f = tmp_path / "prefs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert load_preferences(f) == [want] * 3
    for record, msg in [
        ({"chosen": conv(("user", "a"), ("assistant", "2")), "rejected": conv(("user", "b"), ("assistant", "3"))},
         "'chosen' and 'rejected' answer different prompts"),
        ({"prompt": "a", "chosen": conv(("assistant", "2"), ("user", "b")), "rejected": "3"},
         "'chosen' must end with an assistant message"),
        ({"prompt": "a", "chosen": [{"role": "robot", "content": "2"}], "rejected": "3"}, "unknown role 'robot'"),
    ]:
        f.write_text(json.dumps(record) + "\n")
        with pytest.raises(ValueError, match=msg) as e:
            load_preferences(f)
        assert f"{f}:1:" in str(e.value)
    f.write_text(json.dumps({"prompt": "a", "chosen": {"text": "x" * 5000}, "rejected": "3"}) + "\n")
    with pytest.raises(ValueError, match="'chosen' must be a string or a list of messages, got dict$"):
        load_preferences(f)


def test_reward_functions_see_completions_without_special_tokens(monkeypatch):
    """A completion's text for the reward function leaves out special tokens the model wrote mid-answer, as TRL's
    batch_decode(skip_special_tokens=True) does (a <|im_start|> inside an answer used to reach the reward)."""
    import fastllm.rl as rl
    from fastllm.sft import with_chat_tokens

    tok = with_chat_tokens(byte_tokenizer())
    m = GPT(GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=8), seed=0)
    start = tok.special_tokens["<|im_start|>"]
    monkeypatch.setattr(rl, "generate", lambda model, rows, *a, **kw: [r + [55, start, 56, EOT] for r in rows])
    comps, texts = sample_completions(m, tok, ["3+4="], 2, 4, seed=0)[1:]
    assert comps[0][-3:] == [start, 56, EOT] and texts == [["78", "78"]]


def test_several_policy_updates_per_rollout_batch():
    """iterations > 1 (GRPO's mu): later updates see ratios != 1, so the clip can act; everything stays finite."""
    m = GPT(GPTConfig(block_size=16, vocab_size=257, n_layer=1, n_head=2, n_embd=16), seed=0)
    ref = GPT(m.config, init=False)
    ref.params[:] = m.params
    task = AdditionTask(1)
    cfg = RLConfig(ckpt="", group_size=4, max_new_tokens=3, lr=1e-2, iterations=3, clip_eps=0.05)
    g = GRPO(m, ref, byte_tokenizer(), lambda p, c: float(ord(c[0]) % 7) if c else 0.0, cfg, task)
    before = m.params.copy()
    st = g.step(["1+2=", "3+3="], seed=0)
    assert g.opt.t == 3 and not np.array_equal(before, m.params)
    assert all(math.isfinite(v) for v in st.values())
    # the logged clip fraction and KL cover the later updates too (the first sees ratios of 1 and the starting
    # policy: it alone logged 0 for both, whatever the clip did)
    assert 0 < st["clip_frac"] < 1 and st["kl"] > 0


def test_forward_temperature_divides_the_capped_logits():
    """GPT.forward(..., temperature=T): the logits after the soft cap, divided by T (the order fastllm.sample
    applies them in); the losses and token_losses are those of softmax(those)."""
    m = GPT(GPTConfig(block_size=8, vocab_size=13, n_layer=1, n_head=2, n_embd=8, logit_softcap=2.0), seed=3)
    m.params *= 8  # logits well past the cap: capping after dividing would differ
    rng = np.random.default_rng(0)
    idx, tg = rng.integers(0, 13, (2, 8)), rng.integers(0, 13, (2, 8))
    tg[1, :2] = -1
    capped = m.forward(idx).astype(np.float64)
    assert np.abs(capped).max() <= 2.0 and np.abs(capped).max() > 1.9  # the cap acts
    for T in (0.7, 1.3):
        np.testing.assert_allclose(m.forward(idx, temperature=T), capped / T, rtol=1e-6)
        z = capped / T
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        ce = np.where(tg != -1, lse - np.take_along_axis(z, np.maximum(tg, 0)[..., None], -1)[..., 0], 0.0)
        assert m.forward(idx, tg, temperature=T) == pytest.approx(ce.sum() / np.count_nonzero(tg != -1), rel=1e-5)
        np.testing.assert_allclose(m.token_losses, ce, atol=1e-5)
    m.forward(idx, tg, temperature=1.0)
    t1 = m.token_losses.copy()
    m.forward(idx, tg)
    np.testing.assert_array_equal(m.token_losses, t1)
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            m.forward(idx, tg, temperature=bad)


@pytest.mark.parametrize("T", [0.7, 1.3])
def test_grpo_step_logprobs_are_those_of_the_sampling_distribution(monkeypatch, T):
    """GRPO.step at --temperature T: the old-policy and reference log-probs of every completion token are the log
    of the probability fastllm.sample drew it with (sample.probabilities at T: soft cap, then / T), and the
    policy update is taken at T too. (They were taken at T = 1: the ratio and the KL of another distribution than
    the one that produced the samples, unlike TRL's GRPOTrainer.)"""
    from fastllm import rl
    from fastllm.sample import SamplingParams, probabilities

    cfg = GPTConfig(block_size=32, vocab_size=257, n_layer=1, n_head=2, n_embd=16, logit_softcap=3.0)
    m = GPT(cfg, seed=0)
    m.params *= 4  # sharp, capped logits: T matters
    ref = GPT(cfg, init=False)
    ref.params[:] = m.params * 0.9  # a reference unlike the policy
    seen = {}
    real = rl.policy_backward

    def spy(model, batch, old, ref_logp, *args, **kw):
        seen.setdefault("call", (batch, old, ref_logp, kw.get("temperature", 1.0)))
        return real(model, batch, old, ref_logp, *args, **kw)

    monkeypatch.setattr(rl, "policy_backward", spy)
    g = GRPO(m, ref, byte_tokenizer(), lambda p, c: float(len(c)), RLConfig(ckpt="", group_size=3, max_new_tokens=4,
                                                                             temperature=T), AdditionTask(1))
    before = m.params.copy()
    st = g.step(["1+2=", "7+5="], seed=0)
    batch, old, ref_logp, temperature = seen["call"]
    sp = SamplingParams(temperature=T)
    for model, got in ((before, old), (ref.params, ref_logp)):
        scorer = GPT(cfg, init=False)
        scorer.params[:] = model
        logits = scorer.forward(batch.idx)  # soft-capped, at T = 1
        rows, cols = np.nonzero(batch.mask)
        p = probabilities(logits[rows, cols], sp)[np.arange(len(rows)), batch.targets[rows, cols]]
        np.testing.assert_allclose(got[rows, cols], np.log(p), atol=1e-5)
    assert temperature == T  # the update's log-probs too (its gradient: test_policy_gradient_matches_torch_reference)
    assert math.isfinite(st["loss"]) and st["kl"] > 0


# ---- config values and devices: one clear error (issue 23) -------------------------------------------------------


@pytest.mark.parametrize("args,match", [
    (["--iterations", "0"], "iterations must be an integer >= 1, got 0"),  # was UnboundLocalError
    (["--prompts-per-step", "0"], "prompts_per_step must be an integer >= 1, got 0"),
    (["--digits", "100"], r"digits must be an integer in \[1, 18\] for the addition task, got 100"),
    (["--group-size", "1"], "group_size must be an integer >= 2"),
    (["--ckpt-every", "-1"], "ckpt_every must be an integer >= 0"),
    (["--clip-eps", "0"], "clip_eps must be a number in"),
    (["--temperature", "0"], r"temperature must be a number in \(0, inf\)"),  # greedy groups: all advantages 0
    (["--task", "nope"], "unknown task"),
])
def test_cli_rl_bad_values(tmp_path, capsys, args, match):
    rc = main(["rl", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("fastllm: error:") and err.count("\n") == 1, err
    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_rl_prompts_longer_than_the_context(warm, tmp_path):
    ck, _, _ = warm  # block_size 16: "sort " + 12 digits + "=" + 8 new tokens do not fit
    cfg = RLConfig(ckpt=str(ck), task="sort", digits=12, out=str(tmp_path / "o"), steps=1, max_new_tokens=8)
    with pytest.raises(ValueError, match="do not fit the model's context of 16 tokens"):
        train_grpo(cfg, progress=False, log=lambda *_: None)


@pytest.mark.parametrize("command", ["rl", "reward-model"])
def test_cli_out_file_and_cuda_without_gpu(warm, tmp_path, capsys, command):
    from fastllm import cuda

    ck, _, _ = warm
    (tmp_path / "afile").write_text("x")
    base = ["--ckpt", str(ck)] if command == "rl" else ["--base", str(ck), "--data", str(tmp_path / "p.jsonl")]
    assert main([command, *base, "--out", str(tmp_path / "afile"), "--no-progress"]) == 1
    assert "afile exists and is not a folder" in capsys.readouterr().err
    if not cuda.is_available():
        assert main([command, *base, "--out", str(tmp_path / "o"), "--device", "cuda", "--no-progress"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("fastllm: error:") and err.count("\n") == 1 and ("CUDA" in err or "GPU" in err)


def test_reward_model_resumes_bit_identically(warm, tmp_path):
    """The reward model trains through the shared loop: 2 epochs straight equal 1 epoch, then a resume to 2."""
    ck, _, _ = warm
    pairs, val = addition_preferences(96, 1, seed=0), addition_preferences(16, 1, seed=1)
    kw = dict(base=str(ck), data="", lr=1e-3, batch_size=32, eval_every=2, ckpt_every=1)
    quiet = dict(pairs=pairs, val_pairs=val, progress=False, log=lambda *_: None)
    full = train_reward_model(RewardModelConfig(out=str(tmp_path / "a"), epochs=2, **kw), **quiet)
    train_reward_model(RewardModelConfig(out=str(tmp_path / "b"), epochs=1, **kw), **quiet)
    part = train_reward_model(RewardModelConfig(out=str(tmp_path / "b"), epochs=2, resume=True, **kw), **quiet)
    assert Path(part["checkpoint"]).name == "ckpt_000006" == Path(full["checkpoint"]).name
    a, b = RewardModel.load(tmp_path / "a"), RewardModel.load(tmp_path / "b")
    np.testing.assert_array_equal(a.head, b.head)
    np.testing.assert_array_equal(a.backbone.params, b.backbone.params)

    def rows(out):
        return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]

    strip = [{k: v for k, v in r.items() if k != "dt"} for r in rows(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if k != "dt"} for r in rows(tmp_path / "b")]
    assert [r["step"] for r in rows(tmp_path / "a") if "val_accuracy" in r] == [0, 2, 4, 6]


@pytest.mark.parametrize("form", ["int8", "bfloat16"])
def test_grpo_with_lora_over_a_held_base(warm, tmp_path, form):
    """--base-weights: GRPO's adapters train over the policy's matrices held in int8 / bf16 alone (the reference:
    that held base without them, so the first step's KL is 0); the run resumes bit-identically; refusals."""
    ck, _, _ = warm
    kw = dict(ckpt=str(ck), task="addition", digits=1, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-2,
              eval_every=0, ckpt_every=2, lora_r=4, lora_alpha=8, base_weights=form)
    s = train_grpo(RLConfig(out=str(tmp_path / "a"), steps=4, **kw), progress=False, log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0
    policy = load_model(s["checkpoint"], weights=form)  # the held base, then the adapters
    assert policy.weights_only == form and policy.lora is not None
    train_grpo(RLConfig(out=str(tmp_path / "b"), steps=2, **kw), progress=False, log=lambda *_: None)
    s2 = train_grpo(RLConfig(out=str(tmp_path / "b"), steps=4, resume=True, **kw), progress=False, log=lambda *_: None)
    np.testing.assert_array_equal(load_model(s2["checkpoint"]).lora.params, policy.lora.params)
    with pytest.raises(ValueError, match="give --lora-r"):
        RLConfig(out=str(tmp_path / "c"), steps=1, **dict(kw, lora_r=0))
    with pytest.raises(ValueError, match="convert it first"):
        train_grpo(RLConfig(out=str(tmp_path / "c"), steps=1, **dict(kw, ckpt=s["checkpoint"])), progress=False,
                   log=lambda *_: None)


def test_grpo_with_lora_reference_is_the_base_and_resumes(warm, tmp_path):
    """--lora-r: GRPO trains adapters only; its reference is the policy without them (the same log-probs as the
    starting checkpoint loaded once more); a step's KL starts at 0; the run resumes bit-identically; and a policy
    starting from a LoRA checkpoint starts from that model whole (its adapters merged)."""
    ck, _, _ = warm
    tok = byte_tokenizer()
    kw = dict(ckpt=str(ck), task="addition", digits=1, prompts_per_step=2, group_size=4, max_new_tokens=4, lr=1e-2,
              eval_every=0, ckpt_every=2, lora_r=4, lora_alpha=8)
    s = train_grpo(RLConfig(out=str(tmp_path / "a"), steps=5, **kw), progress=False, log=lambda *_: None)
    rows = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[-1]["kl"] > 0  # the adapters moved it away
    policy, start = load_model(s["checkpoint"]), load_model(ck)
    assert policy.lora is not None
    for name, v in policy.state_dict().items():
        np.testing.assert_array_equal(v, start.state_dict()[name], err_msg=name)
    idx = np.array([tok.encode("3+4=7")])
    with policy.without_lora():
        np.testing.assert_array_equal(policy.forward(idx), start.eval().forward(idx))
    assert np.abs(policy.eval().forward(idx) - start.forward(idx)).max() > 1e-4
    train_grpo(RLConfig(out=str(tmp_path / "b"), steps=2, **kw), progress=False, log=lambda *_: None)
    s2 = train_grpo(RLConfig(out=str(tmp_path / "b"), steps=5, resume=True, **kw), progress=False, log=lambda *_: None)
    np.testing.assert_array_equal(load_model(s2["checkpoint"]).lora.params, policy.lora.params)
    # from the LoRA checkpoint: its model merged is where the new run (adapters on adapters) starts
    kw2 = dict(kw, ckpt=s["checkpoint"], steps=1)
    s3 = train_grpo(RLConfig(out=str(tmp_path / "c"), **kw2), progress=False, log=lambda *_: None)
    again = load_model(s3["checkpoint"])  # base -> first adapters (merged) -> second adapters
    with again.without_lora():
        np.testing.assert_allclose(again.forward(idx), policy.forward(idx), rtol=0, atol=1e-4)
