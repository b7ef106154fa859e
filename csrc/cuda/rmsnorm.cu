/*
RMSNorm over the last axis on the GPU; the CPU twin csrc/cpu/rmsnorm.cpp is the spec (same row layout: row n at
(n / group) * group_stride + (n % group) * C, so Qwen3's QK-norm runs in place on the head rows of the packed qkv).
  out = x * rstd * weight,  rstd = 1 / sqrt(mean(x^2) + eps)   (fp32 statistics)
  backward (accumulates): xhat = x * rstd, g = dout * weight
    dx += rstd * (g - xhat * mean(g * xhat)),  dweight += sum_n dout * xhat
    in place (dx is dout): dx = ... (the rows are replaced; the rows outside the normed heads pass through)
Shapes: x, out, dout, dx rows of C elements of T; weight (C) of T; rstd (N) fp32; dweight (C) fp32. Memory bound.

Forward: one warp per row, 8 rows per 256-thread block; pass 1 sums x^2 (16-byte packs of 4 float / 8 bf16 when
every row start is 16-byte aligned and C % pack == 0, else one element per lane and step), pass 2 re-reads the row
(L1/L2 hit) and writes out; out may be x (each lane rewrites exactly the elements it read).
Backward, deterministic (the scheme of layernorm.cu): kernel 1, a block owns a contiguous range of rows (fixed by N
and C), its warps take every nwarps-th row: pass 1 reduces sum(g * xhat), pass 2 updates dx and adds dout * xhat
into the warp's fp32 accumulator row in shared memory (each lane owns fixed columns); the block then sums its warps
in order into a partial row (nblocks, C); kernel 2 adds the column sums of the partials into dweight in block order.
Shared memory nwarps * C floats <= 48 KiB (C <= 12288); beyond that the simple backward: dx warp per row, then one
thread per column walking all N rows. set_simple_elementwise (tests) runs the scalar forms (pack of 1) and the
simple backward.
Perf notes: written without a GPU (checked on the CUDA emulator); bytes moved: forward 2 reads + 1 write of x per
element (the second read from cache), backward reads dout, x, dx and writes dx.
*/
#include <algorithm>
#include <initializer_list>

#include "elementwise.cuh"

