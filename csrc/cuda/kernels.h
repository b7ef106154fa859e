/*
Host API of fastllm's CUDA kernels: plain C++ (no CUDA headers), so csrc/bindings_cuda.cpp compiles with the
host compiler. Every function launches on the default stream and returns without synchronising; errors of the
CUDA runtime throw std::runtime_error (Python RuntimeError), see CUDA_CHECK in csrc/cuda/common.cuh.

Conventions (the GPU twin of csrc/common.h):
  - pointers are device pointers to dense row-major arrays; sizes are int64_t;
  - argument order: outputs, inputs, weights, sizes, dtype, scalars;
  - activations and parameters have one dtype T per call: float32 or bfloat16 (DType), computed with fp32
    accumulation; parameter gradients, layernorm statistics, logsumexp and losses are always float32;
  - forward kernels overwrite (=) their outputs; backward kernels ACCUMULATE (+=) into every gradient output,
    parameter gradients (fp32) and activation gradients (T) alike, like the CPU kernels;
  - kernels do not validate input: bindings_cuda.cpp does (FASTLLM_CHECK -> Python ValueError/TypeError).
*/
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace fastllm::cuda {

enum class DType : int { f32 = 0, bf16 = 1, i32 = 2 };
inline size_t dtype_size(DType t) { return t == DType::bf16 ? 2 : 4; }
inline const char* dtype_str(DType t) {
    return t == DType::f32 ? "float32" : t == DType::bf16 ? "bfloat16" : "int32";
}

// ---- device.cu: devices and memory
int device_count();  // 0 (not an error) without a driver or GPU
std::string device_name(int device);
int current_device();
void set_device(int device);
void* malloc_device(size_t bytes);  // throws std::runtime_error naming the size on failure
void free_device(void* ptr);
void copy_to_device(void* dst, const void* host_src, size_t bytes);
void copy_to_host(void* host_dst, const void* src, size_t bytes);
void copy_device(void* dst, const void* src, size_t bytes);
void zero_device(void* ptr, size_t bytes);
void synchronize();
// dst (n, dst_t) = src (n, src_t) converted (f32 <-> bf16, round to nearest even; same dtype: copy)
void convert(void* dst, DType dst_t, const void* src, DType src_t, int64_t n);
// dst (n, T) += src (n, T)   (residual backward, gradient accumulation)
void add_inplace(void* dst, const void* src, int64_t n, DType t);
// sum of squares of x (n, f32 or T) in fp32 per block then double; synchronises and returns to the host
double sum_squares(const void* x, int64_t n, DType t);

// ---- matmul.cu: tensor-core GEMM (bf16 mma, fp32 accumulation; fp32 inputs use an FFMA path)
// C (M, N) = [C +] alpha * op(A) @ op(B) [+ bias (N)]: op(A) is A (M, K), or A stored (K, M) transposed if trans_a;
// op(B) is B (K, N), or B stored (N, K) transposed if trans_b. A, B, bias have dtype ab; C has dtype c_t
// (f32 or ab). With pre_gelu (dtype c_t, M x N; accumulate must be false): pre_gelu = A@B+bias, C = gelu(pre_gelu).
void gemm(void* C, DType c_t, const void* A, const void* B, const void* bias, void* pre_gelu, int64_t M,
          int64_t N, int64_t K, bool trans_a, bool trans_b, bool accumulate, DType ab, float alpha = 1.0f);
// gemm with explicit row strides (elements) of C (and pre_gelu), A and B as stored; used by the fused classifier
// (padded rows). The tensor-core path needs A, B 16-byte aligned and lda, ldb multiples of 8; else FFMA.
void gemm_ex(void* C, DType c_t, int64_t ldc, const void* A, int64_t lda, const void* B, int64_t ldb,
             const void* bias, void* pre_gelu, int64_t M, int64_t N, int64_t K, bool trans_a, bool trans_b,
             bool accumulate, DType ab, float alpha = 1.0f);
// "auto" (tensor cores for bf16 when aligned), "simple" (always the FFMA reference kernel; for tests) or "tc1"
// (the tensor-core variant tuned for 1 block/SM; for benchmarks). Initial value: $FASTLLM_CUDA_GEMM or "auto".
std::string gemm_impl();
void set_gemm_impl(const std::string& name);  // throws std::invalid_argument for other names
// dbias (N, f32) += column sums of dout (M, N, dtype t); deterministic
void bias_backward(float* dbias, const void* dout, int64_t M, int64_t N, DType t);
// The fully connected layer (csrc/cpu/matmul.h's twins): out (N, OC, out_t: f32 or t) = inp (N, C) @ weight (OC, C)^T
// + bias (OC), or with pre_gelu (N, OC): pre_gelu = that, out = gelu(pre_gelu).
void matmul_forward(void* out, DType out_t, const void* inp, const void* weight, const void* bias, void* pre_gelu,
                    int64_t N, int64_t C, int64_t OC, DType t);
// dinp (N, C, t) += dout @ weight; dweight (OC, C, f32) += dout^T @ inp; dbias (OC, f32) += column sums of dout.
// Any of the three may be nullptr.
void matmul_backward(void* dinp, float* dweight, float* dbias, const void* dout, const void* inp, const void* weight,
                     int64_t N, int64_t C, int64_t OC, DType t);

// ---- attention.cu: causal flash attention with grouped KV heads on packed qkv (B, T, C + 2*NKV*hs) = [q | k | v],
// q C = NH * hs wide, k and v NKV * hs each (NKV divides NH; query head h uses kv head h / (NH/NKV); NKV = NH: (B, T, 3C))
// out (B, T, C) of dtype t and lse (B, NH, T, f32) = logsumexp of the final scores per query. opt (common.h): the
// scale, soft cap and sliding window of the scores.
void attention_forward(void* out, float* lse, const void* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                       int64_t NKV, const AttentionOpts& opt, DType t);
// dqkv (B, T, C + 2*NKV*hs) += gradient; needs the forward's out and lse (recomputes the scores tile by tile)
void attention_backward(void* dqkv, const void* dout, const void* qkv, const void* out, const float* lse,
                        int64_t B, int64_t T, int64_t C, int64_t NH, int64_t NKV, const AttentionOpts& opt, DType t);
// Inference with a KV cache: the Tn new tokens of qkv (B, Tn, C + 2*NKV*hs) write their k, v into kcache/vcache
// (B, NKV, maxT, hs) at positions pos[b] .. pos[b]+Tn-1 (pos: int32 device array (B,)); each new query attends
// causally to its sequence's cache of its kv head (the last opt.window positions with a window); out (B, Tn, C).
// pos is not advanced.
void attention_kv_forward(void* out, void* kcache, void* vcache, const void* qkv, const int32_t* pos, int64_t B,
                          int64_t Tn, int64_t C, int64_t NH, int64_t NKV, int64_t maxT, const AttentionOpts& opt,
                          DType t);

// ---- softmax_ce.cu: fused softmax + cross-entropy (+ gradient) and the fused classifier
// losses (N, f32) = -log softmax(logits)[target]; if dlogits: dlogits (N, V, T) = (softmax - onehot) *
// grad_scale (* row_weights[n] if given, f32 (N)), written (=) and may alias logits. Rows whose target ==
// ignore_index get loss 0 and zero grad. A target outside [0, V) (other than ignore_index) gives loss NaN (never a
// wild read); callers check on the host.
// softcap > 0: the logits are soft-capped first, z = softcap * tanh(x / softcap) (loss of z, gradient w.r.t. x).
// temperature > 0 (1: none): then divided by it, u = z / temperature (loss of u, gradient w.r.t. x).
void softmax_ce(float* losses, void* dlogits, const void* logits, const int32_t* targets, int64_t N, int64_t V,
                float grad_scale, int32_t ignore_index, const float* row_weights, float softcap, float temperature,
                DType t);
// the same with row stride ld >= V (elements) of logits and dlogits
void softmax_ce_ex(float* losses, void* dlogits, const void* logits, int64_t ld, const int32_t* targets, int64_t N,
                   int64_t V, float grad_scale, int32_t ignore_index, const float* row_weights, float softcap,
                   float temperature, DType t);
// logits = hidden (N, C) @ weight (V, C)^T in row chunks of a scratch buffer (never N x V at once), then the
// loss and, if dhidden/dweight are given, dhidden (N, C, T) += dlogits @ weight, dweight (V, C, f32) +=
// dlogits^T @ hidden. scratch: chunk_rows x V elements of T (the caller allocates it; see lmhead_chunk_rows).
void lmhead_ce(float* losses, void* dhidden, float* dweight, const void* hidden, const void* weight,
               const int32_t* targets, void* scratch, int64_t chunk_rows, int64_t N, int64_t C, int64_t V,
               float grad_scale, int32_t ignore_index, const float* row_weights, float softcap, float temperature,
               DType t);
// default chunk rows for a scratch of at most ~256 MiB (multiple of 128 when >= 128, at least 1, at most N)
int64_t lmhead_chunk_rows(int64_t N, int64_t V, DType t);

// ---- layernorm.cu
// out (N, C, T), mean/rstd (N, f32) over the last axis; weight/bias (C, T)
void layernorm_forward(void* out, float* mean, float* rstd, const void* x, const void* weight, const void* bias,
                       int64_t N, int64_t C, float eps, DType t);
// dx (N, C, T) +=, dweight/dbias (C, f32) +=
void layernorm_backward(void* dx, float* dweight, float* dbias, const void* dout, const void* x,
                        const void* weight, const float* mean, const float* rstd, int64_t N, int64_t C, DType t);

// ---- gelu.cu: GELU, the tanh approximation (gelu) and the exact form (gelu_erf: x Phi(x))
void gelu_forward(void* out, const void* x, int64_t n, DType t);
void gelu_backward(void* dx, const void* dout, const void* x, int64_t n, DType t);  // dx +=
void gelu_erf_forward(void* out, const void* x, int64_t n, DType t);
void gelu_erf_backward(void* dx, const void* dout, const void* x, int64_t n, DType t);  // dx +=

// ---- residual.cu: the residual add
// out = a + scale * b; da += dout, db += scale * dout
void residual_forward(void* out, const void* a, const void* b, int64_t n, DType t, float scale = 1.0f);
void residual_backward(void* da, void* db, const void* dout, int64_t n, DType t, float scale = 1.0f);

// ---- embedding.cu: out (B, T, C) = scale * wte[tokens] + wpe[:T]; tokens int32 (B, T); wte (V, C); wpe / dwpe may
// be null (no position embedding); scale 1, or sqrt(C) for Gemma. Ids outside [0, V) are never dereferenced: they
// read as a zero wte row (forward) and are skipped (backward).
void embedding_forward(void* out, const int32_t* tokens, const void* wte, const void* wpe, int64_t B, int64_t T,
                       int64_t C, int64_t V, float scale, DType t);
// dwte (V, C, f32) += scale * scattered dout rows; dwpe (maxT, C, f32) += sums over the batch (unscaled);
// deterministic
void embedding_backward(float* dwte, float* dwpe, const void* dout, const int32_t* tokens, int64_t B, int64_t T,
                        int64_t C, int64_t V, float scale, DType t);

// ---- adamw.cu: AdamW on fp32 master weights (m, v fp32); grads (f32) * grad_scale first. If params_copy is
// given, it receives the updated parameters in copy_t (the bf16 weights the next forward reads).
void adamw_step(float* params, float* m, float* v, const float* grads, void* params_copy, DType copy_t,
                int64_t n, float lr, float beta1, float beta2, float eps, float weight_decay, int t,
                float grad_scale);

// ---- rmsnorm.cu: rows of C elements, row n at (n / group) * group_stride + (n % group) * C (csrc/cpu/rmsnorm.h)
// out = x * rstd * weight (C, T), rstd (N, f32) = 1 / sqrt(mean(x^2) + eps); out may be x
void rmsnorm_forward(void* out, float* rstd, const void* x, const void* weight, int64_t N, int64_t C, int64_t group,
                     int64_t group_stride, float eps, DType t);
// dx (rows, T) +=, dweight (C, f32) += (deterministic: no float atomics)
void rmsnorm_backward(void* dx, float* dweight, const void* dout, const void* x, const void* weight,
                      const float* rstd, int64_t N, int64_t C, int64_t group, int64_t group_stride, DType t);

// ---- rope.cu: rotate-half RoPE of the q and k heads of qkv (B, T, (NH + 2*NKV) * hs) (csrc/cpu/rope.h); cos, sin
// (P, R2) f32 tables, pos int32 (B) or nullptr; positions outside [0, P) are skipped. out may be inp.
void rope_forward(void* out, const void* inp, const float* cos, const float* sin, const int32_t* pos, int64_t B,
                  int64_t T, int64_t P, int64_t NH, int64_t NKV, int64_t hs, int64_t R2, DType t);
// dinp += R^T dout, or in place (dinp = R^T dout) when dinp == dout
void rope_backward(void* dinp, const void* dout, const float* cos, const float* sin, const int32_t* pos, int64_t B,
                   int64_t T, int64_t P, int64_t NH, int64_t NKV, int64_t hs, int64_t R2, DType t);

// ---- swiglu.cu: out (N, H) = silu(gate) * up of gate_up (N, 2H) = [gate | up]; dgate_up +=; ReLU^2 element-wise
void swiglu_forward(void* out, const void* gate_up, int64_t N, int64_t H, DType t);
void swiglu_backward(void* dgate_up, const void* dout, const void* gate_up, int64_t N, int64_t H, DType t);
// GeGLU (Gemma): the same with gelu_tanh (GELU's tanh approximation, gelu.cu) for silu
void geglu_forward(void* out, const void* gate_up, int64_t N, int64_t H, DType t);
void geglu_backward(void* dgate_up, const void* dout, const void* gate_up, int64_t N, int64_t H, DType t);
void relu2_forward(void* out, const void* x, int64_t n, DType t);                      // out = max(x, 0)^2
void relu2_backward(void* dx, const void* dout, const void* x, int64_t n, DType t);    // dx += 2 max(x, 0) dout

// Tests: true makes layernorm/gelu/residual/embedding/adamw (and rmsnorm/swiglu/geglu/relu2) run their simple
// reference kernels (gelu.cu).
void set_simple_elementwise(bool on);

}  // namespace fastllm::cuda
