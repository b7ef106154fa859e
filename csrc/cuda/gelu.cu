/*
GELU on the GPU, its two forms (the CPU twin csrc/cpu/gelu.cpp is the spec): the exact one, gelu_erf (GPT-NeoX,
Pythia: y = x Phi(x) with erfcf, see GeluErf below), and the tanh approximation (GPT-2), gelu:
  y = 0.5 x (1 + tanh(u)),  u = k (x + 0.044715 x^3),  k = sqrt(2/pi)
  = x s  with  s = sigmoid(2u) = 1 / (1 + exp(-2u))
  dy/dx = s + x s (1 - s) 2k (1 + 3 * 0.044715 x^2)
with x^2 capped at 1e4 inside u and u' (tanh is saturated there anyway; keeps x^3 and u' finite), exactly as the
CPU kernel. s uses __expf and a fast reciprocal: exp(-2u) = inf for very negative x gives s = 0, no NaN.
Absolute error of s ~1e-7 (relative error of __expf grows with |2u| but s saturates first).

Element-wise, O(n), memory bound (bf16: 4 bytes per element forward, 8 backward incl. the += of dx).
Parallelisation: grid-stride loop, one 16-byte pack (4 float / 8 bf16) per thread and step when all pointers
are 16-byte aligned, then a scalar loop for the < 8 tail elements; scalar loop for unaligned arrays.
The simple kernels (either form in double precision, one element per thread; set_simple_elementwise) are the
readable spec and an accurate reference on the GPU. One template of each kernel and launcher serves both forms,
the per-element math a type argument (GeluTanh, GeluErf).
Perf notes (written without a GPU: compiled and register-checked for sm_80/sm_90, not yet timed): at 8 bf16 per
128-bit access the sigmoid form costs ~15 instructions per element, below the memory time on A100/H100. Note
--use_fast_math turns float tanhf into tanh.approx.f32 (~5e-4 relative error), too coarse for float32 outputs;
the fast path therefore never calls tanhf.
*/
#include "elementwise.cuh"

namespace fastllm::cuda {

void set_simple_elementwise(bool on) { simple_elementwise_flag() = on; }

// The per-element math of each form, as a type the kernels below take: f and grad in float (the fast kernels;
// GeluTanh's are in elementwise.cuh, shared with swiglu.cu's GeGLU), f64 and grad64 in double (the simple ones).
struct GeluTanh {
    __device__ static float f(float x) { return gelu_f(x); }
    __device__ static float grad(float x) { return gelu_grad(x); }
    // the tanh form in double precision (with --use_fast_math, float tanhf becomes the ~1e-3-accurate
    // tanh.approx.f32; double tanh is exact to an ulp)
    __device__ static double f64(double v) {
        const double v2 = fmin(v * v, (double)kGeluX2Cap);
        return 0.5 * v * (1.0 + tanh((double)kGeluScale * v * (1.0 + (double)kGeluCubic * v2)));
    }
    __device__ static double grad64(double v) {
        const double v2 = fmin(v * v, (double)kGeluX2Cap), k = kGeluScale, c = kGeluCubic;
        const double th = tanh(k * v * (1.0 + c * v2));
        return 0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * k * (1.0 + 3.0 * c * v2);
    }
};

// Exact GELU (erf; GPT-NeoX, Pythia): y = x Phi(x), Phi(x) = 0.5 erfc(-x / sqrt(2)) (erfcf keeps its relative
// accuracy in the x < 0 tail; --use_fast_math leaves it a libdevice function, only flushing denormals), dy/dx =
// Phi(x) + x phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi), and x phi(x) = 0 for |x| >= 14 as on the CPU (no inf * 0).
struct GeluErf {
    static constexpr double kSqrtHalf = 0.70710678118654752, kInvSqrt2Pi = 0.39894228040143268, kCut = 14.0;
    __device__ static float f(float x) { return x * 0.5f * erfcf(-x * (float)kSqrtHalf); }
    __device__ static float grad(float x) {
        const float xpdf = fabsf(x) < (float)kCut ? x * (float)kInvSqrt2Pi * __expf(-0.5f * x * x) : 0.0f;
        return 0.5f * erfcf(-x * (float)kSqrtHalf) + xpdf;
    }
    __device__ static double f64(double v) { return v * 0.5 * erfc(-v * kSqrtHalf); }
    __device__ static double grad64(double v) {
        return 0.5 * erfc(-v * kSqrtHalf) + (fabs(v) < kCut ? v * kInvSqrt2Pi * exp(-0.5 * v * v) : 0.0);
    }
};

// ---------------------------------------------------------------------------------------------------------
// simple kernels (the spec): one element per thread, in double precision

template <typename Act, typename T>
__global__ void gelu_forward_simple_kernel(T* out, const T* x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        out[i] = from_f32<T>((float)Act::f64(to_f32(x[i])));
}

template <typename Act, typename T>
__global__ void gelu_backward_simple_kernel(T* dx, const T* dout, const T* x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dx[i] = from_f32<T>((float)(to_f32(dx[i]) + Act::grad64(to_f32(x[i])) * to_f32(dout[i])));
}

// ---------------------------------------------------------------------------------------------------------
// fast kernels: V = kVec<T> (16-byte packs, aligned pointers) or V = 1 (tails and unaligned arrays);
// n counts packs of V elements

template <typename Act, typename T, int V>
__global__ void gelu_forward_kernel(T* out, const T* x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float v[V];
        load_v<T, V>(v, x + i * V);
#pragma unroll
        for (int j = 0; j < V; j++) v[j] = Act::f(v[j]);
        store_v<T, V>(out + i * V, v);
    }
}

