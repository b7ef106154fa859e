// LayerNorm over the last axis, see layernorm.cpp.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// out (N, C) = (inp - mean) * rstd * weight + bias; mean, rstd (N) saved for backward.
void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int64_t C, float eps);

// dinp (N, C), dweight (C), dbias (C) += gradients, given dout (N, C) and the forward's mean/rstd.
void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C);

}  // namespace fastllm::cpu
