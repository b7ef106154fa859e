// AdamW optimizer step and global gradient norm, see adamw.cpp.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// One AdamW step over n parameters (a flat buffer or a slice of it), step t >= 1 (for bias correction).
// g = grads * grad_scale (grad_scale carries gradient clipping); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// params -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * params)   (decoupled weight decay)
void adamw_step(float* params, float* m, float* v, const float* grads, int64_t n, float lr, float beta1,
                float beta2, float eps, float weight_decay, int64_t t, float grad_scale);

// sum of squares of x (n), accumulated in double.
double sum_squares(const float* x, int64_t n);

// x (n) = 0 on all threads (zero_grad and the activation gradients: one core's stores do not fill DRAM's bandwidth).
void zero(float* x, int64_t n);

}  // namespace fastllm::cpu
