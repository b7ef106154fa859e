/*
RMSNorm over the last axis (Zhang & Sennrich 2019; Llama/Qwen/Mistral's norm, and Qwen3's QK-norm over the head_dim
rows of q and k): out = x * rstd * weight, rstd = 1 / sqrt(mean(x^2) + eps), in this order (as HF LlamaRMSNorm:
(x * rstd) * weight in fp32). Shapes: rows of C elements (see rmsnorm.h for the row layout: dense (N, C), or head
rows inside a packed qkv buffer), weight (C), rstd (N) saved for backward. O(N*C), memory bound.
Backward (accumulates), with xhat = x * rstd and g = dout * weight:
  dinp += rstd * (g - xhat * mean(g * xhat)),   dweight += sum_n dout * xhat.
  In place (dinp is dout): the rows are replaced by their gradient (=, not +=); with the head rows of a packed qkv
  (QK-norm) the other rows (v) pass through unchanged, which is their gradient.

CPU: OpenMP over contiguous ranges of rows (serial below 32 Ki elements). Per row one sum-of-squares pass and one
write pass (backward: one reduction pass, one update pass); the row stays in L1 in between. Weight grads go to
per-thread (C) partial buffers summed in thread order at the end (deterministic for a thread count, no atomics).
Vectorization as layernorm.cpp: the row loops are written once (`omp simd` reductions) in always_inline bodies
compiled for AVX-512, AVX2 and the baseline, chosen at run time.
Perf notes: see benchmarks/bench_rmsnorm.py (vs torch's aten rms_norm and the HF formula).
*/
#include "rmsnorm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace fastllm::cpu {

// ---------------------------------------------------------------------------------------------------------
// rows [n0, n1) (the spec; `omp simd` sums run lane-parallel), compiled per ISA by the wrappers below

struct Rows {  // where row n lives (rmsnorm.h)
    int64_t C, group, group_stride;
    FASTLLM_INLINE int64_t at(int64_t n) const { return (n / group) * group_stride + (n % group) * C; }
};

static FASTLLM_INLINE void rmsnorm_forward_rows(float* out, float* rstd, const float* inp, const float* weight,
                                                int64_t n0, int64_t n1, Rows rows, float eps) {
    const int64_t C = rows.C;
    for (int64_t n = n0; n < n1; n++) {
        const float* x = inp + rows.at(n);
        float ss = 0;
#pragma omp simd reduction(+ : ss)
        for (int64_t i = 0; i < C; i++) ss += x[i] * x[i];
        const float r = 1.0f / std::sqrt(ss / C + eps);
        float* o = out + rows.at(n);
#pragma omp simd
        for (int64_t i = 0; i < C; i++) o[i] = x[i] * r * weight[i];
        rstd[n] = r;
    }
}

static FASTLLM_INLINE void rmsnorm_backward_rows(float* dinp, float* __restrict__ dw, const float* dout,
                                                 const float* inp, const float* weight, const float* rstd,
                                                 int64_t n0, int64_t n1, Rows rows) {
    const int64_t C = rows.C;
    const bool in_place = dinp == dout;  // dx = gradient (replaces dout's rows), else dx += gradient
    for (int64_t n = n0; n < n1; n++) {
        const float *x = inp + rows.at(n), *dy = dout + rows.at(n);
        const float r = rstd[n];
        float gxs = 0;
#pragma omp simd reduction(+ : gxs)
        for (int64_t i = 0; i < C; i++) gxs += dy[i] * weight[i] * (x[i] * r);
        const float gx_mean = gxs / C;
        if (in_place) {
            float* dx = dinp + rows.at(n);  // == dy: each element is read before it is written
            for (int64_t i = 0; i < C; i++) {
                const float xhat = x[i] * r, g = dy[i];
                dw[i] += g * xhat;
                dx[i] = r * (g * weight[i] - xhat * gx_mean);
            }
            continue;
        }
        float* __restrict__ dx = dinp + rows.at(n);
#pragma omp simd
        for (int64_t i = 0; i < C; i++) {
            const float xhat = x[i] * r;
            dx[i] += r * (dy[i] * weight[i] - xhat * gx_mean);
            dw[i] += dy[i] * xhat;
        }
    }
}

