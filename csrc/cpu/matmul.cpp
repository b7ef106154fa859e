/*
Matmul: out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias.  2*N*C*OC flops forward, twice that backward.
Backward accumulates: dinp += dout @ weight, dweight += dout^T @ inp, dbias += column sums of dout.

All three products run on one general fp32 GEMM (gemm/gemm_ex below, also used by other kernels), a
BLIS/GotoBLAS-style blocked algorithm on row-major data:
  for jc over N by NC:                        B block (KC x NC) packed into NR-wide panels, lives in L2/L3
    for pc over K by KC:
      pack op(B)[pc:pc+KC, jc:jc+NC]
      for ic over M by MC:                    A block (MC x KC) packed into MR-tall panels, lives in L2
        pack op(A)[ic:ic+MC, pc:pc+KC]
        for jr over NC by NR:                 one B micro-panel (KC x NR) reused by every A micro-panel
          for ir over MC by MR:  C[MR x NR] (+)= micro-kernel(A panel, B panel)   (accumulators in registers)
Packing turns every layout (transposed or not) into unit-stride streams and zero-pads edges to full tiles, so
the micro-kernel has a single form; edge tiles are computed into a small buffer and merged. The epilogue fuses
alpha, beta (0: C never read) and an optional per-column bias.
Micro-kernels (chosen at run time by fastllm::simd_level()):
  avx512: MR x 32 (2 zmm per row, MR broadcasts per k, 2*MR FMA accumulators);
  avx2:   6 x 16 (12 ymm accumulators);  scalar: 4 x 16 plain C++ (the compiler uses SSE2).
Threads: the output is cut into a tm x tn grid of tile-aligned rectangles (tm*tn = threads, chosen for the
most even split, then least re-packing); big outputs get up to 4 equal chunks per thread along the split
dimension (chunks >= ~1000 rows/columns, so re-packing stays ~1%), handed out with schedule(dynamic), so a
core shared with another process does not stall the rest. Each chunk runs the blocked algorithm with
thread-local, 64-byte aligned packing buffers (allocated once, grown on demand). Called inside a parallel
region, gemm runs on the calling thread only. M <= 32 rows times a transposed B (forward on a few tokens) skips
packing: dot products of contiguous rows in groups of <= 8, threads over columns, each B row read from DRAM once.
Target machine: AMD EPYC Zen 4 (L1d 32 KiB, L2 1 MiB per core, L3 32 MiB shared; AVX-512 executes as
2x256-bit: 1 zmm FMA/cycle/core, latency 4; measured FMA peak 116 GFLOP/s/core at ~3.6 GHz).
Perf notes (GPT-2 shapes, fp32, single thread, CPU time; see benchmarks/bench_matmul.py for torch ratios):
  - micro-kernel 14x32 (28 zmm accumulators, no spills): ~107 GFLOP/s = 92% of FMA peak; 6x64 and 12x32
    measured the same within noise, 8x48 slightly worse. AVX2 6x16: ~97 GFLOP/s. Scalar 4x16: ~9.
  - KC 256 -> 768 (= C for GPT-2, so C is read/written once per tile) and MC 336 -> 112 (A block 344 KiB
    in L2): +5%. Prefetching the C tile at micro-kernel start: +2% (hides the C miss per tile).
  - packing was 8% of the time with scalar transposes; AVX-512 16x16 register transposes cut it to ~3%.
The naive triple loops (matmul_*_naive, gemm_naive) stay as documentation and as the C++ oracle.
*/
#include "matmul.h"

#include "cpu/intrin.h"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "amx.h"
#include "common.h"
#include "gelu.h"
#include "vecmath.h"

namespace fastllm::cpu {

// ---------------------------------------------------------------------------------------------------------
// naive reference versions

void matmul_forward_naive(float* out, const float* inp, const float* weight, const float* bias,
                          int64_t N, int64_t C, int64_t OC) {
#pragma omp parallel for
    for (int64_t n = 0; n < N; n++) {
        const float* x = inp + n * C;
        for (int64_t o = 0; o < OC; o++) {
            const float* w = weight + o * C;
            float acc = bias ? bias[o] : 0.0f;
            for (int64_t c = 0; c < C; c++) acc += x[c] * w[c];
            out[n * OC + o] = acc;
        }
    }
}

void matmul_backward_naive(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                           const float* weight, int64_t N, int64_t C, int64_t OC) {
    if (dinp) {
#pragma omp parallel for
        for (int64_t n = 0; n < N; n++)
            for (int64_t o = 0; o < OC; o++) {
                const float d = dout[n * OC + o];
                for (int64_t c = 0; c < C; c++) dinp[n * C + c] += d * weight[o * C + c];
            }
    }
    if (dweight || dbias) {
#pragma omp parallel for
        for (int64_t o = 0; o < OC; o++)
            for (int64_t n = 0; n < N; n++) {
                const float d = dout[n * OC + o];
                if (dweight)
                    for (int64_t c = 0; c < C; c++) dweight[o * C + c] += d * inp[n * C + c];
                if (dbias) dbias[o] += d;
            }
    }
}

void gemm_naive(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* Cmat, int64_t ldc) {
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++)
                acc += (transA ? A[k * lda + i] : A[i * lda + k]) * (transB ? B[j * ldb + k] : B[k * ldb + j]);
            float* c = Cmat + i * ldc + j;
            *c = alpha * acc + (beta == 0.0f ? 0.0f : beta * *c);
        }
}

// ---------------------------------------------------------------------------------------------------------
// packing

// bf16 precision (Prec::bf16): the nearest bf16 (ties to even) as bit patterns, and as the float it stands for.
// NaN stays a quiet NaN; overflow rounds to inf, as float_to_bf16.
static inline uint32_t bf16_bits(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}
static inline float round_bf16(float x) { return bf16_to_float(uint16_t(bf16_bits(x))); }

// Packs `rows` logical rows r (a row = one M index of op(A), or one N index of op(B)) times kc values of k into
// panels of W rows: dst[p*kc*W + k*W + w] = X(p*W + w, k), zero for rows past `rows`.
// X(r, k) = src[r*ld + k] if k_contig (row-major along k), else src[k*ld + r]. Round: each value rounded to bf16
// (kept as fp32: the fp32 micro-kernels then multiply bf16 numbers exactly and sum in fp32).
template <int W, bool Round = false>
static void pack_panels(const float* src, int64_t ld, bool k_contig, int64_t rows, int64_t kc, float* dst) {
    auto val = [](float x) { return Round ? round_bf16(x) : x; };
    for (int64_t r0 = 0; r0 < rows; r0 += W, dst += kc * W) {
        const int64_t w = std::min<int64_t>(W, rows - r0);
        if (k_contig) {
            // a transpose: read W rows along k, write columns of the panel
            for (int64_t r = 0; r < w; r++) {
                const float* s = src + (r0 + r) * ld;
                for (int64_t k = 0; k < kc; k++) dst[k * W + r] = val(s[k]);
            }
            for (int64_t r = w; r < W; r++)
                for (int64_t k = 0; k < kc; k++) dst[k * W + r] = 0.0f;
        } else {
            for (int64_t k = 0; k < kc; k++) {
                const float* s = src + k * ld + r0;
                float* d = dst + k * W;
                for (int64_t r = 0; r < w; r++) d[r] = val(s[r]);
                for (int64_t r = w; r < W; r++) d[r] = 0.0f;
            }
        }
    }
}

// float32 -> bf16 bits, 16 at a time on AVX2 (the same rounding as bf16_bits: the NaN test, the tie-to-even add and
// the shift in 8 int32 lanes, then packed to 16-bit; packus works within 128-bit halves, the permute restores the
// order). Used by float_to_bf16 and the bf16 packers.
FASTLLM_TARGET_AVX2 static inline __m256i bf16_bits8_avx2(const float* p) {
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    const __m256i hi = _mm256_srli_epi32(u, 16);
    const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1)));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    return _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
}
FASTLLM_TARGET_AVX2 static void float_to_bf16_avx2(uint16_t* dst, const float* src, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m256i p = _mm256_packus_epi32(bf16_bits8_avx2(src + i), bf16_bits8_avx2(src + i + 8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permute4x64_epi64(p, 0xD8));
    }
    for (; i < n; i++) dst[i] = uint16_t(bf16_bits(src[i]));
}

void float_to_bf16(uint16_t* dst, const float* src, int64_t n) {
    if (simd_level() >= Simd::avx2) return float_to_bf16_avx2(dst, src, n);
    for (int64_t i = 0; i < n; i++) dst[i] = uint16_t(bf16_bits(src[i]));
}

