/*
Fused softmax + cross-entropy (+ its gradient) and the fused classifier (lm head + cross-entropy) on the GPU.
  losses[n] = logsumexp(logits[n]) - logits[n, t_n];  dlogits[n] = (softmax(logits[n]) - onehot(t_n)) * grad_scale
(* row_weights[n] when given: the gradient of sum_n w_n losses_n; written =, may alias logits: in place). With
softcap c > 0 every logit is read as z = c tanh(x / c): the loss is that of z, the gradient (* (1 - (z/c)^2)) that of
x; tanh from __expf and an IEEE division (tanhf would be tanh.approx under --use_fast_math, 2^-11 relative error).
With temperature T != 1 every (capped) logit is then read as u = z * (1 / T) (1 / T computed on the host, IEEE): the
loss is that of u, the gradient (softmax(u) - onehot) * grad_scale / T (* dz/dx) that of x. T = 1 takes none of it.
Rows with t_n == ignore_index: loss 0, zero gradient row. A target outside [0, V) reads nothing: loss NaN (the host
checks ids; the GPU cannot raise) and its row gets softmax * grad_scale.
Shapes: logits, dlogits (N, V) with row stride ld >= V; losses (N, f32); targets (N, int32). O(N V), memory bound.

softmax_ce_kernel: one block (512 threads) per row. Pass 1 reads the row once: each thread keeps an online
  (max m, sum s of exp(x - m)) over its strided elements (one exp per element: s is rescaled only when m grows),
  then the pairs are merged across the block (warp shuffles, then shared memory): lse = M + log S, all fp32.
  Every thread reads the target logit before the block-wide merge, i.e. before anyone can overwrite it in place.
  Pass 2 re-reads the row (mostly from L2: a 50257-wide bf16 row is 100 KB) and writes the gradient.
lmhead_ce: for chunks of rows of hidden (N, C): logits chunk = hidden[chunk] @ weight (V, C)^T via
  the tensor-core gemm into the scratch (chunk, V) of dtype T, the CE kernel in place on it (losses, dlogits),
  then dhidden[chunk] += dlogits @ weight and dweight += dlogits^T @ hidden[chunk] (gemm with accumulate).
  The scratch rows are padded to a multiple of 8 elements when it has room (V = 50257 -> 50264) so that the
  gemms reading dlogits keep 16-byte cp.async (else they would fall back to the FFMA kernel); chunk rows = the
  scratch's capacity at that stride. Peak extra memory: the scratch (default <= 256 MiB, see
  lmhead_chunk_rows) instead of N x V logits + N x V gradient (+ fp32 copies) of an unfused implementation.
  dweight (fp32) is read and written once per chunk: larger chunks amortise that (V C 8 bytes per chunk).
Perf notes: not measured yet (written without a GPU); see benchmarks/bench_softmax_ce.py --device cuda.
*/
#include <algorithm>
#include <cfloat>

#include "common.cuh"

namespace fastllm::cuda {

// ---------------------------------------------------------------------------------------------------------
// helpers

struct MaxSum {
    float m, s;  // running max and sum of exp(x - m); m = -FLT_MAX with s = 0 means "empty"
};

// merge of two partial (max, sum) pairs; exp(-FLT_MAX - finite) underflows to 0, so empty parts add nothing
__device__ __forceinline__ MaxSum merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    return {m, a.s * __expf(a.m - m) + b.s * __expf(b.m - m)};
}

// ---------------------------------------------------------------------------------------------------------
// kernels

constexpr int kCEThreads = 512;

