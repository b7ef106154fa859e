/*
Fused softmax + cross-entropy over rows of logits (N, V): loss = logsumexp - logit[target],
dlogits = (softmax - onehot) * grad_scale, WRITTEN (=), in place if dlogits == logits. O(N*V), memory bound.

Algorithm (per row, OpenMP over rows):
  pass 1 (read): online max + sum. Per SIMD lane a running max m and sum s of exp(x - m); a block of
         4 vectors (64 floats on AVX-512) is maxed first and s is rescaled by exp(m_old - m_new) only when
         some lane's max grew (rare after the first blocks), so ~1 exp per element. Lanes are merged at the
         end: M = max m, S = sum s * exp(m - M); lse = M + log S.
  pass 2 (write): d = exp((x - M) - log S) * grad_scale, then d[target] -= grad_scale. The row (V = 50304: 196 KiB)
         is still in L2 from pass 1, so DRAM sees one read and one write per element.
  The target logit is read before pass 2 (it may be overwritten in place). Ignored rows: loss 0, zero row.
  Optional row_weights (N): row n's gradient uses grad_scale * row_weights[n] (losses unchanged), i.e. the
  gradient of sum_n w[n] * loss[n]; free (one multiply per row). Used by RL (rl.py): policy-gradient weights.
  Optional softcap c > 0 (Gemma 2, nanochat): the loss is that of z = c tanh(x / c); each row is capped into a
  per-thread buffer first (vectorized tanh), the routines above run on it, and the gradient row is multiplied by
  dz/dx = 1 - (z / c)^2 (the chain rule through the cap; in place works as the row routines read only z).
  Optional temperature T != 1 (RL: the log-probs of the distribution sampled at T, rl.py): the row routines read
  u = z * (1 / T) from the same per-thread buffer (z: the capped row, else the logits), their gradient scale is
  grad_scale / T (d u / d z; free), and the cap's derivative reads z back as u * T. T = 1 takes none of this.
  exp: polynomial with range reduction, <= 2 ulp (vecmath.h). Dispatch: simd_level() -> AVX-512 / AVX2;
  the naive three-pass loop (double sum, std::exp) is the scalar fallback and the readable spec.

lmhead_ce: logits = hidden @ W^T for chunk_rows rows at a time into one (chunk_rows, V) buffer, the
fused softmax-CE above in place on it, then dhidden[chunk] += dlogits @ W and dW += dlogits^T @ hidden[chunk]
through matmul_backward (which accumulates, so dW sums over chunks). Peak extra memory chunk_rows * V floats
(1024 * 50304 * 4 B = 196 MiB by default) instead of the N x V logits and N x V gradient that an unfused
implementation holds (2 * 8192 * 50304 * 4 B = 3.1 GiB for N = 8192). Default chunk_rows: lmhead_chunk_rows.

Perf notes (N=2048, V=50304, 1 thread, shared machine, min of 15): forward only 22 ms (~19 GB/s, DRAM bound);
fwd+bwd in place ~43-56 ms. Out of place, non-temporal stores for dlogits (AVX-512, N*V >= 8 Mi) cut ~15-25%
(68-71 -> 53-61 ms) by skipping the read-for-ownership; in place they would not help. vs torch
F.cross_entropy fwd+bwd (2 threads): >10x (torch makes several passes and allocates N x V twice).
*/
#include "softmax_ce.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "common.h"
#include "matmul.h"
#include "vecmath.h"

