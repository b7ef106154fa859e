/*
Causal self-attention with grouped KV heads on packed qkv on the GPU: the twin of csrc/cpu/attention.cpp (same
layout, same semantics). Row t of batch b holds [q (C = NH*hs) | k (NKV*hs) | v (NKV*hs)], NKV dividing NH; query
head h uses kv head h / (NH/NKV) (G = NH/NKV query heads per kv head; NKV = NH is multi-head attention on (B, T, 3C),
NKV = 1 multi-query); K/V are never repeated in memory. out (B, T, C) = softmax(q k^T * scale + causal mask) v;
lse (B, NH, T) = the natural-log logsumexp of the final scores, saved for the backward, which recomputes the
probabilities from it and ACCUMULATES (+=) dq, dk, dv into dqkv (dk, dv of a kv head summed over its G query heads).
O(B*NH*T^2*hs) flops (causal: fwd 2*B*NH*T^2*hs, bwd ~2.5x), never a T x T matrix in memory.

Two implementations (launchers at the end pick one; FASTLLM_CUDA_ATTN=simple in the environment forces the
simple one, so tests can compare both on the GPU):

1. "rows" kernels, the simple reference: any head size hs <= 256 (per-lane register slices of hs/32 rounded up to
   1, 2, 4, 8), float32 and bfloat16, fp32 math. The fp32 path, and the fallback for bf16 with hs not 64/128.
   forward : one block (4 warps) per query row (b, h, t); the warps take interleaved groups of 32 keys; per group
             each lane computes partial dots of its hs/32 slice with all 32 keys and a transpose-reduce of 31
             shuffles leaves lane j with the score of key j (coalesced key loads, no shared memory); online softmax
             in base 2 (scale*log2(e) folded into q); the 4 warps' (max, sum, acc) are merged in shared memory.
             The same kernel serves attention_kv_forward (keys from the cache, row length pos[b] + t + 1, key s at
             cache row s % maxT: a ring cache reads a chunk as at most two contiguous row ranges) and
             splits long rows over several blocks (flash-decoding: partial (max, sum, acc) to a scratch buffer,
             then a merge kernel) when there are too few rows to fill the GPU.
   backward: D = rowsum(dout * out) (a preprocessing kernel, shared with the fast path); dq by rows (one block per
             query, P and dP recomputed from lse, dq += dS k) and dk, dv by columns (one block per key of a kv head,
             over the queries t >= s of its G query heads); every gradient element is owned by one block: no
             atomics, deterministic.
2. FlashAttention-2 style tensor-core kernels for bfloat16 and hs = 64 or 128 (mma.sync.m16n8k16 bf16 -> fp32,
   ldmatrix, cp.async double buffering; sm_80 and sm_90, no wgmma/TMA):
   forward : a block owns BR = 16*MI*NW query rows of one (b, h) (NW warps, each MI m16 row blocks); key tiles
             of BC keys (K, V with cp.async into a second buffer while the current tile is used) up to the
             diagonal only; S = Q K^T (ldmatrix), online softmax on the accumulator fragments in
             fp32 (exp2f, scale folded in; row max/sum over the 4 lanes of a quad), P packed to bf16 in registers
             as the A operand of O += P V (V by ldmatrix.trans). Only the diagonal tiles (and the tile crossing T)
             are masked; warps whose rows all precede a tile skip it. Blocks are ordered heaviest (last query tile)
             first. Rows of smem tiles are padded by 16 bytes: conflict-free ldmatrix without swizzling.
   backward: preprocessing kernel D = rowsum(dO * O) (fp32) that also zeroes an fp32 dq scratch (B, T, C); main
             kernel per (b, kv head, key tile of BK = 16*NW keys; warp w owns keys 16w..16w+15): K, V loaded once,
             then for each of the G query heads of the kv head it loops over query tiles of BQ from the diagonal
             down (dK, dV keep accumulating in registers across the heads): S^T = K Q^T, P^T = exp2(S^T*c - lse),
             dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - D), dK += dS^T Q (P^T and dS^T are reused from registers as A operands); dS^T goes
             through shared memory (bf16) to give dQ = dS K, split over the warps and added to the fp32 scratch
             with atomicAdd (red.global); a last kernel adds scale * scratch into dqkv's q part. dK (times the
             scale) and dV are added into dqkv at the end. The dq atomics make this path's dq bits depend on the
             order of the atomics (not deterministic); dk, dv are. The simple path is fully deterministic.
   Tiles (FlashCfg below): forward 128 query rows x 4 warps (32 rows per warp, which halves the shared-memory
   traffic of K and V per flop against 16 rows); key tiles of 64 for hs=64 (Q fragments kept in registers) and of
   32 for hs=128 (Q fragments re-read from smem each tile: registers). Backward 64 keys x 4 warps, query tiles of
   64 (hs=64) or 32 (hs=128). All indices are bounds-checked for T not a multiple of a tile (zero-filled rows,
   masked scores, guarded stores). tests/test_attention.py runs them on the CUDA emulator (csrc/cuda/emu).
Score options (AttentionOpts, common.h; the CPU file is the spec): scale (default 1/sqrt(hs)), softcap (score ->
softcap * tanh(score / softcap), tanh from __expf as softmax_ce's, never tanhf; the backward multiplies dS by
1 - tanh^2) and a sliding window (query t sees keys t - window < s <= t). The rows kernels start each row at the first
key of its window (the dk/dv kernel ends each key's queries at its window), the tensor-core kernels skip the key
tiles (forward) and query tiles (backward) wholly outside it and mask the partial ones. The tensor-core kernels
have a template flag for "cap or window in use" (the plain instantiation is the code without them) and the rows
kernels a warp-uniform branch per 32 keys for the cap.
Scratch buffers (D, dq accumulator, split partials) come from cudaMallocAsync on the default stream (stream-ordered,
no host sync, pooled by the driver).

Perf notes: not yet measured (written on a machine without a GPU; correctness of the fragment index math checked
on the CUDA emulator only); see benchmarks/bench_attention.py --device cuda. Resource usage from ptxas (-Xptxas -v) is
recorded next to the launch configuration (FlashCfg) below; tiles are the first thing to tune on the GPU.
*/
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

namespace fastllm::cuda {

namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------------------------------------------------
// helpers

// Transpose-reduce: on entry lane L holds v[j] = its partial sum for item j (j = 0..31); on exit lane j holds, in
// v[0], the sum over all lanes of item j. Step O halves the live items: a lane keeps the half selected by its bit O
// and adds its partner's copy of that half (31 shuffles in all instead of 32 warp_sums of 5).
template <int O>
__device__ __forceinline__ void transpose_step(float (&v)[32], int lane) {
    const bool upper = lane & O;
#pragma unroll
    for (int i = 0; i < O; i++) {
        const float send = upper ? v[i] : v[i + O];
        const float keep = upper ? v[i + O] : v[i];
        v[i] = keep + __shfl_xor_sync(kFull, send, O);
    }
}
__device__ __forceinline__ float transpose_sum32(float (&v)[32], int lane) {
    transpose_step<16>(v, lane);
    transpose_step<8>(v, lane);
    transpose_step<4>(v, lane);
    transpose_step<2>(v, lane);
    transpose_step<1>(v, lane);
    return v[0];
}

// Lane j returns dot(x, rows[j]) for j < n (x: this lane's slice x[i] = X[lane + 32 i], zero past hs); rows are
// `stride` elements apart, n <= 32 (warp-uniform); lanes j >= n return 0.
template <int NPL, typename T>
__device__ __forceinline__ float dot_rows32(const float (&x)[NPL], const T* rows, int64_t stride, int n, int hs,
                                            int lane) {
    float v[32];
#pragma unroll
    for (int j = 0; j < 32; j++) {
        float s = 0.f;
        if (j < n) {
            const T* r = rows + j * stride;
#pragma unroll
            for (int i = 0; i < NPL; i++) {
                const int d = lane + 32 * i;
                if (d < hs) s = fmaf(x[i], to_f32(r[d]), s);
            }
        }
        v[j] = s;
    }
    return transpose_sum32(v, lane);
}

template <int NPL, typename T>
__device__ __forceinline__ void load_slice(float (&x)[NPL], const T* row, int hs, int lane, float mul) {
#pragma unroll
    for (int i = 0; i < NPL; i++) {
        const int d = lane + 32 * i;
        x[i] = d < hs ? to_f32(row[d]) * mul : 0.f;
    }
}

// acc[i] += sum_{j < n} w_j * rows[j][lane + 32 i], where w_j is lane j's `w` (n warp-uniform)
template <int NPL, typename T>
__device__ __forceinline__ void axpy_rows32(float (&acc)[NPL], float w, const T* rows, int64_t stride, int n, int hs,
                                            int lane) {
#pragma unroll
    for (int j = 0; j < 32; j++) {
        if (j < n) {
            const float wj = __shfl_sync(kFull, w, j);
            const T* r = rows + j * stride;
#pragma unroll
            for (int i = 0; i < NPL; i++) {
                const int d = lane + 32 * i;
                if (d < hs) acc[i] = fmaf(wj, to_f32(r[d]), acc[i]);
            }
        }
    }
}

// exp2(a - b) with 2^(-inf - x) = 0, also for a = b = -inf (an empty state merged with another empty state)
__device__ __forceinline__ float exp2_diff(float a, float b) { return a == -INFINITY ? 0.f : exp2f(a - b); }

// Stream-ordered device scratch on the default stream. The first use on a device raises the release threshold
// of its default memory pool, so that freed scratch stays reserved for the next call instead of going back to the
// driver at every synchronisation (the pool then holds at most the largest scratch used, e.g. B*T*C*4 bytes).
struct Scratch {
    void* p = nullptr;
    explicit Scratch(size_t bytes) {
        if (!bytes) return;
        static bool configured[64] = {};
        int dev = 0;
        CUDA_CHECK(cudaGetDevice(&dev));
        if (dev < 64 && !configured[dev]) {
            cudaMemPool_t pool;
            CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, dev));
            uint64_t keep = UINT64_MAX;
            CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
            configured[dev] = true;
        }
        CUDA_CHECK(cudaMallocAsync(&p, bytes, 0));
    }
    ~Scratch() {
        if (p) cudaFreeAsync(p, 0);
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
};

