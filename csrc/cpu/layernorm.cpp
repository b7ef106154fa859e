/*
LayerNorm over the last axis: out = (x - mean) * rstd * weight + bias, rstd = 1/sqrt(var + eps).
Shapes: inp, out (N, C); weight, bias (C); mean, rstd (N) saved for backward. O(N*C).
Backward (accumulates): dinp += rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * weight;
dweight += sum_n dout * xhat; dbias += sum_n dout.  OpenMP over rows; weight grads reduced per thread.
*/
#include "layernorm.h"

#include <cmath>
#include <vector>

#include "common.h"

namespace fastllm::cpu {

void layernorm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                       const float* bias, int64_t N, int64_t C, float eps) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
        const float* x = inp + n * C;
        float m = 0;
        for (int64_t i = 0; i < C; i++) m += x[i];
        m /= C;
        float var = 0;
        for (int64_t i = 0; i < C; i++) var += (x[i] - m) * (x[i] - m);
        const float r = 1.0f / std::sqrt(var / C + eps);
        float* o = out + n * C;
        for (int64_t i = 0; i < C; i++) o[i] = (x[i] - m) * r * weight[i] + bias[i];
        mean[n] = m;
        rstd[n] = r;
    }
}

void layernorm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                        const float* weight, const float* mean, const float* rstd, int64_t N, int64_t C) {
    const int nt = max_threads();
    std::vector<float> dw_part((size_t)nt * C, 0.0f), db_part((size_t)nt * C, 0.0f);
#pragma omp parallel
    {
        float* dw = dw_part.data() + (size_t)thread_id() * C;
        float* db = db_part.data() + (size_t)thread_id() * C;
#pragma omp for
        for (int64_t n = 0; n < N; n++) {
            const float* x = inp + n * C;
            const float* dy = dout + n * C;
            const float m = mean[n], r = rstd[n];
            float g_mean = 0, gx_mean = 0;
            for (int64_t i = 0; i < C; i++) {
                const float xhat = (x[i] - m) * r, g = dy[i] * weight[i];
                g_mean += g;
                gx_mean += g * xhat;
            }
            g_mean /= C;
            gx_mean /= C;
            float* dx = dinp + n * C;
            for (int64_t i = 0; i < C; i++) {
                const float xhat = (x[i] - m) * r, g = dy[i] * weight[i];
                dx[i] += r * (g - g_mean - xhat * gx_mean);
                dw[i] += dy[i] * xhat;
                db[i] += dy[i];
            }
        }
    }
    for (int t = 0; t < nt; t++)
        for (int64_t i = 0; i < C; i++) {
            dweight[i] += dw_part[(size_t)t * C + i];
            dbias[i] += db_part[(size_t)t * C + i];
        }
}

}  // namespace fastllm::cpu
