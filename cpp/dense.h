// Dense weight matrices (attention projections, the LM head) in any weight format the kernels
// know, and the one matmul every dense projection goes through.
#pragma once

#include <cstddef>
#include <cstdint>

#include "isa.h"

namespace ktlab {

// W [rows, cols] in `fmt`: raw GGUF rows, or (packed) the path's repacked layout of them: Q8_0x16
// (KernelTable::dense_q8_0) for Q8_0, KernelTable::packed for the other formats (rows % 16 == 0).
struct DenseMatrix {
    WFormat fmt = WFormat::q8_0;
    const uint8_t* data = nullptr;
    int64_t rows = 0;
    int64_t cols = 0;
    bool packed = false;

    size_t row_bytes() const {
        const int block = packed ? format_packed_block_bytes(fmt) : format_block_bytes(fmt);
        return (size_t)(cols / format_block_values(fmt)) * (size_t)block;
    }
};

// y[j * ldy + r] = W[r] . x[j] for m activation rows x [m, cols] and every row r of W. Q8_0 goes
// through q8_0_gemm (its bits are the Q8_0 path's); the other formats quantize each activation row
// once to their activation format and run the path's MoE kernels over tasks of 64 rows x 64
// tokens. A token's row of y never depends on m or on the thread count. Throws
// std::invalid_argument when a packed matrix has no kernel on `isa` or rows % 16 != 0.
void dense_gemm(const DenseMatrix& w, const float* x, int64_t m, float* y, size_t ldy, Isa isa, int threads);

// True when `isa` runs dense matrices of `fmt` on their repacked layout (then the model repacks them).
bool has_packed_dense(WFormat fmt, Isa isa);
// Raw rows (rows % 16 == 0) -> the format's repacked layout (rows * packed row bytes), the same on
// every path.
void repack_dense(WFormat fmt, const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k);

}  // namespace ktlab
