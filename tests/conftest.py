"""Shared fixtures: every test is seeded; `threads` runs a test body with 1 and 2 OpenMP threads; `bk` runs it on
every backend (tests/backends.py: the CPU's SIMD paths, CUDA float32/bfloat16 with fast and simple kernels;
narrowed by `@pytest.mark.backends(...)`); tests marked `cuda` skip with a visible reason unless fastllm was built
with CUDA and a GPU is present (or the CUDA emulator stands in for one: then the tests marked `gpu_scale` skip)."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))  # for `import reference`, `import backends`

import backends  # noqa: E402
import emulated_build  # noqa: E402

import fastllm  # noqa: E402
from fastllm import _C  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    np.random.seed(1234)


@pytest.fixture(params=[1, 2], ids=["1thread", "2threads"])
def threads(request):
    old = fastllm.get_num_threads()
    fastllm.set_num_threads(request.param)
    yield request.param
    fastllm.set_num_threads(old)


def _at_simd(level: str):
    """Runs the test body at SIMD `level` (fastllm.set_simd), skipped with the reason where the CPU lacks it; yields
    the fp32 kernels' level in use (info()["simd"]), then restores the detected level."""
    best = fastllm.info()["simd_detected"]
    if fastllm.SIMD_LEVELS.index(level) > fastllm.SIMD_LEVELS.index(best):
        pytest.skip(f"this CPU ({fastllm.info()['cpu'] or 'unknown'}) has no {level}: it supports up to {best}")
    fastllm.set_simd(level)
    try:
        yield fastllm.info()["simd"]
    finally:
        fastllm.set_simd("auto")


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def simd(request):
    """Runs the test at each SIMD code path of the fp32 kernels (a level the CPU lacks is skipped)."""
    yield from _at_simd(request.param)


@pytest.fixture(params=["avx512_bf16", "avx512", "avx2", "scalar"])
def simd_bf16(request):
    """Like `simd`, with the avx512_bf16 level too (the VDPBF16PS path of the bf16-weight matmul)."""
    yield from _at_simd(request.param)


@pytest.fixture(params=["amx", "amx_emulated", "avx512_vnni", "avx2", "scalar"])
def w8a8_path(request):
    """Each kernel of the w8a8 matmul (fastllm.info()["w8a8"]): AMX-INT8 tiles where the CPU has them and on every CPU
    their C++ model (prompts: >= 16 rows, C a multiple of 64), VPDPBUSD where the CPU has AVX512-VNNI, then the AVX2
    kernel and the portable loop; a kernel the CPU lacks is skipped with the reason."""
    if request.param == "amx_emulated":
        _C.set_amx_emulation(True)
        try:
            assert fastllm.info()["w8a8"] == "amx (emulated)"
            yield request.param
        finally:
            _C.set_amx_emulation(False)
        return
    d = fastllm.info()
    if request.param == "amx" and not (d["cpu_features"]["amx_int8"] and d["amx_permission"]):
        pytest.skip(f"this CPU ({d['cpu'] or 'unknown'}) has no AMX-INT8 tiles granted to this process")
    if request.param == "avx512_vnni" and not d["cpu_features"]["avx512_vnni"]:
        pytest.skip(f"this CPU ({d['cpu'] or 'unknown'}) has no AVX512-VNNI")
    for _ in _at_simd({"avx512_vnni": "avx512"}.get(request.param, request.param)):
        assert fastllm.info()["w8a8"] == request.param
        yield request.param


@pytest.fixture(params=["amx", "amx_emulated", "avx512_bf16", "avx512", "avx2", "scalar"])
def bf16_gemm(request):
    """Each kernel of the bf16 GEMM (fastllm.info()["bf16_gemm"]): the AMX tiles where the CPU has them, and on every
    CPU the same AMX kernel on the C++ model of the tiles (_C.set_amx_emulation), then the SIMD levels."""
    if request.param != "amx_emulated":
        yield from _at_simd(request.param)
        return
    _C.set_amx_emulation(True)
    try:
        assert fastllm.info()["bf16_gemm"] == "amx (emulated)"
        yield "amx (emulated)"
    finally:
        _C.set_amx_emulation(False)


def pytest_generate_tests(metafunc):
    if "bk" in metafunc.fixturenames:
        marker = metafunc.definition.get_closest_marker("backends")
        metafunc.parametrize("bk", backends.params(**(marker.kwargs if marker else {})), indirect=True)


@pytest.fixture
def bk(request):
    """The backend (tests/backends.py) the test body runs on, its kernel variant selected for the test."""
    with request.param.selected():
        yield request.param


@pytest.fixture
def torch_cuda():
    """torch, for tests that compare with PyTorch on the GPU; skips where torch has no CUDA (the CPU wheel, or
    fastllm's CUDA emulator: FASTLLM_CUDA=emulate)."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs PyTorch with CUDA (this torch has none)")
    return torch


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _emulation(item):
    """The Emulation (emulated_build.py) that the item's module runs, or None."""
    return getattr(getattr(item, "module", None), "EMULATION", None)


@pytest.hookimpl(trylast=True)  # after -m/-k deselection
def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: _emulation(item) is not None)  # the emulations' tests last
    info = fastllm.info()
    if info.get("cuda_emulator"):
        skip = pytest.mark.skip(reason="too large for the CUDA emulator: runs on a real GPU only")
        for item in items:
            if "gpu_scale" in item.keywords:
                item.add_marker(skip)
        return
    if info["cuda_built"] and info["gpu_count"] > 0:
        return
    why = "no CUDA build of fastllm" if not info["cuda_built"] else "CUDA built but no GPU found"
    skip = pytest.mark.skip(reason=f"needs an NVIDIA GPU: {why}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    """The emulating builds and their child pytests start now in the background (tests/emulated_build.py), where
    their tests are to run; those tests come last and collect the results."""
    if not session.config.option.collectonly:
        emulated_build.start([_emulation(i) for i in session.items if _emulation(i) and not i.module.why_skip()])


def pytest_unconfigure(config):
    emulated_build.stop()
