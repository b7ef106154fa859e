/*
LayerNorm over the last axis on the GPU; the CPU twin csrc/cpu/layernorm.cpp is the spec.
  out = (x - mean) * rstd * weight + bias,  rstd = 1 / sqrt(var + eps)   (two-pass variance, fp32 statistics)
  backward (accumulates): g = dout * weight
    dx += rstd * (g - mean(g) - xhat * mean(g * xhat)),  dweight += sum_n dout * xhat,  dbias += sum_n dout
Shapes: x, out, dout, dx (N, C) of T; weight, bias (C) of T; mean, rstd (N) fp32; dweight, dbias (C) fp32.
O(N*C), memory bound.

Forward: one warp per row, 8 rows per 256-thread block. Fast kernel (C <= 2048, 16-byte aligned rows): the
row is loaded once with 128-bit loads into registers (ITERS packs of 4 float / 8 bf16 per lane, ITERS a
template parameter from {1,2,3,4,6,8,12,16} with at most 64 floats per lane), then sum -> mean, centred sum of
squares -> rstd (warp shuffles), then the normalised row is written with 128-bit stores. Otherwise the simple
kernel: same warp-per-row scheme, three scalar passes over the row (the 2nd and 3rd hit L1/L2).
Backward, deterministic (no float atomics: same bits every run for a given N, C):
  kernel 1: a block owns a contiguous range of rows (fixed by N and C only); each warp takes every nwarps-th
  row of it: pass 1 reduces sum(g) and sum(g * xhat) over the row, pass 2 re-reads the row (L1/L2 hits),
  updates dx and adds dout * xhat and dout into the warp's own fp32 accumulators in shared memory (each lane
  owns fixed columns: no races). At the end the block sums its warps' accumulators in warp order into a
  scratch row of partial sums (gridDim x 2C).
  kernel 2: dweight/dbias (+)= the column sums of the partials, in block order (32 x 32 threads per 32
  columns, each thread a strided subset of blocks, then the 32 subsets in order).
  Packs of 16 bytes when aligned, scalars (one element per lane and step, coalesced) otherwise. Shared memory
  is nwarps * 2C floats <= 48 KiB, so C <= 6144; beyond that the simple backward: dx by warp-per-row, then one
  thread per column walking all N rows (slow, but simple and deterministic; never used by GPT-2 shapes).
Perf notes (written without a GPU: compiled and register-checked for sm_80/sm_90, not yet timed): the forward
reads x once and writes out once (3 KB per row at C = 768 f32); the backward reads dout, x, dx and writes dx (the
second reads come from cache) plus 2 * C * 4 bytes per block of partials (<= 1024 blocks: ~3% of the traffic at N
= 16384, C = 768).
*/
#include <algorithm>

#include "elementwise.cuh"

