import subprocess
import sys

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