bool force_simple() {
    const char* e = std::getenv("FASTLLM_CUDA_ATTN");
    return e && std::strcmp(e, "simple") == 0;
}

bool aligned(const void* p, size_t a) { return ((uintptr_t)p % a) == 0; }

int sm_count() {
    int dev = 0, n = 0;
    CUDA_CHECK(cudaGetDevice(&dev));
    CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
    return n > 0 ? n : 1;
}

// ---------------------------------------------------------------------------------------------------------
// 1. simple "rows" kernels (any hs <= 256, float32 and bfloat16)

constexpr int kRowWarps = 4;      // warps per block of the rows kernels
constexpr int kRowMinBlocks = 4;  // forward: <= 128 registers, 16 warps per SM (no spills; the backward kernels,
                                  // with two 32-key dot products in flight, would spill at 128 and keep <= 255)

struct RowsParams {
    const void* q;  // query row (b, t, h) at q + b*q_sb + t*q_st + h*hs
    int64_t q_sb, q_st;
    const void* k;  // key s of (b, h) at k + b*kv_sb + (h / group)*kv_sh + s*kv_st (v likewise)
    const void* v;
    int64_t kv_sb, kv_sh, kv_st;
    void* out;  // output row (b, t, h) at out + b*o_sb + t*o_st + h*hs
    int64_t o_sb, o_st;
    float* lse;          // (B, NH, Tn) natural-log logsumexp, or nullptr
    const int32_t* pos;  // nullptr: row t sees keys 0..t; else keys 0..pos[b]+t (the KV cache)
    int64_t maxT;        // key position s is at row s % maxT (a ring cache with a window); no row >= maxT is read
    float* part;         // split partials (rows, nsplit, hs + 2) or nullptr (nsplit == 1)
    int NH, Tn, hs, chunk, nsplit;
    int group;  // query heads per kv head (NH / NKV)
    float scale_log2;
    float cap2;  // softcap * log2(e) (scores are in base-2 units here), 0: no cap
    int window;  // row t sees keys pos + t - window < s (sliding window, <= maxT), 0: all
};

// A score in base-2 units (scale * log2(e) folded into q) soft-capped: cap2 * tanh(sc / cap2), cap2 = softcap * log2(e)
__device__ __forceinline__ float cap_score(float sc, float cap2) { return cap2 * tanh_accurate(sc / cap2); }

// the first key position query t sees: 0, or t - window + 1 with a sliding window
__device__ __forceinline__ int64_t first_key(int64_t t, int window) {
    return window > 0 && t - window + 1 > 0 ? t - window + 1 : 0;
}

// grid (B*NH*Tn, nsplit), block 32*kRowWarps, dynamic smem kRowWarps*(hs+2) floats
template <typename T, int NPL>
__global__ void __launch_bounds__(32 * kRowWarps, kRowMinBlocks) rows_forward_kernel(RowsParams p) {
    extern __shared__ float rsm[];  // per warp: m, l, acc[hs]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t row = blockIdx.x;
    const int t = (int)(row % p.Tn);
    const int64_t bh = row / p.Tn;
    const int h = (int)(bh % p.NH);
    const int64_t b = bh / p.NH;
    const int split = blockIdx.y;

    int64_t L = (p.pos ? (int64_t)p.pos[b] : 0) + t + 1;  // keys 0..L-1 (the last `window` of them)
    L = L < 0 ? 0 : (p.window == 0 && L > p.maxT ? p.maxT : L);
    // this block's chunk of the row's keys: positions s_begin .. s_end-1 (chunks laid from the row's first key), at
    // rows s % maxT: rows r_begin .. r_begin+n1-1, then 0 .. n-n1-1 where a ring cache wraps
    const int64_t s_begin = first_key(L - 1, p.window) + (int64_t)split * p.chunk;
    const int64_t n = (L < s_begin + p.chunk ? L : s_begin + p.chunk) - s_begin;  // <= 0: an empty chunk
    const int64_t r_begin = s_begin < p.maxT ? s_begin : s_begin % p.maxT;
    const int64_t n1 = n < p.maxT - r_begin ? n : p.maxT - r_begin;

    float x[NPL], acc[NPL];
    load_slice(x, (const T*)p.q + b * p.q_sb + t * p.q_st + (int64_t)h * p.hs, p.hs, lane, p.scale_log2);
#pragma unroll
    for (int i = 0; i < NPL; i++) acc[i] = 0.f;
    float m = -INFINITY, l = 0.f;  // running max (base-2 units) and this lane's part of the running sum
    const T* kb = (const T*)p.k + b * p.kv_sb + (h / p.group) * p.kv_sh;
    const T* vb = (const T*)p.v + b * p.kv_sb + (h / p.group) * p.kv_sh;
    for (int seg = 0; seg < 2; seg++) {
        const int64_t r0 = seg ? 0 : r_begin, r_end = seg ? n - n1 : r_begin + n1;
        for (int64_t s0 = r0 + 32 * warp; s0 < r_end; s0 += 32 * kRowWarps) {  // rows s0 .. s0+nr-1
            const int nr = (int)(r_end - s0 < 32 ? r_end - s0 : 32);
            float sc = dot_rows32(x, kb + s0 * p.kv_st, p.kv_st, nr, p.hs, lane);
            if (p.cap2 > 0.f) sc = cap_score(sc, p.cap2);
            if (lane >= nr) sc = -INFINITY;
            const float m_new = fmaxf(m, warp_max(sc));  // finite: nr >= 1
            const float alpha = exp2_diff(m, m_new);
            const float pr = exp2f(sc - m_new);  // 0 for lanes >= nr
            l = l * alpha + pr;
#pragma unroll
            for (int i = 0; i < NPL; i++) acc[i] *= alpha;
            axpy_rows32(acc, pr, vb + s0 * p.kv_st, p.kv_st, nr, p.hs, lane);
            m = m_new;
        }
    }
    l = warp_sum(l);

    // merge the warps' states
    float* mine = rsm + warp * (p.hs + 2);
    if (lane == 0) mine[0] = m, mine[1] = l;
#pragma unroll
    for (int i = 0; i < NPL; i++) {
        const int d = lane + 32 * i;
        if (d < p.hs) mine[2 + d] = acc[i];
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < kRowWarps; w++) M = fmaxf(M, rsm[w * (p.hs + 2)]);
    float f[kRowWarps], Lsum = 0.f;
    for (int w = 0; w < kRowWarps; w++) {
        f[w] = exp2_diff(rsm[w * (p.hs + 2)], M);
        Lsum += rsm[w * (p.hs + 2) + 1] * f[w];
    }
    if (p.part) {
        float* dst = p.part + (row * p.nsplit + split) * (int64_t)(p.hs + 2);
        if (threadIdx.x == 0) dst[0] = M, dst[1] = Lsum;
        for (int d = threadIdx.x; d < p.hs; d += blockDim.x) {
            float o = 0.f;
            for (int w = 0; w < kRowWarps; w++) o += rsm[w * (p.hs + 2) + 2 + d] * f[w];
            dst[2 + d] = o;
        }
        return;
    }
    const float inv = Lsum > 0.f ? 1.f / Lsum : 0.f;
    T* o = (T*)p.out + b * p.o_sb + t * p.o_st + (int64_t)h * p.hs;
    for (int d = threadIdx.x; d < p.hs; d += blockDim.x) {
        float s = 0.f;
        for (int w = 0; w < kRowWarps; w++) s += rsm[w * (p.hs + 2) + 2 + d] * f[w];
        o[d] = from_f32<T>(s * inv);
    }
    if (p.lse && threadIdx.x == 0) p.lse[bh * p.Tn + t] = (M + log2f(Lsum)) * kLn2;
}

