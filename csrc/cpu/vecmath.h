/*
Vectorized float math for the kernels (softmax_ce, gelu, swiglu, layernorm, attention): exp, 2^x, sigmoid, tanh, the
argument of GELU's sigmoid form, horizontal reductions and tail masks, for AVX-512 (16 lanes) and AVX2+FMA (8 lanes). Every function carries its ISA's
target attribute so it inlines only into code compiled for that ISA (the module itself is baseline x86-64).

exp(x): Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2 (n = round(x log2e), ln2 split in a float
head and tail, both subtracted with FMA), then e^r by a degree-6 polynomial (weighted least-squares fit of
the minimax error on [-ln2/2, ln2/2], fitted in float64 with numpy; max relative error 3e-9 in exact
arithmetic, ~1.4 half-ulp in float32 Horner), then scaled by 2^n. Measured against float64 std::exp at 20 M
evenly spaced points of [-87, 88]: max 0.88 ulp (AVX-512 and AVX2 alike); [-103, -87] (AVX-512): 0.85 ulp. Inputs are clamped: below -103 (AVX-512, scalef gives denormals/0) or -87.3 (AVX2, the
exponent field must stay normal) the result is tiny (<= 1e-38) rather than exactly 0; above 88.3 it
saturates at ~2.4e38 (no inf). NaN propagates.
*/
#pragma once
#include "cpu/intrin.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"

namespace fastllm::vec {

// e^r on [-ln2/2, ln2/2]: 1 + r + c2 r^2 + ... + c6 r^6
inline constexpr float kExpC2 = 4.999999404e-01f, kExpC3 = 1.666652113e-01f, kExpC4 = 4.166838899e-02f,
                       kExpC5 = 8.368710987e-03f, kExpC6 = 1.381460577e-03f;
inline constexpr float kLog2e = 1.442695041f, kLn2Hi = 6.931471825e-01f, kLn2Lo = -1.904654323e-09f;

// ---- AVX-512

FASTLLM_TARGET_AVX512 inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-103.0f), x);  // max(c, NaN) = NaN: NaN propagates
    x = _mm512_min_ps(_mm512_set1_ps(88.3f), x);
    const __m512 n =
        _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Hi), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kLn2Lo), r);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kExpC6), r, _mm512_set1_ps(kExpC5));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpC2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);  // p * 2^n, exact, handles the denormal range
}

// 1 / (1 + e^-x), full-precision division.
FASTLLM_TARGET_AVX512 inline __m512 sigmoid512(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

// tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|) (no overflow; absolute error ~1e-7, which softcapped
// logits c * tanh(x / c) need, not relative accuracy near 0). NaN propagates.
FASTLLM_TARGET_AVX512 inline __m512 tanh512(__m512 x) {
    const __m512 one = _mm512_set1_ps(1.0f), sign = _mm512_set1_ps(-0.0f);
    const __m512 e = exp512(_mm512_mul_ps(_mm512_set1_ps(-2.0f), _mm512_andnot_ps(sign, x)));
    const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    return _mm512_or_ps(t, _mm512_and_ps(sign, x));
}

// The first n of 16 lanes (none for n <= 0, all for n >= 16): the mask of a row's tail.
inline __mmask16 tail_mask16(int64_t n) { return (__mmask16)(n >= 16 ? 0xffffu : n <= 0 ? 0u : (1u << n) - 1u); }

// 16 bf16 pair words (lo[i], hi[i]) from two rows of 16 values -- VDPBF16PS's layout, the even k in a word's low
// half -- by VCVTNE2PS2BF16 (nearest even; denormals to zero, as the bf16 dot products read them anyway), which
// puts hi's 16 bf16 above lo's, and one VPERMW to interleave them (the GEMM's packers and the bf16 attention).
FASTLLM_TARGET_AVX512BF16 inline __m512i bf16_pairs512(__m512 lo, __m512 hi) {
    const __m512i interleave = _mm512_setr_epi32(0x100000, 0x110001, 0x120002, 0x130003, 0x140004, 0x150005,
                                                 0x160006, 0x170007, 0x180008, 0x190009, 0x1a000a, 0x1b000b,
                                                 0x1c000c, 0x1d000d, 0x1e000e, 0x1f000f);
    return _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// ---- AVX2 + FMA

FASTLLM_TARGET_AVX2 inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);  // the second operand is returned for NaN: NaN propagates
    x = _mm256_min_ps(_mm256_set1_ps(88.3f), x);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Hi), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kLn2Lo), r);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kExpC6), r, _mm256_set1_ps(kExpC5));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC4));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC3));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpC2));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    // 2^n through the exponent field; n in [-126, 127] after the clamp
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

FASTLLM_TARGET_AVX2 inline __m256 sigmoid256(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    return _mm256_div_ps(one, _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), x))));
}

FASTLLM_TARGET_AVX2 inline __m256 tanh256(__m256 x) {  // as tanh512
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    const __m256 e = exp256(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(sign, x)));
    const __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    return _mm256_or_ps(t, _mm256_and_ps(sign, x));
}

FASTLLM_TARGET_AVX2 inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

FASTLLM_TARGET_AVX2 inline float hmax256(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Integer lane mask for _mm256_maskload_ps / _mm256_maskstore_ps: lowest k lanes, 0 <= k <= 8.
FASTLLM_TARGET_AVX2 inline __m256i tail_mask8(int64_t k) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)k), idx);
}

