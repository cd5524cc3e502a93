// CPU feature detection, ISA paths, and the one dispatch table of kernels per path.
//
// Paths, best first: amx > avx512 > avx2 > scalar. A path is available when every feature
// its kernels use is present (and, for AMX, when Linux grants the tile-data permission).
// KTLAB_ISA=scalar|avx2|avx512|amx forces a path (read once, at first use); forcing an
// unavailable path is an error, never an "Illegal instruction".
// KTLAB_ISA_DISABLE=amx,avx512 (comma separated, read once) pretends this CPU lacks those
// paths: for tests of the error paths and for "what if" runs on a big CPU.
#pragma once

#include <cstddef>
#include <cstdint>

#include "quant.h"

// x86 SIMD paths are compiled on x86 only; -DKTLAB_NO_X86 builds the portable (scalar) variant
// anywhere, which is also how the non-x86 branches get compile-checked on an x86 box.
#if (defined(__x86_64__) || defined(_M_X64) || defined(__i386__)) && !defined(KTLAB_NO_X86)
#define KTLAB_X86 1
#else
#define KTLAB_X86 0
#endif

namespace ktlab {

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, amx = 3 };
constexpr int kNumIsa = 4;

struct CpuFeatures {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512vnni = false, avx512bf16 = false;
    bool amx_tile = false, amx_int8 = false, amx_bf16 = false;
    bool amx_permitted = false;  // ARCH_REQ_XCOMP_PERM(XTILEDATA) succeeded
};

// Detected once (thread-safe static), never masked by KTLAB_ISA_DISABLE.
const CpuFeatures& cpu_features();

const char* isa_name(Isa isa);
// Returns true and sets *out when name is one of scalar|avx2|avx512|amx.
bool isa_from_name(const char* name, Isa* out);
// Hardware support for a path, after KTLAB_ISA_DISABLE.
bool isa_available(Isa isa);
// True when KTLAB_ISA_DISABLE names this path (scalar can't be disabled).
bool isa_disabled(Isa isa);
// Best available path; scalar when the CPU lacks AVX2.
Isa best_isa();
// The value of KTLAB_ISA read once at first call ("" when unset).
const char* forced_isa_env();

enum ResolveStatus : int { kResolveOk = 0, kResolveUnknown = 1, kResolveUnavailable = 2 };
// name == nullptr or "": KTLAB_ISA if set, else best_isa(). Otherwise that name.
// On error *out is untouched and the status says why; the caller builds the message.
int resolve_isa(const char* name, Isa* out);

// ---- kernels, one function per ISA, the same signature ----------------------------------

// Software prefetch distance on weight streams (bytes ahead of the current block). The
// hardware prefetcher alone left the AVX-512 Q8_0 GEMV at ~11 GB/s cold on one core here;
// 2 KiB ahead gave ~14.6 (1 KiB: 13.0, 4 KiB: 12.8). Measured on a busy 2-core box: rough.
constexpr int kPrefetchBytes = 2048;

// y[r] = sum_b (d_w[r,b] * xq[b].d) * dot_int8(W[r,b].qs, xq[b].qs) for r in [r0, r1).
// w: raw Q8_0 bytes, row r starts at w + r * row_bytes, row_bytes = nb * 34.
using q8_0_gemv_rows_fn = void (*)(const uint8_t* w, size_t row_bytes, const block_q8_act* xq,
                                   int nb, float* y, int r0, int r1);

void q8_0_gemv_rows_scalar(const uint8_t*, size_t, const block_q8_act*, int, float*, int, int);
void q8_0_gemv_rows_avx2(const uint8_t*, size_t, const block_q8_act*, int, float*, int, int);
void q8_0_gemv_rows_avx512(const uint8_t*, size_t, const block_q8_act*, int, float*, int, int);
void q8_0_gemv_rows_amx(const uint8_t*, size_t, const block_q8_act*, int, float*, int, int);

