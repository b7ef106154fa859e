/*
w8a8 matmul (inference): int8 weights and int8 activations, integer dot products.
  out (N, OC) = sa[n] * sw[o] * sum_k qa[n, k] * q[o, k] + bias[o]
q (OC, C) int8 and sw (OC,) fp32 are the weights quantized once per output row (fastllm.ops.quantize_int8);
qa and sa are each input row quantized at every call (dynamic quantization, what torch's quantize_dynamic and
llama.cpp's Q8 activations do): sa = max|x| / 127, qa = rint(x / sa) in [-127, 127] (a zero row: sa = 0).
The sums are exact int32 (no order, tile or thread count changes them), so a row's outputs depend on that row
alone: a prompt's rows and a decode step's row see the same numbers.

Why by hand: the integer dot product is VPDPBUSD (AVX512-VNNI; Zen 4, Intel Cascade Lake and later): 64
multiply-adds of u8 x s8 into 16 int32 per instruction, twice the products of the bf16 VDPBF16PS and four
times an fp32 FMA's, on a quarter of fp32's weight bytes. It multiplies an unsigned byte by a signed one, so the
activations go in as qa + 128 (1..255) and the sum is corrected by 128 * sum_k q[o, k] (wsum, kept with the
panels): sum (qa + 128) q = sum qa q + 128 wsum. |sum| <= C * 255 * 127 fits int32 for C <= 65536.

Layout (pack_w8a8_panels): the weights in panels of 32 output rows (OC padded with zero rows), each ceil(C/4)
groups of 4 k deep, a group's 32 x 4 bytes contiguous, byte (o, k) of panel p at (g * 32 + j) * 4 + i, o = 32p + j,
k = 4g + i (k >= C zero): one 64-byte load is VPDPBUSD's B operand for 16 outputs, and a row's 4 activation
bytes (one broadcast 32-bit word) its A operand. The micro-kernel holds a tile of MR rows x 32 outputs in 2 * MR
zmm accumulators; threads take whole panels, each streamed once per tile row block. The same panels are AMX-INT8's
B tiles as they lie (16 groups x 16 outputs x 4 bytes, rows 128 bytes apart): where the CPU has AMX-INT8, prompts
(>= 16 rows, C a multiple of 64) run TDPBUSD on 32 x 32 blocks (cpu/amx.h; tested on the tile model, never yet on
the hardware). Kernels by CPU: AMX-INT8 (prompts) + AVX512-VNNI (Sapphire Rapids), AVX512-VNNI (Zen 4, Cascade
Lake), AVX2 VPMADDWD (Zen 3), portable loop.
*/
#include "matmul.h"

#include "cpu/intrin.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <stdexcept>
#include <utility>
#include <vector>

#include "amx.h"
#include "common.h"
#include "gelu.h"
#include "vecmath.h"

