// AVX-512 VNNI kernels of the packed K-quants (kquant.h). Twins in kquant_generic.cpp. Sixteen rows
// a zmm: a 64-byte load is 16 rows x 4 bytes of quants, and vpdpbusd (unsigned quants x signed
// activations, exactly the operand order it wants) adds each row's 4 products per lane into a
// sub-block's int32 dot; the dots are then scaled by the rows' sub-block scales (vpmulld) and the
// mins / -32 offsets come from the bsums through vpdpwssd. The integer sums are the scalar
// twin's, exactly, and the floats follow its order.
#include <cstring>

#include "isa.h"
#include "kquant.h"
#include "quant.h"

#if KTLAB_X86
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#define KTLAB_AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

namespace ktlab {

namespace {

constexpr int kQ45Tokens = 4;  // tokens per pass over a group (registers: 5 zmm a token)
constexpr int kQ6Tokens = 3;   // (7 zmm a token)

KTLAB_AVX512 inline __m512i bcast4(const int8_t* q) { return _mm512_set1_epi32(four_quants(q)); }

// 16 bytes (one per row) -> 16 int32 lanes.
KTLAB_AVX512 inline __m512i row_bytes_u32(const uint8_t* p) {
    return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
}

KTLAB_AVX512 inline void prefetch_next(const uint8_t* sb, int bytes) {
    for (int l = 0; l < bytes; l += 64) _mm_prefetch((const char*)sb + bytes + l, _MM_HINT_T0);
}

KTLAB_AVX512 inline __m512 fp16x16(const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}

template <bool Q5>
struct Q45Kx16 {
    template <int NT>
    struct Tile {
        KTLAB_AVX512 static void run(const uint8_t* group, int nb, const block_q8_K* const* x, float* y,
                                     size_t ldy) {
            constexpr int kBytes = kKx16Rows * (Q5 ? kQ5Kx16Bytes : kQ4Kx16Bytes);
            constexpr Q45Kx16Offsets at = Q5 ? kQ5Kx16At : kQ4Kx16At;
            const __m512i low4 = _mm512_set1_epi8(0x0F), bit = _mm512_set1_epi8(0x10);
            __m512 acc[NT];
            for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
            for (int b = 0; b < nb; ++b) {
                const uint8_t* sb = group + (size_t)kBytes * b;
                prefetch_next(sb, kBytes);
                __m512i isum[NT], summ[NT];
                for (int t = 0; t < NT; ++t) isum[t] = summ[t] = _mm512_setzero_si512();
                for (int j = 0; j < 4; ++j) {
                    __m512i dot_lo[NT], dot_hi[NT];
                    for (int t = 0; t < NT; ++t) dot_lo[t] = dot_hi[t] = _mm512_setzero_si512();
                    for (int c = 0; c < 8; ++c) {
                        const __m512i wv = _mm512_loadu_si512(sb + 64 * (8 * j + c));
                        __m512i lo = _mm512_and_si512(wv, low4);
                        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
                        if (Q5) {
                            const __m512i qh = _mm512_loadu_si512(sb + at.qh + 64 * c);
                            lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(qh, 2 * j), 4), bit));
                            hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(qh, 2 * j + 1), 4), bit));
                        }
                        for (int t = 0; t < NT; ++t) {
                            const int8_t* q = x[t][b].qs + 64 * j + 4 * c;
                            dot_lo[t] = _mm512_dpbusd_epi32(dot_lo[t], lo, bcast4(q));
                            dot_hi[t] = _mm512_dpbusd_epi32(dot_hi[t], hi, bcast4(q + 32));
                        }
                    }
                    const __m512i sc_lo = row_bytes_u32(sb + at.sc + kKx16Rows * 2 * j);
                    const __m512i sc_hi = row_bytes_u32(sb + at.sc + kKx16Rows * (2 * j + 1));
                    for (int t = 0; t < NT; ++t) {
                        isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(dot_lo[t], sc_lo));
                        isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(dot_hi[t], sc_hi));
                    }
                }
                for (int s = 0; s < 8; ++s) {  // mins: (m, m) . (bsums[2s], bsums[2s + 1])
                    const __m512i m32 = row_bytes_u32(sb + at.mn + kKx16Rows * s);
                    const __m512i mn = _mm512_or_si512(m32, _mm512_slli_epi32(m32, 16));
                    for (int t = 0; t < NT; ++t) {
                        const __m512i bs = _mm512_set1_epi32(four_quants((const int8_t*)(x[t][b].bsums + 2 * s)));
                        summ[t] = _mm512_dpwssd_epi32(summ[t], mn, bs);
                    }
                }
                const __m512 d = fp16x16(sb + at.d), dmin = fp16x16(sb + at.dmin);
                for (int t = 0; t < NT; ++t) {
                    const __m512 v = _mm512_sub_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(isum[t])),
                                                   _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(summ[t])));
                    acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_set1_ps(x[t][b].d), v));
                }
            }
            for (int t = 0; t < NT; ++t) _mm512_storeu_ps(y + (size_t)t * ldy, acc[t]);
        }
    };
};