// Packs into the bf16 pair layouts of the bf16 dot-product instructions: each 32-bit word holds X(r, 2q) (low half)
// and X(r, 2q+1) (high half) rounded to bf16, kq = ceil(kc / 2) pairs rounded up to a multiple of QPAD, zeros past
// `rows` and past kc (an odd kc's last pair), so a panel of W rows is W * kq words, half the bytes of fp32's.
//   VNNI (TileRows false; VDPBF16PS, and AMX's B tiles with QPAD 16): pair-major, word (r, q) at q*W + r;
//   AMX A tiles (TileRows true, QPAD 16): a tile row is 16 consecutive pairs of one row, so per block of 16 pairs
//   the W rows one after the other: word (r, q) at ((q / 16) * W + r) * 16 + q % 16.
// The rounding runs vectorized (float_to_bf16) over a row of k (k_contig) or over the W rows of one k; the words
// are then placed one by one.
template <int W, int QPAD, bool TileRows>
static void pack_panels_bf16(const float* src, int64_t ld, bool k_contig, int64_t rows, int64_t kc, float* dst) {
    const int64_t kq = ((kc + 1) / 2 + QPAD - 1) / QPAD * QPAD;
    auto at = [](int64_t r, int64_t q) { return TileRows ? ((q / 16) * W + r) * 16 + q % 16 : q * W + r; };
    static thread_local std::vector<uint32_t> row;  // k_contig: one row's kq words
    row.assign(size_t(kq), 0u);
    uint16_t* row16 = reinterpret_cast<uint16_t*>(row.data());
    uint32_t* d = reinterpret_cast<uint32_t*>(dst);
    for (int64_t r0 = 0; r0 < rows; r0 += W, d += kq * W) {
        const int64_t w = std::min<int64_t>(W, rows - r0);
        if (k_contig) {
            for (int64_t r = 0; r < W; r++) {
                if (r < w) float_to_bf16(row16, src + (r0 + r) * ld, kc);  // row16[kc..] stay zero
                else std::fill(row.begin(), row.end(), 0u);
                for (int64_t q = 0; q < kq; q++) d[at(r, q)] = row[q];
            }
        } else {
            uint16_t lo[W] = {}, hi[W] = {};
            for (int64_t q = 0; q < kq; q++) {
                const int64_t k = 2 * q;
                if (k < kc) float_to_bf16(lo, src + k * ld + r0, w);
                else std::fill(lo, lo + W, uint16_t(0));
                if (k + 1 < kc) float_to_bf16(hi, src + (k + 1) * ld + r0, w);
                else std::fill(hi, hi + W, uint16_t(0));
                for (int64_t r = 0; r < W; r++) d[at(r, q)] = r < w ? uint32_t(lo[r]) | (uint32_t(hi[r]) << 16) : 0u;
            }
        }
    }
}
// In-place 16 x 16 transpose of 32-bit elements: v[i] lane j -> v[j] lane i (unpack pairs, 4x4 within 128-bit
// lanes, then the lanes). The packers' way of turning 16 rows along k into 16 panel rows along r.
FASTLLM_TARGET_AVX512 static inline void transpose16x16_avx512(__m512 v[16]) {
    __m512 t[16];
#pragma GCC unroll 8
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_ps(v[i], v[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(v[i], v[i + 1]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 16; i += 4) {
        v[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        v[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        v[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        v[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(v[i], v[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_f32x4(v[i], v[i + 4], 0xDD);
        t[i + 8] = _mm512_shuffle_f32x4(v[i + 8], v[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_f32x4(v[i + 8], v[i + 12], 0xDD);
    }
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) {
        v[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
        v[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    }
}

// AVX-512 transposing pack for the k-contiguous case (any W): 16 rows x 16 k at a time through a register
// transpose; rows past the panel / matrix edge are zeros, a W not a multiple of 16 ends with masked stores.
template <int W>
FASTLLM_TARGET_AVX512 static void pack_panels_kc_avx512(const float* src, int64_t ld, int64_t rows, int64_t kc,
                                                        float* dst) {
    for (int64_t r0 = 0; r0 < rows; r0 += W, dst += kc * W) {
        const int64_t w = std::min<int64_t>(W, rows - r0);
        for (int64_t k0 = 0; k0 < kc; k0 += 16) {
            const int64_t kk = std::min<int64_t>(16, kc - k0);
            const __mmask16 km = (__mmask16)((1u << kk) - 1u);
#pragma GCC unroll 4
            for (int rb = 0; rb < W; rb += 16) {
                __m512 v[16];
#pragma GCC unroll 16
                for (int r = 0; r < 16; r++)
                    v[r] = (rb + r < w) ? _mm512_maskz_loadu_ps(km, src + (r0 + rb + r) * ld + k0)
                                        : _mm512_setzero_ps();
                transpose16x16_avx512(v);  // v[k] = the 16 rows at k0 + k
                float* d = dst + k0 * W + rb;
                if (W - rb >= 16) {
                    for (int k = 0; k < kk; k++) _mm512_storeu_ps(d + k * W, v[k]);
                } else {
                    const __mmask16 rm = (__mmask16)((1u << (W - rb)) - 1u);
                    for (int k = 0; k < kk; k++) _mm512_mask_storeu_ps(d + k * W, rm, v[k]);
                }
            }
        }
    }
}

// AVX-512 pack for the row-contiguous case (W <= 16 or a multiple of 16): masked row copies.
template <int W>
FASTLLM_TARGET_AVX512 static void pack_panels_rc_avx512(const float* src, int64_t ld, int64_t rows, int64_t kc,
                                                        float* dst) {
    for (int64_t r0 = 0; r0 < rows; r0 += W, dst += kc * W) {
        const int64_t w = std::min<int64_t>(W, rows - r0);
        for (int64_t k = 0; k < kc; k++) {
            const float* s = src + k * ld + r0;
            float* d = dst + k * W;
#pragma GCC unroll 4
            for (int rb = 0; rb < W; rb += 16) {
                const int64_t n = std::min<int64_t>(16, std::max<int64_t>(0, w - rb));
                const __m512 x = _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), s + rb);
                if (W - rb >= 16) _mm512_storeu_ps(d + rb, x);
                else _mm512_mask_storeu_ps(d + rb, (__mmask16)((1u << (W - rb)) - 1u), x);
            }
        }
    }
}

// The AVX-512 form of pack_panels_bf16 (same layouts, same rounding, bit for bit), 16 rows x 16 pairs at a time.
// A pair word comes from two fp32 vectors: bf16_round16 leaves each lane's bf16 in its high half (bf16_bits before
// the shift), so word = (round(X(., 2q)) >> 16) | (round(X(., 2q+1)) & 0xffff0000) -- no shuffles. Row-contiguous
// sources (X(r, k) = src[k*ld + r]) then give, per pair, the words of 16 rows in one vector: the VNNI layout's
// order; k-contiguous ones give, per row, 16 pairs from 32 consecutive values (narrowed by vpmovdw): the AMX A
// layout's order. Where the order is the other one, a 16 x 16 transpose. Rows past `rows` and pairs past kc are
// zeros (masked loads); the scalar packer had ~3 ns per value, a third of a bf16 GEMM's time at K = 384.
using vec::tail_mask16;
FASTLLM_TARGET_AVX512 static inline __m512i bf16_round16_avx512(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff),
                                                           _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                            _mm512_set1_epi32(1))));
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    return _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));  // quiet NaN
}
FASTLLM_TARGET_AVX512 static inline __m512 bf16_pairs_avx512(__m512 lo, __m512 hi) {
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_srli_epi32(bf16_round16_avx512(lo), 16),
                                               _mm512_and_si512(bf16_round16_avx512(hi),
                                                                _mm512_set1_epi32(int32_t(0xffff0000u)))));
}
// Where the CPU has AVX512_BF16, VCVTNE2PS2BF16 makes the words in one instruction (vec::bf16_pairs512; packing
// went from 12.2% to 10.1% of a 6L-384 bf16 training step, Zen 4): the same rounding, except that denormal inputs
// become zeros -- which the VDPBF16PS / TDPBF16PS reading these panels make of them anyway, so the products are bit
// for bit those of the integer rounding. A block of 16 vectors per call (CvtNe's target differs, so its calls are
// not inlined into the AVX-512 packer).
//   rows(v, s, ld, n, m0, m1): v[r] = the 16 pairs of row r < n from 32 values at s + r * ld (mask m0, m1)
//   cols(v, s, ld, kc, m):     v[q] = the words of 16 values of rows 2q, 2q+1 < kc at s + 2q * ld (mask m)
struct CvtRound {
    FASTLLM_TARGET_AVX512 static void rows(__m512* v, const float* s, int64_t ld, int n, __mmask16 m0,
                                           __mmask16 m1) {
#pragma GCC unroll 16
        for (int r = 0; r < 16; r++) {
            if (r >= n) { v[r] = _mm512_setzero_ps(); continue; }
            const __m512i a = _mm512_srli_epi32(bf16_round16_avx512(_mm512_maskz_loadu_ps(m0, s + r * ld)), 16);
            const __m512i b = _mm512_srli_epi32(bf16_round16_avx512(_mm512_maskz_loadu_ps(m1, s + r * ld + 16)), 16);
            v[r] = _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(a)),
                                                          _mm512_cvtepi32_epi16(b), 1));
        }
    }
    FASTLLM_TARGET_AVX512 static void cols(__m512* v, const float* s, int64_t ld, int64_t kc, __mmask16 m) {
#pragma GCC unroll 16
        for (int q = 0; q < 16; q++) {
            const __m512 lo = 2 * q < kc ? _mm512_maskz_loadu_ps(m, s + 2 * q * ld) : _mm512_setzero_ps();
            const __m512 hi = 2 * q + 1 < kc ? _mm512_maskz_loadu_ps(m, s + (2 * q + 1) * ld) : _mm512_setzero_ps();
            v[q] = bf16_pairs_avx512(lo, hi);
        }
    }
};
struct CvtNe {
    FASTLLM_TARGET_AVX512BF16 static void rows(__m512* v, const float* s, int64_t ld, int n, __mmask16 m0,
                                               __mmask16 m1) {
#pragma GCC unroll 16
        for (int r = 0; r < 16; r++)
            v[r] = r < n ? (__m512)_mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(m1, s + r * ld + 16),
                                                       _mm512_maskz_loadu_ps(m0, s + r * ld))
                         : _mm512_setzero_ps();
    }
    FASTLLM_TARGET_AVX512BF16 static void cols(__m512* v, const float* s, int64_t ld, int64_t kc, __mmask16 m) {
#pragma GCC unroll 16
        for (int q = 0; q < 16; q++) {
            const __m512 lo = 2 * q < kc ? _mm512_maskz_loadu_ps(m, s + 2 * q * ld) : _mm512_setzero_ps();
            const __m512 hi = 2 * q + 1 < kc ? _mm512_maskz_loadu_ps(m, s + (2 * q + 1) * ld) : _mm512_setzero_ps();
            v[q] = (__m512)vec::bf16_pairs512(lo, hi);
        }
    }
};
template <int W, int QPAD, bool TileRows, class Cvt>
FASTLLM_TARGET_AVX512 static void pack_panels_bf16_avx512(const float* src, int64_t ld, bool k_contig, int64_t rows,
                                                          int64_t kc, float* dst) {
    const int64_t kq = ((kc + 1) / 2 + QPAD - 1) / QPAD * QPAD;
    auto block = [&](int64_t r0, int64_t q0) FASTLLM_TARGET_AVX512 {  // panel r0 / W, pairs q0 .. q0 + 15
        float* panel = dst + r0 / W * kq * W;
        const int64_t w = std::min<int64_t>(W, rows - r0);
        const int64_t nq = std::min<int64_t>(16, kq - q0), k0 = 2 * q0;
        for (int rb = 0; rb < W; rb += 16) {
            const int nr = std::min(16, W - rb);  // panel rows in this block (rows past w are zeros)
            __m512 v[16];
            if (k_contig) Cvt::rows(v, src + (r0 + rb) * ld + k0, ld, int(std::min<int64_t>(16, w - rb)),
                                    tail_mask16(kc - k0), tail_mask16(kc - k0 - 16));  // v[r]: row rb + r
            else Cvt::cols(v, src + k0 * ld + r0 + rb, ld, kc - k0, tail_mask16(w - rb));  // v[q]: pair q0 + q
            if (k_contig != TileRows) transpose16x16_avx512(v);
            if (TileRows) {  // word (r, q) at ((q / 16) * W + r) * 16 + q % 16; nq is 16 (QPAD 16)
                for (int r = 0; r < nr; r++) _mm512_storeu_ps(panel + ((q0 / 16) * W + rb + r) * 16, v[r]);
            } else {         // word (r, q) at q * W + r
                for (int q = 0; q < nq; q++) {
                    float* d = panel + (q0 + q) * W + rb;
                    if (nr == 16) _mm512_storeu_ps(d, v[q]);
                    else _mm512_mask_storeu_ps(d, tail_mask16(nr), v[q]);
                }
            }
        }
    };
    // k-contiguous rows are read one panel at a time (W streams along k); row-contiguous sources 32 values of k at
    // a time across all the panels, so each source row is read once, whole (panel by panel, a transposed A of a
    // weight gradient -- 1536 values of k, rows 6 KB apart -- was read 8 times over from L2: 40% slower).
    if (k_contig) {
        for (int64_t r0 = 0; r0 < rows; r0 += W)
            for (int64_t q0 = 0; q0 < kq; q0 += 16) block(r0, q0);
    } else {
        for (int64_t q0 = 0; q0 < kq; q0 += 16)
            for (int64_t r0 = 0; r0 < rows; r0 += W) block(r0, q0);
    }
}
template <int W, int QPAD = 1, bool TileRows = false>  // TileRows: AMX's A layout (pack_panels_amx_a)
static void pack_panels_vnni(const float* src, int64_t ld, bool k_contig, int64_t rows, int64_t kc, float* dst) {
    if (simd_setting() >= Simd::avx512_bf16)
        pack_panels_bf16_avx512<W, QPAD, TileRows, CvtNe>(src, ld, k_contig, rows, kc, dst);
    else if (simd_level() >= Simd::avx512)
        pack_panels_bf16_avx512<W, QPAD, TileRows, CvtRound>(src, ld, k_contig, rows, kc, dst);
    else pack_panels_bf16<W, QPAD, TileRows>(src, ld, k_contig, rows, kc, dst);
}
template <int W>
constexpr auto pack_panels_amx_a = pack_panels_vnni<W, 16, true>;

