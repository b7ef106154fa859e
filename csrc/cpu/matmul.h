// Matmul (fully connected layer) and the general fp32 GEMM it is built on, see matmul.cpp.
#pragma once
#include <cstdint>

#include "common.h"

namespace fastllm::cpu {

// The operands' precision in the matmul family: fp32, or bf16 -- both operands rounded to bf16 (nearest even) as
// they are packed, exact products, fp32 sums: what torch.autocast(bfloat16) computes for a linear layer, here from
// the fp32 tensors themselves (the packing copies every operand once per call anyway, so there are no bf16 copies
// of the weights to keep in step with the fp32 master weights). The CPU's mixed-precision training (dtype bfloat16).
enum class Prec { fp32 = 0, bf16 = 1 };
// The kernel Prec::bf16 GEMMs run under the SIMD level in use (fastllm.info()["bf16_gemm"]): amx (TDPBF16PS
// tiles), avx512_bf16 (VDPBF16PS on VNNI-packed panels), avx512 / avx2 (the fp32 kernels on panels rounded to bf16 while packed) or
// scalar (a portable loop over the VNNI panels).
Simd gemm_bf16_path();
// Testing: run the AMX kernel on a C++ model of the tiles (any CPU); gemm_bf16_path() is then amx.
void set_amx_emulation(bool on);
bool amx_emulation();

// out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias (OC); bias may be nullptr. With pre_gelu (N, OC) (the GELU
// epilogue of an MLP's first layer): pre_gelu = the product + bias, out = gelu(pre_gelu).
void matmul_forward(float* out, const float* inp, const float* weight, const float* bias, float* pre_gelu,
                    int64_t N, int64_t C, int64_t OC, Prec prec = Prec::fp32);

// dinp (N, C) += dout @ weight;  dweight (OC, C) += dout^T @ inp;  dbias (OC) += sum_rows(dout).
// Any of dinp, dweight, dbias may be nullptr (not computed).
void matmul_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                     const float* weight, int64_t N, int64_t C, int64_t OC, Prec prec = Prec::fp32);

// The readable loop versions of the two above (documentation, and the oracle of the C++ side).
void matmul_forward_naive(float* out, const float* inp, const float* weight, const float* bias,
                          int64_t N, int64_t C, int64_t OC);
void matmul_backward_naive(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                           const float* weight, int64_t N, int64_t C, int64_t OC);

// General single-precision GEMM, row-major:  Cmat (M, N) = alpha * op(A) (M, K) @ op(B) (K, N) + beta * Cmat.
//   op(A) = A      (A stored (M, K), row stride lda)   if !transA,
//           A^T    (A stored (K, M), row stride lda)   if  transA;
//   op(B) = B      (B stored (K, N), row stride ldb)   if !transB,
//           B^T    (B stored (N, K), row stride ldb)   if  transB.
// beta == 0 never reads Cmat (it may hold garbage/NaN); any other beta scales it. K == 0 gives beta * Cmat.
// Multithreaded with OpenMP (all of omp_get_max_threads()) unless called from inside a parallel region,
// where it runs on the calling thread only, so per-head / per-chunk callers can parallelise outside.
void gemm(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
          const float* B, int64_t ldb, float beta, float* Cmat, int64_t ldc, Prec prec = Prec::fp32);

// gemm plus a row vector bias (N) added to every row of the result: Cmat = alpha op(A) op(B) + beta Cmat + bias.
// bias may be nullptr. threads <= 0 means "decide" (as gemm); 1 forces the calling thread only. a_sums (M, may be
// nullptr): a_sums[i] += sum_k op(A)(i, k) (fp32, unscaled), taken while A is packed (matmul_backward's dbias).
void gemm_ex(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
             const float* B, int64_t ldb, float beta, float* Cmat, int64_t ldc, const float* bias, int threads = 0,
             Prec prec = Prec::fp32, float* a_sums = nullptr);

// Inference with bf16 weights (decoding): out (N, OC) = inp (N, C) @ weight (OC, C)^T + bias, weight stored as
// bf16 bit patterns. inp rows are rounded to bf16 (nearest even) first; products are exact, sums fp32. pre_gelu
// as in matmul_forward.
void matmul_forward_bf16w(float* out, const float* inp, const uint16_t* weight, const float* bias, float* pre_gelu,
                          int64_t N, int64_t C, int64_t OC);
