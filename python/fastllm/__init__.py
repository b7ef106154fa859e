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

import os

from . import _C, ops
from .checkpoint import load_model
from .lora import LoraConfig
from .model import GPT, GPTConfig
from .sample import generate
from .tokenizer import Tokenizer
from .version import __version__


def info() -> dict:
    """Version, build flags, the CPU and the SIMD level in use, OpenMP threads, whether CUDA is built and a GPU
    found, and what multi-process training can use: mpi4py and its MPI library, the mpiexec launcher, NCCL.

    CPU keys: "cpu" (model name), "cpu_features" (avx2, fma, avx512f, avx512bw, avx512_bf16, avx512_fp16, avx512_vnni,
    amx_tile, amx_bf16, amx_int8: what the CPU has and the OS enabled, named as in /proc/cpuinfo), "amx_permission"
    (Linux granted this process the AMX tile state), "simd" (the fp32 kernels' vector ISA in use: avx512, avx2 or
    scalar), "simd_detected" (the highest level of SIMD_LEVELS the CPU supports), "bf16_matmul" (the bf16-weight
    matmul's path: avx512_bf16 dot products, or bf16 widened to fp32 on avx2 or scalar), "bf16_weights" (the layout of
    model.bf16_weights(): "panels", packed once for the bf16 GEMM where that is avx512_bf16, else "rows") and
    "bf16_gemm" (the kernel of the
    mixed-precision matmuls, dtype="bfloat16": amx tiles, avx512_bf16 dot products, or fp32 FMAs on operands rounded
    to bf16 on avx512/avx2; scalar: a portable loop), "bf16_attention" (the mixed-precision attention's tile
    products: avx512_bf16 dot products, or fp32) and "w8a8" (the integer products of model.w8a8_weights():
    amx -- AMX-INT8 tiles for prompts, avx512_vnni for decode steps --, avx512_vnni, avx2 or scalar).

    >>> fastllm.info()["cpu_features"]["avx2"] in (True, False)
    True"""
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


SIMD_LEVELS: tuple[str, ...] = tuple(_C.SIMD_LEVELS)  # lowest to highest; each includes the ones below it


def set_simd(level: str) -> None:
    """Run the CPU kernels at a lower SIMD level, to test or time the fallback paths (like the environment variable
    FASTLLM_SIMD, read at import): "scalar" (portable loops), "avx2" (AVX2 + FMA), "avx512" (AVX-512 F/BW/DQ/VL),
    "avx512_bf16" (avx512 plus VDPBF16PS bf16 dot products in the bf16 matmuls), "amx" (avx512_bf16 plus the AMX-BF16
    tiles in the bf16 GEMM), or "auto" (the highest this CPU supports, the default). ValueError for an unknown level
    or one above what the CPU supports.

    >>> fastllm.set_simd("scalar"); fastllm.get_simd()
    'scalar'
    >>> fastllm.set_simd("auto")"""
    best = _C.info()["simd_detected"]
    level = level.strip().lower() if isinstance(level, str) else level
    if level == "auto":
        level = best
    if level not in SIMD_LEVELS:
        raise ValueError(f"simd level must be one of {', '.join(SIMD_LEVELS)} or auto, got {level!r}")
    if SIMD_LEVELS.index(level) > SIMD_LEVELS.index(best):
        raise ValueError(f"simd level {level!r} is not supported by this CPU ({_C.info()['cpu'] or 'unknown'}): "
                         f"it supports up to {best!r}")
    _C.set_simd_level(level)


def get_simd() -> str:
    """The SIMD level in use, one of SIMD_LEVELS (see set_simd)."""
    return str(_C.get_simd_level())


def _simd_from_env() -> None:
    level = os.environ.get("FASTLLM_SIMD", "")
    if level.strip():
        try:
            set_simd(level)
        except ValueError as e:
            raise ValueError(f"environment variable FASTLLM_SIMD: {e}") from None


_simd_from_env()


__all__ = ["GPT", "GPTConfig", "LoraConfig", "Tokenizer", "generate", "load_model", "info", "ops", "set_num_threads",
           "get_num_threads", "set_simd", "get_simd", "SIMD_LEVELS", "__version__"]
