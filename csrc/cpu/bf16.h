// float32 -> bf16 in AVX-512 registers, shared by the bf16 GEMM's packers (matmul.cpp) and bf16 attention
// (attention.cpp). Round to nearest even in integer lanes, the same bits as the scalar bf16_bits in matmul.cpp: a
// NaN stays a (quiet) NaN, overflow rounds to inf, denormals are kept.
#pragma once
#include "cpu/intrin.h"

#include <cstdint>

#include "common.h"

namespace fastllm::cpu {

// Each lane's bf16 in its high half (the low half is rounding debris: shift it out or mask it off).
FASTLLM_TARGET_AVX512 static inline __m512i bf16_round16_avx512(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                           _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                            _mm512_set1_epi32(1))));
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));  // quiet NaN
}

// Pair words of two vectors: word i = bf16(lo[i]) | bf16(hi[i]) << 16 (VDPBF16PS's operand: the even k in the low
// half), without shuffles.
FASTLLM_TARGET_AVX512 static inline __m512 bf16_pairs_avx512(__m512 lo, __m512 hi) {
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_srli_epi32(bf16_round16_avx512(lo), 16),
                                               _mm512_and_si512(bf16_round16_avx512(hi),
                                                                _mm512_set1_epi32(int32_t(0xffff0000u)))));
}

// 32 consecutive values (a = x[0..15], b = x[16..31]) -> 32 bf16 in order, i.e. the 16 pair words of (x[2i], x[2i+1]).
FASTLLM_TARGET_AVX512 static inline __m512i bf16_row32_avx512(__m512 a, __m512 b) {
    const __m512i lo = _mm512_srli_epi32(bf16_round16_avx512(a), 16), hi = _mm512_srli_epi32(bf16_round16_avx512(b), 16);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(lo)), _mm512_cvtepi32_epi16(hi), 1);
}

}  // namespace fastllm::cpu