// merges the nsplit partial states of each row: grid B*NH*Tn, block 128
template <typename T>
__global__ void rows_merge_kernel(RowsParams p) {
    const int64_t row = blockIdx.x;
    const int t = (int)(row % p.Tn);
    const int64_t bh = row / p.Tn;
    const int h = (int)(bh % p.NH);
    const int64_t b = bh / p.NH;
    const float* part = p.part + row * p.nsplit * (int64_t)(p.hs + 2);
    float M = -INFINITY;
    for (int s = 0; s < p.nsplit; s++) M = fmaxf(M, part[s * (p.hs + 2)]);
    float Lsum = 0.f;
    for (int s = 0; s < p.nsplit; s++) Lsum += part[s * (p.hs + 2) + 1] * exp2_diff(part[s * (p.hs + 2)], M);
    const float inv = Lsum > 0.f ? 1.f / Lsum : 0.f;
    T* o = (T*)p.out + b * p.o_sb + t * p.o_st + (int64_t)h * p.hs;
    for (int d = threadIdx.x; d < p.hs; d += blockDim.x) {
        float s = 0.f;
        for (int k = 0; k < p.nsplit; k++) s += part[k * (p.hs + 2) + 2 + d] * exp2_diff(part[k * (p.hs + 2)], M);
        o[d] = from_f32<T>(s * inv);
    }
    if (p.lse && threadIdx.x == 0) p.lse[bh * p.Tn + t] = (M + log2f(Lsum)) * kLn2;
}

// kcache/vcache (B, NKV, maxT, hs)[b, hk, (pos[b] + t) % maxT] = k/v of kv head hk of qkv (B, Tn, C + 2*NKV*hs) row
// (b, t); negative positions are skipped (the caller checks kv_rows_fit, common.h, on the host)
template <typename T>
__global__ void kv_append_kernel(T* __restrict__ kcache, T* __restrict__ vcache, const T* __restrict__ qkv,
                                 const int32_t* __restrict__ pos, int64_t B, int64_t Tn, int64_t C, int64_t NKV,
                                 int64_t hs, int64_t maxT) {
    const int64_t KV = NKV * hs, W = C + 2 * KV, n = B * Tn * KV;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t c = i % KV, bt = i / KV, b = bt / Tn, t = bt % Tn;
        const int64_t p = (int64_t)pos[b] + t;
        if (p < 0) continue;
        const int64_t hk = c / hs, d = c % hs;
        const int64_t dst = ((b * NKV + hk) * maxT + (p < maxT ? p : p % maxT)) * hs + d;
        kcache[dst] = qkv[bt * W + C + c];
        vcache[dst] = qkv[bt * W + C + KV + c];
    }
}

// D (B, NH, T) = rowsum(dout * out) per head, fp32; zeroes dq_acc (B, T, C, fp32) if given. One warp per (b, t, h).
template <typename T>
__global__ void attn_bwd_pre_kernel(float* __restrict__ D, float* __restrict__ dq_acc, const T* __restrict__ dout,
                                    const T* __restrict__ out, int64_t rows, int T_, int NH, int hs, int64_t C) {
    const int64_t w = (blockIdx.x * (int64_t)blockDim.x + threadIdx.x) >> 5;
    const int lane = threadIdx.x & 31;
    if (w >= rows) return;  // warp-uniform
    const int h = (int)(w % NH);
    const int64_t bt = w / NH, b = bt / T_, t = bt % T_;
    const int64_t off = bt * C + (int64_t)h * hs;
    float s = 0.f;
    for (int d = lane; d < hs; d += 32) s = fmaf(to_f32(dout[off + d]), to_f32(out[off + d]), s);
    if (dq_acc)
        for (int d = lane; d < hs; d += 32) dq_acc[off + d] = 0.f;
    s = warp_sum(s);
    if (lane == 0) D[(b * NH + h) * T_ + t] = s;
}

// dq by rows: one block per query (b, h, t); dqkv[b, t, h*hs + d] += scale * sum_s dS_ts k_s[d]
// grid B*NH*T, block 32*kRowWarps, dynamic smem kRowWarps*hs floats
template <typename T, int NPL>
__global__ void __launch_bounds__(32 * kRowWarps)
    rows_backward_dq_kernel(T* __restrict__ dqkv, const T* __restrict__ dout, const T* __restrict__ qkv,
                            const float* __restrict__ lse, const float* __restrict__ Dbuf, int T_, int NH, int NKV,
                            int hs, int64_t C, float scale_log2, float scale, float cap2, int window) {
    extern __shared__ float rsm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t row = blockIdx.x;
    const int t = (int)(row % T_);
    const int64_t bh = row / T_;
    const int h = (int)(bh % NH);
    const int64_t b = bh / NH, C3 = C + 2 * (int64_t)NKV * hs;  // the qkv row width
    const T* qrow = qkv + (b * T_ + t) * C3 + (int64_t)h * hs;
    const T* kb = qkv + b * T_ * C3 + C + (int64_t)(h / (NH / NKV)) * hs;
    const T* vb = kb + (int64_t)NKV * hs;
    float x[NPL], g[NPL], acc[NPL];
    load_slice(x, qrow, hs, lane, scale_log2);
    load_slice(g, dout + (b * T_ + t) * C + (int64_t)h * hs, hs, lane, 1.f);
#pragma unroll
    for (int i = 0; i < NPL; i++) acc[i] = 0.f;
    const float lse2 = lse[bh * T_ + t] * kLog2e, Dt = Dbuf[bh * T_ + t];
    for (int s0 = (int)first_key(t, window) + 32 * warp; s0 <= t; s0 += 32 * kRowWarps) {
        const int n = t + 1 - s0 < 32 ? t + 1 - s0 : 32;
        float sc = dot_rows32(x, kb + s0 * C3, C3, n, hs, lane), grad = 1.f;  // grad: d capped / d score
        if (cap2 > 0.f) {
            const float th = tanh_accurate(sc / cap2);
            sc = cap2 * th, grad = 1.f - th * th;
        }
        const float dp = dot_rows32(g, vb + s0 * C3, C3, n, hs, lane);
        const float pr = lane < n ? exp2f(sc - lse2) : 0.f;
        axpy_rows32(acc, pr * (dp - Dt) * grad, kb + s0 * C3, C3, n, hs, lane);
    }
#pragma unroll
    for (int i = 0; i < NPL; i++) {
        const int d = lane + 32 * i;
        if (d < hs) rsm[warp * hs + d] = acc[i];
    }
    __syncthreads();
    T* dq = dqkv + (b * T_ + t) * C3 + (int64_t)h * hs;
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        float s = 0.f;
        for (int w = 0; w < kRowWarps; w++) s += rsm[w * hs + d];
        dq[d] = from_f32<T>(to_f32(dq[d]) + scale * s);
    }
}

