// RMSNorm over the last axis (Llama, Qwen, Mistral; Qwen3's QK-norm over head rows), see rmsnorm.cpp.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// Rows n = 0..N-1 of C elements, row n at element offset (n / group) * group_stride + (n % group) * C of inp and
// out (dense (N, C): group = N, group_stride = N * C; the q heads of a packed qkv: group = NH, group_stride = the
// token's row width). out = inp * rstd * weight, rstd (N) = 1 / sqrt(mean(inp^2) + eps), saved for backward.
// out may be inp itself (in place).
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int64_t N, int64_t C,
                     int64_t group, int64_t group_stride, float eps);

// dinp (rows as above) +=, dweight (C) += gradients, given dout (rows as above) and the forward's rstd. dinp may be
// dout itself (in place): then its rows are replaced (=) by the gradient; rows outside the ones normed are untouched.
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp, const float* weight,
                      const float* rstd, int64_t N, int64_t C, int64_t group, int64_t group_stride);

}  // namespace fastllm::cpu
