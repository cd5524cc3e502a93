// The attention half of a Qwen3-MoE decoder layer for a decode step (one new token per
// sequence), as one call: RMSNorm -> q/k/v matmul (dense_gemm: Q8_0 or a K-quant) -> q/k head norms + RoPE -> the new
// keys/values written into the page pool -> paged decode attention -> output projection ->
// residual add -> the FFN's RMSNorm -> router logits -> softmax top-k. It strings together the
// same kernels, in the same order, that ktlab.model.layers calls one by one from Python, so
// its results are those bits exactly; it only saves the ~30 Python/torch steps between them
// (about 0.5-1 ms per layer of a decode step on two cores).
#pragma once

#include <cstdint>

#include "dense.h"
#include "isa.h"
#include "moe_layer.h"

namespace ktlab {

struct DecodeAttentionWeights {
    const float* attn_norm;  // [H]
    // q, k and v: n_qkv matrices whose rows, stacked, are [(nh + 2 nkv) hd, H]: one fused matrix
    // where the three share a format, else q, k and v apiece (a Q4_K_M file's v may be Q6_K).
    DenseMatrix qkv[3];
    int n_qkv;
    const float* q_norm;  // [hd]
    const float* k_norm;  // [hd]
    DenseMatrix wo;       // [H, nh hd]
    const float* ffn_norm;  // [H]
    const float* router;    // [E, H] float32
    int n_experts;
};

struct DecodeAttentionShape {
    int hidden, nh, nkv, hd;
    float eps;
};

// x, h_out, hn_out [B, H]; cos, sin [B, hd]; k_pool, v_pool: one layer of the pool [nkv,
// head_rows, hd]; slots [B] the pool row of each new token; tables [B, max_pages], lens [B] as
// for paged_decode_attention (the new token included); ids, weights [B, top_k]. h_out = x +
// attention, hn_out = RMSNorm(h_out) (the experts' input). mm_isa: the dense matmuls' path; isa:
// attention and router (as the Python path picks them). The caller validates.
void decode_attention_block(const DecodeAttentionWeights& w, const DecodeAttentionShape& s, const float* x, int n_seqs,
                            const float* cos, const float* sin, float* k_pool, float* v_pool, int64_t head_rows,
                            const int64_t* slots, const int32_t* tables, int max_pages, const int32_t* lens, int page,
                            float scale, int top_k, bool norm_topk, float* h_out, float* hn_out, int64_t* ids,
                            float* weights, Isa mm_isa, Isa isa, int threads);

// One decoder layer of a decode step with all of it on the CPU: its attention half and its experts.
struct DecodeLayer {
    DecodeAttentionWeights attn;
    MoeLayer* experts;  // every expert of the layer (borrowed)
};

// The model's last RMSNorm and LM head.
struct DecodeHead {
    const float* norm;    // [H]
    DenseMatrix lm_head;  // [vocab, H]
};

// A whole decode step in one call: for each layer, decode_attention_block, then its experts'
// output added to the residual (MoeLayer::forward and the same float add as CpuExperts.forward_add),
// then the final RMSNorm and the LM head. The same kernels in the same order as the model's
// layer-by-layer path, so the same bits; the GIL is released once per step instead of twice
// per layer. x [B, H]: the step's embeddings (overwritten: it serves as one of two residual
// buffers). k_pools, v_pools: the whole pool [L, nkv, head_rows, hd]. ids, weights [L, B, top_k]:
// each layer's routing (the Python side shows them to the route observers after the step).
// logits [B, vocab]. The caller validates.
void decode_model_step(const DecodeLayer* layers, int n_layers, const DecodeHead& head, const DecodeAttentionShape& s,
                       float* x, int n_seqs, const float* cos, const float* sin, float* k_pools, float* v_pools,
                       int64_t head_rows, const int64_t* slots, const int32_t* tables, int max_pages,
                       const int32_t* lens, int page, float scale, int top_k, bool norm_topk, int64_t* ids,
                       float* weights, float* logits, Isa mm_isa, Isa isa, int threads);

}  // namespace ktlab
