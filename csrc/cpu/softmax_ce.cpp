/*
Fused softmax + cross-entropy over rows of logits (N, V): loss = logsumexp - logit[target],
dlogits = (softmax - onehot) * grad_scale, written in place if desired. O(N*V).
lmhead_ce: logits = hidden @ W^T computed chunk by chunk (never N x V at once), then the same per chunk,
then dhidden += dlogits @ W and dW += dlogits^T @ hidden through the matmul kernels.
*/
#include "softmax_ce.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"
#include "matmul.h"

namespace fastllm::cpu {

void softmax_ce_forward_backward(float* losses, float* dlogits, const float* logits, const int32_t* targets,
                                 int64_t N, int64_t V, float grad_scale, int32_t ignore_index) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
        const float* x = logits + n * V;
        const int32_t tgt = targets[n];
        const bool ignored = tgt == ignore_index;
        float mx = -INFINITY;
        for (int64_t i = 0; i < V; i++) mx = std::max(mx, x[i]);
        double sum = 0;
        for (int64_t i = 0; i < V; i++) sum += std::exp(x[i] - mx);
        const float lse = mx + (float)std::log(sum);
        losses[n] = ignored ? 0.0f : lse - x[tgt];
        if (dlogits) {
            float* d = dlogits + n * V;
            if (ignored) {
                for (int64_t i = 0; i < V; i++) d[i] = 0.0f;
            } else {
                for (int64_t i = 0; i < V; i++) d[i] = std::exp(x[i] - lse) * grad_scale;
                d[tgt] -= grad_scale;
            }
        }
    }
}

void lmhead_ce_forward_backward(float* losses, float* dhidden, float* dweight, const float* hidden,
                                const float* weight, const int32_t* targets, int64_t N, int64_t C, int64_t V,
                                float grad_scale, int32_t ignore_index, int64_t chunk_rows) {
    const int64_t rows = std::min(chunk_rows, N);
    std::vector<float> logits((size_t)(rows * V));
    const bool backward = dhidden || dweight;
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t n = std::min(rows, N - n0);
        matmul_forward(logits.data(), hidden + n0 * C, weight, nullptr, n, C, V);
        softmax_ce_forward_backward(losses + n0, backward ? logits.data() : nullptr, logits.data(), targets + n0, n,
                                    V, grad_scale, ignore_index);
        if (backward)
            matmul_backward(dhidden ? dhidden + n0 * C : nullptr, dweight, nullptr, logits.data(), hidden + n0 * C,
                            weight, n, C, V);
    }
}

}  // namespace fastllm::cpu
