/*
GELU, tanh approximation (GPT-2): y = 0.5 x (1 + tanh(u)), u = k (x + 0.044715 x^3), k = sqrt(2/pi).
Element-wise, O(n), memory bound; OpenMP over blocks of elements (serial below 64 Ki elements,
where a parallel region costs more than it saves).

Vectorized form: 0.5 (1 + tanh(u)) = sigmoid(2u) =: s, so y = x s and
  dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) u' = s + 2 x s (1 - s) k (1 + 3 * 0.044715 x^2)
(using 1 - tanh^2 = 4 s (1 - s)). sigmoid = 1 / (1 + exp(-2u)) with the polynomial exp of vecmath.h and a true
division; saturates cleanly (exp clamps, so s is exactly 0 or 1 for |u| > ~44, no inf/NaN). Absolute error of s
<= ~2e-7, so |y - y_ref| <= ~2e-7 |x| (tanh near 0 is not computed with relative accuracy, which GELU does
not need). AVX-512 / AVX2 chosen at run time; the naive std::tanh loop is the scalar fallback and the spec.
Perf notes (1 thread, load ~4.4 on 2 cores): 25 Mi elements gelu fwd 9.9 ms (20 GB/s) vs torch (Sleef tanh)
42 ms, bwd 17 ms vs 122 ms.
*/
#include "gelu.h"

#include <algorithm>
#include <cmath>

#include "common.h"
#include "vecmath.h"

namespace fastllm::cpu {

// k = sqrt(2/pi), c = 0.044715 and x^2 capped at 1e4 inside u and u' (vecmath.h, shared with swiglu.cpp's GeGLU)
using vec::kGeluCubic, vec::kGeluScale, vec::gelu_x2, vec::gelu_2u, vec::gelu_d2u;

// ---------------------------------------------------------------------------------------------------------
// naive (scalar fallback and spec)

static void gelu_forward_naive(float* out, const float* inp, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float x = inp[i], x2 = gelu_x2(x);
        out[i] = 0.5f * x * (1.0f + std::tanh(kGeluScale * x * (1.0f + kGeluCubic * x2)));
    }
}

static void gelu_backward_naive(float* dinp, const float* inp, const float* dout, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float x = inp[i], x2 = gelu_x2(x);
        const float u = kGeluScale * x * (1.0f + kGeluCubic * x2);
        const float th = std::tanh(u);
        const float sech2 = 1.0f - th * th;
        const float grad = 0.5f * (1.0f + th) + 0.5f * x * sech2 * kGeluScale * (1.0f + 3.0f * kGeluCubic * x2);
        dinp[i] += grad * dout[i];
    }
}

// ---------------------------------------------------------------------------------------------------------
// AVX-512

FASTLLM_TARGET_AVX512 static void gelu_forward_avx512(float* out, const float* inp, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = vec::tail_mask16(n - i);
        const __m512 x = _mm512_maskz_loadu_ps(k, inp + i);
        const __m512 x2 = gelu_x2(x);
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(x, vec::sigmoid512(gelu_2u(x, x2))));
    }
}

FASTLLM_TARGET_AVX512 static void gelu_backward_avx512(float* dinp, const float* inp, const float* dout, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = vec::tail_mask16(n - i);
        const __m512 x = _mm512_maskz_loadu_ps(k, inp + i);
        const __m512 x2 = gelu_x2(x);
        const __m512 s = vec::sigmoid512(gelu_2u(x, x2));
        const __m512 du2 = gelu_d2u(x2);  // d(2u)/dx = 2k (1 + 3c x^2)
        const __m512 grad = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(x, s), _mm512_sub_ps(one, s)), du2, s);
        const __m512 d = _mm512_maskz_loadu_ps(k, dinp + i);
        _mm512_mask_storeu_ps(dinp + i, k, _mm512_fmadd_ps(grad, _mm512_maskz_loadu_ps(k, dout + i), d));
    }
}

// ---------------------------------------------------------------------------------------------------------
// AVX2 + FMA

FASTLLM_TARGET_AVX2 static void gelu_forward_avx2(float* out, const float* inp, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(inp + i);
        const __m256 x2 = gelu_x2(x);
        _mm256_storeu_ps(out + i, _mm256_mul_ps(x, vec::sigmoid256(gelu_2u(x, x2))));
    }
    if (i < n) gelu_forward_naive(out + i, inp + i, n - i);
}

FASTLLM_TARGET_AVX2 static void gelu_backward_avx2(float* dinp, const float* inp, const float* dout, int64_t n) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_loadu_ps(inp + i);
        const __m256 x2 = gelu_x2(x);
        const __m256 s = vec::sigmoid256(gelu_2u(x, x2));
        const __m256 du2 = gelu_d2u(x2);
        const __m256 grad = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(x, s), _mm256_sub_ps(one, s)), du2, s);
        _mm256_storeu_ps(dinp + i, _mm256_fmadd_ps(grad, _mm256_loadu_ps(dout + i), _mm256_loadu_ps(dinp + i)));
    }
    if (i < n) gelu_backward_naive(dinp + i, inp + i, dout + i, n - i);
}

// ---------------------------------------------------------------------------------------------------------
// entry points: blocks of elements over threads (for_blocks, common.h)

void gelu_forward(float* out, const float* inp, int64_t n) {
    const Simd simd = simd_level();
    for_blocks(n, [&](int64_t i0, int64_t m) {
        if (simd == Simd::avx512) gelu_forward_avx512(out + i0, inp + i0, m);
        else if (simd == Simd::avx2) gelu_forward_avx2(out + i0, inp + i0, m);
        else gelu_forward_naive(out + i0, inp + i0, m);
    });
}

void gelu_backward(float* dinp, const float* dout, const float* inp, int64_t n) {
    const Simd simd = simd_level();
    for_blocks(n, [&](int64_t i0, int64_t m) {
        if (simd == Simd::avx512) gelu_backward_avx512(dinp + i0, inp + i0, dout + i0, m);
        else if (simd == Simd::avx2) gelu_backward_avx2(dinp + i0, inp + i0, dout + i0, m);
        else gelu_backward_naive(dinp + i0, inp + i0, dout + i0, m);
    });
}

}  // namespace fastllm::cpu
