/*
The MLP activations of the Llama and Gemma families (the MLP is down(act(x W_gate^T) * (x W_up^T)), Shazeer 2020:
SwiGLU with act = silu (Llama), GeGLU with act = GELU's tanh approximation (Gemma); and down(relu(x W^T)^2) for
ReLU^2, So et al. 2021 (Primer), used by nanochat and modded-nanogpt).
  gated:  gate_up (N, 2H) = [gate | up] per row (one matmul with the fused weight concat([gate_proj, up_proj])
          (2H, C), so the two projections are one GEMM; the halves are HF LlamaMLP's / GemmaMLP's gate_proj and
          up_proj outputs). out (N, H) = act(g) * u.
          Both activations are act(g) = g s, s = sigmoid(z(g)): silu z = g; gelu_tanh z = 2u, u = k (g + c g^3)
          (0.5 (1 + tanh u) = sigmoid(2u), see gelu.cpp). So one kernel serves both:
            backward (accumulates): dg += dout * u * act'(g), du += dout * g s,  act'(g) = s + g s (1 - s) z'(g)
          (silu: z' = 1, act' = s (1 + g (1 - s)); gelu_tanh: z' = 2k (1 + 3c g^2), as gelu.cpp).
  ReLU^2: out = max(x, 0)^2;  dx += 2 max(x, 0) dout  (element-wise, any shape).
Element-wise, O(N*H), memory bound (the gated forward reads 8 bytes and writes 4 per output element). OpenMP over
rows / blocks (serial below 64 Ki elements). sigmoid = 1 / (1 + exp(-z)) with the polynomial exp of vecmath.h
(<= 1 ulp) and a true division: |error| of silu <= ~2 ulp, of gelu_tanh ~2e-7 |g| (gelu.cpp); sigmoid is 0 below
z = -87 and the exp clamps, so g -> -inf gives act -> -0 and g -> +inf gives g, never inf/NaN (NaN propagates).
The GELU argument z and z' come from vecmath.h (gelu_2u, gelu_d2u, with x^2 capped at 1e4, shared with gelu.cpp).
AVX-512 / AVX2 chosen at run time; the naive std::exp loops are the scalar fallback and the spec. ReLU^2 is a
branch-free `omp simd` loop compiled per ISA (like layernorm.cpp).
Perf notes: see benchmarks/bench_swiglu.py (vs torch's F.silu(g) * u, which makes two passes and a temporary).
GeGLU costs the same as SwiGLU (one exp, one division per element; the z polynomial is 3 FMA).
*/
#include "swiglu.h"

#include <algorithm>
#include <cmath>

#include "common.h"
#include "vecmath.h"

namespace fastllm::cpu {

static constexpr int64_t kParallelMin = 65536;  // elements; below: one thread
// below this z, sigmoid(z) < 1e-38 is taken as 0 (the clamped polynomial exp would leave ~4e-39, which times a
// huge |g| is not negligible: silu(-1e30) would be -4e-9 instead of -0)
static constexpr float kSigmoidZero = -87.0f;

// ---------------------------------------------------------------------------------------------------------
// the activations act(g) = g sigmoid(z(g)): z and z' per ISA (float, AVX-512, AVX2)

struct Silu {
    static float z(float g) { return g; }
    static float dz(float) { return 1.0f; }
    FASTLLM_TARGET_AVX512 static __m512 z(__m512 g) { return g; }
    FASTLLM_TARGET_AVX512 static __m512 dz(__m512) { return _mm512_set1_ps(1.0f); }
    FASTLLM_TARGET_AVX2 static __m256 z(__m256 g) { return g; }
    FASTLLM_TARGET_AVX2 static __m256 dz(__m256) { return _mm256_set1_ps(1.0f); }
};

struct GeluTanh {  // z = 2u = 2k (g + c g^3), z' = 2k (1 + 3c g^2), g^2 capped (vecmath.h)
    static float z(float g) { return vec::gelu_2u(g, vec::gelu_x2(g)); }
    static float dz(float g) { return vec::gelu_d2u(vec::gelu_x2(g)); }
    FASTLLM_TARGET_AVX512 static __m512 z(__m512 g) { return vec::gelu_2u(g, vec::gelu_x2(g)); }
    FASTLLM_TARGET_AVX512 static __m512 dz(__m512 g) { return vec::gelu_d2u(vec::gelu_x2(g)); }
    FASTLLM_TARGET_AVX2 static __m256 z(__m256 g) { return vec::gelu_2u(g, vec::gelu_x2(g)); }
    FASTLLM_TARGET_AVX2 static __m256 dz(__m256 g) { return vec::gelu_d2u(vec::gelu_x2(g)); }
};

// ---------------------------------------------------------------------------------------------------------
// naive rows (scalar fallback and spec): g = gate row, u = up row, H elements

static inline float sigmoid(float z) { return z < kSigmoidZero ? 0.0f : 1.0f / (1.0f + std::exp(-z)); }

template <class Act>
static void glu_forward_row_naive(float* o, const float* g, const float* u, int64_t H) {
    for (int64_t i = 0; i < H; i++) o[i] = g[i] * sigmoid(Act::z(g[i])) * u[i];
}

template <class Act>
static void glu_backward_row_naive(float* dg, float* du, const float* dy, const float* g, const float* u,
                                   int64_t H) {
    for (int64_t i = 0; i < H; i++) {
        const float s = sigmoid(Act::z(g[i]));
        dg[i] += dy[i] * u[i] * (s + g[i] * s * (1.0f - s) * Act::dz(g[i]));
        du[i] += dy[i] * g[i] * s;
    }
}

// ---------------------------------------------------------------------------------------------------------
// AVX-512 and AVX2 rows (masked / naive tails)

FASTLLM_TARGET_AVX512 static inline __m512 sigmoid512(__m512 z) {  // 0 below kSigmoidZero
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_set1_ps(kSigmoidZero), _CMP_NLT_UQ), vec::sigmoid512(z));
}
FASTLLM_TARGET_AVX2 static inline __m256 sigmoid256(__m256 z) {
    return _mm256_and_ps(_mm256_cmp_ps(z, _mm256_set1_ps(kSigmoidZero), _CMP_NLT_UQ), vec::sigmoid256(z));
}

