/*
Residual add: out = inp1 + scale * inp2 (the skip connection of every block; scale: Granite's residual_multiplier,
else 1), and its backward, which adds dout into inp1's gradient and scale * dout into inp2's. Element-wise, O(n), memory bound: plain loops (`omp simd`) already run at DRAM bandwidth at
SSE2 width; OpenMP only above 64 Ki elements, where a parallel region costs less than it saves.
Perf notes (1 thread): fwd/bwd equal to torch (both at DRAM bandwidth, ~22 GB/s).
*/
#include "residual.h"

namespace fastllm::cpu {

static constexpr int64_t kParallelMin = 65536;  // below this: one thread

void residual_forward(float* out, const float* inp1, const float* inp2, int64_t n, float scale) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; i++) out[i] = inp1[i] + scale * inp2[i];  // (scale 1: exactly inp1 + inp2)
}

void residual_backward(float* dinp1, float* dinp2, const float* dout, int64_t n, float scale) {
#pragma omp parallel for simd schedule(static) if (n >= kParallelMin)
    for (int64_t i = 0; i < n; i++) {
        dinp1[i] += dout[i];
        dinp2[i] += scale * dout[i];
    }
}

}  // namespace fastllm::cpu