template <typename T>
__global__ void __launch_bounds__(kCEThreads)
    softmax_ce_kernel(float* losses, T* dlogits, const T* logits, int64_t ld, const int32_t* targets, int64_t V,
                      float grad_scale, int32_t ignore_index, const float* row_weights, float softcap,
                      float inv_temperature) {
    // not __restrict__: dlogits may alias logits
    const int64_t row = blockIdx.x;
    const T* x = logits + row * ld;
    T* d = dlogits ? dlogits + row * ld : nullptr;
    const int32_t t = targets[row];
    const int tid = threadIdx.x;
    if (t == ignore_index) {
        if (tid == 0) losses[row] = 0.f;
        if (d)
            for (int64_t i = tid; i < V; i += kCEThreads) d[i] = from_f32<T>(0.f);
        return;
    }
    const bool valid = t >= 0 && (int64_t)t < V;
    // softcap c > 0: every logit is read as z = c tanh(x / c); temperature T != 1: then as u = z / T (the loss is
    // that of u)
    const bool tempered = inv_temperature != 1.f;
    const auto capped = [&](int64_t i) {
        const float v = to_f32(x[i]);
        return softcap > 0.f ? softcap * tanh_accurate(v / softcap) : v;
    };
    const auto logit = [&](int64_t i) { return tempered ? capped(i) * inv_temperature : capped(i); };
    const float xt = valid ? logit(t) : 0.f;  // read by every thread before the barrier below

    // pass 1: online max / sum of exp
    MaxSum ms{-FLT_MAX, 0.f};
    for (int64_t i = tid; i < V; i += kCEThreads) {
        const float v = logit(i);
        if (v > ms.m) {
            ms.s = ms.s * __expf(ms.m - v) + 1.f;
            ms.m = v;
        } else {
            ms.s += __expf(v - ms.m);  // NaN logits propagate (v > m is false; exp(NaN) = NaN)
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum other{__shfl_xor_sync(0xffffffffu, ms.m, o), __shfl_xor_sync(0xffffffffu, ms.s, o)};
        ms = merge(ms, other);
    }
    __shared__ MaxSum warp_ms[kCEThreads / 32];
    __shared__ float s_lse;
    if (tid % 32 == 0) warp_ms[tid / 32] = ms;
    __syncthreads();
    if (tid < 32) {
        ms = tid < kCEThreads / 32 ? warp_ms[tid] : MaxSum{-FLT_MAX, 0.f};
        for (int o = 16; o > 0; o >>= 1) {
            MaxSum other{__shfl_xor_sync(0xffffffffu, ms.m, o), __shfl_xor_sync(0xffffffffu, ms.s, o)};
            ms = merge(ms, other);
        }
        if (tid == 0) {
            const float lse = ms.m + __logf(ms.s);
            s_lse = lse;
            losses[row] = valid ? lse - xt : __int_as_float(0x7fc00000);  // NaN: target out of range
        }
    }
    if (!d) return;
    __syncthreads();
    const float lse = s_lse;
    float gs = row_weights ? grad_scale * row_weights[row] : grad_scale;
    if (tempered) gs *= inv_temperature;  // du/dz
    // pass 2: gradient (through the cap: dz/dx = 1 - (z / c)^2)
    for (int64_t i = tid; i < V; i += kCEThreads) {
        const float z = capped(i);
        float p = __expf((tempered ? z * inv_temperature : z) - lse) * gs;
        if (i == t) p -= gs;
        if (softcap > 0.f) p *= 1.f - (z / softcap) * (z / softcap);
        d[i] = from_f32<T>(p);
    }
}

// ---------------------------------------------------------------------------------------------------------
// launchers

void softmax_ce_ex(float* losses, void* dlogits, const void* logits, int64_t ld, const int32_t* targets, int64_t N,
                   int64_t V, float grad_scale, int32_t ignore_index, const float* row_weights, float softcap,
                   float temperature, DType t) {
    if (N == 0) return;
    const float inv_temperature = 1.0f / temperature;  // on the host: IEEE (the device's would be approximate)
    // one block per row; gridDim.x allows 2^31 - 1 rows
    DISPATCH_FLOAT(t, T, {
        softmax_ce_kernel<T><<<(unsigned)N, kCEThreads>>>(losses, (T*)dlogits, (const T*)logits, ld, targets, V,
                                                           grad_scale, ignore_index, row_weights, softcap,
                                                           inv_temperature);
    });
    CUDA_CHECK_LAUNCH();
}

void softmax_ce(float* losses, void* dlogits, const void* logits, const int32_t* targets, int64_t N, int64_t V,
                float grad_scale, int32_t ignore_index, const float* row_weights, float softcap, float temperature,
                DType t) {
    softmax_ce_ex(losses, dlogits, logits, V, targets, N, V, grad_scale, ignore_index, row_weights, softcap,
                  temperature, t);
}

int64_t lmhead_chunk_rows(int64_t N, int64_t V, DType t) {
    const int64_t budget = 256LL << 20;  // bytes of scratch at most (unless one row is larger)
    const int64_t row_bytes = ((V + 7) / 8 * 8) * (int64_t)dtype_size(t);
    int64_t rows = row_bytes > 0 ? budget / row_bytes : 1;
    if (rows >= 128) rows = rows / 128 * 128;
    rows = std::max<int64_t>(rows, 1);
    return std::max<int64_t>(std::min(rows, N), 1);
}

void lmhead_ce(float* losses, void* dhidden, float* dweight, const void* hidden, const void* weight,
               const int32_t* targets, void* scratch, int64_t chunk_rows, int64_t N, int64_t C, int64_t V,
               float grad_scale, int32_t ignore_index, const float* row_weights, float softcap, float temperature,
               DType t) {
    if (N == 0) return;
    const size_t es = dtype_size(t);
    // row stride of the scratch: V rounded up to 8 elements if the scratch still holds >= 1 row at that stride
    int64_t ld = (V + 7) / 8 * 8, chunk = chunk_rows * V / ld;
    if (chunk < 1) ld = V, chunk = chunk_rows;
    const bool backward = dhidden || dweight;
    for (int64_t r0 = 0; r0 < N; r0 += chunk) {
        const int64_t rows = std::min(chunk, N - r0);
        const void* h = (const char*)hidden + r0 * C * es;
        // logits (rows, V; stride ld) = hidden[r0:r0+rows] (rows, C) @ weight (V, C)^T
        gemm_ex(scratch, t, ld, h, C, weight, C, nullptr, nullptr, rows, V, C, false, true, false, t);
        // losses and dlogits in place
        softmax_ce_ex(losses + r0, backward ? scratch : nullptr, scratch, ld, targets + r0, rows, V, grad_scale,
                      ignore_index, row_weights ? row_weights + r0 : nullptr, softcap, temperature, t);
        // dhidden[r0:] (rows, C) += dlogits (rows, V) @ weight (V, C)
        if (dhidden)
            gemm_ex((char*)dhidden + r0 * C * es, t, C, scratch, ld, weight, C, nullptr, nullptr, rows, C, V, false,
                    false, true, t);
        // dweight (V, C, f32) += dlogits^T (V, rows) @ hidden[r0:] (rows, C)
        if (dweight)
            gemm_ex(dweight, DType::f32, C, scratch, ld, h, C, nullptr, nullptr, V, C, rows, true, false, true, t);
    }
}

}  // namespace fastllm::cuda
