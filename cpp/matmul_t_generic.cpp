// Transposed products: scalar dequantizers, the scalar tile twin and the driver. See matmul_t.h.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "matmul_t.h"
#include "mxfp4.h"
#include "quant.h"
#include "threadpool.h"

namespace ktlab {

namespace {

void dequant_q8_0(const uint8_t* row, int64_t b0, int64_t b1, float* out) {
    const block_q8_0* blocks = reinterpret_cast<const block_q8_0*>(row);
    for (int64_t b = b0; b < b1; ++b) {
        const float d = fp16_to_fp32(blocks[b].d);
        for (int i = 0; i < QK8_0; ++i) *out++ = d * (float)blocks[b].qs[i];
    }
}

const uint8_t* qh_of(const block_q4_K&) { return nullptr; }
const uint8_t* qh_of(const block_q5_K& x) { return x.qh; }

// Q4_K / Q5_K (fifth bits from qh for Q5_K): per 64 values j, sub-blocks 2j and 2j + 1: d * sc * q - dmin * m.
template <class Block>
void dequant_q45_k(const uint8_t* row, int64_t b0, int64_t b1, float* out, bool fifth_bit) {
    const Block* blocks = reinterpret_cast<const Block*>(row);
    for (int64_t b = b0; b < b1; ++b) {
        const Block& x = blocks[b];
        const float d = fp16_to_fp32(x.d), dmin = fp16_to_fp32(x.dmin);
        for (int j = 0; j < 4; ++j) {
            uint8_t sc1, m1, sc2, m2;
            q4_k_scale_min(2 * j, x.scales, &sc1, &m1);
            q4_k_scale_min(2 * j + 1, x.scales, &sc2, &m2);
            const float d1 = d * sc1, mm1 = dmin * m1, d2 = d * sc2, mm2 = dmin * m2;
            const uint8_t* q = x.qs + 32 * j;
            for (int l = 0; l < 32; ++l) {
                int v = q[l] & 0xF;
                if (fifth_bit) v += ((qh_of(x)[l] >> (2 * j)) & 1) << 4;
                out[64 * j + l] = d1 * (float)v - mm1;
            }
            for (int l = 0; l < 32; ++l) {
                int v = q[l] >> 4;
                if (fifth_bit) v += ((qh_of(x)[l] >> (2 * j + 1)) & 1) << 4;
                out[64 * j + 32 + l] = d2 * (float)v - mm2;
            }
        }
        out += QK_K;
    }
}

void dequant_q6_k(const uint8_t* row, int64_t b0, int64_t b1, float* out) {
    const block_q6_K* blocks = reinterpret_cast<const block_q6_K*>(row);
    for (int64_t b = b0; b < b1; ++b) {
        const block_q6_K& x = blocks[b];
        const float d = fp16_to_fp32(x.d);
        for (int half = 0; half < 2; ++half) {
            const uint8_t* ql = x.ql + 64 * half;
            const uint8_t* qh = x.qh + 32 * half;
            const int8_t* sc = x.scales + 8 * half;
            for (int l = 0; l < 32; ++l) {
                const int is = l / 16;
                const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                out[128 * half + l] = d * (float)sc[is] * (float)q1;
                out[128 * half + l + 32] = d * (float)sc[is + 2] * (float)q2;
                out[128 * half + l + 64] = d * (float)sc[is + 4] * (float)q3;
                out[128 * half + l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
        out += QK_K;
    }
}

void dequant_mxfp4(const uint8_t* row, int64_t b0, int64_t b1, float* out) {
    for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* x = row + b * kMxfp4BlockBytes;
        const float d = e8m0_half(x[0]);
        for (int j = 0; j < 16; ++j) {
            out[j] = d * (float)kMxfp4Values[x[1 + j] & 0xF];
            out[16 + j] = d * (float)kMxfp4Values[x[1 + j] >> 4];
        }
        out += QK_MXFP4;
    }
}

}  // namespace

void dequantize_row_range(WFormat f, const uint8_t* row, int64_t k0, int64_t k1, float* out) {
    const int64_t block = format_block_values(f);
    switch (f) {
        case WFormat::q8_0: dequant_q8_0(row, k0 / block, k1 / block, out); return;
        case WFormat::q4_k: dequant_q45_k<block_q4_K>(row, k0 / block, k1 / block, out, false); return;
        case WFormat::q5_k: dequant_q45_k<block_q5_K>(row, k0 / block, k1 / block, out, true); return;
        case WFormat::q6_k: dequant_q6_k(row, k0 / block, k1 / block, out); return;
        case WFormat::mxfp4: dequant_mxfp4(row, k0 / block, k1 / block, out); return;
        case WFormat::bf16: {
            const uint16_t* v = reinterpret_cast<const uint16_t*>(row);
            for (int64_t i = k0; i < k1; ++i) *out++ = bf16_to_fp32(v[i]);
            return;
        }
    }
}

void matmul_t_tile_scalar(const float* w, int ldw, int rows, const float* dy, int64_t ldy, int m, float* dx,
                          int64_t ldx, int len) {
    for (int j = 0; j < m; ++j) {
        for (int c = 0; c < len; ++c) {
            float acc = 0.0f;
            for (int r = 0; r < rows; ++r) acc = std::fma(dy[j * ldy + r], w[(size_t)r * ldw + c], acc);
            dx[j * ldx + c] += acc;
        }
    }
}

void matmul_t_sum(WFormat f, const uint8_t* const* w, const float* const* dy, int parts, size_t row_bytes, int64_t n,
                  int64_t k, int64_t m, float* dx, Isa isa, int threads) {
    const tile_fn tile = isa == Isa::scalar ? matmul_t_tile_scalar
                         : isa == Isa::avx2 ? matmul_t_tile_avx2 : matmul_t_tile_avx512;
    // Q8_0 rows dequantize on the path's vector unit (the same products); other formats on the scalar twins.
    void (*q8_0_rows)(const uint8_t*, int64_t, int64_t, float*) =
        isa == Isa::scalar ? nullptr : isa == Isa::avx2 ? dequant_q8_0_avx2 : dequant_q8_0_avx512;
    // Narrower tasks where the blocks allow (more of them to share among threads; the same bits: a
    // task's width never changes an element's chain).
    const int64_t width = format_block_values(f) > kMatmulTChunk / 2 ? kMatmulTChunk : kMatmulTChunk / 2;
    const int64_t chunks = (k + width - 1) / width;
    run_parallel((int)chunks, threads, [&](int c) {
        const int64_t k0 = (int64_t)c * width, k1 = std::min(k, k0 + width);
        const int len = (int)(k1 - k0);
        thread_local std::vector<float> buf;
        buf.resize((size_t)kMatmulTRows * kMatmulTChunk);
        for (int64_t j = 0; j < m; ++j) std::memset(dx + j * k + k0, 0, sizeof(float) * len);
        for (int part = 0; part < parts; ++part) {
            for (int64_t r0 = 0; r0 < n; r0 += kMatmulTRows) {
                const int rows = (int)std::min<int64_t>(kMatmulTRows, n - r0);
                for (int r = 0; r < rows; ++r) {
                    const uint8_t* row = w[part] + (size_t)(r0 + r) * row_bytes;
                    float* out = buf.data() + (size_t)r * kMatmulTChunk;
                    if (f == WFormat::q8_0 && q8_0_rows) {
                        q8_0_rows(row, k0 / QK8_0, k1 / QK8_0, out);
                    } else {
                        dequantize_row_range(f, row, k0, k1, out);
                    }
                }
                tile(buf.data(), kMatmulTChunk, rows, dy[part] + r0, n, (int)m, dx + k0, k, len);
            }
        }
    });
}

}  // namespace ktlab