// ---------------------------------------------------------------------------------------------------------
// micro-kernels: C[0:MR, 0:NR] = alpha * sum_k pa[k*MR + i] * pb[k*NR + j] + beta * C + bias[j]
// (pa, pb: packed panels, 64-byte aligned; C: row stride ldc; beta == 0: C not read; bias may be null)

using MicroKernel = void (*)(int64_t kc, const float* pa, const float* pb, float* c, int64_t ldc, float alpha,
                             float beta, const float* bias);

// The prologue of the AVX-512 micro-kernels: zero accumulators; the C tile rows are touched only after the k loop,
// so start fetching them now (hides an L3/DRAM miss per row per K block).
template <int MR, int NV>
FASTLLM_TARGET_AVX512 __attribute__((always_inline)) static inline void start_tile_avx512(__m512 (&acc)[MR][NV],
                                                                                          const float* c, int64_t ldc) {
#pragma GCC unroll 32
    for (int i = 0; i < MR; i++) {
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) acc[i][v] = _mm512_setzero_ps();
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 16 * NV - 1), _MM_HINT_T0);
    }
}

// The epilogue of the AVX-512 micro-kernels: C = alpha * acc + beta * C + bias (beta == 0: C not read).
template <int MR, int NV>
FASTLLM_TARGET_AVX512 __attribute__((always_inline)) static inline void store_tile_avx512(
    const __m512 (&acc)[MR][NV], float* c, int64_t ldc, float alpha, float beta, const float* bias) {
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    __m512 vbias[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; v++) vbias[v] = bias ? _mm512_loadu_ps(bias + 16 * v) : _mm512_setzero_ps();
    if (beta == 0.0f) {
#pragma GCC unroll 32
        for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) _mm512_storeu_ps(c + i * ldc + 16 * v, _mm512_fmadd_ps(acc[i][v], va, vbias[v]));
    } else {
#pragma GCC unroll 32
        for (int i = 0; i < MR; i++)
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) {
                float* ci = c + i * ldc + 16 * v;
                _mm512_storeu_ps(ci, _mm512_fmadd_ps(acc[i][v], va, _mm512_fmadd_ps(_mm512_loadu_ps(ci), vb, vbias[v])));
            }
    }
}

template <int MR, int NV>  // NR = 16 * NV columns
FASTLLM_TARGET_AVX512 static void ukr_avx512(int64_t kc, const float* __restrict__ pa,
                                             const float* __restrict__ pb, float* c, int64_t ldc, float alpha,
                                             float beta, const float* bias) {
    __m512 acc[MR][NV];
    start_tile_avx512<MR, NV>(acc, c, ldc);
    for (int64_t k = 0; k < kc; k++) {
        __m512 b[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) b[v] = _mm512_load_ps(pb + 16 * v);
#pragma GCC unroll 32
        for (int i = 0; i < MR; i++) {
            const __m512 a = _mm512_set1_ps(pa[i]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_fmadd_ps(a, b[v], acc[i][v]);
        }
        pa += MR;
        pb += 16 * NV;
    }
    store_tile_avx512<MR, NV>(acc, c, ldc, alpha, beta, bias);
}

// The bf16 twin of ukr_avx512 on VNNI-packed panels (pack_panels_vnni): per pair of k, one 32-bit broadcast of A's
// two bf16 values per row and VDPBF16PS against NV zmm of B (16 columns x 2 k each): 32 products per instruction,
// twice the fp32 FMA's. kq = pairs of k.
template <int MR, int NV>
FASTLLM_TARGET_AVX512BF16 static void ukr_avx512bf16(int64_t kq, const float* __restrict__ pa,
                                                     const float* __restrict__ pb, float* c, int64_t ldc, float alpha,
                                                     float beta, const float* bias) {
    const int32_t* a32 = reinterpret_cast<const int32_t*>(pa);
    __m512 acc[MR][NV];
    start_tile_avx512<MR, NV>(acc, c, ldc);
    for (int64_t q = 0; q < kq; q++) {
        __m512bh b[NV];
#pragma GCC unroll 8  // unaligned loads: the panels may be a numpy array's (Bf16Panels), 16-byte aligned
        for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512(pb + 16 * v);
#pragma GCC unroll 32
        for (int i = 0; i < MR; i++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32(a32[i]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], a, b[v]);
        }
        a32 += MR;
        pb += 16 * NV;
    }
    store_tile_avx512<MR, NV>(acc, c, ldc, alpha, beta, bias);
}

template <int MR>
FASTLLM_TARGET_AVX2 static void ukr_avx2(int64_t kc, const float* __restrict__ pa, const float* __restrict__ pb,
                                         float* c, int64_t ldc, float alpha, float beta, const float* bias) {
    __m256 acc0[MR], acc1[MR];
#pragma GCC unroll 32
    for (int i = 0; i < MR; i++) acc0[i] = acc1[i] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        const __m256 b0 = _mm256_load_ps(pb), b1 = _mm256_load_ps(pb + 8);
#pragma GCC unroll 32
        for (int i = 0; i < MR; i++) {
            const __m256 a = _mm256_broadcast_ss(pa + i);
            acc0[i] = _mm256_fmadd_ps(a, b0, acc0[i]);
            acc1[i] = _mm256_fmadd_ps(a, b1, acc1[i]);
        }
        pa += MR;
        pb += 16;
    }
    const __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    const __m256 bias0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
    const __m256 bias1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
#pragma GCC unroll 32
    for (int i = 0; i < MR; i++) {
        float* ci = c + i * ldc;
        __m256 r0 = bias0, r1 = bias1;
        if (beta != 0.0f) {
            r0 = _mm256_fmadd_ps(_mm256_loadu_ps(ci), vb, r0);
            r1 = _mm256_fmadd_ps(_mm256_loadu_ps(ci + 8), vb, r1);
        }
        _mm256_storeu_ps(ci, _mm256_fmadd_ps(acc0[i], va, r0));
        _mm256_storeu_ps(ci + 8, _mm256_fmadd_ps(acc1[i], va, r1));
    }
}

// The portable epilogue: C[0:m, 0:n] = alpha * t + beta * C + bias[0:n] (t: row stride ldt; beta == 0: C not read).
// The scalar and AMX micro-kernels end with it, and the driver merges edge tiles with it.
static void store_block(const float* t, int64_t ldt, int64_t m, int64_t n, float* c, int64_t ldc, float alpha,
                        float beta, const float* bias) {
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < n; j++) {
            float v = alpha * t[i * ldt + j] + (bias ? bias[j] : 0.0f);
            if (beta != 0.0f) v += beta * c[i * ldc + j];
            c[i * ldc + j] = v;
        }
}

template <int MR, int NR>
static void ukr_scalar(int64_t kc, const float* __restrict__ pa, const float* __restrict__ pb, float* c,
                       int64_t ldc, float alpha, float beta, const float* bias) {
    float acc[MR][NR] = {};
    for (int64_t k = 0; k < kc; k++, pa += MR, pb += NR)
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) acc[i][j] += pa[i] * pb[j];
    store_block(&acc[0][0], NR, MR, NR, c, ldc, alpha, beta, bias);
}

// The portable form of ukr_avx512bf16 (same VNNI panels, same order per lane: the high products, then the low,
// as VDPBF16PS adds them): the bf16 GEMM of CPUs without AVX-512 BF16 at the scalar level, and the executable
// specification of the VNNI packing on every CPU.
template <int MR, int NR>
static void ukr_vnni_scalar(int64_t kq, const float* __restrict__ pa, const float* __restrict__ pb, float* c,
                            int64_t ldc, float alpha, float beta, const float* bias) {
    const uint32_t* a = reinterpret_cast<const uint32_t*>(pa);
    const uint32_t* b = reinterpret_cast<const uint32_t*>(pb);
    auto lo = [](uint32_t w) { return bf16_to_float(uint16_t(w)); };
    auto hi = [](uint32_t w) { return bf16_to_float(uint16_t(w >> 16)); };
    float acc[MR][NR] = {};
    for (int64_t q = 0; q < kq; q++, a += MR, b += NR)
        for (int i = 0; i < MR; i++)
            for (int j = 0; j < NR; j++) {
                acc[i][j] += hi(a[i]) * hi(b[j]);
                acc[i][j] += lo(a[i]) * lo(b[j]);
            }
    store_block(&acc[0][0], NR, MR, NR, c, ldc, alpha, beta, bias);
}

template <class Tiles>
static void ukr_amx(int64_t kq, const float* pa, const float* pb, float* c, int64_t ldc, float alpha, float beta,
                    const float* bias) {
    alignas(64) float t[32 * 32];
    Tiles::block(kq / 16, reinterpret_cast<const char*>(pa), 64, 2048, reinterpret_cast<const char*>(pb), t);
    store_block(t, 32, 32, 32, c, ldc, alpha, beta, bias);
}

static std::atomic<bool> g_amx_emulation{false};
void set_amx_emulation(bool on) { g_amx_emulation.store(on); }
bool amx_emulation() { return g_amx_emulation.load(); }

// ---------------------------------------------------------------------------------------------------------
// blocked driver


using PackFn = void (*)(const float* src, int64_t ld, bool k_contig, int64_t rows, int64_t kc, float* dst);

struct GemmKernel {
    int MR, NR;            // register tile
    int64_t MC, KC, NC;    // cache blocks (MC multiple of MR, NC multiple of NR)
    MicroKernel ukr;
    PackFn pack_a, pack_b;
    int kpack = 1;         // k values per packed 32-bit word: 1 (fp32 panels) or 2 (VNNI bf16 pairs)
    int kround = 1;        // packed words per panel row rounded up to a multiple of this (AMX: 16 pairs a tile)
    void (*begin)() = nullptr, (*end)() = nullptr;  // per thread, around a blocked GEMM (AMX: configure, release)
};

template <int W, bool Round = false>
static void pack_generic(const float* src, int64_t ld, bool k_contig, int64_t rows, int64_t kc, float* dst) {
    pack_panels<W, Round>(src, ld, k_contig, rows, kc, dst);
}
template <int W>
static void pack_avx512(const float* src, int64_t ld, bool k_contig, int64_t rows, int64_t kc, float* dst) {
    if (k_contig) pack_panels_kc_avx512<W>(src, ld, rows, kc, dst);
    else pack_panels_rc_avx512<W>(src, ld, rows, kc, dst);
}