namespace fastllm::cuda {

namespace {

constexpr int kRowsPerBlock = 8;
constexpr int kMaxBwdBlocks = 1024;
constexpr size_t kBwdSmem = 48 * 1024;

struct NormRows {  // csrc/cpu/rmsnorm.h
    int64_t group, group_stride;
    int C;
    __device__ __forceinline__ int64_t at(int64_t n) const { return (n / group) * group_stride + (n % group) * C; }
};

// ---------------------------------------------------------------------------------------------------------
// kernels; V = kVec<T> (16-byte packs, aligned rows) or 1

template <typename T, int V>
__global__ void rmsnorm_forward_kernel(T* out, float* rstd, const T* x, const T* weight, int64_t N, NormRows rows,
                                       float eps) {
    const int lane = threadIdx.x & 31;
    const int64_t n = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
    if (n >= N) return;  // whole warp
    const int C = rows.C;
    const T* xr = x + rows.at(n);
    float ss = 0.f;
    for (int i0 = lane * V; i0 < C; i0 += 32 * V) {
        float v[V];
        load_v<T, V>(v, xr + i0);
#pragma unroll
        for (int j = 0; j < V; j++) ss += v[j] * v[j];
    }
    const float r = rsqrtf(warp_sum(ss) / C + eps);
    T* o = out + rows.at(n);
    for (int i0 = lane * V; i0 < C; i0 += 32 * V) {
        float v[V], w[V];
        load_v<T, V>(v, xr + i0);
        load_v<T, V>(w, weight + i0);
#pragma unroll
        for (int j = 0; j < V; j++) v[j] = v[j] * r * w[j];
        store_v<T, V>(o + i0, v);
    }
    if (lane == 0) rstd[n] = r;
}

// one warp's work on row n: dx += ... (dx = ... in place, dx == dout), and (if acc) acc[c] += dout * xhat
template <typename T, int V>
__device__ __forceinline__ void rmsnorm_backward_row(T* dx, float* acc, const T* dout, const T* x, const T* weight,
                                                     float r, int C, int lane) {
    const bool in_place = dx == dout;  // each lane reads its elements of dout (both passes) before writing them
    float gxs = 0.f;
    for (int i0 = lane * V; i0 < C; i0 += 32 * V) {
        float a[V], b[V], w[V];
        load_v<T, V>(a, dout + i0);
        load_v<T, V>(b, x + i0);
        load_v<T, V>(w, weight + i0);
#pragma unroll
        for (int j = 0; j < V; j++) gxs += a[j] * w[j] * (b[j] * r);
    }
    const float gx_mean = warp_sum(gxs) / C;
    for (int i0 = lane * V; i0 < C; i0 += 32 * V) {
        float a[V], b[V], w[V], o[V];
        load_v<T, V>(a, dout + i0);
        load_v<T, V>(b, x + i0);
        load_v<T, V>(w, weight + i0);
        if (in_place) {
#pragma unroll
            for (int j = 0; j < V; j++) o[j] = 0.f;
        } else {
            load_v<T, V>(o, dx + i0);
        }
#pragma unroll
        for (int j = 0; j < V; j++) {
            const float xhat = b[j] * r;
            o[j] += r * (a[j] * w[j] - xhat * gx_mean);
            if (acc) acc[i0 + j] += a[j] * xhat;
        }
        store_v<T, V>(dx + i0, o);
    }
}

// kernel 1: dx, and the block's partial dweight row (partial (gridDim.x, C))
template <typename T, int V>
__global__ void rmsnorm_backward_kernel(T* dx, float* partial, const T* dout, const T* x, const T* weight,
                                        const float* rstd, int64_t N, NormRows rows, int64_t rows_per_block) {
    extern __shared__ float4 smem_f4[];  // float4 for 16-byte alignment
    float* acc = reinterpret_cast<float*>(smem_f4);  // (nwarps, C)
    const int nwarps = blockDim.x / 32, warp = threadIdx.x / 32, lane = threadIdx.x & 31, C = rows.C;
    for (int i = threadIdx.x; i < nwarps * C; i += blockDim.x) acc[i] = 0.f;
    __syncthreads();
    const int64_t r0 = blockIdx.x * rows_per_block, r1 = min(N, r0 + rows_per_block);
    for (int64_t n = r0 + warp; n < r1; n += nwarps) {
        const int64_t off = rows.at(n);
        rmsnorm_backward_row<T, V>(dx + off, acc + (size_t)warp * C, dout + off, x + off, weight, rstd[n], C, lane);
    }
    __syncthreads();
    float* p = partial + (size_t)blockIdx.x * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float s = 0.f;
        for (int k = 0; k < nwarps; k++) s += acc[(size_t)k * C + i];
        p[i] = s;
    }
}

// kernel 2: dweight[c] += sum_b partial[b, c] in a fixed order; block (32, 32): x = column, y = blocks y, y+32, ...
__global__ void rmsnorm_dweight_reduce_kernel(float* dweight, const float* partial, int nblocks, int C) {
    __shared__ float sums[32][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    float s = 0.f;
    if (c < C)
        for (int b = threadIdx.y; b < nblocks; b += 32) s += partial[(size_t)b * C + c];
    sums[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    if (threadIdx.y == 0 && c < C) {
        float t = 0.f;
        for (int y = 0; y < 32; y++) t += sums[y][threadIdx.x];
        dweight[c] += t;
    }
}

// simple backward: dx by warp per row, dweight by one thread per column over all rows
template <typename T>
__global__ void rmsnorm_backward_dx_simple_kernel(T* dx, const T* dout, const T* x, const T* weight,
                                                  const float* rstd, int64_t N, NormRows rows) {
    const int lane = threadIdx.x & 31;
    const int64_t n = (int64_t)blockIdx.x * kRowsPerBlock + threadIdx.x / 32;
    if (n >= N) return;
    const int64_t off = rows.at(n);
    rmsnorm_backward_row<T, 1>(dx + off, nullptr, dout + off, x + off, weight, rstd[n], rows.C, lane);
}

template <typename T>
__global__ void rmsnorm_dweight_simple_kernel(float* dweight, const T* dout, const T* x, const float* rstd, int64_t N,
                                              NormRows rows) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= rows.C) return;
    float s = 0.f;
    for (int64_t n = 0; n < N; n++) {
        const int64_t off = rows.at(n) + c;
        s += to_f32(dout[off]) * to_f32(x[off]) * rstd[n];
    }
    dweight[c] += s;
}

// 16-byte packs are usable: all pointers aligned, and every row start a multiple of the pack
template <typename T>
bool packs_ok(NormRows r, std::initializer_list<const void*> ptrs) {
    if (r.C % kVec<T> || r.group_stride % kVec<T>) return false;
    for (const void* p : ptrs)
        if (!aligned16(p)) return false;
    return true;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------
// launchers

void rmsnorm_forward(void* out, float* rstd, const void* x, const void* weight, int64_t N, int64_t C, int64_t group,
                     int64_t group_stride, float eps, DType t) {
    if (N <= 0 || C <= 0) return;
    const NormRows rows{std::max<int64_t>(group, 1), group_stride, (int)C};
    DISPATCH_FLOAT(t, T, {
        T* o = (T*)out;
        const T *xi = (const T*)x, *w = (const T*)weight;
        const unsigned grid = (unsigned)ceil_div(N, kRowsPerBlock);
        if (!simple_elementwise_flag() && packs_ok<T>(rows, {o, xi, w}))
            rmsnorm_forward_kernel<T, kVec<T>><<<grid, kRowsPerBlock * 32>>>(o, rstd, xi, w, N, rows, eps);
        else
            rmsnorm_forward_kernel<T, 1><<<grid, kRowsPerBlock * 32>>>(o, rstd, xi, w, N, rows, eps);
    });
    CUDA_CHECK_LAUNCH();
}

void rmsnorm_backward(void* dx, float* dweight, const void* dout, const void* x, const void* weight,
                      const float* rstd, int64_t N, int64_t C, int64_t group, int64_t group_stride, DType t) {
    if (N <= 0 || C <= 0) return;
    const NormRows rows{std::max<int64_t>(group, 1), group_stride, (int)C};
    const int nwarps = (int)std::min<int64_t>(8, (int64_t)kBwdSmem / (C * (int64_t)sizeof(float)));
    DISPATCH_FLOAT(t, T, {
        T* d = (T*)dx;
        const T *dy = (const T*)dout, *xi = (const T*)x, *w = (const T*)weight;
        if (simple_elementwise_flag() || nwarps == 0) {  // dweight first: in place, dx overwrites dout
            rmsnorm_dweight_simple_kernel<T><<<ceil_div(C, 256), 256>>>(dweight, dy, xi, rstd, N, rows);
            rmsnorm_backward_dx_simple_kernel<T>
                <<<ceil_div(N, kRowsPerBlock), kRowsPerBlock * 32>>>(d, dy, xi, w, rstd, N, rows);
        } else {
            // block b owns rows [b * rpb, (b + 1) * rpb): a function of N and C only (reproducible sums)
            const int64_t rpb = std::max<int64_t>(4 * nwarps, (N + kMaxBwdBlocks - 1) / kMaxBwdBlocks);
            const int nblocks = ceil_div(N, rpb);
            const size_t smem = (size_t)nwarps * C * sizeof(float);
            ScratchLease lease = scratch((size_t)nblocks * C * sizeof(float));
            float* partial = (float*)lease.ptr;
            if (packs_ok<T>(rows, {d, dy, xi, w}))
                rmsnorm_backward_kernel<T, kVec<T>>
                    <<<nblocks, nwarps * 32, smem>>>(d, partial, dy, xi, w, rstd, N, rows, rpb);
            else
                rmsnorm_backward_kernel<T, 1><<<nblocks, nwarps * 32, smem>>>(d, partial, dy, xi, w, rstd, N, rows, rpb);
            rmsnorm_dweight_reduce_kernel<<<ceil_div(C, 32), dim3(32, 32)>>>(dweight, partial, nblocks, (int)C);
        }
    });
    CUDA_CHECK_LAUNCH();
}

}  // namespace fastllm::cuda
