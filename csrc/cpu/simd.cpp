/*
CPU features and the run-time SIMD level (csrc/common.h). cpu_features() reads CPUID once: leaf 1 (FMA, OSXSAVE),
leaf 7 subleaf 0 (AVX2, AVX-512 F/DQ/BW/VL/FP16, AMX-TILE/BF16/INT8), subleaf 1 (AVX512_BF16) and the brand
string (leaves 0x80000002..4); a feature counts only when XCR0 (xgetbv) shows the OS saves its state: YMM for
AVX2/FMA, opmask + ZMM for AVX-512, XTILECFG + XTILEDATA for AMX. On Linux the AMX tile data state must also be
granted per process: ARCH_REQ_XCOMP_PERM is asked once, ARCH_GET_XCOMP_PERM confirms (amx_permission).
The level in use starts at detect_simd() and can be lowered for testing the fallback paths
(fastllm.set_simd / FASTLLM_SIMD, fastllm._C.set_simd_level). Bit positions: Intel SDM vol. 2A, CPUID;
Linux Documentation/arch/x86/xstate.rst.
*/
#include "common.h"

#include <atomic>
#include <cstring>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastllm {

// ---- detection

#if defined(__x86_64__) || defined(__i386__)
static uint64_t xgetbv0() {  // XCR0: the register state the OS saves on context switches
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (uint64_t(hi) << 32) | lo;
}

static bool bit(uint32_t reg, int b) { return (reg >> b) & 1u; }

static std::string brand_string() {
    uint32_t r[12] = {};
    if (__get_cpuid_max(0x80000000u, nullptr) < 0x80000004u) return "";
    for (uint32_t i = 0; i < 3; i++) __get_cpuid(0x80000002u + i, &r[4 * i], &r[4 * i + 1], &r[4 * i + 2], &r[4 * i + 3]);
    char s[49] = {};
    std::memcpy(s, r, 48);
    std::string name(s);
    const size_t a = name.find_first_not_of(' '), b = name.find_last_not_of(' ');  // brands are space-padded
    return a == std::string::npos ? "" : name.substr(a, b - a + 1);
}

// Linux >= 5.16 keeps AMX tile data off until a process asks (arch_prctl; glibc has no wrapper for these codes).
static bool request_amx_permission() {
#if defined(__linux__) && defined(__x86_64__)
    constexpr int ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);  // fails harmlessly where already granted
    unsigned long perm = 0;
    if (syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &perm) != 0) return false;
    return (perm >> XFEATURE_XTILEDATA) & 1ul;
#else
    return false;
#endif
}

static CpuFeatures read_cpu_features() {
    CpuFeatures f;
    f.model = brand_string();
#ifdef FASTLLM_SIMDE  // a test build: SIMDe emulates every level up to AVX512-BF16 (cpu/intrin.h); no AMX
    f.model += " (SIMDe emulation)";
    f.fma = f.avx2 = f.avx512f = f.avx512dq = f.avx512bw = f.avx512vl = f.avx512_bf16 = f.avx512_vnni = true;
    return f;
#endif
    uint32_t a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = bit(c, 27), fma = bit(c, 12), avx = bit(c, 28);
    const uint64_t xcr0 = osxsave ? xgetbv0() : 0;
    const bool ymm = (xcr0 & 0x6) == 0x6;            // SSE (1) + AVX (2) state
    const bool zmm = ymm && (xcr0 & 0xe0) == 0xe0;   // opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7)
    const bool tiles = (xcr0 & 0x60000) == 0x60000;  // XTILECFG (17), XTILEDATA (18)
    if (__get_cpuid_max(0, nullptr) < 7) return f;
    uint32_t b7, c7, d7, a71 = 0, b71, c71, d71;
    __cpuid_count(7, 0, a, b7, c7, d7);
    const uint32_t max_sub7 = a;
    if (max_sub7 >= 1) __cpuid_count(7, 1, a71, b71, c71, d71);
    f.fma = ymm && avx && fma;
    f.avx2 = ymm && avx && bit(b7, 5);
    f.avx512f = zmm && bit(b7, 16);
    f.avx512dq = zmm && bit(b7, 17);
    f.avx512bw = zmm && bit(b7, 30);
    f.avx512vl = zmm && bit(b7, 31);
    f.avx512_fp16 = zmm && bit(d7, 23);
    f.avx512_vnni = zmm && bit(c7, 11);
    f.avx512_bf16 = zmm && bit(a71, 5);
    f.amx_bf16 = tiles && bit(d7, 22);
    f.amx_tile = tiles && bit(d7, 24);
    f.amx_int8 = tiles && bit(d7, 25);
    if (f.amx_tile) f.amx_permission = request_amx_permission();
    return f;
}
#else
static CpuFeatures read_cpu_features() { return CpuFeatures{}; }  // not x86: the portable loops only
#endif

const CpuFeatures& cpu_features() {
    static const CpuFeatures f = read_cpu_features();  // thread-safe, once
    return f;
}

Simd detect_simd() {
    const CpuFeatures& f = cpu_features();
    const bool avx512 = f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq;
    if (avx512 && f.avx512_bf16 && f.amx_tile && f.amx_bf16 && f.amx_permission) return Simd::amx;
    if (avx512 && f.avx512_bf16) return Simd::avx512_bf16;
    if (avx512) return Simd::avx512;
    if (f.avx2 && f.fma) return Simd::avx2;
    return Simd::scalar;
}

// ---- the level in use

static std::atomic<int> g_simd{-1};

Simd simd_setting() {
    int s = g_simd.load(std::memory_order_relaxed);
    if (s < 0) {
        s = static_cast<int>(detect_simd());
        g_simd.store(s, std::memory_order_relaxed);
    }
    return static_cast<Simd>(s);
}

Simd simd_level() {
    const Simd s = simd_setting();
    return s > Simd::avx512 ? Simd::avx512 : s;
}

void set_simd_level(Simd level) {
    int best = static_cast<int>(detect_simd());
    int want = static_cast<int>(level);
    g_simd.store(want < best ? want : best, std::memory_order_relaxed);
}

const char* simd_name(Simd s) {
    switch (s) {
        case Simd::amx: return "amx";
        case Simd::avx512_bf16: return "avx512_bf16";
        case Simd::avx512: return "avx512";
        case Simd::avx2: return "avx2";
        default: return "scalar";
    }
}

}  // namespace fastllm
