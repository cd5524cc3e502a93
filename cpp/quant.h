// Block formats, laid out byte for byte like ggml (ggml-common.h), plus the activation
// format our int8 dot products use, plus portable scalar fp16/bf16 <-> fp32 conversions.
//
// Weight blocks are read straight out of GGUF tensor data: a row of K values in format F
// is K / block_size(F) consecutive blocks, rows are consecutive, no padding anywhere.
//
//   format  values/block  bytes/block  layout
//   Q8_0    32            34           fp16 d, int8 qs[32]               x = d * q
//   Q4_K    256           144          fp16 d, fp16 dmin, u8 scales[12], u8 qs[128]
//   Q5_K    256           176          fp16 d, fp16 dmin, u8 scales[12], u8 qh[32], u8 qs[128]
//   Q6_K    256           210          u8 ql[128], u8 qh[64], i8 scales[16], fp16 d
//
// Activation side (our choice): block_q8_act = { fp32 d; int8 qs[32] } (36 bytes), i.e.
// ggml's Q8_0 with the scale kept in fp32 instead of fp16 (one rounding fewer; llama.cpp
// rounds it to fp16). Quantization is per block of 32: d = amax / 127, q = round(x / d).
// A Q8_0 weight block times an activation block is one exact int32 dot of 32 products,
// then scaled by d_w * d_x in fp32.
//
// K-quant weights (Q4_K, Q5_K, Q6_K) take block_q8_K activations: 256 values with one fp32 scale
// (d = amax / 127, q = round(x / d), symmetric like block_q8_act; ggml's q8_K uses -128 and
// the signed max instead) plus bsums[16], the sums of each 16 quants, so the weight
// offsets (Q4_K / Q5_K mins, Q6_K's -32) cost one small integer dot per super-block. A super-block
// dot is exact in int32 and scaled in fp32 once.
// BF16 weights take bf16 activations (fp32 -> bf16 round to nearest even).
//
// Repacked Q8_0 ("Q8_0x16"), built once at load (repack_q8_0x16) for the paths whose
// kernels want it (see isa.h): per group of 16 consecutive rows, nb = K/32 blocks of 544
// bytes, block b at 544*b:
//   512 bytes of quants: byte 64*kk + 4*n + p = row n's qs[b][4*kk + p] (kk < 8, n < 16,
//       p < 4: the VNNI layout, i.e. an AMX B tile of 8 x 64 bytes, or 8 zmm of 16 rows x 4
//       quants for vpdpbusd),
//   then 16 fp16 scales: row n's d of block b.
// A group is nb * 544 bytes, exactly 16 raw rows, so packed row r (r % 16 == 0) starts at
// r * row_bytes as in the raw matrix. Same values, same exact integer dots, same scales.
// Scales sit beside their quants so a decode GEMV reads one sequential stream (the scales of
// a group in a run of their own after its quants streamed 23% slower on one core here).
//
// Repacked BF16 ("BF16x16", repack_bf16x16; K % 32 == 0): per group of 16 rows, per chunk c
// of 32 values, 1024 bytes: bf16 element 32*kk + 2*n + p = row n's value 32*c + 2*kk + p
// (kk < 16, n < 16, p < 2: an AMX-BF16 B tile of 16 x 64 bytes, or 16 zmm of 16 rows x 2
// values for vdpbf16ps). Also exactly the size of the raw rows.
#pragma once

#include <cstdint>
#include <cstring>

