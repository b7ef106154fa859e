/*
GEMM with a fused epilogue, the bias gradient, and the matmul (fully connected layer) built on them, on the GPU.
  C (M, N) = [C +] alpha * op(A) (M, K) @ op(B) (K, N) [+ bias (N)]      (optionally: pre_gelu = that, C = gelu(it))
op(A) = A (M, K) or A^T for A stored (K, M) (trans_a); op(B) = B (K, N) or B^T for B stored (N, K) (trans_b).
All row-major; A, B, bias share a dtype (f32 or bf16); C (and pre_gelu) are f32 or that dtype; fp32 accumulation.
O(M N K) flops, compute bound for the GPT shapes (K >= 768).

Two kernels:
  gemm_simple_kernel (the reference, the fp32 path and the fallback): 64x64 block tile, BK = 16, 256 threads with
    4x4 outputs each, operands staged through shared memory as fp32, plain FFMA. Any dtype, transpose, alignment.
  gemm_tc_kernel (bf16 inputs): tensor cores via mma.sync.m16n8k16 (bf16 x bf16 -> fp32).
    Block tile 128x128x32, 8 warps as 2 (M) x 4 (N), warp tile 64x32 = 4 x 4 mma tiles (64 fp32 accumulators per
    thread). Global -> shared with 16-byte cp.async in a 4-stage ring (3 tiles in flight while one is computed);
    loads past M/N/K are zero-filled by cp.async's src-size operand (partial 8-element chunks included), so any
    M, N, K works. Shared tiles keep the global layout of each operand (K-contiguous rows of 32 + 8 padding, or
    MN-contiguous rows of 128 + 8 padding): the 16-byte padding makes every ldmatrix phase (8 rows x 16 B) hit 8
    distinct bank groups. ldmatrix.x4 feeds the fragments: non-transposed for K-contiguous tiles (A not trans,
    B trans), .trans for MN-contiguous ones. Blocks are rasterised in groups of 8 block-rows so that concurrently
    running blocks share A and B tiles in L2. Epilogue straight from the accumulator fragments: + bias, GELU
    (writing pre_gelu), C +=, stored as fp32 or bf16 pairs (2 adjacent columns per thread).
    Needs 16-byte cp.async sources: A and B 16-byte aligned and their row strides multiples of 8 elements.
    Otherwise (odd K or N for the GPT shapes never happens; V = 50257 is handled by padding inside the fused
    classifier, see softmax_ce.cu) gemm falls back to the simple kernel rather than to 4-byte copies: simpler,
    and the case is rare.
  FASTLLM_CUDA_GEMM=simple (environment, read once) or set_gemm_impl("simple") forces the simple kernel (tests
  compare the two on the GPU). Two builds of the tensor-core kernel: "auto" caps registers at 128 for 2 blocks
  (16 warps) per SM (2 x 80 KiB smem fits A100 and H100); "tc1" (1 block/SM, ~145 registers) is kept to compare.
bias_backward: column sums of dout (M, N) in two deterministic passes (no float atomics): blocks of 32 columns x
  a slice of rows write partial sums (P, N) to a stream-ordered temporary, then one thread per column adds its P
  partials in order into dbias. P = 1 (one pass, no temporary) when the columns alone fill the GPU.
Perf notes: not measured yet (written without a GPU); see benchmarks/bench_matmul.py --device cuda. mma.sync
  reaches roughly 60-70% of the H100's wgmma peak at best; the gap to cuBLAS is expected there.
*/
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