namespace fastllm::cpu {

using vec::tail_mask16;
static constexpr int64_t kW8Rows = 32;  // outputs per panel

int64_t w8a8_panel_rows(int64_t OC) { return ceil_div(OC, kW8Rows) * kW8Rows; }
int64_t w8a8_depth(int64_t C) { return ceil_div(C, 4) * 4; }

bool w8a8_vnni() { return simd_setting() >= Simd::avx512 && cpu_features().avx512_vnni; }

// AMX-INT8 where the CPU has it and the tiles were granted (or their C++ model, set_amx_emulation): 32 x 32 blocks of
// TDPBUSD straight from the activations' rows and the panels (their groups of 4 bytes are the B tile's layout).
static bool w8a8_amx_hardware() { return simd_setting() >= Simd::amx && cpu_features().amx_int8; }
const char* w8a8_path() {
    if (amx_emulation()) return "amx (emulated)";
    if (w8a8_amx_hardware()) return "amx";
    return w8a8_vnni() ? "avx512_vnni" : simd_level() >= Simd::avx2 ? "avx2" : "scalar";
}

void pack_w8a8_panels(int8_t* dst, int32_t* wsum, const int8_t* q, int64_t OC, int64_t C) {
    const int64_t G = w8a8_depth(C) / 4, np = ceil_div(OC, kW8Rows);
#pragma omp parallel for schedule(static) if (OC * C >= (1 << 20))
    for (int64_t p = 0; p < np; p++) {
        int8_t* d = dst + p * kW8Rows * G * 4;
        for (int64_t j = 0; j < kW8Rows; j++) {
            const int64_t o = p * kW8Rows + j;
            const int8_t* row = o < OC ? q + o * C : nullptr;
            int32_t s = 0;
            for (int64_t k = 0; k < 4 * G; k++) {
                const int8_t v = row && k < C ? row[k] : 0;
                d[((k / 4) * kW8Rows + j) * 4 + k % 4] = v;
                s += v;
            }
            if (o < OC) wsum[o] = s;
        }
    }
}

// ---- activations: each row to qa + 128 (uint8), padded to the panels' depth with 128 (qa = 0); sa per row, NaN
// where the row holds NaN/Inf (its outputs are then NaN, not garbage).

static float quantize_row(uint8_t* u, const float* x, int64_t C, int64_t depth) {
    float amax = 0.0f;
    for (int64_t k = 0; k < C; k++) amax = std::max(amax, std::fabs(x[k]));  // NaN: max keeps amax, checked below
    bool finite = std::isfinite(amax);
    for (int64_t k = 0; k < C && finite; k++) finite = std::isfinite(x[k]);
    const float sa = amax / 127.0f;
    for (int64_t k = 0; k < depth; k++) {
        float v = k < C && sa > 0.0f && finite ? std::nearbyint(x[k] / sa) : 0.0f;  // nearest even, as numpy rint
        v = std::min(127.0f, std::max(-127.0f, v));
        u[k] = uint8_t(int(v) + 128);
    }
    return finite ? sa : NAN;
}

FASTLLM_TARGET_AVX512 static float quantize_row_avx512(uint8_t* u, const float* x, int64_t C, int64_t depth) {
    __m512 m = _mm512_setzero_ps();
    __mmask16 bad = 0;  // lanes that saw NaN/Inf: x - x is NaN exactly there
    int64_t k = 0;
    for (; k < C; k += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(tail_mask16(C - k), x + k);
        m = _mm512_max_ps(m, _mm512_abs_ps(v));
        bad |= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), _mm512_setzero_ps(), _CMP_UNORD_Q);
    }
    const float amax = _mm512_reduce_max_ps(m), sa = amax / 127.0f;
    if (bad || sa == 0.0f) {
        std::fill(u, u + depth, uint8_t(128));
        return bad ? NAN : 0.0f;
    }
    const __m512 s = _mm512_set1_ps(sa), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
    const __m512i off = _mm512_set1_epi32(128);
    for (k = 0; k < depth; k += 16) {
        const __mmask16 in = tail_mask16(C - k), out = tail_mask16(depth - k);
        __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(in, x + k), s);  // division, as the reference: same bits
        v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
        const __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(v), off);  // nearest even (MXCSR default)
        _mm_mask_storeu_epi8(u + k, out, _mm512_cvtepi32_epi8(q));
    }
    return sa;
}

// ---- micro-kernels: MR rows x one panel (32 outputs), int32 sums, then the fp32 epilogue

template <int MR>
FASTLLM_TARGET_AVX512VNNI static inline void w8a8_epilogue(const __m512i (&acc)[MR][2], const float* sa,
                                                           const float* sw, const int32_t* wsum, const float* bias,
                                                           float* out, int64_t ldo, int64_t n) {
#pragma GCC unroll 2
    for (int h = 0; h < 2; h++) {
        const int64_t o = 16 * h;
        const __mmask16 m = tail_mask16(n - o);
        const __m512i corr = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(m, wsum + o), 7);  // 128 * wsum
        const __m512 w = _mm512_maskz_loadu_ps(m, sw + o),
                     b = bias ? _mm512_maskz_loadu_ps(m, bias + o) : _mm512_setzero_ps();
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++) {
            const __m512 s = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][h], corr));
            const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(s, _mm512_set1_ps(sa[r])), w), b);
            _mm512_mask_storeu_ps(out + r * ldo + o, m, v);
        }
    }
}