// The same for m activation rows (row j at xq + j * nb): y[j * ldy + r] for r in [r0, r1).
// Each y[j, r] is bit-identical to the GEMV's y[r] for activation row j alone, whatever m.
using q8_0_gemm_rows_fn = void (*)(const uint8_t* w, size_t row_bytes, const block_q8_act* xq, int nb, int m,
                                   float* y, size_t ldy, int r0, int r1);

void q8_0_gemm_rows_scalar(const uint8_t*, size_t, const block_q8_act*, int, int, float*, size_t, int, int);
void q8_0_gemm_rows_avx2(const uint8_t*, size_t, const block_q8_act*, int, int, float*, size_t, int, int);
void q8_0_gemm_rows_avx512(const uint8_t*, size_t, const block_q8_act*, int, int, float*, size_t, int, int);
void q8_0_gemm_rows_amx(const uint8_t*, size_t, const block_q8_act*, int, int, float*, size_t, int, int);

// ---- MoE kernels: one small GEMM per weight format ------------------------------------------
//
// Weight formats of the expert and dense matrices. F16/F32 weights are converted to BF16 at
// load (ktlab/kernels.py), so the kernels see six formats (MXFP4: gpt-oss's experts, mxfp4.h).
enum class WFormat : int { q8_0 = 0, q4_k = 1, q6_k = 2, bf16 = 3, q5_k = 4, mxfp4 = 5 };
constexpr int kNumFormats = 6;

// Values per weight block (a row of K values is K / block_values whole blocks), bytes per
// block, and the activation each format's dot product takes: block_q8_act per 32 values
// (Q8_0), block_q8_K per 256 (Q4_K, Q6_K), bf16 per value (BF16).
int format_block_values(WFormat f);
int format_block_bytes(WFormat f);
int act_block_values(WFormat f);
int act_block_bytes(WFormat f);
// Bytes of one row's block in the format's repacked layout (KernelTable::packed): the raw
// block's bytes, but for Q4_K and Q5_K, whose packed scales and mins take a byte each
// (kquant.h: 148 and 180 instead of 144 and 176).
int format_packed_block_bytes(WFormat f);
// Bytes of one activation row of k values (k a multiple of act_block_values).
inline size_t act_row_bytes(WFormat f, int64_t k) {
    return (size_t)(k / act_block_values(f)) * (size_t)act_block_bytes(f);
}
struct KernelTable;
// fp32 row of k values -> the activation format of weight format f, through `kt`'s quantizers
// (each path's SIMD twin of the scalar one, bit-identical: all paths see the same activations).
void quantize_act_row(WFormat f, const float* x, uint8_t* y, int64_t k, const KernelTable& kt);

// m activation rows (already in the format's activation type): row j starts at
// base + (index ? index[j] : j) * stride. `packed` is null, or the same rows re-laid out
// by the path's pack function (once per expert per call), which its kernels read instead.
struct ActRows {
    const uint8_t* base = nullptr;
    size_t stride = 0;
    const int32_t* index = nullptr;
    const uint8_t* packed = nullptr;
    const uint8_t* row(int j) const { return base + (size_t)(index ? index[j] : j) * stride; }
};

// y[j * ldy + i] = dot(W row i, activation row j) for i in [0, n), j in [0, m); W row i
// starts at w + i * row_bytes and holds k values. Deterministic: the value of y[j, i]
// depends only on row i, activation row j and m (never on threads or on n).
using gemm_fn = void (*)(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m,
                         float* y, size_t ldy);

// Optional per path and format (AMX): re-lay m activation rows of k values into `out`
// (pack_bytes(m, k) bytes) for the tile kernels. Used when m >= pack_min_rows.
using pack_fn = void (*)(const ActRows& x, int m, int k, uint8_t* out);
using pack_bytes_fn = size_t (*)(int m, int k);
// Optional per path and format: re-lay `rows` raw weight rows of k values (rows % 16 == 0,
// k % 32 == 0) into `out` (the same number of bytes) once at load; the path's gemm then
// reads that.
using repack_fn = void (*)(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k);

