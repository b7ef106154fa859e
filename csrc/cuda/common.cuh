/*
Shared helpers of the CUDA kernels (included by csrc/cuda/<family>.cu only): error checks, bf16/fp32 conversion,
warp reductions, and DType dispatch to templates.
*/
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdexcept>

#include "../common.h"
#include "kernels.h"

namespace fastllm::cuda {

using bf16 = __nv_bfloat16;

// CUDA_CHECK(cudaMalloc(...)): a failing runtime call throws std::runtime_error (Python RuntimeError) naming
// the call, the file and line, and CUDA's own message.
#define CUDA_CHECK(call)                                                                                   \
    do {                                                                                                   \
        cudaError_t err_ = (call);                                                                         \
        if (err_ != cudaSuccess)                                                                           \
            throw std::runtime_error(::fastllm::str_cat("CUDA error in ", #call, " (", __FILE__, ":",      \
                                                        __LINE__, "): ", cudaGetErrorString(err_)));       \
    } while (0)
// after a kernel launch: catches bad launch configurations (asynchronous faults surface at the next sync)
#define CUDA_CHECK_LAUNCH() CUDA_CHECK(cudaGetLastError())

inline int ceil_div(int64_t a, int64_t b) { return (int)((a + b - 1) / b); }

// load/store any activation type as fp32
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// tanh(y) to ~2e-7 absolute, for soft caps (softmax_ce, attention). Not tanhf: --use_fast_math compiles it into tanh.approx.f32 (relative
// error 2^-11: up to 0.015 in a logit capped at 30, and 1 - tanh^2 of saturated logits off by far more; the
// emulator models that, csrc/cuda/emu). tanh|y| = 1 - 2 / (exp(2|y|) + 1): __expf (-> inf for |y| > 44, tanh 1)
// and an IEEE division; NaN stays NaN.
__device__ __forceinline__ float tanh_accurate(float y) {
    return copysignf(1.f - __fdiv_rn(2.f, __expf(2.f * fabsf(y)) + 1.f), y);
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
__device__ __forceinline__ float warp_max(float x) {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// DISPATCH_FLOAT(t, T, body): runs body with T = float or bf16 according to DType t.
#define DISPATCH_FLOAT(t, T, ...)                                                            \
    do {                                                                                     \
        if ((t) == ::fastllm::cuda::DType::f32) {                                            \
            using T = float;                                                                 \
            __VA_ARGS__;                                                                     \
        } else if ((t) == ::fastllm::cuda::DType::bf16) {                                    \
            using T = ::fastllm::cuda::bf16;                                                 \
            __VA_ARGS__;                                                                     \
        } else {                                                                             \
            throw std::invalid_argument("fastllm CUDA kernel: dtype must be float32 or bfloat16"); \
        }                                                                                    \
    } while (0)

}  // namespace fastllm::cuda
