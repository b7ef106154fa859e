/*
Token + position embedding on the GPU; the CPU twin csrc/cpu/embedding.cpp is the spec.
  forward:  out[b, t] = scale * wte[tokens[b, t]] + wpe[t]              out (B, T, C) of T; tokens int32 (B, T)
  backward: dwte[v] += sum of scale * dout[b, t] over the positions with tokens[b, t] == v   (V, C) fp32
            dwpe[t] += sum_b dout[b, t]  (unscaled)                                          (maxT, C) fp32
wpe / dwpe may be null (no position embedding: rotary models); scale is 1, or sqrt(C) for Gemma (one fmaf per
element, so scale = 1 is exactly wte + wpe). Ids outside [0, V) are never dereferenced: the forward uses a zero
wte row for them (out = wpe[t]), the backward skips them. O(B*T*C), memory bound (gathers / scatters of whole rows).

Forward: grid-stride loop over (row, 16-byte pack of the row); scalar elements when a pointer is unaligned
or C % kVec<T> != 0.
Backward, deterministic (no float atomics; every sum has a fixed order for given tokens):
  dwpe: one thread per (t, pack of columns) adds dout[0, t], dout[1, t], ... in batch order.
  dwte: 1. keys[p] = tokens[p] (V for invalid ids), vals[p] = p; a stable radix sort (CUB) orders the
           positions by token, ascending positions within a token;
        2. the sorted list is cut into chunks of kChunk entries; one block per chunk, one thread per column
           pack, walks its chunk in order, summing dout rows of equal keys. A segment (run of equal keys)
           that starts and ends inside the chunk belongs to this chunk alone, so the thread adds it into
           dwte[key] directly. A segment cut by the chunk's start goes to Pfirst[chunk], one cut by its end
           to Plast[chunk] (a chunk inside one long segment writes only Pfirst);
        3. for each segment that crosses a chunk end, the chunk where it starts adds Plast[j] + Pfirst[j+1]
           + ... in chunk order and writes dwte[key].
  So a token that occurs 5000 times costs 5000/kChunk chunk partials plus a short sequential walk, not a
  5000-long chain; each dwte row is written by exactly one thread per column.
Perf notes (written without a GPU: compiled and register-checked for sm_80/sm_90, not yet timed): the sort moves
8 bytes per position (~N = 16K positions: a few microseconds); the chunk pass reads dout once and read-modify-
writes the dwte rows of the distinct tokens, like any scatter-add. The simple kernels (set_simple_elementwise)
are the spec: forward one element per thread; backward one thread per column walking all positions in order.
*/
#include <cub/device/device_radix_sort.cuh>
#include <type_traits>

#include "elementwise.cuh"

namespace fastllm::cuda {

static constexpr int kChunk = 32;  // sorted positions per block in the dwte pass

// ---------------------------------------------------------------------------------------------------------
// forward (V = kVec<T> packs when aligned, else V = 1); CP = C / V packs per row

template <typename T, int V>
__global__ void embedding_forward_kernel(T* out, const int32_t* tokens, const T* wte, const T* wpe, int64_t N,
                                         int64_t T_, int64_t CP, int64_t Vocab, float scale) {
    const int64_t total = N * CP, C = CP * V;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t row = i / CP, c = (i - row * CP) * V;
        const int64_t tok = tokens[row];
        float a[V], p[V];
        if (wpe) {
            load_v<T, V>(p, wpe + (row % T_) * C + c);
        } else {
#pragma unroll
            for (int j = 0; j < V; j++) p[j] = 0.f;
        }
        if (tok >= 0 && tok < Vocab) {
            load_v<T, V>(a, wte + tok * C + c);
#pragma unroll
            for (int j = 0; j < V; j++) p[j] = fmaf(scale, a[j], p[j]);
        }
        store_v<T, V>(out + row * C + c, p);
    }
}

// ---------------------------------------------------------------------------------------------------------
// backward

