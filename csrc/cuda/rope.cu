/*
Rotary position embedding on the GPU, rotate-half layout (HF Llama); the CPU twin csrc/cpu/rope.cpp is the spec.
On the packed qkv (B, T, (NH + 2*NKV) * hs), token t of sequence b at position p = pos[b] + t (pos int32 (B) on
the device, or nullptr: p = t), and float32 tables cos, sin (P, R2) whatever the dtype T of qkv (HF rounds them
to bf16 first; fp32 here):
  x1 = x[:R2], x2 = x[R2:2R2] of each q and k head -> out1 = x1 cos - x2 sin, out2 = x2 cos + x1 sin
(fp32 math, one rounding to T at the store). Dims past 2*R2 and the v heads pass through. Backward: the transposed
rotation, accumulated into dinp, or in place when dinp == dout. A position outside [0, P) is skipped (left as it
is): the kernels cannot raise; the host checks numpy positions.

Kernels: (1) one thread per rotated pair (token, q/k head, i < R2), grid-stride; consecutive threads take
consecutive i, so x1, x2, cos and sin loads are coalesced; a thread reads both elements of its pair before writing
them, so in place is safe. (2) only when out != inp (or when accumulating): one thread per remaining element (the
unrotated dims and v), copy or add.
Perf notes: written without a GPU (checked on the CUDA emulator). Memory bound: one read and one write of every
q/k element; the table row of a token is shared by its heads (L1/L2).
*/
#include "elementwise.cuh"

namespace fastllm::cuda {

namespace {

struct RopeDims {
    int64_t B, T, P;
    int NH, NKV, hs, R2;
};

// SIGN = +1 rotates by +angle, -1 by -angle; ACC adds into out (a separate dinp) instead of writing it
template <typename T, int SIGN, bool ACC>
__global__ void rope_pairs_kernel(T* out, const T* inp, const float* __restrict__ cos, const float* __restrict__ sin,
                                  const int32_t* __restrict__ pos, RopeDims d) {
    const int NQK = d.NH + d.NKV, W = (d.NH + 2 * d.NKV) * d.hs;
    const int64_t n = d.B * d.T * NQK * d.R2;
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        const int i = (int)(k % d.R2);
        const int64_t th = k / d.R2;  // (token, head)
        const int h = (int)(th % NQK);
        const int64_t tok = th / NQK, b = tok / d.T, t = tok % d.T;
        const int64_t p = (pos ? (int64_t)pos[b] : 0) + t;
        if (p < 0 || p >= d.P) continue;
        const int64_t e = tok * W + (int64_t)h * d.hs + i;
        const float c = cos[p * d.R2 + i], s = SIGN * sin[p * d.R2 + i];
        const float x1 = to_f32(inp[e]), x2 = to_f32(inp[e + d.R2]);
        float o1 = x1 * c - x2 * s, o2 = x2 * c + x1 * s;
        if (ACC) o1 += to_f32(out[e]), o2 += to_f32(out[e + d.R2]);
        out[e] = from_f32<T>(o1);
        out[e + d.R2] = from_f32<T>(o2);
    }
}

// the elements that are not rotated (dims >= 2*R2 of q/k heads, and v): out = inp, or out += inp
template <typename T, bool ACC>
__global__ void rope_rest_kernel(T* out, const T* inp, RopeDims d) {
    const int W = (d.NH + 2 * d.NKV) * d.hs, qk = (d.NH + d.NKV) * d.hs;
    const int64_t n = d.B * d.T * W;
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        const int c = (int)(k % W);
        if (c < qk && c % d.hs < 2 * d.R2) continue;  // a rotated element (the pairs kernel)
        out[k] = ACC ? from_f32<T>(to_f32(out[k]) + to_f32(inp[k])) : inp[k];
    }
}

template <typename T, int SIGN, bool ACC>
void rope_launch(T* out, const T* inp, const float* cos, const float* sin, const int32_t* pos, RopeDims d) {
    constexpr int kBlock = 256;
    const int64_t pairs = d.B * d.T * (d.NH + d.NKV) * d.R2;
    if (pairs > 0) rope_pairs_kernel<T, SIGN, ACC><<<grid_stride_blocks(pairs, kBlock), kBlock>>>(out, inp, cos, sin,
                                                                                                 pos, d);
    CUDA_CHECK_LAUNCH();
    if (ACC || out != inp) {
        const int64_t n = d.B * d.T * (d.NH + 2 * d.NKV) * d.hs;
        rope_rest_kernel<T, ACC><<<grid_stride_blocks(n, kBlock), kBlock>>>(out, inp, d);
        CUDA_CHECK_LAUNCH();
    }
}

}  // namespace

void rope_forward(void* out, const void* inp, const float* cos, const float* sin, const int32_t* pos, int64_t B,
                  int64_t T, int64_t P, int64_t NH, int64_t NKV, int64_t hs, int64_t R2, DType t) {
    if (B * T == 0) return;
    const RopeDims d{B, T, P, (int)NH, (int)NKV, (int)hs, (int)R2};
    DISPATCH_FLOAT(t, F, rope_launch<F, 1, false>((F*)out, (const F*)inp, cos, sin, pos, d));
}

void rope_backward(void* dinp, const void* dout, const float* cos, const float* sin, const int32_t* pos, int64_t B,
                   int64_t T, int64_t P, int64_t NH, int64_t NKV, int64_t hs, int64_t R2, DType t) {
    if (B * T == 0) return;
    const RopeDims d{B, T, P, (int)NH, (int)NKV, (int)hs, (int)R2};
    DISPATCH_FLOAT(t, F, {
        if (dinp == dout) rope_launch<F, -1, false>((F*)dinp, (const F*)dout, cos, sin, pos, d);
        else rope_launch<F, -1, true>((F*)dinp, (const F*)dout, cos, sin, pos, d);
    });
}

}  // namespace fastllm::cuda
