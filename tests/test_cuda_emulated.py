"""The CUDA kernels run on the CPU: builds fastllm once more with FASTLLM_CUDA=emulate (the real csrc/cuda sources
against csrc/cuda/emu, an emulator of the CUDA runtime, warps and tensor-core instructions) and runs the GPU tests
(marked cuda, less those marked gpu_scale) against that build in a child pytest. On a machine without a GPU this
is what runs the CUDA code; where a GPU is present the GPU tests run on it and this test is skipped.
See csrc/cuda/emu/README.md for what the emulator checks and what it cannot."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import fastllm

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "emu-test"


def _tool(name: str) -> str | None:
    """`name` from this interpreter's environment (pip's cmake/ninja) or else the PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        pytest.fail(f"{what} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-6000:]}", pytrace=False)
    return r


@pytest.mark.slow
@pytest.mark.skipif(fastllm.info()["gpu_count"] > 0, reason="a GPU (or the emulator itself) runs the GPU tests")
def test_gpu_tests_pass_on_the_cuda_emulator():
    if not (ROOT / "csrc" / "cuda" / "emu" / "translate.py").exists():
        pytest.skip("needs fastllm's source tree (csrc/)")
    cmake = _tool("cmake")
    if cmake is None:
        pytest.skip("needs cmake (pip install '.[test]' installs it)")
    ninja = _tool("ninja")
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    t0 = time.time()
    _run([cmake, "-S", str(ROOT), "-B", str(BUILD), *gen, "-DFASTLLM_CUDA=emulate", "-DCMAKE_BUILD_TYPE=Release",
          f"-DPython_EXECUTABLE={sys.executable}"], "configuring the emulator build")
    _run([cmake, "--build", str(BUILD), "-j", str(os.cpu_count() or 2)], "building the emulator build")
    built = time.time() - t0

    env = {**os.environ, "PYTHONPATH": str(BUILD / "python"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda and not gpu_scale", "-p", "no:cacheprovider",
           "--durations=5", str(ROOT / "tests")]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    out = r.stdout + r.stderr
    summary = out.strip().splitlines()[-1] if out.strip() else "(no output)"
    print(f"emulator build {built:.0f} s; GPU tests on the emulator: {summary}")
    assert "fastllm CUDA emulator" in subprocess.run(
        [sys.executable, "-c", "import fastllm; print(fastllm.info()['gpus'])"], capture_output=True, text=True,
        env=env).stdout, "the child did not import the emulator build"
    assert r.returncode == 0, f"GPU tests failed on the CUDA emulator:\n{out[-12000:]}"
    assert " passed" in summary and " failed" not in summary