// simple: one thread per column, all positions in order (the spec)
template <typename T>
__global__ void embedding_backward_simple_kernel(float* dwte, float* dwpe, const T* dout, const int32_t* tokens,
                                                 int64_t N, int64_t T_, int64_t C, int64_t Vocab, float scale) {
    const int64_t c = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (c >= C) return;
    for (int64_t p = 0; p < N; p++) {
        const float g = to_f32(dout[p * C + c]);
        const int64_t tok = tokens[p];
        if (tok >= 0 && tok < Vocab) dwte[tok * C + c] = fmaf(scale, g, dwte[tok * C + c]);
        if (dwpe) dwpe[(p % T_) * C + c] += g;
    }
}

// dwpe[t] += sum_b dout[b, t], batch order; one thread per (t, pack)
template <typename T, int V>
__global__ void embedding_backward_wpe_kernel(float* dwpe, const T* dout, int64_t B, int64_t T_, int64_t CP) {
    const int64_t total = T_ * CP, C = CP * V;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / CP, c = (i - t * CP) * V;
        float s[V], g[V];
#pragma unroll
        for (int j = 0; j < V; j++) s[j] = 0.f;
        for (int64_t b = 0; b < B; b++) {
            load_v<T, V>(g, dout + (b * T_ + t) * C + c);
#pragma unroll
            for (int j = 0; j < V; j++) s[j] += g[j];
        }
        float* d = dwpe + t * C + c;
#pragma unroll
        for (int j = 0; j < V; j++) d[j] += s[j];
    }
}

// sort keys: the token, or Vocab (sorts last, skipped) for ids outside [0, Vocab)
__global__ void embedding_sort_keys_kernel(uint32_t* keys, int32_t* vals, const int32_t* tokens, int64_t N,
                                           int64_t Vocab) {
    for (int64_t p = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; p < N; p += (int64_t)gridDim.x * blockDim.x) {
        const int64_t tok = tokens[p];
        keys[p] = (uint32_t)(tok >= 0 && tok < Vocab ? tok : Vocab);
        vals[p] = (int32_t)p;
    }
}

// dwte[key] += s (V floats; fp32 rows, 16-byte aligned when V % 4 == 0 and the launcher checked alignment)
template <int V>
__device__ __forceinline__ void add_row(float* dst, const float (&s)[V]) {
    if constexpr (V % 4 == 0) {
#pragma unroll
        for (int j = 0; j < V; j += 4) {
            float4 q = *reinterpret_cast<float4*>(dst + j);
            q.x += s[j], q.y += s[j + 1], q.z += s[j + 2], q.w += s[j + 3];
            *reinterpret_cast<float4*>(dst + j) = q;
        }
    } else {
#pragma unroll
        for (int j = 0; j < V; j++) dst[j] += s[j];
    }
}
template <int V>
__device__ __forceinline__ void put_row(float* dst, const float (&s)[V]) {
#pragma unroll
    for (int j = 0; j < V; j++) dst[j] = s[j];
}

