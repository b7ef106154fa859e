// Token + position embedding, see embedding.cpp.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// out (B, T, C)[b, t] = wte (V, C)[tokens[b, t]] + wpe (maxT, C)[t]; tokens (B, T) in [0, V). wpe may be nullptr
// (no position embedding: out = wte[tokens]).
void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe,
                       int64_t B, int64_t T, int64_t C);

// dwte[tokens[b, t]] += dout[b, t]; dwpe[t] += sum_b dout[b, t] (dwpe may be nullptr). Deterministic (no atomics).
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        int64_t B, int64_t T, int64_t C, int64_t V);

}  // namespace fastllm::cpu
