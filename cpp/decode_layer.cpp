// A decode step's attention half in one call (see decode_layer.h).
#include "decode_layer.h"

#include <cstring>
#include <utility>
#include <vector>

#include "attention.h"
#include "f32_matmul.h"
#include "rowops.h"

namespace ktlab {

void decode_attention_block(const DecodeAttentionWeights& w, const DecodeAttentionShape& s, const float* x, int n_seqs,
                            const float* cos, const float* sin, float* k_pool, float* v_pool, int64_t head_rows,
                            const int64_t* slots, const int32_t* tables, int max_pages, const int32_t* lens, int page,
                            float scale, int top_k, bool norm_topk, float* h_out, float* hn_out, int64_t* ids,
                            float* weights, Isa mm_isa, Isa isa, int threads) {
    const int64_t B = n_seqs, H = s.hidden, hd = s.hd;
    const int64_t q_dim = (int64_t)s.nh * hd, kv_dim = (int64_t)s.nkv * hd, qkv_dim = q_dim + 2 * kv_dim;
    std::vector<float> xn(B * H), qkv(B * qkv_dim), q(B * q_dim), k(B * kv_dim), attn(B * q_dim),
        logits(B * (int64_t)w.n_experts);
    rms_norm_rows(x, w.attn_norm, xn.data(), B, (int)H, s.eps, threads);
    for (int i = 0, col = 0; i < w.n_qkv; col += (int)w.qkv[i].rows, ++i) {  // the parts side by side
        dense_gemm(w.qkv[i], xn.data(), B, qkv.data() + col, (size_t)qkv_dim, mm_isa, threads);
    }
    qk_norm_rope(qkv.data(), qkv_dim, B, s.nh, s.nkv, s.hd, w.q_norm, w.k_norm, cos, sin, s.eps, q.data(), k.data(),
                 threads);
    for (int64_t b = 0; b < B; ++b) {  // the new keys and values into their pool rows, head-major
        const float* v = qkv.data() + b * qkv_dim + q_dim + kv_dim;
        for (int h = 0; h < s.nkv; ++h) {
            const int64_t row = ((int64_t)h * head_rows + slots[b]) * hd;
            std::memcpy(k_pool + row, k.data() + (b * s.nkv + h) * hd, sizeof(float) * hd);
            std::memcpy(v_pool + row, v + h * hd, sizeof(float) * hd);
        }
    }
    paged_decode_attention(q.data(), k_pool, v_pool, head_rows, tables, max_pages, lens, n_seqs, s.nh, s.nkv, s.hd,
                           page, scale, attn.data(), isa, threads);
    dense_gemm(w.wo, attn.data(), B, h_out, (size_t)H, mm_isa, threads);
    for (int64_t i = 0; i < B * H; ++i) h_out[i] = x[i] + h_out[i];  // x + attention, as torch adds
    rms_norm_rows(h_out, w.ffn_norm, hn_out, B, (int)H, s.eps, threads);
    f32_matmul(w.router, hn_out, logits.data(), w.n_experts, H, B, isa, threads);
    route_topk(logits.data(), B, w.n_experts, top_k, norm_topk, ids, weights);
}

void decode_model_step(const DecodeLayer* layers, int n_layers, const DecodeHead& head, const DecodeAttentionShape& s,
                       float* x, int n_seqs, const float* cos, const float* sin, float* k_pools, float* v_pools,
                       int64_t head_rows, const int64_t* slots, const int32_t* tables, int max_pages,
                       const int32_t* lens, int page, float scale, int top_k, bool norm_topk, int64_t* ids,
                       float* weights, float* logits, Isa mm_isa, Isa isa, int threads) {
    const int64_t B = n_seqs, H = s.hidden, routed = B * top_k;
    const int64_t pool_stride = (int64_t)s.nkv * head_rows * s.hd;  // one layer of the pool
    std::vector<float> other(B * H), hn(B * H), experts_out(B * H);
    std::vector<int32_t> ids32(routed);
    float* in = x;  // the residual stream: each layer reads `in` and writes the other buffer
    float* out = other.data();
    for (int l = 0; l < n_layers; ++l) {
        int64_t* layer_ids = ids + l * routed;
        float* layer_weights = weights + l * routed;
        decode_attention_block(layers[l].attn, s, in, n_seqs, cos, sin, k_pools + l * pool_stride,
                               v_pools + l * pool_stride, head_rows, slots, tables, max_pages, lens, page, scale, top_k,
                               norm_topk, out, hn.data(), layer_ids, layer_weights, mm_isa, isa, threads);
        for (int64_t i = 0; i < routed; ++i) ids32[i] = (int32_t)layer_ids[i];  // in [0, E): route_topk's ids
        layers[l].experts->forward(hn.data(), ids32.data(), layer_weights, nullptr, B, top_k, experts_out.data());
        for (int64_t i = 0; i < B * H; ++i) out[i] = out[i] + experts_out[i];  // h + experts, as forward_add
        std::swap(in, out);
    }
    rms_norm_rows(in, head.norm, hn.data(), B, (int)H, s.eps, threads);
    dense_gemm(head.lm_head, hn.data(), B, logits, (size_t)head.lm_head.rows, mm_isa, threads);
}

}  // namespace ktlab
