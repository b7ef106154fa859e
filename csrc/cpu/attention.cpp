/*
Causal multi-head self-attention with grouped KV heads (GQA/MQA) on packed qkv, per (batch, head): out =
softmax(q k^T / sqrt(hs) + causal mask) v. A qkv row (token) is [q (NH*hs) | k (NKV*hs) | v (NKV*hs)], NKV dividing
NH; query head h reads kv head h / (NH/NKV) (G = NH/NKV query heads per kv head; NKV = NH is multi-head attention,
NKV = 1 multi-query). K/V are never repeated in memory. Forward saves only the row logsumexp lse (B, NH, T);
backward recomputes the probabilities from it. O(B*NH*T^2*hs) flops (causal: fwd ~2*B*NH*T^2*hs, bwd ~2.5x that),
O(B*NH*T) saved memory, never a T x T matrix; per-thread scratch O(T*hs). Backward accumulates (+=) into dqkv.

Algorithm (FlashAttention-2 on the CPU), one (b, h) pair per OpenMP task in the forward, one (b, kv head) in the
backward (schedule(dynamic); the task owns dq of its G query heads and dk, dv of its kv head, so the backward needs
no atomics and is deterministic, the same bits for any thread count):
  forward : Q, K, V of the pair are packed into contiguous per-thread buffers (qkv rows are strided by 3C), K also
            as K^T panels; for each query block of kBr rows, for each key block of kBc keys at or left of the diagonal:
            S = Q K^T (tile gemm), online softmax in base 2 (running max m, sum l, accumulator rescaled by
            2^(m_old - m_new)), O += P V (tile gemm). Finally out = O / l, lse = (m + log2 l) * ln 2.
  backward: pack K, K^T, V^T of the kv head once; for each of its G query heads: pack Q, dO, D = rowsum(dout * out);
            for each key block j, for each query block i >= j:
            P = exp(S - lse), dV_j += P^T dO_i, dP = dO_i V_j^T, dS = P * (dP - D) * scale,
            dQ_i += dS K_j, dK_j += dS^T Q_i (dQ, dK, dV in per-thread buffers: dQ added to dqkv after each
            query head, dK and dV, summed over the group, after the last one).
All tile products go through one gemm primitive C (+)= A B with a strided A (so P^T and dS^T need no copies) and a
row-major B, whose AVX-512 (6 x 64) / AVX2 (6 x 16) register-blocked micro-kernels are picked at run time with
simd_level(); a portable loop version is the scalar fallback. On diagonal tiles gemm skips, per 6-row block, the
columns / k range that the causal mask zeroes. exp is a vectorized exp2 (round-to-nearest range reduction + degree-6
polynomial, rel. error ~2e-7), the softmax scale and log2(e) are folded into one FMA.
Head sizes: any hs works (rows padded with zeros to a multiple of 16 in the packed buffers); 64 and 128 are the
tuned cases. attention_forward_naive / attention_backward_naive below are the readable per-row reference.
Score options (AttentionOpts, common.h): the scale (default 1/sqrt(hs)) goes into the softmax's FMA as before; a
softcap (Gemma 2) replaces each S tile by (softcap/scale) tanh(S scale/softcap) (vectorized tanh from exp, ~1e-7
absolute) before the softmax, and the backward's probs_bwd, a template on the cap, also multiplies dS by 1 - tanh^2;
a sliding window gives each tile row a key range [lo, hi) (visible()) instead of a count, the forward starts at the
key tile of its first query's window and the backward stops each key block at the last query that sees it: O(T *
window) work. Without them the code paths are the old ones (the cap a branch per tile, lo = 0).

Perf notes (AMD EPYC Zen 4, 1 thread, B=4 NH=12 hs=64, CPU time; a 24-FMA register loop peaks at ~115 GFLOP/s):
  v1 tiled + micro-kernels: T=512 fwd 66, bwd 71 GFLOP/s (packing from the 3C-strided rows cost ~20% of bwd)
  v2 one packing pass per row + prefetch, SIMD D and dqkv adds, gathers for K^T: bwd 82
  v3 causal skipping inside diagonal tiles: +8% (T=512); v4 vectorized running max / rescale factors: fwd +5%
  now: T=512 fwd 75, bwd 84; T=1024 fwd 80, bwd 89 GFLOP/s; the micro-kernel is ~75% of the time, the rest is
  mostly memory stalls on the strided rows, the softmax and exp. Tiles 64x128, 128x128 and 96x64 measured the same
  as 64x64 (kept: smallest working set). The AVX2 path is as fast as AVX-512 on Zen 4 (512-bit ops double-pumped).
  vs torch SDPA (2.13, CPU flash attention): see benchmarks/bench_attention.py.
  Options (AMD EPYC Zen 3/4 class, 1 thread, B=1 NH=8 T=4096 hs=64, loaded machine): plain fwd 191, bwd 448 ms;
  softcap 50: 211, 475; window 512: 58, 128; both: 61, 141. The plain path measured as before (bench_attention
  --quick --threads 1: fwd 22-23 ms, fwd+bwd 72 ms, old and new alike).
*/
#include "attention.h"

#include "cpu/intrin.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "vecmath.h"

namespace fastllm::cpu {

// ---------------------------------------------------------------------------------------------------------
// naive reference (per-row loops with a length-T scratch row)

// the score of a dot product q.k: scaled, then soft-capped (softcap > 0)
static float naive_score(float dot, const AttentionOpts& opt, float scale) {
    const float s = dot * scale;
    return opt.softcap > 0 ? opt.softcap * std::tanh(s / opt.softcap) : s;
}

// the first key position query t sees: 0, or t - window + 1 with a sliding window
static int64_t first_key(int64_t t, int64_t window) { return window > 0 ? std::max<int64_t>(0, t - window + 1) : 0; }

void attention_forward_naive(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                             int64_t NKV, const AttentionOpts& opt) {
    const int64_t hs = C / NH, G = NH / NKV, W = C + 2 * NKV * hs;  // qkv row: [q (C) | k (NKV*hs) | v (NKV*hs)]
    const float scale = opt.resolved_scale(hs);
    std::vector<float> scratch((size_t)max_threads() * T);
#pragma omp parallel
    {
        float* p = scratch.data() + (size_t)thread_id() * T;
#pragma omp for collapse(3) schedule(dynamic, 8)
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < NH; h++)
                for (int64_t t = 0; t < T; t++) {
                    const int64_t kh = C + (h / G) * hs, vh = kh + NKV * hs;  // column of head h's k and v
                    const float* q = qkv + (b * T + t) * W + h * hs;
                    const int64_t s0 = first_key(t, opt.window);  // keys s0 .. t
                    float mx = -INFINITY;
                    for (int64_t s = s0; s <= t; s++) {
                        const float* k = qkv + (b * T + s) * W + kh;
                        float dot = 0;
                        for (int64_t i = 0; i < hs; i++) dot += q[i] * k[i];
                        p[s] = naive_score(dot, opt, scale);
                        mx = std::max(mx, p[s]);
                    }
                    float sum = 0;
                    for (int64_t s = s0; s <= t; s++) sum += (p[s] = std::exp(p[s] - mx));
                    float* o = out + (b * T + t) * C + h * hs;
                    for (int64_t i = 0; i < hs; i++) o[i] = 0;
                    for (int64_t s = s0; s <= t; s++) {
                        const float* v = qkv + (b * T + s) * W + vh;
                        const float w = p[s] / sum;
                        for (int64_t i = 0; i < hs; i++) o[i] += w * v[i];
                    }
                    lse[(b * NH + h) * T + t] = mx + std::log(sum);
                }
    }
}

