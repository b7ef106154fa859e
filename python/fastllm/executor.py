"""Where the data stages run: in this process, in worker processes on this machine, or on a Dask cluster.

`Executor(processes, dask)` maps a picklable function over jobs (`map` keeps their order, `map_unordered`
yields results as they finish). `dask` is None (this machine), "local" (a `distributed.LocalCluster` of
`processes` single-threaded worker processes), a scheduler address ("tcp://host:8786"), or a
`distributed.Client`; `.client` is then the client, for stages that shuffle on the cluster (clean's dedup).
Dask is imported only when asked for (`pip install 'fastllm[dask]'`); the workers must see the same files
(a shared file system) and have fastllm installed.
"""

from __future__ import annotations

import os


def connect(spec, workers: int):
    """A distributed.Client for `spec` -> (client, owned: whether closing it is ours)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise ImportError("--dask needs the 'dask' extra: pip install 'fastllm[dask]'") from None
    if isinstance(spec, Client):
        return spec, False
    if spec == "local":
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        return Client(cluster), True
    if not isinstance(spec, str) or "://" not in spec:
        raise ValueError(f"dask must be 'local' or a scheduler address like tcp://host:8786, got {spec!r}")
    try:
        return Client(spec, timeout="30s"), True
    except OSError as e:
        raise ValueError(f"dask: cannot reach the scheduler at {spec}: {e}") from None


def available_cpus() -> int:
    """The cores this process may run on (taskset, Slurm and container cpusets bind fewer than os.cpu_count())."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


class Executor:
    """map / map_unordered over jobs on this machine (processes, 1: in this process) or on Dask.

    >>> with Executor(processes=1) as ex:
    ...     ex.map(abs, [-1, 2])
    [1, 2]
    """

    def __init__(self, processes: int = 0, dask=None):
        self.processes = processes or available_cpus()
        self.client, self.owned, self.pool = None, False, None
        if dask is not None:
            self.client, self.owned = connect(dask, self.processes)
            self.processes = max(1, len(self.client.scheduler_info().get("workers", {})) or self.processes)

    @property
    def workers(self) -> int:
        return self.processes

    def map_unordered(self, fn, jobs: list):
        if self.client is not None:
            from distributed import as_completed

            for fut in as_completed(self.client.map(fn, jobs, pure=False)):
                yield fut.result()
        elif self.processes == 1 or len(jobs) <= 1:
            yield from map(fn, jobs)
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed
            from concurrent.futures.process import BrokenProcessPool

            if self.pool is None:  # spawn, not fork: OpenMP in the parent. Not multiprocessing.Pool: when a
                import multiprocessing as mp  # worker dies (out of memory, a crash) it waits for it forever

                self.pool = ProcessPoolExecutor(self.processes, mp_context=mp.get_context("spawn"))
            try:
                for fut in as_completed([self.pool.submit(fn, job) for job in jobs]):
                    yield fut.result()
            except BrokenProcessPool:
                what = jobs[0][1] if fn is _indexed else fn
                raise RuntimeError(f"a worker process running {getattr(what, '__name__', what)} died (killed for "
                                   "memory? a crash in a native parser?); the work finished so far is kept: "
                                   "run again to resume, with processes=1 to see the error") from None

    def map(self, fn, jobs: list) -> list:
        """Results in the order of `jobs`."""
        if self.client is not None:
            return self.client.gather(self.client.map(fn, jobs, pure=False))
        done = dict(self.map_unordered(_indexed, [(i, fn, job) for i, job in enumerate(jobs)]))
        return [done[i] for i in range(len(jobs))]

    def close(self, abort: bool = False) -> None:
        """Release the workers; `abort` (an exception is on its way): stop them without waiting."""
        if self.pool is not None:
            if abort:  # stop the running jobs too, as Pool.terminate did
                for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
                    proc.terminate()
            self.pool.shutdown(wait=True, cancel_futures=abort)
            self.pool = None
        if self.owned:
            cluster = getattr(self.client, "cluster", None)
            self.client.close()
            if cluster is not None:
                cluster.close()
            self.owned = False

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abort=exc_type is not None)


def _indexed(args):
    i, fn, job = args
    return i, fn(job)