namespace fastllm::cuda {

// ---------------------------------------------------------------------------------------------------------
// helpers: GELU (as csrc/cpu/gelu.cpp), the epilogue, PTX wrappers

static constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
static constexpr float kGeluCubic = 0.044715f;
static constexpr float kX2Cap = 1e4f;  // x^2 capped inside u, as the CPU kernel (tanh saturated anyway)

// gelu(x) = 0.5 x (1 + tanh u) = x sigmoid(2u), u = k (x + 0.044715 x^3). Not tanhf: under --use_fast_math it
// becomes tanh.approx (2^-11 relative error, visible in fp32 outputs); __expf is ~1e-6 relative here and the
// IEEE reciprocal saturates cleanly (exp -> inf gives s = 0, so y = -0 for very negative x, never NaN).
__device__ __forceinline__ float gelu_tanh(float x) {
    const float x2 = fminf(x * x, kX2Cap);
    const float two_u = 2.0f * kGeluScale * x * (1.0f + kGeluCubic * x2);
    return x * __frcp_rn(1.0f + __expf(-two_u));
}

// stores v0 at p[0] and, if two, v1 at p[1]; as one 8/4-byte store if vec (the pair is aligned)
__device__ __forceinline__ void store2(float* p, float v0, float v1, bool two, bool vec) {
    if (two && vec) {
        *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
    } else {
        p[0] = v0;
        if (two) p[1] = v1;
    }
}
__device__ __forceinline__ void store2(bf16* p, float v0, float v1, bool two, bool vec) {
    if (two && vec) {
        *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);  // .x (low address) = v0
    } else {
        p[0] = __float2bfloat16_rn(v0);
        if (two) p[1] = __float2bfloat16_rn(v1);
    }
}
__device__ __forceinline__ void load2(const float* p, float& v0, float& v1, bool two, bool vec) {
    if (two && vec) {
        const float2 v = *reinterpret_cast<const float2*>(p);
        v0 = v.x, v1 = v.y;
    } else {
        v0 = p[0];
        v1 = two ? p[1] : 0.f;
    }
}
__device__ __forceinline__ void load2(const bf16* p, float& v0, float& v1, bool two, bool vec) {
    if (two && vec) {
        const float2 v = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
        v0 = v.x, v1 = v.y;
    } else {
        v0 = __bfloat162float(p[0]);
        v1 = two ? __bfloat162float(p[1]) : 0.f;
    }
}

// Everything the epilogue needs; `vec`: C and pre_gelu pairs (even columns) are aligned for 2-element stores.
template <typename TAB, typename TC>
struct Epi {
    TC* C;
    TC* pre;          // pre_gelu or nullptr (then no GELU)
    const TAB* bias;  // or nullptr
    int64_t ldc;      // row stride of C and pre_gelu
    int M, N;
    bool accumulate, vec;
    float alpha;  // the product's factor (before the bias)
};

// The epilogue of accumulator values v0, v1 at (row, col), (row, col + 1); col is even; guarded.
template <typename TAB, typename TC>
__device__ __forceinline__ void epilogue_pair(const Epi<TAB, TC>& e, int row, int col, float v0, float v1) {
    if (row >= e.M || col >= e.N) return;
    const bool two = col + 1 < e.N;
    const int64_t off = (int64_t)row * e.ldc + col;
    v0 *= e.alpha;
    v1 *= e.alpha;
    if (e.bias) {
        v0 += to_f32(e.bias[col]);
        if (two) v1 += to_f32(e.bias[col + 1]);
    }
    if (e.pre) {  // GELU epilogue (never with accumulate, checked by the binding)
        store2(e.pre + off, v0, v1, two, e.vec);
        v0 = gelu_tanh(v0);
        v1 = gelu_tanh(v1);
    } else if (e.accumulate) {
        float c0, c1;
        load2(e.C + off, c0, c1, two, e.vec);
        v0 += c0;
        v1 += c1;
    }
    store2(e.C + off, v0, v1, two, e.vec);
}


// ---------------------------------------------------------------------------------------------------------
// kernels

// ---- the simple kernel: 64x64 tile per 256 threads; thread (tx, ty) = (tid % 16, tid / 16) owns rows
// ty + 16 i (i < 4) and column pairs 2 tx + 32 jj + {0, 1} (jj < 2)
namespace simple {
constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256;
}