void attention_backward_naive(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                              int64_t B, int64_t T, int64_t C, int64_t NH, int64_t NKV, const AttentionOpts& opt) {
    const int64_t hs = C / NH, G = NH / NKV, W = C + 2 * NKV * hs;
    const float scale = opt.resolved_scale(hs);
    // (b, kv head) pairs are independent: dk, dv of a kv head only receive from the G query heads of its group.
#pragma omp parallel for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < B; b++)
        for (int64_t hk = 0; hk < NKV; hk++)
            for (int64_t h = hk * G; h < (hk + 1) * G; h++)
                for (int64_t t = 0; t < T; t++) {
                    const int64_t kh = C + hk * hs, vh = kh + NKV * hs;
                    const float* q = qkv + (b * T + t) * W + h * hs;
                    const float* o = out + (b * T + t) * C + h * hs;
                    const float* dy = dout + (b * T + t) * C + h * hs;
                    float* dq = dqkv + (b * T + t) * W + h * hs;
                    const float L = lse[(b * NH + h) * T + t];
                    float D = 0;  // rowsum(dout * out)
                    for (int64_t i = 0; i < hs; i++) D += dy[i] * o[i];
                    for (int64_t s = first_key(t, opt.window); s <= t; s++) {
                        const float* k = qkv + (b * T + s) * W + kh;
                        const float* v = qkv + (b * T + s) * W + vh;
                        float* dk = dqkv + (b * T + s) * W + kh;
                        float* dv = dqkv + (b * T + s) * W + vh;
                        float dot = 0, dp = 0;
                        for (int64_t i = 0; i < hs; i++) dot += q[i] * k[i], dp += dy[i] * v[i];
                        const float score = naive_score(dot, opt, scale), p = std::exp(score - L);
                        float ds = p * (dp - D) * scale;  // d score / d dot: scale (times 1 - tanh^2 with a cap)
                        if (opt.softcap > 0) ds *= 1.0f - (score / opt.softcap) * (score / opt.softcap);
                        for (int64_t i = 0; i < hs; i++) {
                            dv[i] += p * dy[i];
                            dq[i] += ds * k[i];
                            dk[i] += ds * q[i];
                        }
                    }
                }
}

// ---------------------------------------------------------------------------------------------------------
// tile primitives, one struct per ISA
//   gemm(M, N, K, A, sam, sak, B, ldb, C, ldc, acc): C[m][n] (+)= sum_k A[m*sam + k*sak] * B[k*ldb + n],
//       N a multiple of 16 (all callers pad), acc=false overwrites C.
//   softcap:     S -> sc.cap_out * tanh(sc.cap_in * S) on a (mr x kBc) tile (only with a softcap).
//   softmax_fwd: online-softmax update of a (mr x kBc) score tile S in place -> P; rescales O rows.
//   probs_bwd:   S -> P = exp(S*scale - lse), dP -> dS = P * (dP - D) * scale, in place (with a softcap: S capped
//                first, and dS times 1 - tanh^2).
// Masking: row r of a tile at query i0 + r and keys j0.. j0 + nk - 1 sees the keys [lo, hi) of visible().

namespace {

constexpr int64_t kBr = 64;  // query rows per tile
constexpr int64_t kBc = 64;  // keys per tile (multiple of 16)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// The keys [lo, hi) of a tile (keys j0 .. j0 + nk - 1) that row r (query position i0 + r) sees: up to its own
// position (causal) and, with a sliding window, none more than window - 1 before it. lo == hi: none.
struct Keys {
    int64_t lo, hi;
};
inline Keys visible(int64_t i0, int64_t r, int64_t j0, int64_t nk, int64_t window) {
    const int64_t hi = std::clamp<int64_t>(i0 + r - j0 + 1, 0, nk);
    return {window > 0 ? std::clamp<int64_t>(i0 + r - window + 1 - j0, 0, hi) : 0, hi};
}

// The score options as the tiles use them; S holds raw dot products q.k. The softmax works in base 2 with
// c = scale * log2(e) folded into one FMA (S * c - m). A softcap replaces S by cap_out * tanh(cap_in * S), with
// cap_in = scale / softcap and cap_out = softcap / scale, so that S * c is still the (capped) score in base 2.
struct Score {
    float scale, c, cap_in = 0, cap_out = 0;
    int64_t window;
    Score(const AttentionOpts& opt, int64_t hs) : scale(opt.resolved_scale(hs)), c(scale * kLog2e), window(opt.window) {
        if (opt.softcap > 0) cap_in = scale / opt.softcap, cap_out = opt.softcap / scale;
    }
    bool capped() const { return cap_out > 0; }
};

// Causal structure of a diagonal tile, passed to gemm so that it skips the work on masked (zero) entries:
//   kColsLeRow: only columns n <= m + off are needed (S, dP: the rest is masked afterwards, left unwritten);
//   kKLeRow: A[m][k] == 0 for k > m + off (P V, dS K);  kKGeRow: A[m][k] == 0 for k < m + off (P^T dO, dS^T Q).
enum Tri { kFull = 0, kColsLeRow, kKLeRow, kKGeRow };

// For the row block [m0, m0 + mr): the k range [k0, k1) and the column end (exclusive) that gemm must cover.
struct TriRange {
    int64_t k0, k1, nend;
    TriRange(Tri tri, int64_t off, int64_t m0, int64_t mr, int64_t K, int64_t N) : k0(0), k1(K), nend(N) {
        if (tri == kColsLeRow) nend = std::clamp<int64_t>(off + m0 + mr, 0, N);
        if (tri == kKLeRow) k1 = std::clamp<int64_t>(off + m0 + mr, 0, K);
        if (tri == kKGeRow) k0 = std::clamp<int64_t>(off + m0, 0, K);
        if (k1 < k0) k1 = k0;
    }
};

// ---- scalar (portable) primitives
struct Scalar {
    static float dot(const float* a, const float* b, int64_t n) {
        float acc = 0;
        for (int64_t i = 0; i < n; i++) acc += a[i] * b[i];
        return acc;
    }
    static void add_to(float* dst, const float* src, int64_t n) {
        for (int64_t i = 0; i < n; i++) dst[i] += src[i];
    }
    // K^T panels from packed rows: panel p (hs x kBc) holds KT[p*hs*kBc + d*kBc + jj] = K[(p*kBc + jj)*ldk + d].
    static void transpose_panels(float* KT, const float* K, int64_t ldk, int64_t T, int64_t hs) {
        for (int64_t j0 = 0; j0 < T; j0 += kBc) {
            float* panel = KT + (j0 / kBc) * hs * kBc;
            const int64_t nk = std::min(kBc, T - j0);
            for (int64_t d = 0; d < hs; d++)
                for (int64_t jj = 0; jj < nk; jj++) panel[d * kBc + jj] = K[(j0 + jj) * ldk + d];
        }
    }
    static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak, const float* B,
                     int64_t ldb, float* C, int64_t ldc, bool acc, Tri tri = kFull, int64_t off = 0) {
        for (int64_t m = 0; m < M; m++) {
            const TriRange r(tri, off, m, 1, K, N);
            float* c = C + m * ldc;
            if (!acc) std::fill(c, c + r.nend, 0.0f);
            for (int64_t k = r.k0; k < r.k1; k++) {
                const float a = A[m * sam + k * sak];
                const float* b = B + k * ldb;
                for (int64_t n = 0; n < r.nend; n++) c[n] += a * b[n];
            }
        }
    }
    static void softcap(float* S, int64_t mr, const Score& sc) {
        for (int64_t i = 0; i < mr * kBc; i++) S[i] = sc.cap_out * std::tanh(sc.cap_in * S[i]);
    }
    static void softmax_fwd(float* S, int64_t mr, int64_t i0, int64_t j0, int64_t nk, const Score& sc, float* m,
                            float* l, float* O, int64_t hsp) {
        const float c = sc.c;
        for (int64_t r = 0; r < mr; r++) {
            float* s = S + r * kBc;
            const Keys kv = visible(i0, r, j0, nk, sc.window);
            if (kv.lo == kv.hi) {
                std::fill(s, s + kBc, 0.0f);
                continue;
            }
            float mx = -INFINITY;
            for (int64_t j = kv.lo; j < kv.hi; j++) mx = std::max(mx, s[j]);
            const float mnew = std::max(m[r], mx * c);
            const float alpha = std::exp2(m[r] - mnew);
            float sum = 0;
            for (int64_t j = kv.lo; j < kv.hi; j++) sum += (s[j] = std::exp2(s[j] * c - mnew));
            std::fill(s, s + kv.lo, 0.0f);
            std::fill(s + kv.hi, s + kBc, 0.0f);
            l[r] = l[r] * alpha + sum;
            m[r] = mnew;
            if (alpha != 1.0f)
                for (int64_t d = 0; d < hsp; d++) O[r * hsp + d] *= alpha;
        }
    }
    static void probs_bwd(float* S, float* dP, int64_t mr, int64_t i0, int64_t j0, int64_t nk, const Score& sc,
                          const float* lse2, const float* D) {
        for (int64_t r = 0; r < mr; r++) {
            float *s = S + r * kBc, *dp = dP + r * kBc;
            const Keys kv = visible(i0, r, j0, nk, sc.window);
            for (int64_t j = kv.lo; j < kv.hi; j++) {
                float x = s[j], g = sc.scale;  // g: d score / d (q.k)
                if (sc.capped()) {
                    const float t = std::tanh(sc.cap_in * x);
                    x = sc.cap_out * t, g *= 1.0f - t * t;
                }
                const float p = std::exp2(x * sc.c - lse2[r]);
                s[j] = p;
                dp[j] = p * (dp[j] - D[r]) * g;
            }
            for (float* a : {s, dp}) {
                std::fill(a, a + kv.lo, 0.0f);
                std::fill(a + kv.hi, a + kBc, 0.0f);
            }
        }
    }
};

