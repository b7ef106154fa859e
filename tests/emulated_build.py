"""Build fastllm once more in an emulating configuration and run tests against that build in a child pytest: the
CUDA kernels on the CPU emulator (test_cuda_emulated.py) or the AVX-512 kernels on SIMDe (test_simd_emulated.py).
The child imports the build's own package folder (build/<name>/python), never the module under test here.

These two runs are half of the suite's time, nearly all of it CPU, while the rest of the suite keeps about one core
busy. So when a session collects them, conftest.py starts them at once (`start`), one after the other in a background
thread, at the lowest CPU priority (SCHED_IDLE): they take the core the other tests leave idle without slowing those
down, the two tests run last, and each collects its result (`run`). Run alone, a test builds and runs in the
foreground."""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Emulation:
    """A build (build/<name>, with the -D defines) and the arguments of the child pytest run against it."""
    name: str
    defines: tuple[str, ...]
    args: tuple[str, ...]


def _tool(name: str) -> str | None:
    """`name` from this interpreter's environment (pip's cmake/ninja) or else the PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


_live: set[subprocess.Popen] = set()  # the background's processes, killed by stop()
_stopped = False  # and any it starts after that
_lock = threading.Lock()


def _run(cmd: list[str], low: bool, **kw) -> tuple[int, str]:
    """(return code, stdout + stderr) of cmd, at the lowest priority if low; in its own process group, so stop()
    ends it all. Lowest: Linux's SCHED_IDLE (chrt -i), which any other task preempts as soon as it wakes, so the
    OpenMP threads of the tests in the foreground never wait for it; nice 19 where there is no chrt."""
    if low and shutil.which("chrt"):
        cmd = ["chrt", "-i", "0", *cmd]
    elif low and shutil.which("nice"):
        cmd = ["nice", "-n", "19", *cmd]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                         **kw)
    with _lock:
        _live.add(p)
        if _stopped:
            os.killpg(p.pid, signal.SIGKILL)
    try:
        out = p.communicate()[0]
    finally:
        with _lock:
            _live.discard(p)
    return p.returncode, out


def _checked(cmd: list[str], what: str, low: bool, environ: dict) -> None:
    rc, out = _run(cmd, low, env=environ)
    if rc != 0:
        pytest.fail(f"{what} failed ({rc}):\n{out[-6000:]}", pytrace=False)


def build(name: str, *defines: str, low: bool = False, environ: dict | None = None) -> tuple[dict, float]:
    """Configure and build build/<name> with the -D defines, in `environ` (default: os.environ); (the environment
    that imports it, seconds taken)."""
    environ = dict(os.environ if environ is None else environ)
    if not (ROOT / "csrc").exists():
        pytest.skip("needs fastllm's source tree (csrc/)")
    cmake = _tool("cmake")
    if cmake is None:
        pytest.skip("needs cmake (pip install '.[test]' installs it)")
    ninja = _tool("ninja")
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    out, t0 = ROOT / "build" / name, time.time()
    _checked([cmake, "-S", str(ROOT), "-B", str(out), *gen, *defines, "-DCMAKE_BUILD_TYPE=Release",
              f"-DPython_EXECUTABLE={sys.executable}"], f"configuring build/{name}", low, environ)
    _checked([cmake, "--build", str(out), "-j", str(os.cpu_count() or 2)], f"building build/{name}", low, environ)
    return {**environ, "PYTHONPATH": str(out / "python"), "PYTHONUNBUFFERED": "1"}, time.time() - t0


def child_info(env: dict, key: str) -> str:
    """fastllm.info()[key] as the child process sees it (to check that it imports the emulating build)."""
    return subprocess.run([sys.executable, "-c", f"import fastllm; print(fastllm.info()[{key!r}])"],
                          capture_output=True, text=True, env=env).stdout


def child_pytest(env: dict, *args: str, low: bool = False) -> tuple[int, str, str]:
    """pytest -q args in a child with env: (return code, its output, its summary line)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=5", *args]
    rc, out = _run(cmd, low, env=env, cwd=ROOT)
    return rc, out, out.strip().splitlines()[-1] if out.strip() else "(no output)"


def _build_and_test(em: Emulation, low: bool, environ: dict | None = None) -> tuple[dict, float, tuple[int, str, str]]:
    env, built = build(em.name, *em.defines, low=low, environ=environ)
    return env, built, child_pytest(env, *em.args, low=low)


_started: dict[str, concurrent.futures.Future] = {}


def start(ems: list[Emulation]) -> None:
    """Starts the emulations' builds and child pytests now, in order, in a background thread, at the lowest priority,
    in the environment of this moment (tests change os.environ for a while, monkeypatch.setenv)."""
    todo = [(em, concurrent.futures.Future()) for em in ems if em.name not in _started]
    _started.update((em.name, fut) for em, fut in todo)
    environ = dict(os.environ)

    def work():
        for em, fut in todo:
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(_build_and_test(em, low=True, environ=environ))
            except BaseException as e:  # pytest.skip/fail too: re-raised in the test by run()
                fut.set_exception(e)

    if todo:
        threading.Thread(target=work, name="emulated builds", daemon=True).start()


def run(em: Emulation) -> tuple[dict, float, tuple[int, str, str]]:
    """em's (environment, build seconds, (return code, output, summary line)): the background run's if start()
    began one, else built and run now."""
    fut = _started.pop(em.name, None)
    return fut.result() if fut is not None else _build_and_test(em, low=False)


def stop() -> None:
    """Ends what the background still runs (at the end of the session, or when it is interrupted)."""
    global _stopped
    for fut in _started.values():
        fut.cancel()
    with _lock:
        _stopped = True
        for p in _live:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
