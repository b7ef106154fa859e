// The gated-MLP activations of the Llama and Gemma families: SwiGLU and GeGLU, and ReLU^2 (nanochat,
// modded-nanogpt), see swiglu.cpp.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// SwiGLU: out (N, H) = silu(gate) * up, where gate_up (N, 2H) holds per row [gate (H) | up (H)] (the output of
// one matmul with the fused weight concat([gate_proj.weight, up_proj.weight]) (2H, C)); silu(g) = g * sigmoid(g).
void swiglu_forward(float* out, const float* gate_up, int64_t N, int64_t H);
// dgate_up (N, 2H) += [dout * up * silu'(gate) | dout * silu(gate)],  silu'(g) = s (1 + g (1 - s)), s = sigmoid(g)
void swiglu_backward(float* dgate_up, const float* dout, const float* gate_up, int64_t N, int64_t H);

// GeGLU (Gemma): the same with gelu_tanh(g) = 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) for silu (torch's
// gelu(approximate="tanh"), HF's gelu_pytorch_tanh):  out (N, H) = gelu_tanh(gate) * up,
// dgate_up (N, 2H) += [dout * up * gelu_tanh'(gate) | dout * gelu_tanh(gate)]
void geglu_forward(float* out, const float* gate_up, int64_t N, int64_t H);
void geglu_backward(float* dgate_up, const float* dout, const float* gate_up, int64_t N, int64_t H);

// ReLU^2: out (n) = max(x, 0)^2 (out may be inp itself);  backward: dinp (n) += 2 max(x, 0) * dout
void relu2_forward(float* out, const float* inp, int64_t n);
void relu2_backward(float* dinp, const float* dout, const float* inp, int64_t n);

}  // namespace fastllm::cpu