template <typename TAB, typename TC, bool TA, bool TB>
__global__ void __launch_bounds__(simple::THREADS)
    gemm_simple_kernel(Epi<TAB, TC> e, const TAB* A, const TAB* B, int K, int64_t lda, int64_t ldb) {
    using namespace simple;
    __shared__ float As[BK][BM + 1];  // op(A) tile, As[k][m]
    __shared__ float Bs[BK][BN + 2];  // op(B) tile, Bs[k][n]
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    // 1-D grid (a 2-D one would cap N at 65535 x 64 through gridDim.y): block -> (tile_m, tile_n), M fastest
    const int tiles_m = (e.M + BM - 1) / BM;
    const int m0 = (blockIdx.x % tiles_m) * BM, n0 = (blockIdx.x / tiles_m) * BN;
    float acc[4][4] = {};
    for (int k0 = 0; k0 < K; k0 += BK) {
        // op(A)(m, k) = TA ? A[k, m] : A[m, k]; consecutive threads walk the contiguous axis of the storage
        for (int i = tid; i < BM * BK; i += THREADS) {
            const int mm = TA ? i % BM : i / BK, kk = TA ? i / BM : i % BK;
            const int m = m0 + mm, k = k0 + kk;
            float v = 0.f;
            if (m < e.M && k < K) v = to_f32(TA ? A[(int64_t)k * lda + m] : A[(int64_t)m * lda + k]);
            As[kk][mm] = v;
        }
        // op(B)(k, n) = TB ? B[n, k] : B[k, n]
        for (int i = tid; i < BN * BK; i += THREADS) {
            const int nn = TB ? i / BK : i % BN, kk = TB ? i % BK : i / BN;
            const int n = n0 + nn, k = k0 + kk;
            float v = 0.f;
            if (n < e.N && k < K) v = to_f32(TB ? B[(int64_t)n * ldb + k] : B[(int64_t)k * ldb + n]);
            Bs[kk][nn] = v;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk++) {
            float a[4], b[4];
#pragma unroll
            for (int i = 0; i < 4; i++) a[i] = As[kk][ty + 16 * i];
#pragma unroll
            for (int j = 0; j < 4; j++) b[j] = Bs[kk][2 * tx + 32 * (j / 2) + (j % 2)];
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int jj = 0; jj < 2; jj++)
            epilogue_pair(e, m0 + ty + 16 * i, n0 + 2 * tx + 32 * jj, acc[i][2 * jj], acc[i][2 * jj + 1]);
}

// ---- the tensor-core kernel (bf16 operands)
namespace tc {
constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, THREADS = 256;
constexpr int WM = 64, WN = 32;  // warp tile; warps arranged 2 (M) x 4 (N)
constexpr int PAD = 8;           // 16 bytes of padding per shared row
constexpr int GROUP_M = 8;       // block rasterisation: groups of 8 block-rows

// Shared layout of one stage of one operand (a 128 x BK slab of op(A) or op(B)^T):
// K-contiguous: 128 rows (M or N) of BK + PAD; else BK rows (K) of 128 + PAD.
template <bool KCONTIG>
struct Tile {
    static constexpr int ROWS = KCONTIG ? 128 : BK;
    static constexpr int LD = (KCONTIG ? BK : 128) + PAD;
    static constexpr int ELEMS = ROWS * LD;
    static constexpr int CHUNKS_PER_ROW = (KCONTIG ? BK : 128) / 8;  // 16-byte chunks
};

// Issues the cp.asyncs of one stage of an operand: rows mn0..mn0+127 (extent mn_ext) x k0..k0+BK-1 (extent K)
// of a global operand g with row stride ld (K-contiguous: g[mn * ld + k]; else g[k * ld + mn]). 512 chunks of 8
// elements, 2 per thread; a chunk past the extent copies only its valid elements (zero-fills the rest).
template <bool KCONTIG>
__device__ __forceinline__ void load_stage(bf16* s, const bf16* g, int64_t ld, int mn0, int mn_ext, int k0, int K,
                                           int tid) {
    using G = Tile<KCONTIG>;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        const int c = tid + r * THREADS;
        const int row = c / G::CHUNKS_PER_ROW, col = (c % G::CHUNKS_PER_ROW) * 8;
        int64_t off;
        int valid;  // elements of this chunk inside the operand
        if (KCONTIG) {
            const int mn = mn0 + row, k = k0 + col;
            valid = mn < mn_ext ? K - k : 0;
            off = (int64_t)mn * ld + k;
        } else {
            const int k = k0 + row, mn = mn0 + col;
            valid = k < K ? mn_ext - mn : 0;
            off = (int64_t)k * ld + mn;
        }
        valid = valid < 0 ? 0 : (valid > 8 ? 8 : valid);
        cp_async16(smem_addr(s + row * G::LD + col), valid ? g + off : g, valid * 2);
    }
}
}  // namespace tc