// dk, dv by columns: one block per key (b, kv head hk, s) over the queries t >= s of the G = NH/NKV query heads that
// share the kv head. grid B*NKV*T, block 32*kRowWarps, dynamic smem 2*kRowWarps*hs floats
template <typename T, int NPL>
__global__ void __launch_bounds__(32 * kRowWarps)
    rows_backward_dkv_kernel(T* __restrict__ dqkv, const T* __restrict__ dout, const T* __restrict__ qkv,
                             const float* __restrict__ lse, const float* __restrict__ Dbuf, int T_, int NH, int NKV,
                             int hs, int64_t C, float scale_log2, float scale, float cap2, int window) {
    extern __shared__ float rsm[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t row = blockIdx.x;
    const int s = (int)(row % T_);
    const int t_end = window > 0 && s + window < T_ ? s + window : T_;  // the queries that see key s: s .. t_end-1
    const int64_t bk = row / T_;
    const int hk = (int)(bk % NKV), G = NH / NKV;
    const int64_t b = bk / NKV, C3 = C + 2 * (int64_t)NKV * hs;
    const T* kvrow = qkv + (b * T_ + s) * C3 + C + (int64_t)hk * hs;
    float x[NPL], y[NPL], dk[NPL], dv[NPL];
    load_slice(x, kvrow, hs, lane, scale_log2);                   // k_s
    load_slice(y, kvrow + (int64_t)NKV * hs, hs, lane, 1.f);      // v_s
#pragma unroll
    for (int i = 0; i < NPL; i++) dk[i] = dv[i] = 0.f;
    for (int h = hk * G; h < (hk + 1) * G; h++) {
        const T* qb = qkv + b * T_ * C3 + (int64_t)h * hs;  // query t at qb + t*C3
        const T* gb = dout + b * T_ * C + (int64_t)h * hs;  // dout row t at gb + t*C
        const float* lse_b = lse + (b * NH + h) * T_;
        const float* D_b = Dbuf + (b * NH + h) * T_;
        for (int t0 = s + 32 * warp; t0 < t_end; t0 += 32 * kRowWarps) {
            const int n = t_end - t0 < 32 ? t_end - t0 : 32;
            float sc = dot_rows32(x, qb + (int64_t)t0 * C3, C3, n, hs, lane), grad = 1.f;  // as in the dq kernel
            if (cap2 > 0.f) {
                const float th = tanh_accurate(sc / cap2);
                sc = cap2 * th, grad = 1.f - th * th;
            }
            const float dp = dot_rows32(y, gb + (int64_t)t0 * C, C, n, hs, lane);
            float pr = 0.f, ds = 0.f;
            if (lane < n) {
                pr = exp2f(sc - lse_b[t0 + lane] * kLog2e);
                ds = pr * (dp - D_b[t0 + lane]) * grad;
            }
            axpy_rows32(dv, pr, gb + (int64_t)t0 * C, C, n, hs, lane);
            axpy_rows32(dk, ds, qb + (int64_t)t0 * C3, C3, n, hs, lane);
        }
    }
#pragma unroll
    for (int i = 0; i < NPL; i++) {
        const int d = lane + 32 * i;
        if (d < hs) rsm[warp * hs + d] = dk[i], rsm[(kRowWarps + warp) * hs + d] = dv[i];
    }
    __syncthreads();
    T* dkr = dqkv + (b * T_ + s) * C3 + C + (int64_t)hk * hs;
    T* dvr = dkr + (int64_t)NKV * hs;
    for (int d = threadIdx.x; d < hs; d += blockDim.x) {
        float sk = 0.f, sv = 0.f;
        for (int w = 0; w < kRowWarps; w++) sk += rsm[w * hs + d], sv += rsm[(kRowWarps + w) * hs + d];
        dkr[d] = from_f32<T>(to_f32(dkr[d]) + scale * sk);
        dvr[d] = from_f32<T>(to_f32(dvr[d]) + sv);
    }
}

// ---------------------------------------------------------------------------------------------------------
// 2. tensor-core (mma.sync bf16) FlashAttention-2 kernels, hs = 64 or 128


// This lane's byte offset, in a bf16 smem tile of row stride LD elements, for the three ldmatrix.x4 uses (add the
// tile corner (row0 * LD + col0) * 2):
//  lds_a : A fragment (16 x 16, rows = m, row-major): matrices (rows 0-7, cols 0-7), (8-15, 0-7), (0-7, 8-15),
//          (8-15, 8-15) -> registers a0..a3.
//  lds_bn: B fragments of two n8 tiles from a tile stored [n][k] (K for Q K^T): matrices (n 0-7, k 0-7),
//          (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) -> {b0, b1} of n-tile 0, {b0, b1} of n-tile 1.
//          With .trans on a tile stored [k][m] it gives the A fragment of its transpose (dS from dS^T).
//  lds_bt: B fragments of two n8 tiles from a tile stored [k][n] (V for P V), with .trans: matrices (k 0-7, n 0-7),
//          (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
template <int LD>
__device__ __forceinline__ uint32_t lds_a(int lane) {
    return (uint32_t)(((lane & 15) * LD + (lane >> 4) * 8) * 2);
}
template <int LD>
__device__ __forceinline__ uint32_t lds_bn(int lane) {
    return (uint32_t)((((lane & 7) + ((lane >> 4) << 3)) * LD + ((lane >> 3) & 1) * 8) * 2);
}
template <int LD>
__device__ __forceinline__ uint32_t lds_bt(int lane) {
    return (uint32_t)((((lane & 7) + ((lane >> 3) & 1) * 8) * LD + (lane >> 4) * 8) * 2);
}


__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x (low 16 bits) = lo
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}

// The A fragment (16 x 16) of columns 16kk..16kk+15 of a 16-row accumulator tile acc[n8 tile][4]: the
// accumulator layout of two adjacent n8 tiles is exactly the A layout (FlashAttention-2's register reuse of P).
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
    a[0] = pack_bf16(lo[0], lo[1]);
    a[1] = pack_bf16(lo[2], lo[3]);
    a[2] = pack_bf16(hi[0], hi[1]);
    a[3] = pack_bf16(hi[2], hi[3]);
}

// Async copy of `rows` rows (from row r0, row stride `ld` elements in global memory) of HS bf16 into a smem tile
// of row stride LD; rows >= T are zero-filled.
template <int HS, int LD, int NT>
__device__ __forceinline__ void load_rows_async(bf16* dst, const bf16* src, int64_t ld, int r0, int rows, int T_,
                                                int tid) {
    constexpr int CH = HS / 8;  // 16-byte chunks per row
    for (int idx = tid; idx < rows * CH; idx += NT) {
        const int r = idx / CH, c = idx % CH, t = r0 + r;
        const bool ok = t < T_;
        cp_async16(smem_addr(dst + r * LD + c * 8), src + (int64_t)(ok ? t : 0) * ld + c * 8, ok ? 16 : 0);
    }
}

// Launch configuration of the fast kernels. ptxas (CUDA 13.0, -O3, registers / spills; sm_90 and sm_80 alike):
//   forward hs=64 244 / 0, hs=128 254 / 0 (hs=128 with 64-key tiles spills ~70 bytes; MI=1 x 64 keys with Q in
//   registers: 175 / 0); backward hs=64 245 / 0, hs=128 255 / 0. 2 blocks (8 warps) per SM by registers.
//   Asking for 3 blocks per SM (<= 168 registers) spills in every configuration.
template <int HS>
struct FlashCfg;
template <>
struct FlashCfg<64> {
    static constexpr int kFwdMI = 2, kFwdNW = 4, kFwdMinBlocks = 2;  // forward: 128 query rows per block
    static constexpr int kFwdBC = 64;  // keys per tile
    static constexpr bool kFwdQRegs = true;
    static constexpr int kBwdBQ = 64, kBwdNW = 4, kBwdMinBlocks = 2;  // backward: 64 keys/block, query tiles of 64
};
template <>
struct FlashCfg<128> {
    static constexpr int kFwdMI = 2, kFwdNW = 4, kFwdMinBlocks = 2;  // 128 query rows per block
    static constexpr int kFwdBC = 32;                                 // alternative: MI=1, BC=64, QRegs (fewer regs)
    static constexpr bool kFwdQRegs = false;
    static constexpr int kBwdBQ = 32, kBwdNW = 4, kBwdMinBlocks = 2;
};

template <int HS, int MI, int NW>
constexpr int flash_fwd_smem() {
    return (16 * MI * NW + 4 * FlashCfg<HS>::kFwdBC) * (HS + 8) * 2;
}

// The score options of the tensor-core kernels: S holds raw dot products q.k (the scale is folded into the
// exponent); a cap (cap_out > 0) replaces S by cap_out * tanh(cap_in * S), cap_in = scale / softcap and
// cap_out = softcap / scale, so that S * scale stays the capped score. window > 0: query t sees keys s > t - window.
// The kernels' template flag OPT says whether a cap or a window is in use: the plain instantiation (OPT false) is
// the code without them (a run-time window check measured 40 bytes of spills in the hs=128 forward: ptxas, sm_90).
struct FlashOpts {
    float scale_log2, cap_in, cap_out;
    int window;
};

