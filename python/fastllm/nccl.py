"""NCCL collectives on GPU buffers (fastllm.cuda.DeviceArray), through ctypes on libnccl.so.2.

Data-parallel training (fastllm.distributed) sums gradients and gathers parameters with NCCL when they live on
GPUs, the way llm.c and PyTorch do; MPI launches the ranks and carries NCCL's unique id from rank 0 to the others.

Why ctypes and not a compiled binding: the dozen functions used here are a small, stable C API (NCCL 2.x); loading
the library at run time keeps it an optional, separately installed piece (`pip install "fastllm[nccl]"`, the
`nvidia-nccl-cu13` wheel matching the CUDA 13 toolkit), so fastllm builds without NCCL's headers, a CPU-only build
can still report and test it, and a system NCCL can be swapped in without rebuilding. ctypes releases the GIL
around each call. The buffers are DeviceArrays (their `.ptr` is the device address); every call is enqueued on the
default stream, where fastllm's kernels run, so it is ordered with them without extra synchronisation.

Where the library is looked for, in order: $FASTLLM_NCCL_LIBRARY (a file), the nvidia-nccl wheel
(`nvidia/nccl/lib/libnccl.so.2` in site-packages), then the loader's search path (LD_LIBRARY_PATH, ldconfig).

>>> comm = Communicator(unique_id(), nranks=1, rank=0)     # rank 0 makes the id; MPI broadcasts it to the others
>>> comm.all_reduce(grads)                                   # in place, sum over the ranks
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path

LIBRARY = "libnccl.so.2"
UNIQUE_ID_BYTES = 128  # NCCL_UNIQUE_ID_BYTES

# enum values of nccl.h (stable since NCCL 2.0; ncclAvg and ncclBfloat16 since 2.10)
DTYPES = {"int8": 0, "uint8": 1, "int32": 2, "uint32": 3, "int64": 4, "uint64": 5, "float16": 6, "float32": 7,
          "float64": 8, "bfloat16": 9}
OPS = {"sum": 0, "prod": 1, "max": 2, "min": 3, "avg": 4}
RESULTS = {0: "ncclSuccess", 1: "ncclUnhandledCudaError", 2: "ncclSystemError", 3: "ncclInternalError",
           4: "ncclInvalidArgument", 5: "ncclInvalidUsage", 6: "ncclRemoteError", 7: "ncclInProgress",
           8: "ncclTimeout"}


class NcclUnavailableError(RuntimeError):
    """libnccl.so.2 was not found or cannot be loaded."""


class NcclError(RuntimeError):
    """An NCCL call failed; the message names the call, NCCL's result and its last error text."""


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * UNIQUE_ID_BYTES)]


# ---- finding and loading the library -----------------------------------------------------------------------


def candidates() -> list[str]:
    """Where load() looks for libnccl.so.2, in order (files that exist, then the bare name for the loader)."""
    found = []
    env = os.environ.get("FASTLLM_NCCL_LIBRARY")
    if env:
        found.append(env)
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        lib = Path(folder) / "lib" / LIBRARY
        if lib.is_file():
            found.append(str(lib))
    return found + [LIBRARY]


_SIGNATURES = {  # name: (argtypes, restype); ncclComm_t and cudaStream_t are pointers
    "ncclGetVersion": ([ctypes.POINTER(ctypes.c_int)], ctypes.c_int),
    "ncclGetErrorString": ([ctypes.c_int], ctypes.c_char_p),
    "ncclGetLastError": ([ctypes.c_void_p], ctypes.c_char_p),
    "ncclGetUniqueId": ([ctypes.POINTER(_UniqueId)], ctypes.c_int),
    "ncclCommInitRank": ([ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, _UniqueId, ctypes.c_int], ctypes.c_int),
    "ncclCommDestroy": ([ctypes.c_void_p], ctypes.c_int),
    "ncclCommAbort": ([ctypes.c_void_p], ctypes.c_int),
    "ncclAllReduce": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
    "ncclReduceScatter": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                           ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
    "ncclAllGather": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p,
                       ctypes.c_void_p], ctypes.c_int),
    "ncclBroadcast": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
}


@functools.cache
def load() -> ctypes.CDLL:
    """The NCCL library (loaded once), with the signatures of the functions used here declared;
    NcclUnavailableError listing what was tried."""
    errors = []
    for path in candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            errors.append(f"{path}: {e}")
            continue
        for name, (args, res) in _SIGNATURES.items():
            try:
                fn = getattr(lib, name)
            except AttributeError:
                raise NcclUnavailableError(f"{path} has no {name}: NCCL >= 2.10 is needed") from None
            fn.argtypes, fn.restype = args, res
        lib.path = path
        return lib
    raise NcclUnavailableError("NCCL not found (pip install \"fastllm[nccl]\" brings the nvidia-nccl-cu13 wheel, or "
                               "set FASTLLM_NCCL_LIBRARY to a libnccl.so.2); tried " + "; ".join(errors))


def is_available() -> bool:
    try:
        load()
        return True
    except NcclUnavailableError:
        return False