template <typename TC, bool TA, bool TB, int MIN_BLOCKS>
__global__ void __launch_bounds__(tc::THREADS, MIN_BLOCKS)
    gemm_tc_kernel(Epi<bf16, TC> e, const bf16* __restrict__ A, const bf16* __restrict__ B, int K, int64_t lda,
                   int64_t ldb) {
    using namespace tc;
    using GA = Tile<!TA>;  // A (M, K) row-major is K-contiguous
    using GB = Tile<TB>;   // B stored (N, K) is K-contiguous
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16* sA = reinterpret_cast<bf16*>(smem_raw);  // STAGES x GA::ELEMS
    bf16* sB = sA + STAGES * GA::ELEMS;            // STAGES x GB::ELEMS

    // block -> (tile_m, tile_n), grouped rasterisation
    const int tiles_m = (e.M + BM - 1) / BM, tiles_n = (e.N + BN - 1) / BN;
    const int pid = blockIdx.x, group = GROUP_M * tiles_n;
    const int first_m = (pid / group) * GROUP_M;
    const int gsize = min(tiles_m - first_m, GROUP_M);
    const int m0 = (first_m + (pid % group) % gsize) * BM, n0 = ((pid % group) / gsize) * BN;

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int wm = (warp / 4) * WM, wn = (warp % 4) * WN;  // warp tile origin inside the block tile
    const int q = lane / 8, r8 = lane % 8;                 // ldmatrix: matrix index and row this lane addresses
    // Byte address (stage 0, kk = 0, first m/n-tile of the warp) of the shared row this lane hands to ldmatrix.
    // A matrices q: 0 = (m 0-7, k 0-7), 1 = (m 8-15, k 0-7), 2 = (m 0-7, k 8-15), 3 = (m 8-15, k 8-15): the
    // fragment registers a0..a3 of mma (A K-contiguous: plain ldmatrix of a_s[m][k]; else .trans of a_s[k][m]).
    // B matrices q: 0 = (n 0-7, k 0-7), 1 = (n 0-7, k 8-15), 2 = (n 8-15, k 0-7), 3 = (n 8-15, k 8-15): regs
    // {b0, b1} of n-tile 2 jp, then of n-tile 2 jp + 1 (B K-contiguous: plain of b_s[n][k]; else .trans of b_s[k][n]).
    const uint32_t a_lane =
        smem_addr(sA) + 2 * (!TA ? (wm + (q & 1) * 8 + r8) * GA::LD + (q >> 1) * 8
                                 : ((q >> 1) * 8 + r8) * GA::LD + wm + (q & 1) * 8);
    const uint32_t b_lane =
        smem_addr(sB) + 2 * (TB ? (wn + (q >> 1) * 8 + r8) * GB::LD + (q & 1) * 8
                                : ((q & 1) * 8 + r8) * GB::LD + wn + (q >> 1) * 8);

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int v = 0; v < 4; v++) acc[i][j][v] = 0.f;

    const int ktiles = (K + BK - 1) / BK;
    // prologue: STAGES - 1 tiles in flight (one commit group per tile, empty groups past the end)