// ---- AVX-512 primitives

// An MR x NV-vector accumulator tile: from C (acc) or zero, and back to C.
template <int MR, int NV>
FASTLLM_TARGET_AVX512 inline void tile_start_512(__m512 (&c)[MR][NV], const float* C, int64_t ldc, bool acc) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) c[r][v] = acc ? _mm512_loadu_ps(C + r * ldc + 16 * v) : _mm512_setzero_ps();
}
template <int MR, int NV>
FASTLLM_TARGET_AVX512 inline void tile_store_512(const __m512 (&c)[MR][NV], float* C, int64_t ldc) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(C + r * ldc + 16 * v, c[r][v]);
}

// MR rows x NV vectors of 16 columns, K-loop with one broadcast of A per row and NV loads of B per step
template <int MR, int NV>
FASTLLM_TARGET_AVX512 void ukernel_512(int64_t K, const float* A, int64_t sam, int64_t sak, const float* B,
                                       int64_t ldb, float* C, int64_t ldc, bool acc) {
    __m512 c[MR][NV];
    tile_start_512(c, C, ldc, acc);
    for (int64_t k = 0; k < K; k++) {
        __m512 b[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) b[v] = _mm512_loadu_ps(B + k * ldb + 16 * v);
        const float* a = A + k * sak;
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            const __m512 ar = _mm512_set1_ps(a[r * sam]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) c[r][v] = _mm512_fmadd_ps(ar, b[v], c[r][v]);
        }
    }
    tile_store_512(c, C, ldc);
}

using UKernel = void (*)(int64_t, const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, bool);

// lanes j + 0..15 of a tile row kept where kv.lo <= j + lane < kv.hi
inline __mmask16 keep_mask16(int64_t j, const Keys& kv) {
    return (__mmask16)(vec::tail_mask16(kv.hi - j) & ~vec::tail_mask16(kv.lo - j));
}

template <int MR>
constexpr UKernel kRow512[4] = {ukernel_512<MR, 1>, ukernel_512<MR, 2>, ukernel_512<MR, 3>, ukernel_512<MR, 4>};
constexpr const UKernel* kTable512[6] = {kRow512<1>, kRow512<2>, kRow512<3>, kRow512<4>, kRow512<5>, kRow512<6>};

struct Avx512 {
    static constexpr int kMR = 6, kNV = 4, kW = 16;
    FASTLLM_TARGET_AVX512 static float dot(const float* a, const float* b, int64_t n) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), _mm512_maskz_loadu_ps(k, b + i), acc);
        }
        return _mm512_reduce_add_ps(acc);
    }
    FASTLLM_TARGET_AVX512 static void transpose_panels(float* KT, const float* K, int64_t ldk, int64_t T,
                                                       int64_t hs) {
        const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                               _mm512_set1_epi32((int)ldk));  // 16 rows, one gather per column
        for (int64_t j0 = 0; j0 < T; j0 += 16) {
            float* col = KT + (j0 / kBc) * hs * kBc + j0 % kBc;
            const __mmask16 k = T - j0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (T - j0)) - 1);
            const float* src = K + j0 * ldk;
            for (int64_t d = 0; d < hs; d++)
                _mm512_mask_storeu_ps(col + d * kBc, k,
                                      _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, src + d, 4));
        }
    }
    FASTLLM_TARGET_AVX512 static void add_to(float* dst, const float* src, int64_t n) {
        for (int64_t i = 0; i < n; i += 16) {
            const __mmask16 k = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
            _mm512_mask_storeu_ps(dst + i, k,
                                  _mm512_add_ps(_mm512_maskz_loadu_ps(k, dst + i), _mm512_maskz_loadu_ps(k, src + i)));
        }
    }
    // The register tiles of an M x N product (kMR rows x up to kNV vectors), each with the k range the causal mask
    // leaves it: f(mr, nv, m0, n0, range).
    template <class F>
    static void tiles(int64_t M, int64_t N, int64_t K, Tri tri, int64_t off, F&& f) {
        for (int64_t n0 = 0; n0 < N; n0 += kNV * kW) {
            for (int64_t m0 = 0; m0 < M; m0 += kMR) {
                const int mr = (int)std::min<int64_t>(kMR, M - m0);
                const TriRange r(tri, off, m0, mr, K, N);
                const int nv = (int)std::min<int64_t>(kNV, (r.nend - n0 + kW - 1) / kW);
                if (nv > 0) f(mr, nv, m0, n0, r);
            }
        }
    }
    static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak, const float* B,
                     int64_t ldb, float* C, int64_t ldc, bool acc, Tri tri = kFull, int64_t off = 0) {
        tiles(M, N, K, tri, off, [&](int mr, int nv, int64_t m0, int64_t n0, const TriRange& r) {
            kTable512[mr - 1][nv - 1](r.k1 - r.k0, A + m0 * sam + r.k0 * sak, sam, sak, B + r.k0 * ldb + n0, ldb,
                                      C + m0 * ldc + n0, ldc, acc);
        });
    }
    FASTLLM_TARGET_AVX512 static void softcap(float* S, int64_t mr, const Score& sc) {
        const __m512 vi = _mm512_set1_ps(sc.cap_in), vo = _mm512_set1_ps(sc.cap_out);
        for (int64_t i = 0; i < mr * kBc; i += 16)
            _mm512_storeu_ps(S + i, _mm512_mul_ps(vo, vec::tanh512(_mm512_mul_ps(vi, _mm512_loadu_ps(S + i)))));
    }
    FASTLLM_TARGET_AVX512 static void softmax_fwd(float* S, int64_t mr, int64_t i0, int64_t j0, int64_t nk,
                                                  const Score& sc, float* m, float* l, float* O, int64_t hsp) {
        const __m512 vc = _mm512_set1_ps(sc.c);
        alignas(64) float mx[kBr], alpha[kBr];
        // 1. row maxima of the raw scores (masked entries set to -inf)
        for (int64_t r = 0; r < mr; r++) {
            float* s = S + r * kBc;
            const Keys kv = visible(i0, r, j0, nk, sc.window);
            std::fill(s, s + kv.lo, -INFINITY);
            std::fill(s + kv.hi, s + kBc, -INFINITY);
            __m512 vmax = _mm512_loadu_ps(s);
            for (int64_t j = 16; j < kBc; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
            mx[r] = _mm512_reduce_max_ps(vmax);
        }
        // 2. new running max and the rescale factor 2^(m_old - m_new), 16 rows at a time
        for (int64_t r = 0; r < mr; r += 16) {
            const __mmask16 k = mr - r >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (mr - r)) - 1);
            const __m512 mold = _mm512_maskz_loadu_ps(k, m + r);
            const __m512 mnew = _mm512_max_ps(mold, _mm512_mul_ps(_mm512_maskz_loadu_ps(k, mx + r), vc));
            _mm512_mask_storeu_ps(alpha + r, k, vec::exp2_512(_mm512_sub_ps(mold, mnew)));  // m_old=-inf: ~0
            _mm512_mask_storeu_ps(m + r, k, mnew);
        }
        // 3. P = 2^(S*c - m), row sums, accumulator rescale
        for (int64_t r = 0; r < mr; r++) {
            float* s = S + r * kBc;
            const Keys kv = visible(i0, r, j0, nk, sc.window);
            if (kv.lo == kv.hi) {  // nothing new for this row (m unchanged; alpha, NaN for m = -inf, unused)
                std::fill(s, s + kBc, 0.0f);
                continue;
            }
            const __m512 vm = _mm512_set1_ps(m[r]);
            __m512 vsum = _mm512_setzero_ps();
            for (int64_t j = 0; j < kBc; j += 16) {
                const __mmask16 keep = keep_mask16(j, kv);
                const __m512 p = _mm512_maskz_mov_ps(keep, vec::exp2_512(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), vc, vm)));
                vsum = _mm512_add_ps(vsum, p);
                _mm512_storeu_ps(s + j, p);
            }
            l[r] = l[r] * alpha[r] + _mm512_reduce_add_ps(vsum);
            if (alpha[r] != 1.0f) {
                const __m512 va = _mm512_set1_ps(alpha[r]);
                float* o = O + r * hsp;
                for (int64_t d = 0; d < hsp; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(va, _mm512_loadu_ps(o + d)));
            }
        }
    }
    // kCap: the scores are capped here (and dS takes the factor 1 - tanh^2); a template, so that the plain path
    // pays nothing for it
    template <bool kCap>
    FASTLLM_TARGET_AVX512 static void probs_bwd_t(float* S, float* dP, int64_t mr, int64_t i0, int64_t j0,
                                                  int64_t nk, const Score& sc, const float* lse2, const float* D) {
        const __m512 vc = _mm512_set1_ps(sc.c), vscale = _mm512_set1_ps(sc.scale);
        const __m512 vi = _mm512_set1_ps(sc.cap_in), vo = _mm512_set1_ps(sc.cap_out), one = _mm512_set1_ps(1.0f);
        for (int64_t r = 0; r < mr; r++) {
            float *s = S + r * kBc, *dp = dP + r * kBc;
            const Keys kv = visible(i0, r, j0, nk, sc.window);
            const __m512 vl = _mm512_set1_ps(lse2[r]), vd = _mm512_set1_ps(D[r]);
            for (int64_t j = 0; j < kBc; j += 16) {
                const __mmask16 keep = keep_mask16(j, kv);
                __m512 x = _mm512_loadu_ps(s + j), g = vscale;  // g: d score / d (q.k)
                if constexpr (kCap) {
                    const __m512 t = vec::tanh512(_mm512_mul_ps(vi, x));
                    x = _mm512_mul_ps(vo, t);
                    g = _mm512_mul_ps(vscale, _mm512_fnmadd_ps(t, t, one));
                }
                const __m512 p = _mm512_maskz_mov_ps(keep, vec::exp2_512(_mm512_fmsub_ps(x, vc, vl)));
                const __m512 ds = _mm512_maskz_mul_ps(keep, _mm512_mul_ps(p, g), _mm512_sub_ps(_mm512_loadu_ps(dp + j), vd));
                _mm512_storeu_ps(s + j, p);
                _mm512_storeu_ps(dp + j, ds);
            }
        }
    }
    static void probs_bwd(float* S, float* dP, int64_t mr, int64_t i0, int64_t j0, int64_t nk, const Score& sc,
                          const float* lse2, const float* D) {
        if (sc.capped()) probs_bwd_t<true>(S, dP, mr, i0, j0, nk, sc, lse2, D);
        else probs_bwd_t<false>(S, dP, mr, i0, j0, nk, sc, lse2, D);
    }
};

