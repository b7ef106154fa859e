/*
Rotary position embedding (Su et al. 2021, RoFormer), in the rotate-half layout of HF Llama/Qwen/Mistral
(apply_rotary_pos_emb with rotate_half), applied to the q and k heads of the packed qkv buffer
(B, T, (NH + 2*NKV) * hs) that the attention reads. For token t of sequence b at position p = pos[b] + t:
  x1 = x[:R2], x2 = x[R2:2R2]   ->   out1 = x1 cos[p] - x2 sin[p],   out2 = x2 cos[p] + x1 sin[p]
with cos, sin (P, R2) tables computed once in Python (fastllm/rope.py: rope_theta, Llama 3's rope_scaling, partial
rotary dims R2 < hs/2), so the kernels need no trigonometry and match HF's float32 tables exactly. Dims past 2*R2
of q and k, and all of v, pass through. The backward is the transposed rotation (RoPE is linear and orthogonal:
no saved activations): dx1 = dy1 cos + dy2 sin, dx2 = dy2 cos - dy1 sin, accumulated (+=) or, when dinp is dout,
in place. O(B*T*(NH+NKV)*hs), memory bound: one read and one write of each q/k element (plus the table row,
shared by the token's heads, from cache).

Why its own op and not fused into attention: measured (benchmarks/bench_rope.py) at a few percent of the
attention forward's time at training shapes (T >= 256), while fusing would add the rotation to every attention
kernel (CPU tiles, CUDA rows and tensor-core paths, the KV cache) and to their backwards. The KV cache stores
rotated keys (as HF does), so decoding rotates only the new token.
CPU: OpenMP over tokens (serial below 32 Ki elements); the per-head loop is written once (`omp simd`) and compiled
for AVX-512, AVX2 and the baseline, chosen at run time.
*/
#include "rope.h"

#include <algorithm>

#include "common.h"

namespace fastllm::cpu {

// ---------------------------------------------------------------------------------------------------------
// one token: its q and k heads (NQK = NH + NKV of them, hs apart), then v. SIGN = +1 rotates by +angle (forward),
// -1 by -angle (backward); ACC adds into o (backward into a separate dinp) instead of writing it.

template <int SIGN, bool ACC>
static FASTLLM_INLINE void rope_token(float* o, const float* x, const float* c, const float* s, int64_t NQK,
                                      int64_t NV, int64_t hs, int64_t R2) {
    for (int64_t h = 0; h < NQK; h++) {
        const float* xh = x + h * hs;
        float* oh = o + h * hs;
#pragma omp simd
        for (int64_t i = 0; i < R2; i++) {
            const float x1 = xh[i], x2 = xh[i + R2];
            const float o1 = x1 * c[i] - SIGN * x2 * s[i];
            const float o2 = x2 * c[i] + SIGN * x1 * s[i];
            if (ACC) oh[i] += o1, oh[i + R2] += o2;
            else oh[i] = o1, oh[i + R2] = o2;
        }
        if (ACC || oh != xh) {
#pragma omp simd
            for (int64_t i = 2 * R2; i < hs; i++) oh[i] = ACC ? oh[i] + xh[i] : xh[i];
        }
    }
    if (ACC || o != x) {  // v heads
        const int64_t off = NQK * hs, n = NV * hs;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) o[off + i] = ACC ? o[off + i] + x[off + i] : x[off + i];
    }
}

template <int SIGN, bool ACC>
static FASTLLM_INLINE void rope_tokens(float* out, const float* inp, const float* cos, const float* sin,
                                       const int32_t* pos, int64_t n0, int64_t n1, int64_t T, int64_t NH, int64_t NKV,
                                       int64_t hs, int64_t R2) {
    const int64_t W = (NH + 2 * NKV) * hs;
    for (int64_t n = n0; n < n1; n++) {
        const int64_t b = n / T, t = n % T, p = (pos ? pos[b] : 0) + t;
        rope_token<SIGN, ACC>(out + n * W, inp + n * W, cos + p * R2, sin + p * R2, NH + NKV, NKV, hs, R2);
    }
}

#define ROPE_ISA(NAME, TARGET)                                                                                       \
    template <int SIGN, bool ACC>                                                                                    \
    TARGET static void NAME(float* out, const float* inp, const float* cos, const float* sin, const int32_t* pos,   \
                            int64_t n0, int64_t n1, int64_t T, int64_t NH, int64_t NKV, int64_t hs, int64_t R2) {    \
        rope_tokens<SIGN, ACC>(out, inp, cos, sin, pos, n0, n1, T, NH, NKV, hs, R2);                                 \
    }
ROPE_ISA(rope_avx512, FASTLLM_TARGET_AVX512)
ROPE_ISA(rope_avx2, FASTLLM_TARGET_AVX2)
ROPE_ISA(rope_base, )
#undef ROPE_ISA

static constexpr int64_t kParallelMin = 32768;  // elements; below: one thread

template <int SIGN, bool ACC>
static void rope_run(float* out, const float* inp, const float* cos, const float* sin, const int32_t* pos, int64_t B,
                     int64_t T, int64_t NH, int64_t NKV, int64_t hs, int64_t R2) {
    const int64_t N = B * T;
    if (N <= 0) return;
    const Simd simd = simd_level();
#pragma omp parallel if (N * (NH + 2 * NKV) * hs >= kParallelMin)
    {
        int64_t n0, n1;
        thread_rows(N, n0, n1);
        if (simd == Simd::avx512) rope_avx512<SIGN, ACC>(out, inp, cos, sin, pos, n0, n1, T, NH, NKV, hs, R2);
        else if (simd == Simd::avx2) rope_avx2<SIGN, ACC>(out, inp, cos, sin, pos, n0, n1, T, NH, NKV, hs, R2);
        else rope_base<SIGN, ACC>(out, inp, cos, sin, pos, n0, n1, T, NH, NKV, hs, R2);
    }
}

// ---------------------------------------------------------------------------------------------------------
// entry points

void rope_forward(float* out, const float* inp, const float* cos, const float* sin, const int32_t* pos, int64_t B,
                  int64_t T, int64_t NH, int64_t NKV, int64_t hs, int64_t R2) {
    rope_run<1, false>(out, inp, cos, sin, pos, B, T, NH, NKV, hs, R2);
}

void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, const int32_t* pos, int64_t B,
                   int64_t T, int64_t NH, int64_t NKV, int64_t hs, int64_t R2) {
    if (dinp == dout) rope_run<-1, false>(dinp, dout, cos, sin, pos, B, T, NH, NKV, hs, R2);
    else rope_run<-1, true>(dinp, dout, cos, sin, pos, B, T, NH, NKV, hs, R2);
}

}  // namespace fastllm::cpu