#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < ktiles) {
            tc::load_stage<!TA>(sA + s * GA::ELEMS, A, lda, m0, e.M, s * BK, K, tid);
            tc::load_stage<TB>(sB + s * GB::ELEMS, B, ldb, n0, e.N, s * BK, K, tid);
        }
        cp_async_commit();
    }

    for (int kt = 0; kt < ktiles; kt++) {
        // groups committed so far: STAGES - 1 + kt; allowing STAGES - 2 pending means tile kt has landed
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // tile kt visible to all; every warp is done with tile kt - 1 (its stage is reloaded now)
        {
            const int nk = kt + STAGES - 1, s = nk % STAGES;
            if (nk < ktiles) {
                tc::load_stage<!TA>(sA + s * GA::ELEMS, A, lda, m0, e.M, nk * BK, K, tid);
                tc::load_stage<TB>(sB + s * GB::ELEMS, B, ldb, n0, e.N, nk * BK, K, tid);
            }
            cp_async_commit();
        }
        const uint32_t a_s = a_lane + (kt % STAGES) * (GA::ELEMS * 2);  // byte addresses of this lane's rows
        const uint32_t b_s = b_lane + (kt % STAGES) * (GB::ELEMS * 2);
#pragma unroll
        for (int kk = 0; kk < BK; kk += 16) {
            uint32_t af[4][4], bfr[2][4];
#pragma unroll
            for (int i = 0; i < 4; i++) {  // m-tile i: rows wm + 16 i ..
                if (!TA)
                    ldmatrix_x4(af[i], a_s + (i * 16 * GA::LD + kk) * 2);
                else
                    ldmatrix_x4_trans(af[i], a_s + (kk * GA::LD + i * 16) * 2);
            }
#pragma unroll
            for (int jp = 0; jp < 2; jp++) {  // n-tiles 2 jp, 2 jp + 1: columns wn + 16 jp ..
                if (TB)
                    ldmatrix_x4(bfr[jp], b_s + (jp * 16 * GB::LD + kk) * 2);
                else
                    ldmatrix_x4_trans(bfr[jp], b_s + (kk * GB::LD + jp * 16) * 2);
            }
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++)
                    mma_bf16_16816(acc[i][j], af[i], bfr[j / 2][(j % 2) * 2], bfr[j / 2][(j % 2) * 2 + 1]);
        }
    }
    cp_async_wait<0>();  // only empty groups can be pending here; leave nothing in flight at exit

    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int row = m0 + wm + i * 16 + g, col = n0 + wn + j * 8 + 2 * t;
            epilogue_pair(e, row, col, acc[i][j][0], acc[i][j][1]);
            epilogue_pair(e, row + 8, col, acc[i][j][2], acc[i][j][3]);
        }
}

// ---- bias backward: partial column sums over a slice of rows; block (32 columns) x (8 row lanes)
template <typename T>
__global__ void __launch_bounds__(256)
    bias_partial_kernel(float* out, bool add, const T* dout, int64_t M, int64_t N, int64_t rows_per_slice) {
    __shared__ float part[8][33];
    const int64_t col = blockIdx.x * 32LL + threadIdx.x;
    const int64_t r0 = blockIdx.y * rows_per_slice;
    const int64_t r1 = min(M, r0 + rows_per_slice);
    float s = 0.f;
    if (col < N)
        for (int64_t r = r0 + threadIdx.y; r < r1; r += 8) s += to_f32(dout[r * N + col]);
    part[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < N) {
        float tot = 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) tot += part[i][threadIdx.x];
        // out is dbias (P == 1: add) or row blockIdx.y of the partials
        if (add)
            out[col] += tot;
        else
            out[blockIdx.y * N + col] = tot;
    }
}

__global__ void bias_finish_kernel(float* dbias, const float* partial, int P, int64_t N) {
    const int64_t col = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (col >= N) return;
    float s = 0.f;
    for (int p = 0; p < P; p++) s += partial[p * N + col];
    dbias[col] += s;
}

// ---------------------------------------------------------------------------------------------------------
// launchers

// Which kernel gemm uses: 0 "auto" (tensor cores when possible, the variant for 2 blocks/SM: <= 128 registers),
// 1 "simple" (always the FFMA kernel), 2 "tc1" (tensor cores, the variant for 1 block/SM: ~145 registers, no
// register cap; kept to compare on the GPU). -1 = not read from the environment (FASTLLM_CUDA_GEMM) yet.
static const char* const kImplNames[] = {"auto", "simple", "tc1"};
static std::atomic<int> g_gemm_impl{-1};

static int impl_index(const std::string& name) {
    for (int i = 0; i < 3; i++)
        if (name == kImplNames[i]) return i;
    return -1;
}