#define KTLAB_GEMM_DECL(name)                                                                       \
    void name(const uint8_t* w, size_t row_bytes, int n, int k, const ActRows& x, int m, float* y, \
              size_t ldy)
KTLAB_GEMM_DECL(q8_0_gemm_scalar);
KTLAB_GEMM_DECL(q4_k_gemm_scalar);
KTLAB_GEMM_DECL(q6_k_gemm_scalar);
KTLAB_GEMM_DECL(q5_k_gemm_scalar);  // every path's raw Q5_K kernel (Q5_K rows come in 16s: packed)
KTLAB_GEMM_DECL(bf16_gemm_scalar);
KTLAB_GEMM_DECL(mxfp4_gemm_scalar);  // every path's raw MXFP4 kernel (rows in 16s are repacked)
KTLAB_GEMM_DECL(q8_0_gemm_avx2);
KTLAB_GEMM_DECL(q4_k_gemm_avx2);
KTLAB_GEMM_DECL(q6_k_gemm_avx2);
KTLAB_GEMM_DECL(bf16_gemm_avx2);
KTLAB_GEMM_DECL(q8_0_gemm_avx512);
KTLAB_GEMM_DECL(bf16_gemm_avx512);      // avx512f: bf16 widened to fp32, FMA
KTLAB_GEMM_DECL(bf16_gemm_avx512bf16);  // vdpbf16ps; picked when the CPU has avx512_bf16
// Q8_0x16 (repacked, see quant.h): w and row_bytes address the packed matrix as if it were
// raw (row r at w + r * row_bytes); n % 16 == 0.
KTLAB_GEMM_DECL(q8_0x16_gemm_scalar);
KTLAB_GEMM_DECL(q8_0x16_gemm_avx2);
KTLAB_GEMM_DECL(q8_0x16_gemm_avx512);
KTLAB_GEMM_DECL(q8_0x16_gemm_amx);
// Q4_Kx16, Q5_Kx16, Q6_Kx16 (repacked, see kquant.h): w and row_bytes address the packed matrix
// (row r at w + r * row_bytes, row_bytes = k / 256 * the packed bytes); n % 16 == 0.
KTLAB_GEMM_DECL(q4_kx16_gemm_scalar);
KTLAB_GEMM_DECL(q5_kx16_gemm_scalar);
KTLAB_GEMM_DECL(q6_kx16_gemm_scalar);
KTLAB_GEMM_DECL(q4_kx16_gemm_avx2);
KTLAB_GEMM_DECL(q5_kx16_gemm_avx2);
KTLAB_GEMM_DECL(q6_kx16_gemm_avx2);
KTLAB_GEMM_DECL(q4_kx16_gemm_avx512);
KTLAB_GEMM_DECL(q5_kx16_gemm_avx512);
KTLAB_GEMM_DECL(q6_kx16_gemm_avx512);
// MXFP4x16 (repacked, see mxfp4.h), k % 32 == 0, n % 16 == 0.
KTLAB_GEMM_DECL(mxfp4x16_gemm_scalar);
KTLAB_GEMM_DECL(mxfp4x16_gemm_avx2);
KTLAB_GEMM_DECL(mxfp4x16_gemm_avx512);
// BF16x16 (repacked, see quant.h), k % 32 == 0, n % 16 == 0.
KTLAB_GEMM_DECL(bf16x16_gemm_scalar);
KTLAB_GEMM_DECL(bf16x16_gemm_avx512bf16);
KTLAB_GEMM_DECL(bf16x16_gemm_amx);
void q8_0x16_pack_avx512(const ActRows& x, int m, int k, uint8_t* out);
size_t q8_0x16_pack_bytes_avx512(int m, int k);
void q8_0x16_pack_amx(const ActRows& x, int m, int k, uint8_t* out);
size_t q8_0x16_pack_bytes_amx(int m, int k);
void bf16x16_pack_amx(const ActRows& x, int m, int k, uint8_t* out);
size_t bf16x16_pack_bytes_amx(int m, int k);

