// Fused softmax + cross-entropy, and the fused lm-head + cross-entropy, see softmax_ce.cpp.
#pragma once
#include <cstdint>

#include "matmul.h"

namespace fastllm::cpu {

// Per row n: losses[n] = logsumexp(logits[n]) - logits[n, targets[n]]  (0 where targets[n] == ignore_index).
// If dlogits != nullptr it is WRITTEN (=, not +=): dlogits[n] = (softmax(logits[n]) - onehot(targets[n])) * grad_scale,
// zero rows where ignored. dlogits may alias logits (in place). Targets must be in [0, V) or == ignore_index.
// row_weights (N) or nullptr: row n's gradient is scaled by grad_scale * row_weights[n] (any sign, 0 allowed);
// the losses are unchanged. This makes d/dlogits of sum_n row_weights[n] * losses[n] (weighted / policy-gradient
// objectives) without a second pass.
// softcap > 0: every logit is first soft-capped, z = softcap * tanh(x / softcap), the loss is that of z and
// dlogits the gradient with respect to x (softcap = 0: none).
// temperature (> 0, finite; 1: none): the logits (after the cap) are then divided by it, u = z * (1 / temperature):
// the loss is -log softmax(u)[target] (the distribution a sampler at that temperature draws from) and dlogits still
// the gradient with respect to x, (softmax(u) - onehot) / temperature (* dz/dx). temperature = 1 is bit for bit the
// kernel without it.
void softmax_ce(float* losses, float* dlogits, const float* logits, const int32_t* targets, int64_t N, int64_t V,
                float grad_scale, int32_t ignore_index, const float* row_weights = nullptr, float softcap = 0.0f,
                float temperature = 1.0f);

// Fused lm-head + cross-entropy: logits = hidden (N, C) @ weight (V, C)^T are computed chunk_rows rows at a time
// into scratch (chunk_rows x V floats, given by the caller: nothing is allocated) and never stored whole.
// losses (N) as above. If dhidden/dweight are given they ACCUMULATE (+=) the gradients of
// sum_n losses[n] * grad_scale (* row_weights[n] if given). softcap and temperature as in softmax_ce. prec: of the
// two products (matmul.h); the softmax and the loss are fp32 either way.
void lmhead_ce(float* losses, float* dhidden, float* dweight, const float* hidden, const float* weight,
               const int32_t* targets, float* scratch, int64_t chunk_rows, int64_t N, int64_t C, int64_t V,
               float grad_scale, int32_t ignore_index, const float* row_weights = nullptr, float softcap = 0.0f,
               float temperature = 1.0f, Prec prec = Prec::fp32);
// rows of the default scratch of lmhead_ce for N rows (a chunk small enough to stay in cache, at most N)
int64_t lmhead_chunk_rows(int64_t N, int64_t V);

}  // namespace fastllm::cpu
