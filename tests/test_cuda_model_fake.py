"""The GPU model's orchestration (fastllm.cuda_model, train/sample on device="cuda") without a GPU: fastllm.cuda
is pointed at tests/cuda_fake.py, a numpy implementation of the _C.cuda contract built on the CPU kernels.

In float32 the fake computes what the CPU model computes, so CudaGPT must match GPT to ~1e-5 (losses,
every gradient, AdamW updates with clipping, generation); with bfloat16 emulated (every store rounded) the
losses stay within ~1e-2. These guard the call sequence (argument order, views, dtypes, shapes, zeroing of
accumulated gradients, optimizer groups, checkpoint copies); the kernels themselves are tested on the GPU."""

from __future__ import annotations

import json
import shutil

import cuda_fake
import numpy as np
import pytest

from fastllm import cuda
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW, grad_norm
from fastllm.sample import generate

V = 48


@pytest.fixture
def fake(monkeypatch):
    """fastllm.cuda backed by the numpy fake (bf16 emulated by default; see the fake_fp32 fixture)."""
    return cuda_fake.install(monkeypatch, emulate_bf16=True)


def tiny_config(**kw) -> GPTConfig:
    return GPTConfig(**{**dict(block_size=32, vocab_size=V, n_layer=2, n_head=2, n_embd=32), **kw})


def batch(rng, B=3, T=16, ignore=True):
    x = rng.integers(0, V, (B, T))
    y = rng.integers(0, V, (B, T))
    if ignore:
        y[0, :3] = -1  # ignored positions (like SFT's prompt tokens)
    return x, y


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


def test_round_bf16_matches_torch(rng):
    torch = pytest.importorskip("torch")
    x = (rng.standard_normal(10000) * 10.0 ** rng.integers(-5, 5, 10000)).astype(np.float32)
    x[:4] = [0.0, -0.0, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]  # exact ties round to even
    want = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(cuda_fake.round_bf16(x), want)