def version() -> str:
    """NCCL's version as "major.minor.patch" (from ncclGetVersion)."""
    v = ctypes.c_int()
    _check(load().ncclGetVersion(ctypes.byref(v)), "ncclGetVersion")
    code = v.value  # NCCL_VERSION_CODE: major*10000 + minor*100 + patch since 2.9, major*1000 + ... before
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}" if code >= 10000 else \
        f"{code // 1000}.{code // 100 % 10}.{code % 100}"


def info() -> dict:
    """{"nccl": version or None, "nccl_library": path or the reason it is not there} for `fastllm info`."""
    try:
        return {"nccl": version(), "nccl_library": load().path}
    except (NcclUnavailableError, NcclError) as e:
        return {"nccl": None, "nccl_library": str(e)}


def _check(result: int, call: str, comm=None) -> None:
    if result == 0:
        return
    lib = load()
    text = lib.ncclGetErrorString(result).decode(errors="replace")
    last = lib.ncclGetLastError(comm).decode(errors="replace") if comm else ""
    raise NcclError(f"{call} failed: {RESULTS.get(result, result)} ({text})" + (f": {last}" if last else ""))


def unique_id() -> bytes:
    """A new ncclUniqueId (128 bytes): made by rank 0 and sent to every rank before Communicator()."""
    uid = _UniqueId()
    _check(load().ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
    return bytes(uid)  # all 128 bytes (uid.internal would stop at the first NUL)


# ---- arguments ---------------------------------------------------------------------------------------------


def _buffer(x, name: str) -> tuple[int, int, int]:
    """(device pointer, element count, NCCL dtype) of a DeviceArray; TypeError naming `name` for anything else."""
    if not all(hasattr(x, a) for a in ("ptr", "size", "dtype")):
        raise TypeError(f"{name} must be a fastllm.cuda.DeviceArray (GPU memory), got {type(x).__name__}; "
                        "host (numpy) buffers go over MPI")
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {x.dtype!r}; NCCL here takes {sorted(DTYPES)}")
    return int(x.ptr), int(x.size), DTYPES[x.dtype]


def _op(op: str) -> int:
    if op not in OPS:
        raise ValueError(f"op must be one of {sorted(OPS)}, got {op!r}")
    return OPS[op]


def collective_args(kind: str, send, recv, nranks: int) -> tuple[int, int, int, int]:
    """Checked (send pointer, recv pointer, count, dtype) of a collective: `count` is what NCCL takes (all_reduce,
    broadcast: the elements; reduce_scatter: the elements each rank receives; all_gather: those each sends).
    ValueError quoting both sizes when they do not fit together."""
    sp, sn, sd = _buffer(send, "send")
    rp, rn, rd = _buffer(recv, "recv")
    if sd != rd:
        raise TypeError(f"{kind}: send is {send.dtype} but recv is {recv.dtype}")
    if kind in ("all_reduce", "broadcast"):
        if sn != rn:
            raise ValueError(f"{kind}: send has {sn} elements but recv has {rn}")
        return sp, rp, sn, sd
    big, small = (sn, rn) if kind == "reduce_scatter" else (rn, sn)
    if big != small * nranks:
        raise ValueError(f"{kind}: the full buffer has {big} elements, not {nranks} ranks x {small} of the shard")
    return sp, rp, small, sd


# ---- the communicator --------------------------------------------------------------------------------------


class Communicator:
    """An NCCL communicator of `nranks` processes, this one being `rank`, on the current GPU (pick it first with
    fastllm.cuda's set_device). Collectives are enqueued on the default stream; send may equal recv (in place)."""

    def __init__(self, uid: bytes, nranks: int, rank: int):
        if len(uid) != UNIQUE_ID_BYTES:
            raise ValueError(f"uid must be {UNIQUE_ID_BYTES} bytes (from unique_id()), got {len(uid)}")
        if not 0 <= rank < nranks:
            raise ValueError(f"rank must be in [0, nranks={nranks}), got {rank}")
        self.nranks, self.rank = nranks, rank
        self.lib = load()
        comm = ctypes.c_void_p()
        _check(self.lib.ncclCommInitRank(ctypes.byref(comm), nranks, _UniqueId.from_buffer_copy(uid), rank),
               "ncclCommInitRank")
        self.comm = comm

    def all_reduce(self, send, recv=None, op: str = "sum") -> None:
        """recv = op over the ranks of send (recv=None: in place)."""
        sp, rp, n, dt = collective_args("all_reduce", send, send if recv is None else recv, self.nranks)
        _check(self.lib.ncclAllReduce(sp, rp, n, dt, _op(op), self.comm, None), "ncclAllReduce", self.comm)

    def reduce_scatter(self, send, recv, op: str = "sum") -> None:
        """recv (n elements) = op over the ranks of send[rank*n : (rank+1)*n]; send has nranks*n elements."""
        sp, rp, n, dt = collective_args("reduce_scatter", send, recv, self.nranks)
        _check(self.lib.ncclReduceScatter(sp, rp, n, dt, _op(op), self.comm, None), "ncclReduceScatter", self.comm)

    def all_gather(self, send, recv) -> None:
        """recv[r*n : (r+1)*n] = rank r's send (n elements) for every rank r."""
        sp, rp, n, dt = collective_args("all_gather", send, recv, self.nranks)
        _check(self.lib.ncclAllGather(sp, rp, n, dt, self.comm, None), "ncclAllGather", self.comm)

    def broadcast(self, buf, root: int = 0) -> None:
        """buf = root's buf on every rank (in place)."""
        sp, rp, n, dt = collective_args("broadcast", buf, buf, self.nranks)
        _check(self.lib.ncclBroadcast(sp, rp, n, dt, root, self.comm, None), "ncclBroadcast", self.comm)

    def abort(self) -> None:
        """Tear the communicator down without waiting for the peers (after a timeout or a failed rank)."""
        if self.comm:
            self.lib.ncclCommAbort(self.comm)
            self.comm = None

    def close(self) -> None:
        if self.comm:
            _check(self.lib.ncclCommDestroy(self.comm), "ncclCommDestroy")
            self.comm = None