static int gemm_impl_now() {
    int v = g_gemm_impl.load();
    if (v < 0) {
        const char* env = std::getenv("FASTLLM_CUDA_GEMM");
        v = env ? impl_index(env) : 0;
        if (v < 0) v = 0;  // unknown names: auto
        int expected = -1;
        g_gemm_impl.compare_exchange_strong(expected, v);
        v = g_gemm_impl.load();
    }
    return v;
}

std::string gemm_impl() { return kImplNames[gemm_impl_now()]; }

void set_gemm_impl(const std::string& name) {
    const int v = impl_index(name);
    FASTLLM_CHECK(v >= 0, "gemm implementation must be 'auto', 'simple' or 'tc1', got '", name, "'");
    g_gemm_impl.store(v);
}

template <typename F>
static void with_trans(bool ta, bool tb, F&& f) {
    using T_ = std::true_type;
    using F_ = std::false_type;
    if (ta) {
        if (tb) f(T_{}, T_{});
        else f(T_{}, F_{});
    } else {
        if (tb) f(F_{}, T_{});
        else f(F_{}, F_{});
    }
}

template <typename TAB, typename TC>
static void launch_simple(const Epi<TAB, TC>& e, const TAB* A, const TAB* B, int K, int64_t lda, int64_t ldb,
                          bool ta, bool tb) {
    const unsigned grid = (unsigned)ceil_div(e.M, simple::BM) * (unsigned)ceil_div(e.N, simple::BN);
    with_trans(ta, tb, [&](auto TA, auto TB) {
        gemm_simple_kernel<TAB, TC, decltype(TA)::value, decltype(TB)::value>
            <<<grid, simple::THREADS>>>(e, A, B, K, lda, ldb);
    });
    CUDA_CHECK_LAUNCH();
}

template <typename TC, int MIN_BLOCKS>
static void launch_tc(const Epi<bf16, TC>& e, const bf16* A, const bf16* B, int K, int64_t lda, int64_t ldb,
                      bool ta, bool tb) {
    using namespace tc;
    const int blocks = ceil_div(e.M, BM) * ceil_div(e.N, BN);
    with_trans(ta, tb, [&](auto TA, auto TB) {
        constexpr bool ta_ = decltype(TA)::value, tb_ = decltype(TB)::value;
        auto kernel = gemm_tc_kernel<TC, ta_, tb_, MIN_BLOCKS>;
        constexpr int smem = STAGES * (Tile<!ta_>::ELEMS + Tile<tb_>::ELEMS) * (int)sizeof(bf16);
        CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        kernel<<<blocks, THREADS, smem>>>(e, A, B, K, lda, ldb);
    });
    CUDA_CHECK_LAUNCH();
}

template <typename TAB, typename TC>
static void run_gemm(int impl, const Epi<TAB, TC>& e, const void* A, const void* B, int K, int64_t lda,
                     int64_t ldb, bool ta, bool tb) {
    if constexpr (std::is_same_v<TAB, float> && std::is_same_v<TC, bf16>) {
        throw std::invalid_argument("gemm: float32 inputs need a float32 output");
    } else if constexpr (std::is_same_v<TAB, bf16>) {
        if (impl == 0) return launch_tc<TC, 2>(e, (const bf16*)A, (const bf16*)B, K, lda, ldb, ta, tb);
        if (impl == 2) return launch_tc<TC, 1>(e, (const bf16*)A, (const bf16*)B, K, lda, ldb, ta, tb);
        launch_simple<TAB, TC>(e, (const TAB*)A, (const TAB*)B, K, lda, ldb, ta, tb);
    } else {
        launch_simple<TAB, TC>(e, (const TAB*)A, (const TAB*)B, K, lda, ldb, ta, tb);
    }
}

