"""fastllm.info(): build and machine fields, the CPU's features against /proc/cpuinfo, threads, and the SIMD level
(fastllm.set_simd / FASTLLM_SIMD); the CLI's `fastllm info`."""

import os
import platform
import subprocess
import sys

import numpy as np
import pytest

import fastllm


def test_info_fields():
    d = fastllm.info()
    for key in ("version", "build", "simd", "threads", "cuda_built", "gpu_count"):
        assert key in d, key
    assert d["version"] == fastllm.__version__
    assert d["simd"] in ("avx512", "avx2", "scalar")
    assert d["threads"] >= 1


def test_set_num_threads():
    old = fastllm.get_num_threads()
    try:
        fastllm.set_num_threads(1)
        assert fastllm.get_num_threads() == 1
    finally:
        fastllm.set_num_threads(old)


def test_cli_version_and_info():
    out = subprocess.run([sys.executable, "-m", "fastllm", "--version"], capture_output=True, text=True, check=True)
    assert fastllm.__version__ in out.stdout
    out = subprocess.run([sys.executable, "-m", "fastllm", "info"], capture_output=True, text=True, check=True)
    assert "simd" in out.stdout and "cuda_built" in out.stdout


def test_set_num_threads_reaches_other_threads():
    """OpenMP keeps its thread count per thread: fastllm's count must hold in threads that call the kernels later
    (a server's engine thread, a loader thread), not only in the one that set it."""
    import threading

    old = fastllm.get_num_threads()
    try:
        fastllm.set_num_threads(1)
        seen = []
        t = threading.Thread(target=lambda: seen.append(fastllm.get_num_threads()))
        t.start()
        t.join()
        assert seen == [1]
    finally:
        fastllm.set_num_threads(old)


# ---- CPU features and the SIMD level (csrc/cpu/simd.cpp; fastllm.set_simd, FASTLLM_SIMD)

FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16",
            "amx_int8")


def proc_cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo ("flags" split into a set); skips where there is none."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"CPUID features are read on x86-64 only, this is {platform.machine()}")
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read().split("\n\n")[0]
    except OSError:
        pytest.skip("no /proc/cpuinfo (not Linux)")
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    fields["flags"] = set(fields.get("flags", "").split())
    return fields


def test_cpu_features_agree_with_proc_cpuinfo():
    """Each feature is what Linux reports: CPUID bits checked against XCR0, as the kernel does for its flags."""
    d, ref = fastllm.info(), proc_cpuinfo()
    if d["cpu"].endswith("(SIMDe emulation)"):
        pytest.skip("a FASTLLM_SIMDE test build reports the AVX-512 levels it emulates, not the CPU's")
    assert set(d["cpu_features"]) == set(FEATURES)
    got = {k: d["cpu_features"][k] for k in FEATURES}
    assert got == {k: k in ref["flags"] for k in FEATURES}
    if "model name" in ref:
        assert d["cpu"] == ref["model name"]


def test_amx_permission_is_a_bool():
    d = fastllm.info()
    assert isinstance(d["amx_permission"], bool)
    f = d["cpu_features"]
    amx = f["amx_tile"] and f["amx_bf16"] and f["avx512_bf16"] and d["amx_permission"]
    assert (d["simd_detected"] == "amx") == amx
    if not d["cpu_features"]["amx_tile"]:
        assert d["amx_permission"] is False  # nothing to grant without AMX


def levels_up_to_detected() -> list[str]:
    best = fastllm.info()["simd_detected"]
    assert best in fastllm.SIMD_LEVELS
    return list(fastllm.SIMD_LEVELS[:fastllm.SIMD_LEVELS.index(best) + 1])


def test_set_simd_each_supported_level():
    try:
        for level in levels_up_to_detected():
            fastllm.set_simd(level)
            d = fastllm.info()
            assert fastllm.get_simd() == level
            assert d["simd"] == ("avx512" if level in ("avx512_bf16", "amx") else level)  # the fp32 kernels' ISA
            bf16w = {"scalar": "scalar", "avx512_bf16": "avx512_bf16", "amx": "avx512_bf16"}  # batch-1 decode: no AMX
            assert d["bf16_matmul"] == bf16w.get(level, "avx2")
            assert d["bf16_gemm"] == ("avx512" if level == "avx512" else level)
            assert d["bf16_attention"] == ("avx512_bf16" if level in ("avx512_bf16", "amx") else "fp32")
            assert d["bf16_weights"] == ("panels" if level == "avx512_bf16" else "rows")  # AMX reads rows in place
            assert fastllm.ops.bf16_panels_preferred() == (d["bf16_weights"] == "panels")
            vnni = d["cpu_features"]["avx512_vnni"] and d["simd"] == "avx512"
            w8a8 = "amx" if level == "amx" and d["cpu_features"]["amx_int8"] else "avx512_vnni" if vnni else "avx2"
            assert d["w8a8"] == ("scalar" if level == "scalar" else w8a8)
            x = np.random.default_rng(0).standard_normal((5, 37), dtype=np.float32)
            w = np.random.default_rng(1).standard_normal((11, 37), dtype=np.float32)
            np.testing.assert_allclose(fastllm.ops.matmul_forward(x, w), x.astype(np.float64) @ w.T, rtol=1e-4,
                                       atol=1e-4)
    finally:
        fastllm.set_simd("auto")
    assert fastllm.get_simd() == fastllm.info()["simd_detected"]


def test_set_simd_bad_level():
    with pytest.raises(ValueError, match="must be one of scalar, avx2, avx512, avx512_bf16, amx or auto, got 'sse'"):
        fastllm.set_simd("sse")
    supported = levels_up_to_detected()
    for level in fastllm.SIMD_LEVELS[len(supported):]:  # what this CPU lacks (none on a Zen 4 / Sapphire Rapids)
        with pytest.raises(ValueError, match=f"simd level '{level}' is not supported by this CPU"):
            fastllm.set_simd(level)
        assert fastllm.get_simd() == supported[-1]  # unchanged


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


def test_fastllm_simd_environment_variable():
    out = run_python("import fastllm; print(fastllm.get_simd(), fastllm.info()['simd'])", FASTLLM_SIMD="scalar")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["scalar", "scalar"]
    out = run_python("import fastllm", FASTLLM_SIMD="avx3")
    assert out.returncode != 0
    assert "ValueError: environment variable FASTLLM_SIMD: simd level must be one of" in out.stderr
    lacking = fastllm.SIMD_LEVELS[len(levels_up_to_detected()):]
    if lacking:
        out = run_python("import fastllm", FASTLLM_SIMD=lacking[-1])
        assert out.returncode != 0 and "is not supported by this CPU" in out.stderr
