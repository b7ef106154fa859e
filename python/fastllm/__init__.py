"""fastllm: build small GPTs end to end -- data, BPE tokenizer, pre-training, sampling, post-training --
on native C++ (and CUDA) kernels, with numpy arrays at the surface and no PyTorch at run time.

>>> import fastllm
>>> fastllm.info()["simd"] in ("avx512", "avx2", "scalar")
True
>>> model = fastllm.load_model("run/")                               # the newest checkpoint of `fastllm train`
>>> tok = fastllm.Tokenizer.from_pretrained(model.checkpoint_dir)      # the tokenizer saved with it
>>> print(tok.decode(fastllm.generate(model, tok.encode("The"), 20, temperature=0.8, seed=0)))
"""

from __future__ import annotations

from . import _C, ops
from .checkpoint import load_model
from .model import GPT, GPTConfig
from .sample import generate
from .tokenizer import Tokenizer
from .version import __version__


def info() -> dict:
    """Version, build flags, SIMD level in use, OpenMP threads, whether CUDA is built and a GPU found, and what
    multi-process training can use: mpi4py and its MPI library, the mpiexec launcher, NCCL."""
    from . import distributed, nccl

    d = dict(_C.info())
    d["version"] = __version__
    d.update(distributed.info())
    d.update(nccl.info())
    return d


def set_num_threads(n: int) -> None:
    """Set the number of OpenMP threads the native kernels use (like torch.set_num_threads), 1 to
    `fastllm._C.MAX_THREADS` (1024); a larger OMP_NUM_THREADS is lowered to it (with a warning)."""
    _C.set_num_threads(n)


def get_num_threads() -> int:
    return int(_C.get_num_threads())


__all__ = ["GPT", "GPTConfig", "Tokenizer", "generate", "load_model", "info", "ops", "set_num_threads",
           "get_num_threads", "__version__"]