#ifndef FASTLLM_MR512
#define FASTLLM_MR512 14
#define FASTLLM_NV512 2
#endif
constexpr int kMR512 = FASTLLM_MR512, kNV512 = FASTLLM_NV512;
// bf16 operands: VDPBF16PS on VNNI panels where the CPU has AVX-512 BF16 (MR x 32, the fp32 kernel's tile, with
// KC doubled: a packed pair of k takes the bytes of one fp32 value); elsewhere the fp32 micro-kernels on panels
// rounded to bf16 while packed (exact products, fp32 sums: the same numbers at fp32 speed), except at the scalar
// level, which runs the portable VNNI kernel so that this layout is exercised on every CPU.
Simd gemm_bf16_path() {
    if (simd_setting() >= Simd::amx || amx_emulation()) return Simd::amx;
    return simd_setting() >= Simd::avx512_bf16 ? Simd::avx512_bf16 : simd_level();
}
static GemmKernel select_kernel_bf16() {
    // AMX: 32 x 32 blocks; MC x KC of A = 128 rows x 512 pairs (256 KB) and KC x NC of B = 512 pairs x 768 columns
    // (1.5 MB) for a 2 MB L2 (Sapphire Rapids). Not tuned on the hardware yet.
    const Simd path = gemm_bf16_path();
    if (path == Simd::amx) {
        const bool emu = amx_emulation();
        return {32, 32, 128, 1024, 768, emu ? ukr_amx<AmxEmu> : ukr_amx<AmxTiles>, pack_panels_amx_a<32>,
                pack_panels_vnni<32, 16>, 2, 16, emu ? AmxEmu::begin : AmxTiles::begin,
                emu ? AmxEmu::end : AmxTiles::end};
    }
    if (path == Simd::avx512_bf16)
        return {kMR512, 16 * kNV512, kMR512 * 8, 2 * 768, 32 * 48, ukr_avx512bf16<kMR512, kNV512>,
                pack_panels_vnni<kMR512>, pack_panels_vnni<16 * kNV512>, 2};
    switch (path) {
        case Simd::avx512:
            return {kMR512, 16 * kNV512, kMR512 * 8, 768, 32 * 48, ukr_avx512<kMR512, kNV512>,
                    pack_generic<kMR512, true>, pack_generic<16 * kNV512, true>};
        case Simd::avx2:
            return {6, 16, 6 * 24, 512, 16 * 96, ukr_avx2<6>, pack_generic<6, true>, pack_generic<16, true>};
        default:
            return {4, 16, 4 * 32, 256, 16 * 128, ukr_vnni_scalar<4, 16>, pack_panels_vnni<4>, pack_panels_vnni<16>,
                    2};
    }
}

static GemmKernel select_kernel_default() {
    switch (simd_level()) {
        case Simd::avx512:
            return {kMR512, 16 * kNV512, kMR512 * 8, 768, 32 * 48, ukr_avx512<kMR512, kNV512>,
                    pack_avx512<kMR512>, pack_avx512<16 * kNV512>};
        case Simd::avx2:
            return {6, 16, 6 * 24, 512, 16 * 96, ukr_avx2<6>, pack_generic<6>, pack_generic<16>};
        default:
            return {4, 16, 4 * 32, 256, 16 * 128, ukr_scalar<4, 16>, pack_generic<4>, pack_generic<16>};
    }
}

// FASTLLM_GEMM_BLOCKS="MC,KC,NC" overrides the cache blocks (tuning aid; rounded to the tile sizes).
static GemmKernel select_kernel(Prec prec) {
    GemmKernel k = prec == Prec::bf16 ? select_kernel_bf16() : select_kernel_default();
    static const char* env = std::getenv("FASTLLM_GEMM_BLOCKS");
    if (env) {
        long long mc = 0, kc = 0, nc = 0;
        if (std::sscanf(env, "%lld,%lld,%lld", &mc, &kc, &nc) == 3 && mc > 0 && kc > 0 && nc > 0) {
            k.MC = ceil_div(mc, k.MR) * k.MR;
            k.KC = ceil_div(kc, k.kpack) * k.kpack;  // bf16: whole pairs per block
            k.NC = ceil_div(nc, k.NR) * k.NR;
        }
    }
    return k;
}

// Thread-local 64-byte aligned scratch, grown on demand and kept for the thread's lifetime.
struct Scratch {
    float* p = nullptr;
    size_t cap = 0;
    ~Scratch() { std::free(p); }
    float* get(size_t n) {
        if (n > cap) {
            std::free(p);
            cap = (n + 1023) & ~size_t(1023);
            p = static_cast<float*>(std::aligned_alloc(64, cap * sizeof(float)));
            if (!p) throw std::bad_alloc();
        }
        return p;
    }
};
static thread_local Scratch tls_pack_a, tls_pack_b, tls_shared_b;  // shared_b: the calling thread's

// Where gemm_blocked gets op(B)'s panels for a block (columns jc.., k pc..): block() returns the panels, packed into
// buf or already in place, and the next panel (NR columns on) lies panel_words(kp) * NR floats further.
//   BDense:     an fp32 matrix, packed by the kernel's packer (transB: B stored (N, K), else (K, N)).
//   BBf16Rows:  bf16 weights W (N, K) read as op(B) = W^T, K even: a word of the VNNI layout is a word of W's row
//               as it is, so the panels are a 32-bit transpose (no rounding).
//   BPanels:    panels of NR columns over all of K, packed before the GEMM (bf16 weights, pack_bf16_panels; or a
//               BDense that several threads' rectangles share, gemm_threads): nothing to pack, each block a window
//               of the panels.
// at(n0) is the same source from column n0 on (a thread's rectangle).
struct BDense {
    const float* B;
    int64_t ldb;
    bool transB;
    static constexpr bool packed = false;
    const float* block(const GemmKernel& kn, int64_t jc, int64_t pc, int64_t nc, int64_t kc, float* buf) const {
        kn.pack_b(transB ? B + jc * ldb + pc : B + pc * ldb + jc, ldb, transB, nc, kc, buf);
        return buf;
    }
    int64_t panel_words(int64_t kp) const { return kp; }
    BDense at(int64_t n0) const { return {transB ? B + n0 * ldb : B + n0, ldb, transB}; }
};
struct BBf16Rows {
    const uint16_t* W;
    int64_t ldw;
    static constexpr bool packed = false;
    const float* block(const GemmKernel&, int64_t jc, int64_t pc, int64_t nc, int64_t kc, float* buf) const {
        pack_panels_kc_avx512<16 * kNV512>(reinterpret_cast<const float*>(W + jc * ldw + pc), ldw / 2, nc,
                                           (kc + 1) / 2, buf);
        return buf;
    }
    int64_t panel_words(int64_t kp) const { return kp; }
    BBf16Rows at(int64_t n0) const { return {W + n0 * ldw, ldw}; }
};
struct BPanels {
    const float* P;  // panel p at P + p * NR * kw; word q (k / kpack) of its column r at q * NR + r
    int64_t kw;      // words of k: ceil(K / kpack)
    int kpack;
    static constexpr bool packed = true;
    const float* block(const GemmKernel& kn, int64_t jc, int64_t pc, int64_t, int64_t, float*) const {
        return P + jc * kw + pc / kpack * kn.NR;
    }
    int64_t panel_words(int64_t) const { return kw; }
    BPanels at(int64_t n0) const { return {P + n0 * kw, kw, kpack}; }
};

// The blocked algorithm on one thread. Pointers are already offset to the rectangle's origin.
// a_sums (may be null): a_sums[i] += sum_k op(A)(i, k), from each block of A right after it is packed (in cache).
static void add_row_sums(bool transA, const float* A, int64_t lda, int64_t m, int64_t kc, float* a_sums) {
    if (transA) {  // op(A)(i, k) = A[k * lda + i]: rows of A added as vectors
        for (int64_t k = 0; k < kc; k++)
            for (int64_t i = 0; i < m; i++) a_sums[i] += A[k * lda + i];
    } else {
        for (int64_t i = 0; i < m; i++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < kc; k++) acc += A[i * lda + k];
            a_sums[i] += acc;
        }
    }
}

template <class BSource>
static void gemm_blocked(const GemmKernel& kn, bool transA, int64_t M, int64_t N, int64_t K, float alpha,
                         const float* A, int64_t lda, const BSource& bsrc, float beta, float* Cm, int64_t ldc,
                         const float* bias, float* a_sums = nullptr) {
    const int MR = kn.MR, NR = kn.NR;
    const int64_t KC = kn.KC, MC = kn.MC, NC = kn.NC;
    const int64_t kp_max = ((KC + kn.kpack - 1) / kn.kpack + kn.kround - 1) / kn.kround * kn.kround;
    float* pa = tls_pack_a.get(size_t(MC) * kp_max);
    float* pb = tls_pack_b.get(size_t(NC) * kp_max);
    alignas(64) float tile[16 * 64];
    struct Around {  // kn.begin now, kn.end on the way out
        const GemmKernel& k;
        explicit Around(const GemmKernel& kn) : k(kn) { if (k.begin) k.begin(); }
        ~Around() { if (k.end) k.end(); }
    } around(kn);
    for (int64_t jc = 0; jc < N; jc += NC) {
        const int64_t nc = std::min(NC, N - jc);
        for (int64_t pc = 0; pc < K; pc += KC) {
            const int64_t kc = std::min(KC, K - pc);
            const int64_t kp = ((kc + kn.kpack - 1) / kn.kpack + kn.kround - 1) / kn.kround * kn.kround;  // words
            const float* pbc = bsrc.block(kn, jc, pc, nc, kc, pb);
            const int64_t pstep = bsrc.panel_words(kp);
            const float beta_p = pc == 0 ? beta : 1.0f;
            const float* bias_p = pc == 0 && bias ? bias + jc : nullptr;
            for (int64_t ic = 0; ic < M; ic += MC) {
                const int64_t mc = std::min(MC, M - ic);
                // op(A)(i, k): transA -> A[k*lda + i], else A[i*lda + k] (contiguous along k)
                const float* a = transA ? A + pc * lda + ic : A + ic * lda + pc;
                kn.pack_a(a, lda, !transA, mc, kc, pa);
                if (a_sums && jc == 0) add_row_sums(transA, a, lda, mc, kc, a_sums + ic);
                for (int64_t jr = 0; jr < nc; jr += NR) {
                    const int64_t nr = std::min<int64_t>(NR, nc - jr);
                    const float* pbj = pbc + jr * pstep;
                    const float* bj = bias_p ? bias_p + jr : nullptr;
                    for (int64_t ir = 0; ir < mc; ir += MR) {
                        const int64_t mr = std::min<int64_t>(MR, mc - ir);
                        float* c = Cm + (ic + ir) * ldc + jc + jr;
                        if (mr == MR && nr == NR) {
                            kn.ukr(kp, pa + ir * kp, pbj, c, ldc, alpha, beta_p, bj);
                        } else {  // edge tile: full tile into scratch, merge the valid part
                            kn.ukr(kp, pa + ir * kp, pbj, tile, NR, 1.0f, 0.0f, nullptr);
                            store_block(tile, NR, mr, nr, c, ldc, alpha, beta_p, bj);
                        }
                    }
                }
            }
        }
    }
}

// Few rows times a transposed B (the forward of a layer on a few tokens, e.g. decoding): no packing, each output
// is a dot product of two contiguous rows (16-wide FMAs along K, one horizontal sum at the end). A step computes
// MROWS x NCOLS outputs, so each B load feeds MROWS FMAs and each A load NCOLS FMAs: 4x4 for <= 4 rows, 8x3 for
// 5..8 (24 accumulators + 3 B + 1 A of the 32 zmm registers). Threads take contiguous blocks of columns
// (schedule static), so each streams one contiguous block of B rows.
// B (the weights, 49 MB per decode step of a 6L-384 model: cold, from DRAM) is read once per call; with 8 rows
// the core is busy with FMAs and the hardware prefetcher fell behind: prefetching the B rows PF_ROWS ahead
// (one cache line per 16 floats, issued next to the load of the same offset) cut a decode step's matmuls at
// M=8 from ~3.9 ms to ~2.0 ms (2 threads); 3 columns instead of 2 per step: ~-10% more at M=8.
// PF_ROWS 8 and 16 measured the same, 4 slightly worse; the prefetch is neutral at M=1.
constexpr int64_t SMALL_M = 32;  // up to this many rows, a transposed-B product skips packing (see below)

