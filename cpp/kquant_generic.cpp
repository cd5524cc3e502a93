// K-quant repacking (kquant.h) and the scalar twins of the packed kernels: the reference the
// AVX2 and AVX-512 kernels are tested against, computing the same integers and floats as the
// raw-row scalar kernels of moe_generic.cpp.
#include <cstring>

#include "isa.h"
#include "kquant.h"
#include "quant.h"

namespace ktlab {

namespace {

inline void put_fp16(uint8_t* at, uint16_t v) { std::memcpy(at, &v, 2); }
inline float get_fp16(const uint8_t* at) {
    uint16_t v;
    std::memcpy(&v, at, 2);
    return fp16_to_fp32(v);
}

// Row n's 6-bit scales and mins of one Q4_K/Q5_K super-block into the group's unpacked bytes.
void unpack_scales_mins(const uint8_t* scales, int n, uint8_t* sb, const Q45Kx16Offsets& at) {
    for (int s = 0; s < 8; ++s) q4_k_scale_min(s, scales, &sb[at.sc + kKx16Rows * s + n], &sb[at.mn + kKx16Rows * s + n]);
}

// The 4-byte chunks of 16 rows side by side: chunk c of row n (its bytes src_n[4c..4c+3]) at
// dst + 64c + 4n, for `chunks` chunks.
void interleave_chunks(const uint8_t* src, int n, int chunks, uint8_t* dst) {
    for (int c = 0; c < chunks; ++c) std::memcpy(dst + 64 * c + 4 * n, src + 4 * c, 4);
}

template <class Block, int PackedBytes, class PerRow>
void repack_kx16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k, PerRow&& per_row) {
    const int64_t nb = k / QK_K;
    const size_t group_sb = (size_t)kKx16Rows * PackedBytes;
    for (int64_t r0 = 0; r0 < rows; r0 += kKx16Rows) {
        uint8_t* group = out + (size_t)r0 * nb * PackedBytes;
        for (int n = 0; n < kKx16Rows; ++n) {
            const Block* row = reinterpret_cast<const Block*>(raw + (size_t)(r0 + n) * nb * sizeof(Block));
            for (int64_t b = 0; b < nb; ++b) per_row(row[b], n, group + group_sb * b);
        }
    }
}

}  // namespace

void repack_q4_kx16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k) {
    repack_kx16<block_q4_K, kQ4Kx16Bytes>(raw, out, rows, k, [](const block_q4_K& w, int n, uint8_t* sb) {
        interleave_chunks(w.qs, n, QK_K / 8, sb);
        unpack_scales_mins(w.scales, n, sb, kQ4Kx16At);
        put_fp16(sb + kQ4Kx16At.d + 2 * n, w.d);
        put_fp16(sb + kQ4Kx16At.dmin + 2 * n, w.dmin);
    });
}

void repack_q5_kx16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k) {
    repack_kx16<block_q5_K, kQ5Kx16Bytes>(raw, out, rows, k, [](const block_q5_K& w, int n, uint8_t* sb) {
        interleave_chunks(w.qs, n, QK_K / 8, sb);
        interleave_chunks(w.qh, n, QK_K / 32, sb + kQ5Kx16At.qh);
        unpack_scales_mins(w.scales, n, sb, kQ5Kx16At);
        put_fp16(sb + kQ5Kx16At.d + 2 * n, w.d);
        put_fp16(sb + kQ5Kx16At.dmin + 2 * n, w.dmin);
    });
}

void repack_q6_kx16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k) {
    repack_kx16<block_q6_K, kQ6Kx16Bytes>(raw, out, rows, k, [](const block_q6_K& w, int n, uint8_t* sb) {
        for (int h = 0; h < 2; ++h) {
            for (int c = 0; c < 8; ++c) {
                uint8_t* chunk = sb + kQ6Kx16HalfBytes * h + kQ6Kx16ChunkBytes * c + 4 * n;
                std::memcpy(chunk, w.ql + 64 * h + 4 * c, 4);
                std::memcpy(chunk + 64, w.ql + 64 * h + 32 + 4 * c, 4);
                std::memcpy(chunk + 128, w.qh + 32 * h + 4 * c, 4);
            }
        }
        for (int i = 0; i < 8; ++i) std::memcpy(sb + kQ6Kx16Scales + 32 * i + 2 * n, w.scales + 2 * i, 2);
        put_fp16(sb + kQ6Kx16D + 2 * n, w.d);
    });
}

// ---- scalar twins of the packed kernels --------------------------------------------------------