// ---- AVX512-BF16 tile products (attention_forward/backward with bf16 = true: the CPU's mixed precision)
// The same tiles, softmax and drivers as Avx512; only gemm differs: it rounds both operands to bf16 pair words
// (VDPBF16PS's layout: the even k in a word's low half) and sums the products in fp32, as torch's SDPA does on bf16
// q, k, v under autocast. The operands are converted per call, into per-thread buffers: A row by row where it is
// contiguous along k (Q, dO, P, dS: one VCVTNE2PS2BF16 per 32 values), or two rows of k at a time where it is
// contiguous along m (P^T, dS^T); B (row-major, k along its rows) by pairs of rows, interleaved with one VPERMW.
// A 64 x 64 x 64 tile converts 8K values for 8K VDPBF16PS, each 32 products (twice an FMA's). Measured (Zen 4, 2
// threads, B=4 NH=12 T=1024 hs=64): 1.4x the fp32 kernels; the micro-kernel ~half the time (at the bf16 peak), the
// conversions ~12%, softmax ~8%, the per-head row packing ~8%. Converting B once per head (K^T, V, ...) instead of
// per call would save about half of those 12%; not done.

// MR rows x NV vectors of 16 columns; per pair of k, a 32-bit broadcast of A's word per row and NV words of B.
template <int MR, int NV>
FASTLLM_TARGET_AVX512BF16 void ukernel_bf16(int64_t Kq, const uint32_t* A, int64_t am, int64_t aq,
                                            const uint32_t* B, int64_t ldb, float* C, int64_t ldc, bool acc) {
    __m512 c[MR][NV];
    tile_start_512(c, C, ldc, acc);
    for (int64_t q = 0; q < Kq; q++) {
        __m512bh b[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) b[v] = (__m512bh)_mm512_loadu_si512(B + q * ldb + 16 * v);
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            const __m512bh a = (__m512bh)_mm512_set1_epi32((int)A[r * am + q * aq]);
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) c[r][v] = _mm512_dpbf16_ps(c[r][v], a, b[v]);
        }
    }
    tile_store_512(c, C, ldc);
}

using UKernelBf16 = void (*)(int64_t, const uint32_t*, int64_t, int64_t, const uint32_t*, int64_t, float*, int64_t,
                             bool);
template <int MR>
constexpr UKernelBf16 kRowBf16[4] = {ukernel_bf16<MR, 1>, ukernel_bf16<MR, 2>, ukernel_bf16<MR, 3>,
                                     ukernel_bf16<MR, 4>};
constexpr const UKernelBf16* kTableBf16[6] = {kRowBf16<1>, kRowBf16<2>, kRowBf16<3>,
                                              kRowBf16<4>, kRowBf16<5>, kRowBf16<6>};