// The B rows as 16 fp32 lanes (all, or the first of a tail mask): fp32 as they are, int8 widened (exact; the
// per-row scale multiplies the finished sum).
struct Load512F32 {
    using T = float;
    FASTLLM_TARGET_AVX512 static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
    FASTLLM_TARGET_AVX512 static __m512 load(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
};
struct Load512I8 {
    using T = int8_t;
    FASTLLM_TARGET_AVX512 static __m512 load(const int8_t* p) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    }
    FASTLLM_TARGET_AVX512 static __m512 load(__mmask16 m, const int8_t* p) {
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
    }
};

template <int MROWS, int NCOLS, class Load = Load512F32, int PF_ROWS = 8>
FASTLLM_TARGET_AVX512 static void gemm_small_m_nt_avx512(int64_t M, int64_t N, int64_t K, float alpha,
                                                         const float* A, int64_t lda, const typename Load::T* B,
                                                         int64_t ldb, float beta, float* Cm, int64_t ldc,
                                                         const float* bias, int T, const float* scale = nullptr) {
    using W = typename Load::T;
    const int64_t K16 = K & ~int64_t(15);
    const __mmask16 tail = (__mmask16)((1u << (K - K16)) - 1u);
    const int64_t PF = PF_ROWS * ldb;  // prefetch distance in elements
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t j = 0; j < N; j += NCOLS) {
        const int nc = int(std::min<int64_t>(NCOLS, N - j));
        const W* b[NCOLS];
        const W* pf[NCOLS];  // the rows PF_ROWS ahead, or the row itself near the end of B (no address past it)
        for (int c = 0; c < NCOLS; c++) {
            b[c] = B + (j + std::min(c, nc - 1)) * ldb;
            pf[c] = j + c + PF_ROWS < N ? b[c] + PF : b[c];
        }
        // every row group of A meets these B rows while they are in L1/L2: B leaves DRAM once per call
        for (int64_t i0 = 0; i0 < M; i0 += MROWS) {
            const int64_t m = std::min<int64_t>(MROWS, M - i0);
            const float* Ai = A + i0 * lda;
            __m512 acc[MROWS][NCOLS];
            for (int i = 0; i < MROWS; i++)
                for (int c = 0; c < NCOLS; c++) acc[i][c] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K16; k += 16) {
                __m512 vb[NCOLS];
                for (int c = 0; c < NCOLS; c++) {
                    vb[c] = Load::load(b[c] + k);
                    const bool line = sizeof(W) == 4 || k % 64 == 0;  // int8: 16 values a quarter of a line
                    if (i0 == 0 && line) _mm_prefetch((const char*)(pf[c] + k), _MM_HINT_T0);
                }
                for (int i = 0; i < MROWS; i++)
                    if (i < m) {
                        const __m512 va = _mm512_loadu_ps(Ai + i * lda + k);
                        for (int c = 0; c < NCOLS; c++) acc[i][c] = _mm512_fmadd_ps(va, vb[c], acc[i][c]);
                    }
            }
            if (tail) {
                __m512 vb[NCOLS];
                for (int c = 0; c < NCOLS; c++) vb[c] = Load::load(tail, b[c] + K16);
                for (int i = 0; i < MROWS; i++)
                    if (i < m) {
                        const __m512 va = _mm512_maskz_loadu_ps(tail, Ai + i * lda + K16);
                        for (int c = 0; c < NCOLS; c++) acc[i][c] = _mm512_fmadd_ps(va, vb[c], acc[i][c]);
                    }
            }
            for (int64_t i = 0; i < m; i++) {
                for (int c = 0; c < nc; c++) {
                    const float a = scale ? alpha * scale[j + c] : alpha;
                    float v = a * _mm512_reduce_add_ps(acc[i][c]) + (bias ? bias[j + c] : 0.0f);
                    float* out = Cm + (i0 + i) * ldc + j + c;
                    *out = beta == 0.0f ? v : v + beta * *out;
                }
            }
        }
    }
}

// One row times a transposed B (decoding a single sequence): a dot product per B row, rows split into one
// contiguous block per thread, so each thread reads a single sequential stream (the hardware prefetcher's best
// case), 4 accumulators over k to hide the FMA latency. GPT-2 124M decode matmuls, M=1: 38.1 -> 17.8 ms per step
// on 1 thread (12-15 -> 26-29 GB/s per matrix, the ~30 GB/s a plain streaming read gets), 20.3 -> 15.9 ms on 2,
// against the 4x4 tile, whose 4 interleaved row streams the prefetcher follows badly. At M=8 the 8x3 tile stays
// best (single-stream 8x1: 33 ms vs 25 ms): there the FMAs, not the stream, bound it.
FASTLLM_TARGET_AVX512 static void gemv_nt_avx512(int64_t N, int64_t K, float alpha, const float* x, const float* B,
                                                 int64_t ldb, float beta, float* y, const float* bias, int T) {
    const int64_t K64 = K & ~int64_t(63), K16 = K & ~int64_t(15);
    const __mmask16 tail = (__mmask16)((1u << (K - K16)) - 1u);
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t j = 0; j < N; j++) {
        const float* b = B + j * ldb;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k < K64; k += 64) {
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(b + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(b + k + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), _mm512_loadu_ps(b + k + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), _mm512_loadu_ps(b + k + 48), a3);
        }
        for (; k < K16; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(b + k), a0);
        if (tail) a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, x + K16), _mm512_maskz_loadu_ps(tail, b + K16), a1);
        const float v = alpha * _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) +
                        (bias ? bias[j] : 0.0f);
        y[j] = beta == 0.0f ? v : v + beta * y[j];
    }
}

// The AVX2 twins of the two kernels above, for CPUs without AVX-512 (AMD Zen 2/3, Intel before Skylake-SP):
// 8-wide FMAs, 16 ymm registers, so a 4x3 tile (12 accumulators + 3 B + 1 A) for M > 1. Without them decoding
// went through the packed GEMM: on a Zen 3 (2 threads) a 6L-384 decode step ran at 0.82x PyTorch at batch 1.
// `Load` turns 8 elements of B into fp32 lanes: a plain load (float32 weights) or bf16 widened (bf16 weights).
struct LoadF32 {
    using T = float;
    FASTLLM_TARGET_AVX2 static __m256 load(const float* p) { return _mm256_loadu_ps(p); }
    static float scalar(float v) { return v; }
};
struct LoadBf16 {  // bf16 -> fp32 is exact: the 16 bits shifted up into the high half
    using T = uint16_t;
    FASTLLM_TARGET_AVX2 static __m256 load(const uint16_t* p) {
        const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p));
        return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
    static float scalar(uint16_t h) {
        const uint32_t u = uint32_t(h) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
};
struct LoadI8 {  // int8 -> fp32 is exact; the row's scale multiplies the finished sum (per-channel quantization)
    using T = int8_t;
    FASTLLM_TARGET_AVX2 static __m256 load(const int8_t* p) {
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
    }
    static float scalar(int8_t v) { return float(v); }
};

template <typename Load, int MROWS = 4, int NCOLS = 3, int PF_ROWS = 8>
FASTLLM_TARGET_AVX2 static void gemm_small_m_nt_avx2(int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                                                     int64_t lda, const typename Load::T* B, int64_t ldb, float beta,
                                                     float* Cm, int64_t ldc, const float* bias, int T,
                                                     const float* scale = nullptr) {
    const int64_t K8 = K & ~int64_t(7);
    const int64_t PF = PF_ROWS * ldb;
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t j = 0; j < N; j += NCOLS) {
        const int nc = int(std::min<int64_t>(NCOLS, N - j));
        const typename Load::T* b[NCOLS];
        const typename Load::T* pf[NCOLS];
        for (int c = 0; c < NCOLS; c++) {
            b[c] = B + (j + std::min(c, nc - 1)) * ldb;
            pf[c] = j + c + PF_ROWS < N ? b[c] + PF : b[c];
        }
        for (int64_t i0 = 0; i0 < M; i0 += MROWS) {  // every row group while these B rows are in cache
            const int64_t m = std::min<int64_t>(MROWS, M - i0);
            const float* Ai = A + i0 * lda;
            __m256 acc[MROWS][NCOLS];
            for (int i = 0; i < MROWS; i++)
                for (int c = 0; c < NCOLS; c++) acc[i][c] = _mm256_setzero_ps();
            for (int64_t k = 0; k < K8; k += 8) {
                __m256 vb[NCOLS];
                for (int c = 0; c < NCOLS; c++) {
                    vb[c] = Load::load(b[c] + k);
                    if (i0 == 0 && (k & 15) == 0) _mm_prefetch((const char*)(pf[c] + k), _MM_HINT_T0);
                }
                for (int i = 0; i < MROWS; i++)
                    if (i < m) {
                        const __m256 va = _mm256_loadu_ps(Ai + i * lda + k);
                        for (int c = 0; c < NCOLS; c++) acc[i][c] = _mm256_fmadd_ps(va, vb[c], acc[i][c]);
                    }
            }
            for (int64_t i = 0; i < m; i++) {
                for (int c = 0; c < nc; c++) {
                    float s = vec::hsum256(acc[i][c]);
                    for (int64_t k = K8; k < K; k++) s += Ai[i * lda + k] * Load::scalar(b[c][k]);
                    const float v = (scale ? alpha * scale[j + c] : alpha) * s + (bias ? bias[j + c] : 0.0f);
                    float* out = Cm + (i0 + i) * ldc + j + c;
                    *out = beta == 0.0f ? v : v + beta * *out;
                }
            }
        }
    }
}

template <typename Load>
FASTLLM_TARGET_AVX2 static void gemv_nt_avx2(int64_t N, int64_t K, float alpha, const float* x,
                                             const typename Load::T* B, int64_t ldb, float beta, float* y,
                                             const float* bias, int T, const float* scale = nullptr) {
    const int64_t K32 = K & ~int64_t(31), K8 = K & ~int64_t(7);
    constexpr int64_t PF = 1024 / sizeof(typename Load::T);  // bf16/int8 weights: prefetch 1 KB ahead (see below)
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t j = 0; j < N; j++) {
        const typename Load::T* b = B + j * ldb;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k < K32; k += 32) {
            // bf16 rows are half as long in bytes and the widening takes issue slots: the prefetcher falls behind.
            // Qwen2.5-0.5B's lm-head (151936 x 896, 272 MB, 2 threads, Zen 3, interleaved in one process): 10.2 /
            // 9.6 ms -> 9.4 / 8.9 ms; the same prefetch on fp32 rows measured 3% slower, so fp32 has none.
            if constexpr (sizeof(typename Load::T) < 4)
                if (j * ldb + k + PF < N * ldb) _mm_prefetch((const char*)(b + k + PF), _MM_HINT_T0);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), Load::load(b + k), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), Load::load(b + k + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), Load::load(b + k + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), Load::load(b + k + 24), a3);
        }
        for (; k < K8; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), Load::load(b + k), a0);
        float s = vec::hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
        for (; k < K; k++) s += x[k] * Load::scalar(b[k]);
        const float v = (scale ? alpha * scale[j] : alpha) * s + (bias ? bias[j] : 0.0f);
        y[j] = beta == 0.0f ? v : v + beta * y[j];
    }
}

