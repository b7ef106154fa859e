/*
Causal self-attention on packed qkv (B, T, 3C), per (batch, head): out = softmax(q k^T / sqrt(hs), causal) v.
Forward keeps only the row logsumexp lse (B, NH, T); backward recomputes probabilities from it.
O(B*NH*T^2*hs) flops, O(B*NH*T) saved memory.
This version: per-row loops with a length-T scratch row (the readable reference).
*/
#include "attention.h"

#include <cmath>
#include <vector>

#include "common.h"

namespace fastllm::cpu {

void attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C, int64_t NH) {
    const int64_t hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / std::sqrt((float)hs);
#pragma omp parallel
    {
        std::vector<float> p(T);
#pragma omp for collapse(3) schedule(dynamic, 8)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < NH; h++)
                for (int64_t t = 0; t < T; t++) {
                    const float* q = qkv + (b * T + t) * C3 + h * hs;
                    float mx = -INFINITY;
                    for (int64_t s = 0; s <= t; s++) {
                        const float* k = qkv + (b * T + s) * C3 + C + h * hs;
                        float dot = 0;
                        for (int64_t i = 0; i < hs; i++) dot += q[i] * k[i];
                        p[s] = dot * scale;
                        mx = std::max(mx, p[s]);
                    }
                    float sum = 0;
                    for (int64_t s = 0; s <= t; s++) sum += (p[s] = std::exp(p[s] - mx));
                    float* o = out + (b * T + t) * C + h * hs;
                    for (int64_t i = 0; i < hs; i++) o[i] = 0;
                    for (int64_t s = 0; s <= t; s++) {
                        const float* v = qkv + (b * T + s) * C3 + 2 * C + h * hs;
                        const float w = p[s] / sum;
                        for (int64_t i = 0; i < hs; i++) o[i] += w * v[i];
                    }
                    lse[(b * NH + h) * T + t] = mx + std::log(sum);
                }
    }
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        int64_t B, int64_t T, int64_t C, int64_t NH) {
    const int64_t hs = C / NH, C3 = 3 * C;
    const float scale = 1.0f / std::sqrt((float)hs);
    // (b, h) pairs are independent: dk, dv of a head only receive from rows of the same (b, h).
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < NH; h++)
            for (int64_t t = 0; t < T; t++) {
                const float* q = qkv + (b * T + t) * C3 + h * hs;
                const float* o = out + (b * T + t) * C + h * hs;
                const float* dy = dout + (b * T + t) * C + h * hs;
                float* dq = dqkv + (b * T + t) * C3 + h * hs;
                const float L = lse[(b * NH + h) * T + t];
                float D = 0;  // rowsum(dout * out)
                for (int64_t i = 0; i < hs; i++) D += dy[i] * o[i];
                for (int64_t s = 0; s <= t; s++) {
                    const float* k = qkv + (b * T + s) * C3 + C + h * hs;
                    const float* v = qkv + (b * T + s) * C3 + 2 * C + h * hs;
                    float* dk = dqkv + (b * T + s) * C3 + C + h * hs;
                    float* dv = dqkv + (b * T + s) * C3 + 2 * C + h * hs;
                    float dot = 0, dp = 0;
                    for (int64_t i = 0; i < hs; i++) dot += q[i] * k[i], dp += dy[i] * v[i];
                    const float p = std::exp(dot * scale - L);
                    const float ds = p * (dp - D) * scale;
                    for (int64_t i = 0; i < hs; i++) {
                        dv[i] += p * dy[i];
                        dq[i] += ds * k[i];
                        dk[i] += ds * q[i];
                    }
                }
            }
}

}  // namespace fastllm::cpu