template <int NT>
struct Q6Kx16Tile {
    KTLAB_AVX512 static void run(const uint8_t* group, int nb, const block_q8_K* const* x, float* y, size_t ldy) {
        constexpr int kBytes = kKx16Rows * kQ6Kx16Bytes;
        const __m512i low4 = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(0x03);
        __m512 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
        for (int b = 0; b < nb; ++b) {
            const uint8_t* sb = group + (size_t)kBytes * b;
            prefetch_next(sb, kBytes);
            __m512i isum[NT], offset[NT];
            for (int t = 0; t < NT; ++t) isum[t] = offset[t] = _mm512_setzero_si512();
            for (int h = 0; h < 2; ++h) {
                for (int half_c = 0; half_c < 2; ++half_c) {  // chunks 4 half_c .. + 3: sub-blocks 8h + 2Q + half_c
                    __m512i dot[4][NT];
                    for (int Q = 0; Q < 4; ++Q) {
                        for (int t = 0; t < NT; ++t) dot[Q][t] = _mm512_setzero_si512();
                    }
                    for (int c = 4 * half_c; c < 4 * half_c + 4; ++c) {
                        const uint8_t* chunk = sb + kQ6Kx16HalfBytes * h + kQ6Kx16ChunkBytes * c;
                        const __m512i a = _mm512_loadu_si512(chunk);
                        const __m512i bq = _mm512_loadu_si512(chunk + 64);
                        const __m512i qh = _mm512_loadu_si512(chunk + 128);
                        const __m512i nib[4] = {_mm512_and_si512(a, low4), _mm512_and_si512(bq, low4),
                                                _mm512_and_si512(_mm512_srli_epi16(a, 4), low4),
                                                _mm512_and_si512(_mm512_srli_epi16(bq, 4), low4)};
                        for (int Q = 0; Q < 4; ++Q) {
                            const __m512i high = _mm512_and_si512(_mm512_srli_epi16(qh, 2 * Q), two);
                            const __m512i u6 = _mm512_or_si512(nib[Q], _mm512_slli_epi16(high, 4));
                            for (int t = 0; t < NT; ++t) {
                                dot[Q][t] = _mm512_dpbusd_epi32(dot[Q][t], u6, bcast4(x[t][b].qs + 128 * h + 32 * Q + 4 * c));
                            }
                        }
                    }
                    for (int Q = 0; Q < 4; ++Q) {
                        const __m512i pair = _mm512_cvtepi8_epi16(
                            _mm256_loadu_si256((const __m256i*)(sb + kQ6Kx16Scales + 32 * (4 * h + Q))));
                        const __m512i scale = half_c ? _mm512_srai_epi32(pair, 16)
                                                     : _mm512_srai_epi32(_mm512_slli_epi32(pair, 16), 16);
                        for (int t = 0; t < NT; ++t) {
                            isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(dot[Q][t], scale));
                        }
                    }
                }
            }
            for (int i = 0; i < 8; ++i) {  // the offset: (scales[2i], scales[2i+1]) . (bsums[2i], bsums[2i+1])
                const __m512i pair =
                    _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(sb + kQ6Kx16Scales + 32 * i)));
                for (int t = 0; t < NT; ++t) {
                    const __m512i bs = _mm512_set1_epi32(four_quants((const int8_t*)(x[t][b].bsums + 2 * i)));
                    offset[t] = _mm512_dpwssd_epi32(offset[t], pair, bs);
                }
            }
            const __m512 d = fp16x16(sb + kQ6Kx16D);
            for (int t = 0; t < NT; ++t) {
                const __m512i total = _mm512_sub_epi32(isum[t], _mm512_slli_epi32(offset[t], 5));
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(x[t][b].d));
                acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(scale, _mm512_cvtepi32_ps(total)));
            }
        }
        for (int t = 0; t < NT; ++t) _mm512_storeu_ps(y + (size_t)t * ldy, acc[t]);
    }
};

