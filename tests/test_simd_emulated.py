"""The AVX-512 and AVX512-BF16 kernels run on a CPU without them: builds fastllm once more with FASTLLM_SIMDE=ON
(csrc/cpu/intrin.h: the same kernel sources on SIMDe's portable intrinsics, the CPU reported to have those levels, no
AMX) and runs the kernel and model tests against that build in a child pytest, so their every SIMD-level fixture
reaches avx512 and avx512_bf16 (and the best level is AVX-512, as on a Zen 4 or a Xeon). Where the CPU has AVX512_BF16
itself, the real instructions run in the main suite and this test is skipped."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from emulated_build import ROOT, Emulation, child_info, run

import fastllm

TESTS = ["adamw", "attention", "attention_bf16", "attention_gqa", "backend", "embedding", "gelu", "layernorm", "matmul",
         "matmul_bf16", "matmul_int8", "residual", "rmsnorm", "rope", "softmax_ce", "swiglu", "model", "model_arch",
         "sample"]
# the AVX2 and scalar levels run in the main suite
EMULATION = Emulation("simde-test", ("-DFASTLLM_CUDA=off", "-DFASTLLM_SIMDE=ON"),
                      ("-k", "not avx2 and not scalar", *(str(ROOT / "tests" / f"test_{t}.py") for t in TESTS)))


def why_skip() -> str | None:
    if fastllm.info()["cpu_features"]["avx512_bf16"]:
        return "this CPU runs the AVX-512 BF16 kernels"
    simde = Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix" / "include" / "simde" / "x86" / "avx512.h"
    if not simde.exists():  # where CMakeLists.txt looks for it
        return "needs SIMDe's headers: pip install cmeel-simde (in the test extra)"
    return None


@pytest.mark.slow
def test_kernel_tests_pass_on_simde():
    if why := why_skip():
        pytest.skip(why)
    env, built, (rc, out, summary) = run(EMULATION)
    print(f"SIMDe build {built:.0f} s; kernel and model tests on it: {summary}")
    assert child_info(env, "simd_detected").strip() == "avx512_bf16", "the child did not import the SIMDe build"
    assert rc == 0, f"tests failed on the SIMDe build:\n{out[-12000:]}"
    assert " passed" in summary and " failed" not in summary
