/*
GELU, tanh approximation (GPT-2): y = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi); and the
residual add. Element-wise, O(n), OpenMP over elements.
*/
#include "gelu.h"

#include <cmath>

#include "common.h"

namespace fastllm::cpu {

static constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)

void gelu_forward(float* out, const float* inp, int64_t n) {
#pragma omp parallel for simd
    for (int64_t i = 0; i < n; i++) {
        const float x = inp[i];
        out[i] = 0.5f * x * (1.0f + std::tanh(kGeluScale * (x + 0.044715f * x * x * x)));
    }
}

void gelu_backward(float* dinp, const float* inp, const float* dout, int64_t n) {
#pragma omp parallel for simd
    for (int64_t i = 0; i < n; i++) {
        const float x = inp[i];
        const float u = kGeluScale * (x + 0.044715f * x * x * x);
        const float th = std::tanh(u);
        const float sech2 = 1.0f - th * th;
        const float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * kGeluScale * (1.0f + 3.0f * 0.044715f * x * x);
        dinp[i] += grad * dout[i];
    }
}

void residual_forward(float* out, const float* inp1, const float* inp2, int64_t n) {
#pragma omp parallel for simd
    for (int64_t i = 0; i < n; i++) out[i] = inp1[i] + inp2[i];
}

void residual_backward(float* dinp1, float* dinp2, const float* dout, int64_t n) {
#pragma omp parallel for simd
    for (int64_t i = 0; i < n; i++) {
        dinp1[i] += dout[i];
        dinp2[i] += dout[i];
    }
}

}  // namespace fastllm::cpu