// The threaded driver: the thread grid below, each rectangle through gemm_blocked.
template <class BSource>
static void gemm_threads(const GemmKernel& kn, int T, bool transA, int64_t M, int64_t N, int64_t K, float alpha,
                         const float* A, int64_t lda, const BSource& b, float beta, float* Cm, int64_t ldc,
                         const float* bias, float* a_sums = nullptr);

void gemm_ex(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* Cm, int64_t ldc, const float* bias, int threads,
             Prec prec, float* a_sums) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // no products: C = beta*C + bias
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = 0; j < N; j++) {
                float* c = Cm + i * ldc + j;
                *c = (beta == 0.0f ? 0.0f : beta * *c) + (bias ? bias[j] : 0.0f);
            }
        return;
    }
    const GemmKernel kn = select_kernel(prec);
    int T = threads;
    if (T <= 0) {
#ifdef _OPENMP
        T = omp_in_parallel() ? 1 : max_threads();
#else
        T = 1;
#endif
    }
    if (double(M) * double(N) * double(K) < 64.0 * 64.0 * 64.0) T = 1;  // not worth waking threads
    const bool small = M <= SMALL_M && !transA && transB && prec == Prec::fp32 && !a_sums;  // bf16: packed
    if (small && simd_level() == Simd::avx512) {  // decode-sized batches
        if (M == 1) gemv_nt_avx512(N, K, alpha, A, B, ldb, beta, Cm, bias, T);
        else if (M <= 4) gemm_small_m_nt_avx512<4, 4>(M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc, bias, T);
        else gemm_small_m_nt_avx512<8, 3>(M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc, bias, T);
        return;
    }
    if (small && simd_level() == Simd::avx2) {
        if (M == 1) gemv_nt_avx2<LoadF32>(N, K, alpha, A, B, ldb, beta, Cm, bias, T);
        else gemm_small_m_nt_avx2<LoadF32>(M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc, bias, T);
        return;
    }
    gemm_threads(kn, T, transA, M, N, K, alpha, A, lda, BDense{B, ldb, transB}, beta, Cm, ldc, bias, a_sums);
}

template <class BSource>
static void gemm_threads(const GemmKernel& kn, int T, bool transA, int64_t M, int64_t N, int64_t K, float alpha,
                         const float* A, int64_t lda, const BSource& b, float beta, float* Cm, int64_t ldc,
                         const float* bias, float* a_sums) {
    const int64_t mt = ceil_div(M, kn.MR), nt = ceil_div(N, kn.NR);
    T = int(std::min<int64_t>(T, mt * nt));
    // Thread grid tm x tn: the least time on the busiest thread, its rows x columns of products plus what it packs
    // (its rows of A and columns of B, each K deep): packing a value costs about as much as pack_cost products
    // (~0.15 ns a value against ~0.01 ns an fp32 product, half that in bf16, on Zen 4). Splitting the columns of a
    // 2048 x 384 output instead of its rows (the same tile count, within 1%) packed all 2048 rows of A on each
    // thread: -10..25% GFLOP/s in bf16.
    // A dense B of at most kSharedB values that several rectangles would each pack is packed once, every thread
    // packing a share of its panels (shared below): its cost is N / T a thread, whatever the grid. (Larger ones are
    // packed block by block, each used while it is in cache.) Panels already packed cost nothing.
    constexpr double kSharedB = 4 << 20;
    const bool shareable = !BSource::packed && kn.kround == 1 && double(N) * double(K) <= kSharedB;
    const double pack_cost = 8.0 * kn.kpack;
    int tm = 1, tn = T;
    double best = 1e300;
    for (int a = 1; a <= T; a++) {
        if (T % a) continue;
        const int b = T / a;
        const double rows = double(ceil_div(mt, a) * kn.MR), cols = double(ceil_div(nt, b) * kn.NR);
        const double bcost = BSource::packed ? 0.0 : shareable && a > 1 ? double(N) / T : cols;
        const double cost = rows * cols + pack_cost * (rows * double(ceil_div(cols, kn.NC)) + bcost);
        if (cost < best * 0.999) best = cost, tm = a, tn = b;
    }
    if constexpr (std::is_same_v<BSource, BDense>) {
        if (shareable && tm > 1) {  // op(B) into panels of NR columns over all of K, shared by the rectangles
            const int NR = kn.NR;
            const int64_t kw = ceil_div(K, kn.kpack), np = ceil_div(N, NR);
            float* P = tls_shared_b.get(size_t(np * NR * kw));
#pragma omp parallel for num_threads(T) schedule(static)
            for (int t = 0; t < T; t++) {  // one run of whole panels a thread (the packer reads rows once, whole)
                const int64_t n0 = np * t / T * NR, n1 = std::min(N, np * (t + 1) / T * NR);
                if (n1 > n0)
                    kn.pack_b(b.transB ? b.B + n0 * b.ldb : b.B + n0, b.ldb, b.transB, n1 - n0, K, P + n0 * kw);
            }
            return gemm_threads(kn, T, transA, M, N, K, alpha, A, lda, BPanels{P, kw, kn.kpack}, beta, Cm, ldc,
                                bias, a_sums);
        }
    }
    // Big outputs: q equal chunks per thread along the split dimension, handed out dynamically, so a thread
    // slowed by another process does not hold the others up. A chunk stays >= ~1000 rows/columns, so the
    // extra packing (A re-packed per column chunk, B per row chunk) costs ~1% or less; where B is already in
    // panels, row chunks pack nothing twice: 8 a thread, of >= 224 rows.
    if (T > 1) {
        if (tn >= tm) tn *= int(std::clamp<int64_t>(N / (int64_t(tn) * 1024), 1, 4));
        else if (BSource::packed) tm *= int(std::clamp<int64_t>(M / (int64_t(tm) * 224), 1, 8));
        else tm *= int(std::clamp<int64_t>(M / (int64_t(tm) * 672), 1, 4));
    }
    const int tasks = tm * tn;
    auto run = [&](int t) {
        const int ti = t / tn, tj = t % tn;
        const int64_t m0 = std::min(M, ceil_div(mt * ti, tm) * kn.MR);
        const int64_t m1 = std::min(M, ceil_div(mt * (ti + 1), tm) * kn.MR);
        const int64_t n0 = std::min(N, ceil_div(nt * tj, tn) * kn.NR);
        const int64_t n1 = std::min(N, ceil_div(nt * (tj + 1), tn) * kn.NR);
        if (m1 <= m0 || n1 <= n0) return;
        gemm_blocked(kn, transA, m1 - m0, n1 - n0, K, alpha, transA ? A + m0 : A + m0 * lda, lda, b.at(n0), beta,
                     Cm + m0 * ldc + n0, ldc, bias ? bias + n0 : nullptr, a_sums && n0 == 0 ? a_sums + m0 : nullptr);
    };
    if (T == 1) {
        run(0);
        return;
    }
#pragma omp parallel for num_threads(T) schedule(dynamic, 1)
    for (int t = 0; t < tasks; t++) run(t);
}

void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* Cm, int64_t ldc, Prec prec) {
    gemm_ex(transA, transB, M, N, K, alpha, A, lda, B, ldb, beta, Cm, ldc, nullptr, 0, prec);
}

// ---------------------------------------------------------------------------------------------------------
// bf16 weights for decoding. A decode step streams every weight from DRAM once, so halving the bytes per
// weight halves the floor of a step. The activation rows are rounded to bf16 once per call; then
//   avx512bf16: vdpbf16ps, 32 bf16 products per instruction (pairs summed into 16 fp32 lanes), the same 8x3
//               rows x columns register tile and B-row prefetch as the fp32 few-rows kernel above;
//   avx2:       the fp32 few-rows kernels with B widened from bf16 in registers (gemm_small_m_nt_avx2<LoadBf16>);
//   otherwise:  a plain loop widening bf16 to fp32 (bf16 -> fp32 is exact: the bits shifted up 16).
// Both compute exact products of the same bf16 numbers with fp32 sums (the order differs).


template <int MROWS, int NCOLS, int PF_ROWS = 16>  // 16 bf16 rows = the byte distance of fp32's 8
FASTLLM_TARGET_AVX512BF16 static void gemm_bf16w_avx512bf16(int64_t M, int64_t N, int64_t K, const uint16_t* A,
                                                             const uint16_t* B, const float* bias, float* Cm,
                                                             int T) {
    const int64_t K32 = K & ~int64_t(31);
    const __mmask32 tail = (__mmask32)((1ull << (K - K32)) - 1ull);
    const int64_t PF = PF_ROWS * K;  // prefetch distance in bf16 elements
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t j = 0; j < N; j += NCOLS) {
        const int nc = int(std::min<int64_t>(NCOLS, N - j));
        const uint16_t* b[NCOLS];
        const uint16_t* pf[NCOLS];
        for (int c = 0; c < NCOLS; c++) {
            b[c] = B + (j + std::min(c, nc - 1)) * K;
            pf[c] = j + c + PF_ROWS < N ? b[c] + PF : b[c];
        }
        for (int64_t i0 = 0; i0 < M; i0 += MROWS) {  // all row groups while these B rows are in cache
            const int64_t m = std::min<int64_t>(MROWS, M - i0);
            const uint16_t* Ai = A + i0 * K;
            __m512 acc[MROWS][NCOLS];
            for (int i = 0; i < MROWS; i++)
                for (int c = 0; c < NCOLS; c++) acc[i][c] = _mm512_setzero_ps();
            for (int64_t k = 0; k < K32; k += 32) {
                __m512bh vb[NCOLS];
                for (int c = 0; c < NCOLS; c++) {
                    vb[c] = (__m512bh)_mm512_loadu_si512(b[c] + k);
                    if (i0 == 0) _mm_prefetch((const char*)(pf[c] + k), _MM_HINT_T0);
                }
                for (int i = 0; i < MROWS; i++)
                    if (i < m) {
                        const __m512bh va = (__m512bh)_mm512_loadu_si512(Ai + i * K + k);
                        for (int c = 0; c < NCOLS; c++) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], va, vb[c]);
                    }
            }
            if (tail) {
                __m512bh vb[NCOLS];
                for (int c = 0; c < NCOLS; c++) vb[c] = (__m512bh)_mm512_maskz_loadu_epi16(tail, b[c] + K32);
                for (int i = 0; i < MROWS; i++)
                    if (i < m) {
                        const __m512bh va = (__m512bh)_mm512_maskz_loadu_epi16(tail, Ai + i * K + K32);
                        for (int c = 0; c < NCOLS; c++) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], va, vb[c]);
                    }
            }
            for (int64_t i = 0; i < m; i++)
                for (int c = 0; c < nc; c++)
                    Cm[(i0 + i) * N + j + c] = _mm512_reduce_add_ps(acc[i][c]) + (bias ? bias[j + c] : 0.0f);
        }
    }
}

FASTLLM_TARGET_AVX512BF16 static inline __m512bh ld(const uint16_t* p) { return (__m512bh)_mm512_loadu_si512(p); }