namespace fastllm::cpu {

// ---------------------------------------------------------------------------------------------------------
// naive (scalar fallback and spec): three passes per row

static void softmax_ce_row_naive(float* loss, float* d, const float* x, int64_t V, int32_t tgt, float grad_scale) {
    float mx = -INFINITY;
    for (int64_t i = 0; i < V; i++) mx = std::max(mx, x[i]);
    double sum = 0;
    for (int64_t i = 0; i < V; i++) sum += std::exp(x[i] - mx);
    const float logsum = (float)std::log(sum);
    *loss = (mx - x[tgt]) + logsum;  // not lse - x[tgt]: exact when the target is the max, even at 1e4
    if (d) {
        for (int64_t i = 0; i < V; i++) d[i] = std::exp((x[i] - mx) - logsum) * grad_scale;
        d[tgt] -= grad_scale;
    }
}

// ---------------------------------------------------------------------------------------------------------
// AVX-512

FASTLLM_TARGET_AVX512 static void softmax_ce_row_avx512(float* loss, float* d, const float* x, int64_t V,
                                                        int32_t tgt, float grad_scale, bool stream) {
    using namespace vec;
    // pass 1: online max + sum, 4 vectors per block
    // the running max starts at -FLT_MAX, not -inf: a lane whose logits so far are all -inf (masked tokens) then
    // computes exp(-inf - (-FLT_MAX)) = 0 rather than exp(-inf + inf) = NaN
    const __m512 lowest = _mm512_set1_ps(-FLT_MAX);
    __m512 m = lowest, s = _mm512_setzero_ps();
    int64_t i = 0;
    if (V >= 64) {
        m = _mm512_max_ps(lowest, _mm512_max_ps(_mm512_max_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)),
                                                _mm512_max_ps(_mm512_loadu_ps(x + 32), _mm512_loadu_ps(x + 48))));
        for (; i + 64 <= V; i += 64) {
            const __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
            const __m512 x2 = _mm512_loadu_ps(x + i + 32), x3 = _mm512_loadu_ps(x + i + 48);
            const __m512 bm = _mm512_max_ps(_mm512_max_ps(x0, x1), _mm512_max_ps(x2, x3));
            if (_mm512_cmp_ps_mask(bm, m, _CMP_GT_OQ)) {
                const __m512 nm = _mm512_max_ps(m, bm);
                s = _mm512_mul_ps(s, exp512(_mm512_sub_ps(m, nm)));
                m = nm;
            }
            const __m512 e01 = _mm512_add_ps(exp512(_mm512_sub_ps(x0, m)), exp512(_mm512_sub_ps(x1, m)));
            const __m512 e23 = _mm512_add_ps(exp512(_mm512_sub_ps(x2, m)), exp512(_mm512_sub_ps(x3, m)));
            s = _mm512_add_ps(s, _mm512_add_ps(e01, e23));
        }
    }
    for (; i < V; i += 16) {  // tail: up to 4 (partly masked) vectors
        const __mmask16 k = tail_mask16(V - i);
        const __m512 xv = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), k, x + i);
        const __m512 nm = _mm512_max_ps(m, xv);
        // lanes still at -inf (never saw data) keep s = 0: mask the rescale there to avoid inf - inf;
        // "not equal, unordered" keeps NaN lanes live so that a NaN logit poisons the loss
        const __mmask16 live = _mm512_cmp_ps_mask(nm, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
        s = _mm512_maskz_mul_ps(live, s, exp512(_mm512_sub_ps(m, nm)));
        m = nm;
        s = _mm512_add_ps(s, _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(xv, m))));
    }
    const float M = _mm512_reduce_max_ps(m);
    const __mmask16 live = _mm512_cmp_ps_mask(m, _mm512_set1_ps(-INFINITY), _CMP_NEQ_UQ);
    const float S = _mm512_reduce_add_ps(_mm512_maskz_mul_ps(live, s, exp512(_mm512_sub_ps(m, _mm512_set1_ps(M)))));
    const float logS = std::log(S);
    *loss = (M - x[tgt]) + logS;  // lse = M + logS, kept apart for accuracy at large |logits|
    if (!d) return;
    // pass 2: d = exp((x - M) - logS) * grad_scale
    const __m512 vm = _mm512_set1_ps(M), vl = _mm512_set1_ps(logS), vg = _mm512_set1_ps(grad_scale);
    i = 0;
    if (stream) {  // non-temporal stores (no read-for-ownership of d): peel to 64-byte alignment first
        const int64_t head = std::min<int64_t>(V, ((64 - (int64_t)((uintptr_t)d & 63)) & 63) / 4);
        if (head) {
            const __mmask16 k = tail_mask16(head);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x), vm), vl));
            _mm512_mask_storeu_ps(d, k, _mm512_mul_ps(e, vg));
            i = head;
        }
        for (; i + 16 <= V; i += 16) {
            const __m512 e = exp512(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vl));
            _mm512_stream_ps(d + i, _mm512_mul_ps(e, vg));
        }
        _mm_sfence();
    }
    for (; i + 32 <= V; i += 32) {
        const __m512 e0 = exp512(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), vm), vl));
        const __m512 e1 = exp512(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i + 16), vm), vl));
        _mm512_storeu_ps(d + i, _mm512_mul_ps(e0, vg));
        _mm512_storeu_ps(d + i + 16, _mm512_mul_ps(e1, vg));
    }
    for (; i < V; i += 16) {
        const __mmask16 k = tail_mask16(V - i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + i), vm), vl));
        _mm512_mask_storeu_ps(d + i, k, _mm512_mul_ps(e, vg));
    }
    d[tgt] -= grad_scale;
}

// ---------------------------------------------------------------------------------------------------------
// AVX2 + FMA: same algorithm, 8 lanes

