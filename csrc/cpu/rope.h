// Rotary position embedding (RoPE, rotate-half layout of HF Llama) on the packed qkv buffer, see rope.cpp.
#pragma once
#include <cstdint>

namespace fastllm::cpu {

// inp, out (B, T, (NH + 2*NKV) * hs) = [q (NH heads) | k (NKV heads) | v (NKV heads)] per token. Token t of
// sequence b is at position p = pos[b] + t (pos (B) int32, or nullptr: p = t) and uses row p of the tables cos, sin
// (P, R2): in each q and k head the first 2*R2 <= hs dims are rotated as halves x1 = x[:R2], x2 = x[R2:2*R2]:
//   out1 = x1 * cos[p] - x2 * sin[p],  out2 = x2 * cos[p] + x1 * sin[p]
// (HF apply_rotary_pos_emb with rotate_half); the other dims of q and k, and v, are copied. out may be inp itself.
void rope_forward(float* out, const float* inp, const float* cos, const float* sin, const int32_t* pos, int64_t B,
                  int64_t T, int64_t NH, int64_t NKV, int64_t hs, int64_t R2);

// The gradient (the transposed rotation): dinp += R(p)^T dout (v and unrotated dims: dinp += dout). dinp may be
// dout itself: then the gradient replaces dout in place (dinp = R^T dout) instead of being added.
void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, const int32_t* pos, int64_t B,
                   int64_t T, int64_t NH, int64_t NKV, int64_t hs, int64_t R2);

}  // namespace fastllm::cpu
