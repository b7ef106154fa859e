"""The CUDA kernels run on the CPU: builds fastllm once more with FASTLLM_CUDA=emulate (the real csrc/cuda sources
against csrc/cuda/emu, an emulator of the CUDA runtime, warps and tensor-core instructions) and runs the GPU tests
(marked cuda, less those marked gpu_scale) against that build in a child pytest. On a machine without a GPU this
is what runs the CUDA code; where a GPU is present the GPU tests run on it and this test is skipped. In a full
session the build and the child start in the background at once (emulated_build.py) and this test runs last.
See csrc/cuda/emu/README.md for what the emulator checks and what it cannot."""

from __future__ import annotations

import pytest
from emulated_build import ROOT, Emulation, child_info, run

import fastllm

EMULATION = Emulation("emu-test", ("-DFASTLLM_CUDA=emulate",), ("-m", "cuda and not gpu_scale", str(ROOT / "tests")))


def why_skip() -> str | None:
    if fastllm.info()["gpu_count"] > 0:
        return "a GPU (or the emulator itself) runs the GPU tests"
    if not (ROOT / "csrc" / "cuda" / "emu" / "translate.py").exists():
        return "needs fastllm's source tree (csrc/)"
    return None


@pytest.mark.slow
def test_gpu_tests_pass_on_the_cuda_emulator():
    if why := why_skip():
        pytest.skip(why)
    env, built, (rc, out, summary) = run(EMULATION)
    print(f"emulator build {built:.0f} s; GPU tests on the emulator: {summary}")
    assert "fastllm CUDA emulator" in child_info(env, "gpus"), "the child did not import the emulator build"
    assert rc == 0, f"GPU tests failed on the CUDA emulator:\n{out[-12000:]}"
    assert " passed" in summary and " failed" not in summary