// grid n_qt * BH (block id -> query tile from the last one, (b, h)), block 32*NW. Key tiles from the first one in
// the window of the block's first query (all from 0 without a window) to the diagonal.
template <int HS, int MI, int NW, bool OPT>
__global__ void __launch_bounds__(32 * NW, FlashCfg<HS>::kFwdMinBlocks)
    flash_forward_kernel(bf16* __restrict__ out, float* __restrict__ lse, const bf16* __restrict__ qkv, int T_,
                         int NH, int NKV, int64_t C, int64_t BH, int n_qt, FlashOpts fo) {
    const float scale_log2 = fo.scale_log2;
    const int window = OPT ? fo.window : 0;
    constexpr int BR = 16 * MI * NW, BC = FlashCfg<HS>::kFwdBC, LD = HS + 8, NT = 32 * NW;
    constexpr int KC = HS / 16;  // k16 chunks of the head dimension
    constexpr int DN = HS / 8;   // n8 tiles of the head dimension
    constexpr int SN = BC / 8;   // n8 tiles of a key tile
    extern __shared__ __align__(16) unsigned char fsm[];
    bf16* Qs = (bf16*)fsm;    // BR x LD
    bf16* Ks = Qs + BR * LD;  // 2 x BC x LD
    bf16* Vs = Ks + 2 * BC * LD;

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int64_t id = blockIdx.x;
    const int qt = n_qt - 1 - (int)(id / BH);
    const int64_t bh = id % BH, b = bh / NH;
    const int h = (int)(bh % NH);
    const int q0 = qt * BR;
    const int64_t C3 = C + 2 * (int64_t)NKV * HS;  // qkv row: [q (C) | k (NKV*HS) | v (NKV*HS)]
    const bf16* qb = qkv + b * T_ * C3 + (int64_t)h * HS;
    const bf16* kb = qkv + b * T_ * C3 + C + (int64_t)(h / (NH / NKV)) * HS;
    const bf16* vb = kb + (int64_t)NKV * HS;
    const int kend = T_ < q0 + BR ? T_ : q0 + BR;  // keys < kend (in the window of q0 on) are seen by the block
    const int n_kt = (kend + BC - 1) / BC, j0 = (int)first_key(q0, window) / BC;  // key tiles j0 .. n_kt-1
    const int wrow0 = q0 + warp * 16 * MI;  // first query row of this warp

    load_rows_async<HS, LD, NT>(Qs, qb, C3, q0, BR, T_, tid);
    load_rows_async<HS, LD, NT>(Ks, kb, C3, j0 * BC, BC, T_, tid);
    load_rows_async<HS, LD, NT>(Vs, vb, C3, j0 * BC, BC, T_, tid);
    cp_async_commit();

    constexpr bool QR = FlashCfg<HS>::kFwdQRegs;  // Q fragments in registers (else re-read from smem per tile)
    uint32_t qf[QR ? MI : 1][QR ? KC : 1][4];
    const uint32_t qa = smem_addr(Qs) + lds_a<LD>(lane) + warp * 16 * MI * LD * 2;
    float o[MI][DN][4];
    float m[MI][2], l[MI][2];  // running max (raw score units) and this lane's partial running sum, rows g, g+8
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
#pragma unroll
        for (int dn = 0; dn < DN; dn++) o[mi][dn][0] = o[mi][dn][1] = o[mi][dn][2] = o[mi][dn][3] = 0.f;
        m[mi][0] = m[mi][1] = -INFINITY;
        l[mi][0] = l[mi][1] = 0.f;
    }

    for (int j = j0; j < n_kt; j++) {
        const int buf = (j - j0) & 1;
        if (j + 1 < n_kt) {  // prefetch the next key tile into the other buffer (free since the last barrier)
            load_rows_async<HS, LD, NT>(Ks + (buf ^ 1) * BC * LD, kb, C3, (j + 1) * BC, BC, T_, tid);
            load_rows_async<HS, LD, NT>(Vs + (buf ^ 1) * BC * LD, vb, C3, (j + 1) * BC, BC, T_, tid);
        }
        cp_async_commit();
        cp_async_wait<1>();  // all but the group just committed: tile j (and Q) have landed
        __syncthreads();
        if (QR && j == j0) {
#pragma unroll
            for (int mi = 0; mi < (QR ? MI : 0); mi++)
#pragma unroll
                for (int kc = 0; kc < (QR ? KC : 0); kc++) ldmatrix_x4(qf[mi][kc], qa + (mi * 16 * LD + kc * 16) * 2);
        }
        const int k0 = j * BC;
        // some row of this warp sees a key of this tile: at or left of its last row, inside its first row's window
        if (k0 <= wrow0 + 16 * MI - 1 && (window == 0 || k0 + BC - 1 > wrow0 - window)) {
            const uint32_t ka = smem_addr(Ks + buf * BC * LD) + lds_bn<LD>(lane);
            const uint32_t va = smem_addr(Vs + buf * BC * LD) + lds_bt<LD>(lane);
            // S = Q K^T (16*MI x BC per warp)
            float s[MI][SN][4];
#pragma unroll
            for (int mi = 0; mi < MI; mi++)
#pragma unroll
                for (int sn = 0; sn < SN; sn++) s[mi][sn][0] = s[mi][sn][1] = s[mi][sn][2] = s[mi][sn][3] = 0.f;
#pragma unroll
            for (int kc = 0; kc < KC; kc++) {
                uint32_t qk[MI][4];  // A fragments of head-dim chunk kc
#pragma unroll
                for (int mi = 0; mi < MI; mi++) {
                    if constexpr (QR) {
#pragma unroll
                        for (int r = 0; r < 4; r++) qk[mi][r] = qf[QR ? mi : 0][QR ? kc : 0][r];
                    } else {
                        ldmatrix_x4(qk[mi], qa + (mi * 16 * LD + kc * 16) * 2);
                    }
                }
#pragma unroll
                for (int np = 0; np < SN / 2; np++) {
                    uint32_t kf[4];  // B fragments of key n8 tiles 2np (kf[0..1]) and 2np+1 (kf[2..3])
                    ldmatrix_x4(kf, ka + (np * 16 * LD + kc * 16) * 2);
#pragma unroll
                    for (int mi = 0; mi < MI; mi++) {
                        mma_bf16_16816(s[mi][2 * np], qk[mi], kf[0], kf[1]);
                        mma_bf16_16816(s[mi][2 * np + 1], qk[mi], kf[2], kf[3]);
                    }
                }
            }
            if (OPT && fo.cap_out > 0.f) {
#pragma unroll
                for (int mi = 0; mi < MI; mi++)
#pragma unroll
                    for (int sn = 0; sn < SN; sn++)
#pragma unroll
                        for (int e = 0; e < 4; e++) s[mi][sn][e] = fo.cap_out * tanh_accurate(fo.cap_in * s[mi][sn][e]);
            }
            // causal mask on the diagonal tile(s), keys >= T, and keys left of the window of some row of the warp
            if (k0 + BC - 1 > wrow0 || k0 + BC > T_ || (window > 0 && k0 <= wrow0 + 16 * MI - 1 - window)) {
#pragma unroll
                for (int mi = 0; mi < MI; mi++)
#pragma unroll
                    for (int sn = 0; sn < SN; sn++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            const int key = k0 + sn * 8 + 2 * c + (e & 1);
                            const int qrow = wrow0 + mi * 16 + g + 8 * (e >> 1);
                            if (key > qrow || key >= T_ || (window > 0 && qrow - key >= window))
                                s[mi][sn][e] = -INFINITY;
                        }
            }
            // online softmax (base 2, scale folded in); P goes straight to bf16 A fragments (pa[mi][kk] covers
            // keys 16kk..16kk+15: registers {row g, n-tile 2kk}, {g+8, 2kk}, {g, 2kk+1}, {g+8, 2kk+1}), which
            // frees the fp32 scores early (register pressure)
            uint32_t pa[MI][BC / 16][4];
#pragma unroll
            for (int mi = 0; mi < MI; mi++) {
#pragma unroll
                for (int hf = 0; hf < 2; hf++) {
                    float mx = -INFINITY;
#pragma unroll
                    for (int sn = 0; sn < SN; sn++) mx = fmaxf(mx, fmaxf(s[mi][sn][2 * hf], s[mi][sn][2 * hf + 1]));
                    mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
                    mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
                    const float m_new = fmaxf(m[mi][hf], mx);
                    const float ms = m_new == -INFINITY ? 0.f : m_new * scale_log2;  // row fully masked so far
                    const float alpha = exp2f(m[mi][hf] * scale_log2 - ms);            // m_old = -inf: 0
                    m[mi][hf] = m_new;
                    float sum = 0.f;
#pragma unroll
                    for (int sn = 0; sn < SN; sn++) {
                        const float p0 = exp2f(fmaf(s[mi][sn][2 * hf], scale_log2, -ms));
                        const float p1 = exp2f(fmaf(s[mi][sn][2 * hf + 1], scale_log2, -ms));
                        pa[mi][sn / 2][(sn & 1) * 2 + hf] = pack_bf16(p0, p1);
                        sum += p0 + p1;
                    }
                    l[mi][hf] = l[mi][hf] * alpha + sum;
#pragma unroll
                    for (int dn = 0; dn < DN; dn++) {
                        o[mi][dn][2 * hf] *= alpha;
                        o[mi][dn][2 * hf + 1] *= alpha;
                    }
                }
            }
            // O += P V
#pragma unroll
            for (int kk = 0; kk < BC / 16; kk++) {
#pragma unroll
                for (int dp = 0; dp < DN / 2; dp++) {
                    uint32_t vf[4];  // B fragments of head-dim n8 tiles 2dp (vf[0..1]) and 2dp+1 (vf[2..3])
                    ldmatrix_x4_trans(vf, va + (kk * 16 * LD + dp * 16) * 2);
#pragma unroll
                    for (int mi = 0; mi < MI; mi++) {
                        mma_bf16_16816(o[mi][2 * dp], pa[mi][kk], vf[0], vf[1]);
                        mma_bf16_16816(o[mi][2 * dp + 1], pa[mi][kk], vf[2], vf[3]);
                    }
                }
            }
        }
        __syncthreads();  // everyone is done with buffer `buf` before the next prefetch overwrites it
    }

    // out = O / l, lse = m*scale + ln(l)
#pragma unroll
    for (int mi = 0; mi < MI; mi++) {
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            float sum = l[mi][hf];
            sum += __shfl_xor_sync(kFull, sum, 1);
            sum += __shfl_xor_sync(kFull, sum, 2);
            const int row = wrow0 + mi * 16 + g + 8 * hf;
            if (row >= T_) continue;
            const float inv = 1.f / sum;
            bf16* orow = out + (b * T_ + row) * C + (int64_t)h * HS + 2 * c;
#pragma unroll
            for (int dn = 0; dn < DN; dn++)
                *(__nv_bfloat162*)(orow + dn * 8) =
                    __floats2bfloat162_rn(o[mi][dn][2 * hf] * inv, o[mi][dn][2 * hf + 1] * inv);
            if (c == 0) lse[bh * T_ + row] = (m[mi][hf] * scale_log2 + log2f(sum)) * kLn2;
        }
    }
}