namespace fastllm::cuda {

static constexpr int kRowsPerBlock = 8;  // forward: warps per block, one row each
static constexpr int kMaxRegFloats = 64;  // forward fast path: row elements cached per lane
static constexpr int kMaxBwdBlocks = 1024;
static constexpr size_t kBwdSmem = 48 * 1024;

// ---------------------------------------------------------------------------------------------------------
// simple kernels (the spec; any C, any alignment)

template <typename T>
__global__ void layernorm_forward_simple_kernel(T* out, float* mean, float* rstd, const T* x, const T* weight,
                                                const T* bias, int64_t N, int C, float eps) {
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;  // whole warp
    const T* xr = x + row * C;
    float s = 0.f;
    for (int i = lane; i < C; i += 32) s += to_f32(xr[i]);
    const float m = warp_sum(s) / C;
    float v = 0.f;
    for (int i = lane; i < C; i += 32) {
        const float d = to_f32(xr[i]) - m;
        v += d * d;
    }
    const float r = rsqrtf(warp_sum(v) / C + eps);
    T* o = out + row * C;
    for (int i = lane; i < C; i += 32)
        o[i] = from_f32<T>((to_f32(xr[i]) - m) * r * to_f32(weight[i]) + to_f32(bias[i]));
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// dx only (warp per row); the weight gradients come from the column kernel below
template <typename T>
__global__ void layernorm_backward_dx_simple_kernel(T* dx, const T* dout, const T* x, const T* weight,
                                                    const float* mean, const float* rstd, int64_t N, int C) {
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= N) return;
    const T *dy = dout + row * C, *xr = x + row * C;
    const float m = mean[row], r = rstd[row];
    float gs = 0.f, gxs = 0.f;
    for (int i = lane; i < C; i += 32) {
        const float g = to_f32(dy[i]) * to_f32(weight[i]), xhat = (to_f32(xr[i]) - m) * r;
        gs += g;
        gxs += g * xhat;
    }
    const float g_mean = warp_sum(gs) / C, gx_mean = warp_sum(gxs) / C;
    T* d = dx + row * C;
    for (int i = lane; i < C; i += 32) {
        const float g = to_f32(dy[i]) * to_f32(weight[i]), xhat = (to_f32(xr[i]) - m) * r;
        d[i] = from_f32<T>(to_f32(d[i]) + r * (g - g_mean - xhat * gx_mean));
    }
}

// one thread per column, all rows in order
template <typename T>
__global__ void layernorm_backward_params_simple_kernel(float* dweight, float* dbias, const T* dout, const T* x,
                                                        const float* mean, const float* rstd, int64_t N, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    float dw = 0.f, db = 0.f;
    for (int64_t n = 0; n < N; n++) {
        const float dy = to_f32(dout[n * C + c]);
        dw += dy * (to_f32(x[n * C + c]) - mean[n]) * rstd[n];
        db += dy;
    }
    dweight[c] += dw;
    dbias[c] += db;
}

// ---------------------------------------------------------------------------------------------------------
// fast forward: row cached in registers; requires 16-byte aligned x, out, weight, bias and C % kVec<T> == 0

template <typename T, int ITERS>
__global__ void __launch_bounds__(kRowsPerBlock * 32)
    layernorm_forward_kernel(T* out, float* mean, float* rstd, const T* x, const T* weight, const T* bias,
                             int64_t N, int C, float eps) {
    constexpr int V = kVec<T>;
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
    if (row >= N) return;  // whole warp
    const T* xr = x + row * C;
    float v[ITERS][V];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < ITERS; k++) {
        const int i0 = (k * 32 + lane) * V;  // C % V == 0: a pack is wholly inside the row or wholly outside
        if (i0 < C) {
            load_pack<T>(v[k], xr + i0);
        } else {
#pragma unroll
            for (int j = 0; j < V; j++) v[k][j] = 0.f;
        }
#pragma unroll
        for (int j = 0; j < V; j++) s += v[k][j];
    }
    const float m = warp_sum(s) / C;
    float ss = 0.f;
#pragma unroll
    for (int k = 0; k < ITERS; k++) {
        if ((k * 32 + lane) * V < C) {
#pragma unroll
            for (int j = 0; j < V; j++) {
                const float d = v[k][j] - m;
                ss += d * d;
            }
        }
    }
    const float r = rsqrtf(warp_sum(ss) / C + eps);
    T* o = out + row * C;
#pragma unroll
    for (int k = 0; k < ITERS; k++) {
        const int i0 = (k * 32 + lane) * V;
        if (i0 < C) {
            float w[V], b[V];
            load_pack<T>(w, weight + i0);
            load_pack<T>(b, bias + i0);
#pragma unroll
            for (int j = 0; j < V; j++) v[k][j] = (v[k][j] - m) * r * w[j] + b[j];
            store_pack<T>(o + i0, v[k]);
        }
    }
    if (lane == 0) {
        mean[row] = m;
        rstd[row] = r;
    }
}

// V consecutive floats of shared memory (16-byte aligned when V % 4 == 0: 128-bit accesses, conflict-free
// for 8 consecutive lanes)
template <int V>
__device__ __forceinline__ void smem_load(float (&f)[V], const float* p) {
    if constexpr (V % 4 == 0) {
#pragma unroll
        for (int j = 0; j < V; j += 4) {
            const float4 q = *reinterpret_cast<const float4*>(p + j);
            f[j] = q.x, f[j + 1] = q.y, f[j + 2] = q.z, f[j + 3] = q.w;
        }
    } else {
#pragma unroll
        for (int j = 0; j < V; j++) f[j] = p[j];
    }
}
template <int V>
__device__ __forceinline__ void smem_store(float* p, const float (&f)[V]) {
    if constexpr (V % 4 == 0) {
#pragma unroll
        for (int j = 0; j < V; j += 4)
            *reinterpret_cast<float4*>(p + j) = make_float4(f[j], f[j + 1], f[j + 2], f[j + 3]);
    } else {
#pragma unroll
        for (int j = 0; j < V; j++) p[j] = f[j];
    }
}

