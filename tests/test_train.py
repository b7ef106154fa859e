"""Training loop: loss falls, checkpoints load, a killed run resumes bit-identically, NaN stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fastllm.checkpoint import load_model
from fastllm.data import write_shard
from fastllm.train import TrainConfig, TrainingError, train

V = 48


def learnable_shards(folder, n=6000):
    """A predictable stream (next = 5*cur + 3 mod V, restarting at random points) so the loss can fall."""
    rng = np.random.default_rng(0)
    toks = np.empty(n, np.int64)
    cur = 0
    for i in range(n):
        cur = rng.integers(V) if i % 97 == 0 else (5 * cur + 3) % V
        toks[i] = cur
    write_shard(folder / "train_000000.bin", toks[:5000], V)
    write_shard(folder / "val_000000.bin", toks[5000:], V)


def config(tmp_path, **kw):
    base = dict(data=str(tmp_path / "data"), out=str(tmp_path / "out"), model="tiny", batch_size=4, seq_len=32,
                max_steps=30, lr=3e-3, warmup_steps=5, eval_every=10, eval_batches=4, ckpt_every=10, threads=2)
    return TrainConfig(**{**base, **kw})


@pytest.fixture
def data(tmp_path):
    (tmp_path / "data").mkdir()
    learnable_shards(tmp_path / "data")
    return tmp_path


def test_loss_falls_and_outputs_exist(data):
    s = train(config(data, total_batch_tokens=256), progress=False, log=lambda *a: None)
    assert s["final_loss"] < s["first_loss"] - 1.0, s
    assert s["val_loss"] < np.log(V) - 1.0
    out = data / "out"
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(30))
    model = load_model(out)  # latest checkpoint
    assert model.config.vocab_size == V and model.checkpoint_dir.name == "ckpt_000030"


def _losses(out):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r], [(r["step"], r["val_loss"]) for r in rows
                                                                  if "val_loss" in r]


def _cli(cfg, *extra):
    args = [sys.executable, "-m", "fastllm", "train", "--no-progress"]
    for k, v in vars(cfg).items():
        if v is None or v is False:
            continue
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return args + list(extra)


def test_modern_architecture_from_flags_trains_and_resumes(data, capsys):
    """`fastllm train --model nano` with architecture flags: the checkpoint records them, the loss falls, and a
    resumed run continues from the checkpoint's architecture."""
    from fastllm.cli import main

    out = data / "modern"
    args = ["train", "--no-progress", "--data", str(data / "data"), "--out", str(out), "--model", "nano",
            "--n-embd", "32", "--n-head", "2", "--n-kv-head", "1", "--mlp", "relu2", "--no-tie-embeddings",
            "--logit-softcap", "20", "--batch-size", "4", "--seq-len", "32", "--max-steps", "30", "--lr", "3e-3",
            "--warmup-steps", "5", "--eval-every", "10", "--eval-batches", "4", "--ckpt-every", "10", "--threads", "2"]
    assert main(args) == 0
    cfg = load_model(out).config
    assert (cfg.positions, cfg.norm, cfg.mlp, cfg.kv_heads, cfg.tie_embeddings, cfg.logit_softcap) == \
        ("rope", "rmsnorm", "relu2", 1, False, 20.0)
    losses, val = _losses(out)
    assert losses[-1][1] < losses[0][1] - 1.0 and val[-1][1] < np.log(V) - 1.0, (losses, val)
    assert main(args[:args.index("--max-steps")] + ["--max-steps", "35", "--resume"]) == 0
    assert load_model(out).checkpoint_dir.name == "ckpt_000035"
    capsys.readouterr()
    assert main(args[:-2] + ["--n-kv-head", "3", "--out", str(data / "bad")]) == 1
    assert "n_kv_head=3 must divide n_head=2" in capsys.readouterr().err