// acc (16 x 8*QN, fp32) = A (16 x 16*KC, bf16: ldmatrix lane address a_addr, k-chunks 32 bytes apart) times
// B^T where B is QN*8 rows of LD elements (ldmatrix lane address b_addr, lds_bn layout): the backward's
// S^T = K_w Q^T and dP^T = V_w dO^T, 16 keys of this warp against BQ queries.
template <int QN, int KC, int LD>
__device__ __forceinline__ void warp_mma_rows16(float (&acc)[QN][4], uint32_t a_addr, uint32_t b_addr) {
#pragma unroll
    for (int qn = 0; qn < QN; qn++) acc[qn][0] = acc[qn][1] = acc[qn][2] = acc[qn][3] = 0.f;
#pragma unroll
    for (int kc = 0; kc < KC; kc++) {
        uint32_t a[4];
        ldmatrix_x4(a, a_addr + kc * 16 * 2);
#pragma unroll
        for (int np = 0; np < QN / 2; np++) {
            uint32_t b[4];
            ldmatrix_x4(b, b_addr + (np * 16 * LD + kc * 16) * 2);
            mma_bf16_16816(acc[2 * np], a, b[0], b[1]);
            mma_bf16_16816(acc[2 * np + 1], a, b[2], b[3]);
        }
    }
}

template <int HS, int BQ, int NW>
constexpr int flash_bwd_smem() {
    return (2 * 16 * NW + 4 * BQ) * (HS + 8) * 2 + 16 * NW * (BQ + 8) * 2 + 4 * BQ * 4;
}

// grid n_kt * B*NKV (block id -> key tile from the first one, (b, kv head)), block 32*NW; the block runs the query
// tiles of the kv head's G = NH/NKV query heads in turn (from the diagonal to the last query that sees the tile's last
// key), summing their dK, dV in registers
template <int HS, int BQ, int NW, bool OPT>
__global__ void __launch_bounds__(32 * NW, FlashCfg<HS>::kBwdMinBlocks)
    flash_backward_kernel(bf16* __restrict__ dqkv, float* __restrict__ dq_acc, const bf16* __restrict__ dout,
                          const bf16* __restrict__ qkv, const float* __restrict__ lse, const float* __restrict__ Dbuf,
                          int T_, int NH, int NKV, int64_t C, int64_t BKV, FlashOpts fo, float scale) {
    const float scale_log2 = fo.scale_log2;
    const int window = OPT ? fo.window : 0;
    constexpr int BK = 16 * NW, LD = HS + 8, LDS = BQ + 8, NT = 32 * NW;
    constexpr int KC = HS / 16, DN = HS / 8, QN = BQ / 8;
    constexpr int MT = BQ / 16, PARTS = NW / MT, DQ = HS / PARTS;  // dQ work split: MT query blocks x PARTS
    static_assert(NW % MT == 0 && DQ % 32 == 0, "dQ split");
    extern __shared__ __align__(16) unsigned char bsm[];
    bf16* Ks = (bf16*)bsm;            // BK x LD
    bf16* Vs = Ks + BK * LD;          // BK x LD
    bf16* Qs = Vs + BK * LD;          // 2 x BQ x LD
    bf16* dOs = Qs + 2 * BQ * LD;     // 2 x BQ x LD
    bf16* dSs = dOs + 2 * BQ * LD;    // BK x LDS (dS^T: keys x queries)
    float* lse_s = (float*)(dSs + BK * LDS);  // 2 x BQ
    float* D_s = lse_s + 2 * BQ;              // 2 x BQ

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, c = lane & 3;
    const int64_t id = blockIdx.x;
    const int kt = (int)(id / BKV);
    const int64_t bk = id % BKV, b = bk / NKV;
    const int hk = (int)(bk % NKV), G = NH / NKV;
    const int k0 = kt * BK;
    const int64_t C3 = C + 2 * (int64_t)NKV * HS;  // qkv row: [q (C) | k (NKV*HS) | v (NKV*HS)]
    const bf16* kb = qkv + b * T_ * C3 + C + (int64_t)hk * HS;
    const bf16* vb = kb + (int64_t)NKV * HS;
    const int qend = window > 0 && k0 + BK - 1 + window < T_ ? k0 + BK - 1 + window : T_;  // queries < qend
    const int it0 = k0 / BQ, n_qt = (qend + BQ - 1) / BQ;
    const int kw = 16 * warp;  // this warp's first key row in the tile
    // the query head whose tiles load_q_tile loads (the G heads of the kv head in turn; dK, dV sum over them)
    const bf16 *qb = nullptr, *gb = nullptr;
    const float *lse_b = nullptr, *D_b = nullptr;

    auto load_q_tile = [&](int it, int buf) {
        const int q0 = it * BQ;
        load_rows_async<HS, LD, NT>(Qs + buf * BQ * LD, qb, C3, q0, BQ, T_, tid);
        load_rows_async<HS, LD, NT>(dOs + buf * BQ * LD, gb, C, q0, BQ, T_, tid);
        for (int r = tid; r < 2 * BQ; r += NT) {
            const int q = q0 + (r % BQ);
            const bool ok = q < T_;
            if (r < BQ) cp_async4(smem_addr(lse_s + buf * BQ + r), lse_b + (ok ? q : 0), ok ? 4 : 0);
            else cp_async4(smem_addr(D_s + buf * BQ + (r - BQ)), D_b + (ok ? q : 0), ok ? 4 : 0);
        }
    };
    load_rows_async<HS, LD, NT>(Ks, kb, C3, k0, BK, T_, tid);
    load_rows_async<HS, LD, NT>(Vs, vb, C3, k0, BK, T_, tid);

    float dk[DN][4], dv[DN][4];
#pragma unroll
    for (int dn = 0; dn < DN; dn++)
#pragma unroll
        for (int e = 0; e < 4; e++) dk[dn][e] = dv[dn][e] = 0.f;

    for (int h = hk * G; h < (hk + 1) * G; h++) {
        qb = qkv + b * T_ * C3 + (int64_t)h * HS;
        gb = dout + b * T_ * C + (int64_t)h * HS;
        lse_b = lse + (b * NH + h) * T_;
        D_b = Dbuf + (b * NH + h) * T_;
        load_q_tile(it0, 0);  // (with K and V in the first group, for the first head)
        cp_async_commit();
        for (int it = it0; it < n_qt; it++) {
            const int buf = (it - it0) & 1;
            if (it + 1 < n_qt) load_q_tile(it + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
            __syncthreads();
            const int q0 = it * BQ;
            const uint32_t q_bn = smem_addr(Qs + buf * BQ * LD) + lds_bn<LD>(lane);
            const uint32_t q_bt = smem_addr(Qs + buf * BQ * LD) + lds_bt<LD>(lane);
            const uint32_t g_bn = smem_addr(dOs + buf * BQ * LD) + lds_bn<LD>(lane);
            const uint32_t g_bt = smem_addr(dOs + buf * BQ * LD) + lds_bt<LD>(lane);
            const uint32_t k_a = smem_addr(Ks + kw * LD) + lds_a<LD>(lane);
            const uint32_t v_a = smem_addr(Vs + kw * LD) + lds_a<LD>(lane);
            const float* lse_t = lse_s + buf * BQ;
            const float* D_t = D_s + buf * BQ;

            // 1. S^T = K_w Q^T (16 keys x BQ queries)
            float s[QN][4];
            warp_mma_rows16<QN, KC, LD>(s, k_a, q_bn);
            // 2. P^T = exp2(S^T * scale*log2e - lse*log2e) (S^T capped first: grad = 1 - tanh^2 kept for step 5);
            //    zero where key > query, query >= T, or query - key >= window
            float grad[OPT ? QN : 1][4];
            const bool need_mask = q0 < k0 + BK || q0 + BQ > T_ || (window > 0 && q0 + BQ - 1 - k0 >= window);
#pragma unroll
            for (int qn = 0; qn < QN; qn++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    const int ql = qn * 8 + 2 * c + (e & 1);
                    const int key = k0 + kw + g + 8 * (e >> 1), q = q0 + ql;
                    if constexpr (OPT) {
                        float& gr = grad[OPT ? qn : 0][e];
                        gr = 1.f;
                        if (fo.cap_out > 0.f) {
                            const float th = tanh_accurate(fo.cap_in * s[qn][e]);
                            s[qn][e] = fo.cap_out * th, gr = 1.f - th * th;
                        }
                    }
                    const float pr = exp2f(fmaf(s[qn][e], scale_log2, -lse_t[ql] * kLog2e));
                    const bool masked = key > q || q >= T_ || (window > 0 && q - key >= window);
                    s[qn][e] = need_mask && masked ? 0.f : pr;
                }
            // 3. dP^T = V_w dO^T
            float dp[QN][4];
            warp_mma_rows16<QN, KC, LD>(dp, v_a, g_bn);
            // 4. dV += P^T dO
#pragma unroll
            for (int kk = 0; kk < BQ / 16; kk++) {
                uint32_t pa[4];
                acc_to_a(pa, s[2 * kk], s[2 * kk + 1]);
#pragma unroll
                for (int dpp = 0; dpp < DN / 2; dpp++) {
                    uint32_t gf[4];
                    ldmatrix_x4_trans(gf, g_bt + (kk * 16 * LD + dpp * 16) * 2);
                    mma_bf16_16816(dv[2 * dpp], pa, gf[0], gf[1]);
                    mma_bf16_16816(dv[2 * dpp + 1], pa, gf[2], gf[3]);
                }
            }
            // 5. dS^T = P^T * (dP^T - D) (unscaled; the scale is applied to dK and dQ at the end), times grad
#pragma unroll
            for (int qn = 0; qn < QN; qn++)
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    dp[qn][e] = s[qn][e] * (dp[qn][e] - D_t[qn * 8 + 2 * c + (e & 1)]);
                    if constexpr (OPT) dp[qn][e] *= grad[OPT ? qn : 0][e];
                }
            // 6. dK += dS^T Q, and dS^T to shared memory for dQ
#pragma unroll
            for (int kk = 0; kk < BQ / 16; kk++) {
                uint32_t da[4];
                acc_to_a(da, dp[2 * kk], dp[2 * kk + 1]);
                // da = {(g, 2c), (g+8, 2c), (g, 2c+8), (g+8, 2c+8)} of keys kw.. x queries 16kk..
                *(uint32_t*)(dSs + (kw + g) * LDS + kk * 16 + 2 * c) = da[0];
                *(uint32_t*)(dSs + (kw + g + 8) * LDS + kk * 16 + 2 * c) = da[1];
                *(uint32_t*)(dSs + (kw + g) * LDS + kk * 16 + 8 + 2 * c) = da[2];
                *(uint32_t*)(dSs + (kw + g + 8) * LDS + kk * 16 + 8 + 2 * c) = da[3];
#pragma unroll
                for (int dpp = 0; dpp < DN / 2; dpp++) {
                    uint32_t qf[4];
                    ldmatrix_x4_trans(qf, q_bt + (kk * 16 * LD + dpp * 16) * 2);
                    mma_bf16_16816(dk[2 * dpp], da, qf[0], qf[1]);
                    mma_bf16_16816(dk[2 * dpp + 1], da, qf[2], qf[3]);
                }
            }
            __syncthreads();
            // 7. dQ (BQ x HS) = dS (BQ x BK) K (BK x HS): warp -> query block mt (16 rows) x head-dim part `part`
            //    (DQ columns), in chunks of 32 columns (16 accumulator registers) to keep register pressure down
            {
                const int mt = warp % MT, part = warp / MT;
                const uint32_t ds_a = smem_addr(dSs + mt * 16) + lds_bn<LDS>(lane);
                const uint32_t k_bt = smem_addr(Ks + part * DQ) + lds_bt<LD>(lane);
                uint32_t a[BK / 16][4];  // A = dS (queries x keys) from the stored dS^T, transposed by ldmatrix
#pragma unroll
                for (int kc = 0; kc < BK / 16; kc++) ldmatrix_x4_trans(a[kc], ds_a + kc * 16 * LDS * 2);
                const int q_lo = q0 + mt * 16 + g;
                float* dst = dq_acc + (b * T_ + q_lo) * C + (int64_t)h * HS + part * DQ + 2 * c;
#pragma unroll
                for (int ch = 0; ch < DQ / 32; ch++) {
                    float dq[4][4];
#pragma unroll
                    for (int dn = 0; dn < 4; dn++) dq[dn][0] = dq[dn][1] = dq[dn][2] = dq[dn][3] = 0.f;
#pragma unroll
                    for (int kc = 0; kc < BK / 16; kc++) {
#pragma unroll
                        for (int dpp = 0; dpp < 2; dpp++) {
                            uint32_t kf[4];
                            ldmatrix_x4_trans(kf, k_bt + (kc * 16 * LD + ch * 32 + dpp * 16) * 2);
                            mma_bf16_16816(dq[2 * dpp], a[kc], kf[0], kf[1]);
                            mma_bf16_16816(dq[2 * dpp + 1], a[kc], kf[2], kf[3]);
                        }
                    }
#pragma unroll
                    for (int hf = 0; hf < 2; hf++) {
                        if (q_lo + 8 * hf >= T_) continue;
                        float* d = dst + 8 * hf * C + ch * 32;
#pragma unroll
                        for (int dn = 0; dn < 4; dn++) {
                            atomicAdd(d + dn * 8, dq[dn][2 * hf]);
                            atomicAdd(d + dn * 8 + 1, dq[dn][2 * hf + 1]);
                        }
                    }
                }
            }
            __syncthreads();  // buffers `buf` and dSs are free for the next prefetch / iteration
        }
    }

    // dqkv k part += scale * dK, v part += dV
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int key = k0 + kw + g + 8 * hf;
        if (key >= T_) continue;
        bf16* dkr = dqkv + (b * T_ + key) * C3 + C + (int64_t)hk * HS + 2 * c;
        bf16* dvr = dkr + (int64_t)NKV * HS;
#pragma unroll
        for (int dn = 0; dn < DN; dn++) {
            __nv_bfloat162* pk = (__nv_bfloat162*)(dkr + dn * 8);
            __nv_bfloat162* pv = (__nv_bfloat162*)(dvr + dn * 8);
            const float2 ok = __bfloat1622float2(*pk), ov = __bfloat1622float2(*pv);
            *pk = __floats2bfloat162_rn(ok.x + scale * dk[dn][2 * hf], ok.y + scale * dk[dn][2 * hf + 1]);
            *pv = __floats2bfloat162_rn(ov.x + dv[dn][2 * hf], ov.y + dv[dn][2 * hf + 1]);
        }
    }
}

