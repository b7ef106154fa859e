/*
Helpers shared by the memory-bound kernel families (layernorm.cu, gelu.cu, swiglu.cu, residual.cu, embedding.cu,
adamw.cu):
  - 16-byte packs: kVec<T> elements of T (4 float or 8 bf16) loaded/stored with one 128-bit access, converted
    to/from fp32 registers; used only when every pointer involved is 16-byte aligned and the row length is a
    multiple of kVec<T> (the launchers check; otherwise they run the scalar form of the same kernel);
  - grid sizes for grid-stride loops, and packed_then_tail (16-byte packs, then the scalar tail);
  - a grow-only scratch buffer per device (deterministic two-pass reductions need room for partial sums);
  - GELU's per-element math (gelu.cu, swiglu.cu's GeGLU);
  - the switch that makes the launchers run the simple reference kernels (tests compare fast vs simple).
*/
#pragma once
#include <cstdint>
#include <mutex>
#include <type_traits>

#include "common.cuh"

namespace fastllm::cuda {

template <typename T> constexpr int kVec = 16 / (int)sizeof(T);

inline bool aligned16(const void* p) { return ((uintptr_t)p & 15) == 0; }

// p points to kVec<T> elements at a 16-byte aligned address
template <typename T>
__device__ __forceinline__ void load_pack(float (&f)[kVec<T>], const T* p) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec<T>; j++) f[j] = to_f32(e[j]);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float (&f)[kVec<T>]) {
    uint4 raw;
    T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec<T>; j++) e[j] = from_f32<T>(f[j]);
    *reinterpret_cast<uint4*>(p) = raw;
}

// V elements at p: one 16-byte pack when V == kVec<T> (aligned), a single scalar when V == 1
template <typename T, int V>
__device__ __forceinline__ void load_v(float (&f)[V], const T* p) {
    static_assert(V == 1 || V == kVec<T>, "V is 1 or a whole 16-byte pack");
    if constexpr (V == 1) f[0] = to_f32(*p);
    else load_pack<T>(f, p);
}
template <typename T, int V>
__device__ __forceinline__ void store_v(T* p, const float (&f)[V]) {
    static_assert(V == 1 || V == kVec<T>, "V is 1 or a whole 16-byte pack");
    if constexpr (V == 1) *p = from_f32<T>(f[0]);
    else store_pack<T>(p, f);
}

// blocks for a grid-stride loop over `work` items with `block` threads (at least 1, at most 8192 blocks:
// enough to fill any current GPU several times over)
inline int grid_stride_blocks(int64_t work, int block) {
    int64_t g = (work + block - 1) / block;
    return (int)(g < 1 ? 1 : g > 8192 ? 8192 : g);
}

// calls launch(std::integral_constant<int, V>, first element, number of V-packs) for the 16-byte packed body
// (if aligned) and for the scalar rest
template <typename T, typename F>
inline void packed_then_tail(int64_t n, bool aligned, F&& launch) {
    constexpr int V = kVec<T>;
    const int64_t packs = aligned ? n / V : 0;
    if (packs > 0) launch(std::integral_constant<int, V>(), (int64_t)0, packs);
    const int64_t done = packs * V;
    if (done < n) launch(std::integral_constant<int, 1>(), done, n - done);
}

// Grow-only scratch memory, one buffer per device, for the kernels' partial sums. Hold the lease (it holds a
// mutex) until every kernel that uses the memory is launched: all of them run on the default stream, so the
// next user's kernels run after them. Growing synchronises the device once before freeing the old buffer.
struct ScratchLease {
    std::unique_lock<std::mutex> lock;
    char* ptr;
};

inline ScratchLease scratch(size_t bytes) {
    static std::mutex mu[64];
    static char* buf[64] = {};
    static size_t cap[64] = {};
    const int d = current_device() & 63;
    std::unique_lock<std::mutex> lock(mu[d]);
    if (bytes > cap[d]) {
        if (buf[d]) {
            CUDA_CHECK(cudaDeviceSynchronize());
            free_device(buf[d]);
            buf[d] = nullptr, cap[d] = 0;
        }
        const size_t want = bytes + bytes / 4 + 256;  // some headroom against repeated growth
        buf[d] = (char*)malloc_device(want);
        cap[d] = want;
    }
    return {std::move(lock), buf[d]};
}

// bump allocator inside a lease: 256-byte aligned pieces
struct ScratchCarver {
    char* p;
    template <typename U>
    U* take(size_t count) {
        U* r = reinterpret_cast<U*>(p);
        p += (count * sizeof(U) + 255) / 256 * 256;
        return r;
    }
};
inline size_t scratch_piece(size_t bytes) { return (bytes + 255) / 256 * 256; }

// GELU, tanh approximation, per element (gelu.cu, and swiglu.cu's GeGLU; the CPU's csrc/cpu/gelu.cpp is the spec):
// gelu(x) = x s, s = sigmoid(2u), u = k (x + c x^3);  gelu'(x) = s + x s (1 - s) 2k (1 + 3c x^2), x^2 capped at 1e4
// (tanh is saturated there anyway; keeps x^3 and u' finite). __expf(-2u) = inf for very negative x gives s = 0.
constexpr float kGeluScale = 0.7978845608028654f;  // k = sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;            // c
constexpr float kGeluX2Cap = 1e4f;

__device__ __forceinline__ float gelu_sigmoid(float x, float x2) {  // s = sigmoid(2u)
    const float two_u = x * fmaf(x2, 2.0f * kGeluScale * kGeluCubic, 2.0f * kGeluScale);
    return 1.0f / (1.0f + __expf(-two_u));
}

__device__ __forceinline__ float gelu_f(float x) {
    const float x2 = fminf(x * x, kGeluX2Cap);
    return x * gelu_sigmoid(x, x2);
}

__device__ __forceinline__ float gelu_grad(float x) {
    const float x2 = fminf(x * x, kGeluX2Cap);
    const float s = gelu_sigmoid(x, x2);
    const float du2 = fmaf(x2, 6.0f * kGeluScale * kGeluCubic, 2.0f * kGeluScale);  // 2 du/dx
    return fmaf(x * s * (1.0f - s), du2, s);
}

// set by set_simple_elementwise (tests): launchers run their simple reference kernels
inline bool& simple_elementwise_flag() {
    static bool on = false;
    return on;
}

}  // namespace fastllm::cuda