struct Bf16Avx512 : Avx512 {
    // op = A (M x K; sak == 1: rows along k, or sam == 1: columns along k) -> words W[m*am + q*aq] of pair q
    FASTLLM_TARGET_AVX512BF16 static void convert_a(uint32_t* W, int64_t& am, int64_t& aq, int64_t M, int64_t K,
                                                    const float* A, int64_t sam, int64_t sak) {
        const int64_t Kq = (K + 1) / 2;
        if (sak == 1) {  // row m: 32 values of k -> 16 words in order
            am = round_up(Kq, 16), aq = 1;
            for (int64_t m = 0; m < M; m++)
                for (int64_t k = 0; k < 2 * am; k += 32) {
                    const float* a = A + m * sam + k;
                    const __m512 x0 = _mm512_maskz_loadu_ps(vec::tail_mask16(K - k), a);
                    const __m512 x1 = _mm512_maskz_loadu_ps(vec::tail_mask16(K - k - 16), a + 16);
                    _mm512_storeu_si512(W + m * am + k / 2, (__m512i)_mm512_cvtne2ps_pbh(x1, x0));
                }
        } else {  // rows 2q, 2q + 1 of k: 16 values of m each -> 16 words
            am = 1, aq = round_up(M, 16);
            for (int64_t q = 0; q < Kq; q++)
                for (int64_t m = 0; m < aq; m += 16) {
                    const __mmask16 mm = vec::tail_mask16(M - m);
                    const __m512 lo = _mm512_maskz_loadu_ps(mm, A + 2 * q * sak + m);
                    const __m512 hi = 2 * q + 1 < K ? _mm512_maskz_loadu_ps(mm, A + (2 * q + 1) * sak + m)
                                                    : _mm512_setzero_ps();
                    _mm512_storeu_si512(W + q * aq + m, vec::bf16_pairs512(lo, hi));
                }
        }
    }
    // B (K x N row-major, N a multiple of 16) -> words W[q*N + n] = (B[2q][n], B[2q+1][n]); row K (K odd) is zero
    FASTLLM_TARGET_AVX512BF16 static void convert_b(uint32_t* W, int64_t K, int64_t N, const float* B, int64_t ldb) {
        for (int64_t q = 0; q < (K + 1) / 2; q++)
            for (int64_t n = 0; n < N; n += 16) {
                const __m512 lo = _mm512_loadu_ps(B + 2 * q * ldb + n);
                const __m512 hi = 2 * q + 1 < K ? _mm512_loadu_ps(B + (2 * q + 1) * ldb + n) : _mm512_setzero_ps();
                _mm512_storeu_si512(W + q * N + n, vec::bf16_pairs512(lo, hi));
            }
    }
    // Avx512::gemm's contract. A diagonal tile's k range grows to whole pairs: the entry it adds is one the causal
    // mask zeroes in A (P, dS and their transposes hold exact zeros there), so the sums are unchanged.
    FASTLLM_TARGET_AVX512BF16 static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam,
                                               int64_t sak, const float* B, int64_t ldb, float* C, int64_t ldc,
                                               bool acc, Tri tri = kFull, int64_t off = 0) {
        static thread_local std::vector<uint32_t> wa, wb;
        const int64_t Kq = (K + 1) / 2;
        const size_t na = size_t(round_up(M, 16) * round_up(Kq, 16)), nb = size_t(Kq * N);
        if (wa.size() < na) wa.resize(na);
        if (wb.size() < nb) wb.resize(nb);
        int64_t am, aq;
        convert_a(wa.data(), am, aq, M, K, A, sam, sak);
        convert_b(wb.data(), K, N, B, ldb);
        tiles(M, N, K, tri, off, [&](int mr, int nv, int64_t m0, int64_t n0, const TriRange& r) {
            const int64_t q0 = r.k0 / 2, q1 = (r.k1 + 1) / 2;
            kTableBf16[mr - 1][nv - 1](q1 - q0, wa.data() + m0 * am + q0 * aq, am, aq, wb.data() + q0 * N + n0, N,
                                       C + m0 * ldc + n0, ldc, acc);
        });
    }
};

// ---- AVX2 primitives

// lanes j + 0..7 kept where kv.lo <= j + lane < kv.hi
FASTLLM_TARGET_AVX2 inline __m256 keep_mask_256(int64_t j, const Keys& kv) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i below_hi = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(kv.hi - j)), lane);
    const __m256i below_lo = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(kv.lo - j)), lane);
    return _mm256_castsi256_ps(_mm256_andnot_si256(below_lo, below_hi));
}

template <int MR, int NV>
FASTLLM_TARGET_AVX2 void ukernel_256(int64_t K, const float* A, int64_t sam, int64_t sak, const float* B,
                                     int64_t ldb, float* C, int64_t ldc, bool acc) {
    __m256 c[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) c[r][v] = acc ? _mm256_loadu_ps(C + r * ldc + 8 * v) : _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 b[NV];
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) b[v] = _mm256_loadu_ps(B + k * ldb + 8 * v);
        const float* a = A + k * sak;
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            const __m256 ar = _mm256_broadcast_ss(a + r * sam);
#pragma GCC unroll 8
            for (int v = 0; v < NV; v++) c[r][v] = _mm256_fmadd_ps(ar, b[v], c[r][v]);
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 8
        for (int v = 0; v < NV; v++) _mm256_storeu_ps(C + r * ldc + 8 * v, c[r][v]);
}

constexpr UKernel kTable256[6] = {ukernel_256<1, 2>, ukernel_256<2, 2>, ukernel_256<3, 2>,
                                  ukernel_256<4, 2>, ukernel_256<5, 2>, ukernel_256<6, 2>};

struct Avx2 {
    static constexpr int kMR = 6, kW = 16;  // 6 rows x 2 vectors of 8
    FASTLLM_TARGET_AVX2 static float dot(const float* a, const float* b, int64_t n) {
        __m256 acc = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        float r = vec::hsum256(acc);
        for (; i < n; i++) r += a[i] * b[i];
        return r;
    }
    static void transpose_panels(float* KT, const float* K, int64_t ldk, int64_t T, int64_t hs) {
        Scalar::transpose_panels(KT, K, ldk, T, hs);
    }
    FASTLLM_TARGET_AVX2 static void add_to(float* dst, const float* src, int64_t n) {
        int64_t i = 0;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_add_ps(_mm256_loadu_ps(dst + i), _mm256_loadu_ps(src + i)));
        for (; i < n; i++) dst[i] += src[i];
    }
    FASTLLM_TARGET_AVX2 static void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t sam, int64_t sak,
                                         const float* B, int64_t ldb, float* C, int64_t ldc, bool acc,
                                         Tri tri = kFull, int64_t off = 0) {
        for (int64_t n0 = 0; n0 < N; n0 += kW)
            for (int64_t m0 = 0; m0 < M; m0 += kMR) {
                const int mr = (int)std::min<int64_t>(kMR, M - m0);
                const TriRange r(tri, off, m0, mr, K, N);
                if (n0 >= r.nend) continue;
                kTable256[mr - 1](r.k1 - r.k0, A + m0 * sam + r.k0 * sak, sam, sak, B + r.k0 * ldb + n0, ldb,
                                  C + m0 * ldc + n0, ldc, acc);
            }
    }
    FASTLLM_TARGET_AVX2 static void softcap(float* S, int64_t mr, const Score& sc) {
        const __m256 vi = _mm256_set1_ps(sc.cap_in), vo = _mm256_set1_ps(sc.cap_out);
        for (int64_t i = 0; i < mr * kBc; i += 8)
            _mm256_storeu_ps(S + i, _mm256_mul_ps(vo, vec::tanh256(_mm256_mul_ps(vi, _mm256_loadu_ps(S + i)))));
    }
    FASTLLM_TARGET_AVX2 static void softmax_fwd(float* S, int64_t mr, int64_t i0, int64_t j0, int64_t nk,
                                                const Score& sc, float* m, float* l, float* O, int64_t hsp) {
        const __m256 vc = _mm256_set1_ps(sc.c);
        for (int64_t r = 0; r < mr; r++) {
            float* s = S + r * kBc;
            const Keys kv = visible(i0, r, j0, nk, sc.window);
            if (kv.lo == kv.hi) {
                std::fill(s, s + kBc, 0.0f);
                continue;
            }
            std::fill(s, s + kv.lo, -INFINITY);
            std::fill(s + kv.hi, s + kBc, -INFINITY);
            __m256 vmax = _mm256_loadu_ps(s);
            for (int64_t j = 8; j < kBc; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
            const float mnew = std::max(m[r], vec::hmax256(vmax) * sc.c);
            const float alpha = std::exp2(m[r] - mnew);
            const __m256 vm = _mm256_set1_ps(mnew);
            __m256 vsum = _mm256_setzero_ps();
            for (int64_t j = 0; j < kBc; j += 8) {
                __m256 p = vec::exp2_256(_mm256_fmsub_ps(_mm256_loadu_ps(s + j), vc, vm));
                if (j + 8 > kv.hi || j < kv.lo) p = _mm256_and_ps(p, keep_mask_256(j, kv));
                vsum = _mm256_add_ps(vsum, p);
                _mm256_storeu_ps(s + j, p);
            }
            l[r] = l[r] * alpha + vec::hsum256(vsum);
            m[r] = mnew;
            if (alpha != 1.0f) {
                const __m256 va = _mm256_set1_ps(alpha);
                float* o = O + r * hsp;
                for (int64_t d = 0; d < hsp; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(va, _mm256_loadu_ps(o + d)));
            }
        }
    }
    template <bool kCap>  // as Avx512::probs_bwd_t
    FASTLLM_TARGET_AVX2 static void probs_bwd_t(float* S, float* dP, int64_t mr, int64_t i0, int64_t j0, int64_t nk,
                                                const Score& sc, const float* lse2, const float* D) {
        const __m256 vc = _mm256_set1_ps(sc.c), vscale = _mm256_set1_ps(sc.scale);
        const __m256 vi = _mm256_set1_ps(sc.cap_in), vo = _mm256_set1_ps(sc.cap_out), one = _mm256_set1_ps(1.0f);
        for (int64_t r = 0; r < mr; r++) {
            float *s = S + r * kBc, *dp = dP + r * kBc;
            const Keys kv = visible(i0, r, j0, nk, sc.window);
            const __m256 vl = _mm256_set1_ps(lse2[r]), vd = _mm256_set1_ps(D[r]);
            for (int64_t j = 0; j < kBc; j += 8) {
                __m256 x = _mm256_loadu_ps(s + j), g = vscale;  // g: d score / d (q.k)
                if constexpr (kCap) {
                    const __m256 t = vec::tanh256(_mm256_mul_ps(vi, x));
                    x = _mm256_mul_ps(vo, t);
                    g = _mm256_mul_ps(vscale, _mm256_fnmadd_ps(t, t, one));
                }
                __m256 p = vec::exp2_256(_mm256_fmsub_ps(x, vc, vl));
                __m256 ds = _mm256_mul_ps(_mm256_mul_ps(p, g), _mm256_sub_ps(_mm256_loadu_ps(dp + j), vd));
                if (j + 8 > kv.hi || j < kv.lo) {  // masked entries: S, dP may hold stale values there (kColsLeRow)
                    const __m256 keep = keep_mask_256(j, kv);
                    p = _mm256_and_ps(p, keep);
                    ds = _mm256_and_ps(ds, keep);
                }
                _mm256_storeu_ps(s + j, p);
                _mm256_storeu_ps(dp + j, ds);
            }
        }
    }
    static void probs_bwd(float* S, float* dP, int64_t mr, int64_t i0, int64_t j0, int64_t nk, const Score& sc,
                          const float* lse2, const float* D) {
        if (sc.capped()) probs_bwd_t<true>(S, dP, mr, i0, j0, nk, sc, lse2, D);
        else probs_bwd_t<false>(S, dP, mr, i0, j0, nk, sc, lse2, D);
    }
};