// ---- many tokens: quants unpacked to a byte once per group (kx16_gemm_unpacked) -------------------

constexpr int kUnpackedTokens = 6;  // 4 zmm a token: a sub-block's dot, isum, summ (or offset), acc
// Tokens from which a call unpacks first (the unpacking costs about what a few token tiles of
// nibble and bit work cost; either way the same bits).
// Measured paired on 2048 x 2048 matrices, 2 threads: from 4 tokens Q5_K 1.2-1.3x and Q6_K
// 1.35-1.6x; Q4_K, whose nibbles cost little, about even (unpacked from 8).
constexpr int kQ4UnpackMinTokens = 8;
constexpr int kQ56UnpackMinTokens = 4;

template <bool Q5>
struct Q45Unpack {
    KTLAB_AVX512 static void run(const uint8_t* group, int nb, uint8_t* out) {
        constexpr int kBytes = kKx16Rows * (Q5 ? kQ5Kx16Bytes : kQ4Kx16Bytes);
        constexpr Q45Kx16Offsets at = Q5 ? kQ5Kx16At : kQ4Kx16At;
        const __m512i low4 = _mm512_set1_epi8(0x0F), bit = _mm512_set1_epi8(0x10);
        for (int b = 0; b < nb; ++b) {
            const uint8_t* sb = group + (size_t)kBytes * b;
            uint8_t* u = out + (size_t)kUnpackedBytes * b;
            for (int j = 0; j < 4; ++j) {
                for (int c = 0; c < 8; ++c) {
                    const __m512i wv = _mm512_loadu_si512(sb + 64 * (8 * j + c));
                    __m512i lo = _mm512_and_si512(wv, low4);
                    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
                    if (Q5) {
                        const __m512i qh = _mm512_loadu_si512(sb + at.qh + 64 * c);
                        lo = _mm512_or_si512(lo, _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(qh, 2 * j), 4), bit));
                        hi = _mm512_or_si512(hi, _mm512_and_si512(_mm512_slli_epi16(_mm512_srli_epi16(qh, 2 * j + 1), 4), bit));
                    }
                    _mm512_storeu_si512(u + 64 * (16 * j + c), lo);      // values 64j + 4c ..
                    _mm512_storeu_si512(u + 64 * (16 * j + 8 + c), hi);  // values 64j + 32 + 4c ..
                }
            }
        }
    }
};

struct Q6Unpack {
    KTLAB_AVX512 static void run(const uint8_t* group, int nb, uint8_t* out) {
        constexpr int kBytes = kKx16Rows * kQ6Kx16Bytes;
        const __m512i low4 = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(0x03);
        for (int b = 0; b < nb; ++b) {
            const uint8_t* sb = group + (size_t)kBytes * b;
            uint8_t* u = out + (size_t)kUnpackedBytes * b;
            for (int h = 0; h < 2; ++h) {
                for (int c = 0; c < 8; ++c) {
                    const uint8_t* chunk = sb + kQ6Kx16HalfBytes * h + kQ6Kx16ChunkBytes * c;
                    const __m512i a = _mm512_loadu_si512(chunk);
                    const __m512i bq = _mm512_loadu_si512(chunk + 64);
                    const __m512i qh = _mm512_loadu_si512(chunk + 128);
                    const __m512i nib[4] = {_mm512_and_si512(a, low4), _mm512_and_si512(bq, low4),
                                            _mm512_and_si512(_mm512_srli_epi16(a, 4), low4),
                                            _mm512_and_si512(_mm512_srli_epi16(bq, 4), low4)};
                    for (int Q = 0; Q < 4; ++Q) {  // values 128h + 32Q + 4c ..
                        const __m512i high = _mm512_and_si512(_mm512_srli_epi16(qh, 2 * Q), two);
                        _mm512_storeu_si512(u + 64 * (32 * h + 8 * Q + c), _mm512_or_si512(nib[Q], _mm512_slli_epi16(high, 4)));
                    }
                }
            }
        }
    }
};

