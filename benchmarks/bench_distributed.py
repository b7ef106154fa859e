"""Data-parallel training (fastllm.distributed) on this machine, and NCCL's all-reduce bandwidth on GPUs.

CPU: the same pre-training run -- a global batch of 2 micro-batches of BxT tokens per step -- as 1 process x 2
OpenMP threads (gradient accumulation) and as `mpiexec -n 2` x 1 thread (one micro-batch per rank, one all-reduce
of the flat gradient per step), and 1 process x 1 thread for reference, run alternately (interleaved rounds, each a
fresh `fastllm train` run in a subprocess); tokens/s from the median per-step time after the first steps. For the
2-rank runs, rank 0's time per step in the gradient all-reduce (fastllm.distributed.reduce_gradients) and in the
first collective of the step (the sum of the step's statistics: where a rank waits for a slower one) gives their
share of the step.
    python benchmarks/bench_distributed.py [--quick]
GPU (a CUDA build of fastllm, a GPU, NCCL from `pip install "fastllm[nccl]"`): in-place float32 all-reduce on
DeviceArrays, 1 MiB .. 256 MiB, algorithm and bus bandwidth (NCCL's definitions). One process: a 1-rank
communicator (the code path; the "bandwidth" is a local copy); under mpiexec, one rank per GPU:
    python benchmarks/bench_distributed.py --nccl
    mpiexec -n 8 python benchmarks/bench_distributed.py --nccl
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))

from common import header, load_note, print_table  # noqa: E402

from fastllm import distributed  # noqa: E402
from fastllm.data import write_shard  # noqa: E402

WARMUP_STEPS = 3  # per-step times after these


def worker(data: str, out: str, preset: str, B: int, T: int, steps: int, threads: int) -> None:
    """One run (under mpiexec: one rank of it); rank 0 writes OUT/bench.json with the per-step times."""
    from fastllm.train import TrainConfig, train

    waits, comms = [], []
    reduce_gradients, sum_stats = distributed.reduce_gradients, distributed.MPIWorld.sum_stats

    def timed_reduce(*a, **k):
        t0 = time.perf_counter()
        r = reduce_gradients(*a, **k)
        comms.append(time.perf_counter() - t0)
        return r

    def timed_stats(self, *a, **k):
        t0 = time.perf_counter()
        r = sum_stats(self, *a, **k)
        waits.append(time.perf_counter() - t0)
        return r

    distributed.reduce_gradients, distributed.MPIWorld.sum_stats = timed_reduce, timed_stats
    cfg = TrainConfig(data=data, out=out, model=preset, batch_size=B, seq_len=T, total_batch_tokens=2 * B * T,
                      max_steps=steps, eval_every=0, ckpt_every=0, threads=threads, warmup_steps=2)
    train(cfg, progress=False, log=lambda *a: None)
    world = distributed.world()
    if world.is_main:
        rows = [json.loads(x) for x in (Path(out) / "log.jsonl").read_text().splitlines()]
        dt = [r["dt"] for r in rows if "dt" in r]
        Path(out, "bench.json").write_text(json.dumps({"dt": dt, "comm": comms, "wait": waits, "ranks": world.size}))


CONFIGS = ((1, 2), (2, 1), (1, 1))  # (ranks, threads per rank)


def one_run(mpiexec: str | None, ranks: int, threads: int, data: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(data), str(out), args.model, str(args.batch_size),
           str(args.seq_len), str(args.steps), str(threads)]
    if ranks > 1:
        cmd = [mpiexec, "-n", str(ranks), *cmd]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run(cmd, check=True, env=env, timeout=1800)
    r = json.loads((out / "bench.json").read_text())
    skip = slice(WARMUP_STEPS, None)
    return {"dt": statistics.median(r["dt"][skip]),
            "comm": statistics.median(r["comm"][skip]) if r["ranks"] > 1 else 0.0,
            "wait": statistics.median(r["wait"][skip]) if r["ranks"] > 1 else 0.0}


def cpu(args) -> None:
    mpiexec = distributed.mpiexec()
    print(header(f"data-parallel training: 1 rank x 2 threads vs 2 ranks x 1 thread ({args.model}, "
                 f"2 micro-batches of {args.batch_size}x{args.seq_len} per step)", 2))
    if mpiexec is None:
        print("2 ranks: skipped (no mpiexec: pip install \"fastllm[mpi]\")")
    tokens = 2 * args.batch_size * args.seq_len
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "data"
        data.mkdir()
        write_shard(data / "train_000000.bin", np.random.default_rng(0).integers(0, args.vocab, 2_000_000),
                    args.vocab)
        runs: dict[tuple[int, int], list[dict]] = {c: [] for c in CONFIGS if c[0] == 1 or mpiexec is not None}
        for r in range(args.rounds):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]  # alternate which goes first
            for ranks, threads in order:
                out = Path(d) / f"run{ranks}x{threads}_{r}"
                runs[ranks, threads].append(one_run(mpiexec, ranks, threads, data, out, args))
    rows, tok_s = [], {}
    for (ranks, threads), rs in runs.items():
        dt = statistics.median(x["dt"] for x in rs)
        comm, wait = statistics.median(x["comm"] for x in rs), statistics.median(x["wait"] for x in rs)
        tok_s[ranks, threads] = tokens / dt
        rows.append([f"{ranks} x {threads}", f"{dt * 1e3:.1f}", f"{tokens / dt:,.0f}",
                     f"{comm * 1e3:.2f} ({comm / dt:.1%})" if ranks > 1 else "-",
                     f"{wait * 1e3:.2f} ({wait / dt:.1%})" if ranks > 1 else "-"])
    print_table(rows, ["ranks x threads", "ms/step", "tok/s", "all-reduce ms (share)", "wait ms (share)"])
    if (2, 1) in tok_s:
        print(f"tok/s of 2 ranks x 1 thread / 1 rank x 2 threads: {tok_s[2, 1] / tok_s[1, 2]:.2f}x, / 1 rank x 1 "
              f"thread: {tok_s[2, 1] / tok_s[1, 1]:.2f}x (medians of {args.rounds} interleaved runs each; "
              f"after: {load_note()})")


def nccl_bandwidth(quick: bool) -> None:
    from fastllm import cuda, nccl

    why = "fastllm has no CUDA build or sees no GPU" if not cuda.is_available() else \
        None if nccl.is_available() else "no libnccl.so.2 (pip install \"fastllm[nccl]\")"
    world = distributed.world()
    if why:
        print(f"NCCL all-reduce: skipped ({why})")
        return
    if world.size > 1:
        world.use_device("cuda")
        comm = world.nccl
    else:
        comm = nccl.Communicator(nccl.unique_id(), 1, 0)
    n = comm.nranks
    if world.is_main:
        print(header(f"NCCL {nccl.version()} all-reduce, float32, in place, {n} rank(s)", 0))
    rows = []
    for mib in (1, 16, 64) if quick else (1, 4, 16, 64, 256):
        x = cuda.zeros((mib * 2**20 // 4,), "float32")
        for _ in range(3):
            comm.all_reduce(x)
        cuda.synchronize()
        times = []
        for _ in range(10 if quick else 30):
            t0 = time.perf_counter()
            comm.all_reduce(x)
            cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        alg = mib * 2**20 / t / 1e9
        rows.append([f"{mib} MiB", f"{t * 1e6:.0f}", f"{alg:.1f}", f"{alg * 2 * (n - 1) / n:.1f}"])
    if world.is_main:
        print_table(rows, ["size", "us", "algbw GB/s", "busbw GB/s"])
        if n == 1:
            print("one rank: NCCL's code path ran; the bandwidth between GPUs needs mpiexec -n N on N GPUs")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        d, o, preset, B, T, steps, threads = sys.argv[2:9]
        worker(d, o, preset, int(B), int(T), int(steps), int(threads))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    p.add_argument("--nccl", action="store_true", help="NCCL all-reduce bandwidth on GPUs instead")
    p.add_argument("--model", default="mini", help="preset (default mini)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args()
    if args.nccl:
        nccl_bandwidth(args.quick)
        return
    args.steps = args.steps or (8 if args.quick else 20)
    args.rounds = args.rounds or (2 if args.quick else 5)
    cpu(args)


if __name__ == "__main__":
    main()
