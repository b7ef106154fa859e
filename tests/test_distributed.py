"""Data-parallel training (fastllm.distributed, fastllm.nccl).

With MPI (`mpiexec -n 2`, one thread per rank, tiny models): 2 ranks give the per-step losses of 1 process with 2
micro-batches, with and without ZeRO-1, to float32 rounding (the gradients are summed in another order: rtol 1e-6);
a run saved with 2 ranks resumes with 1 or 2 and continues the uninterrupted curve; SFT and the reward model match
their 1-process runs the same way, GRPO runs; a rank that raises, hangs or stops answering ends the job within
seconds with that rank named (one that exits before MPI starts: after FASTLLM_DIST_TIMEOUT); mismatched settings
are refused. Skipped, with the reason, without an MPI launcher. Without a GPU: NCCL's library discovery, argument
and dtype mapping, and error messages; one process never imports mpi4py."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_train import learnable_shards

import fastllm
from fastllm import distributed, nccl
from fastllm.checkpoint import load_model, save
from fastllm.data import DataLoader, write_shard
from fastllm.fileio import load_safetensors
from fastllm.model import GPT, GPTConfig
from fastllm.optim import AdamW
from fastllm.rl import addition_preferences
from fastllm.tokenizer import Tokenizer
from fastllm.train import TrainConfig, mean_loss, train

MPIEXEC = distributed.mpiexec()
needs_mpi = pytest.mark.skipif(MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
                               reason="no MPI launcher (mpiexec) or no mpi4py: pip install \"fastllm[mpi]\"")
RTOL = 1e-6  # 2 ranks vs 1 process: the same float32 gradients summed in another order
WORKER = Path(__file__).with_name("mpi_worker.py")
# the subprocesses import this fastllm, whatever their working folder (PYTHONPATH may be relative)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(Path(fastllm.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}


def mpirun(*commands: list[str], env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    """`mpiexec -n 1 CMD1 : -n 1 CMD2 ...` (one rank per command; a single command gets 2 ranks)."""
    args = [MPIEXEC, "-n", "2", *commands[0]] if len(commands) == 1 else \
        [MPIEXEC] + [a for i, c in enumerate(commands) for a in ([":"] if i else []) + ["-n", "1", *c]]
    return subprocess.run(args, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def fastllm_cmd(command: str, **flags) -> list[str]:
    args = [sys.executable, "-m", "fastllm", command, "--no-progress"]
    for k, v in flags.items():
        if v is not None and v is not False:
            args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return args


def losses(out) -> tuple[np.ndarray, np.ndarray]:
    rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return tuple(np.array([r[k] for r in rows if k in r]) for k in ("loss", "val_loss"))


def assert_same_curve(a, b) -> None:
    (la, va), (lb, vb) = losses(a), losses(b)
    assert la.shape == lb.shape and va.shape == vb.shape, (la, lb)
    np.testing.assert_allclose(lb, la, rtol=RTOL)
    np.testing.assert_allclose(vb, va, rtol=RTOL)


# ---- one process, no MPI -----------------------------------------------------------------------------------


def test_one_world_shares_everything():
    w = distributed.World()
    assert (w.rank, w.size, w.is_main, w.distributed) == (0, 1, True, False)
    assert w.share([1, 2, 3]) == [1, 2, 3] and w.bounds(10) == (0, 10)
    assert w.sum_stats(3, {"loss": 6.0}) == (3, {"loss": 6.0})
    assert w.average([1.0, 2.0, 4.0], lambda part: float(np.mean(part))) == pytest.approx(7 / 3)
    assert w.rank_seed(5) == 5 and w.default_threads() is None


def test_bounds_split_evenly_last_rank_takes_the_rest():
    w = distributed.World()
    w.size = 3
    parts = [w.bounds(10, r) for r in range(3)]
    assert parts == [(0, 3), (3, 6), (6, 10)]
    w.rank = 1
    assert w.share(list("abcdefghij")) == list("def") and w.rank_seed(5) != 5


@pytest.mark.parametrize("masks, want", [
    ([range(64)] * 4, [16] * 4),  # no binding: the node's 64 CPUs shared by its 4 ranks
    ([range(8)] * 4, [2] * 4),  # a container's cpuset of 8 CPUs on a 64-CPU host (os.cpu_count() says 64)
    ([range(32)] * 2 + [range(32, 64)] * 2, [16] * 4),  # bound to sockets, 2 ranks on each
    ([range(16 * r, 16 * r + 16) for r in range(4)], [16] * 4),  # bound to cores of their own
    ([None] * 4, [16] * 4)])  # no sched_getaffinity (macOS): os.cpu_count() / ranks on the node
def test_default_threads_share_the_cpus_a_rank_may_run_on(monkeypatch, masks, want):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    got = []
    for r, mask in enumerate(masks):
        w = object.__new__(distributed.MPIWorld)  # 4 ranks of one node, without MPI
        w.local_rank, w.local_size, w.node_cpus = r, 4, [None if m is None else list(m) for m in masks]
        if mask is not None:
            monkeypatch.setattr(os, "sched_getaffinity", lambda pid, m=mask: set(m), raising=False)
        got.append(w.default_threads())
    assert got == want
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert w.default_threads() is None


@pytest.mark.parametrize("visible, gpus, want", [
    ([None] * 4, 4, [0, 1, 2, 3]),  # every rank sees the node's 4 GPUs: the local rank's
    (["0", "1", "2", "3"], 1, [0, 0, 0, 0]),  # srun --gpus-per-task 1: each sees its own GPU, as device 0
    (["0,1", "0,1", "2,3", "2,3"], 2, [0, 1, 0, 1]),  # pairs of ranks sharing a pair of GPUs
    ([None] * 4, 2, "4 ranks on this node but 2 GPU"),  # more ranks than GPUs
    (["0"] * 2 + ["1"] * 2, 1, "2 ranks on this node but 1 GPU")])  # two ranks on each GPU
def test_each_rank_takes_a_gpu_of_its_own(monkeypatch, visible, gpus, want):
    """use_device("cuda") without GPUs: a fake CUDA module counts and records the device each rank sets, and NCCL's
    setup, which follows, is cut short."""
    picked = []
    fake = type("FakeCuda", (), {"device_count": lambda: gpus, "set_device": picked.append})
    monkeypatch.setattr(fastllm.cuda, "_require", lambda: fake)

    def no_nccl():
        raise RuntimeError("stop before NCCL")

    monkeypatch.setattr(nccl, "load", no_nccl)
    for r in range(4):
        w = object.__new__(distributed.MPIWorld)  # 4 ranks of one node, without MPI
        w.local_rank, w.local_size, w.node_gpus, w.nccl = r, 4, visible, None
        kind, match = (ValueError, want) if isinstance(want, str) else (RuntimeError, "stop before NCCL")
        with pytest.raises(kind, match=match):
            w.use_device("cuda")
    assert picked == ([] if isinstance(want, str) else want)


def test_an_error_line_is_read_by_the_launcher_before_the_abort():
    # fail() waits until mpiexec has read the rank's stderr pipe: MPI_Abort right after the write lost the line
    r, w = os.pipe()
    got = []

    def reader():
        time.sleep(0.3)
        got.append(os.read(r, 100))

    with open(w, "w") as stream:
        stream.write("fastllm: error: rank 1 of 2: boom\n")
        stream.flush()
        t0, thread = time.monotonic(), threading.Thread(target=reader)
        thread.start()
        distributed._drained(stream)
        assert got == [b"fastllm: error: rank 1 of 2: boom\n"] and 0.3 <= time.monotonic() - t0 < 5
        thread.join()
        stream.write("x")
        stream.flush()
        t0 = time.monotonic()
        distributed._drained(stream, deadline=0.2)  # nobody reads: it gives up after the deadline
        assert 0.2 <= time.monotonic() - t0 < 2
    os.close(r)


@pytest.mark.parametrize("env, size", [({}, None), ({"PMI_SIZE": "4"}, 4), ({"OMPI_COMM_WORLD_SIZE": "2"}, 2),
                                       ({"PMIX_RANK": "0"}, 0), ({"PMI_SIZE": "1"}, 1)])
def test_launched_size_from_the_launchers_environment(monkeypatch, env, size):
    for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(v, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert distributed.launched_size() == size


def test_one_process_never_imports_mpi4py(tmp_path):
    """Plain `python`, and mpiexec with one rank: training runs as before, mpi4py stays unimported."""
    (tmp_path / "data").mkdir()
    learnable_shards(tmp_path / "data")
    code = ("import sys; from fastllm.train import TrainConfig, train; "
            f"train(TrainConfig(data={str(tmp_path / 'data')!r}, out=sys.argv[1], model='tiny', batch_size=2, "
            "seq_len=16, max_steps=2, eval_every=0, threads=1), progress=False); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "a")], env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
    if MPIEXEC is not None:
        out = subprocess.run([MPIEXEC, "-n", "1", sys.executable, "-c", code, str(tmp_path / "b")], env=ENV,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("env, match", [
    ({"FASTLLM_DISTRIBUTED": "yes"}, "FASTLLM_DISTRIBUTED must be auto, mpi or off, got 'yes'"),
    ({"FASTLLM_DISTRIBUTED": "mpi", "FASTLLM_DIST_TIMEOUT": "-3"},
     "FASTLLM_DIST_TIMEOUT must be a number of seconds > 0, got '-3'")])
def test_bad_environment_is_one_error_line(tmp_path, env, match):
    if "FASTLLM_DIST_TIMEOUT" in env and importlib.util.find_spec("mpi4py") is None:
        pytest.skip("FASTLLM_DIST_TIMEOUT is read when MPI starts: needs mpi4py")
    out = subprocess.run(fastllm_cmd("train", data=tmp_path, out=tmp_path / "o"), env={**ENV, **env},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr == f"fastllm: error: {match}\n", out.stderr


def test_sharded_adamw_steps_equal_the_whole_one():
    """AdamW over parameter ranges (ZeRO-1's shards, cutting through tensors and decay groups) updates each range
    exactly as AdamW over all parameters does."""
    cfg = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8)
    whole = GPT(cfg, seed=1)
    n = whole.num_parameters
    cuts = [0, 97, n // 2, n - 5, n]
    parts = [GPT(cfg, seed=1) for _ in cuts[1:]]
    opts = [AdamW(m, 1e-2, shard=(lo, hi)) for m, lo, hi in zip(parts, cuts, cuts[1:])]
    opt = AdamW(whole, 1e-2)
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = rng.standard_normal(n).astype(np.float32)
        for m, o in [(whole, opt)] + list(zip(parts, opts)):
            m.zero_grad()
            m.grads[:] = g
            o.step(grad_scale=0.5)
    for m, lo, hi in zip(parts, cuts, cuts[1:]):
        np.testing.assert_array_equal(m.params[lo:hi], whole.params[lo:hi])
    assert opts[1].state_dict()["m"].shape == (n // 2 - 97,)
    with pytest.raises(ValueError, match="shard"):
        AdamW(whole, shard=(5, n + 1))
    with pytest.raises(ValueError, match=r"the shard \(0, 97\)"):
        opts[0].load_state_dict(opt.state_dict())


def test_info_reports_mpi_and_nccl():
    d = fastllm.info()
    for key in ("mpi4py", "mpi", "mpiexec", "nccl", "nccl_library"):
        assert key in d, key
    if importlib.util.find_spec("mpi4py") is not None:
        assert d["mpi4py"] and d["mpi"]
    out = subprocess.run([sys.executable, "-m", "fastllm", "info"], env=ENV, capture_output=True, text=True,
                         timeout=60)
    assert "mpi4py" in out.stdout and "nccl" in out.stdout


# ---- NCCL without a GPU: the library, argument checks, errors ----------------------------------------------


class FakeDeviceArray:
    """What nccl needs of a DeviceArray: a device pointer, an element count, a dtype."""

    def __init__(self, size: int, dtype: str = "float32", ptr: int = 4096):
        self.size, self.dtype, self.ptr = size, dtype, ptr


def test_nccl_argument_mapping():
    a, b = FakeDeviceArray(12, ptr=1 << 20), FakeDeviceArray(3, ptr=2 << 20)
    assert nccl.collective_args("all_reduce", a, a, 4) == (1 << 20, 1 << 20, 12, nccl.DTYPES["float32"])
    assert nccl.collective_args("reduce_scatter", a, b, 4) == (1 << 20, 2 << 20, 3, 7)  # count: per rank
    assert nccl.collective_args("all_gather", b, a, 4) == (2 << 20, 1 << 20, 3, 7)
    assert nccl.DTYPES["bfloat16"] == 9 and nccl.OPS == {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}
    with pytest.raises(ValueError, match="12 elements, not 3 ranks x 3"):
        nccl.collective_args("reduce_scatter", a, b, 3)
    with pytest.raises(ValueError, match="send has 12 elements but recv has 3"):
        nccl.collective_args("all_reduce", a, b, 4)
    with pytest.raises(TypeError, match="send is float32 but recv is bfloat16"):
        nccl.collective_args("all_reduce", a, FakeDeviceArray(12, "bfloat16"), 4)
    with pytest.raises(TypeError, match="recv must be a fastllm.cuda.DeviceArray .* host \\(numpy\\)"):
        nccl.collective_args("all_reduce", a, np.zeros(12, np.float32), 4)
    with pytest.raises(TypeError, match="dtype 'complex64'"):
        nccl.collective_args("all_reduce", FakeDeviceArray(2, "complex64"), FakeDeviceArray(2, "complex64"), 1)


def test_nccl_missing_library_names_what_was_tried(monkeypatch, tmp_path):
    bogus = tmp_path / "libnccl.so.2"
    bogus.write_bytes(b"not a library")
    monkeypatch.setenv("FASTLLM_NCCL_LIBRARY", str(bogus))
    assert nccl.candidates()[0] == str(bogus)
    monkeypatch.setattr(nccl, "candidates", lambda: [str(bogus), str(tmp_path / "absent.so")])
    nccl.load.cache_clear()
    try:
        with pytest.raises(nccl.NcclUnavailableError, match=r"fastllm\[nccl\].*libnccl.so.2.*absent.so"):
            nccl.load()
        assert nccl.info() == {"nccl": None, "nccl_library": nccl.info()["nccl_library"]}
        assert not nccl.is_available()
    finally:
        nccl.load.cache_clear()


@pytest.mark.skipif(not nccl.is_available(), reason="no libnccl.so.2: pip install \"fastllm[nccl]\"")
def test_nccl_library_without_a_gpu():
    """The real library: version, a unique id (no GPU needed), NCCL's own error text; a communicator needs a GPU."""
    assert nccl.version().count(".") == 2 and int(nccl.version().split(".")[0]) >= 2
    assert "nvidia" in nccl.load().path or "nccl" in nccl.load().path
    uid = nccl.unique_id()
    assert len(uid) == nccl.UNIQUE_ID_BYTES and uid != nccl.unique_id()
    with pytest.raises(nccl.NcclError, match="ncclTest failed: ncclInvalidArgument \\(invalid argument"):
        nccl._check(4, "ncclTest")
    with pytest.raises(ValueError, match="uid must be 128 bytes"):
        nccl.Communicator(b"short", 1, 0)
    with pytest.raises(ValueError, match="rank must be in"):
        nccl.Communicator(uid, 2, 2)
    if not fastllm.cuda.is_available():
        with pytest.raises(nccl.NcclError, match="ncclCommInitRank failed"):
            nccl.Communicator(uid, 1, 0)


# ---- MPI: 2 ranks -------------------------------------------------------------------------------------------

TRAIN = dict(model="tiny", batch_size=4, seq_len=32, total_batch_tokens=256, max_steps=10, lr=3e-3, warmup_steps=2,
             eval_every=5, eval_batches=4, ckpt_every=5, threads=1)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 10 steps (2 micro-batches of 4x32 tokens, checkpoints at 5 and 10) by 1 process, by 2 ranks and
    by 2 ranks with ZeRO-1."""
    d = tmp_path_factory.mktemp("dp")
    (d / "data").mkdir()
    learnable_shards(d / "data")
    threads = fastllm.get_num_threads()
    train(TrainConfig(data=str(d / "data"), out=str(d / "one"), **TRAIN), progress=False, log=lambda *a: None)
    fastllm.set_num_threads(threads)
    if MPIEXEC is not None:
        for out, zero in (("two", False), ("zero", True)):
            r = mpirun(fastllm_cmd("train", data=d / "data", out=d / out, zero=zero, **TRAIN))
            assert r.returncode == 0, r.stderr
            assert r.stdout.count("done: 10 steps") == 1, r.stdout  # rank 0 alone prints
    return d


@needs_mpi
@pytest.mark.parametrize("run", ["two", "zero"])
def test_two_ranks_take_the_steps_of_one_process(runs, run):
    assert_same_curve(runs / "one", runs / run)
    a, b = load_model(runs / "one"), load_model(runs / run)
    # Adam divides by sqrt(v): where a gradient is ~0, rounding moves the update by up to ~lr/10 (here 3e-4 x steps)
    np.testing.assert_allclose(b.params, a.params, rtol=1e-4, atol=1e-5)
    # the optimizer file holds the whole state (ZeRO-1: gathered from the shards)
    m1, meta1 = load_safetensors(runs / "one" / "ckpt_000010" / "optimizer.safetensors")
    m2, meta2 = load_safetensors(runs / run / "ckpt_000010" / "optimizer.safetensors")
    assert meta1["t"] == meta2["t"] == "10"
    np.testing.assert_allclose(m2["v"], m1["v"], rtol=1e-3, atol=1e-12)
    assert not list((runs / run).glob("*.tmp")) and (runs / run / "loss.png").is_file()


@needs_mpi
def test_validation_batches_are_shared_out(runs):
    """mean_loss (the validation loss of train and sft) with 2 ranks: each forwards its share of the 5 batches
    (2 and 3), and both get the mean over all 5 that 1 process gets."""
    code = ("import sys; from fastllm import distributed; from fastllm.data import DataLoader; "
            "from fastllm.model import GPT, GPTConfig; from fastllm.train import mean_loss; "
            "m = GPT(GPTConfig.preset('tiny', vocab_size=48), seed=0); calls = []; f = m.forward; "
            "m.forward = lambda *a: calls.append(1) or f(*a); "
            "loss = mean_loss(m, DataLoader(sys.argv[1], 'val', 2, 16, shuffle=False), 5); "
            "w = distributed.world(); got = w.allgather((len(calls), loss)); print(got if w.is_main else '')")
    r = mpirun([sys.executable, "-c", code, str(runs / "data")], timeout=60)
    assert r.returncode == 0, r.stderr
    (calls0, loss0), (calls1, loss1) = eval(r.stdout.strip())
    m = GPT(GPTConfig.preset("tiny", vocab_size=48), seed=0)
    want = mean_loss(m, DataLoader(runs / "data", "val", 2, 16, shuffle=False), 5)
    assert (calls0, calls1) == (2, 3) and loss0 == loss1 == pytest.approx(want, rel=RTOL), r.stdout


@needs_mpi
def test_saved_with_two_ranks_resumes_with_one_and_two(runs):
    """Runs killed after their step-5 checkpoint (the checkpoint holds the whole optimizer state either way): the
    ZeRO-1 one resumed by 1 process, the plain one by 2 ranks (bit-identical to the uninterrupted run) and by 2
    ranks with ZeRO-1; all continue the uninterrupted curve."""
    cut = {}
    for name, src in (("zero_to_one", "zero"), ("two_to_two", "two"), ("two_to_zero", "two")):
        cut[name] = runs / name
        shutil.copytree(runs / src, cut[name])
        shutil.rmtree(cut[name] / "ckpt_000010")
    threads = fastllm.get_num_threads()
    train(TrainConfig(data=str(runs / "data"), out=str(cut["zero_to_one"]), resume=True, **TRAIN), progress=False,
          log=lambda *a: None)
    fastllm.set_num_threads(threads)
    for name, zero in (("two_to_two", False), ("two_to_zero", True)):
        r = mpirun(fastllm_cmd("train", data=runs / "data", out=cut[name], resume=True, zero=zero, **TRAIN))
        assert r.returncode == 0 and "resuming from" in r.stdout, r.stderr
    for name in cut:
        assert_same_curve(runs / "two", cut[name])
    np.testing.assert_array_equal(losses(cut["two_to_two"])[0], losses(runs / "two")[0])
    np.testing.assert_array_equal(load_model(cut["two_to_two"]).params, load_model(runs / "two").params)


@needs_mpi
def test_resume_refuses_a_world_size_that_changes_the_default_batch(runs, tmp_path):
    flags = {**TRAIN, "total_batch_tokens": None, "max_steps": 2, "ckpt_every": 1, "eval_every": 0}
    r = mpirun(fastllm_cmd("train", data=runs / "data", out=tmp_path / "o", **flags))
    assert r.returncode == 0, r.stderr
    flags["max_steps"] = 3
    out = subprocess.run(fastllm_cmd("train", data=runs / "data", out=tmp_path / "o", resume=True, **flags), env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "trained with 256 tokens per step" in out.stderr, out.stderr
    assert "--total-batch-tokens 256" in out.stderr
    r = mpirun(fastllm_cmd("train", data=runs / "data", out=tmp_path / "o", **{**flags, "total_batch_tokens": 384}))
    assert r.returncode == 1 and "cannot share equally: make it a multiple of 256" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny byte-level GPT checkpoint with its tokenizer, for SFT, GRPO and the reward model."""
    d = tmp_path_factory.mktemp("base")
    tok = Tokenizer({bytes([b]): b for b in range(256)}, special_tokens={"<|endoftext|>": 256})
    tok.save(d / "tok.tiktoken")
    m = GPT(GPTConfig(block_size=32, vocab_size=257, n_layer=2, n_head=2, n_embd=32), seed=0)
    save(d / "base", 0, m, AdamW(m), {}, kind="train", tokenizer=d / "tok.tiktoken")
    chats = [{"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]}
             for w in ("abc", "bca", "cab", "acb", "bac", "cba", "aab", "abb", "bba", "bab", "aba", "baa")]
    (d / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (d / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in addition_preferences(40, 1, seed=0)))
    return d


@needs_mpi
@pytest.mark.parametrize("command", ["sft", "reward-model", "dpo"])
def test_sft_and_reward_model_two_ranks_match_one_process(base, tmp_path, command):
    """SFT: 2 ranks x 1 micro-batch vs 1 process x 2 (total_batch_tokens). Reward model and DPO: each step's pairs
    split between the ranks (weighted by their shares when uneven) vs all of them in one process."""
    if command == "sft":
        flags = dict(base=base / "base", data=base / "chats.jsonl", val_fraction=0.2, batch_size=2, seq_len=32,
                     total_batch_tokens=128, max_steps=6, eval_every=3, eval_batches=2, lr=3e-3, threads=1)
    else:
        flags = dict(base=base / "base", data=base / "prefs.jsonl", epochs=2, batch_size=7, eval_every=2, threads=1,
                     **({"lr": 1e-3} if command == "dpo" else {}))
    one = subprocess.run(fastllm_cmd(command, out=tmp_path / "one", **flags), env=ENV, capture_output=True, text=True,
                         timeout=90)
    assert one.returncode == 0, one.stderr
    r = mpirun(fastllm_cmd(command, out=tmp_path / "two", **flags))
    assert r.returncode == 0, r.stderr
    rows = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [sorted(r) for r in rows[0]] == [sorted(r) for r in rows[1]]
    for key in ("loss", "val_loss", "accuracy", "val_accuracy", "grad_norm"):
        a = [r[key] for r in rows[0] if key in r]
        np.testing.assert_allclose([r[key] for r in rows[1] if key in r], a, rtol=RTOL * 10, err_msg=key)


@needs_mpi
@pytest.mark.parametrize("task", ["mc", "bpb"])
def test_eval_task_two_ranks_match_one_process(base, tmp_path, task):
    """--eval-task with 2 ranks: each scores its share of the examples (an odd number: unequal shares), the records
    are gathered, and every evaluation logs what 1 process logs (and what evaluate() gives on the checkpoint)."""
    from fastllm.checkpoint import checkpoint_tokenizer
    from fastllm.eval import evaluate

    if task == "mc":
        rows = [{"context": w, "choices": [w[::-1], w, "zz"], "answer": 0} for w in ("abc", "bca", "cab", "aab", "bba")]
        data = tmp_path / "mc.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        data = tmp_path / "text.txt"
        data.write_text("abc cba<|endoftext|>bca acb bca<|endoftext|>cab bac")
    flags = dict(base=base / "base", data=base / "chats.jsonl", val_fraction=0.2, batch_size=2, seq_len=32,
                 total_batch_tokens=128, max_steps=4, eval_every=2, eval_batches=2, lr=3e-3, threads=1,
                 eval_task=task, eval_task_data=data)
    one = subprocess.run(fastllm_cmd("sft", out=tmp_path / "one", **flags), env=ENV, capture_output=True, text=True,
                         timeout=90)
    assert one.returncode == 0, one.stderr
    r = mpirun(fastllm_cmd("sft", out=tmp_path / "two", **flags))
    assert r.returncode == 0, r.stderr
    logged = [{row["step"]: {k: v for k, v in row.items() if k.startswith(task + "/")}
               for row in map(json.loads, (tmp_path / d / "log.jsonl").read_text().splitlines())
               if task + "/" + ("acc" if task == "mc" else "bpb") in row} for d in ("one", "two")]
    assert sorted(logged[0]) == sorted(logged[1]) == [0, 2, 4]
    for step in logged[0]:
        assert logged[1][step] == {k: pytest.approx(v, rel=1e-5) for k, v in logged[0][step].items()}, step
    model = load_model(tmp_path / "two")
    want = evaluate(model, checkpoint_tokenizer(model.checkpoint_dir), task, data=str(data))["metrics"]
    assert logged[1][4] == {f"{task}/{k}": pytest.approx(v, rel=1e-6) for k, v in want.items()}


@needs_mpi
@pytest.mark.parametrize("lora_r", [0, 4])
def test_grpo_two_ranks(base, tmp_path, lora_r):
    """GRPO on 2 ranks with ZeRO-1, training every weight or LoRA adapters (their gradients all-reduced, their AdamW
    state sharded)."""
    flags = dict(ckpt=base / "base", task="addition", digits=1, steps=3, prompts_per_step=4, group_size=4,
                 max_new_tokens=3, eval_every=3, eval_prompts=6, ckpt_every=2, threads=1, lora_r=lora_r)
    r = mpirun(fastllm_cmd("rl", out=tmp_path / "rl", zero=True, **flags))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("done: 3 GRPO steps") == 1
    rows = [json.loads(x) for x in (tmp_path / "rl" / "log.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "reward" in row]
    assert [row["step"] for row in steps] == [0, 1, 2]
    assert all(np.isfinite([row[k] for k in ("loss", "kl", "grad_norm", "reward_std", "accuracy")]).all()
               for row in steps)
    assert [row["step"] for row in rows if "eval_accuracy" in row] == [0, 3]
    assert load_model(tmp_path / "rl").checkpoint_dir.name == "ckpt_000003"
    r = mpirun(fastllm_cmd("rl", out=tmp_path / "odd", **{**flags, "prompts_per_step": 3}))
    assert r.returncode == 1 and "prompts_per_step=3 must be a multiple of the 2 ranks" in r.stderr, r.stderr


# ---- MPI: failures ------------------------------------------------------------------------------------------


def _one_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode != 0, r.stdout
    lines = [x for x in r.stderr.splitlines() if x.startswith("fastllm: error: ")]
    assert len(lines) == 1, f"exit {r.returncode}\nstderr: {r.stderr}\nstdout: {r.stdout[-3000:]}"
    for n in needles:
        assert n in lines[0], r.stderr


@needs_mpi
def test_an_error_on_one_rank_stops_all(runs, tmp_path):
    t0 = time.time()
    ok = fastllm_cmd("train", data=runs / "data", out=tmp_path / "a", **TRAIN)
    bad = fastllm_cmd("train", data=tmp_path / "nowhere", out=tmp_path / "a", **TRAIN)
    _one_error(mpirun(ok, bad, timeout=60), "rank 1 of 2", f"no train_*.bin shards in {tmp_path / 'nowhere'}")
    # mid-training, in a script (no CLI): the uncaught exception stops the other rank too
    r = mpirun([sys.executable, str(WORKER), "raise", str(runs / "data"), str(tmp_path / "b")], timeout=60)
    _one_error(r, "rank 1 of 2", "RuntimeError: boom on purpose")
    assert time.time() - t0 < 30


@needs_mpi
@pytest.mark.parametrize("mode, why", [("hang", "rank 1 has not arrived (busy outside any collective"),
                                       ("stop", "rank 1 does not answer")])
def test_a_rank_that_stops_answering_times_out(runs, tmp_path, mode, why):
    t0 = time.time()
    r = mpirun([sys.executable, str(WORKER), mode, str(runs / "data"), str(tmp_path / "o")],
               env={"FASTLLM_DIST_TIMEOUT": "2"}, timeout=60)
    _one_error(r, "rank 0 of 2: no progress for 2 s in ", "at step 3", why, "FASTLLM_DIST_TIMEOUT=2")
    assert time.time() - t0 < 30


@needs_mpi
def test_one_process_commands_under_mpiexec(tmp_path):
    """`mpiexec -n 2 fastllm demo` (prepare, sample, eval, ...) ran the whole command twice, both ranks writing the
    same files: refused with one line, nothing written. `fastllm info` reports each rank; -n 1 runs as usual."""
    r = mpirun(fastllm_cmd("demo", out=tmp_path / "demo"), timeout=60)
    _one_error(r, "rank 0 of 2: `fastllm demo` runs in one process, not as 2 MPI ranks", "with -n 1")
    assert not (tmp_path / "demo").exists()
    r = mpirun([sys.executable, "-m", "fastllm", "info"], timeout=60)
    assert r.returncode == 0, r.stderr
    ranks = sorted(line.split(None, 1)[1] for line in r.stdout.splitlines() if line.startswith("rank "))
    assert ranks == ["0 of 2 (local 0 of 2)", "1 of 2 (local 1 of 2)"], r.stdout
    r = subprocess.run([MPIEXEC, "-n", "1", sys.executable, "-m", "fastllm", "info"], env=ENV, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "mpi4py" in r.stdout and "rank " not in r.stdout, r.stderr


@needs_mpi
def test_a_rank_that_exits_before_mpi_starts_does_not_hang_the_others(runs, tmp_path):
    """A rank that ends before joining MPI (a bad flag, mpi4py or fastllm failing to import on its node) left the
    others in MPI_Init for ever (MPICH's mpiexec waits for it; MPI_Init holds the GIL, so no Python thread can
    help): they stop after FASTLLM_DIST_TIMEOUT, with a traceback ending in the function that starts MPI."""
    t0 = time.time()
    cmd = fastllm_cmd("train", data=runs / "data", out=tmp_path / "o", **TRAIN)
    r = mpirun(cmd, [*cmd, "--bogus"], env={"FASTLLM_DIST_TIMEOUT": "2"}, timeout=60)
    assert r.returncode != 0 and "unrecognized arguments: --bogus" in r.stderr, r.stderr
    assert "Timeout (0:00:02)!" in r.stderr and "in _init_mpi" in r.stderr, r.stderr
    assert time.time() - t0 < 30


@needs_mpi
def test_a_script_that_calls_info_first_exits_cleanly():
    """fastllm.info() before world() (a script logging its environment): MPI is then finalised at exit by an atexit
    hook, and the watchdog thread, still probing, made MPICH fail the job ("... after finalizing MPICH", exit 1)
    while a rank waited in MPI_Finalize for a slower one."""
    code = ("import time, fastllm; fastllm.info(); from fastllm import distributed; w = distributed.world(); "
            "w.barrier(); print('ok' if w.is_main else '', flush=True); time.sleep(2 * w.rank)")
    r = mpirun([sys.executable, "-c", code], timeout=60)
    assert r.returncode == 0 and "after finalizing" not in r.stderr, r.stderr
    assert r.stdout.split() == ["ok"], r.stdout


@needs_mpi
def test_mismatched_ranks_are_refused(runs, tmp_path):
    a = fastllm_cmd("train", data=runs / "data", out=tmp_path / "o", **TRAIN)
    b = fastllm_cmd("train", data=runs / "data", out=tmp_path / "o", **{**TRAIN, "lr": 1e-3})
    _one_error(mpirun(a, b, timeout=60), "rank 1 and rank 0 differ in their config: lr 0.001 vs 0.003")
    # the same command in two folders whose data/ differ (as on two nodes with their own copies)
    for name in ("x", "y"):
        (tmp_path / name / "data").mkdir(parents=True)
        learnable_shards(tmp_path / name / "data")
    write_shard(tmp_path / "y" / "data" / "train_000000.bin", np.arange(5000) % 48, 48)  # as many tokens, others
    cmd = fastllm_cmd("train", data="data", out=tmp_path / "o", **TRAIN)
    _one_error(mpirun(["-wdir", str(tmp_path / "x"), *cmd], ["-wdir", str(tmp_path / "y"), *cmd], timeout=60),
               "rank 1 and rank 0 differ in their data: next_batch")