namespace {

// Row n's quant of value v (< 256) of a Q4_Kx16 / Q5_Kx16 super-block (Q5: with its fifth bit).
template <bool Q5>
inline int q45_kx16_quant(const uint8_t* sb, int n, int v) {
    const int j = v / 64, high = v % 64 >= 32, c = v % 32 / 4, p = v % 4;
    const uint8_t byte = sb[64 * (8 * j + c) + 4 * n + p];
    int q = high ? byte >> 4 : byte & 0xF;
    if (Q5) q |= ((sb[kQ5Kx16At.qh + 64 * c + 4 * n + p] >> (2 * j + high)) & 1) << 4;
    return q;
}

template <bool Q5>
void q45_kx16_gemm_scalar(const uint8_t* w, size_t row_bytes, int n_rows, int k, const ActRows& x, int m, float* y,
                          size_t ldy) {
    constexpr int kBytes = Q5 ? kQ5Kx16Bytes : kQ4Kx16Bytes;
    constexpr Q45Kx16Offsets at = Q5 ? kQ5Kx16At : kQ4Kx16At;
    const int nb = k / QK_K;
    for (int r0 = 0; r0 < n_rows; r0 += kKx16Rows) {
        const uint8_t* group = w + (size_t)r0 * row_bytes;
        for (int j = 0; j < m; ++j) {
            const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x.row(j));
            for (int n = 0; n < kKx16Rows; ++n) {
                float sum = 0.0f;
                for (int b = 0; b < nb; ++b) {
                    const uint8_t* sb = group + (size_t)kKx16Rows * kBytes * b;
                    int32_t isum = 0, summ = 0;
                    for (int s = 0; s < 8; ++s) {
                        int32_t dot = 0;
                        for (int v = 32 * s; v < 32 * s + 32; ++v) dot += q45_kx16_quant<Q5>(sb, n, v) * xb[b].qs[v];
                        isum += (int32_t)sb[at.sc + kKx16Rows * s + n] * dot;
                        summ += (int32_t)sb[at.mn + kKx16Rows * s + n] *
                                ((int32_t)xb[b].bsums[2 * s] + (int32_t)xb[b].bsums[2 * s + 1]);
                    }
                    sum += xb[b].d * (get_fp16(sb + at.d + 2 * n) * (float)isum - get_fp16(sb + at.dmin + 2 * n) * (float)summ);
                }
                y[(size_t)j * ldy + r0 + n] = sum;
            }
        }
    }
}

// Row n's unsigned 6-bit quant (q + 32) of value v (< 256) of a Q6_Kx16 super-block.
inline int q6_kx16_u6(const uint8_t* sb, int n, int v) {
    const int h = v / 128, quarter = v % 128 / 32, c = v % 32 / 4, p = v % 4;
    const uint8_t* chunk = sb + kQ6Kx16HalfBytes * h + kQ6Kx16ChunkBytes * c + 4 * n + p;
    const uint8_t low = chunk[quarter & 1 ? 64 : 0];
    const int nib = quarter < 2 ? low & 0xF : low >> 4;
    return nib | (((chunk[128] >> (2 * quarter)) & 3) << 4);
}

}  // namespace

KTLAB_GEMM_DECL(q4_kx16_gemm_scalar) { q45_kx16_gemm_scalar<false>(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(q5_kx16_gemm_scalar) { q45_kx16_gemm_scalar<true>(w, row_bytes, n, k, x, m, y, ldy); }

KTLAB_GEMM_DECL(q6_kx16_gemm_scalar) {
    const int nb = k / QK_K;
    for (int r0 = 0; r0 < n; r0 += kKx16Rows) {
        const uint8_t* group = w + (size_t)r0 * row_bytes;
        for (int j = 0; j < m; ++j) {
            const block_q8_K* xb = reinterpret_cast<const block_q8_K*>(x.row(j));
            for (int r = 0; r < kKx16Rows; ++r) {
                float sum = 0.0f;
                for (int b = 0; b < nb; ++b) {
                    const uint8_t* sb = group + (size_t)kKx16Rows * kQ6Kx16Bytes * b;
                    int32_t isum = 0, offset = 0;
                    for (int s = 0; s < QK_K / 16; ++s) {
                        const int32_t scale = (int8_t)sb[kQ6Kx16Scales + 32 * (s / 2) + 2 * r + s % 2];
                        int32_t dot = 0;
                        for (int v = 16 * s; v < 16 * s + 16; ++v) dot += q6_kx16_u6(sb, r, v) * xb[b].qs[v];
                        isum += scale * dot;
                        offset += scale * (int32_t)xb[b].bsums[s];
                    }
                    isum -= 32 * offset;
                    sum += (get_fp16(sb + kQ6Kx16D + 2 * r) * xb[b].d) * (float)isum;
                }
                y[(size_t)j * ldy + r0 + r] = sum;
            }
        }
    }
}

}  // namespace ktlab
