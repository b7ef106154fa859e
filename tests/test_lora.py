"""LoRA (fastllm.lora): the adapters' gradients against PyTorch autograd through W + scale * (B * mask) @ A on every
architecture option, on the CPU and the emulated CUDA backend; the frozen base (no gradient, unchanged by AdamW);
generation, merging and the base without its adapters; bad configurations. PEFT's files: tests/test_lora_peft.py;
LoRA runs (sft, rl): tests/test_sft.py, tests/test_rl.py."""

from __future__ import annotations

import numpy as np
import pytest
from backends import CASES
from test_model_arch import batch, make, rel_err

from fastllm import GPT, GPTConfig
from fastllm.lora import Lora, LoraConfig
from fastllm.optim import AdamW

TOL = {"float32": 2e-4, "bfloat16": 4e-2}


def randomize_b(lora: Lora, seed: int = 0) -> dict[str, np.ndarray]:
    """Give every B random values on the rows it trains (a fresh adapter's B is zero: its A would get no gradient);
    returns the adapter's tensors (host copies)."""
    rng = np.random.default_rng(seed)
    tensors = {k: np.array(v) for k, v in lora.state_dict().items()}
    for name, v in tensors.items():
        if name.endswith("lora_B"):
            for r0, r1 in lora.rows[Lora.matrix(name)]:
                v[:, r0:r1] = rng.normal(0, 0.2, v[:, r0:r1].shape)
    lora.load_state_dict(tensors)
    return tensors


def torch_lora_grads(model: GPT, tensors: dict, lora: Lora, idx, tgt):
    """(loss, {adapter tensor: gradient}) by PyTorch autograd on tests/torch_gpt.py with each adapted matrix
    replaced by W + scale * (B * rows mask) @ A, A and B the leaves."""
    import torch
    import torch_gpt

    fwd, params = torch_gpt.build(model)
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in tensors.items()}
    for m in lora.ranks:
        params[m] = adapted(lora, m, params[m].detach(), leaves)
    loss = fwd(idx, tgt)
    loss.backward()
    return float(loss), {k: v.grad.numpy() for k, v in leaves.items()}


def adapted(lora: Lora, m: str, w, leaves: dict):
    """The torch expression of matrix m with its adapter: w + scale * (B * the mask of B's training rows) @ A."""
    import torch

    stem = m[:-len(".weight")]
    mask = torch.zeros(w.shape[-2], 1)  # (w: (L, out, in))
    for r0, r1 in lora.rows[m]:
        mask[r0:r1] = 1.0
    return w + lora.scale * (leaves[stem + ".lora_B"] * mask) @ leaves[stem + ".lora_A"]


