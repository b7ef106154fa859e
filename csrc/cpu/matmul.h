// Matmul (fully connected layer), see matmul.cpp.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC); bias may be nullptr.
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int64_t N, int64_t C, int64_t OC);

// dinp (N, C) += dout @ weight;  dweight (OC, C) += dout^T @ inp;  dbias (OC) += sum_rows(dout).
// Any of dinp, dweight, dbias may be nullptr (not computed).
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t C, int64_t OC);

}  // namespace fastllm::cpu
