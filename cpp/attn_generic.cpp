// Paged decode attention: the driver and the scalar twin of the SIMD head kernels.
#include <cmath>
#include <vector>

#include "attention.h"
#include "threadpool.h"

namespace ktlab {

void attn_head_scalar(const float* q, int group, int hd, const float* k, const float* v, const int32_t* table,
                      int page, int len, float scale, float* scores, float* out) {
    for (int s = 0; s < len; ++s) {  // each key row read once for the whole group
        const float* kr = paged_row(k, table, page, s, hd);
        for (int g = 0; g < group; ++g) {
            const float* qg = q + (size_t)g * hd;
            float d = 0.0f;
            for (int i = 0; i < hd; ++i) d += qg[i] * kr[i];
            scores[(size_t)g * len + s] = d * scale;
        }
    }
    for (int g = 0; g < group; ++g) {
        float* sc = scores + (size_t)g * len;
        float mx = sc[0];
        for (int s = 1; s < len; ++s) mx = sc[s] > mx ? sc[s] : mx;
        float sum = 0.0f;
        for (int s = 0; s < len; ++s) {
            sc[s] = std::exp(sc[s] - mx);
            sum += sc[s];
        }
        const float inv = 1.0f / sum;
        for (int s = 0; s < len; ++s) sc[s] *= inv;
        float* og = out + (size_t)g * hd;
        for (int i = 0; i < hd; ++i) og[i] = 0.0f;
    }
    for (int s = 0; s < len; ++s) {  // each value row read once for the whole group
        const float* vr = paged_row(v, table, page, s, hd);
        for (int g = 0; g < group; ++g) {
            const float p = scores[(size_t)g * len + s];
            float* og = out + (size_t)g * hd;
            for (int i = 0; i < hd; ++i) og[i] += p * vr[i];
        }
    }
}

void paged_decode_attention(const float* q, const float* k, const float* v, int64_t head_rows,
                            const int32_t* tables, int max_pages, const int32_t* lens, int n_seqs, int nh, int nkv,
                            int hd, int page, float scale, float* out, Isa isa, int threads) {
    if (n_seqs <= 0) return;
    attn_head_fn head = attn_head_scalar;
    if ((isa == Isa::avx512 || isa == Isa::amx) && hd % 16 == 0) head = attn_head_avx512;
    else if (isa != Isa::scalar && hd % 8 == 0) head = attn_head_avx2;
    const int group = nh / nkv;
    const int n_tasks = n_seqs * nkv;
    auto task = [&](int t) {
        const int b = t / nkv, j = t % nkv;
        const int len = lens[b];
        thread_local std::vector<float> scores;
        if (scores.size() < (size_t)group * len) scores.resize((size_t)group * len);
        const size_t qo = ((size_t)b * nh + (size_t)j * group) * hd;
        const size_t ko = (size_t)j * head_rows * hd;
        head(q + qo, group, hd, k + ko, v + ko, tables + (size_t)b * max_pages, page, len, scale, scores.data(),
             out + qo);
    };
    run_parallel(n_tasks, threads, task);
}

}  // namespace ktlab