// step 2: block = chunk of sorted positions [s, e); thread = column pack (loops if C / V > blockDim.x).
// pfirst/plast: (nchunks, C) fp32.
template <typename T, int V>
__global__ void embedding_backward_wte_chunk_kernel(float* dwte, float* pfirst, float* plast, const T* dout,
                                                    const uint32_t* keys, const int32_t* vals, int64_t N,
                                                    int64_t CP, int64_t Vocab, float scale) {
    __shared__ uint32_t skey[kChunk];
    __shared__ int32_t sval[kChunk];
    const int64_t chunk = blockIdx.x, s = chunk * kChunk, e = min(N, s + kChunk), C = CP * V;
    const int n = (int)(e - s);
    if (threadIdx.x < n) {
        skey[threadIdx.x] = keys[s + threadIdx.x];
        sval[threadIdx.x] = vals[s + threadIdx.x];
    }
    __syncthreads();
    const bool cont_in = s > 0 && keys[s - 1] == skey[0];
    const bool cont_out = e < N && keys[e] == skey[n - 1];
    for (int64_t cp = threadIdx.x; cp < CP; cp += blockDim.x) {
        const int64_t c = cp * V;
        float acc[V];
#pragma unroll
        for (int j = 0; j < V; j++) acc[j] = 0.f;
        bool first = true;
        for (int i0 = 0; i0 < n; i0 += 4) {
            float g[4][V];  // four rows in flight
#pragma unroll
            for (int u = 0; u < 4; u++)
                if (i0 + u < n) load_v<T, V>(g[u], dout + (int64_t)sval[i0 + u] * C + c);
#pragma unroll
            for (int u = 0; u < 4; u++) {
                const int i = i0 + u;
                if (i >= n) break;
#pragma unroll
                for (int j = 0; j < V; j++) acc[j] = fmaf(scale, g[u][j], acc[j]);
                if (i == n - 1 || skey[i + 1] != skey[i]) {  // end of a segment
                    const uint32_t key = skey[i];
                    if (first && cont_in) put_row<V>(pfirst + chunk * C + c, acc);
                    else if (i == n - 1 && cont_out) put_row<V>(plast + chunk * C + c, acc);
                    else if (key < Vocab) add_row<V>(dwte + (int64_t)key * C + c, acc);
#pragma unroll
                    for (int j = 0; j < V; j++) acc[j] = 0.f;
                    first = false;
                }
            }
        }
    }
}

// step 3: one thread per (chunk, column pack); only the chunk where a chunk-crossing segment starts works
template <int V>
__global__ void embedding_backward_wte_carry_kernel(float* dwte, const float* pfirst, const float* plast,
                                                    const uint32_t* keys, int64_t N, int64_t nchunks, int64_t CP,
                                                    int64_t Vocab) {
    const int64_t C = CP * V;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < nchunks * CP;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t j = i / CP, c = (i - j * CP) * V;
        const int64_t s = j * kChunk, e = min(N, s + kChunk);
        const uint32_t key = keys[e - 1];
        if (e >= N || keys[e] != key || key >= Vocab) continue;       // the last segment ends in this chunk
        if (keys[s] == key && s > 0 && keys[s - 1] == key) continue;  // a pass-through chunk, not the start
        float acc[V];
#pragma unroll
        for (int q = 0; q < V; q++) acc[q] = plast[j * C + c + q];
        for (int64_t k = j + 1; k < nchunks; k++) {
            const int64_t ks = k * kChunk, ke = min(N, ks + kChunk);
#pragma unroll
            for (int q = 0; q < V; q++) acc[q] += pfirst[k * C + c + q];
            const bool whole = keys[ke - 1] == key;  // chunk k is inside the segment
            if (!(whole && ke < N && keys[ke] == key)) break;
        }
        add_row<V>(dwte + (int64_t)key * C + c, acc);
    }
}

// ---------------------------------------------------------------------------------------------------------
// launchers

static constexpr int kBlock = 256;

void embedding_forward(void* out, const int32_t* tokens, const void* wte, const void* wpe, int64_t B, int64_t T_,
                       int64_t C, int64_t V, float scale, DType t) {
    const int64_t N = B * T_;
    if (N <= 0 || C <= 0) return;
    DISPATCH_FLOAT(t, T, {
        T* o = (T*)out;
        const T *te = (const T*)wte, *pe = (const T*)wpe;
        const bool al = !simple_elementwise_flag() && C % kVec<T> == 0 && aligned16(o) && aligned16(te) &&
                        aligned16(pe);
        if (al) {
            const int64_t CP = C / kVec<T>;
            embedding_forward_kernel<T, kVec<T>>
                <<<grid_stride_blocks(N * CP, kBlock), kBlock>>>(o, tokens, te, pe, N, T_, CP, V, scale);
        } else {
            embedding_forward_kernel<T, 1><<<grid_stride_blocks(N * C, kBlock), kBlock>>>(o, tokens, te, pe, N, T_,
                                                                                           C, V, scale);
        }
    });
    CUDA_CHECK_LAUNCH();
}

