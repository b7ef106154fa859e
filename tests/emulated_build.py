"""Build fastllm once more in an emulating configuration and run tests against that build in a child pytest: the
CUDA kernels on the CPU emulator (test_cuda_emulated.py) or the AVX-512 kernels on SIMDe (test_simd_emulated.py).
The child imports the build's own package folder (build/<name>/python), never the module under test here."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str | None:
    """`name` from this interpreter's environment (pip's cmake/ninja) or else the PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        pytest.fail(f"{what} failed ({r.returncode}):\n{(r.stdout + r.stderr)[-6000:]}", pytrace=False)
    return r


def build(name: str, *defines: str) -> tuple[dict, float]:
    """Configure and build build/<name> with the -D defines; (the environment that imports it, seconds taken)."""
    if not (ROOT / "csrc").exists():
        pytest.skip("needs fastllm's source tree (csrc/)")
    cmake = _tool("cmake")
    if cmake is None:
        pytest.skip("needs cmake (pip install '.[test]' installs it)")
    ninja = _tool("ninja")
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    out, t0 = ROOT / "build" / name, time.time()
    _run([cmake, "-S", str(ROOT), "-B", str(out), *gen, *defines, "-DCMAKE_BUILD_TYPE=Release",
          f"-DPython_EXECUTABLE={sys.executable}"], f"configuring build/{name}")
    _run([cmake, "--build", str(out), "-j", str(os.cpu_count() or 2)], f"building build/{name}")
    return {**os.environ, "PYTHONPATH": str(out / "python"), "PYTHONUNBUFFERED": "1"}, time.time() - t0


def child_info(env: dict, key: str) -> str:
    """fastllm.info()[key] as the child process sees it (to check that it imports the emulating build)."""
    return subprocess.run([sys.executable, "-c", f"import fastllm; print(fastllm.info()[{key!r}])"],
                          capture_output=True, text=True, env=env).stdout


def child_pytest(env: dict, *args: str) -> tuple[int, str, str]:
    """pytest -q args in a child with env: (return code, its output, its summary line)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    out = r.stdout + r.stderr
    return r.returncode, out, out.strip().splitlines()[-1] if out.strip() else "(no output)"