// ---------------------------------------------------------------------------------------------------------
// fast backward, kernel 1: dx and per-block partial weight gradients. V = kVec<T> (aligned) or 1.
// partial: (gridDim.x, 2C) fp32, row b = [sum dout * xhat (C), sum dout (C)] over block b's rows.

template <typename T, int V>
__global__ void layernorm_backward_kernel(T* dx, float* partial, const T* dout, const T* x, const T* weight,
                                          const float* mean, const float* rstd, int64_t N, int C,
                                          int64_t rows_per_block) {
    extern __shared__ float4 smem_f4[];  // float4 for 16-byte alignment
    float* acc = reinterpret_cast<float*>(smem_f4);  // (nwarps, 2C)
    const int nwarps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x & 31;
    for (int i = threadIdx.x; i < nwarps * 2 * C; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    float* aw = acc + (size_t)warp * 2 * C;  // this warp's sum dout * xhat
    float* ab = aw + C;                      // and sum dout
    const int64_t r0 = blockIdx.x * rows_per_block, r1 = min(N, r0 + rows_per_block);
    for (int64_t n = r0 + warp; n < r1; n += nwarps) {
        const T *dy = dout + n * C, *xr = x + n * C;
        T* d = dx + n * C;
        const float m = mean[n], r = rstd[n];
        // pass 1: sums of g and g * xhat over the row
        float gs = 0.f, gxs = 0.f;
        for (int i0 = lane * V; i0 < C; i0 += 32 * V) {
            float a[V], b[V], w[V];
            load_v<T, V>(a, dy + i0);
            load_v<T, V>(b, xr + i0);
            load_v<T, V>(w, weight + i0);
#pragma unroll
            for (int j = 0; j < V; j++) {
                const float g = a[j] * w[j];
                gs += g;
                gxs += g * ((b[j] - m) * r);
            }
        }
        const float g_mean = warp_sum(gs) / C, gx_mean = warp_sum(gxs) / C;
        // pass 2: dx, and the warp's weight-gradient accumulators
        for (int i0 = lane * V; i0 < C; i0 += 32 * V) {
            float a[V], b[V], w[V], o[V], pw[V], pb[V];
            load_v<T, V>(a, dy + i0);
            load_v<T, V>(b, xr + i0);
            load_v<T, V>(w, weight + i0);
            load_v<T, V>(o, d + i0);
            smem_load<V>(pw, aw + i0);
            smem_load<V>(pb, ab + i0);
#pragma unroll
            for (int j = 0; j < V; j++) {
                const float xhat = (b[j] - m) * r, g = a[j] * w[j];
                o[j] += r * (g - g_mean - xhat * gx_mean);
                pw[j] += a[j] * xhat;
                pb[j] += a[j];
            }
            store_v<T, V>(d + i0, o);
            smem_store<V>(aw + i0, pw);
            smem_store<V>(ab + i0, pb);
        }
    }
    __syncthreads();
    float* out = partial + (size_t)blockIdx.x * 2 * C;
    for (int i = threadIdx.x; i < 2 * C; i += blockDim.x) {
        float s = 0.f;
        for (int k = 0; k < nwarps; k++) s += acc[(size_t)k * 2 * C + i];
        out[i] = s;
    }
}

// kernel 2: dweight[c] += sum_b partial[b, c], dbias[c] += sum_b partial[b, C + c], in a fixed order.
// Block (32, 32): threadIdx.x picks one of 32 consecutive columns of [0, 2C), threadIdx.y the blocks
// y, y + 32, ...; then the 32 partial sums of each column are added in y order.
__global__ void layernorm_params_reduce_kernel(float* dweight, float* dbias, const float* partial, int nblocks,
                                               int C) {
    __shared__ float sums[32][33];
    const int col = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (col < 2 * C)
        for (int b = threadIdx.y; b < nblocks; b += 32) s += partial[(size_t)b * 2 * C + col];
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && col < 2 * C) {
        float t = 0.f;
        for (int y = 0; y < 32; y++) t += sums[y][threadIdx.x];
        if (col < C) dweight[col] += t;
        else dbias[col - C] += t;
    }
}

// ---------------------------------------------------------------------------------------------------------
// launchers

// smallest supported ITERS with ITERS * 32 * kVec<T> >= C, or 0 if the row does not fit in registers
template <typename T>
static int forward_iters(int C) {
    constexpr int V = kVec<T>;
    for (int it : {1, 2, 3, 4, 6, 8, 12, 16})
        if (it * V <= kMaxRegFloats && (int64_t)it * 32 * V >= C) return it;
    return 0;
}

