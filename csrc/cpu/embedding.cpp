/*
Token + position embedding: out[b, t] = wte[tokens[b, t]] + wpe[t]. O(B*T*C).
Backward scatter-adds into dwte / dwpe. To stay deterministic without atomics, threads split the
channel axis C: each thread owns a column slice of every row, so no two threads touch the same float.
*/
#include "embedding.h"

#include <algorithm>

#include "common.h"

namespace fastllm::cpu {

void embedding_forward(float* out, const int32_t* tokens, const float* wte, const float* wpe,
                       int64_t B, int64_t T, int64_t C) {
#pragma omp parallel for collapse(2)
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            const float* te = wte + (int64_t)tokens[b * T + t] * C;
            const float* pe = wpe + t * C;
            float* o = out + (b * T + t) * C;
            for (int64_t i = 0; i < C; i++) o[i] = te[i] + pe[i];
        }
}

void embedding_backward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens,
                        int64_t B, int64_t T, int64_t C, int64_t V) {
    (void)V;
#pragma omp parallel
    {
        const int nt = max_threads(), id = thread_id();
        const int64_t per = (C + nt - 1) / nt, c0 = std::min(C, id * per), c1 = std::min(C, c0 + per);
        for (int64_t b = 0; b < B; b++)
            for (int64_t t = 0; t < T; t++) {
                const float* dy = dout + (b * T + t) * C;
                float* dte = dwte + (int64_t)tokens[b * T + t] * C;
                float* dpe = dwpe + t * C;
                for (int64_t i = c0; i < c1; i++) {
                    dte[i] += dy[i];
                    dpe[i] += dy[i];
                }
            }
    }
}

}  // namespace fastllm::cpu