def torch_adamw_losses(model: GPT, lora: Lora, idx, tgt, steps: int) -> list[float]:
    """The losses of `steps` torch.optim.AdamW steps (lr 1e-2, betas (0.9, 0.95), weight decay 0.1) on the adapters
    of a model whose adapters are as made (B = 0)."""
    import torch
    import torch_gpt

    fwd, params = torch_gpt.build(model)
    base = {k: v.detach() for k, v in params.items()}
    leaves = {k: torch.tensor(np.array(v), requires_grad=True) for k, v in lora.state_dict().items()}
    opt = torch.optim.AdamW(leaves.values(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    losses = []
    for _ in range(steps):
        for m in lora.ranks:
            params[m] = adapted(lora, m, base[m], leaves)
        loss = fwd(idx, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def adamw_losses(model: GPT, idx, tgt, steps: int) -> list[float]:
    """The losses of `steps` fastllm AdamW steps (as torch_adamw_losses') on what the model trains: its adapters."""
    opt = AdamW(model, lr=1e-2, weight_decay=0.1)
    assert opt.model is model.lora and len(opt.m) == model.lora.num_parameters
    losses = []
    for _ in range(steps):
        model.zero_grad()
        losses.append(model.forward(idx, tgt))
        model.backward()
        opt.step()
    return losses


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("arch,targets", [("gpt2", "all"), ("llama", "q,v"), ("llama", "all"), ("qwen2", "k,o,up"),
                                          ("olmo2", "all"), ("gemma2", "gate,down"), ("granite", "q,k,v,o"),
                                          ("nanochat", "up,down"), ("neox", "all"), ("neox", "q,v,down")])
def test_lora_gradients_match_torch(device, dtype, arch, targets):
    model = make(arch)
    idx, tgt = batch(model.config.vocab_size)
    lora = model.add_lora(LoraConfig(r=3, alpha=5.0, targets=(targets,)), seed=1)
    tensors = randomize_b(lora)
    want_loss, want = torch_lora_grads(model, tensors, lora, idx, tgt)
    if device != "cpu":
        model.to(device, dtype)
    model.zero_grad()
    loss = model.forward(idx, tgt)
    model.backward()
    assert model.grads is None  # the base has no gradient buffer: only the adapters'
    assert abs(loss - want_loss) <= TOL[dtype] * max(1.0, abs(want_loss))
    got = {k: np.array(model.bk.to_numpy(v)) for k, v in lora.g.items()}
    for name, g in want.items():
        assert rel_err(got[name], g) <= TOL[dtype] * (3 if dtype == "bfloat16" else 1), name
        if name.endswith("lora_B"):  # the rows of B that do not train get no gradient
            mask = np.ones(g.shape[1], bool)
            for r0, r1 in lora.rows[Lora.matrix(name)]:
                mask[r0:r1] = False
            assert not got[name][:, mask].any()


def test_adapters_start_as_the_base_and_the_base_stays_frozen():
    model = make("llama")
    idx, tgt = batch(model.config.vocab_size)
    base_logits = model.forward(idx)
    before = {k: v.copy() for k, v in model.state_dict().items()}
    lora = model.add_lora(r=4, alpha=8)
    np.testing.assert_array_equal(model.forward(idx), base_logits)  # B = 0: the base model exactly
    want = torch_adamw_losses(model, lora, idx, tgt, steps=20)
    losses = adamw_losses(model, idx, tgt, steps=20)
    np.testing.assert_allclose(losses, want, rtol=1e-4)  # torch.optim.AdamW on the same adapters
    assert losses[-1] < losses[0] - 0.3
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    with model.without_lora():  # the base, its adapters left out
        np.testing.assert_array_equal(model.forward(idx), base_logits)
    assert model.training


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2", "neox"])
def test_generation_and_merge(arch):
    model = make(arch)
    lora = model.add_lora(r=4, alpha=16, targets="all", seed=3)
    randomize_b(lora, seed=4)
    model.eval()
    idx, _ = batch(model.config.vocab_size)
    logits = model.forward(idx)
    prompt = list(idx[0, :5])
    tokens = model.generate(prompt, 8, temperature=0)
    with model.decoding("bfloat16"):  # a bf16 snapshot of the base with the adapters on top
        assert rel_err(model.forward(idx), logits) < 2e-2
    merged = GPT(model.config, init=False).load_state_dict(model.state_dict())
    merged.add_lora(lora.config).load_state_dict(lora.state_dict())
    merged.merge_lora()
    assert merged.lora is None
    assert rel_err(merged.eval().forward(idx), logits) < 1e-5
    assert list(merged.generate(prompt, 8, temperature=0)) == list(tokens)  # the KV cache has the adapters too


@pytest.mark.parametrize("device,dtype", CASES[1:])
def test_lora_moves_with_the_model(device, dtype):
    model = make("qwen2")
    lora = model.add_lora(r=2)
    tensors = randomize_b(lora)
    idx, tgt = batch(model.config.vocab_size)
    want = model.forward(idx, tgt)
    model.to(device, dtype)
    assert rel_err(model.forward(idx, tgt), want) < TOL[dtype]
    model.to("cpu")
    for k, v in model.lora.state_dict().items():
        np.testing.assert_array_equal(v, tensors[k], err_msg=k)


def test_config_and_targets():
    assert LoraConfig(r=8, alpha=16).scale == 2.0 and LoraConfig(r=16, alpha=8, rslora=True).scale == 2.0
    assert LoraConfig(targets="q_proj, v_proj").targets == ("q", "v")
    assert LoraConfig(targets=("all-linear",)).targets == ("q", "k", "v", "o", "gate", "up", "down")
    gpt2 = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50, block_size=16))
    lora = gpt2.add_lora(r=2)  # "all" on GPT-2: no gate projection to adapt
    assert lora.rows == {"attn.c_attn.weight": [(0, 16), (16, 32), (32, 48)], "attn.c_proj.weight": [(0, 16)],
                         "mlp.c_fc.weight": [(0, 64)], "mlp.c_proj.weight": [(0, 16)]}
    assert lora.shapes["attn.c_attn.lora_A"] == (2, 2, 16) and lora.shapes["mlp.c_fc.lora_B"] == (2, 64, 2)


@pytest.mark.parametrize("kw,match", [
    (dict(r=0), "rank"), (dict(r=2.5), "rank"), (dict(alpha=0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(targets=("q", "lm_head")), "lm_head"), (dict(targets=()), "at least one"),
])
def test_bad_config_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kw)


def test_bad_use_is_refused():
    gpt2 = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=16))
    with pytest.raises(ValueError, match="no gate"):
        gpt2.add_lora(targets=("gate",))
    with pytest.raises(ValueError, match="no LoRA"):
        gpt2.merge_lora()
    gpt2.add_lora(r=2)
    with pytest.raises(ValueError, match="already"):
        gpt2.add_lora(r=2)
    with pytest.raises(ValueError, match="lora_A"):
        gpt2.lora.load_state_dict({"attn.c_attn.lora_B": np.zeros((1, 48, 2), np.float32)})
    bad = {k: np.full(v.shape, np.nan, np.float32) for k, v in gpt2.lora.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        gpt2.lora.load_state_dict(bad)
    held = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=16))
    held.hold_weights(held.decode_weights("int8"), "int8").add_lora(r=2)  # adapters beside held matrices
    with pytest.raises(ValueError, match="int8 only"):
        held.merge_lora()
    assert held.train().training  # (they train over them: tests/test_lora_held.py)
