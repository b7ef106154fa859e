/*
fastllm's CUDA emulator: the subset of the CUDA runtime and device language that csrc/cuda uses, as plain C++,
so the real kernel sources run on a CPU (no GPU needed) for testing. Build with FASTLLM_CUDA=emulate; tools
and limits: csrc/cuda/emu/README.md.

Model: a launch shares its blocks out to CPU threads, each running one block at a time. The threads of a block
are fibers (own stacks) on that CPU thread, switched at __syncthreads and at warp collectives (shuffles, ldmatrix,
mma.sync), which exchange their lanes' values like the hardware does. __shared__ becomes `static thread_local`;
dynamic shared memory is one buffer per CPU thread, filled with NaN bytes before each block; cp.async copies are
held back until cp.async.wait_group (the latest moment the hardware may complete them); device memory is host
memory filled with NaN bytes. Faults (a deadlocked barrier, a collective with an exited lane, a misaligned
ldmatrix or cp.async, a launch the GPU would refuse) become CUDA errors with the kernel, block and thread in the
message.
Cost: every thread is run, one at a time: O(grid x block x work), thousands of times slower than a GPU.
*/
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __shared__ static thread_local

// ---- vector types
struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
    unsigned x, y, z;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) int2 {
    int x, y;
};
struct alignas(16) int4 {
    int x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// ---- runtime API types
enum cudaError_t {
    cudaSuccess = 0,
    cudaErrorInvalidValue = 1,
    cudaErrorMemoryAllocation = 2,
    cudaErrorInvalidConfiguration = 9,
    cudaErrorInvalidDevice = 101,
    cudaErrorNoDevice = 100,
    cudaErrorLaunchOutOfResources = 701,
    cudaErrorLaunchFailure = 719,
};
using cudaError = cudaError_t;
enum cudaMemcpyKind {
    cudaMemcpyHostToHost = 0,
    cudaMemcpyHostToDevice = 1,
    cudaMemcpyDeviceToHost = 2,
    cudaMemcpyDeviceToDevice = 3,
    cudaMemcpyDefault = 4
};
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaMemPoolAttr { cudaMemPoolAttrReleaseThreshold = 4 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;
struct CUmemPoolHandle_st;
using cudaMemPool_t = CUmemPoolHandle_st*;
struct cudaDeviceProp {
    char name[256];
    int major, minor;
    size_t totalGlobalMem;
    int multiProcessorCount;
    size_t sharedMemPerBlock, sharedMemPerBlockOptin;
    int maxThreadsPerBlock, warpSize;
};

cudaError_t cudaGetDeviceCount(int* n);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t stream);
cudaError_t cudaFreeAsync(void* p, cudaStream_t stream);
cudaError_t cudaDeviceGetDefaultMemPool(cudaMemPool_t* pool, int device);
cudaError_t cudaMemPoolSetAttribute(cudaMemPool_t pool, cudaMemPoolAttr attr, void* value);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t s = 0);
cudaError_t cudaMemset(void* p, int value, size_t bytes);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t s = 0);
cudaError_t cudaDeviceSynchronize();
cudaError_t cudaStreamSynchronize(cudaStream_t s);
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t err);