template <typename Act, typename T, int V>
__global__ void gelu_backward_kernel(T* dx, const T* dout, const T* x, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float xv[V], dy[V], d[V];
        load_v<T, V>(xv, x + i * V);
        load_v<T, V>(dy, dout + i * V);
        load_v<T, V>(d, dx + i * V);
#pragma unroll
        for (int j = 0; j < V; j++) d[j] = fmaf(Act::grad(xv[j]), dy[j], d[j]);
        store_v<T, V>(dx + i * V, d);
    }
}

// ---------------------------------------------------------------------------------------------------------
// launchers

static constexpr int kBlock = 256;

template <typename Act>
static void launch_forward(void* out, const void* x, int64_t n, DType t) {
    if (n <= 0) return;
    DISPATCH_FLOAT(t, T, {
        T* o = (T*)out;
        const T* xi = (const T*)x;
        if (simple_elementwise_flag()) {
            gelu_forward_simple_kernel<Act, T><<<grid_stride_blocks(n, kBlock), kBlock>>>(o, xi, n);
        } else {
            packed_then_tail<T>(n, aligned16(o) && aligned16(xi), [&](auto vc, int64_t off, int64_t cnt) {
                constexpr int V = decltype(vc)::value;
                gelu_forward_kernel<Act, T, V><<<grid_stride_blocks(cnt, kBlock), kBlock>>>(o + off, xi + off, cnt);
            });
        }
    });
    CUDA_CHECK_LAUNCH();
}

template <typename Act>
static void launch_backward(void* dx, const void* dout, const void* x, int64_t n, DType t) {
    if (n <= 0) return;
    DISPATCH_FLOAT(t, T, {
        T* d = (T*)dx;
        const T *dy = (const T*)dout, *xi = (const T*)x;
        if (simple_elementwise_flag()) {
            gelu_backward_simple_kernel<Act, T><<<grid_stride_blocks(n, kBlock), kBlock>>>(d, dy, xi, n);
        } else {
            const bool al = aligned16(d) && aligned16(dy) && aligned16(xi);
            packed_then_tail<T>(n, al, [&](auto vc, int64_t off, int64_t cnt) {
                constexpr int V = decltype(vc)::value;
                gelu_backward_kernel<Act, T, V>
                    <<<grid_stride_blocks(cnt, kBlock), kBlock>>>(d + off, dy + off, xi + off, cnt);
            });
        }
    });
    CUDA_CHECK_LAUNCH();
}

void gelu_forward(void* out, const void* x, int64_t n, DType t) { launch_forward<GeluTanh>(out, x, n, t); }
void gelu_backward(void* dx, const void* dout, const void* x, int64_t n, DType t) {
    launch_backward<GeluTanh>(dx, dout, x, n, t);
}
void gelu_erf_forward(void* out, const void* x, int64_t n, DType t) { launch_forward<GeluErf>(out, x, n, t); }
void gelu_erf_backward(void* dx, const void* dout, const void* x, int64_t n, DType t) {
    launch_backward<GeluErf>(dx, dout, x, n, t);
}

}  // namespace fastllm::cuda