static bool aligned(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void gemm_ex(void* C, DType c_t, int64_t ldc, const void* A, int64_t lda, const void* B, int64_t ldb,
             const void* bias, void* pre_gelu, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b,
             bool accumulate, DType ab, float alpha) {
    if (M == 0 || N == 0) return;
    const size_t cs = dtype_size(c_t);
    const bool vec = ldc % 2 == 0 && aligned(C, 2 * cs) && (!pre_gelu || aligned(pre_gelu, 2 * cs));
    const bool tc_ok = ab == DType::bf16 && aligned(A, 16) && aligned(B, 16) && lda % 8 == 0 && ldb % 8 == 0;
    const int impl = tc_ok ? gemm_impl_now() : 1;
    DISPATCH_FLOAT(ab, TAB, DISPATCH_FLOAT(c_t, TC, {
        const Epi<TAB, TC> e{(TC*)C, (TC*)pre_gelu, (const TAB*)bias, ldc, (int)M, (int)N, accumulate, vec, alpha};
        run_gemm<TAB, TC>(impl, e, A, B, (int)K, lda, ldb, trans_a, trans_b);
    }));
}

void gemm(void* C, DType c_t, const void* A, const void* B, const void* bias, void* pre_gelu, int64_t M, int64_t N,
          int64_t K, bool trans_a, bool trans_b, bool accumulate, DType ab, float alpha) {
    gemm_ex(C, c_t, N, A, trans_a ? M : K, B, trans_b ? K : N, bias, pre_gelu, M, N, K, trans_a, trans_b,
            accumulate, ab, alpha);
}

void bias_backward(float* dbias, const void* dout, int64_t M, int64_t N, DType t) {
    if (M == 0 || N == 0) return;
    const int64_t col_blocks = (N + 31) / 32;
    // enough (column block, row slice) blocks to fill the GPU: ~1024 blocks of 256 threads, slices >= 64 rows
    int64_t P = (1024 + col_blocks - 1) / col_blocks;
    P = std::min<int64_t>(P, (M + 63) / 64);
    P = std::max<int64_t>(std::min<int64_t>(P, 65535), 1);
    const int64_t rows = (M + P - 1) / P;
    P = (M + rows - 1) / rows;  // no empty slices
    const dim3 block(32, 8), grid((unsigned)col_blocks, (unsigned)P);
    if (P == 1) {
        DISPATCH_FLOAT(t, T, { bias_partial_kernel<T><<<grid, block>>>(dbias, true, (const T*)dout, M, N, rows); });
        CUDA_CHECK_LAUNCH();
        return;
    }
    float* partial = nullptr;
    CUDA_CHECK(cudaMallocAsync((void**)&partial, (size_t)P * N * sizeof(float), 0));
    DISPATCH_FLOAT(t, T, { bias_partial_kernel<T><<<grid, block>>>(partial, false, (const T*)dout, M, N, rows); });
    CUDA_CHECK_LAUNCH();
    bias_finish_kernel<<<ceil_div(N, 256), 256>>>(dbias, partial, (int)P, N);
    CUDA_CHECK_LAUNCH();
    CUDA_CHECK(cudaFreeAsync(partial, 0));
}

// ---------------------------------------------------------------------------------------------------------
// matmul entry points (the GPU twins of csrc/cpu/matmul.cpp's)

void matmul_forward(void* out, DType out_t, const void* inp, const void* weight, const void* bias, void* pre_gelu,
                    int64_t N, int64_t C, int64_t OC, DType t) {
    // out (N, OC) = inp (N, C) @ weight^T, weight stored (OC, C); bias (and GELU) fused into the epilogue
    gemm(out, out_t, inp, weight, bias, pre_gelu, N, OC, C, false, true, false, t);
}

void matmul_backward(void* dinp, float* dweight, float* dbias, const void* dout, const void* inp, const void* weight,
                     int64_t N, int64_t C, int64_t OC, DType t) {
    // dinp (N, C) += dout (N, OC) @ weight (OC, C)
    if (dinp) gemm(dinp, t, dout, weight, nullptr, nullptr, N, C, OC, false, false, true, t);
    // dweight (OC, C, f32) += dout^T (OC, N) @ inp (N, C)
    if (dweight) gemm(dweight, DType::f32, dout, inp, nullptr, nullptr, OC, C, N, true, false, true, t);
    if (dbias) bias_backward(dbias, dout, N, OC, t);
}

}  // namespace fastllm::cuda