template <class Act>
FASTLLM_TARGET_AVX512 static void glu_forward_row_avx512(float* o, const float* g, const float* u, int64_t H) {
    for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 k = vec::tail_mask16(H - i);
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + i);
        const __m512 y = _mm512_mul_ps(_mm512_mul_ps(gv, sigmoid512(Act::z(gv))), _mm512_maskz_loadu_ps(k, u + i));
        _mm512_mask_storeu_ps(o + i, k, y);
    }
}

template <class Act>
FASTLLM_TARGET_AVX512 static void glu_backward_row_avx512(float* dg, float* du, const float* dy, const float* g,
                                                          const float* u, int64_t H) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 k = vec::tail_mask16(H - i);
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + i), uv = _mm512_maskz_loadu_ps(k, u + i);
        const __m512 d = _mm512_maskz_loadu_ps(k, dy + i), s = sigmoid512(Act::z(gv)), gs = _mm512_mul_ps(gv, s);
        const __m512 da = _mm512_fmadd_ps(_mm512_mul_ps(gs, _mm512_sub_ps(one, s)), Act::dz(gv), s);  // act'(g)
        _mm512_mask_storeu_ps(dg + i, k, _mm512_fmadd_ps(_mm512_mul_ps(d, uv), da, _mm512_maskz_loadu_ps(k, dg + i)));
        _mm512_mask_storeu_ps(du + i, k, _mm512_fmadd_ps(d, gs, _mm512_maskz_loadu_ps(k, du + i)));
    }
}

template <class Act>
FASTLLM_TARGET_AVX2 static void glu_forward_row_avx2(float* o, const float* g, const float* u, int64_t H) {
    int64_t i = 0;
    for (; i + 8 <= H; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i);
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_mul_ps(gv, sigmoid256(Act::z(gv))), _mm256_loadu_ps(u + i)));
    }
    if (i < H) glu_forward_row_naive<Act>(o + i, g + i, u + i, H - i);
}

template <class Act>
FASTLLM_TARGET_AVX2 static void glu_backward_row_avx2(float* dg, float* du, const float* dy, const float* g,
                                                      const float* u, int64_t H) {
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= H; i += 8) {
        const __m256 gv = _mm256_loadu_ps(g + i), uv = _mm256_loadu_ps(u + i), d = _mm256_loadu_ps(dy + i);
        const __m256 s = sigmoid256(Act::z(gv)), gs = _mm256_mul_ps(gv, s);
        const __m256 da = _mm256_fmadd_ps(_mm256_mul_ps(gs, _mm256_sub_ps(one, s)), Act::dz(gv), s);
        _mm256_storeu_ps(dg + i, _mm256_fmadd_ps(_mm256_mul_ps(d, uv), da, _mm256_loadu_ps(dg + i)));
        _mm256_storeu_ps(du + i, _mm256_fmadd_ps(d, gs, _mm256_loadu_ps(du + i)));
    }
    if (i < H) glu_backward_row_naive<Act>(dg + i, du + i, dy + i, g + i, u + i, H - i);
}

// ---------------------------------------------------------------------------------------------------------
// entry points: rows over threads

template <class Act>
static void glu_forward(float* out, const float* gate_up, int64_t N, int64_t H) {
    const Simd simd = simd_level();
#pragma omp parallel for schedule(static) if (N * H >= kParallelMin)
    for (int64_t n = 0; n < N; n++) {
        const float *g = gate_up + n * 2 * H, *u = g + H;
        float* o = out + n * H;
        if (simd == Simd::avx512) glu_forward_row_avx512<Act>(o, g, u, H);
        else if (simd == Simd::avx2) glu_forward_row_avx2<Act>(o, g, u, H);
        else glu_forward_row_naive<Act>(o, g, u, H);
    }
}