// dqkv q part (B, T, W)[.., :C] += scale * dq_acc (B, T, C); W = C + 2*NKV*hs, the qkv row width
__global__ void dq_accumulate_kernel(bf16* __restrict__ dqkv, const float* __restrict__ dq_acc, int64_t n, int64_t C,
                                     int64_t W, float scale) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        bf16* d = dqkv + (i / C) * W + i % C;
        *d = __float2bfloat16_rn(__bfloat162float(*d) + scale * dq_acc[i]);
    }
}

// ---------------------------------------------------------------------------------------------------------
// launchers

int grid_for(int64_t n, int block) {
    const int64_t g = (n + block - 1) / block;
    return (int)(g < 8192 ? (g > 0 ? g : 1) : 8192);
}

template <typename Kernel>
void set_smem(Kernel k, int bytes) {
    if (bytes > 48 * 1024) CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
}

// NPL (per-lane slice length) for head size hs <= 256
#define DISPATCH_NPL(hs, NPL, ...)            \
    do {                                      \
        if ((hs) <= 32) {                     \
            constexpr int NPL = 1;            \
            __VA_ARGS__;                      \
        } else if ((hs) <= 64) {              \
            constexpr int NPL = 2;            \
            __VA_ARGS__;                      \
        } else if ((hs) <= 128) {             \
            constexpr int NPL = 4;            \
            __VA_ARGS__;                      \
        } else {                              \
            constexpr int NPL = 8;            \
            __VA_ARGS__;                      \
        }                                     \
    } while (0)

template <typename T>
void launch_rows_forward(RowsParams p, int64_t rows) {
    const int smem = kRowWarps * (p.hs + 2) * 4;
    const dim3 grid((unsigned)rows, (unsigned)p.nsplit);
    DISPATCH_NPL(p.hs, NPL, rows_forward_kernel<T, NPL><<<grid, 32 * kRowWarps, smem>>>(p));
    CUDA_CHECK_LAUNCH();
    if (p.part) {
        rows_merge_kernel<T><<<(unsigned)rows, 128>>>(p);
        CUDA_CHECK_LAUNCH();
    }
}

// the kernels' window: 0 (none) also for a window at least as long as any row (and beyond int)
int window_of(const AttentionOpts& opt, int64_t keys) { return opt.window > 0 && opt.window < keys ? (int)opt.window : 0; }

FlashOpts flash_opts(const AttentionOpts& opt, int64_t hs, int64_t T) {
    const float scale = opt.resolved_scale(hs);
    FlashOpts fo{scale * kLog2e, 0.f, 0.f, window_of(opt, T)};
    if (opt.softcap > 0) fo.cap_in = scale / opt.softcap, fo.cap_out = opt.softcap / scale;
    return fo;
}

template <int HS, bool OPT>
void launch_flash_forward(bf16* out, float* lse, const bf16* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                          int64_t NKV, const FlashOpts& fo) {
    constexpr int MI = FlashCfg<HS>::kFwdMI, NW = FlashCfg<HS>::kFwdNW, BR = 16 * MI * NW;
    constexpr int smem = flash_fwd_smem<HS, MI, NW>();
    auto kernel = flash_forward_kernel<HS, MI, NW, OPT>;
    set_smem(kernel, smem);
    const int n_qt = ceil_div(T, BR);
    const int64_t BH = B * NH;
    kernel<<<(unsigned)(n_qt * BH), 32 * NW, smem>>>(out, lse, qkv, (int)T, (int)NH, (int)NKV, C, BH, n_qt, fo);
    CUDA_CHECK_LAUNCH();
}

