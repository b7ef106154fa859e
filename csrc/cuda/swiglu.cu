/*
The gated-MLP activations on the GPU; the CPU twin csrc/cpu/swiglu.cpp is the spec.
  gated:  gate_up (N, 2H) = [gate | up] per row -> out (N, H) = act(g) u;
          backward (accumulates): dg += dout u act'(g), du += dout act(g). One kernel per direction, templated on
          the activation:
    SwiGLU: act = silu(g) = g s, s = sigmoid(g), act' = s (1 + g (1 - s));
    GeGLU:  act = gelu_tanh(g), GELU's tanh approximation, with gelu.cu's per-element math (elementwise.cuh).
  ReLU^2: out = max(x, 0)^2;  dx += 2 max(x, 0) dout.
fp32 math, T = float or bf16 storage. s = 1 / (1 + __expf(-z)): for g -> -inf, __expf overflows to inf and s = 0
(act -> -0), for g -> +inf s = 1; NaN propagates. Element-wise, memory bound; grid-stride loops, one 16-byte pack
(4 float / 8 bf16) per thread and step when the pointers are 16-byte aligned (and H a multiple of the pack for
the gated ones, whose pack must not straddle the gate/up boundary), else one element per step.
set_simple_elementwise (tests) forces the one-element form.
Perf notes: written without a GPU (checked on the CUDA emulator). The gated forward moves 3 elements per output,
backward 7 (gate_up read, dout read, dgate_up read + written); act and act' share one sigmoid (the compiler merges
the common subexpressions).
*/
#include "elementwise.cuh"

namespace fastllm::cuda {

namespace {

constexpr int kBlock = 256;

__device__ __forceinline__ float sigmoid_f(float g) { return 1.0f / (1.0f + __expf(-g)); }

// the activations: act(g) and act'(g)
struct Silu {
    static __device__ __forceinline__ float act(float g) { return g * sigmoid_f(g); }
    static __device__ __forceinline__ float grad(float g) {
        const float s = sigmoid_f(g);
        return s * fmaf(g, 1.0f - s, 1.0f);
    }
};
struct GeluTanh {
    static __device__ __forceinline__ float act(float g) { return gelu_f(g); }
    static __device__ __forceinline__ float grad(float g) { return gelu_grad(g); }
};

// n counts packs of V elements of the output (N * H / V); a pack's elements share a row
template <class Act, typename T, int V>
__global__ void glu_forward_kernel(T* out, const T* gate_up, int64_t n, int64_t H) {
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = k * V, row = i / H, j = i % H;
        const T* g = gate_up + row * 2 * H + j;
        float gv[V], uv[V];
        load_v<T, V>(gv, g);
        load_v<T, V>(uv, g + H);
#pragma unroll
        for (int e = 0; e < V; e++) gv[e] = Act::act(gv[e]) * uv[e];
        store_v<T, V>(out + i, gv);
    }
}

template <class Act, typename T, int V>
__global__ void glu_backward_kernel(T* dgate_up, const T* dout, const T* gate_up, int64_t n, int64_t H) {
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = k * V, row = i / H, j = i % H;
        const T* g = gate_up + row * 2 * H + j;
        T* dg = dgate_up + row * 2 * H + j;
        float gv[V], uv[V], dy[V], dgv[V], duv[V];
        load_v<T, V>(gv, g);
        load_v<T, V>(uv, g + H);
        load_v<T, V>(dy, dout + i);
        load_v<T, V>(dgv, dg);
        load_v<T, V>(duv, dg + H);
#pragma unroll
        for (int e = 0; e < V; e++) {
            dgv[e] = fmaf(dy[e] * uv[e], Act::grad(gv[e]), dgv[e]);
            duv[e] = fmaf(dy[e], Act::act(gv[e]), duv[e]);
        }
        store_v<T, V>(dg, dgv);
        store_v<T, V>(dg + H, duv);
    }
}

template <typename T, int V>
__global__ void relu2_forward_kernel(T* out, const T* x, int64_t n) {
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        float v[V];
        load_v<T, V>(v, x + k * V);
#pragma unroll
        for (int e = 0; e < V; e++) {
            const float r = v[e] > 0.f ? v[e] : (v[e] == v[e] ? 0.f : v[e]);  // max(x, 0), NaN stays NaN
            v[e] = r * r;
        }
        store_v<T, V>(out + k * V, v);
    }
}