// acc + the products of u8 a and s8 b, 4 per lane (VPDPBUSD). In assembly because GCC 12 copies every accumulator
// of the builtin's result to a new register and to the stack on each step (the kernel ran at 40% of peak).
FASTLLM_TARGET_AVX512VNNI static inline __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
#ifdef FASTLLM_SIMDE
    return _mm512_dpbusd_epi32(acc, a, b);
#else
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
#endif
}

template <int MR>
FASTLLM_TARGET_AVX512VNNI static void ukr_w8a8_vnni(int64_t G, const uint8_t* u, int64_t ldu, const int8_t* P,
                                                    const float* sa, const float* sw, const int32_t* wsum,
                                                    const float* bias, float* out, int64_t ldo, int64_t n) {
    __m512i acc[MR][2];
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    const int32_t* a = reinterpret_cast<const int32_t*>(u);  // a row's 4 bytes of a group: one 32-bit word
    const int64_t lda = ldu / 4;
    for (int64_t g = 0; g < G; g++, P += 4 * kW8Rows) {
        const __m512i b0 = _mm512_loadu_si512(P), b1 = _mm512_loadu_si512(P + 64);
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++) {
            const __m512i x = _mm512_set1_epi32(a[r * lda + g]);
            acc[r][0] = dpbusd(acc[r][0], x, b0);
            acc[r][1] = dpbusd(acc[r][1], x, b1);
        }
    }
    w8a8_epilogue<MR>(acc, sa, sw, wsum, bias, out, ldo, n);
}

// The fp32 epilogue of the kernels below: t holds mr rows of n int32 sums (row stride kW8Rows).
static inline void w8a8_finish(const int32_t* t, int mr, int64_t n, const float* sa, const float* sw,
                               const int32_t* wsum, const float* bias, float* out, int64_t ldo) {
    for (int r = 0; r < mr; r++)
        for (int64_t j = 0; j < n; j++)
            out[r * ldo + j] = float(t[r * kW8Rows + j] - 128 * wsum[j]) * sa[r] * sw[j] + (bias ? bias[j] : 0.0f);
}

// AVX2 (no integer dot product of bytes that cannot saturate): the panel's bytes widened to int16 (4 outputs x 4 k
// per register) and VPMADDWD against the row's 4 activations, also widened: each output's sum in two int32 lanes,
// added pairwise once at the end. MR rows x 16 outputs per pass (12 accumulators), both halves of the panel.
// Zen 4 at the avx2 level (fastllm.set_simd), 2 threads, x (N, 768) times 3072 x 768: N = 512 ~180 GOP/s (the
// portable loop 50, fp32 ~165), N = 8 ~165 (fp32 ~88). Widening the rows once per call into int16 measured the same.
template <int MR>
FASTLLM_TARGET_AVX2 static void ukr_w8a8_avx2(int64_t G, const uint8_t* u, int64_t ldu, const int8_t* P,
                                              const float* sa, const float* sw, const int32_t* wsum,
                                              const float* bias, float* out, int64_t ldo, int mr, int64_t n) {
    alignas(32) int32_t t[MR * kW8Rows];
    for (int h = 0; h < 2; h++) {  // outputs 16h .. 16h + 15 of the panel
        __m256i acc[MR][4];
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = acc[r][2] = acc[r][3] = _mm256_setzero_si256();
        const int8_t* p = P + 64 * h;
        for (int64_t g = 0; g < G; g++, p += 4 * kW8Rows) {
            __m256i a[MR];
#pragma GCC unroll 8
            for (int r = 0; r < MR; r++) {  // rows past mr repeat the last (their sums are not stored)
                const int32_t w = *reinterpret_cast<const int32_t*>(u + std::min(r, mr - 1) * ldu + 4 * g);
                a[r] = _mm256_broadcastq_epi64(_mm_cvtepu8_epi16(_mm_cvtsi32_si128(w)));
            }
#pragma GCC unroll 4
            for (int q = 0; q < 4; q++) {
                const __m256i b = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * q)));
#pragma GCC unroll 8
                for (int r = 0; r < MR; r++) acc[r][q] = _mm256_add_epi32(acc[r][q], _mm256_madd_epi16(b, a[r]));
            }
        }
        for (int r = 0; r < mr; r++)
            for (int q = 0; q < 4; q += 2) {  // lanes (2c, 2c+1) of output c: pairwise sums, back in order
                const __m256i s = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][q], acc[r][q + 1]), 0xd8);
                _mm256_store_si256(reinterpret_cast<__m256i*>(t + r * kW8Rows + 16 * h + 4 * q), s);
            }
    }
    w8a8_finish(t, mr, n, sa, sw, wsum, bias, out, ldo);
}

