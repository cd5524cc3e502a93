// Row-wise ops of a decoder layer that sit between the matmuls: RMSNorm, the q/k head norms
// with rotary embedding (Qwen3), and the router's softmax + top-k. Each row (token) is
// computed on its own, the same way whatever else is in the call and on any thread count,
// so a token's numbers never depend on its batch. Plain C++ (no SIMD path, so no scalar
// twin): the sums run in kLanes independent partial sums the compiler vectorizes without
// reassociating anything. They replace a dozen small torch ops per layer (measured ~1 ms
// of a 16-token decode step's layer, against ~30 us here).
#pragma once

#include <cstdint>

namespace ktlab {

// out[r, :] = w * (x[r, :] / sqrt(mean(x[r, :]^2) + eps)) for rows r of n values (float32,
// as Hugging Face's Qwen3RMSNorm). out may alias x.
void rms_norm_rows(const float* x, const float* w, float* out, int64_t rows, int n, float eps, int threads);

// For each token t: the nh query heads at qkv[t * stride + 0 ..] and the nkv key heads at
// qkv[t * stride + nh * hd ..] (hd values each) get RMSNorm with q_norm / k_norm [hd], then
// NeoX rotary embedding (rotate halves) with cos, sin [n_tokens, hd]; results go to
// q_out [n_tokens, nh, hd] and k_out [n_tokens, nkv, hd]. hd must be even.
void qk_norm_rope(const float* qkv, int64_t stride, int64_t n_tokens, int nh, int nkv, int hd, const float* q_norm,
                  const float* k_norm, const float* cos, const float* sin, float eps, float* q_out, float* k_out,
                  int threads);

// Router: per row of logits [rows, n_experts], softmax, then the top_k probabilities (ties: the
// lower expert id first) in descending order into ids / weights [rows, top_k]; normalized to
// sum 1 when norm_topk. top_k <= n_experts.
void route_topk(const float* logits, int64_t rows, int n_experts, int top_k, bool norm_topk, int64_t* ids,
                float* weights);

}  // namespace ktlab