def test_olmo2_style_norms_from_flags_train_and_save_for_transformers(data, tmp_path):
    """`--no-pre-norms --post-norms --qk-norm --qk-norm-over all`: OLMo 2's block, trained from scratch (the loss
    falls), and `fastllm convert --to hf` writes an Olmo2ForCausalLM that transformers computes the same."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from fastllm.cli import main

    out = data / "olmo"
    assert main(["train", "--no-progress", "--data", str(data / "data"), "--out", str(out), "--model", "nano",
                 "--n-embd", "32", "--n-head", "2", "--no-pre-norms", "--post-norms", "--qk-norm", "--qk-norm-over",
                 "all", "--batch-size", "4", "--seq-len", "32", "--max-steps", "30", "--lr", "3e-3", "--warmup-steps",
                 "5", "--eval-every", "0", "--ckpt-every", "30", "--threads", "2"]) == 0
    model = load_model(out)
    cfg = model.config
    assert (cfg.pre_norms, cfg.post_norms, cfg.qk_norm, cfg.qk_norm_over) == (False, True, True, "all")
    losses, _ = _losses(out)
    assert losses[-1][1] < losses[0][1] - 0.4, losses  # (slower than pre-norms at this size and lr: it learns)
    assert main(["convert", str(out), str(tmp_path / "hf"), "--to", "hf"]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Olmo2ForCausalLM"
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        want = theirs(torch.as_tensor(ids)).logits.numpy()
    assert np.abs(model.eval().forward(ids) - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


def test_killed_run_resumes_bit_identically(data):
    full = config(data, out=str(data / "full"), max_steps=12, ckpt_every=3, eval_every=4)
    train(full, progress=False, log=lambda *a: None)

    killed = config(data, out=str(data / "killed"), max_steps=12, ckpt_every=3, eval_every=4)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_cli(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (data / "killed" / "ckpt_000006").exists():  # kill it between checkpoints
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (data / "killed" / "ckpt_000012").exists()
    resumed = config(data, out=str(data / "killed"), max_steps=12, ckpt_every=3, eval_every=4, resume=True)
    train(resumed, progress=False, log=lambda *a: None)
    assert _losses(data / "killed") == _losses(data / "full")  # bit-identical floats
    a, b = load_model(data / "full"), load_model(data / "killed")
    assert np.array_equal(a.params, b.params)


def test_nan_stops_and_keeps_last_checkpoint(data):
    train(config(data, max_steps=4, ckpt_every=2), progress=False, log=lambda *a: None)
    with pytest.raises(TrainingError, match="not finite.*ckpt_") as e:
        train(config(data, lr=1e12, grad_clip=0.0, max_steps=40, ckpt_every=1, warmup_steps=1, resume=True),
              progress=False, log=lambda *a: None)
    model = load_model(data / "out")
    assert np.isfinite(model.params).all()
    assert str(model.checkpoint_dir) in str(e.value)


def test_corrupt_checkpoint_names_the_file(data):
    train(config(data, max_steps=2, ckpt_every=2, eval_every=0), progress=False, log=lambda *a: None)
    f = data / "out" / "ckpt_000002" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_model(data / "out")


def test_bad_train_config(data):
    with pytest.raises(ValueError, match="multiple"):
        train(config(data, total_batch_tokens=100), progress=False, log=lambda *a: None)
    with pytest.raises(ValueError, match="preset"):
        train(config(data, model="nope"), progress=False, log=lambda *a: None)


def test_safetensors_bf16_and_bad_dtype(tmp_path):
    import json
    import struct

    from fastllm.fileio import load_safetensors

    x = np.array([1.5, -2.25, 3.0e-3], np.float32)
    bf16 = (x.view(np.uint32) >> 16).astype("<u2")  # exact for these values' top halves
    hdr = json.dumps({"w": {"dtype": "BF16", "shape": [3], "data_offsets": [0, 6]}}).encode()
    (tmp_path / "a.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + bf16.tobytes())
    got, _ = load_safetensors(tmp_path / "a.safetensors")
    np.testing.assert_array_equal(got["w"], (bf16.astype(np.uint32) << 16).view(np.float32))
    assert got["w"].dtype == np.float32 and abs(got["w"][0] - 1.5) < 1e-6
    hdr = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [3], "data_offsets": [0, 3]}}).encode()
    (tmp_path / "b.safetensors").write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"abc")
    with pytest.raises(ValueError, match="b.safetensors.*'w'.*unsupported dtype 'F8_E4M3'"):
        load_safetensors(tmp_path / "b.safetensors")


# ---- bad config values: one clear error, from the API and the CLI alike (issue 23) --------------------------------


def _cli_error(capsys, argv) -> str:
    """Run the CLI in-process; it must fail with exactly one `fastllm: error:` line. Returns that line."""
    from fastllm.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastllm: error: ") and err.count("\n") == 1, err
    return err


def test_negative_total_batch_tokens_is_refused(data, capsys):
    """Issue 23 item 9: --total-batch-tokens -64 ran no forward/backward, logged loss 0.0 and saved a checkpoint."""
    out = data / "neg"
    err = _cli_error(capsys, ["train", "--data", str(data / "data"), "--out", str(out), "--model", "tiny",
                              "--batch-size", "2", "--seq-len", "32", "--max-steps", "2", "--total-batch-tokens",
                              "-64", "--no-progress"])
    assert "total_batch_tokens must be an integer >= 1, got -64" in err
    assert not out.exists()


def test_ckpt_every_zero_saves_only_the_last_checkpoint(data):
    """--ckpt-every 0 raised ZeroDivisionError; it now means: only the checkpoint at the end."""
    train(config(data, max_steps=3, ckpt_every=0, eval_every=0), progress=False, log=lambda *a: None)
    assert sorted(p.name for p in (data / "out").iterdir() if p.name.startswith("ckpt_")) == ["ckpt_000003"]


@pytest.mark.parametrize("field,value,match", [
    ("lr", 0.0, r"lr must be a number in \(0"),
    ("lr", float("nan"), "lr must be"),
    ("warmup_steps", -1, "warmup_steps must be an integer >= 0"),
    ("eval_every", -5, "eval_every must be an integer >= 0"),
    ("ckpt_every", -1, "ckpt_every must be an integer >= 0"),
    ("keep_ckpts", 0, "keep_ckpts must be an integer >= 1"),
    ("batch_size", 0, "batch_size must be an integer >= 1"),
    ("max_steps", 2.5, "max_steps must be an integer"),
    ("n_head", 0, "n_head must be an integer >= 1"),
    ("threads", 0, "threads must be an integer >= 1"),
    ("seed", -1, "seed must be an integer >= 0"),
    ("beta2", 1.0, r"beta2 must be a number in \[0, 1\)"),
    ("grad_clip", -1.0, "grad_clip must be"),
    ("device", "tpu", "device must be one of"),
    ("dtype", "float16", "dtype must be one of"),
    ("model", "nope", "unknown preset"),
    ("total_batch_tokens", 100, "multiple of batch_size"),
])
def test_bad_config_values_name_the_field(tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **{field: value})


def test_out_that_is_a_file(data, capsys):
    (data / "afile").write_text("x")
    err = _cli_error(capsys, ["train", "--data", str(data / "data"), "--out", str(data / "afile"), "--no-progress"])
    assert "out:" in err and "afile exists and is not a folder" in err
    from fastllm.data import prepare

    with pytest.raises(ValueError, match="afile exists and is not a folder"):
        prepare(None, data / "tok.tiktoken", data / "afile", progress=False)


def test_device_cuda_without_a_gpu_is_one_error_line(data, capsys):
    from fastllm import cuda

    if cuda.is_available():
        pytest.skip("a GPU is present")
    err = _cli_error(capsys, ["train", "--data", str(data / "data"), "--out", str(data / "o"), "--device", "cuda",
                              "--no-progress"])
    assert "CUDA" in err or "GPU" in err
    assert not (data / "o").exists()  # refused before anything is written
    err = _cli_error(capsys, ["sft", "--base", str(data / "none"), "--data", str(data / "none.jsonl"), "--out",
                              str(data / "o"), "--device", "cuda", "--no-progress"])
    assert ("CUDA" in err or "GPU" in err) and not (data / "o").exists()


def test_resume_from_a_damaged_checkpoint_names_the_file(data):
    train(config(data, max_steps=2, ckpt_every=2, eval_every=0), progress=False, log=lambda *a: None)
    state = data / "out" / "ckpt_000002" / "state.json"
    good = json.loads(state.read_text())
    for broken, match in (("{", "corrupt JSON"), (json.dumps({**good, "rng": None}), "'rng' is missing"),
                          (json.dumps({**good, "stage": {"loader": {"pos": 1}}}), "bad data-loader state")):
        state.write_text(broken)
        with pytest.raises(ValueError, match=rf"ckpt_000002.state.json:.*{match}"):
            train(config(data, max_steps=4, ckpt_every=2, eval_every=0, resume=True), progress=False,
                  log=lambda *a: None)


def test_device_cuda_without_a_gpu_from_the_api_and_sample(data, capsys):
    """train() raises before reading the data; `fastllm sample --device cuda` is one error line too."""
    from fastllm import cuda
    from fastllm.cli import main

    if cuda.is_available():
        pytest.skip("a GPU (or the CUDA emulator) is present")
    with pytest.raises(RuntimeError, match="CUDA|GPU"):
        train(config(data, device="cuda"), progress=False, log=lambda *a: None)
    from test_cuda_model import make_checkpoint

    ckpt = make_checkpoint(data)
    assert main(["sample", "--ckpt", str(ckpt), "--prompt", "the", "-n", "3", "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastllm: error:") and ("GPU" in err or "CUDA" in err) and "Traceback" not in err


def test_cli_device_flags():
    from fastllm.cli import build_parser

    p = build_parser()
    a = p.parse_args(["train", "--data", "d", "--device", "cuda", "--dtype", "float32"])
    assert a.device == "cuda" and a.dtype == "float32"
    assert p.parse_args(["train", "--data", "d"]).device == "cpu"
    a = p.parse_args(["sample", "--ckpt", "c", "--device", "cuda", "--dtype", "float32"])
    assert a.device == "cuda" and a.dtype == "float32"
    with pytest.raises(SystemExit):
        p.parse_args(["sample", "--ckpt", "c", "--device", "tpu"])


def test_cpu_bf16_mixed_precision_follows_fp32(data, capsys, bf16_gemm):
    """`fastllm train --dtype bfloat16` on the CPU: bf16 matmuls (operands rounded, fp32 sums), fp32 master weights,
    AdamW state, norms, attention and loss. Its loss curve follows the fp32 run's within bf16 noise (and is not the
    fp32 run: the precision is used), and the checkpoint is float32 like any other. On every bf16 GEMM kernel."""
    from fastllm.cli import main

    s32 = train(config(data, out=str(data / "fp32")), progress=False, log=lambda *a: None)
    args = _cli(config(data, out=str(data / "bf16")), "--dtype", "bfloat16")[3:]
    assert main(args) == 0
    assert "(bfloat16 compute, float32 master weights and AdamW state)" in capsys.readouterr().out
    (steps, l32), (steps16, l16) = zip(*_losses(data / "fp32")[0]), zip(*_losses(data / "bf16")[0])
    assert steps == steps16 and l16 != l32
    np.testing.assert_allclose(l16, l32, rtol=1e-2)
    assert l16[-1] < l16[0] - 1.0 and s32["final_loss"] < s32["first_loss"] - 1.0
    assert load_model(data / "bf16").params.dtype == np.float32


def test_a_fresh_run_into_a_folder_with_checkpoints_warns(data):
    """Without --resume, a run into a folder holding an earlier run's checkpoints says so (they are kept: a
    forgotten --resume must lose nothing), naming the newest; with --resume it continues that run instead."""
    out = str(data / "again")
    train(config(data, out=out, max_steps=2, ckpt_every=1), progress=False, log=lambda *a: None)
    logs = []
    train(config(data, out=out, max_steps=1), progress=False, log=logs.append)
    assert any("warning" in str(x) and "earlier run" in str(x) and "ckpt_000002" in str(x) for x in logs), logs
    logs.clear()
    train(config(data, out=out, max_steps=3, resume=True), progress=False, log=logs.append)
    assert not any("earlier run" in str(x) for x in logs) and any("resuming from" in str(x) for x in logs)


def test_val_split_shorter_than_a_window_warns_and_trains(data, capsys):
    """A val split shorter than one window of T+1 tokens (a small corpus, a long --seq-len) trains without the
    validation loss, with a warning saying so (it stopped before the first step); a val split of another vocabulary
    than the train split is refused by name."""
    logs = []
    s = train(config(data, seq_len=1000, batch_size=1, max_steps=2), progress=False, log=logs.append)
    assert np.isnan(s["val_loss"]) and s["steps"] == 2
    assert any("val_000000.bin" in line and "T+1=1001" in line and "no validation" in line for line in logs), logs
    from fastllm.cli import _print_summary

    _print_summary(s)  # the CLI's last lines say so too, not "val loss nan"
    out = capsys.readouterr().out
    assert "no validation" in out and "nan" not in out
    write_shard(data / "data" / "val_000000.bin", np.arange(200) % 40, 40)
    with pytest.raises(ValueError, match="val_000000.bin.*40-token vocabulary.*train"):
        train(config(data, out=str(data / "other")), progress=False, log=lambda *a: None)
