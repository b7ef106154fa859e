/*
Run-time SIMD level: detected once from CPUID, may be lowered for testing the fallback paths
(fastllm._C.set_simd_level("avx2" | "scalar")).
*/
#include "common.h"

#include <atomic>

namespace fastllm {

static std::atomic<int> g_simd{-1};

Simd simd_level() {
    int s = g_simd.load(std::memory_order_relaxed);
    if (s < 0) {
        s = static_cast<int>(detect_simd());
        g_simd.store(s, std::memory_order_relaxed);
    }
    return static_cast<Simd>(s);
}

void set_simd_level(Simd level) {
    int best = static_cast<int>(detect_simd());
    int want = static_cast<int>(level);
    g_simd.store(want < best ? want : best, std::memory_order_relaxed);
}

const char* simd_name(Simd s) {
    switch (s) {
        case Simd::avx512: return "avx512";
        case Simd::avx2: return "avx2";
        default: return "scalar";
    }
}

}  // namespace fastllm
