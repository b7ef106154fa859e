// GELU (tanh approximation, as GPT-2) and the residual add, see gelu.cpp.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// out (n) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
void gelu_forward(float* out, const float* inp, int64_t n);
// dinp (n) += gelu'(inp) * dout
void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n);

// out (n) = inp1 + inp2
void residual_forward(float* out, const float* inp1, const float* inp2, int64_t n);
// dinp1 += dout; dinp2 += dout
void residual_backward(float* dinp1, float* dinp2, const float* dout, int64_t n);

}  // namespace fastllm::cpu