// M = 1: one sequential stream per thread, as gemv_nt_avx512 (4 accumulators, 128 bf16 per step)
FASTLLM_TARGET_AVX512BF16 static void gemv_bf16w_avx512bf16(int64_t N, int64_t K, const uint16_t* x,
                                                            const uint16_t* B, const float* bias, float* y, int T) {
    const int64_t K128 = K & ~int64_t(127), K32 = K & ~int64_t(31);
    const __mmask32 tail = (__mmask32)((1ull << (K - K32)) - 1ull);
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t j = 0; j < N; j++) {
        const uint16_t* b = B + j * K;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(),
               a3 = _mm512_setzero_ps();
        int64_t k = 0;
        for (; k < K128; k += 128) {
            a0 = _mm512_dpbf16_ps(a0, ld(x + k), ld(b + k));
            a1 = _mm512_dpbf16_ps(a1, ld(x + k + 32), ld(b + k + 32));
            a2 = _mm512_dpbf16_ps(a2, ld(x + k + 64), ld(b + k + 64));
            a3 = _mm512_dpbf16_ps(a3, ld(x + k + 96), ld(b + k + 96));
        }
        for (; k < K32; k += 32) a0 = _mm512_dpbf16_ps(a0, ld(x + k), ld(b + k));
        if (tail)
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, x + K32),
                                  (__m512bh)_mm512_maskz_loadu_epi16(tail, b + K32));
        y[j] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3))) +
               (bias ? bias[j] : 0.0f);
    }
}

int weight_threads(int64_t N, int64_t C, int64_t OC) {
#ifdef _OPENMP
    if (!omp_in_parallel() && double(N) * double(C) * double(OC) >= 64.0 * 64.0 * 64.0) return max_threads();
#endif
    return 1;
}

static void gemm_bf16w_portable(int64_t M, int64_t N, int64_t K, const uint16_t* A, const uint16_t* B,
                                const float* bias, float* Cm, int T) {
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t j = 0; j < N; j++) {
        const uint16_t* w = B + j * K;
        for (int64_t i = 0; i < M; i++) {
            const uint16_t* a = A + i * K;
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += bf16_to_float(a[k]) * bf16_to_float(w[k]);
            Cm[i * N + j] = s + (bias ? bias[j] : 0.0f);
        }
    }
}

// bf16 weights on AMX (8 or more rows: batched decoding): out^T = W x^T with the weight matrix read in place from the
// bf16 snapshot as the A tiles (16 of its rows x 16 pairs, tile rows 2C bytes apart: the weights are streamed once,
// never packed) and the rows of x (32 at a time) packed as the VNNI B panel; threads over blocks of 32 weight rows.
// The last block's rows are copied, zero-padded to 32, so no tile reads past the matrix. Needs C % 32 == 0 (whole
// tiles along k; every real model's width).
template <class Tiles>
static void gemm_bf16w_amx(int64_t N, int64_t OC, int64_t C, const float* x, const uint16_t* W, const float* bias,
                           float* out, int T) {
    const int64_t kb = C / 32, nblocks = ceil_div(OC, 32);
    std::vector<uint32_t> xp(size_t(C / 2) * 32);
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
        const int64_t nn = std::min<int64_t>(32, N - n0);
        pack_panels_vnni<32, 16>(x + n0 * C, C, true, nn, C, reinterpret_cast<float*>(xp.data()));
#pragma omp parallel num_threads(T) if (T > 1)
        {
            Tiles::begin();
            std::vector<uint16_t> edge;
            alignas(64) float t[32 * 32];
#pragma omp for schedule(static)
            for (int64_t ob = 0; ob < nblocks; ob++) {
                const int64_t o0 = ob * 32, no = std::min<int64_t>(32, OC - o0);
                const uint16_t* w = W + o0 * C;
                if (no < 32) {
                    edge.assign(size_t(32 * C), 0);
                    std::copy(w, w + no * C, edge.begin());
                    w = edge.data();
                }
                Tiles::block(kb, reinterpret_cast<const char*>(w), 2 * C, 64, reinterpret_cast<const char*>(xp.data()),
                             t);
                for (int64_t n = 0; n < nn; n++)
                    for (int64_t o = 0; o < no; o++)
                        out[(n0 + n) * OC + o0 + o] = t[o * 32 + n] + (bias ? bias[o0 + o] : 0.0f);
            }
            Tiles::end();
        }
    }
}

Simd matmul_bf16w_path() {
    if (simd_setting() >= Simd::avx512_bf16) return Simd::avx512_bf16;
    return simd_level() >= Simd::avx2 ? Simd::avx2 : Simd::scalar;  // avx512 without bf16 uses the avx2 widening
}

// From this many rows on (a prefill) bf16 weights go through the packed bf16 GEMM (VDPBF16PS; the weights' panels
// are their 32-bit words transposed, BBf16Rows): Zen 4, 2 threads, C = 768: 313 against 185 GFLOP/s at 256
// rows, even at 32, ahead from 64.
static constexpr int64_t BF16W_GEMM_ROWS = 48;
void matmul_forward_bf16w(float* out, const float* inp, const uint16_t* weight, const float* bias, float* pre_gelu,
                          int64_t N, int64_t C, int64_t OC) {
    if (N <= 0 || OC <= 0) return;
    float* prod = pre_gelu ? pre_gelu : out;
    const int T = weight_threads(N, C, OC);
    if (N >= 8 && C % 32 == 0 && gemm_bf16_path() == Simd::amx) {
        if (amx_emulation()) gemm_bf16w_amx<AmxEmu>(N, OC, C, inp, weight, bias, prod, T);
        else gemm_bf16w_amx<AmxTiles>(N, OC, C, inp, weight, bias, prod, T);
        if (pre_gelu) gelu_forward(out, pre_gelu, N * OC);
        return;
    }
    if (N >= BF16W_GEMM_ROWS && C % 2 == 0 && bf16_panels_preferred()) {  // the bf16 GEMM is VDPBF16PS
        gemm_threads(select_kernel(Prec::bf16), T, false, N, OC, C, 1.0f, inp, C, BBf16Rows{weight, C}, 0.0f, prod,
                     OC, bias);
        if (pre_gelu) gelu_forward(out, pre_gelu, N * OC);
        return;
    }
    std::vector<uint16_t> a16((size_t)(N * C));
    float_to_bf16(a16.data(), inp, N * C);
    const Simd path = matmul_bf16w_path();
    if (path == Simd::avx512_bf16) {
        if (N == 1) gemv_bf16w_avx512bf16(OC, C, a16.data(), weight, bias, prod, T);
        else if (N <= 4) gemm_bf16w_avx512bf16<4, 4>(N, OC, C, a16.data(), weight, bias, prod, T);
        else gemm_bf16w_avx512bf16<8, 3>(N, OC, C, a16.data(), weight, bias, prod, T);
    } else if (path == Simd::avx2) {  // no bf16 dot product: widen to fp32 in registers (exact)
        std::vector<float> a32((size_t)(N * C));
        for (int64_t i = 0; i < N * C; i++) a32[i] = bf16_to_float(a16[i]);
        if (N == 1) gemv_nt_avx2<LoadBf16>(OC, C, 1.0f, a32.data(), weight, C, 0.0f, prod, bias, T);
        else gemm_small_m_nt_avx2<LoadBf16>(N, OC, C, 1.0f, a32.data(), C, weight, C, 0.0f, prod, OC, bias, T);
    } else {
        gemm_bf16w_portable(N, OC, C, a16.data(), weight, bias, prod, T);
    }
    if (pre_gelu) gelu_forward(out, pre_gelu, N * OC);
}

// ---------------------------------------------------------------------------------------------------------
// bf16 weights packed once into the bf16 GEMM's panels (decoding on AVX512_BF16 without AMX). Row-major bf16
// weights make a decode step of 8 rows run dot products along K, each finished with a horizontal sum, and 3
// weight rows streamed at a time: 14 GB/s where one row reaches 36 (GPT-2, Zen 4). In the VNNI panels of
// BPanels (32 columns, pairs of k, the weights in one sequential stream) the packed GEMM's micro-kernel takes
// any number of rows: a broadcast of each row's pair, no sums across lanes, nothing packed per call but the
// activations. The tile's height follows the rows (4, 8 or 14), so a batch of 8 computes no padding rows.

int64_t bf16_panel_rows(int64_t OC) { return ceil_div(OC, 16 * kNV512) * 16 * kNV512; }

bool bf16_panels_preferred() {
    return simd_setting() >= Simd::avx512_bf16 && gemm_bf16_path() == Simd::avx512_bf16;
}

void pack_bf16_panels(uint16_t* dst, const uint16_t* w, int64_t OC, int64_t C) {
    constexpr int NR = 16 * kNV512;
    if (C % 2) throw std::invalid_argument("pack_bf16_panels: C must be even (the panels hold pairs of k)");
    const int64_t kw = C / 2, np = ceil_div(OC, NR);
    const uint32_t* w32 = reinterpret_cast<const uint32_t*>(w);  // a row's pair words: its 32-bit words
    uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
#pragma omp parallel for schedule(static) if (OC * C >= (1 << 20))
    for (int64_t p = 0; p < np; p++) {
        const int64_t rows = std::min<int64_t>(NR, OC - p * NR);
        uint32_t* d = d32 + p * NR * kw;
        if (simd_level() >= Simd::avx512) {  // the fp32 packer moves 32-bit words unchanged
            pack_panels_kc_avx512<NR>(reinterpret_cast<const float*>(w32 + p * NR * kw), kw, rows, kw,
                                      reinterpret_cast<float*>(d));
            continue;
        }
        for (int64_t q = 0; q < kw; q++)
            for (int64_t r = 0; r < NR; r++) d[q * NR + r] = r < rows ? w32[(p * NR + r) * kw + q] : 0u;
    }
}

// The kernel for `N` rows times bf16 panels: VDPBF16PS with a tile of 4, 8, 12 or 14 rows, the one that pads the
// fewest rows (the tallest of those; 14 from 48 rows on, as the bf16 GEMM): 16 rows as 2 x 8, not 14 + 14, which
// made a GPT-2 step's matmuls compute-bound (19.8 ms against 8.1 for 8 rows). Elsewhere the portable loop over
// the same panels (ukr_vnni_scalar).
static GemmKernel bf16_panel_kernel(int64_t N) {
    constexpr int NR = 16 * kNV512;
    if (simd_setting() < Simd::avx512_bf16)
        return {4, NR, 4 * 32, 2 * 256, NR * 48, ukr_vnni_scalar<4, NR>, pack_panels_vnni<4>, nullptr, 2};
    const GemmKernel tiles[] = {
        {kMR512, NR, kMR512 * 8, 2 * 768, NR * 48, ukr_avx512bf16<kMR512, kNV512>, pack_panels_vnni<kMR512>, nullptr, 2},
        {12, NR, 12 * 8, 2 * 768, NR * 48, ukr_avx512bf16<12, kNV512>, pack_panels_vnni<12>, nullptr, 2},
        {8, NR, 8 * 8, 2 * 768, NR * 48, ukr_avx512bf16<8, kNV512>, pack_panels_vnni<8>, nullptr, 2},
        {4, NR, 4 * 16, 2 * 768, NR * 48, ukr_avx512bf16<4, kNV512>, pack_panels_vnni<4>, nullptr, 2}};
    if (N >= BF16W_GEMM_ROWS) return tiles[0];
    const GemmKernel* best = &tiles[0];
    for (const GemmKernel& t : tiles)
        if (ceil_div(N, t.MR) * t.MR < ceil_div(N, best->MR) * best->MR) best = &t;
    return *best;
}