// ---------------------------------------------------------------------------------------------------------
// tiled drivers, generic over the ISA primitives

// Per-thread scratch: one zero-initialized, 64-byte aligned slab of `per` floats for each thread. Padding regions
// of the packed buffers are never written, so they stay zero across the (b, h) pairs a thread processes.
struct ThreadScratch {
    std::vector<float> mem;
    int64_t per;
    explicit ThreadScratch(int64_t per_thread) : per(round_up(per_thread, 16)) {
        mem.assign((size_t)(per * max_threads() + 16), 0.0f);
    }
    float* get(int tid) {
        float* base = mem.data();
        base += (16 - (reinterpret_cast<uintptr_t>(base) / sizeof(float)) % 16) % 16;
        return base + (int64_t)tid * per;
    }
};

// The per-(b, h) slices of qkv, out and dout are rows of hs floats strided by 3C (or C): every row sits on another
// page, so the packing passes below visit each row once, touching all the slices of that row together, and
// prefetch kPrefetch rows ahead.
constexpr int64_t kPrefetch = 16;
inline void prefetch_row(const float* p, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i);
}
// Keys and values from a KV cache (inference): kcache/vcache (B, NKV, maxT, hs) already hold the new rows, and the T
// queries of sequence b are its positions pos[b] .. pos[b] + T - 1, each seeing the keys up to its own position.
// Position p is at row p % maxT (a ring with a sliding window, kv_rows_fit in common.h).
struct CacheKV {
    const float *k, *v;
    int64_t maxT;
    const int32_t* pos;
};

// cache == nullptr: keys and values are the qkv rows themselves (training; query t sees keys 0..t). Otherwise
// (a prefill into a KV cache) they come from the cache and every mask index is shifted by the sequence's position.
template <class Isa>
void forward_tiled(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                   int64_t NKV, const AttentionOpts& opt, const CacheKV* cache = nullptr) {
    const int64_t hs = C / NH, G = NH / NKV, W = C + 2 * NKV * hs, hsp = round_up(hs, 16), Tp = round_up(T, kBc);
    const Score sc(opt, hs);
    // the packed keys of a sequence at position off: from the start of the key tile of its first query's window (0
    // without a window or cache) to its last query, so that a long cache costs only the window
    const auto key0 = [&](int64_t off) { return first_key(off, sc.window) / kBc * kBc; };
    int64_t max_keys = T;
    for (int64_t b = 0; cache && b < B; b++)
        max_keys = std::max<int64_t>(max_keys, cache->pos[b] + T - key0(cache->pos[b]));
    const int64_t Tkp = round_up(max_keys, kBc);  // keys of the longest sequence, padded
    // per thread: K^T panels (Tkp*hs), Q (Tp x hsp), K, V (Tkp x hsp), O tile (kBr x hsp), S (kBr x kBc), m, l
    const int64_t oKT = 0, oQ = oKT + round_up(Tkp * hs, 16), oK = oQ + Tp * hsp, oV = oK + Tkp * hsp,
                  oO = oV + Tkp * hsp, oS = oO + kBr * hsp, oM = oS + kBr * kBc, oL = oM + kBr, total = oL + kBr;
    ThreadScratch scratch(total);
#pragma omp parallel
    {
        float* w = scratch.get(thread_id());
        float *KT = w + oKT, *Q = w + oQ, *K = w + oK, *V = w + oV, *O = w + oO, *S = w + oS, *m = w + oM,
              *l = w + oL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t bh = 0; bh < B * NH; bh++) {
            const int64_t b = bh / NH, h = bh % NH, off = cache ? cache->pos[b] : 0, Tk = off + T;
            const int64_t k0 = cache ? key0(off) : 0;   // packed key i is position k0 + i (k0 a multiple of kBc)
            const float* q = qkv + b * T * W + h * hs;  // q of (b, 0, h)
            const int64_t kv_row = cache ? hs : W;      // k, v of its kv head: cache rows or qkv rows
            const int64_t ring = cache ? cache->maxT : Tk;  // position p at row p % ring
            const int64_t at = cache ? (b * NKV + h / G) * cache->maxT * hs : 0;
            const float* k = cache ? cache->k + at : qkv + b * T * W + C + (h / G) * hs;
            const float* v = cache ? cache->v + at : k + NKV * hs;
            for (int64_t t = k0, r = k0 % ring; t < Tk; t++, r = r + 1 == ring ? 0 : r + 1) {  // key t at row r
                if (t + kPrefetch < Tk) {
                    const int64_t ra = r + kPrefetch < ring ? r + kPrefetch : r + kPrefetch - ring;
                    if (t + kPrefetch >= off) prefetch_row(q + (t + kPrefetch - off) * W, hs);
                    prefetch_row(k + ra * kv_row, hs);
                    prefetch_row(v + ra * kv_row, hs);
                }
                if (t >= off) std::memcpy(Q + (t - off) * hsp, q + (t - off) * W, hs * sizeof(float));
                std::memcpy(K + (t - k0) * hsp, k + r * kv_row, hs * sizeof(float));
                std::memcpy(V + (t - k0) * hsp, v + r * kv_row, hs * sizeof(float));
            }
            Isa::transpose_panels(KT, K, hsp, Tk - k0, hs);
            for (int64_t i0 = 0; i0 < T; i0 += kBr) {
                const int64_t mr = std::min(kBr, T - i0), gi = off + i0;  // gi: the block's first query position
                const float* Qi = Q + i0 * hsp;
                std::fill(O, O + mr * hsp, 0.0f);
                std::fill(m, m + mr, -INFINITY);
                std::fill(l, l + mr, 0.0f);
                // key tiles from the first one in the window of the block's first query to the diagonal
                for (int64_t j0 = first_key(gi, sc.window) / kBc * kBc; j0 < gi + mr; j0 += kBc) {
                    const int64_t nk = std::min(kBc, Tk - j0);
                    const bool diag = j0 + nk - 1 > gi;  // some keys of the tile are causally masked
                    const Tri cols = diag ? kColsLeRow : kFull, kle = diag ? kKLeRow : kFull;
                    Isa::gemm(mr, kBc, hs, Qi, hsp, 1, KT + ((j0 - k0) / kBc) * hs * kBc, kBc, S, kBc, false, cols,
                              gi - j0);
                    if (sc.capped()) Isa::softcap(S, mr, sc);
                    Isa::softmax_fwd(S, mr, gi, j0, nk, sc, m, l, O, hsp);
                    Isa::gemm(mr, hsp, nk, S, kBc, 1, V + (j0 - k0) * hsp, hsp, O, hsp, true, kle, gi - j0);
                }
                for (int64_t r = 0; r < mr; r++) {
                    const float inv = 1.0f / l[r];
                    float* o = out + (b * T + i0 + r) * C + h * hs;
                    for (int64_t d = 0; d < hs; d++) o[d] = O[r * hsp + d] * inv;
                    lse[bh * T + i0 + r] = (m[r] + std::log2(l[r])) * kLn2;
                }
            }
        }
    }
}

