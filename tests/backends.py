"""One test body for both backends (fastllm.ops and fastllm.cuda, the contract in fastllm/backend.py): BACKENDS
parametrizes "cpu" and "cuda" (marked `cuda`: skipped without a GPU; CI runs it on the CUDA emulator), CASES adds
the compute dtypes of each backend (float32 everywhere, bfloat16 on the GPU), `up` / `down` move arrays."""

from __future__ import annotations

import numpy as np
import pytest
import reference

from fastllm import backend

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
CASES = [("cpu", "float32"), pytest.param("cuda", "float32", marks=pytest.mark.cuda),
         pytest.param("cuda", "bfloat16", marks=pytest.mark.cuda)]


def get(name: str):
    return backend.get(name)


def rounded(a, dtype: str) -> np.ndarray:
    """a as float32, rounded to bfloat16 when dtype is: the values the kernel sees."""
    a = np.ascontiguousarray(a, np.float32)
    return reference.bf16_round(a) if dtype == "bfloat16" else a


def up(name: str, a, dtype: str = "float32"):
    """A numpy array on the backend: floats as `dtype`, integers as int32."""
    a = np.asarray(a)
    if a.dtype.kind in "iu":
        return get(name).to_device(a)
    return get(name).to_device(np.ascontiguousarray(a, np.float32), dtype=dtype)


def down(name: str, x) -> np.ndarray:
    """A float32 (or int32) numpy copy of a backend array."""
    a = get(name).to_numpy(x)
    return np.array(a, np.float32 if a.dtype.kind == "f" else a.dtype)


def rel_err(got, ref, floor: float = 1e-6) -> float:
    """max |got - ref| / max |ref|, the denominator floored at `floor` (for gradients that vanish, e.g. C = 1)."""
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / max(float(np.abs(ref).max()), floor))


def acc_floor(start, dtype: str) -> float:
    """rel_err's floor for a gradient accumulated (+=) into `start`: a bf16 buffer rounds the sum, so the added part
    is only known to bf16 precision of |start|."""
    return float(np.abs(start).max()) if dtype == "bfloat16" else 1e-6
