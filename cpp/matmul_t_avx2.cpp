// The transposed products' tile kernel on AVX2 + FMA (twin: matmul_t_tile_scalar; see matmul_t.h).
#include "matmul_t.h"
#include "quant.h"

#if KTLAB_X86
#include <immintrin.h>

namespace ktlab {

// Tokens in pairs, four vectors of columns at a time: eight independent fma chains over the tile's
// rows in registers (each weight load feeds both tokens), then one add into dx; a last odd token and
// the leftover columns on the scalar twin's loop (every element's chain is the same either way).
template <int T>
__attribute__((target("avx2,fma"))) inline void tile_tokens_avx2(const float* w, int ldw, int rows, const float* dy,
                                                        int64_t ldy, float* dx, int64_t ldx, int c) {
    constexpr int W = 8;
    __m256 acc[T][4];
    for (int t = 0; t < T; ++t) {
        for (int v = 0; v < 4; ++v) acc[t][v] = _mm256_setzero_ps();
    }
    for (int r = 0; r < rows; ++r) {
        const float* wr = w + (size_t)r * ldw + c;
        __m256 wv[4];
        for (int v = 0; v < 4; ++v) wv[v] = _mm256_loadu_ps(wr + v * W);
        for (int t = 0; t < T; ++t) {
            const __m256 a = _mm256_set1_ps(dy[t * ldy + r]);
            for (int v = 0; v < 4; ++v) acc[t][v] = _mm256_fmadd_ps(a, wv[v], acc[t][v]);
        }
    }
    for (int t = 0; t < T; ++t) {
        float* o = dx + t * ldx + c;
        for (int v = 0; v < 4; ++v) _mm256_storeu_ps(o + v * W, _mm256_add_ps(_mm256_loadu_ps(o + v * W), acc[t][v]));
    }
}

__attribute__((target("avx2,fma"))) void matmul_t_tile_avx2(const float* w, int ldw, int rows, const float* dy, int64_t ldy,
                                                  int m, float* dx, int64_t ldx, int len) {
    constexpr int W = 8;
    const int wide = len / (4 * W) * (4 * W);
    int j = 0;
    for (; j + 2 <= m; j += 2) {
        for (int c = 0; c < wide; c += 4 * W) tile_tokens_avx2<2>(w, ldw, rows, dy + j * ldy, ldy, dx + j * ldx, ldx, c);
    }
    for (; j < m; ++j) {
        for (int c = 0; c < wide; c += 4 * W) tile_tokens_avx2<1>(w, ldw, rows, dy + j * ldy, ldy, dx + j * ldx, ldx, c);
    }
    if (wide < len) matmul_t_tile_scalar(w + wide, ldw, rows, dy, ldy, m, dx + wide, ldx, len - wide);
}

__attribute__((target("avx2,fma,f16c"))) void dequant_q8_0_avx2(const uint8_t* row, int64_t b0, int64_t b1,
                                                                 float* out) {
    const block_q8_0* blocks = reinterpret_cast<const block_q8_0*>(row);
    for (int64_t b = b0; b < b1; ++b, out += QK8_0) {
        const __m256 d = _mm256_set1_ps(fp16_to_fp32(blocks[b].d));
        for (int i = 0; i < QK8_0; i += 8) {
            const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(blocks[b].qs + i));
            _mm256_storeu_ps(out + i, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
        }
    }
}

}  // namespace ktlab

#else  // not x86: never selected, defined so the driver links

namespace ktlab {
void matmul_t_tile_avx2(const float* w, int ldw, int rows, const float* dy, int64_t ldy, int m, float* dx,
                        int64_t ldx, int len) {
    matmul_t_tile_scalar(w, ldw, rows, dy, ldy, m, dx, ldx, len);
}
void dequant_q8_0_avx2(const uint8_t* row, int64_t b0, int64_t b1, float* out) {
    dequantize_row_range(WFormat::q8_0, row, b0 * QK8_0, b1 * QK8_0, out);
}
}  // namespace ktlab

#endif
