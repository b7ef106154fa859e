// Token + position embedding, see embedding.cpp.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// out (B, T, C)[b, t] = scale * wte (V, C)[tokens[b, t]] + wpe (maxT, C)[t]; tokens (B, T) in [0, V). wpe may be
// nullptr (no position embedding: out = scale * wte[tokens]). scale is 1, or sqrt(C) for Gemma.
void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe,
                       int64_t B, int64_t T, int64_t C, float scale);

// dwte[tokens[b, t]] += scale * dout[b, t]; dwpe[t] += sum_b dout[b, t] (unscaled: wpe is not scaled; dwpe may be
// nullptr). Deterministic (no atomics).
void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        int64_t B, int64_t T, int64_t C, int64_t V, float scale);

}  // namespace fastllm::cpu
