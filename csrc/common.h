/*
Shared helpers for fastllm's native code.

Size letters (as in llm.c): B batch, T time (sequence length), C channels, NH heads, hs = C/NH head size,
V vocabulary, OC output channels, N = B*T rows for row-wise ops. Sizes are int64_t wherever they multiply.

Conventions of every kernel in csrc/cpu:
  - argument order: outputs, inputs, weights, sizes, scalars; all arrays dense, row-major, float32;
  - forward kernels overwrite (=) their outputs;
  - backward kernels ACCUMULATE (+=) into every gradient output (zero them first), like llm.c;
    the one exception, stated where it occurs, is softmax_ce's dlogits which is written (=);
  - kernels do not validate input: bindings.cpp does, through FASTLLM_CHECK (-> Python ValueError).
*/
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fastllm {

// ---- error reporting
template <typename... Args>
std::string str_cat(Args&&... args) {
    std::ostringstream ss;
    (ss << ... << args);
    return ss.str();
}

// FASTLLM_CHECK(cond, "what", value, ...) throws std::invalid_argument (Python ValueError) with the message.
#define FASTLLM_CHECK(cond, ...)                                                   \
    do {                                                                           \
        if (!(cond)) throw std::invalid_argument(::fastllm::str_cat(__VA_ARGS__)); \
    } while (0)

// ---- threads
// The most threads fastllm runs (as ggml's GGML_MAX_N_THREADS): libgomp segfaults or exits the process when it
// cannot create the threads asked for (OMP_NUM_THREADS=100000), and thousands of threads are never faster.
// The bindings refuse more (ValueError) and lower a larger OMP_NUM_THREADS to it (limit_threads).
constexpr int kMaxThreads = 1024;

// The thread count fastllm.set_num_threads chose (0: never set, OpenMP's default). OpenMP keeps the count per
// thread, so a count set from one Python thread would not reach kernels called from another (a server's engine
// thread): every binding applies this one through limit_threads.
inline std::atomic<int>& requested_threads() {
    static std::atomic<int> n{0};
    return n;
}
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }  // a, b > 0

inline int max_threads() {
#ifdef _OPENMP
    const int want = requested_threads().load(std::memory_order_relaxed);
    const int n = want > 0 ? want : omp_get_max_threads();
    return n < kMaxThreads ? n : kMaxThreads;
#else
    return 1;
#endif
}
// Gives the calling thread the requested count (set_num_threads), or lowers it to kMaxThreads when
// OMP_NUM_THREADS asked for more. Every binding calls this before running a kernel.
inline void limit_threads() {
#ifdef _OPENMP
    const int want = max_threads();
    if (omp_get_max_threads() != want) omp_set_num_threads(want);
#endif
}
inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}
// The threads of the current OpenMP team (1 outside a parallel region).
inline int team_size() {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}
// Inside a parallel region: this thread's rows [n0, n1) of N (contiguous, balanced).
inline void thread_rows(int64_t N, int64_t& n0, int64_t& n1) {
    const int nt = team_size(), id = thread_id();
    n0 = N * id / nt;
    n1 = N * (id + 1) / nt;
}
// The element-wise kernels' loop: f(i0, m) for the blocks [i0, i0 + m) of kElemBlock elements that cover [0, n),
// over threads (static schedule) from kElemParallelMin elements on.
constexpr int64_t kElemBlock = 16384, kElemParallelMin = 65536;
template <typename F>
inline void for_blocks(int64_t n, F f) {
    const int64_t nb = (n + kElemBlock - 1) / kElemBlock;
#pragma omp parallel for schedule(static) if (n >= kElemParallelMin)
    for (int64_t b = 0; b < nb; b++) {
        const int64_t i0 = b * kElemBlock;
        f(i0, n - i0 < kElemBlock ? n - i0 : kElemBlock);
    }
}

// ---- attention score options (csrc/cpu/attention.cpp and csrc/cuda/attention.cu; both kernels take them)
// The score of query t and key s is (q_t . k_s) * scale, then softcap * tanh(score / softcap) when softcap > 0
// (Gemma 2); query t sees key s iff s <= t and, when window > 0, t - s < window (sliding window: Mistral, Gemma 2/3),
// positions absolute (a KV cache's pos[b] + t). The defaults are plain causal attention with scale 1 / sqrt(hs).
struct AttentionOpts {
    float scale = 0.0f;    // > 0; 0: 1 / sqrt(hs)
    float softcap = 0.0f;  // > 0; 0: no cap
    int64_t window = 0;    // >= 1; 0: full causal
    float resolved_scale(int64_t hs) const { return scale > 0.0f ? scale : 1.0f / std::sqrt((float)hs); }
    // the bindings' constructor: std::invalid_argument (ValueError) naming the bad argument
    static AttentionOpts checked(float scale, float softcap, int64_t window) {
        FASTLLM_CHECK(std::isfinite(scale) && scale >= 0.0f, "scale must be a finite number > 0 (0: 1/sqrt(hs)), got ",
                      scale);
        FASTLLM_CHECK(std::isfinite(softcap) && softcap >= 0.0f, "softcap must be a finite number > 0 (0: none), got ",
                      softcap);
        FASTLLM_CHECK(window >= 0, "window must be >= 1 (0: full causal attention), got ", window);
        return {scale, softcap, window};
    }
};