// One task per (b, kv head): K, V^T and K^T of the kv head are packed once, then its G query heads run in turn,
// each adding into the same dK, dV buffers (so no two threads ever write one gradient row: no atomics).
template <class Isa>
void backward_tiled(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse, int64_t B,
                    int64_t T, int64_t C, int64_t NH, int64_t NKV, const AttentionOpts& opt) {
    const int64_t hs = C / NH, G = NH / NKV, W = C + 2 * NKV * hs, hsp = round_up(hs, 16), Tp = round_up(T, kBc);
    const Score sc(opt, hs);
    // per thread: Q, K, dO, dQ, dK, dV (Tp x hsp each), K^T and V^T panels (Tp*hs each), lse2, D (Tp),
    // S and dP tiles (kBr x kBc)
    const int64_t panel = round_up(Tp * hs, 16), mat = Tp * hsp;
    const int64_t oQ = 0, oK = oQ + mat, odO = oK + mat, odQ = odO + mat, odK = odQ + mat, odV = odK + mat,
                  oKT = odV + mat, oVT = oKT + panel, oL = oVT + panel, oD = oL + Tp, oS = oD + Tp,
                  odP = oS + kBr * kBc, total = odP + kBr * kBc;
    ThreadScratch scratch(total);
#pragma omp parallel
    {
        float* w = scratch.get(thread_id());
        float *Q = w + oQ, *K = w + oK, *dO = w + odO, *dQ = w + odQ, *dK = w + odK, *dV = w + odV;
        float *KT = w + oKT, *VT = w + oVT, *lse2 = w + oL, *D = w + oD, *S = w + oS, *dP = w + odP;
#pragma omp for schedule(dynamic, 1)
        for (int64_t bk = 0; bk < B * NKV; bk++) {
            const int64_t b = bk / NKV, hk = bk % NKV;
            const float* k = qkv + b * T * W + C + hk * hs;
            const float* v = k + NKV * hs;
            float* dk = dqkv + b * T * W + C + hk * hs;
            float* dv = dk + NKV * hs;
            // 1. pack k, k^T, v^T of the kv head (v goes through dV, zeroed afterwards)
            for (int64_t t = 0; t < T; t++) {
                if (t + kPrefetch < T) {
                    prefetch_row(k + (t + kPrefetch) * W, hs);
                    prefetch_row(v + (t + kPrefetch) * W, hs);
                }
                std::memcpy(K + t * hsp, k + t * W, hs * sizeof(float));
                std::memcpy(dV + t * hsp, v + t * W, hs * sizeof(float));
            }
            Isa::transpose_panels(KT, K, hsp, T, hs);
            Isa::transpose_panels(VT, dV, hsp, T, hs);
            std::fill(dK, dK + 2 * mat, 0.0f);  // dK, dV
            for (int64_t h = hk * G; h < (hk + 1) * G; h++) {
                const int64_t bh = b * NH + h;
                const float* q = qkv + b * T * W + h * hs;
                const float* dy = dout + b * T * C + h * hs;
                const float* y = out + b * T * C + h * hs;
                // 2. pack q, dout of the query head; D = rowsum(dout * out); lse in base 2
                for (int64_t t = 0; t < T; t++) {
                    const float *qt = q + t * W, *dyt = dy + t * C, *yt = y + t * C;
                    if (t + kPrefetch < T) {
                        prefetch_row(qt + kPrefetch * W, hs);
                        prefetch_row(dyt + kPrefetch * C, hs);
                        prefetch_row(yt + kPrefetch * C, hs);
                    }
                    std::memcpy(Q + t * hsp, qt, hs * sizeof(float));
                    std::memcpy(dO + t * hsp, dyt, hs * sizeof(float));
                    D[t] = Isa::dot(dyt, yt, hs);
                    lse2[t] = lse[bh * T + t] * kLog2e;
                }
                std::fill(dQ, dQ + mat, 0.0f);
                // 3. key blocks outer (dK_j, dV_j stay hot), query blocks at or below the diagonal inner (with a
                //    window, up to the last query that sees the block's last key)
                for (int64_t j0 = 0; j0 < T; j0 += kBc) {
                    const int64_t nk = std::min(kBc, T - j0);
                    const int64_t iend = sc.window > 0 ? std::min(T, j0 + nk - 1 + sc.window) : T;
                    const float *KTj = KT + (j0 / kBc) * hs * kBc, *VTj = VT + (j0 / kBc) * hs * kBc;
                    float *dKj = dK + j0 * hsp, *dVj = dV + j0 * hsp;
                    for (int64_t i0 = j0 / kBr * kBr; i0 < iend; i0 += kBr) {
                        const int64_t mr = std::min(kBr, T - i0);
                        const float *Qi = Q + i0 * hsp, *dOi = dO + i0 * hsp;
                        const bool diag = j0 + nk - 1 > i0;
                        const Tri cols = diag ? kColsLeRow : kFull, kle = diag ? kKLeRow : kFull,
                                  kge = diag ? kKGeRow : kFull;
                        const int64_t off = i0 - j0;
                        Isa::gemm(mr, kBc, hs, Qi, hsp, 1, KTj, kBc, S, kBc, false, cols, off);    // S = Q_i K_j^T
                        Isa::gemm(mr, kBc, hs, dOi, hsp, 1, VTj, kBc, dP, kBc, false, cols, off);  // dP = dO_i V_j^T
                        Isa::probs_bwd(S, dP, mr, i0, j0, nk, sc, lse2 + i0, D + i0);
                        Isa::gemm(nk, hsp, mr, S, 1, kBc, dOi, hsp, dVj, hsp, true, kge, -off);  // dV_j += P^T dO_i
                        Isa::gemm(mr, hsp, nk, dP, kBc, 1, K + j0 * hsp, hsp, dQ + i0 * hsp, hsp, true, kle,
                                  off);                                                          // dQ_i += dS K_j
                        Isa::gemm(nk, hsp, mr, dP, 1, kBc, Qi, hsp, dKj, hsp, true, kge, -off);  // dK_j += dS^T Q_i
                    }
                }
                // 4. dq of this head into dqkv
                float* dq = dqkv + b * T * W + h * hs;
                for (int64_t t = 0; t < T; t++) {
                    if (t + kPrefetch < T) prefetch_row(dq + (t + kPrefetch) * W, hs);
                    Isa::add_to(dq + t * W, dQ + t * hsp, hs);
                }
            }
            // 5. dk, dv of the kv head (summed over its query heads) into dqkv, one pass over the rows
            for (int64_t t = 0; t < T; t++) {
                if (t + kPrefetch < T) {
                    prefetch_row(dk + (t + kPrefetch) * W, hs);
                    prefetch_row(dv + (t + kPrefetch) * W, hs);
                }
                Isa::add_to(dk + t * W, dK + t * hsp, hs);
                Isa::add_to(dv + t * W, dV + t * hsp, hs);
            }
        }
    }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// entry points: run-time ISA dispatch

// forward_tiled at the SIMD level in use (training: cache null; a KV-cache prefill: cache given)
static void forward_tiled_dispatch(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C,
                                   int64_t NH, int64_t NKV, const AttentionOpts& opt, const CacheKV* cache,
                                   bool bf16) {
    if (bf16 && attention_bf16_available())
        return forward_tiled<Bf16Avx512>(out, lse, qkv, B, T, C, NH, NKV, opt, cache);
    switch (simd_level()) {
        case Simd::avx512: return forward_tiled<Avx512>(out, lse, qkv, B, T, C, NH, NKV, opt, cache);
        case Simd::avx2: return forward_tiled<Avx2>(out, lse, qkv, B, T, C, NH, NKV, opt, cache);
        default: return forward_tiled<Scalar>(out, lse, qkv, B, T, C, NH, NKV, opt, cache);
    }
}

bool attention_bf16_available() { return simd_setting() >= Simd::avx512_bf16; }

void attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                       int64_t NKV, const AttentionOpts& opt, bool bf16) {
    if (B * T * C == 0) return;
    forward_tiled_dispatch(out, lse, qkv, B, T, C, NH, NKV, opt, nullptr, bf16);
}

