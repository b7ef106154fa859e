"""The two backends behind the one model: `fastllm.ops` (numpy arrays, the CPU kernels) and `fastllm.cuda`
(DeviceArrays, the CUDA kernels). They expose the same functions with the same arguments and meaning, so
model.py, optim.py and the KV cache are written once against "the backend" and never ask which device runs them
(like ggml's backends). What truly differs per device lives in these two modules: allocation, copies, the
compute dtypes a device offers.

The contract, stated once for both modules:
  - Arrays: `empty(shape, dtype)`, `zeros`, `carve({name: (shape, dtype)})` (many buffers in one allocation),
    `view(x, offset, shape)` (a view of a contiguous array at an element offset), `to_device(numpy)`,
    `to_numpy(x)` (the CPU returns x itself: copy it if you keep it), `copy_(dst, src)`, `zero_(x)`,
    `add_(dst, src)` (dst += src), `synchronize()`, `sum_squares(x)`, `global_norm(*xs)`.
    dtypes are named "float32", "bfloat16" and "int32" (on the CPU bfloat16 is stored as uint16 bit patterns).
  - An op takes its inputs first and returns its outputs; every output can be passed in (`out=`, `dx=`, ...) so
    that a training step allocates nothing, and is allocated when it is not. Token ids and positions may be
    numpy integer arrays on either backend (checked, then copied where they must go).
  - Forward ops OVERWRITE (=) their outputs. Backward ops ACCUMULATE (+=) into every gradient they are given
    (parameter and activation gradients alike): zero them first. Gradients they allocate start at zero.
  - Activations and weights have one dtype per call (float32; on the GPU also bfloat16, with fp32 accumulation);
    parameter gradients, layernorm/rmsnorm statistics, attention logsumexp, rope tables and losses are float32.
    The CPU's bfloat16 is a property of the products instead (`dtype=` of matmul_forward/backward, lmhead_ce and
    the attentions: operands rounded to bf16 as they are packed); get("cpu", "bfloat16") binds it, arrays stay
    float32.
  - Bad arguments raise TypeError (wrong dtype or array type) or ValueError (shape, range, overlap), naming the
    argument.

`get("cpu")` / `get("cuda")` returns the module; `default_dtype(device)` the compute dtype a model gets there,
`storage_dtype(device, dtype)` the dtype of its compute copy of the weights and of its activations.
"""

from __future__ import annotations

from functools import partial
from types import ModuleType

from . import _C, cuda, ops

DEVICES = ("cpu", "cuda")
DTYPES = {"cpu": ("float32", "bfloat16"), "cuda": ("bfloat16", "float32")}  # compute dtypes, default first


class CpuBf16:
    """fastllm.ops with the matmuls in bf16: the CPU's mixed precision (like torch.autocast(bfloat16) on a CPU).
    The lm-head and every linear layer round both operands to bf16 (exact products, fp32 sums), and so do
    attention's tile products where the CPU has AVX512_BF16 (`info()["bf16_attention"]`); everything else -- norms,
    softmax and loss, the optimizer -- and every array (weights, activations, gradients) stay float32. Rounding
    inside the GEMM's packing means no bf16 copy of the weights is kept or synchronised."""

    matmul_forward = staticmethod(partial(ops.matmul_forward, dtype="bfloat16"))
    matmul_backward = staticmethod(partial(ops.matmul_backward, dtype="bfloat16"))
    gemm = staticmethod(partial(ops.gemm, dtype="bfloat16"))
    lmhead_ce = staticmethod(partial(ops.lmhead_ce, dtype="bfloat16"))
    attention_forward = staticmethod(partial(ops.attention_forward, dtype="bfloat16"))
    attention_backward = staticmethod(partial(ops.attention_backward, dtype="bfloat16"))
    attention_kv_forward = staticmethod(partial(ops.attention_kv_forward, dtype="bfloat16"))

    def __getattr__(self, name: str):
        return getattr(ops, name)


_CPU_BF16 = CpuBf16()


def get(device: str, dtype: str = "float32") -> ModuleType | CpuBf16:
    """The ops for `device`: fastllm.ops for "cpu" (CpuBf16 for dtype "bfloat16"), fastllm.cuda for "cuda"
    (CudaUnavailableError if fastllm has no CUDA build or no GPU is visible; its dtype lives in the arrays)."""
    if device == "cpu":
        return _CPU_BF16 if check_dtype(device, dtype) == "bfloat16" else ops
    if device == "cuda":
        cuda._require()
        return cuda
    raise ValueError(f"device must be one of {DEVICES}, got {device!r}")


def default_dtype(device: str) -> str:
    if device not in DTYPES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return DTYPES[device][0]


def check_dtype(device: str, dtype: str | None) -> str:
    """dtype (or the device's default for None) if the device computes in it, else ValueError."""
    dtype = default_dtype(device) if dtype is None else dtype
    if dtype not in DTYPES[device]:
        raise ValueError(f"dtype {dtype!r} is not available on {device}; choose from {DTYPES[device]}")
    return dtype


def cpu_bf16_hardware() -> bool:
    """Whether the CPU's bf16 GEMM runs on bf16 hardware now (AMX tiles or AVX512_BF16 dot products), where it is
    faster than fp32; elsewhere it rounds the operands for the fp32 kernels at fp32 speed."""
    return _C.bf16_gemm_path() in ("amx", "avx512_bf16")


def storage_dtype(device: str, dtype: str) -> str:
    """The dtype of a model's compute copy of the weights and of its activations: the compute dtype on the GPU;
    float32 on the CPU, whose kernels take bf16 only inside the matmuls (CpuBf16)."""
    return "float32" if device == "cpu" else dtype
