// Paged decode attention: every running sequence contributes one query position, attending to
// its own keys/values where they already are, in the shared KV page pool (no gathering copy).
//
// Layout of one layer's pool (ktlab.model.layers.PagedKV): k and v are [nkv, P * page, hd]
// fp32, head-major, row = page id * page + offset. Sequence b's position s lives in page
// tables[b][s / page] at offset s % page. Grouped-query attention: query head h reads KV head
// h / group (group = nh / nkv).
//
// One task per (sequence, KV head) on the pool; each reads that head's K and V rows once for
// the group's query heads (scores, exact-max softmax, weighted sum of V), so a sequence's
// output never depends on what else is in the batch or on the thread count.
#pragma once

#include <cstdint>

#include "isa.h"

namespace ktlab {

// Row of position s of a sequence (page table `table`) in one KV head's part of the pool.
inline const float* paged_row(const float* head_base, const int32_t* table, int page, int s, int hd) {
    return head_base + ((int64_t)table[s / page] * page + s % page) * hd;
}

// One sequence, one KV head: q [group, hd] over positions 0..len-1 -> out [group, hd];
// scores: scratch of group * len floats.
using attn_head_fn = void (*)(const float* q, int group, int hd, const float* k, const float* v,
                              const int32_t* table, int page, int len, float scale, float* scores, float* out);

void attn_head_scalar(const float*, int, int, const float*, const float*, const int32_t*, int, int, float, float*,
                      float*);
void attn_head_avx2(const float*, int, int, const float*, const float*, const int32_t*, int, int, float, float*,
                    float*);
void attn_head_avx512(const float*, int, int, const float*, const float*, const int32_t*, int, int, float, float*,
                      float*);

// q, out [n_seqs, nh, hd]; k, v: one layer's pool [nkv, head_rows, hd]; tables [n_seqs,
// max_pages] page ids; lens [n_seqs] (1 <= len <= max_pages * page). SIMD paths need hd % 8
// (AVX2) or % 16 (AVX-512, AMX) == 0, else the scalar twin runs. The caller validates.
void paged_decode_attention(const float* q, const float* k, const float* v, int64_t head_rows,
                            const int32_t* tables, int max_pages, const int32_t* lens, int n_seqs, int nh, int nkv,
                            int hd, int page, float scale, float* out, Isa isa, int threads);

}  // namespace ktlab