template <class Act>
static void glu_backward(float* dgate_up, const float* dout, const float* gate_up, int64_t N, int64_t H) {
    const Simd simd = simd_level();
#pragma omp parallel for schedule(static) if (N * H >= kParallelMin)
    for (int64_t n = 0; n < N; n++) {
        const float *g = gate_up + n * 2 * H, *u = g + H, *dy = dout + n * H;
        float *dg = dgate_up + n * 2 * H, *du = dg + H;
        if (simd == Simd::avx512) glu_backward_row_avx512<Act>(dg, du, dy, g, u, H);
        else if (simd == Simd::avx2) glu_backward_row_avx2<Act>(dg, du, dy, g, u, H);
        else glu_backward_row_naive<Act>(dg, du, dy, g, u, H);
    }
}

void swiglu_forward(float* out, const float* gate_up, int64_t N, int64_t H) {
    glu_forward<Silu>(out, gate_up, N, H);
}
void swiglu_backward(float* dgate_up, const float* dout, const float* gate_up, int64_t N, int64_t H) {
    glu_backward<Silu>(dgate_up, dout, gate_up, N, H);
}
void geglu_forward(float* out, const float* gate_up, int64_t N, int64_t H) {
    glu_forward<GeluTanh>(out, gate_up, N, H);
}
void geglu_backward(float* dgate_up, const float* dout, const float* gate_up, int64_t N, int64_t H) {
    glu_backward<GeluTanh>(dgate_up, dout, gate_up, N, H);
}

// ReLU^2 element blocks. max(0, x) as maxps(0, x), which returns x for NaN (maxps(x, 0) would give 0). Intrinsics,
// because GCC turns the scalar form into a branch (x < 0: store 0) that it then does not vectorize for AVX2, and a
// branch on random signs mispredicts half the time (~8x slower).
static void relu2_forward_base(float* out, const float* inp, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float x = inp[i], r = 0.0f > x ? 0.0f : x;
        out[i] = r * r;
    }
}
static void relu2_backward_base(float* dinp, const float* dout, const float* inp, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float x = inp[i], r = 0.0f > x ? 0.0f : x;
        dinp[i] += 2.0f * r * dout[i];
    }
}
FASTLLM_TARGET_AVX512 static void relu2_forward_avx512(float* out, const float* inp, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = vec::tail_mask16(n - i);
        const __m512 r = _mm512_max_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(k, inp + i));
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(r, r));
    }
}
FASTLLM_TARGET_AVX512 static void relu2_backward_avx512(float* dinp, const float* dout, const float* inp, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 k = vec::tail_mask16(n - i);
        const __m512 r = _mm512_max_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(k, inp + i));
        _mm512_mask_storeu_ps(dinp + i, k, _mm512_fmadd_ps(_mm512_add_ps(r, r), _mm512_maskz_loadu_ps(k, dout + i),
                                                           _mm512_maskz_loadu_ps(k, dinp + i)));
    }
}
FASTLLM_TARGET_AVX2 static void relu2_forward_avx2(float* out, const float* inp, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 r = _mm256_max_ps(_mm256_setzero_ps(), _mm256_loadu_ps(inp + i));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(r, r));
    }
    if (i < n) relu2_forward_base(out + i, inp + i, n - i);
}
FASTLLM_TARGET_AVX2 static void relu2_backward_avx2(float* dinp, const float* dout, const float* inp, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 r = _mm256_max_ps(_mm256_setzero_ps(), _mm256_loadu_ps(inp + i));
        _mm256_storeu_ps(dinp + i, _mm256_fmadd_ps(_mm256_add_ps(r, r), _mm256_loadu_ps(dout + i),
                                                   _mm256_loadu_ps(dinp + i)));
    }
    if (i < n) relu2_backward_base(dinp + i, dout + i, inp + i, n - i);
}

void relu2_forward(float* out, const float* inp, int64_t n) {
    const Simd simd = simd_level();
    for_blocks(n, [&](int64_t i0, int64_t m) {
        if (simd == Simd::avx512) relu2_forward_avx512(out + i0, inp + i0, m);
        else if (simd == Simd::avx2) relu2_forward_avx2(out + i0, inp + i0, m);
        else relu2_forward_base(out + i0, inp + i0, m);
    });
}

void relu2_backward(float* dinp, const float* dout, const float* inp, int64_t n) {
    const Simd simd = simd_level();
    for_blocks(n, [&](int64_t i0, int64_t m) {
        if (simd == Simd::avx512) relu2_backward_avx512(dinp + i0, dout + i0, inp + i0, m);
        else if (simd == Simd::avx2) relu2_backward_avx2(dinp + i0, dout + i0, inp + i0, m);
        else relu2_backward_base(dinp + i0, dout + i0, inp + i0, m);
    });
}

}  // namespace fastllm::cpu