template <typename T, int V>
__global__ void relu2_backward_kernel(T* dx, const T* dout, const T* x, int64_t n) {
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        float xv[V], dy[V], d[V];
        load_v<T, V>(xv, x + k * V);
        load_v<T, V>(dy, dout + k * V);
        load_v<T, V>(d, dx + k * V);
#pragma unroll
        for (int e = 0; e < V; e++) {
            const float r = xv[e] > 0.f ? xv[e] : (xv[e] == xv[e] ? 0.f : xv[e]);
            d[e] = fmaf(2.0f * r, dy[e], d[e]);
        }
        store_v<T, V>(dx + k * V, d);
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// launchers

template <class Act>
static void glu_forward(void* out, const void* gate_up, int64_t N, int64_t H, DType t) {
    if (N * H <= 0) return;
    DISPATCH_FLOAT(t, T, {
        T* o = (T*)out;
        const T* gu = (const T*)gate_up;
        constexpr int V = kVec<T>;
        if (!simple_elementwise_flag() && H % V == 0 && aligned16(o) && aligned16(gu))
            glu_forward_kernel<Act, T, V><<<grid_stride_blocks(N * H / V, kBlock), kBlock>>>(o, gu, N * H / V, H);
        else
            glu_forward_kernel<Act, T, 1><<<grid_stride_blocks(N * H, kBlock), kBlock>>>(o, gu, N * H, H);
    });
    CUDA_CHECK_LAUNCH();
}

template <class Act>
static void glu_backward(void* dgate_up, const void* dout, const void* gate_up, int64_t N, int64_t H, DType t) {
    if (N * H <= 0) return;
    DISPATCH_FLOAT(t, T, {
        T* d = (T*)dgate_up;
        const T *dy = (const T*)dout, *gu = (const T*)gate_up;
        constexpr int V = kVec<T>;
        if (!simple_elementwise_flag() && H % V == 0 && aligned16(d) && aligned16(dy) && aligned16(gu))
            glu_backward_kernel<Act, T, V>
                <<<grid_stride_blocks(N * H / V, kBlock), kBlock>>>(d, dy, gu, N * H / V, H);
        else
            glu_backward_kernel<Act, T, 1><<<grid_stride_blocks(N * H, kBlock), kBlock>>>(d, dy, gu, N * H, H);
    });
    CUDA_CHECK_LAUNCH();
}

void swiglu_forward(void* out, const void* gate_up, int64_t N, int64_t H, DType t) {
    glu_forward<Silu>(out, gate_up, N, H, t);
}
void swiglu_backward(void* dgate_up, const void* dout, const void* gate_up, int64_t N, int64_t H, DType t) {
    glu_backward<Silu>(dgate_up, dout, gate_up, N, H, t);
}
void geglu_forward(void* out, const void* gate_up, int64_t N, int64_t H, DType t) {
    glu_forward<GeluTanh>(out, gate_up, N, H, t);
}
void geglu_backward(void* dgate_up, const void* dout, const void* gate_up, int64_t N, int64_t H, DType t) {
    glu_backward<GeluTanh>(dgate_up, dout, gate_up, N, H, t);
}

void relu2_forward(void* out, const void* x, int64_t n, DType t) {
    if (n <= 0) return;
    DISPATCH_FLOAT(t, T, {
        T* o = (T*)out;
        const T* xi = (const T*)x;
        packed_then_tail<T>(n, !simple_elementwise_flag() && aligned16(o) && aligned16(xi),
                            [&](auto vc, int64_t off, int64_t cnt) {
                                constexpr int V = decltype(vc)::value;
                                relu2_forward_kernel<T, V>
                                    <<<grid_stride_blocks(cnt, kBlock), kBlock>>>(o + off, xi + off, cnt);
                            });
    });
    CUDA_CHECK_LAUNCH();
}

void relu2_backward(void* dx, const void* dout, const void* x, int64_t n, DType t) {
    if (n <= 0) return;
    DISPATCH_FLOAT(t, T, {
        T* d = (T*)dx;
        const T *dy = (const T*)dout, *xi = (const T*)x;
        packed_then_tail<T>(n, !simple_elementwise_flag() && aligned16(d) && aligned16(dy) && aligned16(xi),
                            [&](auto vc, int64_t off, int64_t cnt) {
                                constexpr int V = decltype(vc)::value;
                                relu2_backward_kernel<T, V>
                                    <<<grid_stride_blocks(cnt, kBlock), kBlock>>>(d + off, dy + off, xi + off, cnt);
                            });
    });
    CUDA_CHECK_LAUNCH();
}

}  // namespace fastllm::cuda
