// The loop every row-at-a-time MoE kernel shares: for each weight row, its dot with each
// activation row. The weight row (a few KiB) stays in L1 while the activation rows stream
// past it, so an expert's weights are read from memory once per call however many tokens
// it has. Dot is a target-attributed function of the path's file (a template argument, so
// this loop itself needs no SIMD and compiles at the baseline target).
#pragma once

#include <cstddef>
#include <cstdint>

#include "isa.h"
#include "quant.h"

namespace ktlab {

// float Dot(const uint8_t* w_row, const uint8_t* act_row, int k)
using row_dot_fn = float (*)(const uint8_t*, const uint8_t*, int);

template <row_dot_fn Dot>
inline void gemm_by_rows(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m, float* y,
                         size_t ldy) {
    for (int i = 0; i < n; ++i) {
        const uint8_t* wr = w + (size_t)i * row_bytes;
        for (int j = 0; j < m; ++j) y[(size_t)j * ldy + i] = Dot(wr, x.row(j), k);
    }
}

// void Dots(const block_q8_0* w_row, const block_q8_act* const* x_rows, int nb, float* out):
// one Q8_0 weight row against several activation rows (as many as the instance handles).
using q8_0_dots_fn = void (*)(const block_q8_0*, const block_q8_act* const*, int, float*);

// The token loop of the multi-token Q8_0 row kernels: for each weight row, tokens in fours through
// Dots4 (one pass over the row for four tokens), the rest through Dots1. The two must give each
// token the same arithmetic, so results do not depend on m. row_of(j): token j's activation blocks.
template <q8_0_dots_fn Dots4, q8_0_dots_fn Dots1, class RowOf>
inline void q8_0_rows_by_fours(const uint8_t* w, size_t row_bytes, int nb, int m, RowOf&& row_of, float* y,
                               size_t ldy, int r0, int r1) {
    for (int r = r0; r < r1; ++r) {
        const block_q8_0* wr = reinterpret_cast<const block_q8_0*>(w + (size_t)r * row_bytes);
        int j = 0;
        for (; j + 4 <= m; j += 4) {
            const block_q8_act* x[4] = {row_of(j), row_of(j + 1), row_of(j + 2), row_of(j + 3)};
            float out[4];
            Dots4(wr, x, nb, out);
            for (int t = 0; t < 4; ++t) y[(size_t)(j + t) * ldy + r] = out[t];
        }
        for (; j < m; ++j) {
            const block_q8_act* x = row_of(j);
            Dots1(wr, &x, nb, y + (size_t)j * ldy + r);
        }
    }
}

// q8_0_gemm_rows_fn over activation rows laid one after another (xq + j * nb).
template <q8_0_dots_fn Dots4, q8_0_dots_fn Dots1>
inline void q8_0_gemm_rows_by_fours(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, int m,
                                    float* y, size_t ldy, int r0, int r1) {
    q8_0_rows_by_fours<Dots4, Dots1>(w, row_bytes, nb, m, [&](int j) { return xq + (size_t)j * nb; }, y, ldy, r0,
                                     r1);
}

// A gemm_fn (the MoE's ActRows) through the same loop: an expert's tokens in fours.
template <q8_0_dots_fn Dots4, q8_0_dots_fn Dots1>
inline void q8_0_gemm_act_rows_by_fours(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m,
                                        float* y, size_t ldy) {
    q8_0_rows_by_fours<Dots4, Dots1>(
        w, row_bytes, k / QK8_0, m, [&](int j) { return reinterpret_cast<const block_q8_act*>(x.row(j)); }, y, ldy, 0,
        n);
}

// Defines `void name(...)` (a gemm_fn) as gemm_by_rows over `dot`.
#define KTLAB_GEMM_BY_ROWS(name, dot)                                                                  \
    KTLAB_GEMM_DECL(name) { gemm_by_rows<dot>(w, row_bytes, n, k, x, m, y, ldy); }

}  // namespace ktlab