void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        int64_t B, int64_t T, int64_t C, int64_t NH, int64_t NKV, const AttentionOpts& opt,
                        bool bf16) {
    if (B * T * C == 0) return;
    if (bf16 && attention_bf16_available())
        return backward_tiled<Bf16Avx512>(dqkv, dout, qkv, out, lse, B, T, C, NH, NKV, opt);
    switch (simd_level()) {
        case Simd::avx512: return backward_tiled<Avx512>(dqkv, dout, qkv, out, lse, B, T, C, NH, NKV, opt);
        case Simd::avx2: return backward_tiled<Avx2>(dqkv, dout, qkv, out, lse, B, T, C, NH, NKV, opt);
        default: return backward_tiled<Scalar>(dqkv, dout, qkv, out, lse, B, T, C, NH, NKV, opt);
    }
}

// ---------------------------------------------------------------------------------------------------------
// KV-cache attention (inference): new tokens attend to the cached keys/values of their sequence.

// The queries q_g = q + g*hs, g < ng, of one kv group and one position attend to the same n cache rows of their
// kv head: key s (0..n-1) at row first + s of K, Vc, wrapped to row first + s - ring past the ring's end (a ring
// cache; rows first .. first+n-1 when they fit). Each key and value row is read once for all of them (decoding is
// bound by the cache reads). scores (ng, n) scratch; out_g = out + g*hs. O(ng * n * hs). NG = 1 fixes ng = 1 at
// compile time (multi-head attention: the loops over g vanish; with a run-time ng of 1 the code measured ~12% slower),
// NG = 0 takes ng. softcap > 0: the scores are capped (vectorized tanh) before the softmax.
template <int NG>
__attribute__((target_clones("avx512f", "avx2", "default")))
static void attend_group(float* out, float* scores, const float* q, int64_t ng_, const float* K, const float* Vc,
                         int64_t first, int64_t n, int64_t ring, int64_t hs, float scale, float softcap) {
    const int64_t ng = NG ? NG : ng_;
    // two contiguous row ranges: keys s < n1 at row first + s, the others (a ring that wraps) at row s - n1
    const int64_t n1 = std::min(n, ring - first);
    for (int64_t s = 0; s < n; s++) {
        const int64_t r = s < n1 ? first + s : s - n1;
        const float* k = K + r * hs;
        // the cache is cold during decoding (weights stream through L3 between layers): fetch the key row
        // 8 ahead, and this row of V (used by the weighted sum below) into L2
        const float* k_ahead = r + 8 < ring && s + 8 < n ? k + 8 * hs : k;  // stay inside this sequence's rows
        for (int64_t i = 0; i < hs; i += 16) {
            __builtin_prefetch(k_ahead + i, 0, 3);
            __builtin_prefetch(Vc + r * hs + i, 0, 2);
        }
        for (int64_t g = 0; g < ng; g++) {
            const float* qg = q + g * hs;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < hs; i++) dot += qg[i] * k[i];
            scores[g * n + s] = dot * scale;
        }
    }
    if (softcap > 0) vec::softcap_row(scores, scores, ng * n, softcap, simd_level());
    for (int64_t g = 0; g < ng; g++) {
        float* sc = scores + g * n;
        float mx = -INFINITY;
        for (int64_t s = 0; s < n; s++) mx = sc[s] > mx ? sc[s] : mx;
        float sum = 0.0f;
        for (int64_t s = 0; s < n; s++) sum += (sc[s] = std::exp(sc[s] - mx));
        const float inv = 1.0f / sum;
        for (int64_t s = 0; s < n; s++) sc[s] *= inv;
        for (int64_t i = 0; i < hs; i++) out[g * hs + i] = 0.0f;
    }
    for (int64_t s = 0; s < n; s++) {
        const float* v = Vc + (s < n1 ? first + s : s - n1) * hs;
        for (int64_t g = 0; g < ng; g++) {
            const float w = scores[g * n + s];
            float* o = out + g * hs;
#pragma omp simd
            for (int64_t i = 0; i < hs; i++) o[i] += w * v[i];
        }
    }
}

void attention_kv_forward(float* out, float* kcache, float* vcache, const float* qkv, const int32_t* pos,
                          int64_t B, int64_t Tn, int64_t C, int64_t NH, int64_t NKV, int64_t maxT,
                          const AttentionOpts& opt, bool bf16) {
    if (B * Tn == 0) return;
    const int64_t hs = C / NH, G = NH / NKV, W = C + 2 * NKV * hs;
    const float scale = opt.resolved_scale(hs);
    // 1) append the new keys and values of the kv heads at positions pos[b] .. pos[b] + Tn - 1 (rows p % maxT)
#pragma omp parallel for collapse(2)
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < Tn; t++)
            for (int64_t hk = 0; hk < NKV; hk++) {
                const float* src = qkv + (b * Tn + t) * W + C + hk * hs;
                const int64_t p = pos[b] + t, row = ((b * NKV + hk) * maxT + (p < maxT ? p : p % maxT)) * hs;
                std::copy(src, src + hs, kcache + row);
                std::copy(src + NKV * hs, src + NKV * hs + hs, vcache + row);
            }
    // 2) several new tokens (a prefill, fresh or continued): the tiled causal attention of training with the keys
    //    and values read from the cache and the mask shifted by each sequence's position, rather than query by
    //    query (a 512-token SmolLM2-135M prefill: attention 413 -> 92 ms, 2 threads, Zen 3; torch SDPA 194 ms);
    //    bf16: its tile products in bf16 (the prefills of bf16 weights)
    if (Tn > 1) {
        std::vector<float> lse((size_t)(B * NH * Tn));
        const CacheKV cache{kcache, vcache, maxT, pos};
        return forward_tiled_dispatch(out, lse.data(), qkv, B, Tn, C, NH, NKV, opt, &cache, bf16);
    }
    // 3) one new token (decoding): its query heads of a kv group together over the cache rows it sees (the last
    //    `window` ones with a sliding window), which are read once for them; a group is split in `parts` pieces
    //    when there are too few (b, kv head) items to occupy the threads
    const int64_t items = B * NKV;
    const int64_t parts = std::min<int64_t>(G, (2 * max_threads() + items - 1) / items);
    const int64_t per = (G + parts - 1) / parts;
#pragma omp parallel
    {
        std::vector<float> scores((size_t)(per * maxT));
#pragma omp for collapse(3) schedule(dynamic, 1)
        for (int64_t b = 0; b < B; b++)
            for (int64_t hk = 0; hk < NKV; hk++)
                for (int64_t part = 0; part < parts; part++) {
                    const int64_t h0 = hk * G + part * per, ng = std::min(per, (hk + 1) * G - h0);
                    if (ng <= 0) continue;
                    // positions s0 .. pos[b], from row s0 % maxT on
                    const int64_t s0 = first_key(pos[b], opt.window), n = pos[b] + 1 - s0;
                    const int64_t first = s0 < maxT ? s0 : s0 % maxT, base = (b * NKV + hk) * maxT * hs;
                    float* o = out + b * C + h0 * hs;
                    const float* q = qkv + b * W + h0 * hs;
                    const float *K = kcache + base, *V = vcache + base;
                    if (ng == 1) attend_group<1>(o, scores.data(), q, 1, K, V, first, n, maxT, hs, scale, opt.softcap);
                    else attend_group<0>(o, scores.data(), q, ng, K, V, first, n, maxT, hs, scale, opt.softcap);
                }
    }
}

}  // namespace fastllm::cpu