// The dot of NT tokens with Chunks (even) consecutive unpacked chunks u[0 .. Chunks) against
// activation quants q of token t at x[t][b].qs + first_value, each token's sum in two independent
// chains (even and odd chunks; exact in int32, so the same integer).
template <int NT, int Chunks>
KTLAB_AVX512 inline void unpacked_dots(const uint8_t* u, int first_value, const block_q8_K* const* x, int b,
                                       __m512i (&dot)[NT]) {
    __m512i odd[NT];
    const int8_t* q[NT];
    for (int t = 0; t < NT; ++t) {
        dot[t] = odd[t] = _mm512_setzero_si512();
        q[t] = x[t][b].qs + first_value;
    }
#pragma GCC unroll 8
    for (int c = 0; c < Chunks; c += 2) {
        const __m512i w0 = _mm512_loadu_si512(u + 64 * c), w1 = _mm512_loadu_si512(u + 64 * c + 64);
        for (int t = 0; t < NT; ++t) {
            dot[t] = _mm512_dpbusd_epi32(dot[t], w0, bcast4(q[t] + 4 * c));
            odd[t] = _mm512_dpbusd_epi32(odd[t], w1, bcast4(q[t] + 4 * c + 4));
        }
    }
    for (int t = 0; t < NT; ++t) dot[t] = _mm512_add_epi32(dot[t], odd[t]);
}

template <bool Q5>
struct Q45Unpacked {
    template <int NT>
    struct Tile {
        KTLAB_AVX512 static void run(const uint8_t* group, const uint8_t* unpacked, int nb, const block_q8_K* const* x,
                                     float* y, size_t ldy) {
            constexpr int kBytes = kKx16Rows * (Q5 ? kQ5Kx16Bytes : kQ4Kx16Bytes);
            constexpr Q45Kx16Offsets at = Q5 ? kQ5Kx16At : kQ4Kx16At;
            __m512 acc[NT];
            for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
            for (int b = 0; b < nb; ++b) {
                const uint8_t* sb = group + (size_t)kBytes * b;
                const uint8_t* u = unpacked + (size_t)kUnpackedBytes * b;
                __m512i isum[NT], summ[NT], dot[NT];
                for (int t = 0; t < NT; ++t) isum[t] = summ[t] = _mm512_setzero_si512();
                for (int s = 0; s < 8; ++s) {  // sub-blocks of 32 values: 8 chunks each
                    unpacked_dots<NT, 8>(u + 64 * 8 * s, 32 * s, x, b, dot);
                    const __m512i sc = row_bytes_u32(sb + at.sc + kKx16Rows * s);
                    const __m512i m32 = row_bytes_u32(sb + at.mn + kKx16Rows * s);
                    const __m512i mn = _mm512_or_si512(m32, _mm512_slli_epi32(m32, 16));
                    for (int t = 0; t < NT; ++t) {
                        isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(dot[t], sc));
                        const __m512i bs = _mm512_set1_epi32(four_quants((const int8_t*)(x[t][b].bsums + 2 * s)));
                        summ[t] = _mm512_dpwssd_epi32(summ[t], mn, bs);
                    }
                }
                const __m512 d = fp16x16(sb + at.d), dmin = fp16x16(sb + at.dmin);
                for (int t = 0; t < NT; ++t) {
                    const __m512 v = _mm512_sub_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(isum[t])),
                                                   _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(summ[t])));
                    acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_set1_ps(x[t][b].d), v));
                }
            }
            for (int t = 0; t < NT; ++t) _mm512_storeu_ps(y + (size_t)t * ldy, acc[t]);
        }
    };
};

