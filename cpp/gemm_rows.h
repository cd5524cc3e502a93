// The loop every row-at-a-time MoE kernel shares: for each weight row, its dot with each
// activation row. The weight row (a few KiB) stays in L1 while the activation rows stream
// past it, so an expert's weights are read from memory once per call however many tokens
// it has. Dot is a target-attributed function of the path's file (a template argument, so
// this loop itself needs no SIMD and compiles at the baseline target).
#pragma once

#include <cstddef>
#include <cstdint>

#include "isa.h"

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

// Defines `void name(...)` (a gemm_fn) as gemm_by_rows over `dot`.
#define KTLAB_GEMM_BY_ROWS(name, dot)                                                                  \
    KTLAB_GEMM_DECL(name) { gemm_by_rows<dot>(w, row_bytes, n, k, x, m, y, ldy); }

}  // namespace ktlab
