// Causal self-attention with grouped KV heads, flash-style (online softmax, logsumexp saved), see attention.cpp.
#pragma once
#include <cstdint>

#include "common.h"  // AttentionOpts

namespace fastllm::cpu {

// qkv (B, T, C + 2*NKV*hs) packed as [q | k | v] along the last axis: q is C = NH * hs wide (head h at
// [h*hs, (h+1)*hs)), k and v NKV * hs each; NKV divides NH and query head h uses kv head h / (NH / NKV)
// (NKV = NH: multi-head attention, qkv (B, T, 3C)).
// out (B, T, C) = softmax(scores + causal mask) v per head; lse (B, NH, T) the row logsumexp of the final scores.
// opt (common.h): scores (q k^T) * scale (default 1/sqrt(hs)), optionally soft-capped; an optional sliding window.
// bf16: the tile products (q k^T, p v and the backward's four) take bf16-rounded operands with fp32 sums, where
// attention_bf16_available() (AVX512_BF16); elsewhere the fp32 kernels run. Softmax, lse and every array stay fp32.
void attention_forward(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C, int64_t NH,
                       int64_t NKV, const AttentionOpts& opt = {}, bool bf16 = false);

// dqkv (B, T, C + 2*NKV*hs) += gradient of out w.r.t. qkv, given dout (B, T, C) and the forward's out and lse.
void attention_backward(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                        int64_t B, int64_t T, int64_t C, int64_t NH, int64_t NKV, const AttentionOpts& opt = {},
                        bool bf16 = false);

bool attention_bf16_available();

// The readable per-row versions (same semantics, O(T) scratch per thread): documentation and test oracle.
void attention_forward_naive(float* out, float* lse, const float* qkv, int64_t B, int64_t T, int64_t C,
                             int64_t NH, int64_t NKV, const AttentionOpts& opt = {});
void attention_backward_naive(float* dqkv, const float* dout, const float* qkv, const float* out, const float* lse,
                              int64_t B, int64_t T, int64_t C, int64_t NH, int64_t NKV, const AttentionOpts& opt = {});

// Inference with a KV cache. qkv (B, Tn, C + 2*NKV*hs) holds Tn new tokens per sequence; their keys/values are
// written to kcache, vcache (B, NKV, maxT, hs) at positions pos[b] .. pos[b]+Tn-1 (position p at row p % maxT), then
// out (B, Tn, C) is each new query's causal attention over positions 0 .. pos[b]+t of its sequence and kv head (with
// opt.window, the last window of them: then the cache may be a ring shorter than the positions, see kv_rows_fit in
// common.h, which the caller checks). O(B * NH * Tn * (pos + Tn) * hs), O(B * NH * Tn * window * hs) with a window.
// bf16: a prefill's (Tn > 1) tile products in bf16, as attention_forward's; a decode step (Tn = 1) stays fp32.
void attention_kv_forward(float* out, float* kcache, float* vcache, const float* qkv, const int32_t* pos,
                          int64_t B, int64_t Tn, int64_t C, int64_t NH, int64_t NKV, int64_t maxT,
                          const AttentionOpts& opt = {}, bool bf16 = false);

}  // namespace fastllm::cpu