template <int NT>
struct Q6Unpacked {
    KTLAB_AVX512 static void run(const uint8_t* group, const uint8_t* unpacked, int nb, const block_q8_K* const* x,
                                 float* y, size_t ldy) {
        constexpr int kBytes = kKx16Rows * kQ6Kx16Bytes;
        __m512 acc[NT];
        for (int t = 0; t < NT; ++t) acc[t] = _mm512_setzero_ps();
        for (int b = 0; b < nb; ++b) {
            const uint8_t* sb = group + (size_t)kBytes * b;
            const uint8_t* u = unpacked + (size_t)kUnpackedBytes * b;
            __m512i isum[NT], offset[NT], dot[NT];
            for (int t = 0; t < NT; ++t) isum[t] = offset[t] = _mm512_setzero_si512();
            for (int i = 0; i < 8; ++i) {  // scale pairs: sub-blocks 2i, 2i + 1 of 16 values, 4 chunks each
                const __m512i pair =
                    _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(sb + kQ6Kx16Scales + 32 * i)));
                for (int q = 0; q < 2; ++q) {
                    unpacked_dots<NT, 4>(u + 64 * (8 * i + 4 * q), 16 * (2 * i + q), x, b, dot);
                    const __m512i scale = q ? _mm512_srai_epi32(pair, 16) : _mm512_srai_epi32(_mm512_slli_epi32(pair, 16), 16);
                    for (int t = 0; t < NT; ++t) isum[t] = _mm512_add_epi32(isum[t], _mm512_mullo_epi32(dot[t], scale));
                }
                for (int t = 0; t < NT; ++t) {
                    const __m512i bs = _mm512_set1_epi32(four_quants((const int8_t*)(x[t][b].bsums + 2 * i)));
                    offset[t] = _mm512_dpwssd_epi32(offset[t], pair, bs);
                }
            }
            const __m512 d = fp16x16(sb + kQ6Kx16D);
            for (int t = 0; t < NT; ++t) {
                const __m512i total = _mm512_sub_epi32(isum[t], _mm512_slli_epi32(offset[t], 5));
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(x[t][b].d));
                acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(scale, _mm512_cvtepi32_ps(total)));
            }
        }
        for (int t = 0; t < NT; ++t) _mm512_storeu_ps(y + (size_t)t * ldy, acc[t]);
    }
};

template <int NT>
using Q4UTile = Q45Unpacked<false>::Tile<NT>;
template <int NT>
using Q5UTile = Q45Unpacked<true>::Tile<NT>;

template <int NT>
using Q4Tile = Q45Kx16<false>::Tile<NT>;
template <int NT>
using Q5Tile = Q45Kx16<true>::Tile<NT>;

}  // namespace

KTLAB_GEMM_DECL(q4_kx16_gemm_avx512) {
    if (m >= kQ4UnpackMinTokens) {
        kx16_gemm_unpacked<Q45Unpack<false>, Q4UTile, kUnpackedTokens>(w, row_bytes, n, k, x, m, y, ldy);
    } else {
        kx16_gemm<Q4Tile, kQ45Tokens>(w, row_bytes, n, k, x, m, y, ldy);
    }
}
KTLAB_GEMM_DECL(q5_kx16_gemm_avx512) {
    if (m >= kQ56UnpackMinTokens) {
        kx16_gemm_unpacked<Q45Unpack<true>, Q5UTile, kUnpackedTokens>(w, row_bytes, n, k, x, m, y, ldy);
    } else {
        kx16_gemm<Q5Tile, kQ45Tokens>(w, row_bytes, n, k, x, m, y, ldy);
    }
}
KTLAB_GEMM_DECL(q6_kx16_gemm_avx512) {
    if (m >= kQ56UnpackMinTokens) {
        kx16_gemm_unpacked<Q6Unpack, Q6Unpacked, kUnpackedTokens>(w, row_bytes, n, k, x, m, y, ldy);
    } else {
        kx16_gemm<Q6Kx16Tile, kQ6Tokens>(w, row_bytes, n, k, x, m, y, ldy);
    }
}

}  // namespace ktlab

#else  // not x86: never selected, defined so the dispatch table links

namespace ktlab {
KTLAB_GEMM_DECL(q4_kx16_gemm_avx512) { q4_kx16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(q5_kx16_gemm_avx512) { q5_kx16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
KTLAB_GEMM_DECL(q6_kx16_gemm_avx512) { q6_kx16_gemm_scalar(w, row_bytes, n, k, x, m, y, ldy); }
}  // namespace ktlab

#endif