FASTLLM_TARGET_AVX2 static void softmax_ce_row_avx2(float* loss, float* d, const float* x, int64_t V,
                                                    int32_t tgt, float grad_scale) {
    using namespace vec;
    const __m256 ninf = _mm256_set1_ps(-INFINITY), lowest = _mm256_set1_ps(-FLT_MAX);  // -FLT_MAX: see avx512
    __m256 m = lowest, s = _mm256_setzero_ps();
    int64_t i = 0;
    if (V >= 32) {
        m = _mm256_max_ps(lowest, _mm256_max_ps(_mm256_max_ps(_mm256_loadu_ps(x), _mm256_loadu_ps(x + 8)),
                                                _mm256_max_ps(_mm256_loadu_ps(x + 16), _mm256_loadu_ps(x + 24))));
        for (; i + 32 <= V; i += 32) {
            const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            const __m256 x2 = _mm256_loadu_ps(x + i + 16), x3 = _mm256_loadu_ps(x + i + 24);
            const __m256 bm = _mm256_max_ps(_mm256_max_ps(x0, x1), _mm256_max_ps(x2, x3));
            if (_mm256_movemask_ps(_mm256_cmp_ps(bm, m, _CMP_GT_OQ))) {
                const __m256 nm = _mm256_max_ps(m, bm);
                s = _mm256_mul_ps(s, exp256(_mm256_sub_ps(m, nm)));
                m = nm;
            }
            const __m256 e01 = _mm256_add_ps(exp256(_mm256_sub_ps(x0, m)), exp256(_mm256_sub_ps(x1, m)));
            const __m256 e23 = _mm256_add_ps(exp256(_mm256_sub_ps(x2, m)), exp256(_mm256_sub_ps(x3, m)));
            s = _mm256_add_ps(s, _mm256_add_ps(e01, e23));
        }
    }
    for (; i < V; i += 8) {
        const int64_t k = std::min<int64_t>(8, V - i);
        const __m256 kmask = _mm256_castsi256_ps(tail_mask8(k));
        const __m256 xv = _mm256_blendv_ps(ninf, _mm256_maskload_ps(x + i, tail_mask8(k)), kmask);
        const __m256 nm = _mm256_max_ps(m, xv);
        const __m256 live = _mm256_cmp_ps(nm, ninf, _CMP_NEQ_UQ);
        s = _mm256_and_ps(live, _mm256_mul_ps(s, exp256(_mm256_sub_ps(m, nm))));
        m = nm;
        s = _mm256_add_ps(s, _mm256_and_ps(kmask, exp256(_mm256_sub_ps(xv, m))));
    }
    const float M = hmax256(m);
    const __m256 live = _mm256_cmp_ps(m, ninf, _CMP_NEQ_UQ);
    const float S = hsum256(_mm256_and_ps(live, _mm256_mul_ps(s, exp256(_mm256_sub_ps(m, _mm256_set1_ps(M))))));
    const float logS = std::log(S);
    *loss = (M - x[tgt]) + logS;
    if (!d) return;
    const __m256 vm = _mm256_set1_ps(M), vl = _mm256_set1_ps(logS), vg = _mm256_set1_ps(grad_scale);
    i = 0;
    for (; i + 16 <= V; i += 16) {
        const __m256 e0 = exp256(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vm), vl));
        const __m256 e1 = exp256(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), vm), vl));
        _mm256_storeu_ps(d + i, _mm256_mul_ps(e0, vg));
        _mm256_storeu_ps(d + i + 8, _mm256_mul_ps(e1, vg));
    }
    for (; i < V; i += 8) {
        const __m256i k = tail_mask8(std::min<int64_t>(8, V - i));
        const __m256 e = exp256(_mm256_sub_ps(_mm256_sub_ps(_mm256_maskload_ps(x + i, k), vm), vl));
        _mm256_maskstore_ps(d + i, k, _mm256_mul_ps(e, vg));
    }
    d[tgt] -= grad_scale;
}

// ---------------------------------------------------------------------------------------------------------
// logit soft-capping (Gemma 2, nanochat): z = c tanh(x / c) (vec::softcap_row), and dz/dx = 1 - (z / c)^2 applied to
// a gradient row

// inv maps the buffer's values to z / c: 1 / c, or T / c when the buffer holds u = z / T
static void softcap_grad_row(float* d, const float* z, int64_t V, float inv) {
#pragma omp simd
    for (int64_t i = 0; i < V; i++) {
        const float t = z[i] * inv;
        d[i] *= 1.0f - t * t;
    }
}

