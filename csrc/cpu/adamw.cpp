/*
AdamW (Loshchilov & Hutter) with bias correction and decoupled weight decay, over a flat buffer; O(n).
Global gradient norm: sum of squares in double (the caller takes the sqrt across buffers).
*/
#include "adamw.h"

#include <cmath>

#include "common.h"

namespace fastllm::cpu {

void adamw_step(float* params, float* m, float* v, const float* grads, int64_t n, float lr, float beta1,
                float beta2, float eps, float weight_decay, int64_t t, float grad_scale) {
    const float bc1 = 1.0f - (float)std::pow((double)beta1, (double)t);
    const float bc2 = 1.0f - (float)std::pow((double)beta2, (double)t);
#pragma omp parallel for simd
    for (int64_t i = 0; i < n; i++) {
        const float g = grads[i] * grad_scale;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float mhat = mi / bc1, vhat = vi / bc2;
        params[i] -= lr * (mhat / (std::sqrt(vhat) + eps) + weight_decay * params[i]);
    }
}

double sum_squares(const float* x, int64_t n) {
    double s = 0;
#pragma omp parallel for reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
    return s;
}

}  // namespace fastllm::cpu
