// The x86 SIMD intrinsics the CPU kernels use: the compiler's <immintrin.h>, or, in a FASTLLM_SIMDE build,
// SIMDe's portable implementations of the same functions (https://github.com/simd-everywhere/simde >= 0.8:
// `pip install cmeel-simde`). That build is for testing only: it runs the AVX-512 and AVX512-BF16 kernels,
// compiled for the baseline x86-64, on a CPU without them (cpu_features() then reports them present, AMX absent),
// so their logic -- tails, masks, panel layouts -- is checked by the test suite on any machine, as the CUDA
// emulator does for the GPU kernels (tests/test_simd_emulated.py). Far slower than the real instructions; never
// time it.
//   pip install cmeel-simde
//   cmake -S . -B build/simde -G Ninja -DFASTLLM_CUDA=off -DFASTLLM_SIMDE=ON && cmake --build build/simde
//   PYTHONPATH=build/simde/python pytest tests/test_matmul_bf16.py
#pragma once

#ifdef FASTLLM_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>

#include <cstdint>
#include <cstring>

// what SIMDe 0.8.2 lacks, by the Intel intrinsics guide's definitions
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif
inline float _mm512_reduce_add_ps(__m512 v) {
    alignas(64) float a[16];
    _mm512_store_ps(a, v);
    float s = 0.0f;
    for (float x : a) s += x;
    return s;
}
inline __m512 _mm512_mask_i32gather_ps(__m512 src, __mmask16 k, __m512i vindex, const void* base, int scale) {
    alignas(64) float out[16];
    alignas(64) int32_t idx[16];
    _mm512_store_ps(out, src);
    _mm512_store_si512(idx, vindex);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1)
            out[i] = *reinterpret_cast<const float*>(static_cast<const char*>(base) + int64_t(idx[i]) * scale);
    return _mm512_load_ps(out);
}
inline void _mm512_stream_ps(float* p, __m512 v) { _mm512_store_ps(p, v); }  // p 64-byte aligned, as the real one
template <typename T, typename R>  // each 32-bit lane truncated to T, the 16 of them as R
inline R narrow_epi32(__m512i a) {
    alignas(64) int32_t in[16];
    T out[16];
    _mm512_store_si512(in, a);
    for (int i = 0; i < 16; i++) out[i] = T(in[i]);
    R r;
    std::memcpy(&r, out, sizeof(r));
    return r;
}
inline __m256i _mm512_cvtepi32_epi16(__m512i a) { return narrow_epi32<int16_t, __m256i>(a); }  // vpmovdw
inline __m128i _mm512_cvtepi32_epi8(__m512i a) { return narrow_epi32<int8_t, __m128i>(a); }    // vpmovdb
inline __m512i _mm512_cvtepi8_epi32(__m128i a) {  // vpmovsxbd: 16 bytes sign-extended to 32-bit lanes
    alignas(16) int8_t in[16];
    alignas(64) int32_t out[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(in), a);
    for (int i = 0; i < 16; i++) out[i] = in[i];
    return _mm512_load_si512(out);
}

// SIMDe's masked loads read all 64 bytes and its masked stores write all of them (zeros where the mask is off): the
// kernels rely on the hardware's semantics -- lanes off the mask are neither read nor written (tails of rows, the
// ends of buffers) -- so these take their place, lane by lane.
#undef _mm512_mask_storeu_ps
#undef _mm512_maskz_loadu_ps
#undef _mm512_mask_loadu_ps
#undef _mm512_maskz_loadu_epi16
#undef _mm512_maskz_loadu_epi32
#undef _mm_mask_storeu_epi8
#undef _mm_maskz_loadu_epi8
inline void _mm512_mask_storeu_ps(void* p, __mmask16 k, __m512 a) {
    alignas(64) float v[16];
    _mm512_store_ps(v, a);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) static_cast<float*>(p)[i] = v[i];
}
inline __m512 _mm512_mask_loadu_ps(__m512 src, __mmask16 k, const void* p) {
    alignas(64) float v[16];
    _mm512_store_ps(v, src);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) v[i] = static_cast<const float*>(p)[i];
    return _mm512_load_ps(v);
}
inline __m512 _mm512_maskz_loadu_ps(__mmask16 k, const void* p) {
    return _mm512_mask_loadu_ps(_mm512_setzero_ps(), k, p);
}
inline __m512i _mm512_maskz_loadu_epi16(__mmask32 k, const void* p) {
    alignas(64) uint16_t v[32];
    for (int i = 0; i < 32; i++) v[i] = k >> i & 1 ? static_cast<const uint16_t*>(p)[i] : 0;
    return _mm512_load_si512(v);
}
inline __m512i _mm512_maskz_loadu_epi32(__mmask16 k, const void* p) {
    alignas(64) int32_t v[16];
    for (int i = 0; i < 16; i++) v[i] = k >> i & 1 ? static_cast<const int32_t*>(p)[i] : 0;
    return _mm512_load_si512(v);
}
inline __m128i _mm_maskz_loadu_epi8(__mmask16 k, const void* p) {
    alignas(16) int8_t v[16];
    for (int i = 0; i < 16; i++) v[i] = k >> i & 1 ? static_cast<const int8_t*>(p)[i] : 0;
    return _mm_load_si128(reinterpret_cast<const __m128i*>(v));
}
inline void _mm_mask_storeu_epi8(void* p, __mmask16 k, __m128i a) {
    alignas(16) int8_t v[16];
    _mm_store_si128(reinterpret_cast<__m128i*>(v), a);
    for (int i = 0; i < 16; i++)
        if (k >> i & 1) static_cast<int8_t*>(p)[i] = v[i];
}
// vcvtne2ps2bf16: round to nearest even, denormal inputs to (signed) zero, NaN quiet; b's 16 bf16 low, a's high
inline __m512bh _mm512_cvtne2ps_pbh(__m512 a, __m512 b) {
    alignas(64) float x[32];
    _mm512_store_ps(x, b);
    _mm512_store_ps(x + 16, a);
    uint16_t r[32];
    for (int i = 0; i < 32; i++) {
        uint32_t u;
        std::memcpy(&u, &x[i], 4);
        if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
        r[i] = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t((u >> 16) | 0x40u)
                                                : uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    __m512bh out;
    std::memcpy(&out, r, sizeof(out));
    return out;
}
#else
#include <immintrin.h>
#endif
