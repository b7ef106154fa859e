"""Data-parallel training over processes (ranks): MPI launches and connects them, NCCL sums GPU buffers.

`mpiexec -n N fastllm train ...` (or srun, or `mpiexec -hosts a,b ...`) starts N ranks; each holds the whole model,
takes a disjoint share of every global batch, and the gradients are summed over the ranks before the optimizer
step, which every rank applies alike -- so N ranks take the steps one process takes with gradient accumulation
(llm.c's and PyTorch DDP's scheme). Written once for both devices: CPU buffers (numpy) go over MPI (mpi4py, with
the MPI of the `mpi` extra), GPU buffers (fastllm.cuda.DeviceArray) over NCCL (fastllm.nccl; rank 0 makes the
unique id and MPI broadcasts it; each rank takes the GPU of its node-local rank, among the ranks that see the
same CUDA_VISIBLE_DEVICES).

`world()` is the process group, made on first use from what the launcher put in the environment: without an MPI
launcher, or with one rank, it is `World` -- one process, every collective the identity -- and mpi4py is not
imported. FASTLLM_DISTRIBUTED=mpi uses MPI even for one rank (to run the collective code paths on one process),
=off never.

What the training loop (fastllm.train) uses:
  - `share(items)`: this rank's contiguous part of a global batch (or of an evaluation set);
  - `sum_stats`, `sum`, `average`: statistics over all ranks; `allgather`: per-example results of an evaluation;
  - `reduce_gradients(model, opt)`: one all-reduce over the flat gradient buffer (ZeRO-1: a reduce-scatter), and
    the global gradient norm for clipping;
  - `optimizer(...)`: AdamW, or with zero=True `ShardedAdamW` (ZeRO-1: each rank keeps and updates 1/N of the
    AdamW moments; the updated parameters are all-gathered after each step; a checkpoint gathers the moments);
  - `agree_on_run(...)`: refuse ranks that do not run the same config, model and data.

Failures. An exception on any rank ends every rank with MPI_Abort after one `fastllm: error: rank R of N: ...`
line (the CLI does this; in a script, an uncaught exception does it through sys.excepthook), never a hang. A
collective that makes no progress for FASTLLM_DIST_TIMEOUT seconds (default 600: evaluation or a checkpoint on
rank 0 must fit in it) is stopped by a watchdog thread, which asks the other ranks where they are and names the
one that does not answer or has not arrived.

>>> world = world()                       # rank, size, local_rank; World() when not launched by MPI
>>> x, y = world.share(batches)[0]        # this rank's first micro-batch
>>> world.allreduce_(model.grads)         # in place, summed over the ranks (numpy: MPI; DeviceArray: NCCL)
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import fcntl
import importlib.metadata
import json
import math
import os
import shutil
import stat
import sys
import termios
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from . import cuda, ops
from .optim import AdamW

TIMEOUT = 600.0  # seconds a collective may wait for the other ranks (FASTLLM_DIST_TIMEOUT)
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")  # Open MPI, MPICH/Intel MPI (hydra, srun
# --mpi=pmi2), MVAPICH; PMIx launchers (srun --mpi=pmix, prterun) set PMIX_RANK and leave the size to MPI


def launched_size() -> int | None:
    """The number of ranks an MPI launcher started, from the environment it gives its processes; 0 when a launcher
    started this process without saying how many; None when no launcher did."""
    for var in _SIZE_VARS:
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return 0 if "PMIX_RANK" in os.environ else None


def mpiexec() -> str | None:
    """The MPI launcher to use: the one in this Python's bin folder (the `mpi` extra's MPICH wheel puts it there),
    else mpiexec or mpirun on PATH."""
    here = Path(sys.executable).parent
    for name in ("mpiexec", "mpirun"):
        if (here / name).is_file():
            return str(here / name)
    return shutil.which("mpiexec") or shutil.which("mpirun")


def _buffer_module(x):
    """fastllm.ops for numpy arrays, fastllm.cuda for DeviceArrays (for view())."""
    return ops if isinstance(x, np.ndarray) else cuda


# ---- one process -------------------------------------------------------------------------------------------


class World:
    """One process: rank 0 of 1. Every collective is the identity; `share` gives everything."""

    rank, size, local_rank, local_size = 0, 1, 0, 1
    distributed = False  # True for an MPIWorld (even of one rank)
    where = ""  # what the run is doing ("step 12"), for timeout messages

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, shows progress and writes files."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    def bounds(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """[lo, hi) of this rank's (or `rank`'s) contiguous part of n items: n // size each, the last rank also
        takes the remainder. The same split serves batches, evaluation sets and ZeRO-1 shards."""
        r = self.rank if rank is None else rank
        k = n // self.size
        return r * k, (n if r == self.size - 1 else (r + 1) * k)

    def share(self, items: Sequence) -> list:
        """This rank's contiguous part of `items` (all of them in one process)."""
        lo, hi = self.bounds(len(items))
        return list(items[lo:hi])

    def rank_seed(self, seed: int) -> int:
        """A sampling seed of this rank's own: `seed` on rank 0, one derived from (seed, rank) on the others."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0] >> 1)

    def default_threads(self) -> int | None:
        """OpenMP threads per rank when neither --threads nor OMP_NUM_THREADS says: the CPUs this process may
        run on, divided among the ranks of its node that may run on the same ones (None in one process: the
        library's default)."""
        return None

    def use_device(self, device: str) -> None:
        """Pick this rank's GPU (its node-local rank) and connect NCCL; nothing for the CPU or one process."""

    # collectives: in one process each is the identity
    def sum(self, values: Sequence[float]) -> np.ndarray:
        """The sums over the ranks of a few numbers (float64)."""
        return np.asarray(values, np.float64)

    def sum_stats(self, count: int, sums: dict[str, float]) -> tuple[int, dict[str, float]]:
        """(count, sums) summed over the ranks: the micro-batches of a step and their statistics."""
        return count, sums

    def average(self, items: Sequence, mean: Callable[[list], float]) -> float:
        """mean(items) computed in parts: each rank takes its share, the results weighted by their sizes."""
        return mean(list(items))

    def allreduce_(self, x) -> None:
        """x = its sum over the ranks, in place (numpy over MPI, DeviceArray over NCCL)."""

    def reduce_scatter_(self, x) -> None:
        """In place: x[lo:hi] (this rank's bounds(x.size)) = its sum over the ranks; the rest of x is undefined."""

    def allgather_(self, x) -> None:
        """In place: every rank's x[lo:hi] (its bounds(x.size)) to every rank."""

    def broadcast_(self, x, root: int = 0) -> None:
        """x = root's x, in place."""

    def gather_(self, part, n: int):
        """Rank 0 gets the (n,) numpy array whose bounds(n) parts are the ranks' `part`s; the others get None."""
        return np.asarray(part)

    def bcast(self, obj, root: int = 0):
        return obj

    def allgather(self, obj) -> list:
        """Every rank's `obj` (any picklable object), in rank order, on every rank."""
        return [obj]

    def barrier(self) -> None:
        pass

    def agree(self, **fields) -> None:
        """ValueError (on every rank) unless all ranks have equal values (compared as JSON) for each field."""

    def fail(self, message: str) -> None:
        """Stop every rank after printing `message` (with this rank); nothing in one process (the caller raises)."""


# ---- MPI ---------------------------------------------------------------------------------------------------


class MPIWorld(World):
    """The ranks of an MPI launch (mpi4py's COMM_WORLD), with NCCL for GPU buffers once use_device("cuda")."""

    distributed = True

    def __init__(self, comm, timeout: float = TIMEOUT):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)  # the ranks on this machine
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.node_cpus = node.allgather(cpus)  # the CPUs each rank of this node may run on (None: unknown)
        self.node_gpus = node.allgather(os.environ.get("CUDA_VISIBLE_DEVICES"))  # the GPUs each may see (None: all)
        node.Free()
        self.nccl = None
        self.watchdog = _Watchdog(self, timeout)
        previous = sys.excepthook

        def excepthook(kind, value, tb):  # an uncaught exception in a script: stop the other ranks too
            previous(kind, value, tb)
            self.fail(f"{kind.__name__}: {value}")

        sys.excepthook = excepthook

    def default_threads(self) -> int | None:
        if "OMP_NUM_THREADS" in os.environ:
            return None
        mine = self.node_cpus[self.local_rank]
        if mine is None:
            return max(1, (os.cpu_count() or 1) // self.local_size)
        # the ranks that may run on the same CPUs share them: all of the node's (no binding), a container's cpuset,
        # a socket (a launcher's --bind-to socket); a rank bound to cores of its own has them alone
        return max(1, len(mine) // sum(cpus == mine for cpus in self.node_cpus))

    def use_device(self, device: str) -> None:
        if device != "cuda" or self.nccl is not None:
            return
        from . import nccl

        gpus = cuda._require().device_count()
        # the ranks of this node that see the same GPUs (all of them, unless the launcher gave each its own
        # CUDA_VISIBLE_DEVICES, as srun --gpus-per-task does) take one each, in node-rank order
        same = [r for r, seen in enumerate(self.node_gpus) if seen == self.node_gpus[self.local_rank]]
        if len(same) > gpus:
            raise ValueError(f"{len(same)} ranks on this node but {gpus} GPU(s) for them: NCCL needs a GPU of its "
                             f"own for each rank; start at most {gpus} ranks per node")
        cuda._require().set_device(same.index(self.local_rank))
        nccl.load()  # a missing library fails here, on the rank that lacks it
        uid = self.bcast(nccl.unique_id() if self.rank == 0 else None)
        with self.watchdog.waiting("NCCL setup"):
            self.nccl = nccl.Communicator(uid, self.size, self.rank)

    def sum(self, values: Sequence[float]) -> np.ndarray:
        a = np.array(values, np.float64)
        with self.watchdog.waiting("a sum of statistics"):
            self.comm.Allreduce(self.MPI.IN_PLACE, a)
        return a

    def sum_stats(self, count: int, sums: dict[str, float]) -> tuple[int, dict[str, float]]:
        keys = sorted(sums)
        total = self.sum([count] + [sums[k] for k in keys])
        return int(round(total[0])), dict(zip(keys, total[1:].tolist()))

    def average(self, items: Sequence, mean: Callable[[list], float]) -> float:
        mine = self.share(items)
        part = mean(mine) if mine else 0.0
        total, n = self.sum([part * len(mine), len(mine)])
        return float(total / max(n, 1))

    def _gpu(self, x) -> bool:
        if isinstance(x, np.ndarray):
            return False
        if self.nccl is None:
            raise RuntimeError("GPU buffers need NCCL: call world.use_device('cuda') first")
        return True

    @contextlib.contextmanager
    def _collective(self, what: str, gpu: bool):
        """Wait for a collective under the watchdog; NCCL's are asynchronous, so wait for the GPU here."""
        with self.watchdog.waiting(what):
            yield
            if gpu:
                cuda.synchronize()

    def allreduce_(self, x) -> None:
        gpu = self._gpu(x)
        with self._collective("an all-reduce", gpu):
            if gpu:
                self.nccl.all_reduce(x)
            else:
                self.comm.Allreduce(self.MPI.IN_PLACE, x)

    def reduce_scatter_(self, x) -> None:
        n, N = x.size, self.size
        k, gpu, bm = n // N, self._gpu(x), _buffer_module(x)
        if k:
            body = bm.view(x, 0, (N * k,))
            with self._collective("a reduce-scatter", gpu):
                if gpu:
                    self.nccl.reduce_scatter(body, bm.view(body, self.rank * k, (k,)))
                else:  # MPI's in-place form leaves the result at the start of the buffer
                    self.comm.Reduce_scatter_block(self.MPI.IN_PLACE, body)
                    body[self.rank * k:(self.rank + 1) * k] = body[:k]
        if n > N * k:  # the remainder (< N elements) belongs to the last rank: summed everywhere
            self.allreduce_(bm.view(x, N * k, (n - N * k,)))

    def allgather_(self, x) -> None:
        n, N = x.size, self.size
        k, gpu, bm = n // N, self._gpu(x), _buffer_module(x)
        if k:
            body = bm.view(x, 0, (N * k,))
            with self._collective("an all-gather", gpu):
                if gpu:
                    self.nccl.all_gather(bm.view(body, self.rank * k, (k,)), body)
                else:
                    self.comm.Allgather(self.MPI.IN_PLACE, body)
        if n > N * k:
            self.broadcast_(bm.view(x, N * k, (n - N * k,)), root=N - 1)

    def broadcast_(self, x, root: int = 0) -> None:
        gpu = self._gpu(x)
        with self._collective("a broadcast", gpu):
            if gpu:
                self.nccl.broadcast(x, root)
            else:
                self.comm.Bcast(x, root)

    def gather_(self, part, n: int):
        part = np.ascontiguousarray(part)
        counts = [hi - lo for lo, hi in (self.bounds(n, r) for r in range(self.size))]
        if part.size != counts[self.rank]:
            raise ValueError(f"gather_: rank {self.rank} holds {part.size} elements, its part of {n} is "
                             f"{counts[self.rank]}")
        full = np.empty(n, part.dtype) if self.rank == 0 else None
        displs = [self.bounds(n, r)[0] for r in range(self.size)]
        with self.watchdog.waiting("a gather"):
            self.comm.Gatherv(part, [full, (counts, displs)] if full is not None else None, root=0)
        return full

    def bcast(self, obj, root: int = 0):
        with self.watchdog.waiting("a broadcast"):
            return self.comm.bcast(obj, root)

    def allgather(self, obj) -> list:
        with self.watchdog.waiting("an all-gather of results"):
            return self.comm.allgather(obj)

    def barrier(self) -> None:
        with self.watchdog.waiting("a barrier"):
            self.comm.Barrier()

    def agree(self, **fields) -> None:
        mine = {k: json.dumps(v, sort_keys=True, default=str) for k, v in fields.items()}
        with self.watchdog.waiting("the check that all ranks run the same"):
            everyone = self.comm.allgather(mine)
        for r, theirs in enumerate(everyone):
            for k in fields:
                if theirs[k] != everyone[0][k]:
                    diff = _difference(theirs[k], everyone[0][k])
                    raise ValueError(f"rank {r} and rank 0 differ in their {k}: {diff}; every rank must run the same "
                                     "command on the same data (and resume from the same shared --out folder)")

    def fail(self, message: str) -> None:
        if self.rank:  # when every rank fails alike, rank 0's line alone comes out
            time.sleep(0.3)
        sys.stdout.flush()
        sys.stderr.write(f"fastllm: error: rank {self.rank} of {self.size}: {message}\n")
        sys.stderr.flush()
        _drained(sys.stdout, sys.stderr)
        self.comm.Abort(1)
        os._exit(1)  # MPI_Abort may return before the launcher ends this process


def _drained(*streams, deadline: float = 10.0) -> None:
    """Wait until the launcher has read what this process wrote to `streams` (pipes), at most `deadline` s.

    mpiexec (hydra) reads each rank's stdout/stderr pipe and the rank's PMI socket in one event loop and kills
    the job as soon as it sees MPI_Abort: a line written just before the abort can be dropped when the loop
    takes the abort first (it happened under load). Once the pipe is empty the proxy has read the line and sent
    it upstream ahead of the abort, on the same connection, so it comes out."""
    end = time.monotonic() + deadline
    for s in streams:
        try:
            fd = s.fileno()
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                continue
            while time.monotonic() < end:
                unread = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
                if int.from_bytes(unread, sys.byteorder) == 0:
                    break
                time.sleep(0.01)
        except (OSError, ValueError, AttributeError):  # closed or replaced stream: nothing to wait for
            continue
    time.sleep(0.05)  # the proxy writes upstream right after its read


def _difference(a: str, b: str) -> str:
    """Where two JSON texts differ: "key: a vs b" for each differing key of two objects, else "a vs b"."""
    x, y = json.loads(a), json.loads(b)
    if isinstance(x, dict) and isinstance(y, dict):
        keys = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
        return ", ".join(f"{k} {json.dumps(x.get(k))[:100]} vs {json.dumps(y.get(k))[:100]}" for k in keys)
    return f"{a[:200]} vs {b[:200]}"


class _Watchdog:
    """Stops the job when a collective waits longer than `timeout` (s), naming the rank that holds it up.

    A daemon thread checks every half second (MPI calls and GPU synchronisation release the GIL). Each rank's
    thread also answers "where are you?" pings on a separate communicator with (collectives entered, the one it
    waits in or None, seconds since). On a timeout the waiting rank pings the others and reports who did not
    answer (killed, or stuck in native code), who has not reached the collective (busy computing), or who waits
    in another one (out of step); the lowest waiting rank prints, then MPI_Abort ends the job."""

    PING, PONG = 17, 18

    def __init__(self, world: MPIWorld, timeout: float):
        self.world, self.timeout = world, timeout
        self.count, self.what, self.since = 0, None, time.monotonic()
        self.MPI = world.MPI
        self.hb = world.comm.Dup() if world.MPI.Query_thread() == world.MPI.THREAD_MULTIPLE else None
        self.running = True
        self.thread = threading.Thread(target=self._run, name="fastllm-watchdog", daemon=True)
        self.thread.start()
        atexit.register(self.stop)  # runs before an atexit MPI_Finalize (world() after info())

    def stop(self) -> None:
        """End the thread (at exit: it must not call MPI once MPI_Finalize has begun)."""
        self.running = False
        if self.thread is not threading.current_thread():
            self.thread.join(timeout=5.0)

    @contextlib.contextmanager
    def waiting(self, what: str):
        self.count += 1
        self.what, self.since = what, time.monotonic()
        try:
            yield
        finally:
            self.what, self.since = None, time.monotonic()

    def _state(self) -> tuple:
        return self.count, self.what, time.monotonic() - self.since

    def _run(self) -> None:
        while True:
            time.sleep(min(0.5, self.timeout / 4))
            if not self.running:
                return
            self._answer()
            if self.what is not None and time.monotonic() - self.since > self.timeout:
                self._expired()

    def _answer(self) -> None:
        if self.hb is None:
            return
        status = self.MPI.Status()
        while self.hb.Iprobe(self.MPI.ANY_SOURCE, self.PING, status):
            src = status.Get_source()
            self.hb.recv(source=src, tag=self.PING)
            self.hb.send(self._state(), dest=src, tag=self.PONG)

    def _expired(self) -> None:
        w, (count, what, waited) = self.world, self._state()
        answers: dict[int, tuple] = {}
        if self.hb is not None:
            pings = [self.hb.isend(None, dest=r, tag=self.PING) for r in range(w.size) if r != w.rank]
            deadline, status = time.monotonic() + min(10.0, self.timeout), self.MPI.Status()
            while len(answers) < w.size - 1 and time.monotonic() < deadline:
                self._answer()
                if self.hb.Iprobe(self.MPI.ANY_SOURCE, self.PONG, status):
                    src = status.Get_source()
                    answers[src] = self.hb.recv(source=src, tag=self.PONG)
                else:
                    time.sleep(0.01)
            del pings
        notes, waiting_below = [], False
        for r in range(w.size):
            if r == w.rank:
                continue
            if r not in answers:
                notes.append(f"rank {r} does not answer (killed, or stuck in native code)" if self.hb is not None
                             else f"rank {r} may be stuck")
                continue
            c, theirs, secs = answers[r]
            if theirs is None:
                notes.append(f"rank {r} has not arrived (busy outside any collective for {secs:.0f} s)")
            elif c != count:
                notes.append(f"rank {r} waits in another collective ({theirs}, #{c}; this is #{count}): the ranks "
                             "are out of step")
            waiting_below |= theirs is not None and c == count and r < w.rank
        if waiting_below:  # a lower rank waits in the same collective and reports it
            time.sleep(15.0)
        where = f" at {w.where}" if w.where else ""
        w.fail(f"no progress for {waited:.0f} s in {what}{where}: " + ("; ".join(notes) or "the other ranks wait too")
               + f" (FASTLLM_DIST_TIMEOUT={self.timeout:g} s)")


# ---- the process group -------------------------------------------------------------------------------------


_world: World | None = None


def current() -> World | None:
    """The world if world() has made it, else None (without starting MPI)."""
    return _world


def world() -> World:
    """The process group of this run (made on the first call; see the module doc)."""
    global _world
    if _world is None:
        _world = _start()
    return _world


def _timeout() -> float:
    v = os.environ.get("FASTLLM_DIST_TIMEOUT", "")
    if not v:
        return TIMEOUT
    try:
        t = float(v)
    except ValueError:
        t = -1.0
    if not (t > 0 and math.isfinite(t)):
        raise ValueError(f"FASTLLM_DIST_TIMEOUT must be a number of seconds > 0, got {v!r}")
    return t


def _start() -> World:
    mode = os.environ.get("FASTLLM_DISTRIBUTED", "auto")
    if mode not in ("auto", "mpi", "off"):
        raise ValueError(f"FASTLLM_DISTRIBUTED must be auto, mpi or off, got {mode!r}")
    n = launched_size()
    if mode == "off" or (mode == "auto" and n in (None, 1)):
        return World()
    timeout = _timeout()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        raise ImportError(f"this process was started by an MPI launcher ({_launcher_note()}) but mpi4py is not "
                          "installed: pip install \"fastllm[mpi]\"") from None
    MPI = _init_mpi(timeout)
    size = MPI.COMM_WORLD.Get_size()
    if n and size != n:
        raise RuntimeError(f"the MPI launcher started {n} ranks ({_launcher_note()}) but MPI sees {size}: mpi4py "
                           f"uses another MPI library than the launcher; launch with the mpiexec of the MPI mpi4py "
                           f"uses ({mpiexec() or 'mpiexec'})")
    if size == 1 and mode == "auto":
        return World()
    return MPIWorld(MPI.COMM_WORLD, timeout)


def _init_mpi(timeout: float):
    """mpi4py.MPI, with MPI initialised (THREAD_MULTIPLE). MPI_Init waits for every rank, and a rank that ended
    before joining (a bad flag, an import failing on its node) leaves the others waiting in it for ever: MPICH's
    mpiexec waits too, and MPI_Init holds the GIL, so no Python thread can step in. faulthandler's watchdog (a C
    thread) ends this process after `timeout` seconds with a traceback through this function; mpiexec then
    ends the rest."""
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        from mpi4py import MPI  # initialises MPI (mpi4py's default thread level: multiple)

        if not MPI.Is_initialized():  # info() imported mpi4py without initialising MPI
            MPI.Init_thread(MPI.THREAD_MULTIPLE)
            atexit.register(MPI.Finalize)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return MPI


def _launcher_note() -> str:
    found = [f"{v}={os.environ[v]}" for v in _SIZE_VARS + ("PMIX_RANK",) if v in os.environ]
    return ", ".join(found) or "no launcher variables"


def info() -> dict:
    """MPI as `fastllm info` reports it: mpi4py's version, the MPI library (its version line; read without
    starting MPI), the launcher, and this process's rank when launched."""
    d: dict = {}
    try:
        d["mpi4py"] = importlib.metadata.version("mpi4py")
    except importlib.metadata.PackageNotFoundError:
        d["mpi4py"] = None
    d["mpi"] = None
    if d["mpi4py"]:
        try:
            import mpi4py

            if "mpi4py.MPI" not in sys.modules:
                mpi4py.rc.initialize = False  # MPI_Get_library_version may be called before MPI_Init
            from mpi4py import MPI

            d["mpi"] = " ".join(MPI.Get_library_version().split("\n")[0].split())
        except (ImportError, RuntimeError) as e:  # mpi4py without a usable MPI library
            d["mpi"] = f"unavailable ({e})"
    d["mpiexec"] = mpiexec()
    w = current()
    if w is not None and w.distributed:
        d["rank"] = f"{w.rank} of {w.size} (local {w.local_rank} of {w.local_size})"
    return d


# ---- data-parallel training --------------------------------------------------------------------------------


class ShardedAdamW(AdamW):
    """ZeRO-1 (as in llm.c): AdamW whose moments m, v cover only this rank's 1/N of the flat parameters
    (bounds(num_parameters)), so their memory falls by N. step() updates that part of the fp32 master weights,
    then all-gathers the parameters (and refreshes a bf16 compute copy from them). The gradient must have been
    reduce-scattered first (reduce_gradients does). state_dict() gathers the full moments on rank 0 (the others
    get None: only rank 0 writes checkpoints); load_state_dict() takes full ones and keeps this rank's part, so
    a checkpoint saved with N ranks resumes with any number. The master weights stay whole on every rank: they
    are what the CPU computes with and what checkpoints and evaluation read."""

    def __init__(self, model, world: World, lr: float = 6e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1):
        self.world = world
        super().__init__(model, lr, betas, eps, weight_decay, shard=world.bounds(model.trainable().num_parameters))

    def step(self, lr: float | None = None, grad_scale: float = 1.0) -> None:
        super().step(lr, grad_scale)
        self.world.allgather_(self.model.params)
        self.model._sync_compute_copy()  # a bf16 compute copy follows the gathered parameters

    def state_dict(self) -> dict:
        part = super().state_dict()
        n = self.model.num_parameters
        return {"m": self.world.gather_(part["m"], n), "v": self.world.gather_(part["v"], n), "t": self.t}

    def load_state_dict(self, state: dict, where: str = "optimizer state") -> None:
        n, (lo, hi) = self.model.num_parameters, self.shard
        part = dict(state)
        for k in ("m", "v"):
            a = np.asarray(state[k]) if k in state else None
            if a is None or a.shape != (n,):
                got = "missing" if a is None else f"shape {a.shape}"
                raise ValueError(f"{where}: {k!r} must have shape {(n,)} (the model's parameters), got {got}")
            part[k] = a[lo:hi]
        super().load_state_dict(part, where)


def optimizer(model, lr: float, betas=(0.9, 0.95), weight_decay: float = 0.0, zero: bool = False) -> AdamW:
    """The run's AdamW: sharded over the ranks (ShardedAdamW) with zero=True under MPI, else the plain one."""
    w = world()
    if zero and w.distributed:
        return ShardedAdamW(model, w, lr, betas, weight_decay=weight_decay)
    return AdamW(model, lr, betas, weight_decay=weight_decay)


def reduce_gradients(model, opt, extra: Sequence = ()) -> float:
    """Sum the gradients of every rank's micro-batches (one all-reduce over the flat buffer; with a ShardedAdamW a
    reduce-scatter, each rank receiving the sum of its part) and return the L2 norm of the summed gradient,
    `extra` parameters (ExtraParams, host arrays, all-reduced whole) included. In one process: the local norm."""
    w, model = world(), model.trainable()  # (LoRA: the adapters' gradients)
    for e in extra:
        w.allreduce_(e.g)
    if isinstance(opt, ShardedAdamW):
        w.reduce_scatter_(model.grads)
        lo, hi = opt.shard
        norm = math.sqrt(w.sum([model.bk.sum_squares(model.bk.view(model.grads, lo, (hi - lo,)))])[0])
    else:
        w.allreduce_(model.grads)
        norm = model.grad_norm()
    if extra:
        norm = math.sqrt(norm**2 + sum(float(np.sum(e.g.astype(np.float64) ** 2)) for e in extra))
    return norm


def agree_on_run(config: dict, model, data: dict) -> None:
    """Refuse (ValueError naming the field and ranks) to train unless every rank has the same config (threads
    aside), model (config and parameters) and data (the stage's fingerprint). Nothing in one process."""
    w = world()
    if not w.distributed:
        return
    from .version import __version__

    state = model.trainable().state_dict() if model.weights_only else model.state_dict()  # (a held base: its adapters)
    w.agree(version=__version__, world=w.size, config={k: v for k, v in config.items() if k != "threads"},
            model={"config": model.config.to_dict(), "crc32": fingerprint(*state.values())}, data=data)


def fingerprint(*arrays) -> int:
    """CRC-32 of the arrays' bytes: what ranks compare to check they hold the same data or parameters."""
    crc = 0
    for a in arrays:
        crc = zlib.crc32(np.ascontiguousarray(a).data, crc)
    return crc