FASTLLM_TARGET_AVX512 static void rmsnorm_forward_avx512(float* out, float* rstd, const float* inp, const float* w,
                                                         int64_t n0, int64_t n1, Rows rows, float eps) {
    rmsnorm_forward_rows(out, rstd, inp, w, n0, n1, rows, eps);
}
FASTLLM_TARGET_AVX2 static void rmsnorm_forward_avx2(float* out, float* rstd, const float* inp, const float* w,
                                                     int64_t n0, int64_t n1, Rows rows, float eps) {
    rmsnorm_forward_rows(out, rstd, inp, w, n0, n1, rows, eps);
}
static void rmsnorm_forward_base(float* out, float* rstd, const float* inp, const float* w, int64_t n0, int64_t n1,
                                 Rows rows, float eps) {
    rmsnorm_forward_rows(out, rstd, inp, w, n0, n1, rows, eps);
}
FASTLLM_TARGET_AVX512 static void rmsnorm_backward_avx512(float* dinp, float* dw, const float* dout, const float* inp,
                                                          const float* w, const float* rstd, int64_t n0, int64_t n1,
                                                          Rows rows) {
    rmsnorm_backward_rows(dinp, dw, dout, inp, w, rstd, n0, n1, rows);
}
FASTLLM_TARGET_AVX2 static void rmsnorm_backward_avx2(float* dinp, float* dw, const float* dout, const float* inp,
                                                      const float* w, const float* rstd, int64_t n0, int64_t n1,
                                                      Rows rows) {
    rmsnorm_backward_rows(dinp, dw, dout, inp, w, rstd, n0, n1, rows);
}
static void rmsnorm_backward_base(float* dinp, float* dw, const float* dout, const float* inp, const float* w,
                                  const float* rstd, int64_t n0, int64_t n1, Rows rows) {
    rmsnorm_backward_rows(dinp, dw, dout, inp, w, rstd, n0, n1, rows);
}

// ---------------------------------------------------------------------------------------------------------
// entry points: contiguous row ranges per thread

static constexpr int64_t kParallelMin = 32768;  // elements; below: one thread

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C,
                     int64_t group, int64_t group_stride, float eps) {
    if (N <= 0 || C <= 0) return;
    const Rows rows{C, std::max<int64_t>(group, 1), group_stride};
    const Simd simd = simd_level();
#pragma omp parallel if (N * C >= kParallelMin)
    {
        int64_t n0, n1;
        thread_rows(N, n0, n1);
        if (simd == Simd::avx512) rmsnorm_forward_avx512(out, rstd, inp, weight, n0, n1, rows, eps);
        else if (simd == Simd::avx2) rmsnorm_forward_avx2(out, rstd, inp, weight, n0, n1, rows, eps);
        else rmsnorm_forward_base(out, rstd, inp, weight, n0, n1, rows, eps);
    }
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int64_t C, int64_t group, int64_t group_stride) {
    if (N <= 0 || C <= 0) return;
    const Rows rows{C, std::max<int64_t>(group, 1), group_stride};
    const Simd simd = simd_level();
    const int nt = N * C >= kParallelMin ? max_threads() : 1;
    // per-thread partial weight grads; thread 0 adds straight into dweight
    std::vector<float> part((size_t)std::max(0, nt - 1) * C, 0.0f);
#pragma omp parallel num_threads(nt)
    {
        const int id = thread_id();
        int64_t n0, n1;
        thread_rows(N, n0, n1);
        float* dw = id == 0 ? dweight : part.data() + (size_t)(id - 1) * C;
        if (simd == Simd::avx512) rmsnorm_backward_avx512(dinp, dw, dout, inp, weight, rstd, n0, n1, rows);
        else if (simd == Simd::avx2) rmsnorm_backward_avx2(dinp, dw, dout, inp, weight, rstd, n0, n1, rows);
        else rmsnorm_backward_base(dinp, dw, dout, inp, weight, rstd, n0, n1, rows);
    }
    for (int t = 1; t < nt; t++) {
        const float* dw = part.data() + (size_t)(t - 1) * C;
        for (int64_t i = 0; i < C; i++) dweight[i] += dw[i];
    }
}

}  // namespace fastllm::cpu
