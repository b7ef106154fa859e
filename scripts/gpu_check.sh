#!/usr/bin/env bash
# One command for a GPU session, run from the repository root on the GPU machine:
#   bash scripts/gpu_check.sh
# 1. builds fastllm with CUDA for this GPU's architecture only (cmake + ninja into build/cuda, incremental on a
#    warm machine; drops python/fastllm/_C*.so, used through PYTHONPATH=python),
# 2. runs the GPU tests: pytest -m cuda --maxfail=40 (tests/test_cuda_model.py first: the one model on the GPU
#    against the CPU, then every test marked cuda: the ops on both backends, tests/test_<op>.py) -> $OUT/pytest.log
# 3. runs the benchmarks:  python benchmarks/bench_cuda.py --quick (bench_<op>.py --device cuda, then GPT-2 124M
#    training against PyTorch)    -> $OUT/bench.log
# 4. NCCL all-reduce (benchmarks/bench_distributed.py --nccl)         -> $OUT/nccl.log
# all inside ~9 minutes (each stage under `timeout`, sized from what is left). Logs land in $OUT (default
# ./gpu_out). Environment knobs: PYTEST_ARGS (default "--maxfail=40 --tb=short"), PYTEST_FILES (default
# "tests/test_cuda_model.py tests"; e.g. tests/test_cuda_model.py alone), BENCH_ARGS (default "--quick"),
# BUDGET_S (540).
# Exit status: 0 if every stage passed, else the first failing stage's status.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
BUDGET_S="${BUDGET_S:-540}"
START=$SECONDS
PY="$(command -v python3 || command -v python)"
left() { echo $((BUDGET_S - (SECONDS - START))); }
cap() { local l; l=$(left); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }  # min(stage cap, time left)
status=0
note() { echo "== [$((SECONDS - START))s] $*" | tee -a "$OUT/summary.txt"; }

note "gpu_check: $(date -u +%FT%TZ) in $PWD"
nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -15
ARCH="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')"
ARCH="${ARCH:-80;90}"
note "python: $PY ($("$PY" --version 2>&1)); nvcc: $(nvcc --version 2>/dev/null | tail -1); arch: $ARCH"

# ---- 1. build
{
  timeout "$(cap 60)" cmake -S . -B build/cuda -G Ninja -DFASTLLM_CUDA=on -DFASTLLM_CUDA_ARCHS="$ARCH" \
    -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PY" &&
  timeout "$(cap 300)" cmake --build build/cuda -j "$(nproc)"
} > "$OUT/build.log" 2>&1
rc=$?
tail -5 "$OUT/build.log"
if [ $rc -ne 0 ]; then
  grep -E "error|Error" "$OUT/build.log" | head -40
  note "BUILD FAILED (rc=$rc); see build.log"
  exit $rc
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
note "built: $("$PY" -c 'import fastllm; print(fastllm.info())' 2>&1)"

# train() draws a progress bar with tqdm: a do-nothing stand-in if the machine lacks it (tests only)
if ! "$PY" -c "import tqdm" 2>/dev/null; then
  mkdir -p build/shim/tqdm
  cat > build/shim/tqdm/__init__.py <<'EOF'
class tqdm:
    def __init__(self, iterable=None, *a, **k): self.iterable = iterable
    def __iter__(self): return iter(self.iterable)
    def write(self, s, *a, **k): print(s)
    def set_postfix(self, *a, **k): pass
    def update(self, *a, **k): pass
    def close(self): pass
EOF
  echo "from . import tqdm" > build/shim/tqdm/auto.py
  export PYTHONPATH="$PYTHONPATH:$PWD/build/shim"
  note "tqdm missing: using a stand-in"
fi

# ---- 2. GPU tests (a first run on new kernels: see many failures at once, short tracebacks, a per-test timeout
# so a hung kernel costs one test, not the session)
note "pytest (timeout $(cap 240)s)"
PER_TEST=""
"$PY" -c "import pytest_timeout" 2>/dev/null && PER_TEST="--timeout=60"
# shellcheck disable=SC2086
timeout "$(cap 240)" "$PY" -m pytest -m cuda ${PYTEST_ARGS:---maxfail=40 --tb=short} $PER_TEST -q -rf \
  --durations=15 ${PYTEST_FILES:-tests/test_cuda_model.py tests} 2>&1 \
  | tee "$OUT/pytest.log"
rc=$?
note "pytest rc=$rc: $(grep -E ' in [0-9.]+s' "$OUT/pytest.log" | tail -1)"
[ $status -eq 0 ] && status=$rc

# ---- 3. benchmarks (kernel scripts, then GPT-2 124M training vs PyTorch)
T=$(cap 400)
if [ "$T" -gt 30 ]; then
  note "bench_cuda (timeout ${T}s)"
  # shellcheck disable=SC2086
  timeout "$T" "$PY" benchmarks/bench_cuda.py ${BENCH_ARGS:---quick} --kernel-timeout $((T / 5)) 2>&1 \
    | tee "$OUT/bench.log"
  rc=$?
  note "bench rc=$rc"
  [ $status -eq 0 ] && status=$rc
else
  note "no time left for the benchmarks"
fi

# ---- 4. NCCL (data-parallel training's GPU path): all-reduce on DeviceArrays over a 1-rank communicator; skips
# with its reason without NCCL (pip install ".[nccl]")
T=$(cap 90)
if [ "$T" -gt 20 ]; then
  note "NCCL (timeout ${T}s)"
  timeout "$T" "$PY" benchmarks/bench_distributed.py --nccl --quick 2>&1 | tee "$OUT/nccl.log"
  note "nccl rc=${PIPESTATUS[0]}"
fi
note "done in $((SECONDS - START))s, status $status"
exit $status