namespace emu {

// ---- the launch: Kernel<<<grid, block, smem, stream>>>(args) is rewritten (translate.py) as
// emu::launch("Kernel", Kernel, emu::LaunchCfg(grid, block, smem, stream), args)
struct LaunchCfg {
    dim3 grid, block;
    size_t smem;
    LaunchCfg(dim3 g, dim3 b, size_t s = 0, cudaStream_t = nullptr) : grid(g), block(b), smem(s) {}
};
struct Body {  // type-erased "run the kernel once, as the current thread"
    void (*fn)(void*);
    void* ctx;
};
void run_grid(const char* name, const void* kernel, const LaunchCfg& cfg, Body body);
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
bool is_device_pointer(const void* p);

void bad_pointer_arg(const char* name, int index);
// every pointer argument must be null or point into (or one past) a device allocation
template <typename Tuple, size_t... I>
bool check_pointer_args(const char* name, const Tuple& t, std::index_sequence<I...>) {
    bool ok = true;
    auto one = [&](const auto& v, int i) {
        if constexpr (std::is_pointer<std::decay_t<decltype(v)>>::value)
            if (ok && v != nullptr && !is_device_pointer((const void*)v)) ok = false, bad_pointer_arg(name, i);
    };
    (one(std::get<I>(t), (int)I), ...);
    return ok;
}

template <typename... P, typename... A>
void launch(const char* name, void (*kernel)(P...), const LaunchCfg& cfg, A&&... args) {
    static_assert(sizeof...(P) == sizeof...(A), "kernel launched with the wrong number of arguments");
    // parameters converted once, like the driver's copy of them; each thread gets its own copy (by value)
    using Params = std::tuple<std::decay_t<P>...>;
    Params params(std::forward<A>(args)...);
    if (!check_pointer_args(name, params, std::index_sequence_for<P...>{})) return;
    struct Ctx {
        void (*k)(P...);
        Params* p;
    } ctx{kernel, &params};
    run_grid(name, (const void*)kernel, cfg,
             Body{[](void* c) {
                      Ctx* x = static_cast<Ctx*>(c);
                      std::apply(x->k, *x->p);
                  },
                  &ctx});
}

// ---- per-thread state, found from the stack pointer: each emulated thread runs on its own kStack-aligned stack
// whose top slot points to its Thread. Not thread_local: in a shared library every thread_local read calls
// __tls_get_addr, which took a sixth of the emulator's time (threadIdx is read all the time).
struct Thread {
    uint3 idx;        // threadIdx
    uint3 block_idx;  // blockIdx
};
constexpr size_t kStack = 256 << 10;
inline void** stack_top() {  // the running thread's two top words: its Thread, the emulator's record of it
    uintptr_t sp;
    asm("movq %%rsp, %0" : "=r"(sp));
    return (void**)((sp & ~(uintptr_t)(kStack - 1)) + kStack - 16);
}
inline Thread& self() { return *(Thread*)stack_top()[0]; }  // only inside a kernel (on an emulated thread's stack)
extern dim3 g_grid_dim, g_block_dim;

[[noreturn]] void fault(const char* what);
void syncthreads();
void syncwarp(unsigned mask);
// warp exchange: each lane of `mask` puts `words` 32-bit words, waits for the others, and gets a pointer to
// all 32 lanes' words (lane-major, `words` each) valid until its next collective; `combine`, if given, runs
// once on them (by the last lane to arrive) before any lane reads them
const uint32_t* warp_exchange(unsigned mask, const uint32_t* mine, int words, const char* op,
                              void (*combine)(uint32_t* all) = nullptr);
int lane_id();
void* dynamic_smem();
uint32_t smem_offset(const void* p);
void* smem_pointer(uint32_t offset);
// cp.async: queued per thread, done at wait_group
void cp_async(uint32_t dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int n);

template <typename T>
T shfl(unsigned mask, T v, int src_of_lane(int lane, int arg, int width), int arg, int width, const char* op) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a type over 8 bytes");
    uint32_t w[2] = {0, 0};
    std::memcpy(w, &v, sizeof(T));
    const uint32_t* all = warp_exchange(mask, w, 2, op);
    int src = src_of_lane(lane_id(), arg, width);
    if (!(mask >> src & 1u)) fault("shuffle reads a lane outside its mask");
    T r;
    std::memcpy(&r, all + 2 * src, sizeof(T));
    return r;
}
inline int src_xor(int lane, int m, int w) { return ((lane ^ m) & (w - 1)) | (lane & ~(w - 1)); }
inline int src_idx(int lane, int s, int w) { return (lane & ~(w - 1)) + (s & (w - 1)); }
inline int src_down(int lane, int d, int w) { return (lane & (w - 1)) + d < w ? lane + d : lane; }
inline int src_up(int lane, int d, int w) { return (lane & (w - 1)) >= d ? lane - d : lane; }

}  // namespace emu

#define threadIdx (::emu::self().idx)
#define blockIdx (::emu::self().block_idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)
constexpr int warpSize = 32;

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
    return ::emu::func_set_attribute((const void*)kernel, attr, value);
}

// ---- device functions
inline void __syncthreads() { ::emu::syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::emu::syncwarp(mask); }
template <typename T> T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
    return ::emu::shfl(mask, v, ::emu::src_xor, m, width, "__shfl_xor_sync");
}
template <typename T> T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return ::emu::shfl(mask, v, ::emu::src_idx, src, width, "__shfl_sync");
}
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return ::emu::shfl(mask, v, ::emu::src_down, (int)d, width, "__shfl_down_sync");
}
template <typename T> T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return ::emu::shfl(mask, v, ::emu::src_up, (int)d, width, "__shfl_up_sync");
}
inline size_t __cvta_generic_to_shared(const void* p) { return ::emu::smem_offset(p); }

// blocks run side by side on several CPU threads: read-modify-write as a compare-and-swap loop
template <typename T, typename F> T atomic_update(T* p, F f) {
    static_assert(sizeof(T) == 4 || sizeof(T) == 8, "atomics on 4- or 8-byte types");
    using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    U* q = reinterpret_cast<U*>(p);
    U old = __atomic_load_n(q, __ATOMIC_RELAXED), want;
    T o;
    do {
        std::memcpy(&o, &old, sizeof(T));
        const T n = f(o);
        std::memcpy(&want, &n, sizeof(T));
    } while (!__atomic_compare_exchange_n(q, &old, want, true, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED));
    return o;
}
template <typename T> T atomicAdd(T* p, T v) {
    return atomic_update(p, [v](T o) { return o + v; });
}
template <typename T> T atomicMax(T* p, T v) {
    return atomic_update(p, [v](T o) { return o < v ? v : o; });
}
// --use_fast_math (the real build's flag) compiles float tanhf into tanh.approx.f32, whose relative error is up to
// 2^-11 (PTX ISA); modelled at that precision: the exact tanh with its fraction cut to 11 bits, so a kernel that
// needs tanhf to be more accurate than the GPU makes it fails here too (__expf, exp2f, __logf, rsqrtf and the
// approximate division stay exact here: on the GPU they are off by a few ulp, __expf by more for large arguments)
namespace emu {
inline float tanh_fast_math(float x) {
    float t = std::tanh(x);
    uint32_t u;
    std::memcpy(&u, &t, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u &= ~0xfffu;  // inf and NaN as they are
    std::memcpy(&t, &u, 4);
    return t;
}
}  // namespace emu
#define tanhf(x) ::emu::tanh_fast_math(x)
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline unsigned __float_as_uint(float f) { return (unsigned)__float_as_int(f); }
inline float __uint_as_float(unsigned u) { return __int_as_float((int)u); }
using std::max;
using std::min;