// instantiates the fast kernel for each ITERS allowed for T; false if `iters` is none of them
template <typename T, int ITERS, int... REST>
static bool launch_forward_fast(int iters, T* out, float* mean, float* rstd, const T* x, const T* w, const T* b,
                                int64_t N, int C, float eps) {
    if constexpr (ITERS * kVec<T> <= kMaxRegFloats) {
        if (iters == ITERS) {
            layernorm_forward_kernel<T, ITERS>
                <<<ceil_div(N, kRowsPerBlock), kRowsPerBlock * 32>>>(out, mean, rstd, x, w, b, N, C, eps);
            return true;
        }
    }
    if constexpr (sizeof...(REST) > 0)
        return launch_forward_fast<T, REST...>(iters, out, mean, rstd, x, w, b, N, C, eps);
    else
        return false;
}

void layernorm_forward(void* out, float* mean, float* rstd, const void* x, const void* weight, const void* bias,
                       int64_t N, int64_t C, float eps, DType t) {
    if (N <= 0 || C <= 0) return;
    DISPATCH_FLOAT(t, T, {
        T* o = (T*)out;
        const T *xi = (const T*)x, *w = (const T*)weight, *b = (const T*)bias;
        const bool aligned = C % kVec<T> == 0 && aligned16(o) && aligned16(xi) && aligned16(w) && aligned16(b);
        const int iters = aligned && !simple_elementwise_flag() ? forward_iters<T>((int)C) : 0;
        if (!launch_forward_fast<T, 1, 2, 3, 4, 6, 8, 12, 16>(iters, o, mean, rstd, xi, w, b, N, (int)C, eps))
            layernorm_forward_simple_kernel<T>
                <<<ceil_div(N, kRowsPerBlock), kRowsPerBlock * 32>>>(o, mean, rstd, xi, w, b, N, (int)C, eps);
    });
    CUDA_CHECK_LAUNCH();
}

// warps per block of the fast backward (their accumulators must fit in kBwdSmem), 0 if even one does not fit
static int backward_warps(int64_t C) {
    const int64_t per_warp = 2 * C * (int64_t)sizeof(float);
    return (int)std::min<int64_t>(8, (int64_t)kBwdSmem / per_warp);
}

void layernorm_backward(void* dx, float* dweight, float* dbias, const void* dout, const void* x,
                        const void* weight, const float* mean, const float* rstd, int64_t N, int64_t C, DType t) {
    if (N <= 0 || C <= 0) return;
    const int c = (int)C;
    const int nwarps = backward_warps(C);
    DISPATCH_FLOAT(t, T, {
        T* d = (T*)dx;
        const T *dy = (const T*)dout, *xi = (const T*)x, *w = (const T*)weight;
        if (simple_elementwise_flag() || nwarps == 0) {
            layernorm_backward_dx_simple_kernel<T>
                <<<ceil_div(N, kRowsPerBlock), kRowsPerBlock * 32>>>(d, dy, xi, w, mean, rstd, N, c);
            layernorm_backward_params_simple_kernel<T><<<ceil_div(C, 256), 256>>>(dweight, dbias, dy, xi, mean,
                                                                                  rstd, N, c);
        } else {
            // block b owns rows [b * rpb, (b + 1) * rpb): a function of N and C only (reproducible sums)
            const int64_t rpb = std::max<int64_t>(4 * nwarps, (N + kMaxBwdBlocks - 1) / kMaxBwdBlocks);
            const int nblocks = ceil_div(N, rpb);
            const size_t smem = (size_t)nwarps * 2 * C * sizeof(float);
            ScratchLease lease = scratch((size_t)nblocks * 2 * C * sizeof(float));
            float* partial = (float*)lease.ptr;
            const bool aligned = C % kVec<T> == 0 && aligned16(d) && aligned16(dy) && aligned16(xi) && aligned16(w);
            if (aligned)
                layernorm_backward_kernel<T, kVec<T>>
                    <<<nblocks, nwarps * 32, smem>>>(d, partial, dy, xi, w, mean, rstd, N, c, rpb);
            else
                layernorm_backward_kernel<T, 1>
                    <<<nblocks, nwarps * 32, smem>>>(d, partial, dy, xi, w, mean, rstd, N, c, rpb);
            layernorm_params_reduce_kernel<<<ceil_div(2 * C, 32), dim3(32, 32)>>>(dweight, dbias, partial, nblocks,
                                                                                  c);
        }
    });
    CUDA_CHECK_LAUNCH();
}

}  // namespace fastllm::cuda