// The code path matmul_forward_bf16w takes under the SIMD level in use: avx512_bf16 (VDPBF16PS), avx2 (bf16
// widened to fp32 in registers) or scalar (fastllm.info()["bf16_matmul"]). Where the bf16 GEMM runs on AMX
// (gemm_bf16_path), 8 or more rows with C a multiple of 32 take the AMX tiles instead; on avx512_bf16, 48 or more rows
// with C even take the packed bf16 GEMM.
Simd matmul_bf16w_path();
// bf16 weights packed once for the bf16 GEMM (decoding where the bf16 GEMM is avx512_bf16): panels of 32 rows of W
// (OC padded with zero rows to bf16_panel_rows(OC)), each C / 2 words deep, word (r, q) = W[r, 2q] | W[r, 2q+1] << 16
// at q * 32 + r. C must be even. dst holds bf16_panel_rows(OC) * C values.
int64_t bf16_panel_rows(int64_t OC);
void pack_bf16_panels(uint16_t* dst, const uint16_t* w, int64_t OC, int64_t C);
// Whether the panels are the faster layout here (the bf16 GEMM on avx512_bf16; not AMX, whose kernel reads W's rows
// in place). Either way matmul_forward_bf16p computes on them: the same products as matmul_forward_bf16w.
bool bf16_panels_preferred();
// out (N, OC) = inp (N, C) @ W^T + bias with W given as panels (pack_bf16_panels); pre_gelu as in matmul_forward.
void matmul_forward_bf16p(float* out, const float* inp, const uint16_t* panels, const float* bias, float* pre_gelu,
                          int64_t N, int64_t C, int64_t OC);
// Inference with int8 weights (weight-only quantization, per output channel): out (N, OC) = inp (N, C) @ (q *
// scale[:, None])^T + bias, q (OC, C) int8, scale (OC,) fp32. inp stays fp32; each dot product is summed in fp32 over
// the int8 values (exact in fp32) and then scaled. pre_gelu as in matmul_forward.
void matmul_forward_i8w(float* out, const float* inp, const int8_t* q, const float* scale, const float* bias,
                        float* pre_gelu, int64_t N, int64_t C, int64_t OC);
// A frozen weight held in a decode form alone (inference, and the base of LoRA training on a model loaded with
// weights=): bf16 bit patterns (OC, C), those bits as bf16 panels (pack_bf16_panels), or int8 rows q (OC, C) with
// per-row scales (weight-only quantization).
struct HeldWeight {
    enum Form { bf16, bf16_panels, int8 } form;
    const void* data;
    const float* scale;  // int8 only
};
// dinp (N, C) += dout (N, OC) @ W (OC, C) for such a W: the input gradient of a frozen layer, with no float32 copy
// of W kept (LoRA over a base held in bf16 or int8). prec: the GEMM's, as matmul_backward's.
void matmul_backward_held(float* dinp, const float* dout, HeldWeight w, int64_t N, int64_t C, int64_t OC,
                          Prec prec = Prec::fp32);
// Threads for a product of N rows with an (OC, C) weight matrix: all of them, unless it is tiny or the caller is
// already inside a parallel region.
int weight_threads(int64_t N, int64_t C, int64_t OC);

// w8a8 (inference, see matmul_w8a8.cpp): int8 weights q (OC, C) with per-row scales sw, and each input row
// quantized at every call to int8 with its own scale (dynamic quantization); exact int32 dot products (VPDPBUSD where
// the CPU has AVX512-VNNI), then out = sa[n] * sw[o] * sum + bias. The weights are packed once
// (pack_w8a8_panels): dst holds w8a8_panel_rows(OC) * w8a8_depth(C) bytes, wsum (OC,) the sums of q's rows.
int64_t w8a8_panel_rows(int64_t OC);
int64_t w8a8_depth(int64_t C);
void pack_w8a8_panels(int8_t* dst, int32_t* wsum, const int8_t* q, int64_t OC, int64_t C);
// Whether the integer dot products are VPDPBUSD (AVX512-VNNI; else a portable loop over the same panels).
bool w8a8_vnni();
// The kernel of prompts (>= 16 rows, C a multiple of 64): "amx" (TDPBUSD), "amx (emulated)", or the one of
// decode steps: "avx512_vnni", "avx2" or "scalar" (fastllm.info()["w8a8"]).
const char* w8a8_path();
// C <= 65536 (the int32 sums); pre_gelu as in matmul_forward.
void matmul_forward_w8a8(float* out, const float* inp, const int8_t* panels, const float* scale, const int32_t* wsum,
                         const float* bias, float* pre_gelu, int64_t N, int64_t C, int64_t OC);
// float32 -> bf16 bit patterns, round to nearest even (NaN stays NaN, overflow rounds to inf)
void float_to_bf16(uint16_t* dst, const float* src, int64_t n);

// Triple-loop version of gemm (reference; slow).
void gemm_naive(bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                int64_t lda, const float* B, int64_t ldb, float beta, float* Cmat, int64_t ldc);

}  // namespace fastllm::cpu