// The portable form (CPUs without AVX2, or a lowered SIMD level): the same panels and the same exact sums.
static void w8a8_portable(int64_t G, const uint8_t* u, int64_t ldu, const int8_t* P, const float* sa,
                          const float* sw, const int32_t* wsum, const float* bias, float* out, int64_t ldo, int mr,
                          int64_t n) {
    int32_t t[kW8Rows];
    for (int r = 0; r < mr; r++) {
        std::fill(t, t + kW8Rows, 0);
        const uint8_t* x = u + r * ldu;
        for (int64_t g = 0; g < G; g++) {
            const int8_t* p = P + g * 4 * kW8Rows;
            for (int j = 0; j < kW8Rows; j++)
                t[j] += x[4 * g] * p[4 * j] + x[4 * g + 1] * p[4 * j + 1] + x[4 * g + 2] * p[4 * j + 2] +
                        x[4 * g + 3] * p[4 * j + 3];
        }
        w8a8_finish(t, 1, n, sa + r, sw, wsum, bias, out + r * ldo, ldo);
    }
}

using W8Ukr = void (*)(int64_t, const uint8_t*, int64_t, const int8_t*, const float*, const float*, const int32_t*,
                       const float*, float*, int64_t, int64_t);
template <int... R>
static constexpr std::array<W8Ukr, sizeof...(R)> vnni_tiles(std::integer_sequence<int, R...>) {
    return {ukr_w8a8_vnni<R + 1>...};
}
// 12 rows: 24 accumulators + 2 panel registers of the 32; fewer rows take the kernel of their own height
static constexpr int kW8MR = 12, kW8MR2 = 3;  // the AVX2 kernel's rows
static const auto kVnniTiles = vnni_tiles(std::make_integer_sequence<int, kW8MR>{});

// From this many rows on, with C a multiple of 64 (whole tiles along k), the w8a8 matmul runs on AMX: rows in blocks
// of 32 (the activations padded with zero rows), threads over panels.
static constexpr int64_t kW8AmxRows = 16;
template <class Tiles>
static void w8a8_amx(int64_t N, int64_t depth, const uint8_t* u, const float* sa, const int8_t* panels, int64_t OC,
                     const float* scale, const int32_t* wsum, const float* bias, float* out, int T) {
    const int64_t np = ceil_div(OC, kW8Rows), kb = depth / 64;
#pragma omp parallel num_threads(T) if (T > 1)
    {
        Tiles::begin();
        alignas(64) int32_t t[32 * kW8Rows];
#pragma omp for schedule(static)
        for (int64_t p = 0; p < np; p++) {
            const int64_t o = p * kW8Rows, n = std::min<int64_t>(kW8Rows, OC - o);
            const char* P = reinterpret_cast<const char*>(panels + p * kW8Rows * depth);
            for (int64_t r = 0; r < N; r += 32) {
                Tiles::block_i8(kb, reinterpret_cast<const char*>(u + r * depth), depth, 64, P, t);
                w8a8_finish(t, int(std::min<int64_t>(32, N - r)), n, sa + r, scale + o, wsum + o,
                            bias ? bias + o : nullptr, out + r * OC + o, OC);
            }
        }
        Tiles::end();
    }
}

