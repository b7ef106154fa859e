/*
The residual add of a transformer block and its gradient, on the GPU. The CPU twin csrc/cpu/residual.cpp is the
spec: out = a + scale * b (out may be a or b itself); backward: da += dout, db += scale * dout.
Element-wise, O(n), memory bound: grid-stride loops over 16-byte packs (4 float / 8 bf16) when every pointer is
16-byte aligned, then a scalar tail (elementwise.cuh: packed_then_tail); fp32 arithmetic for bf16 arrays.
Perf notes: not timed on a GPU yet (written without one; runs on the CUDA emulator in CI).
*/
#include "elementwise.cuh"

namespace fastllm::cuda {

// ---------------------------------------------------------------------------------------------------------
// kernels

template <typename T, int V>
__global__ void residual_forward_kernel(T* out, const T* a, const T* b, int64_t n, float scale) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float va[V], vb[V];
        load_v<T, V>(va, a + i * V);
        load_v<T, V>(vb, b + i * V);
#pragma unroll
        for (int j = 0; j < V; j++) va[j] += scale * vb[j];
        store_v<T, V>(out + i * V, va);
    }
}

template <typename T, int V>
__global__ void residual_backward_kernel(T* da, T* db, const T* dout, int64_t n, float scale) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float g[V], x[V];
        load_v<T, V>(g, dout + i * V);
        load_v<T, V>(x, da + i * V);
#pragma unroll
        for (int j = 0; j < V; j++) x[j] += g[j];
        store_v<T, V>(da + i * V, x);
        load_v<T, V>(x, db + i * V);
#pragma unroll
        for (int j = 0; j < V; j++) x[j] += scale * g[j];
        store_v<T, V>(db + i * V, x);
    }
}

// ---------------------------------------------------------------------------------------------------------
// launchers

static constexpr int kBlock = 256;

void residual_forward(void* out, const void* a, const void* b, int64_t n, DType t, float scale) {
    if (n <= 0) return;
    DISPATCH_FLOAT(t, T, {
        T* o = (T*)out;
        const T *pa = (const T*)a, *pb = (const T*)b;
        const bool al = !simple_elementwise_flag() && aligned16(o) && aligned16(pa) && aligned16(pb);
        packed_then_tail<T>(n, al, [&](auto vc, int64_t off, int64_t cnt) {
            constexpr int V = decltype(vc)::value;
            residual_forward_kernel<T, V>
                <<<grid_stride_blocks(cnt, kBlock), kBlock>>>(o + off, pa + off, pb + off, cnt, scale);
        });
    });
    CUDA_CHECK_LAUNCH();
}

void residual_backward(void* da, void* db, const void* dout, int64_t n, DType t, float scale) {
    if (n <= 0) return;
    DISPATCH_FLOAT(t, T, {
        T *pa = (T*)da, *pb = (T*)db;
        const T* g = (const T*)dout;
        const bool al = !simple_elementwise_flag() && aligned16(pa) && aligned16(pb) && aligned16(g);
        packed_then_tail<T>(n, al, [&](auto vc, int64_t off, int64_t cnt) {
            constexpr int V = decltype(vc)::value;
            residual_backward_kernel<T, V>
                <<<grid_stride_blocks(cnt, kBlock), kBlock>>>(pa + off, pb + off, g + off, cnt, scale);
        });
    });
    CUDA_CHECK_LAUNCH();
}

}  // namespace fastllm::cuda
