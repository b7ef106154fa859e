/*
AdamW on the GPU over a flat fp32 buffer; the CPU twin csrc/cpu/adamw.cpp is the spec:
  g = grad * grad_scale;  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
  p -= lr * (m / bc1 / (sqrt(v / bc2) + eps) + wd * p),   bc = 1 - beta^t (1/bc in double on the host)
(decoupled weight decay, as torch.optim.AdamW). Optionally params_copy (n, float32 or bfloat16) receives the
updated p, e.g. the bf16 weights the next forward reads. O(n), memory bound: 28 bytes per parameter (+2 or +4
for the copy).
Grid-stride loop, 4 parameters per thread and step with 128-bit loads/stores when every pointer is 16-byte
aligned (8 for a bf16 copy), scalar otherwise and for the < 4 tail. sqrt and the division are IEEE-rounded
(__fsqrt_rn, __fdiv_rn, not the --use_fast_math approximations), so the step matches the CPU kernel to an ulp
or two (FMA contraction aside). The simple kernel (set_simple_elementwise) is the same update one element per
thread.
Perf notes: written without a GPU (compiled and register-checked for sm_80/sm_90, 40 registers, no spills;
not yet timed); benchmarks/bench_adamw.py --device cuda compares with torch.optim.AdamW(fused=True).
*/
#include <cmath>

#include "elementwise.cuh"

namespace fastllm::cuda {

struct AdamWArgs {
    float lr, beta1, beta2, a1, a2, eps, weight_decay, grad_scale, inv_bc1, inv_bc2;
};

__device__ __forceinline__ float adamw_update(float& p, float& m, float& v, float grad, const AdamWArgs& s) {
    const float g = grad * s.grad_scale;
    m = s.beta1 * m + s.a1 * g;
    v = s.beta2 * v + s.a2 * g * g;
    const float mhat = m * s.inv_bc1, vhat = v * s.inv_bc2;
    p -= s.lr * (__fdiv_rn(mhat, __fsqrt_rn(vhat) + s.eps) + s.weight_decay * p);
    return p;
}

// CT: type of params_copy (float or bf16); has_copy false: no copy
template <typename CT, bool HAS_COPY>
__global__ void adamw_simple_kernel(float* params, float* m, float* v, const float* grads, CT* copy, int64_t n,
                                    AdamWArgs s) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        float p = params[i], mi = m[i], vi = v[i];
        adamw_update(p, mi, vi, grads[i], s);
        params[i] = p, m[i] = mi, v[i] = vi;
        if constexpr (HAS_COPY) copy[i] = from_f32<CT>(p);
    }
}

// 4 consecutive parameters per step; n4 = number of groups of 4
template <typename CT, bool HAS_COPY>
__global__ void adamw_kernel(float* params, float* m, float* v, const float* grads, CT* copy, int64_t n4,
                             AdamWArgs s) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n4; i += (int64_t)gridDim.x * blockDim.x) {
        float4 p = reinterpret_cast<float4*>(params)[i];
        float4 mi = reinterpret_cast<float4*>(m)[i];
        float4 vi = reinterpret_cast<float4*>(v)[i];
        const float4 g = reinterpret_cast<const float4*>(grads)[i];
        adamw_update(p.x, mi.x, vi.x, g.x, s);
        adamw_update(p.y, mi.y, vi.y, g.y, s);
        adamw_update(p.z, mi.z, vi.z, g.z, s);
        adamw_update(p.w, mi.w, vi.w, g.w, s);
        reinterpret_cast<float4*>(params)[i] = p;
        reinterpret_cast<float4*>(m)[i] = mi;
        reinterpret_cast<float4*>(v)[i] = vi;
        if constexpr (HAS_COPY) {
            if constexpr (sizeof(CT) == 4) {
                reinterpret_cast<float4*>(copy)[i] = p;
            } else {
                __align__(8) CT c[4] = {from_f32<CT>(p.x), from_f32<CT>(p.y), from_f32<CT>(p.z), from_f32<CT>(p.w)};
                reinterpret_cast<uint2*>(copy)[i] = *reinterpret_cast<const uint2*>(c);
            }
        }
    }
}

static constexpr int kBlock = 256;

template <typename CT, bool HAS_COPY>
static void adamw_launch(float* params, float* m, float* v, const float* grads, CT* copy, int64_t n,
                         const AdamWArgs& s) {
    const bool aligned = aligned16(params) && aligned16(m) && aligned16(v) && aligned16(grads) &&
                         (!HAS_COPY || ((uintptr_t)copy % (4 * sizeof(CT))) == 0);
    if (simple_elementwise_flag() || !aligned) {
        adamw_simple_kernel<CT, HAS_COPY><<<grid_stride_blocks(n, kBlock), kBlock>>>(params, m, v, grads, copy, n, s);
        return;
    }
    const int64_t n4 = n / 4, done = n4 * 4;
    if (n4 > 0)
        adamw_kernel<CT, HAS_COPY><<<grid_stride_blocks(n4, kBlock), kBlock>>>(params, m, v, grads, copy, n4, s);
    if (done < n)
        adamw_simple_kernel<CT, HAS_COPY><<<1, kBlock>>>(params + done, m + done, v + done, grads + done,
                                                        HAS_COPY ? copy + done : copy, n - done, s);
}

void adamw_step(float* params, float* m, float* v, const float* grads, void* params_copy, DType copy_t, int64_t n,
                float lr, float beta1, float beta2, float eps, float weight_decay, int t, float grad_scale) {
    if (n <= 0) return;
    AdamWArgs s;
    s.lr = lr, s.beta1 = beta1, s.beta2 = beta2, s.a1 = 1.0f - beta1, s.a2 = 1.0f - beta2, s.eps = eps;
    s.weight_decay = weight_decay, s.grad_scale = grad_scale;
    s.inv_bc1 = (float)(1.0 / (1.0 - std::pow((double)beta1, (double)t)));
    s.inv_bc2 = (float)(1.0 / (1.0 - std::pow((double)beta2, (double)t)));
    if (!params_copy) {
        adamw_launch<float, false>(params, m, v, grads, nullptr, n, s);
    } else {
        DISPATCH_FLOAT(copy_t, CT, { adamw_launch<CT, true>(params, m, v, grads, (CT*)params_copy, n, s); });
    }
    CUDA_CHECK_LAUNCH();
}

}  // namespace fastllm::cuda