// One row (a decode step of batch 1) on the panels: per panel, 32 outputs in two accumulator pairs (even and odd
// pairs of k, so two VDPBF16PS chains are in flight per register), stored directly; threads take whole panels.
// The blocked driver pays a 4-row tile, edge-merged, per panel: ~10% slower on a 6L-384 model's decode step.
FASTLLM_TARGET_AVX512BF16 static void gemv_bf16p_avx512bf16(int64_t OC, int64_t kw, const uint16_t* x16,
                                                            const uint32_t* P, const float* bias, float* y, int T) {
    constexpr int NR = 32;
    const int32_t* x32 = reinterpret_cast<const int32_t*>(x16);
    const int64_t np = ceil_div(OC, NR);
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t p = 0; p < np; p++) {
        const uint32_t* b = P + p * NR * kw;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
        int64_t q = 0;
        for (; q + 2 <= kw; q += 2, b += 2 * NR) {
            const __m512bh x0 = (__m512bh)_mm512_set1_epi32(x32[q]), x1 = (__m512bh)_mm512_set1_epi32(x32[q + 1]);
            a0 = _mm512_dpbf16_ps(a0, x0, (__m512bh)_mm512_loadu_si512(b));
            a1 = _mm512_dpbf16_ps(a1, x0, (__m512bh)_mm512_loadu_si512(b + 16));
            a2 = _mm512_dpbf16_ps(a2, x1, (__m512bh)_mm512_loadu_si512(b + NR));
            a3 = _mm512_dpbf16_ps(a3, x1, (__m512bh)_mm512_loadu_si512(b + NR + 16));
        }
        if (q < kw) {
            const __m512bh x0 = (__m512bh)_mm512_set1_epi32(x32[q]);
            a0 = _mm512_dpbf16_ps(a0, x0, (__m512bh)_mm512_loadu_si512(b));
            a1 = _mm512_dpbf16_ps(a1, x0, (__m512bh)_mm512_loadu_si512(b + 16));
        }
        const int64_t o = p * NR, n = std::min<int64_t>(NR, OC - o);
        const __mmask16 m0 = tail_mask16(n), m1 = tail_mask16(n - 16);
        __m512 r0 = _mm512_add_ps(a0, a2), r1 = _mm512_add_ps(a1, a3);
        if (bias) {
            r0 = _mm512_add_ps(r0, _mm512_maskz_loadu_ps(m0, bias + o));
            r1 = _mm512_add_ps(r1, _mm512_maskz_loadu_ps(m1, bias + o + 16));
        }
        _mm512_mask_storeu_ps(y + o, m0, r0);
        _mm512_mask_storeu_ps(y + o + 16, m1, r1);
    }
}

void matmul_forward_bf16p(float* out, const float* inp, const uint16_t* panels, const float* bias, float* pre_gelu,
                          int64_t N, int64_t C, int64_t OC) {
    if (N <= 0 || OC <= 0) return;
    if (C % 2) throw std::invalid_argument("matmul_forward_bf16p: C must be even");
    float* prod = pre_gelu ? pre_gelu : out;
    if (N == 1 && kNV512 == 2 && simd_setting() >= Simd::avx512_bf16) {
        std::vector<uint16_t> x16((size_t)C);
        float_to_bf16(x16.data(), inp, C);
        gemv_bf16p_avx512bf16(OC, C / 2, x16.data(), reinterpret_cast<const uint32_t*>(panels), bias, prod,
                              weight_threads(N, C, OC));
        if (pre_gelu) gelu_forward(out, pre_gelu, N * OC);
        return;
    }
    gemm_threads(bf16_panel_kernel(N), weight_threads(N, C, OC), false, N, OC, C, 1.0f, inp, C,
                 BPanels{reinterpret_cast<const float*>(panels), C / 2, 2}, 0.0f, prod, OC, bias);
    if (pre_gelu) gelu_forward(out, pre_gelu, N * OC);
}

// ---------------------------------------------------------------------------------------------------------
// int8 weights (weight-only quantization for decoding): W ~= q * scale[row], q int8, one fp32 scale per output row.
// Decode-sized batches (<= SMALL_M rows) widen q to fp32 in registers (exact) and scale each finished dot
// product: a quarter of fp32's bytes streamed per step. From 2 rows on AVX-512 they run the fp32 few-rows tile
// (gemm_small_m_nt_avx512 with Load512I8; Zen 4, 8 x 768 x 3072: 150 against 85-90 GOP/s for the AVX2 kernel,
// GPT-2 decoding at batch 8: 293 -> 405 tok/s); one row stays on the AVX2 row kernel (bandwidth-bound). Longer
// inputs (prefill) dequantize blocks of weight rows to fp32 (the same numbers) and run the packed fp32 GEMM on
// them: it does 2N flops per weight, the dequantization one.

static void dequantize_rows(float* w, const int8_t* q, const float* scale, int64_t rows, int64_t C, int T) {
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t o = 0; o < rows; o++)
        for (int64_t k = 0; k < C; k++) w[o * C + k] = float(q[o * C + k]) * scale[o];
}

void matmul_forward_i8w(float* out, const float* inp, const int8_t* q, const float* scale, const float* bias,
                        float* pre_gelu, int64_t N, int64_t C, int64_t OC) {
    if (N <= 0 || OC <= 0) return;
    float* prod = pre_gelu ? pre_gelu : out;
    const int T = weight_threads(N, C, OC);
    if (N > 1 && N <= SMALL_M && simd_level() == Simd::avx512) {
        auto tile = N <= 4 ? gemm_small_m_nt_avx512<4, 4, Load512I8> : gemm_small_m_nt_avx512<8, 3, Load512I8>;
        tile(N, OC, C, 1.0f, inp, C, q, C, 0.0f, prod, OC, bias, T, scale);
    } else if (N <= SMALL_M && simd_level() >= Simd::avx2) {
        if (N == 1) gemv_nt_avx2<LoadI8>(OC, C, 1.0f, inp, q, C, 0.0f, prod, bias, T, scale);
        else gemm_small_m_nt_avx2<LoadI8>(N, OC, C, 1.0f, inp, C, q, C, 0.0f, prod, OC, bias, T, scale);
    } else {
        const int64_t OB = std::min(OC, std::max<int64_t>(64, (int64_t(1) << 22) / C));  // <= 16 MB of fp32 rows
        std::vector<float> w((size_t)(OB * C));
        for (int64_t o0 = 0; o0 < OC; o0 += OB) {
            const int64_t nb = std::min(OB, OC - o0);
            dequantize_rows(w.data(), q + o0 * C, scale + o0, nb, C, T);
            gemm_ex(false, true, N, nb, C, 1.0f, inp, C, w.data(), C, 0.0f, prod + o0, OC, bias ? bias + o0 : nullptr);
        }
    }
    if (pre_gelu) gelu_forward(out, pre_gelu, N * OC);
}

// The input gradient through a frozen weight held in a decode form (matmul_backward_held): W's rows widened to fp32
// a block at a time (the same numbers: bf16 bits, panel words or q * scale; <= 16 MB, as the int8 prefill above),
// each block's product accumulated into dinp by the packed GEMM. The widening reads each weight once per call and
// writes a block that stays in cache for the GEMM's packing; the GEMM does 2N flops per weight. A GEMM packing
// bf16 bits directly would save that pass, but per LoRA step it is one of six passes over the weights (two forward,
// the rest activations) -- not worth a third set of packers.
static void widen_rows(float* dst, HeldWeight w, int64_t o0, int64_t rows, int64_t C, int T) {
    if (w.form == HeldWeight::int8) {
        dequantize_rows(dst, static_cast<const int8_t*>(w.data) + o0 * C, w.scale + o0, rows, C, T);
        return;
    }
    constexpr int64_t NR = 16 * kNV512;  // a panel's rows (pack_bf16_panels): word (r, q) of panel p at p*NR*kw + q*NR + r
    const int64_t kw = C / 2;
    const uint16_t* bits = static_cast<const uint16_t*>(w.data);
    const uint32_t* words = static_cast<const uint32_t*>(w.data);
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
    for (int64_t i = 0; i < rows; i++) {
        const int64_t o = o0 + i;
        float* d = dst + i * C;
        if (w.form == HeldWeight::bf16) {
            for (int64_t k = 0; k < C; k++) d[k] = bf16_to_float(bits[o * C + k]);
            continue;
        }
        const uint32_t* p = words + (o / NR) * NR * kw + o % NR;
        for (int64_t q = 0; q < kw; q++) {
            const uint32_t word = p[q * NR];
            d[2 * q] = bf16_to_float(uint16_t(word));
            d[2 * q + 1] = bf16_to_float(uint16_t(word >> 16));
        }
    }
}

void matmul_backward_held(float* dinp, const float* dout, HeldWeight w, int64_t N, int64_t C, int64_t OC,
                          Prec prec) {
    if (N <= 0 || C <= 0 || OC <= 0) return;
    if (w.form == HeldWeight::bf16_panels && C % 2) throw std::invalid_argument("bf16 panels need C even");
    constexpr int64_t NR = 16 * kNV512;
    const int64_t OB = std::min(OC, ceil_div(std::max<int64_t>(64, (int64_t(1) << 22) / C), NR) * NR);
    std::vector<float> block((size_t)(OB * C));
    const int T = weight_threads(N, C, OC);
    for (int64_t o0 = 0; o0 < OC; o0 += OB) {
        const int64_t nb = std::min(OB, OC - o0);
        widen_rows(block.data(), w, o0, nb, C, T);
        gemm(false, false, N, C, nb, 1.0f, dout + o0, OC, block.data(), C, 1.0f, dinp, C, prec);
    }
}

// ---------------------------------------------------------------------------------------------------------
// matmul entry points

void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, float* pre_gelu,
                    int64_t N, int64_t C, int64_t OC, Prec prec) {
    // out (N, OC) = inp (N, C) @ weight^T, weight stored (OC, C); bias fused into the epilogue
    gemm_ex(false, true, N, OC, C, 1.0f, inp, C, weight, C, 0.0f, pre_gelu ? pre_gelu : out, OC, bias, 0, prec);
    if (pre_gelu) gelu_forward(out, pre_gelu, N * OC);
}

void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t C, int64_t OC, Prec prec) {
    // dinp (N, C) += dout (N, OC) @ weight (OC, C)
    if (dinp) gemm(false, false, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f, dinp, C, prec);
    // dweight (OC, C) += dout^T (OC, N) @ inp (N, C); dbias (OC) += the row sums of dout^T, taken by the GEMM from
    // each block of dout^T it has just packed (in cache): a separate pass over dout cost ~6% of matmul_backward.
    if (dweight && C > 0) {
        gemm_ex(true, false, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C, nullptr, 0, prec, dbias);
    } else if (dbias) {  // no dweight product: column sums of dout, threads over chunks of 64 columns, rows streamed
        const int64_t CH = 64;
        const int64_t nchunks = ceil_div(OC, CH);
#pragma omp parallel for schedule(static) if (N * OC > 65536)
        for (int64_t ch = 0; ch < nchunks; ch++) {
            const int64_t o0 = ch * CH, o1 = std::min(OC, o0 + CH);
            float acc[CH];
            for (int64_t o = o0; o < o1; o++) acc[o - o0] = 0.0f;
            for (int64_t n = 0; n < N; n++) {
                const float* d = dout + n * OC;
                for (int64_t o = o0; o < o1; o++) acc[o - o0] += d[o];
            }
            for (int64_t o = o0; o < o1; o++) dbias[o] += acc[o - o0];
        }
    }
}

}  // namespace fastllm::cpu