// u = z * inv_t (the temperature): in place on the capped row, or from the logits into the buffer (no cap)
static void scale_row(float* u, const float* z, int64_t V, float inv_t) {
#pragma omp simd
    for (int64_t i = 0; i < V; i++) u[i] = z[i] * inv_t;
}

// ---------------------------------------------------------------------------------------------------------
// entry points

void softmax_ce(float* losses, float* dlogits, const float* logits, const int32_t* targets, int64_t N, int64_t V,
                float grad_scale, int32_t ignore_index, const float* row_weights, float softcap, float temperature) {
    const Simd simd = simd_level();
    // Out of place and larger than the caches: stream dlogits past the cache (saves the read-for-ownership of
    // every written line, ~15% at N x V = 2048 x 50304); in place, the lines are already owned. Not with a softcap
    // (its second pass reads the gradient row back).
    const bool capped = softcap > 0.0f, tempered = temperature != 1.0f;
    const float inv_t = 1.0f / temperature;
    const float cap_inv = tempered ? temperature / softcap : 1.0f / softcap;  // buffer value -> z / c (if capped)
    const bool stream = dlogits && dlogits != logits && N * V >= (int64_t)(8 << 20) && !capped;
#pragma omp parallel
    {
        // this thread's capped and/or tempered row (the row routines read it)
        std::vector<float> z(capped || tempered ? (size_t)V : 0);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const float* x = logits + n * V;
            float* d = dlogits ? dlogits + n * V : nullptr;
            const int32_t tgt = targets[n];
            if (tgt == ignore_index) {
                losses[n] = 0.0f;
                if (d) std::fill(d, d + V, 0.0f);
                continue;
            }
            if (capped) {
                vec::softcap_row(z.data(), x, V, softcap, simd);
                x = z.data();
            }
            if (tempered) {
                scale_row(z.data(), x, V, inv_t);
                x = z.data();
            }
            float gs = row_weights ? grad_scale * row_weights[n] : grad_scale;
            if (tempered) gs *= inv_t;  // d u / d z
            if (simd == Simd::avx512)
                softmax_ce_row_avx512(losses + n, d, x, V, tgt, gs, stream);
            else if (simd == Simd::avx2)
                softmax_ce_row_avx2(losses + n, d, x, V, tgt, gs);
            else
                softmax_ce_row_naive(losses + n, d, x, V, tgt, gs);
            if (capped && d) softcap_grad_row(d, z.data(), V, cap_inv);
        }
    }
}

int64_t lmhead_chunk_rows(int64_t N, int64_t V) {
    // Up to 256 MiB of logits, 256..1024 rows (a multiple of 64). Each chunk re-packs W twice (forward, dhidden) and
    // reads and writes all of dW (its K is the chunk's rows), so bigger chunks pay: N = 2048 rows, C = 384, 2 threads,
    // Zen 4, bf16: V = 50257 825 ms at 256 rows, 734 at 512, 684 at 1024; V = 4096 68 -> 63 ms.
    const int64_t rows = std::clamp<int64_t>((int64_t(1) << 26) / std::max<int64_t>(V, 1) / 64 * 64, 256, 1024);
    return std::max<int64_t>(1, std::min(rows, N));
}

void lmhead_ce(float* losses, float* dhidden, float* dweight, const float* hidden, const float* weight,
               const int32_t* targets, float* scratch, int64_t chunk_rows, int64_t N, int64_t C, int64_t V,
               float grad_scale, int32_t ignore_index, const float* row_weights, float softcap, float temperature,
               Prec prec) {
    if (N == 0) return;
    const int64_t rows = std::min(chunk_rows, N);
    float* logits = scratch;  // rows x V, not zero-filled (every chunk overwrites what it uses)
    const bool backward = dhidden || dweight;
    for (int64_t n0 = 0; n0 < N; n0 += rows) {
        const int64_t n = std::min(rows, N - n0);
        matmul_forward(logits, hidden + n0 * C, weight, nullptr, nullptr, n, C, V, prec);
        // in place: logits -> dlogits for this chunk
        softmax_ce(losses + n0, backward ? logits : nullptr, logits, targets + n0, n, V, grad_scale, ignore_index,
                   row_weights ? row_weights + n0 : nullptr, softcap, temperature);
        if (backward)  // accumulates: dhidden rows of this chunk, and dW summed over all chunks
            matmul_backward(dhidden ? dhidden + n0 * C : nullptr, dweight, nullptr, logits, hidden + n0 * C,
                            weight, n, C, V, prec);
    }
}

}  // namespace fastllm::cpu