struct FormatKernels {
    gemm_fn gemm;
    pack_fn pack = nullptr;            // null: the path reads activation rows as they are
    pack_bytes_fn pack_bytes = nullptr;
    int pack_min_rows = 0;             // pack (and use tiles) when an expert has >= this many rows
    repack_fn repack = nullptr;        // null: gemm reads the raw GGUF rows
};

// quantize_row_q8_act and quantize_row_q8_K (quant.h), bit-identical on every path.
using quantize_q8_act_fn = void (*)(const float* x, block_q8_act* y, int64_t k);
void quantize_row_q8_act_avx2(const float* x, block_q8_act* y, int64_t k);
void quantize_row_q8_act_avx512(const float* x, block_q8_act* y, int64_t k);
using quantize_q8_K_fn = void (*)(const float* x, block_q8_K* y, int64_t k);
void quantize_row_q8_K_avx2(const float* x, block_q8_K* y, int64_t k);
void quantize_row_q8_K_avx512(const float* x, block_q8_K* y, int64_t k);
// The activation quantizer of `isa`'s kernel table: x [k] -> k / 32 blocks of block_q8_act.
void quantize_q8_act(const float* x, block_q8_act* y, int64_t k, Isa isa);
// The same for block_q8_K (k / 256 super-blocks with their 16-value sums).
void quantize_q8_K(const float* x, block_q8_K* y, int64_t k, Isa isa);

struct KernelTable {
    Isa isa;
    q8_0_gemv_rows_fn q8_0_gemv_rows;
    q8_0_gemm_rows_fn q8_0_gemm_rows;
    quantize_q8_act_fn quantize_q8_act;
    quantize_q8_K_fn quantize_q8_K;
    FormatKernels fmt[kNumFormats];     // raw GGUF weights, indexed by (int)WFormat
    FormatKernels packed[kNumFormats];  // repacked weights (entries with a repack function)
    // Dense Q8_0 matrices (attention, head) repacked at load where the path has a kernel whose
    // per-token arithmetic never depends on how many tokens come together (gemm null: the raw
    // rows through q8_0_gemm_rows). AMX uses the AVX-512 kernel: its tile kernel switches
    // arithmetic with the token count.
    FormatKernels dense_q8_0;
};

// The dispatch table entry for a path (does not check availability: callers resolve first).
const KernelTable& kernels_for(Isa isa);

// ---- drivers (moe_generic.cpp) ------------------------------------------------------------

// y[n] = W[n, k] . x[k]: W is n rows of raw Q8_0 blocks (k % 32 == 0), x fp32, quantized
// on the fly to block_q8_act. Rows are split across up to `threads` threads of the global
// pool (threads <= 0: default_num_threads()). Work split and per-row arithmetic do not depend
// on the thread count, so results are bit-identical for any `threads`.
// The caller validates shapes and resolves `isa` (must be available).
void q8_0_gemv(const uint8_t* w, const float* x, float* y, int64_t n, int64_t k, Isa isa, int threads);

// Y[m, n] = X[m, k] . W[n, k]^T (dense layers, m tokens at once): each row of X quantized
// as the GEMV does, then tasks of (64 weight rows x up to 64 tokens) on the pool, each weight
// row read once per task for all its tokens. Row j of Y is bit-identical to q8_0_gemv of
// row j of X alone, for any m and any thread count (m = 1 is the GEMV).
// packed: w is Q8_0x16 (repack_q8_0x16 of the raw rows, n % 16 == 0) for the path's
// dense_q8_0 kernel; then each row of Y is bit-identical for any m (but not equal to the
// raw GEMV's). Throws std::invalid_argument when the path has no such kernel or n % 16 != 0.
// ldy: the stride of y's rows (0: n).
void q8_0_gemm(const uint8_t* w, const float* x, float* y, int64_t n, int64_t k, int64_t m, Isa isa, int threads,
               bool packed = false, size_t ldy = 0);
// True when the path has a dense_q8_0 kernel (the model then repacks its dense Q8_0 matrices).
bool has_dense_q8_0x16(Isa isa);

}  // namespace ktlab