// ---- KV cache rows (attention_kv_forward, CPU and CUDA): the key/value of absolute position p lives at row p % maxT
// of its (b, kv head) cache; while every position fits (p < maxT) that is row p. With a sliding window the cache may
// be a ring shorter than the positions: Tn new tokens at positions P .. P+Tn-1 are valid iff P >= 0 and either
// P + Tn <= maxT (nothing wraps) or window > 0 and maxT >= window + Tn - 1. Why that suffices: writing the new rows
// overwrites positions P+t-maxT (t < Tn), the newest being P+Tn-1-maxT; the oldest key any new query P+t needs is
// P+t-window+1 >= P-window+1. So no needed key is lost iff P+Tn-1-maxT < P-window+1, i.e. maxT >= window + Tn - 1
// (then also Tn <= maxT: the new rows are distinct, and a query's <= window keys are distinct rows).
inline bool kv_rows_fit(int64_t pos, int64_t Tn, int64_t maxT, int64_t window) {
    return pos >= 0 && (pos + Tn <= maxT || (window > 0 && maxT >= window + Tn - 1));
}

// ---- CPU features (run-time dispatch; the module itself is compiled for baseline x86-64)
// What the CPU and the OS provide, read once (csrc/cpu/simd.cpp): CPUID leaf 1 and leaf 7 subleaves 0/1, each
// AVX/AVX-512/AMX feature counted only when XCR0 (xgetbv) shows that the OS saves its register state. Names
// follow the flags line of Linux's /proc/cpuinfo. amx_permission: Linux granted this process the AMX tile data
// state (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), requested once where the CPU has AMX).
struct CpuFeatures {
    std::string model;  // CPUID brand string, e.g. "AMD EPYC 7B13 64-Core Processor"
    bool avx2 = false, fma = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
    bool avx512_bf16 = false, avx512_fp16 = false, avx512_vnni = false;
    bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
    bool amx_permission = false;
};
const CpuFeatures& cpu_features();

// SIMD levels, lowest to highest: the vector ISA of the fp32 kernels (scalar, avx2, avx512), then avx512_bf16
// (avx512 plus the VDPBF16PS bf16 dot products of the bf16 matmuls), then amx (avx512_bf16 plus AMX-BF16 tiles,
// granted to this process: the bf16 GEMM). A level includes those below it.
enum class Simd { scalar = 0, avx2 = 1, avx512 = 2, avx512_bf16 = 3, amx = 4 };
constexpr int kSimdLevels = 5;

// The highest level this CPU supports.
Simd detect_simd();

// The level in use: detected once, can be lowered (never raised) for tests via set_simd_level.
Simd simd_setting();
// The fp32 kernels' ISA under the level in use: simd_setting() capped at avx512 (never avx512_bf16), so kernels
// dispatch with `simd_level() == Simd::avx512` / `== Simd::avx2` / else the portable loop.
Simd simd_level();
void set_simd_level(Simd level);  // clamps to what the CPU supports
const char* simd_name(Simd s);

}  // namespace fastllm

// Per-function ISA targets for the dispatch above (GCC/Clang). A FASTLLM_SIMDE build (a test build, see
// csrc/cpu/intrin.h) compiles every kernel for the baseline instead: SIMDe's portable intrinsics stand in.
#ifdef FASTLLM_SIMDE
#define FASTLLM_TARGET_AVX2
#define FASTLLM_TARGET_AVX512
#define FASTLLM_TARGET_AVX512BF16
#define FASTLLM_TARGET_AVX512VNNI
#define FASTLLM_TARGET_AMX
#define FASTLLM_TARGET_AMX_INT8
#else
#define FASTLLM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define FASTLLM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
// AVX-512 plus the bf16 dot product (vdpbf16ps; AMD Zen 4, Intel Cooper Lake / Sapphire Rapids and later)
#define FASTLLM_TARGET_AVX512BF16 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma")))
// AVX-512 plus the int8 dot product (vpdpbusd; AMD Zen 4, Intel Cascade Lake and later)
#define FASTLLM_TARGET_AVX512VNNI \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma")))
// AVX-512 BF16 plus the AMX tiles (TDPBF16PS; Intel Sapphire Rapids and later)
#define FASTLLM_TARGET_AMX \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,amx-tile,amx-bf16")))
// AVX-512 plus the AMX tiles' int8 products (TDPBUSD; the w8a8 matmul)
#define FASTLLM_TARGET_AMX_INT8 \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,amx-tile,amx-int8")))
#endif
// A loop body written once and compiled into each FASTLLM_TARGET_* wrapper that calls it (vectorized for that ISA).
#define FASTLLM_INLINE inline __attribute__((always_inline))
