"""The CUDA kernels run on the CPU: builds fastllm once more with FASTLLM_CUDA=emulate (the real csrc/cuda sources
against csrc/cuda/emu, an emulator of the CUDA runtime, warps and tensor-core instructions) and runs the GPU tests
(marked cuda, less those marked gpu_scale) against that build in a child pytest. On a machine without a GPU this
is what runs the CUDA code; where a GPU is present the GPU tests run on it and this test is skipped.
See csrc/cuda/emu/README.md for what the emulator checks and what it cannot."""

from __future__ import annotations

import pytest
from emulated_build import ROOT, build, child_info, child_pytest

import fastllm


@pytest.mark.slow
@pytest.mark.skipif(fastllm.info()["gpu_count"] > 0, reason="a GPU (or the emulator itself) runs the GPU tests")
def test_gpu_tests_pass_on_the_cuda_emulator():
    if not (ROOT / "csrc" / "cuda" / "emu" / "translate.py").exists():
        pytest.skip("needs fastllm's source tree (csrc/)")
    env, built = build("emu-test", "-DFASTLLM_CUDA=emulate")
    rc, out, summary = child_pytest(env, "-m", "cuda and not gpu_scale", str(ROOT / "tests"))
    print(f"emulator build {built:.0f} s; GPU tests on the emulator: {summary}")
    assert "fastllm CUDA emulator" in child_info(env, "gpus"), "the child did not import the emulator build"
    assert rc == 0, f"GPU tests failed on the CUDA emulator:\n{out[-12000:]}"
    assert " passed" in summary and " failed" not in summary