void matmul_forward_w8a8(float* out, const float* inp, const int8_t* panels, const float* scale, const int32_t* wsum,
                         const float* bias, float* pre_gelu, int64_t N, int64_t C, int64_t OC) {
    if (N <= 0 || OC <= 0) return;
    if (C > 65536) throw std::invalid_argument("matmul_forward_w8a8: C must be <= 65536 (the int32 sums)");
    const int64_t depth = w8a8_depth(C), G = depth / 4, np = ceil_div(OC, kW8Rows);
    const bool amx = N >= kW8AmxRows && depth % 64 == 0 && (amx_emulation() || w8a8_amx_hardware());
    std::vector<uint8_t> u((size_t)((amx ? ceil_div(N, 32) * 32 : N) * depth), uint8_t(128));  // AMX: whole blocks
    std::vector<float> sa((size_t)N);
    const bool avx512 = simd_level() >= Simd::avx512;
#pragma omp parallel for schedule(static) if (N * C >= (1 << 16))
    for (int64_t n = 0; n < N; n++)
        sa[n] = avx512 ? quantize_row_avx512(&u[n * depth], inp + n * C, C, depth)
                       : quantize_row(&u[n * depth], inp + n * C, C, depth);
    float* prod = pre_gelu ? pre_gelu : out;
    const bool vnni = w8a8_vnni(), avx2 = simd_level() >= Simd::avx2;
    const int T = weight_threads(N, C, OC);
    if (amx) {
        if (amx_emulation()) w8a8_amx<AmxEmu>(N, depth, u.data(), sa.data(), panels, OC, scale, wsum, bias, prod, T);
        else w8a8_amx<AmxTiles>(N, depth, u.data(), sa.data(), panels, OC, scale, wsum, bias, prod, T);
        if (pre_gelu) gelu_forward(out, pre_gelu, N * OC);
        return;
    }
    // rows in blocks that stay in L2 while a thread's panels stream past them
    const int64_t NB = std::max<int64_t>(kW8MR, (int64_t(256) << 10) / depth / kW8MR * kW8MR);
    const int64_t MR = vnni ? kW8MR : avx2 ? kW8MR2 : 1;
    for (int64_t n0 = 0; n0 < N; n0 += NB) {
        const int64_t nb = std::min(NB, N - n0);
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
        for (int64_t p = 0; p < np; p++) {
            const int64_t o = p * kW8Rows, n = std::min<int64_t>(kW8Rows, OC - o);
            const int8_t* P = panels + p * kW8Rows * depth;
            for (int64_t r = n0; r < n0 + nb; r += MR) {
                const int mr = int(std::min<int64_t>(MR, n0 + nb - r));
                const uint8_t* a = &u[r * depth];
                float* y = prod + r * OC + o;
                const float* b = bias ? bias + o : nullptr;
                if (vnni) kVnniTiles[mr - 1](G, a, depth, P, &sa[r], scale + o, wsum + o, b, y, OC, n);
                else if (avx2) ukr_w8a8_avx2<kW8MR2>(G, a, depth, P, &sa[r], scale + o, wsum + o, b, y, OC, mr, n);
                else w8a8_portable(G, a, depth, P, &sa[r], scale + o, wsum + o, b, y, OC, mr, n);
            }
        }
    }
    if (pre_gelu) gelu_forward(out, pre_gelu, N * OC);
}

}  // namespace fastllm::cpu
