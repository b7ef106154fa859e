// The residual add of a transformer block and its gradient, see residual.cpp.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// out (n) = inp1 + scale * inp2   (out may be inp1 or inp2 itself)
void residual_forward(float* out, const float* inp1, const float* inp2, int64_t n, float scale = 1.0f);
// dinp1 += dout; dinp2 += scale * dout
void residual_backward(float* dinp1, float* dinp2, const float* dout, int64_t n, float scale = 1.0f);

}  // namespace fastllm::cpu
