// GELU: the tanh approximation (GPT-2) and the exact form (erf: GPT-NeoX, Pythia), see gelu.cpp.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// out (n) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
void gelu_forward(float* out, const float* inp, int64_t n);
// dinp (n) += gelu'(inp) * dout
void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t n);
// out (n) = x Phi(x) = 0.5 x (1 + erf(x / sqrt(2))), exact GELU
void gelu_erf_forward(float* out, const float* inp, int64_t n);
// dinp (n) += (Phi(inp) + inp phi(inp)) * dout
void gelu_erf_backward(float* dinp, const float* dout, const float* inp, int64_t n);

}  // namespace fastllm::cpu
