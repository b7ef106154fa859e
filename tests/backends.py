"""One test body for both backends: a `Backend` is a device ("cpu": fastllm.ops on numpy arrays, "cuda":
fastllm.cuda on DeviceArrays), the dtype of the op's activations and a kernel variant, with the few helpers a
test needs to move arrays there and back. The op itself is called through `bk.ops`, the same function with the
same arguments on either device (the contract in fastllm/backend.py).

A test asks for the `bk` fixture (tests/conftest.py) and runs once per backend:
  cpu   float32   variants "avx512", "avx2", "scalar" (each SIMD code path, clamped to what the CPU has; 2 threads)
                  and "1thread" (the detected SIMD level on one OpenMP thread)
  cuda  float32 and bfloat16, variants "fast" (the defaults: tensor cores, vector paths) and "simple" (the
                  reference kernels everywhere: FASTLLM_CUDA_ATTN=simple, gemm_impl("simple"), the simple
                  elementwise kernels); marked `cuda`, so they skip without a GPU (or run on the CUDA emulator)
`@pytest.mark.backends(devices=..., dtypes=..., variants=...)` narrows the set (variants=False: the default variant
of each device only; variants=("cpu",): the CPU's variants, one kernel on the GPU). Tolerances sit beside each
dtype in the test files.

For ops without kernel variants a plain parametrization reads as well: BACKENDS ("cpu", "cuda") or CASES ((device,
dtype): float32 everywhere, bfloat16 on the GPU), with `up` / `down` to move arrays and `rel_err`.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
from reference import bf16_round

import fastllm
from fastllm import backend

BACKENDS = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
CASES = [("cpu", "float32"), pytest.param("cuda", "float32", marks=pytest.mark.cuda),
         pytest.param("cuda", "bfloat16", marks=pytest.mark.cuda)]

CPU_VARIANTS = ("avx512", "avx2", "scalar", "1thread")
CUDA_VARIANTS = ("fast", "simple")
SHORT = {"float32": "f32", "bfloat16": "bf16"}


class Backend:
    def __init__(self, device: str, dtype: str = "float32", variant: str | None = None):
        self.device, self.dtype = device, dtype
        self.variant = variant or ("1thread" if device == "cpu" else "fast")

    def __repr__(self) -> str:
        return f"{self.device}-{self.variant}" if self.device == "cpu" else f"cuda-{SHORT[self.dtype]}-{self.variant}"

    @property
    def ops(self):
        """fastllm.ops or fastllm.cuda."""
        return backend.get(self.device)

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"

    @contextlib.contextmanager
    def selected(self):
        """Runs the block with this backend's kernel variant, then restores the defaults."""
        if self.device == "cpu":
            threads = fastllm.get_num_threads()
            fastllm.set_num_threads(1 if self.variant == "1thread" else 2)
            if self.variant != "1thread":
                fastllm._C.set_simd_level(self.variant)
            try:
                yield
            finally:
                fastllm._C.set_simd_level(fastllm.info()["simd_detected"])
                fastllm.set_num_threads(threads)
            return
        from fastllm import _C, cuda

        simple = self.variant == "simple"
        old_env, old_gemm = os.environ.get("FASTLLM_CUDA_ATTN"), cuda.gemm_impl()
        if simple:
            os.environ["FASTLLM_CUDA_ATTN"] = "simple"
        else:
            os.environ.pop("FASTLLM_CUDA_ATTN", None)
        cuda.gemm_impl("simple" if simple else "auto")
        _C.cuda._set_simple_elementwise(simple)
        try:
            yield
        finally:
            _C.cuda._set_simple_elementwise(False)
            cuda.gemm_impl(old_gemm)
            if old_env is None:
                os.environ.pop("FASTLLM_CUDA_ATTN", None)
            else:
                os.environ["FASTLLM_CUDA_ATTN"] = old_env

    # ---- arrays ----------------------------------------------------------------------------------------------

    def rounded(self, x, dtype: str | None = None) -> np.ndarray:
        """x as float32 the way the device stores it in `dtype` (default: the backend's): bf16-rounded for bfloat16."""
        return rounded(x, dtype or self.dtype)

    def put(self, x, dtype: str | None = None, offset: int = 0):
        """x (any float array) on the device in `dtype` (default: the backend's). With offset > 0 a view that starts
        `offset` elements into a larger NaN-filled allocation (misaligned for the 16-byte vector paths)."""
        x = np.ascontiguousarray(x, np.float32)
        dtype = dtype or self.dtype
        if offset == 0:
            return up(self.device, x, dtype)
        buf = self.ops.to_device(np.full(x.size + offset + 3, np.nan, np.float32), dtype)
        v = self.ops.view(buf, offset, x.shape)
        self.ops.copy_(v, x)  # float32 -> the view's dtype (bfloat16 rounds)
        return v

    def poisoned(self, shape, dtype: str | None = None, offset: int = 0):
        """A NaN-filled output: every element the op should write must be overwritten."""
        return self.put(np.full(shape, np.nan, np.float32), dtype, offset)

    def zeros(self, shape, dtype: str | None = None):
        return self.ops.zeros(shape, dtype or self.dtype)

    def ids(self, x):
        """Integer ids (int32) as the device holds them: unchecked by the op, unlike numpy ids given to cuda ops."""
        return up(self.device, np.asarray(x, np.int32))

    def get(self, x) -> np.ndarray:
        """A float32 (or int32) numpy copy of a device array (bf16 widened exactly)."""
        return down(self.device, x)