template <typename T, int VV>
static void embedding_backward_fast(float* dwte, float* dwpe, const T* dout, const int32_t* tokens, int64_t B,
                                    int64_t T_, int64_t C, int64_t Vocab, float scale) {
    const int64_t N = B * T_, CP = C / VV;
    if (dwpe) {
        embedding_backward_wpe_kernel<T, VV><<<grid_stride_blocks(T_ * CP, kBlock), kBlock>>>(dwpe, dout, B, T_, CP);
        CUDA_CHECK_LAUNCH();
    }
    if (Vocab <= 0) return;  // every id is invalid: nothing to scatter
    int end_bit = 1;  // bits of the largest key (Vocab itself, the invalid-id key)
    while (end_bit < 32 && ((uint64_t)Vocab >> end_bit) != 0) end_bit++;
    const int n = (int)N;  // the binding checks N < 2^31
    size_t sort_bytes = 0;
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, (const uint32_t*)nullptr, (uint32_t*)nullptr,
                                               (const int32_t*)nullptr, (int32_t*)nullptr, n, 0, end_bit,
                                               (cudaStream_t)0));
    const int64_t nchunks = (N + kChunk - 1) / kChunk;
    const size_t bytes = 4 * scratch_piece(N * 4) + scratch_piece(sort_bytes) +
                         2 * scratch_piece((size_t)nchunks * C * sizeof(float));
    ScratchLease lease = scratch(bytes);
    ScratchCarver cv{lease.ptr};
    uint32_t *keys_in = cv.take<uint32_t>(N), *keys = cv.take<uint32_t>(N);
    int32_t *vals_in = cv.take<int32_t>(N), *vals = cv.take<int32_t>(N);
    void* sort_tmp = cv.take<char>(sort_bytes);
    float *pfirst = cv.take<float>(nchunks * C), *plast = cv.take<float>(nchunks * C);
    embedding_sort_keys_kernel<<<grid_stride_blocks(N, kBlock), kBlock>>>(keys_in, vals_in, tokens, N, Vocab);
    CUDA_CHECK_LAUNCH();
    CUDA_CHECK(cub::DeviceRadixSort::SortPairs(sort_tmp, sort_bytes, keys_in, keys, vals_in, vals, n, 0, end_bit,
                                               (cudaStream_t)0));
    const int threads = (int)std::min<int64_t>(kBlock, (CP + 31) / 32 * 32);
    embedding_backward_wte_chunk_kernel<T, VV><<<(unsigned)nchunks, threads>>>(dwte, pfirst, plast, dout, keys, vals,
                                                                               N, CP, Vocab, scale);
    CUDA_CHECK_LAUNCH();
    embedding_backward_wte_carry_kernel<VV><<<grid_stride_blocks(nchunks * CP, kBlock), kBlock>>>(
        dwte, pfirst, plast, keys, N, nchunks, CP, Vocab);
    CUDA_CHECK_LAUNCH();
}

void embedding_backward(float* dwte, float* dwpe, const void* dout, const int32_t* tokens, int64_t B, int64_t T_,
                        int64_t C, int64_t V, float scale, DType t) {
    const int64_t N = B * T_;
    if (N <= 0 || C <= 0) return;
    DISPATCH_FLOAT(t, T, {
        const T* dy = (const T*)dout;
        if (simple_elementwise_flag()) {
            embedding_backward_simple_kernel<T><<<ceil_div(C, kBlock), kBlock>>>(dwte, dwpe, dy, tokens, N, T_, C, V,
                                                                                  scale);
            CUDA_CHECK_LAUNCH();
        } else if (C % kVec<T> == 0 && aligned16(dy) && aligned16(dwte) && aligned16(dwpe)) {
            embedding_backward_fast<T, kVec<T>>(dwte, dwpe, dy, tokens, B, T_, C, V, scale);
        } else {
            embedding_backward_fast<T, 1>(dwte, dwpe, dy, tokens, B, T_, C, V, scale);
        }
    });
}

}  // namespace fastllm::cuda
