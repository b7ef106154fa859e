/*
Matmul: out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias.  O(N*C*OC) flops.
Backward accumulates: dinp += dout @ weight, dweight += dout^T @ inp, dbias += column sums of dout.
This version: naive loops, OpenMP over rows (the readable reference).
*/
#include "matmul.h"

#include "common.h"

namespace fastllm::cpu {

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias,
                    int64_t N, int64_t C, int64_t OC) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
        const float* x = inp + n * C;
        for (int64_t o = 0; o < OC; o++) {
            const float* w = weight + o * C;
            float acc = bias ? bias[o] : 0.0f;
            for (int64_t c = 0; c < C; c++) acc += x[c] * w[c];
            out[n * OC + o] = acc;
        }
    }
}

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t C, int64_t OC) {
    if (dinp) {
#pragma omp parallel for
        for (int64_t n = 0; n < N; n++)
            for (int64_t o = 0; o < OC; o++) {
                const float d = dout[n * OC + o];
                for (int64_t c = 0; c < C; c++) dinp[n * C + c] += d * weight[o * C + c];
            }
    }
    if (dweight || dbias) {
#pragma omp parallel for
        for (int64_t o = 0; o < OC; o++)
            for (int64_t n = 0; n < N; n++) {
                const float d = dout[n * OC + o];
                if (dweight)
                    for (int64_t c = 0; c < C; c++) dweight[o * C + c] += d * inp[n * C + c];
                if (dbias) dbias[o] += d;
            }
    }
}

}  // namespace fastllm::cpu