namespace ktlab {

constexpr int QK8_0 = 32;  // values per Q8_0 block
constexpr int QK_K = 256;  // values per K-quant super-block
constexpr int K_SCALE_SIZE = 12;

struct block_q8_0 {
    uint16_t d;          // fp16 scale
    int8_t qs[QK8_0];    // quants
};
static_assert(sizeof(block_q8_0) == 34, "block_q8_0 must match ggml (34 bytes)");

// 4.5 bits per weight: 8 sub-blocks of 32, 6-bit scales and mins packed in scales[12].
struct block_q4_K {
    uint16_t d;                     // fp16 super-block scale for the sub-block scales
    uint16_t dmin;                  // fp16 super-block scale for the sub-block mins
    uint8_t scales[K_SCALE_SIZE];   // 8 scales + 8 mins, 6 bits each
    uint8_t qs[QK_K / 2];           // 4-bit quants
};
static_assert(sizeof(block_q4_K) == 144, "block_q4_K must match ggml (144 bytes)");

// 5.5 bits per weight: Q4_K plus a fifth bit per value in qh (value 64j + l: bit 2j of qh[l];
// value 64j + 32 + l: bit 2j + 1).
struct block_q5_K {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[K_SCALE_SIZE];
    uint8_t qh[QK_K / 8];
    uint8_t qs[QK_K / 2];
};
static_assert(sizeof(block_q5_K) == 176, "block_q5_K must match ggml (176 bytes)");

// 6.5625 bits per weight: 16 sub-blocks of 16, int8 scales.
struct block_q6_K {
    uint8_t ql[QK_K / 2];       // low 4 bits of the quants
    uint8_t qh[QK_K / 4];       // high 2 bits of the quants
    int8_t scales[QK_K / 16];   // sub-block scales
    uint16_t d;                 // fp16 super-block scale
};
static_assert(sizeof(block_q6_K) == 210, "block_q6_K must match ggml (210 bytes)");

// Activation block for int8 dot products (see the header comment).
constexpr int kQ8x16Rows = 16;                      // rows per Q8_0x16 group
constexpr int kQ8x16QuantBytes = kQ8x16Rows * QK8_0;  // 512 bytes of quants per group and block
constexpr int kQ8x16BlockBytes = kQ8x16QuantBytes + 2 * kQ8x16Rows;  // 544: then the 16 fp16 scales
constexpr int kBf16x16Chunk = 32;                     // values of K per BF16x16 chunk
constexpr int kBf16x16ChunkBytes = kQ8x16Rows * kBf16x16Chunk * 2;  // 1024

// Block b of a Q8_0x16 group, and the 16 fp16 scales after its quants.
inline const uint8_t* q8x16_block(const uint8_t* group, int64_t b) { return group + b * kQ8x16BlockBytes; }
inline const uint16_t* q8x16_scales(const uint8_t* block) {
    return reinterpret_cast<const uint16_t*>(block + kQ8x16QuantBytes);
}

struct block_q8_act {
    float d;             // fp32 scale
    int8_t qs[QK8_0];    // quants in [-127, 127]
};
static_assert(sizeof(block_q8_act) == 36, "block_q8_act is fp32 d + 32 int8");

// Activation super-block for K-quant dot products (see the header comment).
struct block_q8_K {
    float d;                 // fp32 scale
    int8_t qs[QK_K];         // quants in [-127, 127]
    int16_t bsums[QK_K / 16];  // sum of each group of 16 quants
};
static_assert(sizeof(block_q8_K) == 292, "block_q8_K is fp32 d + 256 int8 + 16 int16");

// Q4_K's 6-bit scale and min of sub-block j (0..7), as ggml's get_scale_min_k4.
inline void q4_k_scale_min(int j, const uint8_t* q, uint8_t* sc, uint8_t* mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *mn = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

// Integer part of one Q4_K x q8_K super-block that does not depend on the quants:
// sum over sub-blocks s of min[s] * (sum of the 32 activation quants of s). Also unpacks
// the 8 scales. Shared by every path (16 multiply-adds: not worth SIMD).
// Q5_K packs its scales and mins the same way (the `scales` field of either block).
inline int32_t q4_k_mins_dot(const uint8_t* scales, const block_q8_K& x, uint8_t sc[8]) {
    int32_t summ = 0;
    for (int s = 0; s < 8; ++s) {
        uint8_t m;
        q4_k_scale_min(s, scales, &sc[s], &m);
        summ += (int32_t)m * ((int32_t)x.bsums[2 * s] + (int32_t)x.bsums[2 * s + 1]);
    }
    return summ;
}

// Q6_K stores quants as u6 - 32: sum over sub-blocks of scale[s] * 32 * (sum of the 16
// activation quants of s), the correction a u6 x s8 dot needs.
inline int32_t q6_k_offset_dot(const block_q6_K& w, const block_q8_K& x) {
    int32_t s32 = 0;
    for (int s = 0; s < QK_K / 16; ++s) s32 += (int32_t)w.scales[s] * (int32_t)x.bsums[s];
    return 32 * s32;
}

// ---- scalar conversions (portable; same bit tricks as ggml / the FP16 library) -------------

inline float fp32_from_bits(uint32_t w) {
    float f;
    std::memcpy(&f, &w, sizeof f);
    return f;
}

inline uint32_t fp32_to_bits(float f) {
    uint32_t w;
    std::memcpy(&w, &f, sizeof w);
    return w;
}

// IEEE half -> float, exact (normals, subnormals, inf, nan).
inline float fp16_to_fp32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xE0u << 23;
    const float exp_scale = 0x1.0p-112f;
    const float normalized = fp32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float magic_bias = 0.5f;
    const float denormalized = fp32_from_bits((two_w >> 17) | magic_mask) - magic_bias;
    const uint32_t denormalized_cutoff = 1u << 27;
    const uint32_t result =
        sign | (two_w < denormalized_cutoff ? fp32_to_bits(denormalized) : fp32_to_bits(normalized));
    return fp32_from_bits(result);
}

// float -> IEEE half, round to nearest even (what numpy's astype(float16) does).
inline uint16_t fp32_to_fp16(float f) {
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = (f < 0 ? -f : f) * scale_to_inf * scale_to_zero;
    const uint32_t w = fp32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = fp32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = fp32_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float bf16_to_fp32(uint16_t h) { return fp32_from_bits((uint32_t)h << 16); }

// float -> bfloat16, round to nearest even; NaN stays a (quiet) NaN. Same as ggml.
inline uint16_t fp32_to_bf16(float f) {
    const uint32_t u = fp32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + (0x7fffu + ((u >> 16) & 1))) >> 16);
}

// ---- row quantizers (moe_generic.cpp) ------------------------------------------------------

// fp32 row of k values (k % 32 == 0) -> k/32 Q8_0 blocks. Twin of ggml's
// quantize_row_q8_0_ref: d = amax / 127, q = roundf(x * (1/d)) (ties away from zero),
// d stored as fp16 (round to nearest even). Bit-exact with gguf.quants.quantize.
void quantize_row_q8_0(const float* x, block_q8_0* y, int64_t k);

// fp32 row -> activation blocks (same rule, d kept in fp32).
void quantize_row_q8_act(const float* x, block_q8_act* y, int64_t k);

// fp32 row (k % 256 == 0) -> block_q8_K (same rule per 256, plus bsums).
void quantize_row_q8_K(const float* x, block_q8_K* y, int64_t k);

// Raw Q8_0 rows -> Q8_0x16 (rows % 16 == 0; out has the same size as the raw rows).
void repack_q8_0x16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k);

// Raw BF16 rows -> BF16x16 (rows % 16 == 0, k % 32 == 0; same size).
void repack_bf16x16(const uint8_t* raw, uint8_t* out, int64_t rows, int64_t k);

// fp32 row -> bf16 (round to nearest even).
void convert_row_bf16(const float* x, uint16_t* y, int64_t k);

}  // namespace ktlab