def get(name: str):
    """fastllm.ops or fastllm.cuda."""
    return backend.get(name)


def rounded(a, dtype: str) -> np.ndarray:
    """a as float32, rounded to bfloat16 when dtype is: the values the kernel sees."""
    a = np.array(a, np.float32)
    return bf16_round(a) if dtype == "bfloat16" else a


def up(name: str, a, dtype: str = "float32"):
    """A numpy array on the backend: floats as `dtype`, integers as int32."""
    a = np.asarray(a)
    if a.dtype.kind in "iu":
        return get(name).to_device(a)
    return get(name).to_device(np.ascontiguousarray(a, np.float32), dtype=dtype)


def down(name: str, x) -> np.ndarray:
    """A float32 (or int32) numpy copy of a backend array (bf16, on the CPU uint16 bit patterns, widened exactly)."""
    get(name).synchronize()
    a = np.array(get(name).to_numpy(x))
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32) if a.dtype.kind == "f" else a


def params(devices=("cpu", "cuda"), dtypes=("float32", "bfloat16"), variants=True) -> list:
    """pytest params for the `bk` fixture (see the module docstring). variants: True (every kernel variant), False
    (the default one), or the devices whose variants run (("cpu",) for an op the GPU has one kernel for)."""
    out = []
    if variants in (True, False):
        variants = ("cpu", "cuda") if variants else ()
    if "cpu" in devices and "float32" in dtypes:
        for v in CPU_VARIANTS if "cpu" in variants else ("1thread",):
            out.append(pytest.param(Backend("cpu", "float32", v), id=f"cpu-{v}"))
    if "cuda" in devices:
        for dtype in dtypes:
            for v in CUDA_VARIANTS if "cuda" in variants else ("fast",):
                b = Backend("cuda", dtype, v)
                out.append(pytest.param(b, id=repr(b), marks=pytest.mark.cuda))
    return out


def assert_close(got, ref, rtol: float, atol: float, what: str = "") -> None:
    """|got - ref| <= atol + rtol * |ref| element by element; every value written (finite where ref is)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    unwritten = np.isfinite(ref) & ~np.isfinite(got)
    assert not unwritten.any(), f"{what}: {np.count_nonzero(unwritten)} non-finite values (unwritten?)"
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol, err_msg=what)


def assert_rel(got, ref, tol: float, what: str = "", floor: float = 1e-30) -> None:
    """max |got - ref| / max |ref| <= tol (a max-norm relative error, for results of mixed magnitude), every value
    written."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(got).all(), f"{what}: {np.count_nonzero(~np.isfinite(got))} non-finite values (unwritten?)"
    scale = max(float(np.abs(ref).max(initial=0.0)), floor)
    err = float(np.abs(got - ref).max(initial=0.0)) / scale
    assert err <= tol, f"{what}: max |got - ref| / max |ref| = {err:.3g} > {tol:g}"


def rel_err(got, ref, floor: float = 1e-6) -> float:
    """max |got - ref| / max |ref|, the denominator floored at `floor` (for gradients that vanish, e.g. C = 1)."""
    ref = np.asarray(ref, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / max(float(np.abs(ref).max()), floor))


def acc_floor(start, dtype: str) -> float:
    """rel_err's floor for a gradient accumulated (+=) into `start`: a bf16 buffer rounds the sum, so the added part
    is only known to bf16 precision of |start|."""
    return float(np.abs(start).max()) if dtype == "bfloat16" else 1e-6