def test_fake_device_array_views_share_memory(fake):
    a = cuda.zeros((10,), "float32")
    v = a.view(4, (2, 3))
    v.copy_(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(a.numpy(), [0, 0, 0, 0, 0, 1, 2, 3, 4, 5])
    assert v.view(3, (3,)).numpy().tolist() == [3, 4, 5]
    with pytest.raises(ValueError, match="does not fit"):
        a.view(8, (3,))
    with pytest.raises(TypeError, match="float32 or int32"):
        a.copy_(np.zeros(10, np.float64))
    with pytest.raises(TypeError, match="DeviceArray"):
        cuda.gelu_forward(a, np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="overlap"):  # like the real bindings
        cuda.gelu_backward(a.view(0, (4,)), a.view(2, (4,)), a.view(6, (4,)))
    cuda.gelu_forward(a, a)  # in place is allowed


@pytest.mark.parametrize("accum", [1, 2])
def test_fp32_training_steps_match_cpu(monkeypatch, rng, accum):
    """Loss, all gradients, the grad norm and the parameters after AdamW with clipping, over several steps."""
    cuda_fake.install(monkeypatch, emulate_bf16=False)
    from fastllm.cuda_model import CudaGPT

    cpu = GPT(tiny_config(), seed=3)
    gpu = CudaGPT(cpu, dtype="float32")
    cpu_opt = AdamW(cpu, lr=1e-2, weight_decay=0.1)
    gpu_opt = gpu.optimizer(lr=1e-2, weight_decay=0.1)
    for step in range(4):
        cpu.zero_grad()
        gpu.zero_grad()
        lc = lg = 0.0
        for _ in range(accum):
            x, y = batch(rng)
            lc += cpu.forward(x, y) / accum
            lg += gpu.forward(x, y) / accum
            cpu.backward()
            gpu.backward()
            np.testing.assert_allclose(gpu.token_losses, cpu.token_losses, rtol=1e-5, atol=1e-6)
        assert abs(lg - lc) <= 1e-5 * abs(lc), (step, lg, lc)
        for name in cpu.g:
            err = rel(gpu.g[name].numpy(), cpu.g[name])
            assert err < 1e-5, f"step {step}: grad {name} rel err {err:.2e}"
        nc, ng = grad_norm(cpu) / accum, gpu.grad_norm() / accum
        assert abs(nc - ng) <= 1e-5 * nc
        clip = min(1.0, 0.05 / (nc + 1e-6))  # a small max norm so clipping is active
        assert clip < 1.0 or step > 0
        cpu_opt.step(1e-2 * (step + 1) / 4, grad_scale=clip / accum)
        gpu_opt.step(1e-2 * (step + 1) / 4, grad_scale=clip / accum)
        assert gpu_opt.t == cpu_opt.t == step + 1
        err = rel(gpu.params.numpy(), cpu.params)
        assert err < 1e-5, f"step {step}: params rel err {err:.2e}"
    np.testing.assert_allclose(gpu_opt.m.numpy(), cpu_opt.m, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(gpu_opt.v.numpy(), cpu_opt.v, rtol=1e-4, atol=1e-12)


def test_fp32_eval_logits_and_unfused_gelu_match_cpu(monkeypatch, rng):
    cuda_fake.install(monkeypatch, emulate_bf16=False)
    from fastllm.cuda_model import CudaGPT

    cpu = GPT(tiny_config(), seed=1).eval()
    x, y = batch(rng, B=2, T=9)
    for fuse in (True, False):
        gpu = CudaGPT(cpu, dtype="float32", fuse_gelu=fuse).eval()
        np.testing.assert_allclose(gpu.forward(x), cpu.forward(x), rtol=1e-5, atol=1e-6)
        assert abs(gpu.forward(x, y) - cpu.forward(x, y)) < 1e-5
        with pytest.raises(RuntimeError, match="forward"):
            gpu.backward()  # eval-mode forward prepares no backward


def test_bf16_emulated_stays_close_to_cpu(fake, rng):
    from fastllm.cuda_model import CudaGPT

    cpu = GPT(tiny_config(), seed=2)
    gpu = CudaGPT(cpu)  # bfloat16 compute copy (rounded on every store), fp32 master weights
    assert gpu.dtype == "bfloat16" and gpu.cparams.dtype == "bfloat16" and gpu.params.dtype == "float32"
    cpu_opt, gpu_opt = AdamW(cpu, lr=3e-3), gpu.optimizer(lr=3e-3)
    for _ in range(5):
        x, y = batch(rng)
        cpu.zero_grad()
        gpu.zero_grad()
        lc, lg = cpu.forward(x, y), gpu.forward(x, y)
        assert abs(lg - lc) <= 1e-2 * abs(lc), (lg, lc)
        cpu.backward()
        gpu.backward()
        gc, gg = cpu.grads, gpu.grads.numpy()
        cos = float(gc @ gg / (np.linalg.norm(gc) * np.linalg.norm(gg)))
        assert cos > 0.99, cos
        cpu_opt.step()
        gpu_opt.step()
    # the bf16 copy follows the fp32 master weights (params_copy)
    np.testing.assert_array_equal(gpu.cparams.numpy(), cuda_fake.round_bf16(gpu.params.numpy()))


def test_input_errors(fake, rng):
    from fastllm.cuda_model import CudaGPT

    gpu = CudaGPT(tiny_config(), seed=0)
    x, y = batch(rng)
    with pytest.raises(ValueError, match="outside"):
        gpu.forward(x + V, y)
    with pytest.raises(ValueError, match="targets"):
        gpu.forward(x, y + V)
    with pytest.raises(ValueError, match="shape"):
        gpu.forward(x, y[:, :4])
    with pytest.raises(TypeError, match="integer"):
        gpu.forward(x.astype(np.float32), y)
    with pytest.raises(ValueError, match="block_size"):
        gpu.forward(np.zeros((1, 33), np.int64))
    with pytest.raises(RuntimeError, match="forward"):
        gpu.backward()
    with pytest.raises(ValueError, match="dtype"):
        CudaGPT(tiny_config(), dtype="float16")
    with pytest.raises(ValueError, match="differs"):
        gpu.load_from(GPT(tiny_config(n_layer=1)))


def test_checkpoint_round_trip(monkeypatch, rng):
    """to_cpu(model, opt) then load_from into a fresh CudaGPT continues exactly like the original."""
    cuda_fake.install(monkeypatch, emulate_bf16=True)
    from fastllm.cuda_model import CudaGPT

    a = CudaGPT(tiny_config(), seed=5)
    opt_a = a.optimizer(lr=1e-2)
    batches = [batch(rng) for _ in range(4)]

    def step(m, o, xy):
        m.zero_grad()
        loss = m.forward(*xy)
        m.backward()
        o.step(grad_scale=min(1.0, 1.0 / (m.grad_norm() + 1e-6)))
        return loss

    for xy in batches[:2]:
        step(a, opt_a, xy)
    host = a.to_cpu()
    host_opt = AdamW(host, lr=1e-2)
    a.to_cpu(host, host_opt)
    assert host_opt.t == 2 and np.abs(host_opt.m).max() > 0
    np.testing.assert_array_equal(host.params, a.params.numpy())
    b = CudaGPT(host).load_from(host, host_opt)
    assert b.adamw.t == 2
    np.testing.assert_array_equal(b.cparams.numpy(), a.cparams.numpy())
    for xy in batches[2:]:
        assert step(a, opt_a, xy) == step(b, b.adamw, xy)
    np.testing.assert_array_equal(a.params.numpy(), b.params.numpy())
    np.testing.assert_array_equal(a.adamw.v.numpy(), b.adamw.v.numpy())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_generation_with_kv_cache(monkeypatch, dtype):
    """Greedy generation (batched prompts of different lengths, prefill + decode) equals the CPU model's;
    in fp32 the first logits agree to 1e-5."""
    cuda_fake.install(monkeypatch, emulate_bf16=False)
    from fastllm.cuda_model import CudaGPT

    cpu = GPT(tiny_config(), seed=4).eval()
    cpu.params *= 4.0  # sharper logits: no near-ties for greedy to flip on
    gpu = CudaGPT(cpu, dtype=dtype).eval()
    prompts = [[1, 2, 3, 4, 5], [7], [9, 10, 11]]
    np.testing.assert_allclose(gpu.kv_cache(3).prefill(prompts), cpu.kv_cache(3).prefill(prompts), rtol=1e-5,
                               atol=1e-5)
    want = generate(cpu, prompts, 10, temperature=0)
    assert generate(gpu, prompts, 10, temperature=0) == want
    assert generate(gpu, prompts[0], 10, temperature=0) == want[0]
    # sampling with a seed draws the same tokens from the same logits
    kw = dict(temperature=1.0, top_k=5, seed=7)
    assert generate(gpu, prompts, 8, **kw) == generate(cpu, prompts, 8, **kw)
    # a common prefix of several tokens runs batched (b > 1, Tn > 1), then the tails
    prompts2 = [[1, 2, 3, 4], [5, 6, 7], [8, 9, 10, 11, 12]]
    np.testing.assert_allclose(gpu.kv_cache(3).prefill(prompts2), cpu.kv_cache(3).prefill(prompts2), rtol=1e-5,
                               atol=1e-5)
    assert generate(gpu, prompts2, 6, temperature=0) == generate(cpu, prompts2, 6, temperature=0)
    with pytest.raises(ValueError, match="block_size"):
        generate(gpu, prompts[0], 30, temperature=0)
    cache = gpu.kv_cache(2)
    with pytest.raises(ValueError, match="outside"):
        cache.prefill([[1, 2], [3, V]])
    assert cache.pos.tolist() == [0, 0]  # checked before the cache changed


def test_generation_bf16_emulated_runs(fake):
    from fastllm.cuda_model import CudaGPT

    cpu = GPT(tiny_config(), seed=4).eval()
    cpu.params *= 4.0
    gpu = CudaGPT(cpu).eval()
    cache_c, cache_g = cpu.kv_cache(2), gpu.kv_cache(2)
    lc, lg = cache_c.prefill([[1, 2, 3], [4]]), cache_g.prefill([[1, 2, 3], [4]])
    assert rel(lg, lc) < 3e-2
    lc, lg = cache_c.decode([5, 6]), cache_g.decode([5, 6])
    assert rel(lg, lc) < 3e-2
    assert cache_g.pos.tolist() == [4, 2]


# ---- train() and the CLI on device="cuda" ---------------------------------------------------------------


@pytest.fixture
def data(tmp_path):
    from test_train import learnable_shards

    (tmp_path / "data").mkdir()
    learnable_shards(tmp_path / "data")
    return tmp_path


def _train_cfg(tmp_path, out, **kw):
    from fastllm.train import TrainConfig

    base = dict(data=str(tmp_path / "data"), out=str(tmp_path / out), model="tiny", batch_size=4, seq_len=32,
                max_steps=8, lr=3e-3, warmup_steps=2, eval_every=4, eval_batches=2, ckpt_every=3, threads=2,
                total_batch_tokens=256)
    return TrainConfig(**{**base, **kw})


def _log(out):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r], \
        [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def test_train_on_cuda_matches_cpu_checkpoints_and_resumes(monkeypatch, data):
    cuda_fake.install(monkeypatch, emulate_bf16=False)
    from fastllm.train import load_model, train

    quiet = dict(progress=False, log=lambda *a: None)
    train(_train_cfg(data, "cpu"), **quiet)
    s = train(_train_cfg(data, "gpu", device="cuda", cuda_dtype="float32"), **quiet)
    (cpu_loss, cpu_val), (gpu_loss, gpu_val) = _log(data / "cpu"), _log(data / "gpu")
    assert [r[0] for r in gpu_loss] == list(range(8))
    np.testing.assert_allclose([r[1:] for r in gpu_loss], [r[1:] for r in cpu_loss], rtol=1e-5)
    np.testing.assert_allclose([r[1] for r in gpu_val], [r[1] for r in cpu_val], rtol=1e-5)
    assert s["checkpoint"].endswith("ckpt_000008")
    m_cpu, m_gpu = load_model(data / "cpu"), load_model(data / "gpu")
    np.testing.assert_allclose(m_gpu.params, m_cpu.params, rtol=1e-4, atol=1e-6)

    # a GPU run resumed from its step-6 checkpoint (bf16 this time) equals an uninterrupted one
    cuda_fake.set_bf16(True)
    train(_train_cfg(data, "full", device="cuda"), **quiet)
    shutil.copytree(data / "full", data / "part")
    shutil.rmtree(data / "part" / "ckpt_000008")
    (data / "part" / "latest").write_text("ckpt_000006\n")
    train(_train_cfg(data, "part", device="cuda", resume=True), **quiet)
    assert _log(data / "part") == _log(data / "full")
    np.testing.assert_array_equal(load_model(data / "part").params, load_model(data / "full").params)
    # and a GPU checkpoint resumes on the CPU
    train(_train_cfg(data, "part", max_steps=9, resume=True), **quiet)
    assert load_model(data / "part").checkpoint_dir.name == "ckpt_000009"


def test_train_on_cuda_without_gpu_is_a_clear_error(data):
    from fastllm.train import train

    if cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA|GPU"):
        train(_train_cfg(data, "x", device="cuda"), progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match="device"):
        train(_train_cfg(data, "x", device="tpu"), progress=False, log=lambda *a: None)


def test_cli_on_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    from fastllm.cli import main

    if cuda.is_available():
        pytest.skip("a GPU is present")
    ckpt = make_checkpoint(tmp_path)
    assert main(["sample", "--ckpt", str(ckpt), "--prompt", "the", "-n", "3", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastllm: error:") and ("GPU" in err or "CUDA" in err) and "Traceback" not in err


def test_cli_flags():
    from fastllm.cli import build_parser

    p = build_parser()
    a = p.parse_args(["train", "--data", "d", "--device", "cuda", "--cuda-dtype", "float32"])
    assert a.device == "cuda" and a.cuda_dtype == "float32"
    assert p.parse_args(["train", "--data", "d"]).device == "cpu"
    a = p.parse_args(["sample", "--ckpt", "c", "--device", "cuda", "--dtype", "float32"])
    assert a.device == "cuda" and a.dtype == "float32"
    with pytest.raises(SystemExit):
        p.parse_args(["sample", "--ckpt", "c", "--device", "tpu"])


def test_sample_cli_on_cuda_matches_cpu(monkeypatch, tmp_path, capsys):
    cuda_fake.install(monkeypatch, emulate_bf16=False)
    ckpt = make_checkpoint(tmp_path)
    from fastllm.cli import main

    outs = []
    for dev in ("cpu", "cuda"):
        assert main(["sample", "--ckpt", str(ckpt), "--prompt", "the ", "-n", "12", "--temperature", "0",
                     "--device", dev, "--dtype", "float32"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and len(outs[0]) > len("the ")


def make_checkpoint(tmp_path, n_embd: int = 32, n_head: int = 2):
    """A checkpoint folder with a small random model (sharp logits) and a byte-level tokenizer."""
    from fastllm.data import TOKENIZER_FILE
    from fastllm.optim import AdamW
    from fastllm.tokenizer import Tokenizer
    from fastllm.train import save_checkpoint

    # no special tokens: splitting on them needs the `regex` package, which GPU machines may lack
    tok = Tokenizer.train(["the cat sat on the mat, the dog ate the hat. " * 20], 300, pattern="gpt4",
                          special_tokens=[], progress=False)
    (tmp_path / "tok").mkdir()
    tok.save(tmp_path / "tok" / TOKENIZER_FILE)
    model = GPT(GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=2, n_head=n_head, n_embd=n_embd), seed=0)
    model.params *= 4.0
    tok_file = tmp_path / "tok" / TOKENIZER_FILE
    return save_checkpoint(tmp_path / "run", 0, model, AdamW(model), {"step": 0}, tok_file)


# ---- the fake keeps to the contract --------------------------------------------------------------------


def _called_bindings() -> set[str]:
    import re
    from pathlib import Path

    src = Path(cuda.__file__).read_text()
    return set(re.findall(r"_C\.cuda\.(\w+)\(", src)) - {"DeviceArray"}


def test_fake_has_every_binding_cuda_py_calls():
    import inspect

    missing = [n for n in sorted(_called_bindings()) if not callable(getattr(cuda_fake, n, None))]
    assert not missing, f"tests/cuda_fake.py lacks {missing}"
    for n in ("from_numpy", "device_count", "synchronize"):
        assert callable(getattr(cuda_fake, n))
    assert list(inspect.signature(cuda_fake.adamw_step).parameters)[:5] == ["params", "m", "v", "grads",
                                                                            "params_copy"]


def test_fake_signatures_match_the_real_bindings():
    """With a CUDA build (no GPU needed): every binding the fake imitates takes the same argument names in the
    same order (read from pybind11's signature line), so the fake cannot drift from csrc/bindings_cuda*.cpp."""
    import inspect
    import re
    import warnings

    if not cuda.is_built():
        pytest.skip("fastllm built without CUDA: no real bindings to compare with")
    real = cuda._C.cuda
    absent = sorted(n for n in _called_bindings() if not hasattr(real, n))
    mismatched = {}
    for n in sorted(_called_bindings() - set(absent)):
        doc = (getattr(real, n).__doc__ or "").strip()
        m = re.match(rf"{n}\((.*?)\) ->", doc)
        if not m:
            continue  # overloaded or undocumented: nothing to compare
        names = re.findall(r"(?:^|, )(\w+):", m.group(1))
        if not names or names[0] == "arg0":
            continue  # bound without py::arg names
        fake = list(inspect.signature(getattr(cuda_fake, n)).parameters)
        # cuda.py passes arguments by position: a different count, or the same names in another order, is a
        # real disagreement; other spellings of the names are only reported
        if len(names) != len(fake) or (set(names) == set(fake) and names != fake):
            mismatched[n] = (names, fake)
        elif names != fake:
            warnings.warn(f"{n}: the binding names its arguments {names}, the fake {fake}", stacklevel=1)
    assert not mismatched, f"binding arguments (real, fake) disagree: {mismatched}"
    if absent:
        pytest.skip(f"not bound yet in this build: {absent}")