// ---- 2^x (attention's online softmax works in base 2, with the softmax scale and log2(e) folded into one FMA):
// x clamped to [-126, 126], n = round(x), 2^f on [-1/2, 1/2] by a degree-6 polynomial (rel. error ~2e-7). NaN gives
// NaN (the clamps take x as their second operand, which max/min return when either is NaN), so attention
// propagates NaN in q, k, v as the scalar and KV-cache paths do.
inline constexpr float kE1 = 0.6931471805599453f, kE2 = 0.2402265069591007f, kE3 = 0.055504108664821576f,
                kE4 = 0.009618129107628477f, kE5 = 0.0013333558146428441f, kE6 = 0.00015403530393381606f;

FASTLLM_TARGET_AVX512 inline __m512 exp2_512(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(126.0f), _mm512_max_ps(_mm512_set1_ps(-126.0f), x));  // NaN stays NaN
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(kE6), f, _mm512_set1_ps(kE5));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE4));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE3));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE2));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kE1));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

FASTLLM_TARGET_AVX2 inline __m256 exp2_256(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(126.0f), _mm256_max_ps(_mm256_set1_ps(-126.0f), x));  // NaN stays NaN
    const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(x, n);
    __m256 p = _mm256_fmadd_ps(_mm256_set1_ps(kE6), f, _mm256_set1_ps(kE5));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE4));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE3));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE2));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kE1));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// ---- soft-capping z = c tanh(x / c) of a row (softmax_ce's logits, attention's scores), z may be x: AVX-512, AVX2
// (whole vectors; returns the count done) or std::tanh for the rest

FASTLLM_TARGET_AVX512 inline int64_t softcap_avx512(float* z, const float* x, int64_t n, float c) {
    const __m512 vc = _mm512_set1_ps(c), vi = _mm512_set1_ps(1.0f / c);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = tail_mask16(n - i);
        _mm512_mask_storeu_ps(z + i, k, _mm512_mul_ps(vc, tanh512(_mm512_mul_ps(_mm512_maskz_loadu_ps(k, x + i), vi))));
    }
    return n;
}

FASTLLM_TARGET_AVX2 inline int64_t softcap_avx2(float* z, const float* x, int64_t n, float c) {
    const __m256 vc = _mm256_set1_ps(c), vi = _mm256_set1_ps(1.0f / c);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(z + i, _mm256_mul_ps(vc, tanh256(_mm256_mul_ps(_mm256_loadu_ps(x + i), vi))));
    return i;
}

inline void softcap_row(float* z, const float* x, int64_t n, float c, Simd simd) {
    int64_t i = simd == Simd::avx512 ? softcap_avx512(z, x, n, c) : simd == Simd::avx2 ? softcap_avx2(z, x, n, c) : 0;
    for (; i < n; i++) z[i] = c * std::tanh(x[i] / c);
}

// ---- GELU, tanh approximation (gelu.cpp, and swiglu.cpp's GeGLU): gelu(x) = 0.5 x (1 + tanh(u)) = x sigmoid(2u),
// u = k (x + c x^3), k = sqrt(2/pi), c = 0.044715, and d(2u)/dx = 2k (1 + 3c x^2). x2 = x^2 capped at 1e4: for
// |x| >= 100 tanh is saturated either way, and the cap keeps x^3 and d(2u)/dx finite up to |x| = FLT_MAX (else
// 0 * inf = NaN in a backward). Scalar, AVX-512 and AVX2 forms of the same three expressions.
inline constexpr float kGeluScale = 0.7978845608028654f, kGeluCubic = 0.044715f, kGeluX2Cap = 1e4f;

inline float gelu_x2(float x) { return std::min(x * x, kGeluX2Cap); }
inline float gelu_2u(float x, float x2) { return x * (2 * kGeluScale + 2 * kGeluScale * kGeluCubic * x2); }
inline float gelu_d2u(float x2) { return 2 * kGeluScale + 6 * kGeluScale * kGeluCubic * x2; }

FASTLLM_TARGET_AVX512 inline __m512 gelu_x2(__m512 x) {
    return _mm512_min_ps(_mm512_mul_ps(x, x), _mm512_set1_ps(kGeluX2Cap));
}
FASTLLM_TARGET_AVX512 inline __m512 gelu_2u(__m512 x, __m512 x2) {
    return _mm512_mul_ps(
        x, _mm512_fmadd_ps(x2, _mm512_set1_ps(2 * kGeluScale * kGeluCubic), _mm512_set1_ps(2 * kGeluScale)));
}
FASTLLM_TARGET_AVX512 inline __m512 gelu_d2u(__m512 x2) {
    return _mm512_fmadd_ps(x2, _mm512_set1_ps(6 * kGeluScale * kGeluCubic), _mm512_set1_ps(2 * kGeluScale));
}

FASTLLM_TARGET_AVX2 inline __m256 gelu_x2(__m256 x) {
    return _mm256_min_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(kGeluX2Cap));
}
FASTLLM_TARGET_AVX2 inline __m256 gelu_2u(__m256 x, __m256 x2) {
    return _mm256_mul_ps(
        x, _mm256_fmadd_ps(x2, _mm256_set1_ps(2 * kGeluScale * kGeluCubic), _mm256_set1_ps(2 * kGeluScale)));
}
FASTLLM_TARGET_AVX2 inline __m256 gelu_d2u(__m256 x2) {
    return _mm256_fmadd_ps(x2, _mm256_set1_ps(6 * kGeluScale * kGeluCubic), _mm256_set1_ps(2 * kGeluScale));
}

}  // namespace fastllm::vec