template <int HS, bool OPT>
void launch_flash_backward(bf16* dqkv, const bf16* dout, const bf16* qkv, const bf16* out, const float* lse,
                           int64_t B, int64_t T, int64_t C, int64_t NH, int64_t NKV, const FlashOpts& fo,
                           float scale) {
    constexpr int BQ = FlashCfg<HS>::kBwdBQ, NW = FlashCfg<HS>::kBwdNW, BK = 16 * NW;
    constexpr int smem = flash_bwd_smem<HS, BQ, NW>();
    const int64_t BKV = B * NKV, rows = B * T * NH;
    Scratch D((size_t)rows * 4), dq((size_t)(B * T * C) * 4);
    attn_bwd_pre_kernel<bf16><<<ceil_div(rows * 32, 256), 256>>>((float*)D.p, (float*)dq.p, dout, out, rows, (int)T,
                                                                  (int)NH, HS, C);
    CUDA_CHECK_LAUNCH();
    auto kernel = flash_backward_kernel<HS, BQ, NW, OPT>;
    set_smem(kernel, smem);
    const int n_kt = ceil_div(T, BK);
    kernel<<<(unsigned)(n_kt * BKV), 32 * NW, smem>>>(dqkv, (float*)dq.p, dout, qkv, lse, (const float*)D.p, (int)T,
                                                      (int)NH, (int)NKV, C, BKV, fo, scale);
    CUDA_CHECK_LAUNCH();
    const int64_t n = B * T * C;
    dq_accumulate_kernel<<<grid_for(n, 256), 256>>>(dqkv, (const float*)dq.p, n, C, C + 2 * NKV * HS, scale);
    CUDA_CHECK_LAUNCH();
}

template <typename T>
void launch_rows_backward(T* dqkv, const T* dout, const T* qkv, const T* out, const float* lse, int64_t B, int64_t T_,
                          int64_t C, int64_t NH, int64_t NKV, const AttentionOpts& opt) {
    const int hs = (int)(C / NH);
    const int64_t rows = B * NH * T_;
    const float scale = opt.resolved_scale(hs), scale_log2 = scale * kLog2e, cap2 = opt.softcap * kLog2e;
    const int window = window_of(opt, T_);
    Scratch D((size_t)rows * 4);
    attn_bwd_pre_kernel<T><<<ceil_div(rows * 32, 256), 256>>>((float*)D.p, nullptr, dout, out, rows, (int)T_, (int)NH,
                                                               hs, C);
    CUDA_CHECK_LAUNCH();
    DISPATCH_NPL(hs, NPL, {
        rows_backward_dq_kernel<T, NPL><<<(unsigned)rows, 32 * kRowWarps, kRowWarps * hs * 4>>>(
            dqkv, dout, qkv, lse, (const float*)D.p, (int)T_, (int)NH, (int)NKV, hs, C, scale_log2, scale, cap2,
            window);
        CUDA_CHECK_LAUNCH();
        rows_backward_dkv_kernel<T, NPL><<<(unsigned)(B * NKV * T_), 32 * kRowWarps, 2 * kRowWarps * hs * 4>>>(
            dqkv, dout, qkv, lse, (const float*)D.p, (int)T_, (int)NH, (int)NKV, hs, C, scale_log2, scale, cap2,
            window);
        CUDA_CHECK_LAUNCH();
    });
}

// the tensor-core path: bf16, hs 64 or 128, and pointers aligned for 16-byte cp.async / 4-byte bf16x2 accesses
bool use_flash(DType t, int64_t hs, const void* qkv, std::initializer_list<const void*> others) {
    if (t != DType::bf16 || (hs != 64 && hs != 128) || force_simple() || !aligned(qkv, 16)) return false;
    for (const void* p : others)
        if (!aligned(p, 16)) return false;
    return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// entry points (kernels.h)

// a launcher instantiated for hs 64 / 128 and with / without score options: f(std::integral_constant HS, ... OPT)
template <typename F>
void dispatch_flash(int64_t hs, const FlashOpts& fo, F&& f) {
    using I = std::integral_constant<int, 64>;
    using J = std::integral_constant<int, 128>;
    using Y = std::true_type;
    using N = std::false_type;
    const bool opt = fo.cap_out > 0.f || fo.window > 0;
    if (hs == 64) opt ? f(I{}, Y{}) : f(I{}, N{});
    else opt ? f(J{}, Y{}) : f(J{}, N{});
}

void attention_forward(void* out, float* lse, const void* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                       int64_t NKV, const AttentionOpts& opt, DType t) {
    if (B * T == 0 || C == 0) return;
    const int64_t hs = C / NH, W = C + 2 * NKV * hs;
    if (use_flash(t, hs, qkv, {out})) {
        const FlashOpts fo = flash_opts(opt, hs, T);
        dispatch_flash(hs, fo, [&](auto HS, auto OPT) {
            launch_flash_forward<HS.value, OPT.value>((bf16*)out, lse, (const bf16*)qkv, B, T, C, NH, NKV, fo);
        });
        return;
    }
    RowsParams p{};
    p.q = qkv, p.q_sb = T * W, p.q_st = W;
    p.k = (const char*)qkv + C * dtype_size(t), p.v = (const char*)qkv + (C + NKV * hs) * dtype_size(t);
    p.kv_sb = T * W, p.kv_sh = hs, p.kv_st = W;
    p.out = out, p.o_sb = T * C, p.o_st = C;
    p.lse = lse, p.pos = nullptr, p.maxT = T, p.part = nullptr;
    p.NH = (int)NH, p.Tn = (int)T, p.hs = (int)hs, p.chunk = (int)T, p.nsplit = 1, p.group = (int)(NH / NKV);
    p.scale_log2 = opt.resolved_scale(hs) * kLog2e, p.cap2 = opt.softcap * kLog2e, p.window = window_of(opt, T);
    DISPATCH_FLOAT(t, F, launch_rows_forward<F>(p, B * NH * T));
}

void attention_backward(void* dqkv, const void* dout, const void* qkv, const void* out, const float* lse,
                        int64_t B, int64_t T, int64_t C, int64_t NH, int64_t NKV, const AttentionOpts& opt, DType t) {
    if (B * T == 0 || C == 0) return;
    const int64_t hs = C / NH;
    if (use_flash(t, hs, qkv, {dqkv, dout, out})) {
        const FlashOpts fo = flash_opts(opt, hs, T);
        dispatch_flash(hs, fo, [&](auto HS, auto OPT) {
            launch_flash_backward<HS.value, OPT.value>((bf16*)dqkv, (const bf16*)dout, (const bf16*)qkv,
                                                       (const bf16*)out, lse, B, T, C, NH, NKV, fo,
                                                       opt.resolved_scale(hs));
        });
        return;
    }
    DISPATCH_FLOAT(t, F, launch_rows_backward<F>((F*)dqkv, (const F*)dout, (const F*)qkv, (const F*)out, lse, B, T,
                                                 C, NH, NKV, opt));
}

void attention_kv_forward(void* out, void* kcache, void* vcache, const void* qkv, const int32_t* pos, int64_t B,
                          int64_t Tn, int64_t C, int64_t NH, int64_t NKV, int64_t maxT, const AttentionOpts& opt,
                          DType t) {
    if (B * Tn == 0 || C == 0 || maxT == 0) return;
    const int64_t hs = C / NH, W = C + 2 * NKV * hs, rows = B * NH * Tn;
    DISPATCH_FLOAT(t, F, {
        kv_append_kernel<F><<<grid_for(B * Tn * NKV * hs, 256), 256>>>((F*)kcache, (F*)vcache, (const F*)qkv, pos, B,
                                                                      Tn, C, NKV, hs, maxT);
        CUDA_CHECK_LAUNCH();
    });
    RowsParams p{};
    p.q = qkv, p.q_sb = Tn * W, p.q_st = W;
    p.k = kcache, p.v = vcache, p.kv_sb = NKV * maxT * hs, p.kv_sh = maxT * hs, p.kv_st = hs;
    p.out = out, p.o_sb = Tn * C, p.o_st = C;
    p.lse = nullptr, p.pos = pos, p.maxT = maxT;
    p.NH = (int)NH, p.Tn = (int)Tn, p.hs = (int)hs, p.group = (int)(NH / NKV);
    p.scale_log2 = opt.resolved_scale(hs) * kLog2e, p.cap2 = opt.softcap * kLog2e;
    p.window = opt.window > 0 ? (int)(opt.window < maxT ? opt.window : maxT) : 0;  // a ring holds at most maxT keys
    // flash-decoding: split the keys of each row (at most span of them) over several blocks when the rows alone
    // cannot fill the GPU; the chunks are laid from each row's first key, those past its last return empty partials
    const int64_t want = 2 * (int64_t)sm_count(), span = p.window > 0 ? p.window : maxT;
    int64_t chunk = span;
    if (rows < want) {
        const int64_t splits = (want + rows - 1) / rows;
        chunk = (span + splits - 1) / splits;
        chunk = ((chunk + 127) / 128) * 128;  // whole rounds of 4 warps x 32 keys
        if (chunk < 256) chunk = 256;
    }
    p.chunk = (int)(chunk < span ? chunk : span);
    p.nsplit = (int)((span + p.chunk - 1) / p.chunk);
    Scratch part(p.nsplit > 1 ? (size_t)rows * p.nsplit * (hs + 2) * 4 : 0);
    p.part = (float*)part.p;
    DISPATCH_FLOAT(t, F, launch_rows_forward<F>(p, rows));
}

}  // namespace fastllm::cuda
